"""Installing: setup.py finds a real CUDA toolkit, records what it built (and why not) in the
package, and .ci/run runs the README's commands as written. (The CUDA build itself:
test_cuda_extension.py.)"""

import glob
import json
import os
import stat
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import setup  # noqa: E402
from arcface_kernels import build_info as build_info_module  # noqa: E402


def _toolkit(path, nvcc=True, headers=True):
    os.makedirs(os.path.join(path, "bin"))
    os.makedirs(os.path.join(path, "include"))
    if nvcc:
        with open(os.path.join(path, "bin", "nvcc"), "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(os.path.join(path, "bin", "nvcc"), stat.S_IRWXU)
    if headers:
        open(os.path.join(path, "include", "cuda_runtime.h"), "w").close()
    return str(path)


def test_cuda_home_takes_the_first_real_toolkit(tmp_path, monkeypatch):
    headerless = _toolkit(tmp_path / "headerless", headers=False)
    real = _toolkit(tmp_path / "real")
    monkeypatch.setenv("CUDA_HOME", headerless)  # like torch's guess /usr/local when nvcc is a wrapper there
    monkeypatch.setenv("CUDA_PATH", real)
    home, tried = setup._find_cuda_home()
    assert home == real and tried[0].startswith(f"CUDA_HOME: {headerless}"), (home, tried)
    assert setup._cuda_home() == real


def test_cuda_home_through_an_nvcc_wrapper_script(tmp_path, monkeypatch):
    real = _toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "wrappers" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(stat.S_IRWXU)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    candidates = [path for source, path in setup._cuda_home_candidates() if "nvcc" in source]
    assert [os.path.realpath(c) for c in candidates] == [os.path.realpath(p) for p in (real, tmp_path / "wrappers")]


def test_build_info_without_a_record(tmp_path, monkeypatch):
    monkeypatch.setattr(build_info_module, "_PATH", str(tmp_path / "absent.json"))
    info = build_info_module.build_info()
    assert info["cuda_extension"] == "unknown" and "no build record" in info["reason"]
    (tmp_path / "record.json").write_text(json.dumps({"cuda_extension": "skipped", "reason": "why"}))
    monkeypatch.setattr(build_info_module, "_PATH", str(tmp_path / "record.json"))
    assert build_info_module.build_info() == {"cuda_extension": "skipped", "reason": "why"}
    assert build_info_module.describe() == "CUDA extension skipped: why"


def test_without_torch_the_build_says_so():
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); import setup; "
            "import json; print(json.dumps(setup._cuda_extension()[2]))")
    env = {k: v for k, v in os.environ.items() if k != "ARCFACE_KERNELS_BUILD_CUDA"}
    run = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout)
    assert record["cuda_extension"] == "skipped" and record["reason"].startswith("torch not importable"), record
    assert "skipping the CUDA extension: torch not importable" in run.stderr


def test_pure_python_wheel_carries_the_build_record(tmp_path):
    env = dict(os.environ, ARCFACE_KERNELS_BUILD_CUDA="0")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                            str(tmp_path), ROOT], env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "arcface_kernels-*-py3-none-any.whl"))
    with zipfile.ZipFile(wheel) as archive:
        record = json.loads(archive.read("arcface_kernels/_build_info.json"))
        assert not [n for n in archive.namelist() if n.endswith(".so")]
    assert record["cuda_extension"] == "skipped" and record["reason"] == "ARCFACE_KERNELS_BUILD_CUDA=0", record


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".ci", "run")), reason="no .ci/run")
def test_ci_runs_the_readme_commands():
    script = open(os.path.join(ROOT, ".ci", "run")).read()
    function = script[script.index("readme_commands() {"):]
    function = function[: function.index("\n}\n") + 3]
    run = subprocess.run(["bash", "-c", function + "readme_commands"], cwd=ROOT, capture_output=True, text=True)
    demo, tests = run.stdout.splitlines()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert readme.startswith("# arcface_kernels\n\n```bash\n" + demo + "   # "), demo
    assert demo.endswith("python -m arcface_kernels.demo") and tests.endswith("python -m pytest"), (demo, tests)
    for command in (demo, tests):  # torch is importable while the package (and its extension) builds
        assert command.index(" torch ") < command.index("--no-build-isolation -e"), command
