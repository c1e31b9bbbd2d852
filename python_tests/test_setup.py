"""setup.py's CMake command line: CMAKE_ARGS reaches cmake (after the script's own arguments, so it
wins), split as a POSIX shell would; KMERGE_FAST_NATIVE=0 turns -march=native off. No build runs:
cmake is recorded, not called."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("setuptools")
pybind11 = pytest.importorskip("pybind11")


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("kmerge_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the build, runs no setup()
    return module


def cmake_calls(setup_py, tmp_path, monkeypatch, env):
    """The cmake command lines CMakeBuild.build_extension runs in `env` (recorded, not run)."""
    from setuptools import Distribution

    for name in ("CMAKE_ARGS", "KMERGE_FAST_NATIVE", "KMERGE_FAST_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    ext = setup_py.CMakeExtension("kmerge_fast._C")
    cmd = setup_py.CMakeBuild(Distribution({"name": "kmerge_fast", "ext_modules": [ext]}))
    cmd.initialize_options()
    cmd.build_temp = str(tmp_path / "temp")
    cmd.build_lib = str(tmp_path / "lib")
    cmd.finalize_options()
    cmd.build_extension(ext)
    return calls


def test_cmake_args_reach_cmake_and_win(setup_py, tmp_path, monkeypatch):
    toolchain = "/opt/my toolchains/aarch64.cmake"
    configure, build = cmake_calls(setup_py, tmp_path, monkeypatch,
                                   {"CMAKE_ARGS": f"-DKMERGE_FAST_NATIVE=OFF  -DCMAKE_TOOLCHAIN_FILE='{toolchain}'"})
    assert configure[1:3] == ["-S", str(ROOT)] and "--build" in build
    assert f"-DCMAKE_TOOLCHAIN_FILE={toolchain}" in configure  # one argument, quotes removed
    natives = [a for a in configure if a.startswith("-DKMERGE_FAST_NATIVE=")]
    assert natives == ["-DKMERGE_FAST_NATIVE=ON", "-DKMERGE_FAST_NATIVE=OFF"]  # CMake keeps the last
    assert configure.index(natives[1]) > configure.index(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")


@pytest.mark.parametrize("native, want", [("0", "OFF"), ("off", "OFF"), ("1", "ON"), (None, "ON")])
def test_kmerge_fast_native(setup_py, tmp_path, monkeypatch, native, want):
    configure, _ = cmake_calls(setup_py, tmp_path, monkeypatch, {} if native is None else {"KMERGE_FAST_NATIVE": native})
    assert [a for a in configure if a.startswith("-DKMERGE_FAST_NATIVE=")] == [f"-DKMERGE_FAST_NATIVE={want}"]
    assert not any("TOOLCHAIN" in a for a in configure)
