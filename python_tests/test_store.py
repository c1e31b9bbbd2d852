"""The on-disk store: resume, atomic adds under SIGKILL, checksums, the writer lock, untouched on errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast.store import StoreError
from conftest import family_adapters, spy_inner_products


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_state(a: kf.OnlineMerger, b: kf.OnlineMerger) -> None:
    assert a.members == b.members
    assert len(a.slots) == len(b.slots)
    for x, y in zip(a.slots, b.slots):
        assert x.modules.keys() == y.modules.keys()
        for name in x.modules:
            assert torch.equal(x.modules[name].A, y.modules[name].A), name
            assert torch.equal(x.modules[name].B, y.modules[name].B), name
            assert x.modules[name].scaling == y.modules[name].scaling


@pytest.mark.parametrize("strategy", ["kmerge", "opcm", "random"])
def test_resume_continues_identically(tmp_path, strategy):
    adapters = family_adapters(8)
    memory = kf.OnlineMerger(3, strategy=strategy, seed=1)
    for k, lora in enumerate(adapters):
        memory.add(lora, f"t{k}")
    with kf.OnlineMerger(3, strategy=strategy, seed=1, store=tmp_path / "s") as m:
        for k in range(5):
            m.add(adapters[k], f"t{k}")
    with kf.OnlineMerger.open(tmp_path / "s") as m:
        for k in range(5, 8):
            m.add(adapters[k], f"t{k}")
    with kf.OnlineMerger.open(tmp_path / "s") as m:
        _same_state(m, memory)
        assert [s.task for s in m.history] == [f"t{k}" for k in range(8)]
        assert m.strategy == strategy and m.budget == 3


def test_slots_are_peft_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama

    adapters = family_adapters(4)
    with kf.OnlineMerger(2, store=tmp_path / "s") as m:
        for k, lora in enumerate(adapters):
            m.add(lora, f"t{k}")
        m.export(0, tmp_path / "slot0")
        folder = m._store.slot_dir(1)
        slots = m.slots
    model = peft.PeftModel.from_pretrained(tiny_llama(hidden=32, layers=2), folder)
    for key, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            name = kf.lora.canonical_name(key)
            torch.testing.assert_close(module.lora_A["default"].weight, slots[1].modules[name].A)
    exported = kf.LoRA.load(tmp_path / "slot0")
    for name, mod in exported.modules.items():
        assert torch.equal(mod.A, slots[0].modules[name].A)


def test_manifest_records_settings_members_and_checksums(tmp_path):
    with kf.OnlineMerger(2, strategy="kmerge++", threshold=0.2, store=tmp_path / "s") as m:
        for k, lora in enumerate(family_adapters(3)):
            m.add(lora, f"t{k}")
    raw = (tmp_path / "s" / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    assert manifest["format"] == "kmerge_fast.store" and manifest["version"] == 2
    assert manifest["checksum"] == kf.store.manifest_checksum(manifest)
    # the file is the canonical JSON of the whole manifest, though the commit encoded only its body
    assert raw == kf.store.canonical_json(manifest)
    # the superseded versions this last commit listed for deletion were deleted after it (close waits)
    assert not any((tmp_path / "s" / "slots" / d).exists() for d in manifest["obsolete"])
    assert manifest["settings"]["strategy"] == "kmerge++" and manifest["settings"]["threshold"] == 0.2
    assert [s["tasks"] for s in manifest["slots"]] == m.members
    for slot in manifest["slots"]:
        assert set(slot["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
        assert all(len(d) == 64 for d in slot["files"].values())
    # old slot versions are gone: one folder per slot
    assert len(list((tmp_path / "s" / "slots").iterdir())) == len(manifest["slots"])


def test_indented_manifest_of_earlier_builds_opens_and_continues(tmp_path):
    """Builds before 2026-12-05 wrote the manifest indented; its checksum is over the canonical body, so such
    a store opens, and the next commit rewrites it canonical."""
    adapters = family_adapters(4)
    with kf.OnlineMerger(2, store=tmp_path / "s") as m:
        for k, lora in enumerate(adapters[:3]):
            m.add(lora, f"t{k}")
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_bytes())
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with kf.OnlineMerger.open(tmp_path / "s") as m:
        assert m.members == [slot["tasks"] for slot in manifest["slots"]] and len(m.history) == 3
        m.add(adapters[3], "t3")
    raw = path.read_bytes()
    assert raw == kf.store.canonical_json(json.loads(raw)) and json.loads(raw)["generation"] == manifest["generation"] + 1


def test_commit_caches_the_new_slot_norms(tmp_path, monkeypatch):
    """With a store, a merged slot's norms are computed during its commit: the next step's
    similarity call computes only the newcomer's (without a store, the next call pays for both)."""
    adapters = family_adapters(5)
    with kf.OnlineMerger(2, store=tmp_path / "s") as m:
        for k, lora in enumerate(adapters[:4]):
            m.add(lora, f"t{k}")
        assert m.history[-1].action == "merge"
        calls = spy_inner_products(monkeypatch)
        m._similarities(adapters[4])
    newcomer = {id(mod.A) for mod in adapters[4].modules.values()}
    selves = [xs for xs, ys in calls[0] if len(xs) == 1 and len(ys) == 1]
    assert len(calls) == 1 and selves and all(id(xs[0].A) in newcomer for xs in selves)


def test_second_writer_is_refused(tmp_path):
    with kf.OnlineMerger(2, store=tmp_path / "s") as m:
        m.add(family_adapters(1)[0], "t0")
        with pytest.raises(StoreError, match="open by another writer"):
            kf.OnlineMerger.open(tmp_path / "s")
    kf.OnlineMerger.open(tmp_path / "s").close()  # released on close
    with pytest.raises(StoreError, match="already holds a store"):
        kf.OnlineMerger(2, store=tmp_path / "s")


@pytest.mark.parametrize("damage", ["flip_weight_byte", "edit_config", "delete_file", "garble_manifest",
                                    "future_version", "no_manifest"])
def test_tampered_store_is_refused(tmp_path, damage):
    with kf.OnlineMerger(2, store=tmp_path / "s") as m:
        for k, lora in enumerate(family_adapters(3)):
            m.add(lora, f"t{k}")
        slot_dir = m._store.slot_dir(0)
    manifest = tmp_path / "s" / "manifest.json"
    if damage == "flip_weight_byte":
        path = slot_dir / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x01
        path.write_bytes(bytes(data))
        message = "checksum mismatch"
    elif damage == "edit_config":
        path = slot_dir / "adapter_config.json"
        path.write_text(path.read_text().replace('"r": 4', '"r": 5'))
        message = "checksum mismatch"
    elif damage == "delete_file":
        (slot_dir / "adapter_config.json").unlink()
        message = "missing"
    elif damage == "garble_manifest":
        manifest.write_text(manifest.read_text()[:-20])
        message = "unreadable manifest"
    elif damage == "future_version":
        manifest.write_text(manifest.read_text().replace('"version":2}', '"version":99}'))
        message = "format version 99"
    else:
        manifest.unlink()
        message = "no store here"
    before = _files(tmp_path / "s")
    with pytest.raises(StoreError, match=message):
        kf.OnlineMerger.open(tmp_path / "s")
    assert _files(tmp_path / "s") == before  # nothing repaired


def test_bad_add_leaves_store_untouched(tmp_path):
    adapters = family_adapters(3)
    with kf.OnlineMerger(2, store=tmp_path / "s", mode="faithful") as m:    # faithful: other ranks are refused
        m.add(adapters[0], "t0")
        before = _files(tmp_path / "s")
        nan = family_adapters(1)[0]
        next(iter(nan.modules.values())).A[0, 0] = float("inf")
        for lora, task in ((nan, "t1"), (adapters[1], "t0"), (family_adapters(1, rank=2)[0], "t1")):
            with pytest.raises(ValueError):
                m.add(lora, task)
        assert _files(tmp_path / "s") == before


def test_failed_commit_changes_nothing(tmp_path, monkeypatch):
    adapters = family_adapters(3)
    with kf.OnlineMerger(1, store=tmp_path / "s") as m:
        m.add(adapters[0], "t0")
        before = _files(tmp_path / "s")
        members = [list(x) for x in m.members]

        def disk_full(self, path, atomic=True):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(kf.LoRA, "save", disk_full)
        with pytest.raises(OSError, match="No space"):
            m.add(adapters[1], "t1")
        monkeypatch.undo()
        assert m.members == members and len(m.history) == 1
        assert _files(tmp_path / "s") == before
        m.add(adapters[1], "t1")  # and it still works
    with kf.OnlineMerger.open(tmp_path / "s") as again:
        assert again.members == [["t0", "t1"]]


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import kmerge_fast as kf
    store, folder, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    m = kf.OnlineMerger.open(store) if (store / "manifest.json").exists() else kf.OnlineMerger(3, store=store)
    done = {t for tasks in m.members for t in tasks}
    print("ready", flush=True)
    for k in range(n):
        if f"t{k}" not in done:
            m.add(kf.LoRA.load(folder / f"t{k}"), f"t{k}")
            print(k, flush=True)
    m.close()
""")


def test_sigkill_leaves_a_prefix_state(tmp_path):
    """Kill a writer at random moments; every reopened store equals the state after some prefix of the adds.

    Each kill comes a random 1-4 completed adds into a run (the child reports them), plus a random
    fraction of one add's duration: the moments do not depend on how fast this machine's disk is."""
    n = 24
    adapters = family_adapters(n)
    for k, lora in enumerate(adapters):
        lora.save(tmp_path / f"t{k}")
    # the expected state after every prefix, from an in-memory run on the same (reloaded) adapters
    expected = []
    memory = kf.OnlineMerger(3)
    for k in range(n):
        memory.add(kf.LoRA.load(tmp_path / f"t{k}"), f"t{k}")
        expected.append(([list(x) for x in memory.members], [s for s in memory.slots]))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    store = tmp_path / "store"
    rng = random.Random(0)
    seen, kills = set(), 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt in range(40):
        child = subprocess.Popen([sys.executable, str(script), str(store), str(tmp_path), str(n)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert child.stdout.readline().strip() == b"ready", child.stderr.read().decode()
        step, last = 0.02, None  # seconds per add, measured from the child's reports
        for _ in range(rng.randrange(1, 5)):
            if not child.stdout.readline():  # the child finished (or died)
                break
            now = time.perf_counter()
            step, last = (now - last if last is not None else step), now
        time.sleep(rng.uniform(0.0, step))  # somewhere inside the next add
        child.send_signal(signal.SIGKILL)
        child.wait()
        kills += child.returncode == -signal.SIGKILL
        with kf.OnlineMerger.open(store) as m:
            count = sum(len(x) for x in m.members)
            seen.add(count)
            if count:
                members, slots = expected[count - 1]
                assert m.members == members
                for got, want in zip(m.slots, slots):
                    for name in want.modules:
                        torch.testing.assert_close(got.modules[name].A, want.modules[name].A, rtol=1e-6, atol=1e-7)
                        torch.testing.assert_close(got.modules[name].B, want.modules[name].B, rtol=1e-6, atol=1e-7)
            if count == n:
                break
    assert kills >= 3 and len(seen) >= 3, (kills, seen)
