"""The compile figures bench/cost_model.py times the Triton kernels with (SASS_FACTS) are those of
today's kernels: compiled for sm_90 with the JIT's runtime specialization (tests/triton_build.py),
registers from ptxas, shared memory from the compile, and the static SASS instruction counts of
the per-tile code outside the K loop, read with nvdisasm (no GPU needed)."""

import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")

from arcface_kernels.backends.triton.configs import CONFIGS  # noqa: E402
from bench import cost_model  # noqa: E402
from triton_build import compile_kernel, resource_usage  # noqa: E402

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_LABEL = re.compile(r"^\s*\.(L_x_\d+):")


def sass_loops(cubin):
    """(instruction count, [(first, last, has an MMA)] for every backward branch) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([NVDISASM, "-c", f.name], capture_output=True, text=True, check=True).stdout
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        if (label := _LABEL.match(line)) is not None:
            pending.append(label.group(1))
        elif (ins := _INSTRUCTION.match(line)) is not None:
            labels.update({name: len(instructions) for name in pending})
            pending = []
            instructions.append(ins.group(2))
    loops = []
    for i, ins in enumerate(instructions):
        target = re.search(r"\bBRA\b.*?\.(L_x_\d+)", ins)
        if target and labels.get(target.group(1), i + 1) <= i:
            first = labels[target.group(1)]
            loops.append((first, i, any("GMMA" in x for x in instructions[first:i + 1])))
    return len(instructions), loops


def epilogue_instructions(cubin):
    """Static instructions of one tile's code outside the K loop: the largest loop holding the MMAs
    (the class-tile loop) less the smallest (the K loop); the whole kernel where one tile is all."""
    total, loops = sass_loops(cubin)
    mma_loops = sorted((last - first + 1 for first, last, mma in loops if mma))
    k_loop, outer = mma_loops[0], mma_loops[-1]
    return (outer if outer > k_loop else total) - k_loop


@pytest.mark.skipif(not os.path.exists(NVDISASM), reason="triton's nvdisasm is not installed")
@pytest.mark.parametrize("kernel", sorted(CONFIGS))
def test_sass_facts_are_todays_compile(kernel):
    compiled = compile_kernel(kernel, CONFIGS[kernel], 90)  # the same call (and cache) as test_triton_compile
    facts = cost_model.SASS_FACTS[kernel]
    assert resource_usage(compiled, 90)["registers"] == facts["registers"]
    assert compiled.metadata.shared == facts["smem"]
    assert epilogue_instructions(compiled.asm["cubin"]) == facts["epilogue"]
