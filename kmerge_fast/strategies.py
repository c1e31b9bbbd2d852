"""The strategies of the online merger (:mod:`kmerge_fast.online`): a router and a combiner.

A strategy is a named pair in :data:`STRATEGY_TABLE`: its **router** picks the
slot of a newcomer (a free one, or a slot to merge into), its **combiner**
merges the newcomer into that slot. Each owns its settings checks and its
per-slot state, which the store keeps in the manifest's ``slots[i].extra``
under the part's :attr:`Part.keys` (``group``: the oracle router's;
``opcm``: the OPCM combiner's; ``spectrum``: the iso, isonorm, isogeo and isoswitch
combiners'; ``norms``: isonorm's, isogeo's and isoswitch's). The store persists the strategy's name and
the mode; the pair follows from them (:meth:`Strategy.pair`).

Routers (:data:`ROUTERS`):

- ``most_similar``: free slots first, then the most similar slot (K-Merge).
- ``threshold``: a free slot only below a similarity threshold (K-Merge++).
- ``random``: free slots first, then a seeded random slot.
- ``oracle``: free slots first, then the slot whose first member has the
  newcomer's group, else the most similar.

Combiners (:data:`COMBINERS`): the running averages named by the modes
(``faithful``; ``exact``, ``iso``, ``isonorm``, ``isogeo``, ``isoswitch``, ``rms``, ``sum``), peft's
baselines (``linear``, ``ties``, ``dare_linear``, ``dare_ties``) and ``opcm``. A row whose combiner
is None takes the running average of the merger's mode.

A new strategy is one class (a :class:`Router` or :class:`Combiner`
subclass with a ``name``), registered once with :func:`add_strategy`. The
store's manifest check (``store._validate_extra``) knows the built-in state
fields by strategy name or mode (``group``: ``oracle``; ``opcm``: ``opcm``;
``spectrum``: modes ``iso``, ``isonorm``, ``isogeo`` and ``isoswitch``; ``norms``:
``isonorm``, ``isogeo`` and ``isoswitch``): a new
part that keeps per-slot state needs its field added there.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .lora import LoRA, LoRAModule
from .merge import merge
from .opcm import opcm_step
from .similarity import cache_norms

#: The running-average modes; each names a combiner.
MODES = ("faithful", "exact", "iso", "isonorm", "isogeo", "isoswitch", "rms", "sum")
#: The default mode (chosen on bench/quality's S-score; see README, "Quality").
DEFAULT_MODE = "isoswitch"
#: ``isoswitch`` serves a slot of at most this many tasks as ``isonorm`` does, a larger one as ``isogeo``: the
#: switch point a new merger records (``settings["isonorm_up_to"]``; a store keeps it, so a store resumed by a
#: later kmerge_fast goes on with the switch point it was written with).
ISONORM_UP_TO = 10
#: Faithful mode warns when the mean over modules of |cos(A_slot, A_new)| (Frobenius) exceeds this.
ALIGNED_A = 0.5
#: Baselines merging (slot, newcomer) with a peft method and fixed weights.
PEFT_BASELINES = {"linear": ("linear", [0.5, 0.5]), "ties": ("ties", [1.0, 1.0]),
                  "dare_linear": ("dare_linear", [1.0, 1.0]), "dare_ties": ("dare_ties", [1.0, 1.0])}


def width_threshold(lora: LoRA) -> float:
    """K-Merge++'s threshold from shapes alone: the mean over modules of r / n_in.

    The published 0.020 (Llama-3.2-1B, r = 32, n_in = 2048: r / n_in = 0.016)
    sits near it. Needs no other adapter and never sees the stream's
    similarities; used by ``threshold="auto"``.
    """
    mods = list(lora.modules.values())
    return sum(m.rank / m.shape[1] for m in mods) / len(mods)


def threshold_for(threshold: float | str, lora: LoRA) -> float:
    """K-Merge++'s threshold for this newcomer: ``threshold``, or the ``"auto"`` rule (:func:`width_threshold`)."""
    return width_threshold(lora) if threshold == "auto" else float(threshold)


def slot_scale(mode: str, n: int) -> float:
    """c_n: a slot of n tasks holds c_n * sum_i dW_i (``faithful`` aims at the average, as ``exact``).

    1/n for ``exact``, ``iso`` and ``isonorm`` (before the spectrum is flattened) and
    ``faithful``, 1/sqrt(n) for ``rms``, 1 for ``sum``.
    """
    if mode == "rms":
        return 1.0 / math.sqrt(n)
    if mode == "sum":
        return 1.0
    return 1.0 / n


def running_weights(mode: str, n: int) -> list[float]:
    """(w_slot, w_new) = (c_n / c_{n-1}, c_n): they take a slot of n - 1 members to n (see :func:`slot_scale`)."""
    return [slot_scale(mode, n) / slot_scale(mode, n - 1), slot_scale(mode, n)]


def a_alignment(slot: LoRA, lora: LoRA) -> float:
    """Mean over shared modules of |<A_slot, A_new>_F| / (|A_slot|_F |A_new|_F) (0 for independent
    random A of rank r << n_in; near 1 for adapters trained from one initialisation)."""
    vals = []
    for name, m in lora.modules.items():
        s = slot.modules.get(name)
        if s is None or s.A.shape != m.A.shape:
            continue
        a, b = s.A.double(), m.A.double()
        den = float(a.norm() * b.norm())
        vals.append(abs(float((a * b).sum())) / den if den > 0 else 0.0)
    return sum(vals) / len(vals) if vals else 0.0


def argmax(values: list[float]) -> int:
    """The index of the largest value; ties: the lowest index."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ----------------------------------------------------------------- the parts
class Part:
    """What routers and combiners share: a registered ``name``, the settings, and per-slot state.

    :attr:`states` holds, per slot, this part's fields of the manifest's
    ``slots[i].extra`` (a dict of :attr:`keys`; empty for a part without
    state). The merger replaces the list only once a step has committed.
    """

    #: the name in :data:`ROUTERS` / :data:`COMBINERS`
    name: str = ""
    #: the fields of ``slots[i].extra`` this part owns
    keys: tuple[str, ...] = ()

    def __init__(self, settings: dict):
        self.settings = settings
        self.states: list[dict] = []

    def load(self, extras: list[dict]) -> None:
        """Take this part's fields of the stored slots' ``extra``."""
        self.states = [{k: e[k] for k in self.keys if k in e} for e in extras]


class Router(Part):
    """Picks the slot of a newcomer. The base checks: no threshold, no oracle."""

    #: whether the strategy needs ``oracle=task -> group`` (and only it takes one)
    takes_oracle = False

    def __init__(self, settings: dict, oracle: Callable[[str], object] | None = None):
        super().__init__(settings)
        self.budget: int = settings["budget"]
        self.oracle = oracle

    @classmethod
    def check_threshold(cls, threshold, strategy: str):
        """The normalised ``threshold`` setting, or ValueError ``"threshold: why"``."""
        if threshold is not None:
            raise ValueError(f"threshold: only kmerge++ uses a threshold, not {strategy!r}")
        return None

    @classmethod
    def check_oracle(cls, oracle) -> None:
        """ValueError ``"oracle: why"`` unless ``oracle`` suits this router."""
        if (oracle is not None) != cls.takes_oracle:
            raise ValueError("oracle: the 'oracle' strategy needs oracle=task -> group, and only it takes one")

    def choose(self, task: str, lora: LoRA, sims: list[float], seed: int) -> int:
        """The slot for a newcomer: an index, or ``len(sims)`` (the number of slots) for a new slot.

        ``sims``: its similarity to each slot; ``seed``: this step's seed.
        """
        raise NotImplementedError

    def opened(self, task: str) -> dict:
        """This router's state of a slot that ``task`` opens (kept through merges and replaces)."""
        return {}


class Combiner(Part):
    """Merges a newcomer into a slot."""

    #: whether newcomers need the slots' ranks (peft's factor-wise merges)
    equal_ranks = False

    def combine(self, slot: int, current: LoRA, lora: LoRA, n: int, task: str, seed: int) -> tuple[LoRA, dict]:
        """(the merged slot, this combiner's new state of the slot); ``n``: tasks in the slot after the merge."""
        raise NotImplementedError


# ------------------------------------------------------------------ registry
#: name -> Router class
ROUTERS: dict[str, type[Router]] = {}
#: name -> Combiner class
COMBINERS: dict[str, type[Combiner]] = {}


@dataclass(frozen=True)
class Strategy:
    """A row of :data:`STRATEGY_TABLE`: the router's name, and the combiner's (None: the mode's running average)."""

    router: str
    combiner: str | None = None

    def check_mode(self, mode: str | None, strategy: str) -> str:
        """The normalised ``mode`` setting (default :data:`DEFAULT_MODE`, ``"faithful"`` for a fixed
        combiner), or ValueError ``"mode: why"``."""
        if mode is None:
            mode = DEFAULT_MODE if self.combiner is None else "faithful"
        if mode not in MODES:
            raise ValueError(f"mode: unknown {mode!r}; choose from {list(MODES)}")
        if mode != "faithful" and self.combiner is not None:
            raise ValueError(f"mode: {mode!r} applies to the running-average strategies {list(running_average())}, "
                             f"not {strategy!r}")
        return mode

    @property
    def router_class(self) -> type[Router]:
        return ROUTERS[self.router]

    def pair(self, mode: str) -> tuple[type[Router], type[Combiner]]:
        """The router and combiner classes under ``mode``."""
        return self.router_class, COMBINERS[mode if self.combiner is None else self.combiner]


#: strategy name -> (router, combiner); the built-in rows are :data:`kmerge_fast.online.STRATEGIES`.
STRATEGY_TABLE: dict[str, Strategy] = {}


def register(cls):
    """Register a :class:`Router` or :class:`Combiner` class under its ``name`` (a class decorator)."""
    table = ROUTERS if issubclass(cls, Router) else COMBINERS
    if not cls.name or cls.name in table:
        raise ValueError(f"name: {cls.name!r} is empty or registered already")
    table[cls.name] = cls
    return cls


def add_strategy(name: str, router: str | type[Router], combiner: str | type[Combiner] | None = None) -> None:
    """Add the strategy ``name`` = (``router``, ``combiner``): registered names, or classes (registered here).

    ``combiner=None``: the running average of the merger's mode (the strategy takes ``mode``).
    """
    if name in STRATEGY_TABLE:
        raise ValueError(f"strategy: {name!r} exists already")
    names = []
    for part, table in ((router, ROUTERS), (combiner, COMBINERS)):
        if isinstance(part, type):
            if table.get(part.name) is not part:
                register(part)
            part = part.name
        if part not in table and not (part is None and table is COMBINERS):
            raise ValueError(f"strategy: no part {part!r}; registered: {list(table)}")
        names.append(part)
    STRATEGY_TABLE[name] = Strategy(*names)


def lookup(strategy: str) -> Strategy | None:
    """The row of ``strategy`` (compared with ==, as a name in a tuple), or None."""
    return next((row for name, row in STRATEGY_TABLE.items() if name == strategy), None)


def running_average() -> tuple[str, ...]:
    """The strategies that keep a running average (and so honour ``mode``)."""
    return tuple(name for name, row in STRATEGY_TABLE.items() if row.combiner is None)


# ------------------------------------------------------------------- routers
@register
class MostSimilar(Router):
    """K-Merge: the first K arrivals take free slots; afterwards the most similar slot."""

    name = "most_similar"

    def choose(self, task, lora, sims, seed):
        return len(sims) if len(sims) < self.budget else argmax(sims)


@register
class Threshold(Router):
    """K-Merge++: a free slot only while the best similarity is below the threshold; else the most similar."""

    name = "threshold"

    @classmethod
    def check_threshold(cls, threshold, strategy):
        if threshold is None or threshold == "auto":
            return "auto"
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold: kmerge++ needs a finite number or 'auto', got {threshold!r} "
                             "(see kf.calibrate_threshold, kf.online.width_threshold)")
        return float(threshold)

    def choose(self, task, lora, sims, seed):
        free = len(sims) < self.budget
        if free and (not sims or max(sims) < threshold_for(self.settings["threshold"], lora)):
            return len(sims)
        return argmax(sims)


@register
class RandomSlot(Router):
    """Free slots first; then a random slot from this step's seed."""

    name = "random"

    def choose(self, task, lora, sims, seed):
        if len(sims) < self.budget:
            return len(sims)
        return random.Random(seed).randrange(len(sims))


@register
class Oracle(Router):
    """By task type (as published): free slots first; then the first slot whose first member has the
    newcomer's group (``oracle(task)``), else the most similar. State: ``group``, the first member's."""

    name = "oracle"
    keys = ("group",)
    takes_oracle = True

    @classmethod
    def check_oracle(cls, oracle):
        super().check_oracle(oracle)
        if not callable(oracle):
            raise ValueError(f"oracle: must be callable, got {type(oracle).__name__}")

    def group(self, task: str):
        """``oracle(task)`` as the manifest keeps it (a JSON scalar, else its str)."""
        group = self.oracle(task)
        return group if isinstance(group, (str, int, float, bool)) or group is None else str(group)

    def choose(self, task, lora, sims, seed):
        if len(sims) < self.budget:
            return len(sims)
        group = self.group(task)
        for i, state in enumerate(self.states):
            if state.get("group") == group:
                return i
        return argmax(sims)

    def opened(self, task):
        return {"group": self.group(task)}


# ----------------------------------------------------------------- combiners
@register
class Faithful(Combiner):
    """The published merge: peft's factor-wise ``linear`` with the running weights (1 - 1/n, 1/n).
    Warns, once per merger, when a newcomer's A is aligned with the slot's (:data:`ALIGNED_A`)."""

    name = "faithful"
    equal_ranks = True

    def __init__(self, settings):
        super().__init__(settings)
        self.warned_aligned = False

    def combine(self, slot, current, lora, n, task, seed):
        # once per merger (a stream repeats it): after the warning the check is not worth its cost
        align = 0.0 if self.warned_aligned else a_alignment(current, lora)
        if align > ALIGNED_A:
            self.warned_aligned = True
            warnings.warn(f"task {task!r}: its lora_A is aligned with slot {slot}'s (mean |cos| {align:.2f} > "
                          f"{ALIGNED_A}), as when adapters share one initialisation; faithful mode then returns "
                          "nearly the sum of the updates, not their average (the exact-average modes, the "
                          f"default {DEFAULT_MODE!r} among them, do not)",
                          stacklevel=3)
        return merge([current, lora], running_weights(self.name, n), method="linear"), {}


@register
class Exact(Combiner):
    """c_n = 1/n: an ``svd`` merge of (slot, newcomer) with the running weights, truncated to the slot's rank."""

    name = "exact"

    def combine(self, slot, current, lora, n, task, seed):
        rank = max(current.ranks.values())
        return merge([current, lora], running_weights(self.name, n), method="svd", rank=rank), {}


def _columns_to(lora: LoRA, norms_for: Callable[[str, torch.Tensor], torch.Tensor]) -> LoRA:
    """``lora`` with each nonzero column j of every module's B rescaled to the norm
    ``norms_for(module, norms)[j]`` (norms: the float64 column norms); zero columns stay zero."""
    modules = {}
    for name, m in lora.modules.items():
        B = m.B.detach()
        norms = torch.linalg.vector_norm(B, dim=0, dtype=torch.float64)  # accumulated in float64, no copy of B
        live = norms > 0
        factor = torch.where(live, norms_for(name, norms) / torch.where(live, norms, 1.0), 0.0)
        # one rounding to B's dtype: the product in float32 (float64 for float64 factors) is exact enough
        work = torch.float64 if B.dtype == torch.float64 else torch.float32
        modules[name] = LoRAModule(m.A, (B.to(work) * factor.to(work)).to(B.dtype), m.scaling)
    return LoRA(modules, lora.config)


def isotropic(lora: LoRA, norm_for: Callable[[str, float], float] | None = None
              ) -> tuple[LoRA, dict[str, list[float]]]:
    """Flatten each module's spectrum: (the isotropic adapter, the singular values it replaced).

    For a module with orthonormal rows of A (as :func:`kmerge_fast.merge`'s ``svd``
    method returns: dW = s B A = s U S V^T with B = U S), every nonzero column
    j of B is rescaled from its norm S_j to one value sigma, so dW becomes
    sigma s U V^T: every direction of the merge equally strong (isotropic
    merging, after Marczak et al., 2025, "No Task Left Behind"). By default
    sigma = sqrt(mean_j S_j^2) (mean over the nonzero columns): the same
    Frobenius norm. With ``norm_for`` ((module, ||dW||_F of ``lora``) -> a
    Frobenius norm N; modes ``isonorm`` and ``isogeo``) sigma = N / (sqrt(r') |s|),
    r' the nonzero columns: the module is served at norm N. Shapes, dtypes, scalings and config are kept;
    the norms are accumulated in float64.

    Returns the adapter and {module: [S_1, ..., S_r]} (the float64 column norms
    of B before the flattening), which :func:`anisotropic` needs to undo it.
    """
    spectrum = {}

    def flat(name: str, columns: torch.Tensor) -> torch.Tensor:
        spectrum[name] = columns.tolist()
        live = columns[columns > 0]
        if not live.numel():
            sigma = 0.0
        elif norm_for is None:
            sigma = float(live.square().mean().sqrt())
        else:
            scaling = abs(lora.modules[name].scaling)
            # ||dW||_F = |s| sqrt(sum_j S_j^2): the rows of A are orthonormal
            sigma = norm_for(name, scaling * float(live.square().sum().sqrt())) / (math.sqrt(live.numel()) * scaling)
        return torch.full_like(columns, sigma)

    return _columns_to(lora, flat), spectrum


def anisotropic(lora: LoRA, spectrum: dict[str, list[float]]) -> LoRA:
    """Undo :func:`isotropic`: each nonzero column j of B rescaled to the norm ``spectrum[module][j]``.

    Raises ValueError when ``spectrum`` does not list exactly the adapter's
    modules with one value per rank (a slot's stored state that does not fit it).
    """
    if sorted(spectrum) != sorted(lora.modules):
        raise ValueError(f"spectrum: holds modules {sorted(spectrum)[:3]}, the slot {sorted(lora.modules)[:3]}")

    def stored(name: str, norms: torch.Tensor) -> torch.Tensor:
        target = torch.tensor(spectrum[name], dtype=torch.float64)
        if target.shape != norms.shape:
            raise ValueError(f"spectrum: module {name!r} holds {target.numel()} values for rank {norms.numel()}")
        return target

    return _columns_to(lora, stored)


def module_norms(lora: LoRA) -> dict[str, float]:
    """{module: ||s B A||_F}, from the squared norms the similarity step caches (:func:`cache_norms`: the
    merger routed the newcomer by cosine or l2 first, so usually nothing is left to compute)."""
    cache_norms([lora], "cos")
    return {name: math.sqrt(max(m.cached_sq_norm(None), 0.0)) for name, m in lora.modules.items()}


@register
class Iso(Combiner):
    """``exact``'s running average, served with a flat spectrum (:func:`isotropic`). State: ``spectrum``,
    the average's singular values per module, so each step continues the exact average
    (:func:`anisotropic`), never a flattened one."""

    name = "iso"
    keys = ("spectrum",)

    def average(self, slot: int, current: LoRA, lora: LoRA, n: int) -> LoRA:
        """The exact running average of the slot's n tasks, truncated to the slot's rank."""
        spectrum = self.states[slot].get("spectrum")
        average = current if spectrum is None else anisotropic(current, spectrum)  # None: one adapter so far
        rank = max(current.ranks.values())
        return merge([average, lora], running_weights(self.name, n), method="svd", rank=rank)

    def combine(self, slot, current, lora, n, task, seed):
        served, spectrum = isotropic(self.average(slot, current, lora, n))
        return served, {"spectrum": spectrum}


@register
class IsoNorm(Iso):
    """``iso``'s flat running average, served per module at the norm of the members' mean update:
    ||dW_slot||_F = (1/n) sum_i ||dW_i||_F, the size of one task's update (OPCM's rescaling keeps its merge
    at that size too), where ``iso`` serves the average's norm, which shrinks as the members disagree
    (to 1/sqrt(n) of it for n orthogonal updates of one size). State: ``spectrum`` (as ``iso``) and
    ``norms``, that mean per module."""

    name = "isonorm"
    keys = ("spectrum", "norms")

    @staticmethod
    def served_norm(average: float, mean: float, n: int) -> float:
        """The norm a module of a slot of n tasks is served at, from the average's norm and the members'
        mean norm."""
        return mean

    def combine(self, slot, current, lora, n, task, seed):
        before = self.states[slot].get("norms") or module_norms(current)   # None: one adapter so far, its own
        new = module_norms(lora)
        norms = {name: before[name] + (new[name] - before[name]) / n for name in new}   # the members' mean
        served, spectrum = isotropic(self.average(slot, current, lora, n),
                                     lambda name, average: self.served_norm(average, norms[name], n))
        return served, {"spectrum": spectrum, "norms": norms}


@register
class IsoGeo(IsoNorm):
    """``iso``'s flat running average, served per module at the geometric mean of iso's norm and isonorm's:
    ||dW_slot||_F = sqrt(||avg||_F * (1/n) sum_i ||dW_i||_F), avg the truncated running average. Members
    that agree (avg = each member) are served at a member's norm, as by iso and isonorm; n orthogonal
    updates of one norm m at m n^(-1/4), between iso's m n^(-1/2) and isonorm's m, which overshoots when
    one slot holds many tasks. State: as ``isonorm``."""

    name = "isogeo"

    @staticmethod
    def served_norm(average: float, mean: float, n: int) -> float:
        return math.sqrt(average * mean)


@register
class IsoSwitch(IsoNorm):
    """``isonorm`` for a slot of at most T tasks, ``isogeo`` for a larger one:
    ||dW_slot||_F = (1/n) sum_i ||dW_i||_F for n <= T, sqrt(||avg||_F (1/n) sum_i ||dW_i||_F) beyond, on
    ``iso``'s flat average. T is ``settings["isonorm_up_to"]``: :data:`ISONORM_UP_TO` (10) for a new merger,
    the recorded one for a resumed store (:data:`ISONORM_UP_TO` for a store written before stores recorded
    it). A member's norm suits a slot of up to about ten tasks; it overshoots when one rank-r slot holds many
    more, where isogeo's geometric mean serves n orthogonal updates of norm m at m n^(-1/4). The default
    metric, the mean of per-module cosines, does not see a module's served norm, so with it a stream fills
    the same slots in isonorm, isogeo and isoswitch modes. State: as ``isonorm``."""

    name = "isoswitch"

    def served_norm(self, average: float, mean: float, n: int) -> float:
        rule = IsoNorm if n <= self.settings.get("isonorm_up_to", ISONORM_UP_TO) else IsoGeo
        return rule.served_norm(average, mean, n)


@register
class Rms(Exact):
    """c_n = 1/sqrt(n), re-truncated as ``exact``."""

    name = "rms"


@register
class Sum(Exact):
    """c_n = 1 (task arithmetic with lambda = 1), re-truncated as ``exact``."""

    name = "sum"


class PeftBaseline(Combiner):
    """(slot, newcomer) merged by the peft method of :data:`PEFT_BASELINES` [name] with its fixed weights;
    DARE's masks from this step's seed."""

    equal_ranks = True

    def combine(self, slot, current, lora, n, task, seed):
        method, weights = PEFT_BASELINES[self.name]
        density = None if method == "linear" else self.settings["density"]
        gen = torch.Generator().manual_seed(seed & (2**63 - 1))
        return merge([current, lora], weights, method=method, density=density, generator=gen), {}


@register
class Linear(PeftBaseline):
    name = "linear"


@register
class Ties(PeftBaseline):
    name = "ties"


@register
class DareLinear(PeftBaseline):
    name = "dare_linear"


@register
class DareTies(PeftBaseline):
    name = "dare_ties"


@register
class Opcm(Combiner):
    """Orthogonal-projection continual merging (:mod:`kmerge_fast.opcm`). State: ``opcm``, its per-module lambdas."""

    name = "opcm"
    keys = ("opcm",)

    def combine(self, slot, current, lora, n, task, seed):
        rank = max(current.ranks.values())
        merged, state = opcm_step(current, lora, self.states[slot].get("opcm", {}), rank)
        return merged, {"opcm": state}


STRATEGY_TABLE.update({
    "kmerge": Strategy("most_similar"),
    "kmerge++": Strategy("threshold"),
    "linear": Strategy("most_similar", "linear"),
    "ties": Strategy("most_similar", "ties"),
    "dare_linear": Strategy("most_similar", "dare_linear"),
    "dare_ties": Strategy("most_similar", "dare_ties"),
    "random": Strategy("random"),
    "oracle": Strategy("oracle"),
    "opcm": Strategy("most_similar", "opcm"),
})
#: The built-in strategies (kmerge_fast.online.STRATEGIES; add_strategy extends the table, not this).
STRATEGIES = tuple(STRATEGY_TABLE)
#: The built-in strategies that keep a running average (and so honour ``mode``).
RUNNING_AVERAGE = running_average()
