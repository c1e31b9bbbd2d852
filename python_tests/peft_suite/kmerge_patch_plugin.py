"""pytest plugin: run peft's own tests with kmerge_fast's ``add_weighted_adapter`` in place of peft's.

Loaded by ``run.py`` beside this file (``-p kmerge_patch_plugin`` with this folder on ``PYTHONPATH``)
into a pytest session over the tests of peft's source distribution. For the whole session
``kf.peft.patch()`` is in effect, so peft's ``LoraModel.add_weighted_adapter`` (and through it
``PeftModel.add_weighted_adapter``) runs ``kmerge_fast.peft.add_weighted_adapter``.

A patch that silently does nothing would make peft's suite test peft, so the plugin checks it:

- at session start, ``LoraModel.add_weighted_adapter`` must be kmerge_fast's wrapper;
- before every test, it must still be (a test that restored peft's method would go unnoticed);
- every call into ``kmerge_fast.peft.add_weighted_adapter`` is counted per test, and so is every
  fallback to peft's own code (``kmerge_fast.peft.Unsupported``: DoRA, Conv LoRA, ...);
- at the end the counts are printed as one line,
  ``kmerge_fast routing: calls=N tests=M fallbacks=F``, and the session fails if tests ran but
  no call ran kmerge_fast to the end without falling back.
"""

from __future__ import annotations

import functools

import pytest

import kmerge_fast as kf
import kmerge_fast.peft as kf_peft

#: test node id -> [calls into kmerge_fast, of which fell back to peft]
_ROUTED: dict[str, list[int]] = {}
_current = {"nodeid": "<outside a test>"}


def _counting(entry):
    """Wrap kmerge_fast's entry point so that every call (and every ``Unsupported``) is counted."""

    @functools.wraps(entry)
    def counted(*args, **kwargs):
        counts = _ROUTED.setdefault(_current["nodeid"], [0, 0])
        counts[0] += 1
        try:
            return entry(*args, **kwargs)
        except kf_peft.Unsupported:
            counts[1] += 1  # the patched method now runs peft's own implementation
            raise

    return counted


def _assert_patched() -> None:
    from peft.tuners.lora import LoraModel

    method = LoraModel.add_weighted_adapter
    if not kf.peft.is_patched() or getattr(method, "__code__", None) is not kf_peft._patched.__code__:
        raise pytest.UsageError(f"peft's LoraModel.add_weighted_adapter is {method!r}, not kmerge_fast's: "
                                "the patch is not in effect, peft's tests would test peft")


def pytest_configure(config):
    # The patched method calls the module-level ``add_weighted_adapter`` of kmerge_fast.peft at call time,
    # so replacing that attribute puts the counter on the path every patched call takes.
    kf_peft.add_weighted_adapter = _counting(kf_peft.add_weighted_adapter)
    kf.peft.patch()
    _assert_patched()


def pytest_report_header(config):
    return f"kmerge_fast {kf.__file__}: peft's add_weighted_adapter is patched for the whole session"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _assert_patched()
    _current["nodeid"] = item.nodeid
    try:
        return (yield)
    finally:
        _current["nodeid"] = "<outside a test>"


def _totals() -> tuple[int, int, int, int]:
    """(calls, tests that called, fallbacks, tests with a call that did not fall back)."""
    calls = sum(c for c, _ in _ROUTED.values())
    fallbacks = sum(f for _, f in _ROUTED.values())
    routed_tests = sum(1 for c, f in _ROUTED.values() if c > f)
    return calls, len(_ROUTED), fallbacks, routed_tests


def pytest_sessionfinish(session, exitstatus):
    ran_tests = session.testscollected > 0 and not session.config.option.collectonly
    if ran_tests and _totals()[3] == 0 and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    calls, tests, fallbacks, routed_tests = _totals()
    terminalreporter.write_line(f"kmerge_fast routing: calls={calls} tests={tests} fallbacks={fallbacks} "
                                f"routed_tests={routed_tests}")
    if routed_tests == 0 and not config.option.collectonly:
        terminalreporter.write_line("kmerge_fast routing: FAILED - no test ran kmerge_fast's add_weighted_adapter",
                                    red=True)
    for nodeid, (c, f) in sorted(_ROUTED.items()):
        if f:
            terminalreporter.write_line(f"kmerge_fast fell back to peft {f} of {c} time(s) in {nodeid}")
