"""Build kmerge_fast._C with CMake (pybind11; no torch at build time).

Environment:
  KMERGE_FAST_DEBUG=1   Debug build (default Release).
  KMERGE_FAST_NATIVE=0  no -march=native (a portable build for this architecture).
  CMAKE_ARGS            more CMake arguments, split as a POSIX shell would, after this script's own
                        (so they win): e.g. "-DKMERGE_FAST_NATIVE=OFF -DCMAKE_CXX_FLAGS=-march=x86-64-v3"
                        or "-DCMAKE_TOOLCHAIN_FILE=/path/to/toolchain.cmake".
  CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: all CPUs).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension built by CMake from ``sourcedir`` (no sources for setuptools)."""

    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "off", "false", "no", "")


def _tool(name: str, module: str, attr: str) -> str | None:
    """An executable from PATH, else from the pip package of the same name, else next to Python."""
    found = shutil.which(name)
    if found:
        return found
    try:
        mod = __import__(module)
        candidate = Path(getattr(mod, attr)) / name
        if candidate.exists():
            return os.fspath(candidate)
    except (ImportError, AttributeError):
        pass
    candidate = Path(sys.executable).parent / name
    return os.fspath(candidate) if candidate.exists() else None


def cmake_configure_args(extdir: Path, cfg: str, pybind11_dir: str) -> list[str]:
    """The arguments of CMake's configure step (before -G): this script's, then CMAKE_ARGS's."""
    return [
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={extdir}{os.sep}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11_dir}",
        f"-DCMAKE_BUILD_TYPE={cfg}",
        f"-DKMERGE_FAST_NATIVE={'ON' if _flag('KMERGE_FAST_NATIVE', '1') else 'OFF'}",
        *shlex.split(os.environ.get("CMAKE_ARGS", "")),
    ]


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        cfg = "Debug" if (self.debug or _flag("KMERGE_FAST_DEBUG", "0")) else "Release"
        cmake = _tool("cmake", "cmake", "CMAKE_BIN_DIR")
        if cmake is None:
            raise RuntimeError("CMake is required to build kmerge_fast._C (pip install cmake)")
        args = cmake_configure_args(extdir, cfg, pybind11.get_cmake_dir())
        ninja = _tool("ninja", "ninja", "BIN_DIR")
        build_temp = Path(self.build_temp) / ext.name
        cache = build_temp / "CMakeCache.txt"
        if ninja and not (cache.exists() and "CMAKE_GENERATOR:INTERNAL=Ninja" not in cache.read_text(errors="ignore")):
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        build_temp.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "-S", ext.sourcedir, "-B", os.fspath(build_temp), *args], check=True)
        subprocess.run([cmake, "--build", os.fspath(build_temp), "--config", cfg, "--parallel", jobs], check=True)


if __name__ == "__main__":  # setuptools runs this file as __main__; python_tests/test_setup.py imports it
    setup(
        packages=find_packages(include=["kmerge_fast", "kmerge_fast.*"]),
        ext_modules=[CMakeExtension("kmerge_fast._C")],
        cmdclass={"build_ext": CMakeBuild},
        zip_safe=False,
    )
