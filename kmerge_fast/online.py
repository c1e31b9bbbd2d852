"""The online continual merger: K-Merge, K-Merge++ and the baselines of the paper.

A device receives adapters one at a time and keeps at most ``budget`` (K)
slots. ``add`` routes each newcomer to a slot and records the task -> slot
mapping used at inference.

Strategies (all share the API; the slot choice, then the merge):

- ``kmerge`` (published): the first K arrivals take free slots; afterwards the
  newcomer merges into the slot with the highest mean per-module similarity
  (cosine by default), with weights (1 - 1/n, 1/n), n = tasks in the slot
  after the merge (a running average where every task weighs the same).
- ``kmerge++``: a newcomer opens a free slot only if its best similarity is
  below ``threshold``; otherwise it merges. ``threshold="auto"`` (default)
  takes :func:`width_threshold` of each newcomer (mean over modules of
  r / n_in); :func:`calibrate_threshold` on held-out adapters is the
  alternative.
- ``linear`` (0.5 / 0.5), ``ties``, ``dare_linear``, ``dare_ties`` (weights
  [1, 1], ``density``): K-Merge's slot choice, merged with that peft method.
- ``random``: a seeded random slot once the K slots are full; running average.
- ``oracle`` (by task type, as published): the first K arrivals take free
  slots; afterwards a newcomer joins the first slot whose first member has
  its group (``oracle(task)``), else the most similar slot; running average.
- ``opcm``: K-Merge's slot choice, merged by orthogonal-projection continual
  merging in low-rank form (``kmerge_fast/opcm.py``).

Modes of the running-average merges (``kmerge``, ``kmerge++``, ``random``, ``oracle``).
A slot of n tasks holds (a rank-r approximation of) c_n * sum_i dW_i:

- ``faithful``: the published method, peft's factor-wise ``linear``
  combination with weights (1 - 1/n, 1/n): A = sqrt(w1 s1) A_slot +
  sqrt(w2 s2) A_new, B likewise, scaling 1. Cheap and rank-preserving, but
  not the average of the updates: the product carries cross terms
  B_slot A_new, and when the members share an A initialisation it returns
  (nearly) their *sum*. A warning is raised (once per merger) when a
  newcomer's A is that aligned with the slot's (:data:`ALIGNED_A`).
- ``exact``: c_n = 1/n, the true running average; each step is an ``svd``
  merge of (slot, newcomer) with weights (1 - 1/n, 1/n), truncated back to
  the slot's rank by the SVD kernel.
- ``iso``: ``exact``'s running average, served with a flat spectrum: per
  module, the rank-r average U S V^T is stored as sigma U V^T with
  sigma = sqrt(mean S^2) (same Frobenius norm; isotropic merging, after
  Marczak et al., 2025). The slot keeps S (``extra.spectrum``), so each step
  continues the exact average and flattens anew. Equalising the directions
  keeps the weaker tasks of a shared slot from being drowned by the
  dominant ones (see README, "Quality").
- ``isonorm``: ``iso``'s flat running average, served per module at the
  members' mean norm, ||dW_slot||_F = (1/n) sum_i ||dW_i||_F (the size of
  one task's update, as OPCM's rescaling keeps it), where ``iso`` serves the
  average's norm, which shrinks as the members disagree (1/sqrt(n) of a task's
  for n orthogonal updates of one size). The slot keeps S and that mean
  (``extra.norms``).
- ``isogeo``: ``iso``'s flat running average, served per module at the
  geometric mean of iso's norm and isonorm's,
  ||dW_slot||_F = sqrt(||avg||_F (1/n) sum_i ||dW_i||_F): a member's norm
  when the members agree, m n^(-1/4) for n orthogonal updates of norm m
  (iso: m n^(-1/2); isonorm: m, which overshoots when one slot holds many
  tasks). Same state as ``isonorm``.
- ``isoswitch``: ``isonorm`` while a slot holds at most 10 tasks,
  ``isogeo`` from the eleventh (isonorm's member norm suits a slot of up to
  about ten tasks and overshoots when one rank-r slot holds many more).
  Same state as ``isonorm``. The switch point is a setting the merger
  records (``settings.isonorm_up_to``): a store goes on with the one it was
  written with, whatever a later kmerge_fast's default.
- ``rms``: c_n = 1/sqrt(n): weights (sqrt(1 - 1/n), sqrt(1/n)), re-truncated
  as in ``exact``. For members with orthogonal updates of equal norm the slot
  keeps a member's norm, where the average shrinks each task's update to 1/n.
- ``sum``: c_n = 1 (task arithmetic with lambda = 1), re-truncated.

Each strategy is a named pair (:data:`kmerge_fast.strategies.STRATEGY_TABLE`): a
router that picks the slot and a combiner that merges into it (the mode's
running average when the row names none); :mod:`kmerge_fast.strategies`
holds them, each with its checks and per-slot state.

With ``store=folder`` the state lives on disk (:mod:`kmerge_fast.store`):
every ``add`` commits atomically before it returns, and
:meth:`OnlineMerger.open` resumes (``readonly=True``: a reader that takes no
lock and writes nothing, beside a writer). ``formats=("peft", "gguf", "mlx")``
writes every slot also as a llama.cpp GGUF and an MLX-LM folder, in the same
commit (``base=`` the base model, for the GGUF).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .lora import LoRA, first_non_finite
from .methods import check_density
from .ops.numerics.elementwise import mix64
from .similarity import METRICS, cache_norms, similarity_matrix
from .store import Store, StoreError, export_adapter, format_settings, store_formats
from .strategies import ISONORM_UP_TO, STRATEGY_TABLE, lookup, threshold_for
# re-exported: kf.online's names from before the strategies had their module
from .strategies import (ALIGNED_A, DEFAULT_MODE, MODES, PEFT_BASELINES, RUNNING_AVERAGE,  # noqa: F401
                         STRATEGIES, a_alignment, running_weights, slot_scale, width_threshold)


@dataclass
class Step:
    """One ``add``: the task, the slot it went to, what happened, the similarities seen, and the
    seconds spent deciding and merging (the store's commit is not included)."""

    task: str
    slot: int
    action: str            # "new" (took a free slot), "merge" or "replace"
    similarities: list     # similarity to each slot before the add (empty when there was none)
    seconds: float


def calibrate_threshold(loras: Sequence[LoRA], metric: str = "cos") -> float:
    """K-Merge++'s threshold as its authors calibrated it: the median pairwise similarity of ``loras``.

    Use adapters other than the ones to be streamed (at least 2).
    """
    if len(loras) < 2:
        raise ValueError("loras: need at least 2 adapters to calibrate a threshold")
    sims = similarity_matrix(list(loras), metric=metric)
    i, j = torch.triu_indices(len(loras), len(loras), offset=1)
    return float(torch.quantile(sims[i, j], 0.5))  # the middle value, or the mean of the two middle ones


class OnlineMerger:
    """Keeps at most ``budget`` adapter slots while adapters arrive one at a time.

    Args:
        budget: K, the number of slots (>= 1).
        strategy: one of :data:`STRATEGIES` (module docstring).
        similarity: ``"cos"`` (default, published), ``"l2"``, ``"l1"`` or ``"linf"``.
        threshold: K-Merge++'s similarity threshold (``kmerge++`` only): a number, or
            ``"auto"`` (default) for :func:`width_threshold` of each newcomer.
        mode: ``"faithful"``, ``"exact"``, ``"iso"``, ``"isonorm"``, ``"isogeo"``, ``"isoswitch"``, ``"rms"`` or
            ``"sum"`` for the running-average strategies (module docstring); default :data:`DEFAULT_MODE`.
        store: a folder to keep the state in (created; must not hold a store
            yet - use :meth:`open` to resume one). None: in memory only.
        seed: seeds ``random``'s slot choice and DARE's masks (per step, so a
            resumed store continues the same sequence).
        oracle: ``task -> group`` for the ``oracle`` strategy.
        density: kept fraction for ``ties`` / ``dare_*`` (default 0.5, as published).
        formats: the formats the store writes every slot in: ``"peft"`` (always: the
            store's own, read back by :meth:`open`) and any of ``"gguf"`` (llama.cpp,
            ``slots/<dir>/adapter.gguf``) and ``"mlx"`` (MLX-LM, ``slots/<dir>/mlx/``),
            in the same atomic commit (:mod:`kmerge_fast.store`). Needs ``store``.
        base: with ``"gguf"``: the base model, a base GGUF file or a transformers
            ``config.json`` or its folder (the store keeps its absolute path, and refuses
            to add once the model there is another one).
        gguf_dtype: with ``"gguf"``: ``"f32"`` (default), ``"f16"`` or ``"bf16"``.

    Use as a context manager (or call :meth:`close`) to release a store's lock.
    """

    def __init__(self, budget: int, strategy: str = "kmerge", similarity: str = "cos",
                 threshold: float | str | None = None, mode: str | None = None, store: str | Path | None = None, seed: int | None = None,
                 oracle: Callable[[str], object] | None = None, density: float = 0.5,
                 formats: Sequence[str] = ("peft",), base: str | Path | None = None, gguf_dtype: str | None = None):
        settings = _check_settings(budget, strategy, similarity, threshold, mode, seed, oracle, density)
        settings.update(format_settings(formats, base, gguf_dtype))
        if store is None and len(store_formats(settings)) > 1:
            raise ValueError(f"formats: {store_formats(settings)}: only a store writes slot files (pass store=)")
        self._init(settings, oracle)
        if store is not None:
            self._store = Store.create(store, settings)
            self._generation = self._store.generation

    def _init(self, settings: dict, oracle) -> None:
        self.settings = settings
        self.budget: int = settings["budget"]
        self.strategy: str = settings["strategy"]
        self.similarity: str = settings["similarity"]
        self.threshold: float | str | None = settings["threshold"]
        self.mode: str = settings["mode"]
        self.seed: int = settings["seed"]
        self.density: float = settings["density"]
        self.formats: tuple[str, ...] = store_formats(settings)
        self.oracle = oracle
        router, combiner = lookup(self.strategy).pair(self.mode)
        self.router = router(settings, oracle)   # picks the slot; per-slot state in router.states
        self.combiner = combiner(settings)       # merges into it; per-slot state in combiner.states
        self.slots: list[LoRA] = []
        self.members: list[list[str]] = []
        self.history: list[Step] = []
        self._store: Store | None = None
        self._readonly = False
        self._generation = 0               # the store generation that memory holds (add refuses a mismatch)

    # ------------------------------------------------------------ persistence
    @classmethod
    def open(cls, store: str | Path, oracle: Callable[[str], object] | None = None,
             readonly: bool = False) -> "OnlineMerger":
        """Resume the merger kept in ``store``.

        The manifest is validated (schema, settings, its own checksum) and each
        slot file is read once, checked against its SHA-256 and parsed from those
        same bytes: the slots in memory never depend on the files afterwards.

        ``readonly=True`` opens it as a reader: no lock, nothing written (it works
        on a read-only file system and while a writer streams, and sees the last
        committed state); such a merger answers queries and exports, and refuses
        :meth:`add`. A writer (the default) holds the store's lock until :meth:`close`.

        Raises :class:`~kmerge_fast.store.StoreError` if the folder is not a
        store, is corrupt or tampered with, or is open by another writer.
        """
        st = Store.open(store, readonly=readonly, verify=False, check_settings=_stored_settings)
        try:
            if _takes_oracle(st.manifest["settings"]["strategy"]) and oracle is None:
                raise ValueError("oracle: this store uses the 'oracle' strategy; pass the task -> group function")
            loaded = st.load_slots()  # a reader may move on to a newer manifest here: read it after
            manifest = st.manifest
            self = cls.__new__(cls)
            self._init(manifest["settings"], oracle)
            for i, (meta, lora) in enumerate(zip(manifest["slots"], loaded)):
                _check_stored_slot(st, i, meta, lora, loaded[0])
                self.slots.append(lora)
                self.members.append(list(meta["tasks"]))
            self.router.load([meta["extra"] for meta in manifest["slots"]])
            self.combiner.load([meta["extra"] for meta in manifest["slots"]])
            self.history = [Step(**h) for h in manifest["history"]]
            self._generation = st.generation
            self._readonly = readonly
        except BaseException:
            st.close()
            raise
        self._store = st
        return self

    def close(self) -> None:
        """Release the store's writer lock (the state is already on disk); waits for its pending deletions."""
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> "OnlineMerger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def store(self) -> Path | None:
        return self._store.root if self._store is not None else None

    def export(self, slot: int, path: str | Path, overwrite: bool = False, format: str = "peft",
               **options) -> None:
        """Write slot ``slot`` as a peft adapter folder ``path`` (files with the umask's permissions),
        or in another ``format``: ``"gguf"`` (``path`` is the file; ``options`` ``base``, ``dtype``
        default to the store's, ``task_names`` to the slot's tasks) or ``"mlx"`` (a folder).

        Refuses (:class:`~kmerge_fast.store.StoreError`), always, a ``path`` inside a
        store (this one or any other: the export would corrupt it or be deleted by
        it), and, unless ``overwrite=True``, a ``path`` that exists and is not an
        empty folder (for a GGUF: that exists).
        """
        self._check_slot(slot)
        export_adapter(self.slots[slot], path, overwrite, format, self.members[slot], self.settings, **options)

    # ---------------------------------------------------------------- queries
    def slot_for(self, task: str) -> int:
        """The slot that serves ``task``."""
        for i, tasks in enumerate(self.members):
            if task in tasks:
                return i
        raise KeyError(f"task {task!r} was never added (known: {sum(len(m) for m in self.members)} tasks)")

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < len(self.slots):
            raise ValueError(f"slot: no slot {slot!r}; this merger has {len(self.slots)} (0..{len(self.slots) - 1})")

    # -------------------------------------------------------------------- add
    def add(self, lora: LoRA, task: str, replace: bool = False) -> int:
        """Route ``lora`` (the adapter of ``task``) to a slot; returns the slot index.

        ``replace=True`` lets a task already stored come again: if it is the
        only task of its slot, the slot takes the new adapter; a task merged
        with others cannot be taken out of their merge, so that raises.
        On any error nothing changes, in memory or on disk.
        """
        start = time.perf_counter()
        self._check_writable()
        self._check_newcomer(lora, task)
        if self._store is not None:  # the store's other formats can take it (modules, base, task name)
            self._store.check_adapter(lora, [task])
        if any(task in m for m in self.members):
            if not replace:
                raise ValueError(f"task: {task!r} is already stored (slot {self.slot_for(task)}); "
                                 "pass replace=True to replace it")
            slot = self.slot_for(task)
            if self.members[slot] != [task]:
                raise ValueError(f"task: {task!r} shares slot {slot} with {len(self.members[slot]) - 1} other "
                                 "task(s); a merged task cannot be replaced")
            return self._apply(task, slot, "replace", lora, self.router.states[slot], {}, [], start)
        sims = self._similarities(lora)
        slot = self._choose(task, sims, lora)
        if slot == len(self.slots):
            return self._apply(task, slot, "new", lora, self.router.opened(task), {}, sims, start)
        merged, state = self.combiner.combine(slot, self.slots[slot], lora, len(self.members[slot]) + 1, task,
                                              self._step_seed())
        return self._apply(task, slot, "merge", merged, self.router.states[slot], state, sims, start)

    def _check_writable(self) -> None:
        """Refuse an add, before any work, that the store cannot take (StoreError)."""
        st = self._store
        if st is None:
            return
        if self._readonly:
            raise StoreError(f"{st.root}: this merger was opened read-only (OnlineMerger.open(..., readonly=True)); "
                             "open the store without readonly to add to it")
        st.check_writable()
        if st.generation != self._generation:
            raise StoreError(f"{st.root}: this merger's memory is out of step with its store (an add was "
                             "interrupted right after its commit); reopen it with OnlineMerger.open")

    def _check_newcomer(self, lora: LoRA, task: str) -> None:
        if not isinstance(lora, LoRA):
            raise TypeError(f"lora: expected a kmerge_fast.LoRA, got {type(lora).__name__}")
        if not isinstance(task, str) or not task:
            raise ValueError(f"task: need a non-empty string, got {task!r}")
        if not lora.modules:
            raise ValueError(f"task {task!r}: the adapter has no modules")
        bad = first_non_finite(lora.modules)
        if bad:
            raise ValueError(f"task {task!r}: module {bad[0]!r}: lora_{bad[1]} holds NaN or Inf")
        if self.slots:
            want = {n: m.shape for n, m in self.slots[0].modules.items()}
            got = {n: m.shape for n, m in lora.modules.items()}
            if want != got:
                missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
                shape = sorted(n for n in set(want) & set(got) if want[n] != got[n])
                raise ValueError(
                    f"task {task!r}: the adapter does not match the stored base model: "
                    f"missing modules {missing[:3]}, unknown modules {extra[:3]}, "
                    f"shape mismatch in {[(n, got[n], want[n]) for n in shape[:3]]}")
            if self.combiner.equal_ranks:
                ranks = {n: m.rank for n, m in lora.modules.items()}
                stored = self.slots[0].ranks
                if ranks != stored:
                    bad = next(n for n in ranks if ranks[n] != stored[n])
                    raise ValueError(f"task {task!r}: module {bad!r} has rank {ranks[bad]}, the slots {stored[bad]}; "
                                     f"peft's factor-wise merges need equal ranks (use mode='exact')")

    def _similarities(self, lora: LoRA) -> list[float]:
        if not self.slots:
            return []
        return similarity_matrix([lora], self.slots, metric=self.similarity)[0].tolist()

    def _step_seed(self) -> int:
        return mix64((self.seed or 0) * 0x100000001B3 + len(self.history))

    def threshold_for(self, lora: LoRA) -> float:
        """K-Merge++'s threshold for this newcomer (a fixed number, or the ``"auto"`` rule)."""
        return threshold_for(self.threshold, lora)

    def _choose(self, task: str, sims: list[float], lora: LoRA) -> int:
        """The slot for a newcomer (the router's choice); ``len(self.slots)`` means a new slot."""
        return self.router.choose(task, lora, sims, self._step_seed())

    def _apply(self, task, slot, action, adapter, routed, combined, sims, start) -> int:
        """Commit the new state (store first, then memory) and record the step; ``routed``,
        ``combined``: the router's and the combiner's new state of the slot.

        The manifest's rename is the commit point: if the commit raises after it
        (an fsync of the store folder, a KeyboardInterrupt), memory still takes
        the new state, since the disk holds it, and the error propagates. Should
        memory miss a commit all the same, :meth:`add` refuses until reopened.
        """
        slots = list(self.slots)
        members = [list(m) for m in self.members]
        rstates, cstates = list(self.router.states), list(self.combiner.states)
        if slot == len(slots):
            slots.append(adapter)
            members.append([task])
            rstates.append(routed)
            cstates.append(combined)
        else:
            slots[slot] = adapter
            rstates[slot], cstates[slot] = routed, combined
            if action == "merge":
                members[slot].append(task)
        step = Step(task, slot, action, [float(s) for s in sims], time.perf_counter() - start)
        history = self.history + [step]
        if self._store is not None:
            meta = [{"tasks": m, "rank": max(s.ranks.values()), "extra": {**r, **c}}
                    for m, s, r, c in zip(members, slots, rstates, cstates)]
            # The next step needs the new slot's norms; compute them while the commit mostly
            # waits on the disk (the kernels release the GIL).
            try:
                self._store.commit({slot: adapter}, meta, [asdict(h) for h in history],
                                   while_syncing=lambda: cache_norms([adapter], self.similarity))
            except BaseException:
                if self._store.generation != self._generation:  # committed; the error came after the rename
                    self._take(slots, members, rstates, cstates, history)
                    self._generation = self._store.generation
                raise
            self._generation = self._store.generation
        self._take(slots, members, rstates, cstates, history)
        return slot

    def _take(self, slots, members, rstates, cstates, history) -> None:
        """Memory takes a committed step."""
        self.slots, self.members, self.history = slots, members, history
        self.router.states, self.combiner.states = rstates, cstates


def _stored_settings(settings: dict) -> dict:
    """:func:`_check_settings` of a store's settings (the store's manifest check calls it): the
    normalised settings, or ValueError ``"<field>: why"``."""
    oracle = (lambda task: task) if _takes_oracle(settings["strategy"]) else None  # stands in for the caller's
    return _check_settings(settings["budget"], settings["strategy"], settings["similarity"], settings["threshold"],
                           settings["mode"], settings["seed"], oracle, settings["density"],
                           settings.get("isonorm_up_to"))


def _check_stored_slot(st: Store, index: int, meta: dict, lora: LoRA, first: LoRA) -> None:
    """StoreError unless a loaded slot agrees with its manifest entry and has slot 0's modules and shapes."""
    where = st.slot_dir(index)
    if not lora.modules:
        raise StoreError(f"{where}: the slot's adapter has no modules")
    rank = max(lora.ranks.values())
    if rank != meta["rank"]:
        raise StoreError(f"{where}: rank {rank}, but {st.root / 'manifest.json'} slots[{index}].rank says "
                         f"{meta['rank']}")
    shapes = {n: m.shape for n, m in lora.modules.items()}
    if shapes != {n: m.shape for n, m in first.modules.items()}:
        raise StoreError(f"{where}: its modules or shapes differ from slot 0's (the slots of a store adapt one "
                         "base model)")


def _takes_oracle(strategy: str) -> bool:
    """Whether ``strategy`` (a name, perhaps unknown) routes by ``oracle=task -> group``."""
    row = lookup(strategy)
    return row is not None and row.router_class.takes_oracle


def _check_settings(budget, strategy, similarity, threshold, mode, seed, oracle, density,
                    isonorm_up_to: int | None = None) -> dict:
    """The normalised settings, or ValueError ``"<field>: why"``. ``isonorm_up_to``: a store's recorded switch
    point (None: a new merger's, :data:`ISONORM_UP_TO`, recorded in ``isoswitch`` mode only)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget: must be an int >= 1, got {budget!r}")
    row = lookup(strategy)
    if row is None:
        raise ValueError(f"strategy: unknown {strategy!r}; choose from {list(STRATEGY_TABLE)}")
    if similarity not in METRICS:
        raise ValueError(f"similarity: unknown {similarity!r}; choose from {list(METRICS)}")
    mode = row.check_mode(mode, strategy)
    threshold = row.router_class.check_threshold(threshold, strategy)
    row.router_class.check_oracle(oracle)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed: must be an int or None, got {seed!r}")
    settings = {"budget": budget, "strategy": strategy, "similarity": similarity, "threshold": threshold,
                "mode": mode, "seed": seed, "density": check_density(density)}
    if mode == "isoswitch":  # recorded, so that a store goes on with the switch point it was written with
        settings["isonorm_up_to"] = ISONORM_UP_TO if isonorm_up_to is None else isonorm_up_to
    elif isonorm_up_to is not None:
        raise ValueError(f"isonorm_up_to: only mode 'isoswitch' switches at a number of tasks, not {mode!r}")
    return settings


__all__ = ["DEFAULT_MODE", "MODES", "STRATEGIES", "OnlineMerger", "Step", "StoreError", "calibrate_threshold",
           "running_weights", "slot_scale", "width_threshold"]
