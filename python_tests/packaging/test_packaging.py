"""Packaging: the installed package stands alone, the sdist carries the whole build, and a
build folder left by an earlier build (another build environment) does not break the next.

The full builds (`pip install .` twice, `pip wheel .` after an install, `python -m build`, then
`zofo-bench --quick` from another folder) take minutes and run in .ci/run; these tests check
the same properties in seconds:

* a copy of the installed package tree, imported from a folder outside the checkout with an
  audit hook that records every file opened inside the checkout (other than the Python
  environment), runs zofo-bench end to end (step times and the memory subprocesses) with the
  MeZO row and opens nothing of the checkout;
* the sdist of the tracked files holds every file the native build and the package need, and
  no compiled module;
* CMake's cache naming a deleted ninja (the bug of a second isolated build) is handled by
  configuring afresh.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import zofo_kernels

ROOT = Path(__file__).resolve().parents[2]
PKG = Path(zofo_kernels.__file__).resolve().parent

# Installed into a child process (as sitecustomize): records each file opened below FORBID that
# is not below one of ALLOW (the Python environment, the copy of the package, the temp folder).
AUDIT_HOOK = '''
import os, sys
_forbid = os.path.realpath(os.environ["ZOFO_AUDIT_FORBID"]) + os.sep
_allow = [os.path.realpath(p) + os.sep for p in os.environ["ZOFO_AUDIT_ALLOW"].split(os.pathsep)
          if p]
_fd = os.open(os.environ["ZOFO_AUDIT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def _hook(event, args):
    if event != "open" or not args or args[0] is None or isinstance(args[0], int):
        return
    try:
        p = os.path.realpath(os.fsdecode(args[0]))
    except Exception:
        return
    if (p + os.sep).startswith(_forbid) and not any((p + os.sep).startswith(a) for a in _allow):
        os.write(_fd, (p + "\\n").encode())

sys.addaudithook(_hook)
'''


def _audited_env(tmp_path: Path, site: Path) -> dict:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / "opened_in_checkout.txt"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOFO_")}
    allow = {sys.prefix, sys.exec_prefix, sys.base_prefix, str(tmp_path)}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(hook_dir)]),
               ZOFO_AUDIT_FORBID=str(ROOT), ZOFO_AUDIT_ALLOW=os.pathsep.join(sorted(allow)),
               ZOFO_AUDIT_LOG=str(log), PYTHONDONTWRITEBYTECODE="1")
    return env


def _copy_installed_tree(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(PKG, site / "zofo_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return site


def test_audit_hook_sees_reads_of_the_checkout(tmp_path):
    """The detector of the next test works: a read of a checkout file is recorded."""
    site = _copy_installed_tree(tmp_path)
    env = _audited_env(tmp_path, site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = f"open({str(ROOT / 'pyproject.toml')!r}).read(); import zofo_kernels; " \
           "print(zofo_kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site)), out.stdout
    assert (tmp_path / "opened_in_checkout.txt").read_text().split() == [
        os.path.realpath(ROOT / "pyproject.toml")]


def test_installed_tree_runs_zofo_bench_without_the_checkout(tmp_path):
    site = _copy_installed_tree(tmp_path)
    native = site / "zofo_kernels" / "core" / "backends" / "native"
    assert any(p.name.startswith("_C_generic") for p in native.iterdir()), \
        "the package has no built CPU module"
    env = _audited_env(tmp_path, site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys, zofo_kernels\n"
            f"assert zofo_kernels.__file__.startswith({str(site)!r}), zofo_kernels.__file__\n"
            "from zofo_kernels.apps.bench import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    args = ["--model", "tiny-bert", "--batch-size", "2", "--seq-len", "8", "--methods",
            "forward", "mezo", "mezo-ref", "--repeats", "1", "--warmup", "0", "--memory-steps",
            "1", "--output", "out", "--tag", "alone", "--no-progress"]
    run = subprocess.run([sys.executable, "-c", code] + args, cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "failed" not in run.stderr, run.stderr[-3000:]
    opened = (tmp_path / "opened_in_checkout.txt").read_text().split()
    assert opened == [], f"the package opened files of the checkout: {sorted(set(opened))}"
    out_dir = (elsewhere / "out").resolve()
    md = (out_dir / "bench_alone.md").read_text()
    assert "| tiny-bert | mezo-ref |" in md  # the step row
    assert "MeZO reference step / ZO step (Gaussian)" in md
    memory = (out_dir / "memory_alone.csv").read_text()
    assert {ln.split(",")[1] for ln in memory.splitlines()[1:]} == {"inference", "mezo",
                                                                   "mezo-ref"}
    assert f"to {out_dir}{os.sep}:" in run.stdout
    assert "  memory_alone.png" in run.stdout.splitlines()


def _tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [f for f in out.stdout.decode().split("\0") if f]


def test_sdist_contains_the_whole_build(tmp_path):
    src = tmp_path / "src"
    for rel in _tracked_files():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    # a stale compiled module in the tree must not ship
    stale = (src / "zofo_kernels" / "core" / "backends" / "native"
             / "_C_generic.cpython-311-x86_64-linux-gnu.so")
    stale.write_bytes(b"\0")
    env = dict(os.environ, ZOFO_BUILD_CUDA="0")
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.build_sdist(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    name = out.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "dist" / name) as tf:
        members = tf.getnames()
        pkg_info = tf.extractfile(f"{name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    top = name[:-len(".tar.gz")] + "/"
    inside = {m[len(top):] for m in members if m.startswith(top)}
    needed = {f for f in _tracked_files()
              if f.startswith(("csrc/", "zofo_kernels/")) or "/" not in f and f in (
                  "CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md")}
    assert needed, "no tracked build files found"
    assert not needed - inside, f"missing from the sdist: {sorted(needed - inside)}"
    assert not [m for m in inside if m.endswith((".so", ".pyc", ".pyd"))], sorted(inside)
    # the tested dependency ranges are in the metadata
    requires = [ln for ln in pkg_info.splitlines() if ln.startswith("Requires-Dist:")]
    assert any(ln.startswith("Requires-Dist: transformers<6,>=5.24") or
               ln.startswith("Requires-Dist: transformers>=5.24,<6") for ln in requires), requires
    assert any("peft" in ln and "<0.22" in ln and ">=0.21" in ln for ln in requires), requires


def _setup_module():
    spec = importlib.util.spec_from_file_location("zofo_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ != "__main__": defines the helpers, no setup()
    return mod


def test_build_folder_of_a_deleted_build_environment_is_configured_afresh(tmp_path):
    """Reproduces the second isolated build: CMake's cache names a ninja that is gone.
    Reconfiguring that folder as it is fails; setup.py's configure step starts afresh."""
    setup = _setup_module()
    cmake = setup._tool("cmake", "cmake", "CMAKE_BIN_DIR")
    ninja = setup._tool("ninja", "ninja", "BIN_DIR")
    if cmake is None or ninja is None:
        pytest.skip("cmake and ninja are needed (pip install cmake ninja)")
    import pybind11
    gone = tmp_path / "build-env-1" / "bin"
    gone.mkdir(parents=True)
    shutil.copy2(ninja, gone / "ninja")
    build_dir = str(tmp_path / "build" / "cmake")
    common = [f"-DPython_EXECUTABLE={sys.executable}",
              f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DCMAKE_BUILD_TYPE=Release",
              "-DZOFO_CPU_VARIANTS=generic", "-DZOFO_BUILD_CUDA=OFF", "-G", "Ninja"]
    out = [f"-DZOFO_OUTPUT_DIR={tmp_path / 'out'}"]
    setup.cmake_configure(cmake, build_dir, common + [f"-DCMAKE_MAKE_PROGRAM={gone / 'ninja'}"],
                          out)
    shutil.rmtree(tmp_path / "build-env-1")
    # the folder as the old setup.py reused it: configure again without a fresh start
    old = subprocess.run([cmake, "-S", str(ROOT), "-B", build_dir] + out,
                         capture_output=True, text=True)
    if old.returncode == 0:  # a CMake that tolerates it would make the test vacuous here
        pytest.fail("reconfiguring with a deleted ninja unexpectedly worked:\n" + old.stdout)
    setup.cmake_configure(cmake, build_dir, common + [f"-DCMAKE_MAKE_PROGRAM={ninja}"], out)
    cache = Path(build_dir, "CMakeCache.txt").read_text()
    assert f"CMAKE_MAKE_PROGRAM:FILEPATH={ninja}" in cache or str(Path(ninja).resolve()) in cache
    assert str(gone) not in cache
    # same tools and options again: the folder is kept (incremental rebuilds)
    marker = Path(build_dir, "keep-me")
    marker.write_text("")
    setup.cmake_configure(cmake, build_dir, common + [f"-DCMAKE_MAKE_PROGRAM={ninja}"], out)
    assert marker.exists()


def test_stale_native_modules_are_removed(tmp_path):
    setup = _setup_module()
    suffix = setup.importlib.machinery.EXTENSION_SUFFIXES[0]
    names = ["_C", "_C_native", "_C_generic", "_C_avx2", "_C_cuda", "other"]
    for n in names:
        (tmp_path / f"{n}{suffix}").write_bytes(b"")
    (tmp_path / "_C_notes.txt").write_text("")
    setup._remove_stale_modules(str(tmp_path), {"_C_generic", "_C_avx2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"_C_generic{suffix}", f"_C_avx2{suffix}", f"other{suffix}", "_C_notes.txt"])


def test_cpu_variants_setting(monkeypatch):
    setup = _setup_module()
    monkeypatch.delenv("ZOFO_CPU_VARIANTS", raising=False)
    auto = setup.cpu_variants()
    assert auto == (["generic", "avx2", "avx512"] if setup.X86_64 else ["generic"])
    if setup.X86_64:
        monkeypatch.setenv("ZOFO_CPU_VARIANTS", "auto,native")
        assert setup.cpu_variants() == ["generic", "avx2", "avx512", "native"]
        monkeypatch.setenv("ZOFO_CPU_VARIANTS", "avx512")  # generic is always added
        assert setup.cpu_variants() == ["generic", "avx512"]
    monkeypatch.setenv("ZOFO_CPU_VARIANTS", "sse9")
    with pytest.raises(RuntimeError, match="unknown variant"):
        setup.cpu_variants()


def test_stale_python_files_are_removed_from_build_lib(tmp_path):
    setup = _setup_module()
    pkg = tmp_path / "zofo_kernels"
    (pkg / "optim").mkdir(parents=True)
    keep = [pkg / "__init__.py", pkg / "optim" / "zo.py"]
    stale = [pkg / "old_module.py", pkg / "optim" / "renamed.py", pkg / "old_module.pyc"]
    for p in keep + stale:
        p.write_text("")
    (pkg / "_C_generic.so").write_bytes(b"")  # extensions are build_ext's business
    setup._remove_stale_sources(str(pkg), [str(p) for p in keep])
    left = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file())
    assert left == sorted(["__init__.py", "_C_generic.so", os.path.join("optim", "zo.py")])
