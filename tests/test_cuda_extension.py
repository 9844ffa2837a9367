"""The CUDA extension builds into a wheel that installs into a fresh environment, imports, and
registers its ops with the dispatcher; without a GPU the `cuda` backend says so clearly.
(Its numerics run in tests/test_backends.py on a GPU.)"""

import glob
import json
import os
import re
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from setup import _cuda_home  # noqa: E402

HOME = _cuda_home()
pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or HOME is None or not os.path.exists(os.path.join(HOME, "bin", "nvcc")),
    reason="needs a CUDA toolkit and a CUDA build of torch",
)

CHECK = """
import os, sys, torch, arcface_kernels as ak
assert os.path.realpath(ak.__file__).startswith(os.path.realpath(sys.prefix)), ak.__file__
for op in ("partial_stats", "grad_chunk", "project_rows"):
    schemas = torch._C._jit_get_schemas_for_operator("arcface_kernels_cuda::" + op)
    assert schemas, op
    print(schemas[0])
if not torch.cuda.is_available():
    ok, reason = ak.backend_status("cuda", torch.device("cpu"))
    assert not ok and reason == "needs a CUDA device", reason
    try:
        ak.margin_softmax_loss(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), backend="cuda")
    except RuntimeError as err:
        assert "backend='cuda' is not available on cpu: needs a CUDA device" in str(err), err
    else:
        raise AssertionError("no error without a GPU")
from arcface_kernels import _C
print("carries", _C.SASS_ARCHS, _C.PTX_ARCH)
print("extension ok")
"""


def _gpu_code(shared_object, kind):
    """The architectures of the SASS (kind "elf") or PTX ("ptx") a shared object embeds."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = subprocess.run([tool, f"--list-{kind}", shared_object], capture_output=True, text=True, check=True)
    return {int(arch) for arch in re.findall(r"\.sm_(\d+)\.", out.stdout)}


def _outer_site_dirs():
    """The site-packages directories this interpreter imports from (a venv's own, and its base
    interpreter's when the venv sees them), wherever the tests run: venv or system python."""
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    seen = {os.path.realpath(p) for p in sys.path if p}
    return [d for d in dict.fromkeys(candidates) if os.path.isdir(d) and os.path.realpath(d) in seen]


def _fresh_venv_seeing_outer_packages(venv, pip=True):
    """A new venv whose own site-packages comes first, then this environment's (for torch): a .pth
    lists them. Python does not process .pth files in directories added that way, so an editable
    install of this checkout out here (its .pth and import hook) does not reach the venv."""
    subprocess.run([sys.executable, "-m", "venv", *([] if pip else ["--without-pip"]), str(venv)], check=True)
    python = str(venv / "bin" / "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(own, "_outer_site_packages.pth"), "w") as f:
        f.write("".join(d + "\n" for d in _outer_site_dirs()))
    return python


def test_fresh_venv_sees_outer_torch_but_not_this_checkout(tmp_path):
    python = _fresh_venv_seeing_outer_packages(tmp_path / "venv", pip=False)
    probe = ("import importlib.util as u, torch; print(torch.__file__); "
             "s = u.find_spec('arcface_kernels'); print(s.origin if s else None)")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=clean, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    torch_file, package = run.stdout.split()
    assert os.path.realpath(torch_file) == os.path.realpath(torch.__file__)
    # an editable install of this checkout out here must not leak in (a regular install may)
    assert package == "None" or not os.path.realpath(package).startswith(os.path.realpath(ROOT) + os.sep), package


@pytest.mark.slow
def test_wheel_builds_installs_and_registers_ops(tmp_path):
    env = dict(os.environ, ARCFACE_KERNELS_BUILD_CUDA="1")
    env.pop("TORCH_CUDA_ARCH_LIST", None)  # the default list, setup.ARCHS
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                            str(tmp_path / "dist"), ROOT], env=env, capture_output=True, text=True, timeout=1500)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "arcface_kernels-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        (shared,) = [n for n in archive.namelist() if n.startswith("arcface_kernels/_C") and n.endswith(".so")]
        archive.extract(shared, tmp_path / "unpacked")
        record = json.loads(archive.read("arcface_kernels/_build_info.json"))  # what setup.py did
    assert record["cuda_extension"] == "built" and record["torch"] == torch.__version__, record
    sass = _gpu_code(str(tmp_path / "unpacked" / shared), "elf")
    assert sass == {75, 80, 90}, sass  # setup.ARCHS: Turing to Hopper
    assert _gpu_code(str(tmp_path / "unpacked" / shared), "ptx") == {90}  # newer GPUs JIT it

    # a fresh environment that sees this one's torch, not this checkout or an editable install of it
    python = _fresh_venv_seeing_outer_packages(tmp_path / "venv")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel],
                             capture_output=True, text=True, timeout=600, env=clean, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    run = subprocess.run([python, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=clean)
    assert run.returncode == 0 and "extension ok" in run.stdout, run.stdout + run.stderr[-3000:]
    # what the extension reports (the `cuda` backend's availability check) is what it carries
    assert f"carries {tuple(sorted(sass))} 90" in run.stdout, run.stdout
