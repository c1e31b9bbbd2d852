"""What a store may touch, and who may read it: a new store only in an empty folder, deletions only of
what the store wrote, exports never over a folder or into a store, stale temp files cleaned by the next
writer, and readers that take no lock, write nothing and see the last committed state."""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast.store import MANIFEST, READ_ATTEMPTS, Store, StoreError, enclosing_store
from conftest import family_adapters


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tree(root: Path) -> dict[str, tuple]:
    """Every entry under root with its type, size and mtime: any write shows."""
    out = {}
    for p in sorted([root, *root.rglob("*")]):
        st = os.lstat(p)
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _store(root: Path, n: int = 3, budget: int = 2) -> list[kf.LoRA]:
    adapters = family_adapters(max(n, 6))
    with kf.OnlineMerger(budget, store=root) as m:
        for k in range(n):
            m.add(adapters[k], f"t{k}")
    return adapters


def _slot_names(root: Path) -> set[str]:
    return {p.name for p in (root / "slots").iterdir()}


# ------------------------------------------------------------ 1. what a store deletes
@pytest.mark.parametrize("content", ["slots/my_adapter", "data.csv", "slots/s000-g000002"])
def test_a_new_store_refuses_a_folder_that_is_not_empty(tmp_path, content):
    root = tmp_path / "d"
    (root / content).parent.mkdir(parents=True)
    if content == "data.csv":
        (root / content).write_text("1,2\n")
    else:
        family_adapters(1)[0].save(root / content)
    before = _tree(root)
    with pytest.raises(StoreError, match="not empty and not a kmerge_fast store"):
        kf.OnlineMerger(2, store=root)
    assert _tree(root) == before  # not even a lock file


@pytest.mark.parametrize("content", ["missing", "empty", "debris_of_a_killed_create"])
def test_a_new_store_takes_a_missing_or_empty_folder(tmp_path, content):
    root = tmp_path / "d"
    if content != "missing":
        root.mkdir()
    if content == "debris_of_a_killed_create":
        (root / ".lock").touch()
        (root / "slots").mkdir()
        (root / ".manifest.json.0123456789abcdef.tmp").write_text("{")
    with kf.OnlineMerger(2, store=root) as m:
        m.add(family_adapters(1)[0], "t0")
    assert sorted(p.name for p in root.iterdir()) == [".lock", MANIFEST, "slots"]


def test_a_file_is_not_a_store_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a folder"):
        kf.OnlineMerger(2, store=tmp_path / "f")


def test_the_store_never_deletes_what_it_did_not_write(tmp_path):
    """A user's folders inside slots/ stay through adds and reopens: one of any name, one named like a
    slot folder of an earlier generation but never listed by a manifest, and one of a later generation
    holding a file the store would not write."""
    root = tmp_path / "s"
    adapters = _store(root, n=2)
    mine = {"my_adapter": None, "s007-g000001": None, "s001-g999999": "notes.txt"}
    for name, extra in mine.items():
        adapters[5].save(root / "slots" / name)
        if extra:
            (root / "slots" / name / extra).write_text("mine")
    user = {name: _files(root / "slots" / name) for name in mine}
    for k in range(2, 6):
        with kf.OnlineMerger.open(root) as m:
            m.add(adapters[k], f"t{k}")
    for name in mine:
        assert _files(root / "slots" / name) == user[name], name
    with kf.OnlineMerger.open(root, readonly=True) as m:
        live = {m._store.slot_dir(i).name for i in range(len(m.slots))}
        assert sum(map(len, m.members)) == 6
    assert _slot_names(root) == live | set(mine)


def test_the_next_writer_removes_an_interrupted_commits_folders(tmp_path):
    """Folders of a generation above the manifest's holding only adapter files (or nothing) are the
    leftovers of a commit a crash interrupted: the next writer removes them, a reader does not."""
    root = tmp_path / "s"
    _store(root)
    with kf.OnlineMerger.open(root, readonly=True) as m:
        generation, live = m._store.generation, {m._store.slot_dir(i).name for i in range(len(m.slots))}
        source = m._store.slot_dir(0)
    leftovers = [f"s000-g{generation + 1:06d}", f"s002-g{generation + 1:06d}"]
    shutil.copytree(source, root / "slots" / leftovers[0])
    (root / "slots" / leftovers[1]).mkdir()
    with kf.OnlineMerger.open(root, readonly=True):
        pass
    assert _slot_names(root) == live | set(leftovers)
    with kf.OnlineMerger.open(root) as m:
        m.add(family_adapters(4)[3], "t3")
        names = {m._store.slot_dir(i).name for i in range(len(m.slots))}
    assert _slot_names(root) == names and not names & set(leftovers)  # and no generation of theirs reused


# ------------------------------------------------------------------ 2. export
@pytest.fixture
def merger(tmp_path):
    root = tmp_path / "s"
    _store(root)
    with kf.OnlineMerger.open(root) as m:
        yield m


def _same_adapter(a: kf.LoRA, b: kf.LoRA) -> bool:
    return a.modules.keys() == b.modules.keys() and all(
        torch.equal(a.modules[n].A, b.modules[n].A) and torch.equal(a.modules[n].B, b.modules[n].B)
        for n in a.modules)


def test_export_refuses_a_folder_that_is_not_empty(merger, tmp_path):
    out = tmp_path / "out"
    family_adapters(1, seed=3)[0].save(out)
    (out / "README.md").write_text("mine")
    before = _files(out)
    with pytest.raises(StoreError, match=r"out: not empty \(holds README.md, adapter_config.json, .*overwrite=True"):
        merger.export(0, out)
    assert _files(out) == before
    merger.export(0, out, overwrite=True)
    assert _same_adapter(kf.LoRA.load(out), merger.slots[0])
    assert (out / "README.md").read_text() == "mine"
    merger.export(1, tmp_path / "new" / "folder")  # missing: created
    (tmp_path / "empty").mkdir()
    merger.export(1, tmp_path / "empty")
    assert _same_adapter(kf.LoRA.load(tmp_path / "empty"), merger.slots[1])


@pytest.mark.parametrize("where", ["root", "live_slot", "new_folder_in_slots", "deep", "via_link", "dotdot"])
def test_export_never_writes_into_a_store(merger, tmp_path, where):
    root = merger.store
    target = {"root": root, "live_slot": merger._store.slot_dir(1), "new_folder_in_slots": root / "slots" / "x",
              "deep": root / "a" / "b", "via_link": tmp_path / "link" / "x",
              "dotdot": tmp_path / "elsewhere" / ".." / "s" / "slots" / "y"}[where]
    (tmp_path / "link").symlink_to(root / "slots")
    before = _files(root)
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=rf"inside the kmerge_fast store {root}"):
            merger.export(0, target, overwrite=overwrite)
    assert _files(root) == before and not os.path.lexists(root / "slots" / "x")
    assert enclosing_store(target) == root.resolve()
    assert enclosing_store(tmp_path / "outside") is None


def test_export_gets_the_umask_permissions(merger, tmp_path):
    """Exported files (and the store's manifest) get 0666 minus the umask, like any file a tool writes."""
    old = os.umask(0o027)
    try:
        merger.export(0, tmp_path / "out")
        merger.add(family_adapters(4)[3], "t3")
    finally:
        os.umask(old)
    for path in [*(tmp_path / "out").iterdir(), merger.store / MANIFEST]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_export_from_a_reader_while_a_writer_holds_the_store(merger, tmp_path):
    with kf.OnlineMerger.open(merger.store, readonly=True) as reader:
        reader.export(1, tmp_path / "out")
    assert _same_adapter(kf.LoRA.load(tmp_path / "out"), merger.slots[1])


# ------------------------------------------------------------ 6. stale temp files
def test_the_next_writer_removes_stale_manifest_temps(tmp_path, monkeypatch):
    """A writer killed between writing the manifest's temp file and renaming it leaves the temp file
    (here: its removal fails); the next writer removes it, and only files of that name pattern."""
    root = tmp_path / "s"
    adapters = _store(root)
    with kf.OnlineMerger.open(root) as m:
        with monkeypatch.context() as mp:
            mp.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "injected")))
            mp.setattr(os, "unlink", lambda *a: (_ for _ in ()).throw(OSError(5, "injected")))
            with pytest.raises(OSError, match="injected"):
                m.add(adapters[3], "t3")
    stale = list(root.glob(".manifest.json.*.tmp"))
    assert len(stale) == 1
    keep = [root / ".manifest.json.notes.tmp", root / ".manifest.json.bak", root / "my.tmp"]
    for p in keep:
        p.write_text("mine")
    (root / ".manifest.json.0123456789abcdef.tmp").mkdir()  # not a regular file: not the store's
    with kf.OnlineMerger.open(root, readonly=True):
        pass
    assert stale[0].exists()  # a reader removes nothing
    with kf.OnlineMerger.open(root) as m:
        m.add(adapters[3], "t3")
    assert not stale[0].exists() and all(p.exists() for p in keep)
    assert (root / ".manifest.json.0123456789abcdef.tmp").is_dir()


# ------------------------------------------------------------------- 7. readers
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _NoWrites:
    """Records (and refuses, as a read-only file system would) every attempt to write."""

    def __init__(self, mp):
        self.attempts: list[str] = []
        real_os_open, real_open = os.open, builtins.open

        def refuse(name):
            def call(*args, **kwargs):
                self.attempts.append(f"{name}{args[:1]}")
                raise OSError(errno.EROFS, "Read-only file system (test)")
            return call

        def os_open(path, flags, *args, **kwargs):
            if flags & _WRITE_FLAGS:
                return refuse("os.open")(path)
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                return refuse("open")(file)
            return real_open(file, mode, *args, **kwargs)

        mp.setattr(os, "open", os_open)
        mp.setattr(builtins, "open", open_)
        for name in ("mkdir", "makedirs", "replace", "rename", "unlink", "remove", "rmdir", "write", "truncate",
                     "chmod", "utime"):
            mp.setattr(os, name, refuse(f"os.{name}"))
        mp.setattr(shutil, "rmtree", refuse("shutil.rmtree"))


def test_a_reader_writes_nothing(tmp_path, monkeypatch):
    """Not even on a store with things a writer would clean: a stale temp file, an interrupted commit's
    folder, a folder the manifest lists as obsolete; and no lock file."""
    root = tmp_path / "s"
    _store(root)
    with kf.OnlineMerger.open(root, readonly=True) as m:
        generation = m._store.generation
        source = m._store.slot_dir(0)
    shutil.copytree(source, root / "slots" / f"s000-g{generation + 1:06d}")
    (root / ".manifest.json.0123456789abcdef.tmp").write_text("{")
    os.unlink(root / ".lock")
    before = _tree(root)
    with monkeypatch.context() as mp:
        guard = _NoWrites(mp)
        with kf.OnlineMerger.open(root, readonly=True) as m:
            assert sum(map(len, m.members)) == 3
            with pytest.raises(StoreError, match="opened read-only"):
                m.add(family_adapters(4)[3], "t3")
        store = Store.open(root, readonly=True)  # verifies every checksum
        assert len(store.load_slots()) == 2
        store.close()
    assert guard.attempts == []
    assert _tree(root) == before


def test_a_writer_on_a_read_only_file_system_is_told_to_read(tmp_path, monkeypatch):
    root = tmp_path / "s"
    _store(root)
    os.unlink(root / ".lock")
    with monkeypatch.context() as mp:
        _NoWrites(mp)
        with pytest.raises(StoreError, match=r"cannot open the lock .* open it read-only"):
            kf.OnlineMerger.open(root)


def test_a_reader_opens_a_read_only_folder(tmp_path):
    root = tmp_path / "s"
    _store(root)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    try:
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        with kf.OnlineMerger.open(root, readonly=True) as m:
            assert sum(map(len, m.members)) == 3
        if os.geteuid() != 0:  # root writes anyway
            with pytest.raises(StoreError):
                kf.OnlineMerger.open(root)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_readers_neither_block_nor_are_blocked_by_the_writer(tmp_path):
    root = tmp_path / "s"
    adapters = _store(root)
    reader = kf.OnlineMerger.open(root, readonly=True)
    with kf.OnlineMerger.open(root) as writer:  # a reader holds no lock
        with kf.OnlineMerger.open(root, readonly=True) as second:  # nor does a writer block a reader
            assert second.members == writer.members
        writer.add(adapters[3], "t3")
        with pytest.raises(StoreError, match="open by another writer"):
            kf.OnlineMerger.open(root)
    assert sum(map(len, reader.members)) == 3  # a reader keeps the state it read
    reader.close()


def test_a_reader_that_loses_the_race_rereads_the_manifest(tmp_path):
    """A reader read manifest N; the writer then committed twice and deleted the folders N named. Loading
    the slots finds them gone, re-reads the manifest and returns the newest state."""
    root = tmp_path / "s"
    adapters = _store(root)
    reader = Store.open(root, readonly=True, verify=False)
    old = {reader.slot_dir(i).name for i in range(2)}
    with kf.OnlineMerger.open(root) as writer:
        writer.add(adapters[3], "t3")
        writer.add(adapters[4], "t4")
        writer.add(adapters[5], "t5")
        want = writer.slots
    assert old - _slot_names(root)  # a folder the reader's manifest names is gone
    got = reader.load_slots()
    assert all(_same_adapter(a, b) for a, b in zip(got, want))
    assert sum(len(s["tasks"]) for s in reader.manifest["slots"]) == 6


def test_a_reader_gives_up_after_some_attempts(tmp_path, monkeypatch):
    root = tmp_path / "s"
    _store(root)
    reader = Store.open(root, readonly=True, verify=False)
    shutil.rmtree(reader.slot_dir(1))
    with pytest.raises(StoreError, match=r"adapter_config.json: missing"):  # the manifest did not change
        reader.load_slots()
    calls = []
    real = kf.store._read_manifest
    monkeypatch.setattr(Store, "_manifest_replaced", lambda self: True)  # a writer that never stops
    monkeypatch.setattr(kf.store, "_read_manifest", lambda *a: calls.append(1) or real(*a))
    with pytest.raises(StoreError, match=rf"replaced the manifest {READ_ATTEMPTS} times"):
        reader.load_slots()
    assert len(calls) == READ_ATTEMPTS


STREAM = textwrap.dedent("""
    import sys
    from pathlib import Path
    import kmerge_fast as kf
    store, folder, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    with kf.OnlineMerger(3, store=store) as m:
        for k in range(n):
            m.add(kf.LoRA.load(folder / f"t{k}"), f"t{k}")
            print(k, flush=True)
""")


def test_readers_see_committed_states_while_a_writer_streams(tmp_path):
    n = 20
    adapters = family_adapters(n)
    expected = []
    memory = kf.OnlineMerger(3)
    for k, lora in enumerate(adapters):
        lora.save(tmp_path / f"t{k}")
        memory.add(kf.LoRA.load(tmp_path / f"t{k}"), f"t{k}")
        expected.append([list(x) for x in memory.members])
    script = tmp_path / "stream.py"
    script.write_text(STREAM)
    store = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), str(store), str(tmp_path), str(n)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen = set()
    try:
        while child.poll() is None:
            if not (store / MANIFEST).exists():
                time.sleep(0.01)
                continue
            with kf.OnlineMerger.open(store, readonly=True) as reader:
                count = sum(map(len, reader.members))
                assert count == 0 or reader.members == expected[count - 1]
                assert len(reader.history) == count
                seen.add(count)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == 0, child.stderr.read().decode()[-2000:]
    assert len(seen) >= 2, seen


def test_reading_a_store_imports_no_torch(tmp_path):
    root = tmp_path / "s"
    _store(root)
    code = ("import sys; from kmerge_fast.store import Store; s = Store.open(sys.argv[1], readonly=True); "
            "print(len(s.manifest['slots']), 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["2", "False"], run.stderr[-2000:]


def test_the_store_names_the_adapter_files_as_lora_does():
    """store.py spells the slot files out (to read a manifest without torch); they must stay lora's."""
    assert kf.store.SLOT_FILES == (kf.lora.CONFIG_NAME, kf.lora.WEIGHTS_NAME)
