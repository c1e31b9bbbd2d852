"""Tampering with a store: every manifest field (wrong types, out of range, paths outside the store, the
manifest's own checksum) and the slot files (before and after the store was opened).

Each edited manifest is refused with a StoreError that names the manifest and the field (never a
KeyError or TypeError), by writers and readers alike, and nothing is repaired. Edits are tested
twice where it matters: as they are (the manifest's checksum catches them) and re-signed with a
correct checksum (the schema check must then catch them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast.store import StoreError, manifest_checksum
from conftest import family_adapters


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make(root: Path, n: int = 4, **kwargs) -> None:
    with kf.OnlineMerger(2, store=root, **kwargs) as m:
        for k, lora in enumerate(family_adapters(n)):
            m.add(lora, f"t{k}")
        m.add(family_adapters(n, seed=1)[0], "t0", replace=True) if m.members[0] == ["t0"] else None


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("tamper")
    _make(base / "kmerge", n=3)
    _make(base / "opcm", n=3, strategy="opcm")
    _make(base / "oracle", n=3, strategy="oracle", oracle=lambda t: int(t[1:]) % 2)
    _make(base / "iso", n=3, mode="iso")
    _make(base / "isonorm", n=3, mode="isonorm")
    _make(base / "isogeo", n=3, mode="isogeo")
    _make(base / "isoswitch", n=3, mode="isoswitch")
    return base


def _edit(root: Path, change, resign: bool) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if resign and isinstance(manifest, dict):
        manifest["checksum"] = manifest_checksum(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def _set(path: str, value):
    """A change that sets manifest[...path...] = value; path like 'slots/0/dir' (_DELETE deletes)."""
    def change(m):
        *keys, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        for k in keys:
            m = m[k]
        if value is _DELETE:
            del m[last]
        else:
            m[last] = value
    return change


_DELETE = object()

# (id, change, field named in the message); all re-signed
SCHEMA_CASES = [
    ("unknown_top_field", _set("comment", "hi"), r"comment: unknown field"),
    ("no_history", _set("history", _DELETE), r"history: missing"),
    ("no_obsolete", _set("obsolete", _DELETE), r"obsolete: missing"),
    ("generation_negative", _set("generation", -1), r"generation: expected an int in \[1, "),
    ("generation_string", _set("generation", "7"), r"generation: expected"),
    ("generation_bool", _set("generation", True), r"generation: expected"),
    ("generation_before_its_folders", _set("generation", 1), r"slots\[0\]\.dir: .* after the manifest's 1"),
    ("settings_list", _set("settings", []), r"settings: expected an object"),
    ("settings_no_budget", _set("settings/budget", _DELETE), r"settings\.budget: missing"),
    ("settings_unknown", _set("settings/color", "red"), r"settings\.color: unknown field"),
    ("budget_negative", _set("settings/budget", -1), r"settings\.budget: expected an int >= 1"),
    ("budget_string", _set("settings/budget", "2"), r"settings\.budget: expected"),
    ("budget_float", _set("settings/budget", 2.0), r"settings\.budget: expected"),
    ("budget_below_slots", _set("settings/budget", 1), r"slots: 2 slots, more than the budget of 1"),
    ("strategy_unknown", _set("settings/strategy", "nope"), r"settings\.strategy: unknown 'nope'"),
    ("strategy_number", _set("settings/strategy", 3), r"settings\.strategy: expected a string"),
    ("mode_unknown", _set("settings/mode", "median"), r"settings\.mode: unknown 'median'"),
    ("similarity_unknown", _set("settings/similarity", "dot"), r"settings\.similarity: unknown 'dot'"),
    ("threshold_word", _set("settings/threshold", "high"), r"settings\.threshold: expected"),
    ("threshold_for_kmerge", _set("settings/threshold", 0.3), r"settings\.threshold: only kmerge\+\+"),
    ("seed_float", _set("settings/seed", 1.5), r"settings\.seed: expected"),
    ("density_above_1", _set("settings/density", 2), r"settings\.density: expected a number in \(0, 1\]"),
    ("density_string", _set("settings/density", "0.5"), r"settings\.density: expected"),
    ("isonorm_up_to_zero", _set("settings/isonorm_up_to", 0), r"settings\.isonorm_up_to: expected an int >= 1"),
    ("isonorm_up_to_float", _set("settings/isonorm_up_to", 10.0), r"settings\.isonorm_up_to: expected an int"),
    ("isonorm_up_to_bool", _set("settings/isonorm_up_to", True), r"settings\.isonorm_up_to: expected an int"),
    ("isonorm_up_to_other_mode", _set("settings/mode", "isonorm"), r"settings\.isonorm_up_to: only mode 'isoswitch'"),
    ("slots_object", _set("slots", {}), r"slots: expected a list"),
    ("slot_string", _set("slots/0", "s000-g000001"), r"slots\[0\]: expected an object"),
    ("slot_no_rank", _set("slots/0/rank", _DELETE), r"slots\[0\]\.rank: missing"),
    ("slot_unknown", _set("slots/0/owner", "me"), r"slots\[0\]\.owner: unknown field"),
    ("dir_outside", _set("slots/1/dir", "../../elsewhere"), r"slots\[1\]\.dir: '\.\./\.\./elsewhere' is not a slot"),
    ("dir_absolute", _set("slots/1/dir", "/etc"), r"slots\[1\]\.dir: '/etc' is not a slot folder"),
    ("dir_dotdot_tail", _set("slots/1/dir", "s001-g000002/.."), r"slots\[1\]\.dir: .* is not a slot folder"),
    ("dir_users_folder", _set("slots/1/dir", "my_adapter"), r"slots\[1\]\.dir: 'my_adapter' is not a slot"),
    ("dir_number", _set("slots/1/dir", 7), r"slots\[1\]\.dir: 7 is not a slot folder"),
    ("dir_unicode_digits", _set("slots/1/dir", "s\u0661\u0660\u0660-g000002"), r"slots\[1\]\.dir: .* is not a slot"),
    ("dir_of_other_slot", lambda m: m["slots"][1].update(dir=m["slots"][0]["dir"]), r"slots\[1\]\.dir: .* of slot 0"),
    ("files_empty", _set("slots/0/files", {}), r"slots\[0\]\.files: expected a SHA-256 for exactly"),
    ("files_list", _set("slots/0/files", []), r"slots\[0\]\.files: expected"),
    ("files_no_weights", _set("slots/0/files/adapter_model.safetensors", _DELETE), r"slots\[0\]\.files: expected"),
    ("files_extra", _set("slots/0/files/run.py", "0" * 64), r"slots\[0\]\.files: expected"),
    ("digest_short", _set("slots/0/files/adapter_config.json", "abc"),
     r"slots\[0\]\.files\['adapter_config\.json'\]: expected a SHA-256"),
    ("digest_null", _set("slots/0/files/adapter_config.json", None), r"slots\[0\]\.files\['adapter_config\.json'\]"),
    ("tasks_empty", _set("slots/0/tasks", []), r"slots\[0\]\.tasks: expected a non-empty list"),
    ("tasks_string", _set("slots/0/tasks", "t0"), r"slots\[0\]\.tasks: expected"),
    ("task_number", _set("slots/0/tasks/0", 5), r"slots\[0\]\.tasks\[0\]: expected a non-empty string"),
    ("task_in_two_slots", lambda m: m["slots"][1]["tasks"].append(m["slots"][0]["tasks"][0]),
     r"slots\[1\]\.tasks\[\d\]: task 't0' is also stored in slots\[0\]"),
    ("rank_zero", _set("slots/0/rank", 0), r"slots\[0\]\.rank: expected an int >= 1"),
    ("rank_string", _set("slots/0/rank", "4"), r"slots\[0\]\.rank: expected"),
    ("extra_list", _set("slots/0/extra", []), r"slots\[0\]\.extra: expected an object"),
    ("extra_unknown", _set("slots/0/extra/hook", "x"), r"slots\[0\]\.extra\.hook: unknown field"),
    ("extra_group_not_oracle", _set("slots/0/extra/group", 1), r"slots\[0\]\.extra\.group: held by"),
    ("extra_opcm_not_opcm", _set("slots/0/extra/opcm", {}), r"slots\[0\]\.extra\.opcm: only the 'opcm'"),
    ("obsolete_string", _set("obsolete", "s000-g000001"), r"obsolete: expected a list"),
    ("obsolete_outside", _set("obsolete", ["../../home"]), r"obsolete\[0\]: '\.\./\.\./home' is not a slot"),
    ("obsolete_users_folder", _set("obsolete", ["my_adapter"]), r"obsolete\[0\]: 'my_adapter' is not a slot"),
    ("obsolete_live", lambda m: m.update(obsolete=[m["slots"][0]["dir"]]), r"obsolete\[0\]: .* is the live folder"),
    ("history_object", _set("history", {}), r"history: expected a list"),
    ("step_number", _set("history/0", 1), r"history\[0\]: expected an object"),
    ("step_dropped", lambda m: m["history"].pop(0), r"history: no 'new' or 'merge' step adds"),
    ("step_unknown", _set("history/0/note", "x"), r"history\[0\]\.note: unknown field"),
    ("step_no_seconds", _set("history/0/seconds", _DELETE), r"history\[0\]\.seconds: missing"),
    ("step_action", _set("history/1/action", "delete"), r"history\[1\]\.action: 'delete' is not one of"),
    ("step_slot", _set("history/0/slot", 1), r"history\[0\]\.slot: 1, but task 't0' is in slot 0"),
    ("step_slot_string", _set("history/0/slot", "0"), r"history\[0\]\.slot"),
    ("step_task", _set("history/0/task", "ghost"), r"history\[0\]\.task: 'ghost' is not a stored task"),
    ("step_similarities", _set("history/1/similarities", "high"), r"history\[1\]\.similarities: expected a list"),
    ("step_similarity_bool", _set("history/1/similarities", [True]), r"history\[1\]\.similarities"),
    ("step_seconds_negative", _set("history/0/seconds", -1), r"history\[0\]\.seconds: expected a finite number"),
    ("generation_huge", _set("generation", 10**30), r"generation: expected an int in"),
    ("threshold_huge_int", _set("settings/threshold", 10**400), r"settings\.threshold: expected"),
    ("density_huge_int", _set("settings/density", 10**400), r"settings\.density: expected"),
    ("step_seconds_huge_int", _set("history/0/seconds", 10**400), r"history\[0\]\.seconds: expected a finite"),
    ("step_added_twice", lambda m: m["history"].append(dict(m["history"][0], action="merge")),
     r"history\[\d\]\.task: task 't0' was added twice"),
]


def _refused_everywhere(root: Path, message: str) -> None:
    """Writers and readers refuse with a StoreError naming manifest.json and matching ``message``;
    nothing changes on disk."""
    before = _files(root)
    for open_ in (lambda: kf.OnlineMerger.open(root), lambda: kf.OnlineMerger.open(root, readonly=True)):
        with pytest.raises(StoreError, match=message) as info:
            open_()
        assert "manifest.json" in str(info.value)
    assert _files(root) == before


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_manifest_schema(stores, tmp_path, case):
    _, change, message = case
    root = tmp_path / "s"
    shutil.copytree(stores / "kmerge", root)
    _edit(root, change, resign=False)  # as edited: the checksum no longer matches
    _refused_everywhere(root, r"checksum" if "checksum" not in message else message)
    shutil.rmtree(root)
    shutil.copytree(stores / "kmerge", root)
    _edit(root, change, resign=True)  # and with a correct checksum: the schema catches it
    _refused_everywhere(root, message)
    # the structural checks hold without the merger's settings check too
    if not message.startswith(r"settings\.") or "expected" in message or "missing" in message:
        with pytest.raises(StoreError, match=message):
            kf.store.Store.open(root, readonly=True)


@pytest.mark.parametrize("case", [
    ("members_moved", lambda m: m["slots"][0]["tasks"].append(m["slots"][1]["tasks"].pop())),
    ("budget_changed", _set("settings/budget", 8)),
    ("strategy_changed", _set("settings/strategy", "random")),
    ("digest_replaced", _set("slots/0/files/adapter_config.json", "0" * 64)),
    ("history_changed", _set("history/0/seconds", 0.5)),
], ids=lambda c: c[0])
def test_any_unsigned_edit_is_refused(stores, tmp_path, case):
    root = tmp_path / "s"
    shutil.copytree(stores / "kmerge", root)
    _edit(root, case[1], resign=False)
    _refused_everywhere(root, r"manifest\.json: checksum: does not match the manifest's contents")


@pytest.mark.parametrize("text, message", [
    ("[]", "not a kmerge_fast store manifest"),
    ('{"format": "other"}', "not a kmerge_fast store manifest"),
    ('{"format": "kmerge_fast.store", "version": "2"}', "format version '2'"),
    ('{"format": "kmerge_fast.store", "version": 1}', "format version 1; this kmerge_fast reads 2; its slot folders under slots/ are peft adapters"),
    ('{"format": "kmerge_fast.store", "version": 2}', r"manifest\.json: checksum: missing"),
    ("[" * 100000, "unreadable manifest"),
    ('{"format": "kmerge_fast.store", "version": 2, "checksum": "xyz"}', r"manifest\.json: checksum: expected a SHA"),
    ('{"format": "kmerge_fast.store", "version": 2, "checksum": 5}', r"manifest\.json: checksum: expected a SHA"),
    ('{"format": "kmerge_fast.store", "version": 2, "checksum": "%s"}' % ("0" * 64), r"checksum: does not match"),
    (b"\xff\xfe{", "unreadable manifest"),
])
def test_manifest_that_is_not_one(stores, tmp_path, text, message):
    root = tmp_path / "s"
    shutil.copytree(stores / "kmerge", root)
    path = root / "manifest.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    _refused_everywhere(root, message)


def _merged_extra(manifest: dict) -> dict:
    """The ``extra`` of the first slot holding two tasks or more."""
    return next(slot["extra"] for slot in manifest["slots"] if len(slot["tasks"]) > 1)


def _first_values(manifest: dict) -> list:
    """The iso spectrum of the first module of the first merged slot."""
    return next(iter(_merged_extra(manifest)["spectrum"].values()))


def _opcm_module(manifest: dict) -> dict:
    """The OPCM state of the first module of the first merged slot."""
    state = next(slot["extra"]["opcm"] for slot in manifest["slots"] if "opcm" in slot["extra"])
    return next(iter(state.values()))


@pytest.mark.parametrize("store, change, message", [
    ("opcm", lambda m: _opcm_module(m).update({"lambda": -1.0}),
     r"slots\[\d\]\.extra\.opcm\[.*\]\.lambda: expected a finite number > 0"),
    ("opcm", lambda m: _opcm_module(m).update({"count": 0}),
     r"slots\[\d\]\.extra\.opcm\[.*\]\.count: expected an int >= 1"),
    ("opcm", lambda m: _opcm_module(m).pop("norm_sum"),
     r"slots\[\d\]\.extra\.opcm\[.*\]: expected an object of"),
    ("iso", lambda m: _merged_extra(m).pop("spectrum"), r"slots\[\d\]\.extra\.spectrum: held by the slots of two"),
    ("iso", lambda m: _merged_extra(m).update(spectrum=[]), r"slots\[\d\]\.extra\.spectrum: expected a non-empty"),
    ("iso", lambda m: _first_values(m).append(1.0), r"slots\[\d\]\.extra\.spectrum\[.*\]: expected 4 finite"),
    ("iso", lambda m: _first_values(m).__setitem__(0, -1.0), r"extra\.spectrum\[.*\]: expected 4 finite numbers >= 0"),
    ("kmerge", lambda m: m["slots"][0]["extra"].update(spectrum={"x": [1.0]}),
     r"slots\[0\]\.extra\.spectrum: held by the slots of two tasks or more in modes 'iso', 'isonorm', "
     r"'isogeo' and 'isoswitch'"),
    ("isonorm", lambda m: _merged_extra(m).pop("norms"), r"slots\[\d\]\.extra\.norms: held by the slots of two"),
    ("iso", lambda m: _merged_extra(m).update(norms={}), r"slots\[\d\]\.extra\.norms: held by the slots of two"),
    ("isonorm", lambda m: _merged_extra(m).update(norms={"x": 1.0}),
     r"slots\[\d\]\.extra\.norms: expected an object with the modules of \.spectrum"),
    ("isonorm", lambda m: _merged_extra(m)["norms"].update({next(iter(_merged_extra(m)["norms"])): float("nan")}),
     r"slots\[\d\]\.extra\.norms\[.*\]: expected a finite number >= 0"),
    ("isonorm", lambda m: _merged_extra(m).pop("spectrum"), r"slots\[\d\]\.extra\.spectrum: held by the slots"),
    ("isogeo", lambda m: _merged_extra(m).pop("norms"), r"slots\[\d\]\.extra\.norms: held by the slots of two"),
    ("isogeo", lambda m: _merged_extra(m)["norms"].update({next(iter(_merged_extra(m)["norms"])): -1.0}),
     r"slots\[\d\]\.extra\.norms\[.*\]: expected a finite number >= 0"),
    ("isoswitch", lambda m: _merged_extra(m).pop("norms"), r"slots\[\d\]\.extra\.norms: held by the slots of two"),
    ("isoswitch", lambda m: _merged_extra(m).pop("spectrum"), r"slots\[\d\]\.extra\.spectrum: held by the slots"),
    ("oracle", lambda m: m["slots"][0]["extra"].pop("group"), r"slots\[0\]\.extra\.group: held by"),
    ("oracle", lambda m: m["slots"][0]["extra"].update(group=[1]), r"slots\[0\]\.extra\.group: expected a JSON scalar"),
])
def test_strategy_state_schema(stores, tmp_path, store, change, message):
    root = tmp_path / "s"
    shutil.copytree(stores / store, root)
    _edit(root, change, resign=True)
    before = _files(root)
    with pytest.raises(StoreError, match=message):
        kf.OnlineMerger.open(root, oracle=(lambda t: 0) if store == "oracle" else None)
    assert _files(root) == before


def test_state_mode_lists_match_the_combiners():
    """store's torch-free copies of which modes keep a spectrum / norms equal the combiners' own keys."""
    from kmerge_fast import store, strategies

    for key, modes in (("spectrum", store.SPECTRUM_MODES), ("norms", store.NORMS_MODES)):
        assert modes == tuple(m for m in strategies.MODES if key in strategies.COMBINERS[m].keys)


def test_stored_rank_must_match_the_slot_file(stores, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(stores / "kmerge", root)
    _edit(root, _set("slots/0/rank", 5), resign=True)
    with pytest.raises(StoreError, match=r"slots/s000-g\d+: rank 4, but .* slots\[0\]\.rank says 5"):
        kf.OnlineMerger.open(root)


def test_a_dir_outside_the_store_is_never_read(stores, tmp_path):
    """The old manifest pointed a slot at ../../elsewhere and loaded it; even re-signed, nothing outside
    the store is opened (the folder name is refused before any file is read)."""
    root = tmp_path / "a" / "b" / "s"
    shutil.copytree(stores / "kmerge", root)
    elsewhere = tmp_path / "a" / "elsewhere"
    shutil.copytree(next((root / "slots").iterdir()), elsewhere)
    _edit(root, _set("slots/1/dir", "../../elsewhere"), resign=True)
    with pytest.raises(StoreError, match=r"slots\[1\]\.dir"):
        kf.OnlineMerger.open(root)


# ------------------------------------------------------------------- slot files
@pytest.mark.parametrize("which", ["merged", "other"])
@pytest.mark.parametrize("how", ["flip_in_place", "replace_by_rename", "append", "delete", "config_edit"])
def test_slot_file_edited_after_open_is_never_committed(stores, tmp_path, which, how):
    """A slot file changed after OnlineMerger.open verified it: the next add fails with a StoreError naming
    the file, neither merging the edited bytes nor writing anything; memory keeps the verified slots."""
    root = tmp_path / "s"
    shutil.copytree(stores / "kmerge", root)
    newcomer = family_adapters(4)[3]  # t3's adapter: kmerge merges it into slot 0, the family of t0
    with kf.OnlineMerger.open(root, readonly=True) as probe:
        target = probe._choose("t3", probe._similarities(newcomer), newcomer)
    with kf.OnlineMerger.open(root) as m:
        slot = target if which == "merged" else 1 - target
        name = "adapter_config.json" if how == "config_edit" else "adapter_model.safetensors"
        path = m._store.slot_dir(slot) / name
        memory = [{n: mod.A.clone() for n, mod in s.modules.items()} for s in m.slots]
        data = bytearray(path.read_bytes())
        if how == "flip_in_place":
            data[-5] ^= 0x40
            with open(path, "r+b") as f:  # same inode, same size
                f.seek(len(data) - 5)
                f.write(data[-5:-4])
        elif how == "replace_by_rename":
            data[-5] ^= 0x40
            tmp = path.with_name("x.tmp")
            tmp.write_bytes(bytes(data))
            os.replace(tmp, path)
        elif how == "append":  # (truncation: see test_slot_files_changed_after_open_do_not_reach_memory)
            with open(path, "ab") as f:
                f.write(b"\0" * 64)
        elif how == "delete":
            path.unlink()
        else:
            path.write_text(path.read_text().replace('"r": 4', '"r": 5'))
        before = _files(root)
        with pytest.raises(StoreError, match=rf"{path}: (checksum mismatch|missing)"):
            m.add(newcomer, "t3")
        assert _files(root) == before
        assert sum(len(x) for x in m.members) == 3
        for mem, s in zip(memory, m.slots):
            assert all(torch.equal(mem[n], mod.A) for n, mod in s.modules.items())


def test_slot_file_touched_after_open_is_accepted(stores, tmp_path):
    """A file rewritten with the same bytes (new mtime) is re-hashed, found genuine, and the add proceeds."""
    root = tmp_path / "s"
    shutil.copytree(stores / "kmerge", root)
    with kf.OnlineMerger.open(root) as m:
        path = m._store.slot_dir(0) / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes())
        m.add(family_adapters(4)[3], "t3")
    with kf.OnlineMerger.open(root) as m:
        assert sum(len(x) for x in m.members) == 4


CHILD = textwrap.dedent("""
    import os, sys
    import torch
    import kmerge_fast as kf
    m = kf.OnlineMerger.open(sys.argv[1], readonly=sys.argv[2] == "reader")
    before = [[(mod.A.clone(), mod.B.clone()) for mod in s.modules.values()] for s in m.slots]
    for i in range(len(m.slots)):
        path = m._store.slot_dir(i) / "adapter_model.safetensors"
        size = path.stat().st_size
        os.truncate(path, 0)               # a memory map of it would now SIGBUS on access
        with open(path, "r+b") as f:
            f.write(os.urandom(size))      # and then hold other values
    sims = m._similarities(m.slots[0])
    for old, s in zip(before, m.slots):
        for (a, b), mod in zip(old, s.modules.values()):
            assert torch.equal(a, mod.A) and torch.equal(b, mod.B)
    print("ok", sims[0])
""")


@pytest.mark.parametrize("mode", ["writer", "reader"])
def test_slot_files_changed_after_open_do_not_reach_memory(stores, tmp_path, mode):
    """The slots in memory are private copies: truncating and rewriting their files afterwards neither
    crashes the process (SIGBUS) nor changes a tensor (a subprocess, so a crash cannot take pytest down)."""
    root = tmp_path / "s"
    shutil.copytree(stores / "kmerge", root)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, str(script), str(root), mode], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok"), (run.returncode, run.stderr[-2000:])
