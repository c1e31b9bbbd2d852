"""peft's own tests as the oracle of the drop-in: python_tests/peft_suite/run.py with kmerge_fast patched in.

``test_peft_suite_with_patch`` runs the add_weighted_adapter part of peft's ``tests/test_custom_models.py``
(about 70 tests, ~10 s) in a subprocess. It needs peft's source distribution unpacked (peft's wheel
has no tests): .ci/run downloads it and sets ``KMERGE_FAST_PEFT_SDIST``; locally::

    python python_tests/peft_suite/run.py --fetch     # into ~/.cache/kmerge_fast/peft-sdist/peft-<version>
    KMERGE_FAST_PEFT_SDIST=~/.cache/kmerge_fast/peft-sdist/peft-0.21.2 pytest python_tests/test_peft_suite.py

Without the variable it is skipped. The plugin's own guard (the session fails unless peft's method
really ran kmerge_fast) is tested here on small generated test files, without the sdist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("peft")

SUITE = Path(__file__).resolve().parent / "peft_suite"
SDIST = os.environ.get("KMERGE_FAST_PEFT_SDIST")
ROUTING = re.compile(r"kmerge_fast routing: calls=(\d+) tests=(\d+) fallbacks=(\d+) routed_tests=(\d+)")


def _routing(output: str) -> tuple[int, int, int, int]:
    found = ROUTING.search(output)
    assert found, output[-3000:]
    return tuple(int(g) for g in found.groups())


@pytest.mark.skipif(not SDIST, reason="KMERGE_FAST_PEFT_SDIST is not set (the unpacked peft sdist; .ci/run sets it, "
                                      "python python_tests/peft_suite/run.py --fetch downloads it)")
def test_peft_suite_with_patch():
    proc = subprocess.run([sys.executable, str(SUITE / "run.py"), "--sdist", SDIST], capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 60, out[-3000:]  # the subset: 68 tests with peft 0.21.2
    assert " failed" not in out.splitlines()[-1], out[-3000:]
    calls, tests, fallbacks, routed_tests = _routing(out)
    assert routed_tests >= 60 and fallbacks == 0, out[-3000:]


def _run_plugin(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    """Run a generated test file under kmerge_patch_plugin (as run.py loads it)."""
    (tmp_path / "test_generated.py").write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SUITE), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "kmerge_patch_plugin",
                           "test_generated.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


MODEL = """
    import torch
    from peft import LoraConfig, get_peft_model

    def model():
        torch.manual_seed(0)
        m = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5)), LoraConfig(target_modules=["0"], r=2))
        m.add_adapter("other", LoraConfig(target_modules=["0"], r=2))
        return m
"""


def test_plugin_counts_calls_routed_into_kmerge_fast(tmp_path):
    proc = _run_plugin(tmp_path, MODEL + """
    def test_merge():
        m = model()
        m.add_weighted_adapter(["default", "other"], [0.5, 0.5], "merged", combination_type="cat")
        assert "merged" in m.peft_config
    """)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert _routing(out) == (1, 1, 0, 1)


def test_plugin_fails_a_session_that_did_not_test_kmerge_fast(tmp_path):
    """A test that restores peft's method fails the next test; a session without a routed call fails."""
    proc = _run_plugin(tmp_path, MODEL + """
    import kmerge_fast as kf

    def test_unpatch():
        kf.peft.unpatch()

    def test_after_unpatch():
        model().add_weighted_adapter(["default", "other"], [0.5, 0.5], "merged", combination_type="cat")
    """)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 1 passed" in out and "not kmerge_fast's" in out, out
    assert _routing(out)[3] == 0 and "no test ran kmerge_fast's add_weighted_adapter" in out, out
