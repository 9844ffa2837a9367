"""Installing: setup.py finds a real CUDA toolkit, records what it built (and why not) in the
package, a compiled build requires the torch it was compiled against, the sdist builds and installs
into a new venv, the health report tells "not built" from "cannot be loaded", and .ci/run runs the
README's commands as written. (The CUDA wheel's contents: test_cuda_extension.py.)"""

import glob
import importlib.machinery
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

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


def test_torch_requirement_is_exact_only_for_a_compiled_build():
    built = {"cuda_extension": "built", "torch_dist": "2.14.1+cu130"}
    assert setup.torch_requirement(built) == "torch==2.14.1+cu130"
    assert setup.torch_requirement({"cuda_extension": "skipped", "torch_dist": "2.14.1"}) == "torch>=2.5"
    cpu_only = {"cuda_extension": "skipped", "cpu_extension": "built", "torch_dist": "2.14.1"}
    assert setup.torch_requirement(cpu_only) == "torch==2.14.1"


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
    env = dict(os.environ, ARCFACE_KERNELS_BUILD_CUDA="0", ARCFACE_KERNELS_BUILD_CPU="0")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                            str(tmp_path), ROOT], env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "arcface_kernels-*-py3-none-any.whl"))
    with zipfile.ZipFile(wheel) as archive:
        record = json.loads(archive.read("arcface_kernels/_build_info.json"))
        assert not [n for n in archive.namelist() if n.endswith(".so")]
        metadata = archive.read("arcface_kernels-0.1.0.dist-info/METADATA").decode()
    assert record["cuda_extension"] == "skipped" and record["reason"] == "ARCFACE_KERNELS_BUILD_CUDA=0", record
    assert record["cpu_extension"] == "skipped" and record["cpu_reason"] == "ARCFACE_KERNELS_BUILD_CPU=0", record
    # no compiled code: any torch in the range will do
    assert [line for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")] == [
        "Requires-Dist: torch>=2.5"], metadata


def _package_copy(tmp_path, record, shared_object=None):
    """This checkout's package copied under tmp_path, with the given build record and, if given,
    bytes as its extension's shared object; (python, env) run it: a new venv that sees this
    environment's torch but not an editable install's import hook (which would load this
    checkout's extension instead), the copy first on PYTHONPATH."""
    from test_cuda_extension import _fresh_venv_seeing_outer_packages

    target = tmp_path / "site" / "arcface_kernels"
    shutil.copytree(os.path.join(ROOT, "arcface_kernels"), target,
                    ignore=shutil.ignore_patterns("_C*.so", "_build_info.json", "__pycache__"))
    (target / "_build_info.json").write_text(json.dumps(record))
    if shared_object is not None:
        (target / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(shared_object)
    python = _fresh_venv_seeing_outer_packages(tmp_path / "venv", pip=False)
    return python, dict(os.environ, PYTHONPATH=str(tmp_path / "site"))


def _health_report(python, env, cwd, *args):
    return subprocess.run([python, "-m", "arcface_kernels", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_health_report_tells_not_built_from_cannot_load(tmp_path):
    # not built: the reason from the build record; the pure-Python backends are healthy (exit 0)
    skipped = _package_copy(tmp_path / "skipped", {"cuda_extension": "skipped", "reason": "no CUDA toolkit found"})
    run = _health_report(*skipped, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "CUDA extension not built: no CUDA toolkit found" in run.stdout, run.stdout
    assert "cannot be loaded" not in run.stdout

    # built for another torch: a shared object that needs a symbol this torch lacks, as one compiled
    # against another torch's C++ ABI does. The import error and the fix; the report fails (exit 1).
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the mismatched shared object")
    (tmp_path / "abi.c").write_text("void _ZN3c1019UndefinedInThisTorchEv(void);\n"
                                    "void PyInit__C(void) { _ZN3c1019UndefinedInThisTorchEv(); }\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "abi.so"), str(tmp_path / "abi.c")], check=True)
    built = _package_copy(tmp_path / "built", {"cuda_extension": "built", "torch": "2.13.0+cu126", "archs": "8.0"},
                          shared_object=(tmp_path / "abi.so").read_bytes())
    run = _health_report(*built, tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    line = next(line for line in run.stdout.splitlines() if "CUDA extension" in line)
    assert f"built (against torch 2.13.0+cu126; this is torch {torch.__version__}) but cannot be loaded" in line, line
    assert "undefined symbol: _ZN3c1019UndefinedInThisTorchEv" in line, line
    assert "reinstall arcface_kernels against the torch you run" in line, line
    assert "cuda      unavailable: the extension was built but cannot be loaded" in run.stdout, run.stdout
    assert "not built" not in run.stdout


def test_health_report_help(tmp_path):
    run = _health_report(sys.executable, None, tmp_path, "--help")
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m arcface_kernels"), run.stdout + run.stderr
    assert "arcface_kernels environment" not in run.stdout  # usage only, no report


@pytest.mark.slow
def test_sdist_installs_into_a_new_venv_with_the_extension(tmp_path):
    """`python -m build --sdist`, then pip installs the sdist into a new venv (which sees this
    environment's torch, as in test_cuda_extension.py), compiling the CPU extension from it (every
    csrc/ file is in the sdist; the CUDA build from the tree is test_cuda_extension.py's, left out
    here for CI time); the health report passes there, and the installed metadata pins this torch."""
    from packaging.requirements import Requirement
    from test_cuda_extension import _fresh_venv_seeing_outer_packages

    sdist = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path / "dist"),
                            ROOT], capture_output=True, text=True, timeout=600)
    assert sdist.returncode == 0, sdist.stdout[-3000:] + sdist.stderr[-3000:]
    (archive,) = glob.glob(str(tmp_path / "dist" / "arcface_kernels-*.tar.gz"))
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True):  # what the compiler reads
        if os.path.isfile(path):
            assert os.path.relpath(path, ROOT) in names, path

    python = _fresh_venv_seeing_outer_packages(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ARCFACE_KERNELS_BUILD_CUDA="0", ARCFACE_KERNELS_BUILD_CPU="1")
    install = subprocess.run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--ignore-installed",
                              archive], capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    report = subprocess.run([python, "-m", "arcface_kernels"], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr[-3000:]
    assert "CPU epilogue extension loaded" in report.stdout, report.stdout
    assert "all available backends healthy" in report.stdout
    # the installed metadata requires exactly the torch it was compiled with, and pip sees that torch
    query = ("import importlib.metadata as m; print(m.version('torch')); "
             "print([r for r in m.requires('arcface_kernels') if r.startswith('torch')][0])")
    versions = subprocess.run([python, "-c", query], capture_output=True, text=True, timeout=120, env=env,
                              cwd=tmp_path)
    installed_torch, requirement = versions.stdout.split("\n")[:2]
    assert requirement == f"torch=={installed_torch}", versions.stdout
    assert Requirement(requirement).specifier.contains(installed_torch)


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
