"""The merge-method registry (``kmerge_fast/methods.py``): one table, one argument check."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kmerge_fast import methods
from kmerge_fast.merge import METHODS


def test_table_is_peft_order_and_consistent():
    assert METHODS == methods.METHODS == (
        "svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
        "dare_ties_svd", "magnitude_prune_svd")
    for m in methods.REGISTRY.values():
        assert m.family in methods.FAMILIES and m.combine in methods.COMBINE_RULES and m.keep in methods.KEEP_RULES
        assert m.takes_rank == (m.family in ("svd", "dense"))
        assert m.takes_density == (m.name in ("ties", "dare_linear", "dare_ties", "magnitude_prune") or
                                   m.family == "dense")
        if m.family == "dense":  # the factor-wise rule of the same name, on dW
            twin = methods.REGISTRY[m.name.removesuffix("_svd")]
            assert (twin.family, twin.combine, twin.keep) == ("factor_wise", m.combine, m.keep)
    assert methods.SVD_METHODS == ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def test_two_adapter_rule():
    linear, dare = methods.REGISTRY["linear"], methods.REGISTRY["dare_linear"]
    assert "bit-equal to peft" in linear.doc
    assert linear.sums_factors(1, 1.0) and linear.sums_factors(2, 1.0) and not linear.sums_factors(3, 1.0)
    assert dare.sums_factors(2, 1.0) and not dare.sums_factors(2, 0.5)
    assert not methods.REGISTRY["ties"].sums_factors(2, 1.0) and not methods.REGISTRY["svd"].sums_factors(2, 1.0)


def test_check_args_strict_and_peft_rules():
    assert methods.check_args("ties", density=0.5) == (methods.REGISTRY["ties"], 0.5)
    assert methods.check_args("svd", rank=3, svd_clamp=0.9)[1] == 1.0
    with pytest.raises(ValueError, match="merge: unknown combination type 'mean'"):
        methods.lookup("mean", "merge")
    with pytest.raises(ValueError, match="rank: only the svd methods"):
        methods.check_args("cat", rank=2)
    # peft's rule: what a method does not take is ignored; its own names in the messages
    names = methods.PEFT_NAMES
    assert methods.check_args("linear", 4, 0.5, svd_clamp=0.5, names=names, ignore_unused=True)[1] == 1.0
    with pytest.raises(ValueError, match="svd_rank: must be a positive int"):
        methods.check_args("linear", 0, names=names, ignore_unused=True)
    with pytest.raises(ValueError, match="density: combination type 'ties' needs"):
        methods.check_args("ties", names=names, ignore_unused=True)
    with pytest.raises(ValueError, match="combination_type: unknown"):
        methods.check_args("avg", names=names, ignore_unused=True)


def test_registry_imports_without_torch():
    code = "import sys; import kmerge_fast.methods; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
