"""The one dispatch point: listing, auto-selection, forcing, failing loudly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast import ops


def test_reference_always_available_and_listed_last():
    names = kf.backends()
    assert names[-1] == "reference"
    assert list(names) == [n for n in ops.PREFERENCE if n in names]


def test_auto_selection_picks_first_that_fits():
    module = ops.select(torch.device("cpu"), torch.float32)
    expected = "cpp" if "cpp" in kf.backends() else "reference"
    assert module.NAME == expected
    # an unsupported dtype falls through to the reference
    assert ops.select(torch.device("cpu"), torch.complex64).NAME == "reference"


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("KMERGE_FAST_BACKEND", "reference")
    assert ops.select(torch.device("cpu"), torch.float32).NAME == "reference"
    monkeypatch.setenv("KMERGE_FAST_BACKEND", "fastest")
    with pytest.raises(kf.BackendError, match="KMERGE_FAST_BACKEND='fastest': unknown backend"):
        ops.select(torch.device("cpu"), torch.float32)


def test_forcing_an_unusable_backend_fails_loudly():
    unavailable = ops.unavailable_reasons()
    if "triton" in unavailable:
        with kf.use_backend("triton"), pytest.raises(kf.BackendError, match="'triton' was forced but is unavailable"):
            ops.select(torch.device("cpu"), torch.float32)
    if "cpp" in kf.backends():
        with kf.use_backend("cpp"), pytest.raises(kf.BackendError, match="cannot run torch.complex64"):
            ops.select(torch.device("cpu"), torch.complex64)
    with pytest.raises(ValueError, match="backend: unknown name"):
        with kf.use_backend("cuda"):
            pass


def test_use_backend_none_overrides_env(monkeypatch):
    monkeypatch.setenv("KMERGE_FAST_BACKEND", "reference")
    with kf.use_backend(None):
        assert ops.forced_backend() is None


def test_import_survives_missing_extension():
    """`import kmerge_fast` works when the compiled core cannot be imported."""
    code = (
        "import sys; sys.modules['kmerge_fast._C'] = None\n"
        "import kmerge_fast as kf\n"
        "assert 'cpp' not in kf.backends(), kf.backends()\n"
        "assert 'cpp' in kf.ops.unavailable_reasons()\n"
        "import torch\n"  # the codes of keep kinds and combine modes still work for the reference
        "a = kf.LoRA.from_factors({'q': (torch.randn(2, 5), torch.randn(4, 2))})\n"
        "m = kf.merge([a, a], [0.5, 0.5], method='ties_svd', density=0.5, rank=2)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(not __import__("os").environ.get("CI"), reason="only CI must have the compiled core")
def test_ci_tests_the_compiled_core():
    """In CI a missing extension would silently reduce the suite to the reference."""
    assert "cpp" in kf.backends(), ops.unavailable_reasons()


def test_empty_batches_need_no_backend_whatever_is_forced(monkeypatch):
    """An empty batch has no device for the rules to judge: every op returns its empty result even where the
    forced backend refuses the CPU (as a forced triton does on a CUDA machine), and a real batch still fails."""
    from kmerge_fast.ops.numerics.elementwise import SUM

    module = ops._load("cpp")
    if isinstance(module, str):
        module = ops._load("reference")
    monkeypatch.setattr(module, "unsupported_reason", lambda device, dtype: f"refuses {device}")
    with kf.use_backend(module.NAME):
        assert ops.inner_products([]) == [] and ops.inner_products([], precise=True) == []
        assert ops.diff_stats([]).shape == (0, 2)
        assert ops.stack([], torch.float16) == [] and ops.truncate([], 4, torch.bfloat16) == []
        assert ops.abs_kth([]) == [] and ops.weighted_sum([], torch.float32) == []
        assert ops.dense_combine([], SUM) == [] and ops.max_abs([]) == []
        assert ops.backend_name([]) == "reference"
        x = ops.Factor(torch.randn(2, 5), torch.randn(4, 2), 1.0)
        with pytest.raises(kf.BackendError, match=f"'{module.NAME}' was forced but cannot run"):
            ops.inner_products([([x], [x])])
