"""The merge methods (peft 0.21's combination types): one table, one argument check.

Every place that takes a merge method (``merge``, ``peft.add_weighted_adapter``,
``d2c``, the online merger, the CLI) validates it here. This module imports
neither torch nor the extension (the CLI's ``--help`` stays fast): keep rules
and combine modes are named here, their codes are ``ops.contract``'s.

Families (a merged adapter has scaling 1, ``lora_alpha = r``, as in peft):

- ``svd``: B = U_r S_r, A = V_r^T of the best rank-r approximation of
  sum_i w_i s_i B_i A_i, from the factors, never forming dW.
- ``cat``: the factors stacked, exactly (weight * scaling on A).
- ``factor_wise``: the rule applied separately to the A's and the B's, with
  weights sqrt(|w_i s_i|) on both and the sign of w_i s_i on A only. Not the
  sum of the updates (cross terms B_i A_j appear); needs equal ranks.
- ``dense``: the rule acts elementwise on the dense updates dW_i = s_i B_i A_i,
  then the result is truncated to rank r.
"""

from __future__ import annotations

from typing import NamedTuple

FAMILIES = ("svd", "cat", "factor_wise", "dense")


class Method(NamedTuple):
    """One merge method: ``keep`` (``all`` / ``magnitude`` / ``dare``) prunes each term,
    ``combine`` (``sum`` / ``ties``) joins them (rules: ``ops/numerics/elementwise.py``)."""

    name: str
    family: str
    combine: str = "sum"
    keep: str = "all"
    doc: str = ""

    @property
    def takes_rank(self) -> bool:
        """Whether it returns a truncation (``rank``, ``svd_clamp`` apply): the svd and dense families."""
        return self.family in ("svd", "dense")

    @property
    def takes_density(self) -> bool:
        """Whether it prunes (``density`` in (0, 1] required)."""
        return self.keep != "all"

    def sums_factors(self, n_adapters: int, density: float) -> bool:
        """Whether the merge is a plain weighted sum of the A's and of the B's, which
        :data:`METHODS` ``["linear"]`` states as bit-equal to peft for one or two adapters."""
        return (self.family == "factor_wise" and self.combine == "sum" and (self.keep == "all" or density >= 1.0)
                and n_adapters <= 2)


_TABLE = (
    Method("svd", "svd", doc="The default: the best rank-r approximation of the weighted sum of the updates."),
    Method("cat", "cat", doc="The exact weighted sum in factor form; rank = sum of the input ranks."),
    Method("linear", "factor_wise", doc=(
        "peft's task arithmetic on the factors. With one or two adapters (and for any "
        "factor-wise ``sum`` method at density 1) the result is bit-equal to peft's: every module's "
        "A's and B's are summed as ((w_0 t_0) + w_1 t_1) with each product and sum rounded in the "
        "compute dtype (float32, or float64 for float64 inputs), which are the roundings of peft's "
        "(stack * w).sum(0) for two terms; with more terms peft's reduction order varies "
        "(``ops.weighted_sum``, ``Method.sums_factors``). The online mergers' step.")),
    Method("ties", "factor_wise", "ties", "magnitude"),
    Method("dare_linear", "factor_wise", "sum", "dare"),
    Method("dare_ties", "factor_wise", "ties", "dare"),
    Method("magnitude_prune", "factor_wise", "sum", "magnitude"),
    Method("ties_svd", "dense", "ties", "magnitude"),
    Method("dare_linear_svd", "dense", "sum", "dare"),
    Method("dare_ties_svd", "dense", "ties", "dare"),
    Method("magnitude_prune_svd", "dense", "sum", "magnitude"),
)
#: name -> Method, in peft's order of combination types.
REGISTRY: dict[str, Method] = {m.name: m for m in _TABLE}
#: The method names.
METHODS = tuple(REGISTRY)
#: The vocabulary of the rules (``ops.contract`` maps each to the C++ core's code).
KEEP_RULES = ("all", "magnitude", "dare")
COMBINE_RULES = ("sum", "ties")
SIGN_METHODS = ("total", "frequency")


class ArgNames(NamedTuple):
    """How a caller names the arguments in its error messages."""

    method: str = "method"
    rank: str = "rank"
    what: str = "method"  # "density: <what> 'ties' needs a density"


#: peft's names (``add_weighted_adapter``).
PEFT_NAMES = ArgNames("combination_type", "svd_rank", "combination type")


def lookup(method: str, arg: str = "method") -> Method:
    """The registry entry of ``method``; ValueError naming ``arg`` if there is none."""
    entry = REGISTRY.get(method) if isinstance(method, str) else None
    if entry is None:
        raise ValueError(f"{arg}: unknown combination type {method!r}; choose from {list(METHODS)}")
    return entry


def check_density(density, arg: str = "density") -> float:
    """``density`` as a float in (0, 1]; ValueError naming ``arg`` otherwise."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{arg}: must be in (0, 1], got {density!r}")
    return float(density)


def check_args(method: str, rank=None, density=None, majority_sign_method: str = "total", svd_clamp=None,
               names: ArgNames = ArgNames(), ignore_unused: bool = False) -> tuple[Method, float]:
    """Validate a merge's arguments; returns (the method's entry, the density: 1.0 when unused).

    ``rank``: a positive int (or None), only for methods that take one;
    ``density``: in (0, 1], required exactly by the pruning methods;
    ``majority_sign_method``: one of :data:`SIGN_METHODS`; ``svd_clamp``: a
    quantile in [0, 1], only for methods that take a rank. ``ignore_unused``
    (peft's rule): an argument the method does not take is ignored, not refused.
    """
    entry = lookup(method, names.method)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{names.rank}: must be a positive int, got {rank!r}")
        if not entry.takes_rank and not ignore_unused:
            raise ValueError(f"{names.rank}: only the svd methods {list(SVD_METHODS)} take a rank, not {method!r}")
    if entry.takes_density:
        if density is None:
            raise ValueError(f"density: {names.what} {method!r} needs a density in (0, 1]")
        check_density(density)
    elif density is not None and not ignore_unused:
        raise ValueError(f"density: not used by {names.what} {method!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method: must be one of {list(SIGN_METHODS)}, got {majority_sign_method!r}")
    if svd_clamp is not None and (entry.takes_rank or not ignore_unused):
        if not entry.takes_rank:
            raise ValueError(f"svd_clamp: only the svd methods {list(SVD_METHODS)} take it, not {method!r}")
        if not 0.0 <= float(svd_clamp) <= 1.0:
            raise ValueError(f"svd_clamp: a quantile in [0, 1], got {svd_clamp!r}")
    return entry, float(density) if entry.takes_density else 1.0


#: Methods that return B = U_r S_r, A = V_r^T of a truncation (``rank`` and ``svd_clamp`` apply).
SVD_METHODS = tuple(m.name for m in _TABLE if m.takes_rank)
