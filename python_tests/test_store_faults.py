"""The store's commit path under injected faults: each file-system call of an ``add`` fails in turn.

Every call of the commit path (the folder creations, the slot writer, each
fsync, the manifest's write and rename, the deletion of the superseded
version) is made to raise, before or after doing its work, with an OSError or
a KeyboardInterrupt. Then the store must reopen and hold a prefix state (the
one before the add or the one after it), and the live merger must either
match the disk (and keep working) or refuse further use until reopened. The
template store is built twice: writing peft alone, and peft + GGUF + MLX (whose
files are written by the same commit, through LoRA.save and atomic writes).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast.store import StoreError
from conftest import family_adapters

#: The calls counted, by name: (owner, attribute).
TARGETS = {
    "mkdir": (os, "mkdir"),
    "save": (kf.LoRA, "save"),        # writes the slot's two files
    "write": (os, "write"),           # the manifest's temporary file
    "fsync": (os, "fsync"),           # slot files, slot folder, slots/, the manifest, the store folder
    "replace": (os, "replace"),       # the manifest's rename: the commit point
    "unlink": (os, "unlink"),         # deletion of the superseded version (and of a failed temp file)
    "rmdir": (os, "rmdir"),
}


class Faults:
    """Wraps the TARGETS; the ``fail_at``-th call (1-based, over all of them, any thread) raises ``exc``,
    instead of doing its work, or after it (``after``). Counts only while ``active``."""

    def __init__(self, monkeypatch, fail_at: int | None = None, exc: type = OSError, after: bool = False):
        self.calls: list[str] = []
        self.fail_at, self.exc, self.after = fail_at, exc, after
        self.active = False
        self._lock = threading.Lock()
        for name, (owner, attr) in TARGETS.items():
            monkeypatch.setattr(owner, attr, self._wrap(name, getattr(owner, attr)))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            with self._lock:
                if self.active:
                    self.calls.append(name)
                fail = self.active and len(self.calls) == self.fail_at
            if fail:
                if self.after:
                    real(*args, **kwargs)
                raise (OSError(5, f"injected failure of {name}") if self.exc is OSError
                       else self.exc(f"injected at {name}"))
            return real(*args, **kwargs)
        return call


def _state(m: kf.OnlineMerger) -> tuple:
    slots = [{n: (mod.A.clone(), mod.B.clone(), mod.scaling) for n, mod in s.modules.items()} for s in m.slots]
    return [list(x) for x in m.members], len(m.history), slots


def _same(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or a[1] != b[1] or len(a[2]) != len(b[2]):
        return False
    return all(x.keys() == y.keys() and all(torch.equal(x[n][0], y[n][0]) and torch.equal(x[n][1], y[n][1])
                                            and x[n][2] == y[n][2] for n in x) for x, y in zip(a[2], b[2]))


def _user_files(root: Path) -> dict[str, bytes]:
    """What a user put into the store folder (never to be touched)."""
    return {str(p.relative_to(root)): p.read_bytes()
            for p in [root / "NOTES.txt", *sorted((root / "slots" / "my_adapter").iterdir())]}


@pytest.fixture(scope="module", params=["peft", "peft+gguf+mlx"])
def template(tmp_path_factory, request):
    """A store of 3 tasks in 2 slots (the next add merges), with a user's files in it."""
    root = tmp_path_factory.mktemp("faults") / "store"
    adapters = family_adapters(6)
    formats = {}
    if request.param != "peft":
        gguf_base = pytest.importorskip("helpers.gguf_base")
        formats = dict(formats=("peft", "gguf", "mlx"), base=gguf_base.write_base(root.parent / "base.gguf"))
    with kf.OnlineMerger(2, store=root, **formats) as m:
        for k in range(3):
            m.add(adapters[k], f"t{k}")
    adapters[5].save(root / "slots" / "my_adapter")
    (root / "slots" / "my_adapter" / "notes.md").write_text("mine")
    (root / "NOTES.txt").write_text("mine too")
    with kf.OnlineMerger.open(root, readonly=True) as m:
        before = _state(m)
    scratch = root.parent / "expected"
    shutil.copytree(root, scratch)
    with kf.OnlineMerger.open(scratch) as m:
        m.add(adapters[3], "t3")
        after = _state(m)
    return root, adapters, before, after


def _count_calls(template, tmp_path, monkeypatch) -> list[str]:
    root, adapters, _, _ = template
    shutil.copytree(root, tmp_path / "count")
    with kf.OnlineMerger.open(tmp_path / "count") as m:
        with monkeypatch.context() as mp:
            faults = Faults(mp)
            faults.active = True
            m.add(adapters[3], "t3")
            m._store.wait()
            faults.active = False
    return faults.calls


def test_every_call_of_the_commit_path_is_counted(template, tmp_path, monkeypatch):
    calls = _count_calls(template, tmp_path, monkeypatch)
    # the slot folder and its files written, six fsyncs, the manifest written and renamed,
    # the superseded version's two files and folder deleted
    assert sorted(set(calls)) == sorted(TARGETS), calls
    if not any(template[0].glob("slots/*/adapter.gguf")):
        assert calls.count("fsync") == 6 and calls.count("replace") == 1 and calls.count("rmdir") == 1
    else:  # + the GGUF and MLX files: each an atomic write (fsync of the file and its folder, a rename)
        assert calls.count("save") == 3 and calls.count("replace") == 4 and calls.count("rmdir") == 2


@pytest.mark.parametrize("exc, after", [(OSError, False), (OSError, True), (KeyboardInterrupt, False),
                                        (KeyboardInterrupt, True)])
def test_a_fault_at_any_call_leaves_a_prefix_state(template, tmp_path, monkeypatch, exc, after):
    root, adapters, before, after_state = template
    if any(root.glob("slots/*/adapter.gguf")) and after != (exc is KeyboardInterrupt):
        pytest.skip("the store of three formats: an OSError before, and an interrupt after, each call (time)")
    n_calls = len(_count_calls(template, tmp_path, monkeypatch))
    outcomes = set()
    for fail_at in range(1, n_calls + 1):
        store = tmp_path / f"s{fail_at}"
        shutil.copytree(root, store)
        user = _user_files(store)
        m = kf.OnlineMerger.open(store)
        with monkeypatch.context() as mp:
            faults = Faults(mp, fail_at, exc, after)
            faults.active = True
            try:
                m.add(adapters[3], "t3")
                raised = None
            except (OSError, KeyboardInterrupt) as e:
                raised = e
            m._store.wait()
            faults.active = False
        where = f"failure of call {fail_at} ({faults.calls[fail_at - 1]}, {exc.__name__}, after={after})"
        # the disk holds a prefix state, readable while the writer holds its lock
        with kf.OnlineMerger.open(store, readonly=True) as reader:
            disk = _state(reader)
        assert _same(disk, before) or _same(disk, after_state), where
        if raised is None:
            assert _same(disk, after_state), where
        # the live merger matches the disk and keeps working, or refuses until reopened
        if _same(_state(m), disk):
            outcomes.add("consistent")
            m.add(adapters[4], "t4")
            live = _state(m)
        else:
            outcomes.add("refused")
            with pytest.raises(StoreError, match="reopen"):
                m.add(adapters[4], "t4")
            live = disk
        m.close()
        with kf.OnlineMerger.open(store) as again:  # a writer: cleans what the fault left
            assert _same(_state(again), live), where
        # only the live folders remain (and the user's); no temp file; the user's files intact
        with kf.OnlineMerger.open(store, readonly=True) as reader:
            live_dirs = {reader._store.slot_dir(i).name for i in range(len(reader.slots))}
        assert {p.name for p in (store / "slots").iterdir()} == live_dirs | {"my_adapter"}, where
        assert not list(store.glob(".manifest.json.*")), where
        assert _user_files(store) == user, where
        shutil.rmtree(store)
    assert "consistent" in outcomes


def _fail_nth(monkeypatch, owner, attr, n: int, exc: BaseException, after: bool = False) -> list:
    """Make the n-th call of owner.attr raise ``exc`` (after doing its work if ``after``)."""
    real, calls = getattr(owner, attr), []

    def call(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            if after:
                real(*args, **kwargs)
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, call)
    return calls


@pytest.mark.parametrize("fault", ["fsync_of_the_store_folder", "interrupt_after_the_rename"])
def test_an_error_after_the_rename_keeps_memory_with_the_disk(tmp_path, monkeypatch, fault):
    """The add is committed once the manifest is renamed: memory takes it even though the add raised,
    and the next add neither reuses its generation nor deletes its folder (the store reopens)."""
    adapters = family_adapters(6)
    with kf.OnlineMerger(2, store=tmp_path / "s") as m:
        for k in range(3):
            m.add(adapters[k], f"t{k}")
        with monkeypatch.context() as mp:
            if fault == "fsync_of_the_store_folder":  # the 6th and last fsync of a merge's commit
                _fail_nth(mp, os, "fsync", 6, OSError(5, "injected I/O error"))
                with pytest.raises(OSError, match="injected"):
                    m.add(adapters[3], "t3")
            else:
                _fail_nth(mp, os, "replace", 1, KeyboardInterrupt(), after=True)
                with pytest.raises(KeyboardInterrupt):
                    m.add(adapters[3], "t3")
        assert sum(len(x) for x in m.members) == 4 and m.history[-1].task == "t3"
        m.add(adapters[4], "t4")
        m.add(adapters[5], "t5")
        members = [list(x) for x in m.members]
    with kf.OnlineMerger.open(tmp_path / "s") as again:
        assert again.members == members


def test_a_failed_commit_never_lends_its_generation(tmp_path, monkeypatch):
    """A commit that fails before the rename leaves a partial folder; the next commit writes a folder of
    a new generation (never into or over that one), and the partial folder goes after it."""
    adapters = family_adapters(4)
    root = tmp_path / "s"
    with kf.OnlineMerger(2, store=root) as m:
        for k in range(3):
            m.add(adapters[k], f"t{k}")
        before = {p.name for p in (root / "slots").iterdir()}
        with monkeypatch.context() as mp:
            _fail_nth(mp, os, "fsync", 1, OSError(28, "No space left on device"))
            with pytest.raises(OSError, match="No space"):
                m.add(adapters[3], "t3")
        partial = {p.name for p in (root / "slots").iterdir()} - before
        assert len(partial) == 1  # written, never committed
        m.add(adapters[3], "t3")
    names = {p.name for p in (root / "slots").iterdir()}  # close waited for the deletions
    assert not names & partial
    generations = sorted(int(n.split("-g")[1]) for n in names)
    assert max(generations) > int(partial.pop().split("-g")[1])
    with kf.OnlineMerger.open(root) as again:
        assert sum(len(x) for x in again.members) == 4


def test_a_commit_whose_outcome_is_unknown_makes_the_merger_refuse_until_reopened(tmp_path, monkeypatch):
    """The rename failed and whether it took place cannot be told (the temp file cannot even be looked
    at): memory may differ from the disk, so the merger refuses further adds; reopened, it works."""
    adapters = family_adapters(5)
    root = tmp_path / "s"
    with kf.OnlineMerger(2, store=root) as m:
        for k in range(3):
            m.add(adapters[k], f"t{k}")
        with monkeypatch.context() as mp:
            real_lstat = os.lstat
            mp.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "injected rename failure")))
            mp.setattr(os, "lstat", lambda p, *a, **k: (_ for _ in ()).throw(OSError(5, "injected"))
                       if ".manifest.json." in str(p) else real_lstat(p, *a, **k))
            with pytest.raises(OSError, match="injected rename failure"):
                m.add(adapters[3], "t3")
        with pytest.raises(StoreError, match="whether it took place is unknown; reopen the store"):
            m.add(adapters[3], "t3")
    with kf.OnlineMerger.open(root) as m:
        m.add(adapters[3], "t3")
        assert sum(map(len, m.members)) == 4


def test_a_merger_out_of_step_with_its_store_refuses_to_add(tmp_path):
    """Should memory ever miss a commit (an interrupt landing between the commit and the memory update),
    the next add refuses instead of committing a state built on the old one."""
    adapters = family_adapters(3)
    with kf.OnlineMerger(2, store=tmp_path / "s") as m:
        m.add(adapters[0], "t0")
        m._generation -= 1  # what such an interrupt would leave
        before = {p.name for p in (tmp_path / "s" / "slots").iterdir()}
        with pytest.raises(StoreError, match="out of step with its store.*reopen it"):
            m.add(adapters[1], "t1")
        assert {p.name for p in (tmp_path / "s" / "slots").iterdir()} == before
