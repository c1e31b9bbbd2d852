"""Run peft's own tests of ``add_weighted_adapter`` with kmerge_fast patched in (or, for comparison, without).

peft's test suite is the oracle for ``kf.peft.patch()``: its source distribution ships ``tests/``,
and this script runs ``tests/test_custom_models.py`` from it, against the installed peft and the
installed kmerge_fast, with ``kmerge_patch_plugin`` (beside this file) patching peft for the whole
session and checking that the patched method really runs kmerge_fast.

Usage::

    python python_tests/peft_suite/run.py --fetch          # download the sdist once (pip, the package index)
    python python_tests/peft_suite/run.py                  # the add_weighted_adapter subset, patched (~70 tests)
    python python_tests/peft_suite/run.py --plain          # the same tests on peft's own implementation
    python python_tests/peft_suite/run.py --all            # all of test_custom_models.py (~19,500 tests; hours on 2 cores)
    python python_tests/peft_suite/run.py -- -x -v         # anything after -- goes to pytest

The sdist folder (the one holding ``tests/``) is ``--sdist``, else ``$KMERGE_FAST_PEFT_SDIST``, else
``~/.cache/kmerge_fast/peft-sdist/peft-<installed version>``; its version must be the installed
peft's. The exit code is pytest's.

The subset (``SUBSET``) is every test of test_custom_models.py that calls ``add_weighted_adapter``:
the ``*weighted_adapter*`` and ``*merging_adapters*`` tests, and ``test_multiple_active_adapters_forward``
for plain LoRA (its other tuners never call it). One of them loads ``bert-base-uncased`` from the
Hugging Face hub, which CI cannot reach; it is deselected here (``NEEDS_HUB``) and the same check runs
on a BERT built from a config in python_tests/test_peft_compat.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEST_FILE = "tests/test_custom_models.py"
SUBSET = "weighted_adapter or merging_adapters or (multiple_active_adapters_forward and lora-LoraConfig)"
NEEDS_HUB = [
    "tests/test_custom_models.py::TestPeftCustomModel::test_multiple_adapters_seq_cls_mixed_modules_to_save_merging_adapters",
]
ENV_VAR = "KMERGE_FAST_PEFT_SDIST"


def installed_peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


def default_sdist() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return Path.home() / ".cache" / "kmerge_fast" / "peft-sdist" / f"peft-{installed_peft_version()}"


def sdist_version(sdist: Path) -> str:
    """The ``Version:`` of the sdist's PKG-INFO."""
    for line in (sdist / "PKG-INFO").read_text(encoding="utf-8").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{sdist / 'PKG-INFO'}: no Version field; is {sdist} a peft source distribution?")


def fetch(dest: Path) -> Path:
    """Download and unpack peft's sdist (the installed version) so that ``dest`` holds ``tests/``."""
    version = installed_peft_version()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"peft=={version}", "-d", tmp], check=True)
        archive = Path(tmp) / f"peft-{version}.tar.gz"
        with tarfile.open(archive) as tar:
            # the "data" filter refuses links and paths out of tmp (Python >= 3.11.4 and 3.12)
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if dest.exists():
            raise SystemExit(f"--fetch: {dest} already exists; remove it to fetch again")
        (Path(tmp) / f"peft-{version}").rename(dest)
    return dest


def pytest_command(sdist: Path, plain: bool, everything: bool, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", TEST_FILE, "-q", "-p", "no:cacheprovider",
           # the tests import their helpers relatively (``from .testing_common import``) and the sdist's
           # tests/ has no __init__.py; peft's own addopts ask for pytest-cov
           "--import-mode=importlib", "-o", "addopts="]
    if not everything:
        cmd += ["-k", SUBSET] + [f"--deselect={nodeid}" for nodeid in NEEDS_HUB]
    if not plain:
        cmd += ["-p", "kmerge_patch_plugin"]
    return cmd + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help=f"unpacked peft sdist (default: ${ENV_VAR} or the cache)")
    parser.add_argument("--fetch", action="store_true", help="download the sdist first if it is not there")
    parser.add_argument("--plain", action="store_true", help="run on peft's own implementation (no patch)")
    parser.add_argument("--all", action="store_true", help="all of test_custom_models.py, not just the subset")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (put them after --)")
    args = parser.parse_args(argv)

    sdist = (args.sdist or default_sdist()).expanduser().resolve()
    if args.fetch and not (sdist / TEST_FILE).is_file():
        fetch(sdist)
    if not (sdist / TEST_FILE).is_file():
        raise SystemExit(f"--sdist: {sdist / TEST_FILE} not found; unpack peft's sdist there "
                         f"(or run with --fetch)")
    if sdist_version(sdist) != installed_peft_version():
        raise SystemExit(f"--sdist: {sdist} holds peft {sdist_version(sdist)}'s tests, but peft "
                         f"{installed_peft_version()} is installed; the tests must match the code they test")

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "2")  # the CI machine has 2 cores
    env.setdefault("HF_HUB_OFFLINE", "1")   # a test that needs the hub fails at once instead of waiting on DNS
    cmd = pytest_command(sdist, args.plain, args.all, args.pytest_args)
    print(f"cd {sdist} && PYTHONPATH={env['PYTHONPATH']} {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=sdist, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
