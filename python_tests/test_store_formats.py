"""A store that writes its slots in several formats (peft, llama.cpp's GGUF, MLX-LM's folder) in one commit.

The base model is a tiny GGUF written by helpers.gguf_base (its q/v tensors have the shapes of
conftest's family adapters).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast import store as S
from kmerge_fast.errors import AdapterError
from kmerge_fast.store import StoreError
from conftest import family_adapters

pytest.importorskip("gguf")
from helpers.gguf_base import CONFIG, write_base  # noqa: E402
from kmerge_fast.formats.gguf import gguf_metadata  # noqa: E402

ALL = ("peft", "gguf", "mlx")
FILES = ["adapter.gguf", "adapter_config.json", "adapter_model.safetensors", "mlx/adapter_config.json",
         "mlx/adapters.safetensors"]


@pytest.fixture
def base(tmp_path):
    return write_base(tmp_path / "base.gguf")


@pytest.fixture
def adapters():
    return family_adapters(6)


def make_store(root, base, adapters, n=4, formats=ALL, **kw) -> kf.OnlineMerger:
    m = kf.OnlineMerger(2, store=root, formats=formats, base=base if "gguf" in formats else None, **kw)
    for k in range(n):
        m.add(adapters[k], f"t{k}")
    return m


def manifest(root) -> dict:
    return json.loads((root / "manifest.json").read_text())


def rewrite_manifest(root, edit) -> None:
    man = manifest(root)
    edit(man)
    man["checksum"] = S.manifest_checksum(man)
    (root / "manifest.json").write_text(json.dumps(man))


def folders(root) -> set[str]:
    return {p.name for p in (root / "slots").iterdir()}


def test_every_slot_is_written_in_every_format_checksummed_and_loads_back_equal(tmp_path, base, adapters):
    root = tmp_path / "s"
    with make_store(root, base, adapters, n=5) as m:
        slots, members = m.slots, m.members
        assert m.formats == ALL
    man = manifest(root)
    assert man["settings"]["formats"] == list(ALL)
    assert man["settings"]["gguf"] == {"base": base, "dtype": "f32", "architecture": "llama", "head_count": 4,
                                       "head_count_kv": 2, "block_count": 2, "head_dim": None}
    assert folders(root) == {slot["dir"] for slot in man["slots"]}  # the superseded versions are gone, mlx/ too
    for i, slot in enumerate(man["slots"]):
        folder = root / "slots" / slot["dir"]
        assert sorted(slot["files"]) == FILES == sorted(S._listing(folder))
        for name, digest in slot["files"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
        gguf, mlx = kf.LoRA.load(folder / "adapter.gguf"), kf.LoRA.load(folder / "mlx")
        for name, mod in slots[i].modules.items():
            for other in (gguf.modules[name], mlx.modules[name]):  # f32: exact
                assert torch.equal(other.A, mod.A) and torch.equal(other.B, mod.B) and other.scaling == mod.scaling
        assert gguf_metadata(folder / "adapter.gguf")["task_names"] == members[i] == slot["tasks"]
    with kf.OnlineMerger.open(root) as again:  # resumes with its formats, and keeps writing them
        assert again.formats == ALL and again.settings["gguf"]["base"] == base
        again.add(adapters[5], "t5")
        assert sorted(again._store.manifest["slots"][again.slot_for("t5")]["files"]) == FILES


def test_a_store_of_peft_alone_writes_what_it_wrote_before(tmp_path, adapters):
    """No formats field, two files per slot: such a store reads as it did, and older versions read it."""
    with make_store(tmp_path / "s", None, adapters, formats=("peft",)) as m:
        assert m.formats == ("peft",)
    man = manifest(tmp_path / "s")
    assert "formats" not in man["settings"] and "gguf" not in man["settings"]
    assert all(sorted(slot["files"]) == sorted(S.SLOT_FILES) for slot in man["slots"])


def test_a_base_given_as_a_config_folder(tmp_path, adapters):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIG))
    with make_store(tmp_path / "s", str(tmp_path / "model"), adapters, n=3, formats=("peft", "gguf"),
                    gguf_dtype="f16") as m:
        folder = m._store.slot_dir(0)
        assert sorted(p.name for p in folder.iterdir()) == ["adapter.gguf", "adapter_config.json",
                                                              "adapter_model.safetensors"]
        gguf = kf.LoRA.load(folder / "adapter.gguf")
        assert gguf.dtype == torch.float16
        for name, mod in m.slots[0].modules.items():
            torch.testing.assert_close(gguf.modules[name].B.float(), mod.B, rtol=1e-3, atol=1e-3)
    assert manifest(tmp_path / "s")["settings"]["gguf"]["head_dim"] == 8


@pytest.mark.parametrize("name", ["adapter.gguf", "mlx/adapters.safetensors", "mlx/adapter_config.json"])
def test_a_tampered_or_missing_format_file_fails_open_naming_it(tmp_path, base, adapters, name):
    root = tmp_path / "s"
    make_store(root, base, adapters, n=3).close()
    path = root / "slots" / manifest(root)["slots"][1]["dir"] / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    for readonly in (False, True):
        with pytest.raises(StoreError, match=f"{name}: checksum mismatch"):
            kf.OnlineMerger.open(root, readonly=readonly)
    with pytest.raises(StoreError, match=f"{name}: checksum mismatch"):
        S.Store.open(root, readonly=True)  # inspect's check
    path.unlink()
    with pytest.raises(StoreError, match=f"{name}: missing"):
        kf.OnlineMerger.open(root)


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.update(formats=["gguf", "peft"]), "settings.formats"),
    (lambda s: s.update(formats=["peft", "mlx", "mlx"]), "settings.formats"),
    (lambda s: s.update(formats=["peft", "onnx"]), "settings.formats"),
    (lambda s: s.pop("gguf"), "settings.gguf"),
    (lambda s: s["gguf"].update(base="relative/base.gguf"), "settings.gguf.base"),
    (lambda s: s["gguf"].update(dtype="q4_0"), "settings.gguf.dtype"),
    (lambda s: s["gguf"].update(head_count=0), "settings.gguf.head_count"),
    (lambda s: s["gguf"].pop("architecture"), "settings.gguf.architecture"),
    (lambda s: s["gguf"].update(extra=1), "settings.gguf.extra"),
    (lambda s: s.update(formats=["peft", "mlx"]), "settings.gguf"),
])
def test_the_manifest_schema_checks_the_formats(tmp_path, base, adapters, edit, field):
    root = tmp_path / "s"
    make_store(root, base, adapters, n=2).close()
    rewrite_manifest(root, lambda man: edit(man["settings"]))
    with pytest.raises(StoreError, match=f"manifest.json: {field}"):
        kf.OnlineMerger.open(root, readonly=True)


def test_a_slot_must_list_exactly_the_files_of_the_formats(tmp_path, base, adapters):
    root = tmp_path / "s"
    make_store(root, base, adapters, n=2).close()
    rewrite_manifest(root, lambda man: man["slots"][0]["files"].pop("adapter.gguf"))
    with pytest.raises(StoreError, match=r"slots\[0\].files: expected a SHA-256 for exactly .*adapter.gguf"):
        kf.OnlineMerger.open(root, readonly=True)


def test_crashed_commit_leftovers_go_only_if_they_hold_the_formats_files(tmp_path, base, adapters):
    root = tmp_path / "s"
    make_store(root, base, adapters, n=3).close()
    live = root / "slots" / manifest(root)["slots"][0]["dir"]
    mine = {"s000-g000090": [], "s000-g000091": [".adapter.gguf.0a1b2c3d.tmp", "mlx/.adapters.safetensors.deadbeef.tmp"],
            "s000-g000092": ["notes.txt"], "s000-g000093": ["mlx/notes.txt"], "s000-g000094": [".notes.0a1b2c3d.tmp"]}
    for name, extra in mine.items():
        shutil.copytree(live, root / "slots" / name)
        for rel in extra:
            (root / "slots" / name / rel).write_text("x")
    (root / "slots" / "s000-g000095" / "mlx").mkdir(parents=True)  # a crash right after save_mlx's mkdir
    with kf.OnlineMerger.open(root) as m:
        m._store.wait()
    left = folders(root) - {slot["dir"] for slot in manifest(root)["slots"]}
    assert left == {"s000-g000092", "s000-g000093", "s000-g000094"}  # what holds anything else stays, intact
    assert (root / "slots" / "s000-g000093" / "mlx" / "notes.txt").exists()
    assert sorted(S._listing(root / "slots" / "s000-g000092")) == sorted(FILES + ["notes.txt"])
    # a store of peft alone does not take another format's files for its own
    peft = tmp_path / "p"
    make_store(peft, None, adapters, n=1, formats=("peft",)).close()
    shutil.copytree(live, peft / "slots" / "s000-g000090")
    kf.OnlineMerger.open(peft).close()
    assert "s000-g000090" in folders(peft)


def test_an_obsolete_folder_with_foreign_files_keeps_them(tmp_path, base, adapters):
    root = tmp_path / "s"
    m = make_store(root, base, adapters, n=2)
    old = m._store.slot_dir(0)
    (old / "mlx" / "mine.txt").write_text("mine")
    m.add(adapters[2], "t0", replace=True)  # slot 0 gets a new folder; the old one is obsolete
    m.close()
    assert old.name not in {slot["dir"] for slot in manifest(root)["slots"]}
    assert S._listing(old) == ["mlx/mine.txt"]  # only the store's own files went
    assert old.name in manifest(root)["obsolete"]  # still listed: a later commit tries again


def test_a_module_a_format_cannot_hold_is_refused_before_any_work(tmp_path, base, adapters):
    root = tmp_path / "s"
    m = make_store(root, base, adapters, n=2)
    before, names = (root / "manifest.json").read_bytes(), folders(root)
    members = [list(x) for x in m.members]
    head = dict(adapters[2].modules)
    bad = kf.LoRA.from_factors({**{n: (mod.A, mod.B) for n, mod in head.items()},
                                "lm_head": (torch.ones(4, 32), torch.ones(16, 4))})
    with pytest.raises(ValueError, match="does not match the stored base model"):  # the store's own check first
        m.add(bad, "t_bad")
    with pytest.raises(ValueError, match="holds a comma"):
        m.add(adapters[2], "t,2")
    assert (root / "manifest.json").read_bytes() == before and folders(root) == names and m.members == members
    m.close()
    # the first add of a new store: the base GGUF has no lm_head tensor
    fresh = kf.OnlineMerger(2, store=tmp_path / "f", formats=("peft", "gguf"), base=base)
    with pytest.raises(AdapterError, match="llama.cpp cannot place these modules: 'lm_head'"):
        fresh.add(bad, "t_bad")
    small = write_base(tmp_path / "small.gguf", shapes={"self_attn.q_proj": (32, 32), "self_attn.v_proj": (8, 32)})
    other = kf.OnlineMerger(2, store=tmp_path / "o", formats=("peft", "gguf"), base=small)
    with pytest.raises(AdapterError, match="v_proj.*the base tensor 'blk.0.attn_v.weight' is 8 x 32"):
        other.add(adapters[0], "t0")
    mlx = kf.OnlineMerger(2, store=tmp_path / "m", formats=("peft", "mlx"))
    with pytest.raises(AdapterError, match="MLX-LM adapters hold only modules inside decoder layers"):
        mlx.add(kf.LoRA.from_factors({"lm_head": (torch.ones(4, 32), torch.ones(16, 4))}), "t")
    for merger, folder in ((fresh, "f"), (other, "o"), (mlx, "m")):
        assert merger.slots == [] and not any((tmp_path / folder / "slots").iterdir())
        merger.close()


def test_a_failed_format_write_leaves_the_previous_state(tmp_path, base, adapters, monkeypatch):
    from kmerge_fast.formats import gguf, mlx

    root = tmp_path / "s"
    m = make_store(root, base, adapters, n=3)
    before, members = (root / "manifest.json").read_bytes(), [list(x) for x in m.members]
    slots = [{n: mod.B.clone() for n, mod in s.modules.items()} for s in m.slots]
    for owner, attr in ((gguf, "save_gguf"), (mlx, "save_mlx")):
        with monkeypatch.context() as mp:
            mp.setattr(owner, attr, lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
            with pytest.raises(OSError, match="No space"):
                m.add(adapters[3], "t3")
        assert (root / "manifest.json").read_bytes() == before and m.members == members
        assert all(torch.equal(s.modules[n].B, b[n]) for s, b in zip(m.slots, slots) for n in b)
    m.add(adapters[3], "t3")  # works, and the failed commits' folders go
    m.close()
    assert folders(root) == {slot["dir"] for slot in manifest(root)["slots"]}
    with kf.OnlineMerger.open(root, readonly=True) as again:
        assert sum(map(len, again.members)) == 4


def test_a_changed_or_missing_base_stops_a_writer_not_a_reader(tmp_path, base, adapters):
    root = tmp_path / "s"
    make_store(root, base, adapters, n=2).close()
    before = (root / "manifest.json").read_bytes()
    write_base(base, n_head=8, n_kv=4)  # another model at the same path
    with kf.OnlineMerger.open(root) as m:
        with pytest.raises(StoreError, match=r"not the one the store was created with: head_count 8 \(was 4\)"):
            m.add(adapters[2], "t2")
    os.unlink(base)
    with kf.OnlineMerger.open(root) as m:
        with pytest.raises(AdapterError, match="base model file not found"):
            m.add(adapters[2], "t2")
    with kf.OnlineMerger.open(root, readonly=True) as reader:  # readers never need the base
        assert sum(map(len, reader.members)) == 2
        reader.export(0, tmp_path / "peft")
    assert (root / "manifest.json").read_bytes() == before


def test_a_reader_beside_a_writer_of_formats(tmp_path, base, adapters):
    root = tmp_path / "s"
    with make_store(root, base, adapters, n=3) as writer:
        with kf.OnlineMerger.open(root, readonly=True) as reader:
            assert reader.formats == ALL and reader.members == writer.members
            writer.add(adapters[3], "t3")
            writer._store.wait()  # the reader's folders are gone: it re-reads the manifest
            assert len(reader._store.load_slots()) == 2 and reader._store.generation == writer._store.generation


def test_export_in_each_format(tmp_path, base, adapters):
    root = tmp_path / "s"
    with make_store(root, base, adapters, n=3) as m:
        m.export(1, tmp_path / "x.gguf", format="gguf")
        m.export(1, tmp_path / "x16.gguf", format="gguf", dtype="f16", task_names=["renamed"])
        m.export(1, tmp_path / "x_mlx", format="mlx")
        for path in (tmp_path / "x.gguf", tmp_path / "x_mlx"):
            got = kf.LoRA.load(path)
            assert all(torch.equal(got.modules[n].B, mod.B) for n, mod in m.slots[1].modules.items())
        assert gguf_metadata(tmp_path / "x.gguf")["task_names"] == m.members[1]
        assert gguf_metadata(tmp_path / "x16.gguf")["task_names"] == ["renamed"]
        assert (tmp_path / "x.gguf").read_bytes() == (m._store.slot_dir(1) / "adapter.gguf").read_bytes()
        with pytest.raises(StoreError, match="exists; refusing to overwrite it"):
            m.export(1, tmp_path / "x.gguf", format="gguf")
        m.export(0, tmp_path / "x.gguf", format="gguf", overwrite=True)
        with pytest.raises(StoreError, match="inside the kmerge_fast store"):
            m.export(0, root / "x.gguf", format="gguf", overwrite=True)
        with pytest.raises(StoreError, match="is a folder"):
            m.export(0, tmp_path / "x_mlx", format="gguf", overwrite=True)
        with pytest.raises(ValueError, match="format: unknown 'onnx'"):
            m.export(0, tmp_path / "y", format="onnx")
    with make_store(tmp_path / "p", None, adapters, n=1, formats=("peft",)) as m:
        with pytest.raises(ValueError, match="base: the gguf format needs the base model.*the store has none"):
            m.export(0, tmp_path / "p.gguf", format="gguf")
        m.export(0, tmp_path / "p.gguf", format="gguf", base=CONFIG)


@pytest.mark.parametrize("kwargs, message", [
    (dict(formats=("peft", "gguf")), "base: the gguf format needs the base model"),
    (dict(formats=("gguf",), base="b.gguf"), "formats: .* lacks 'peft'"),
    (dict(formats=("peft", "onnx")), "formats: unknown 'onnx'"),
    (dict(formats=("peft", "mlx", "mlx")), "formats: 'mlx' is listed twice"),
    (dict(formats=("peft", "mlx"), base="b.gguf"), "base: only the gguf format takes it"),
    (dict(gguf_dtype="f16"), "gguf_dtype: only the gguf format takes it"),
    (dict(formats=("peft", "gguf"), base=CONFIG), "base: a store keeps its base model as a path"),
    (dict(formats=("peft", "gguf"), base="{base}", gguf_dtype="q4"), "gguf_dtype: unknown 'q4'"),
])
def test_the_formats_arguments_are_checked(tmp_path, base, kwargs, message):
    kwargs = {k: v.format(base=base) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        kf.OnlineMerger(2, store=tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="only a store writes slot files"):
        kf.OnlineMerger(2, formats=("peft", "mlx"))
    with pytest.raises(AdapterError, match="base model file not found"):
        kf.OnlineMerger(2, store=tmp_path / "s", formats=("peft", "gguf"), base=tmp_path / "nothing.gguf")


def test_a_writer_refuses_to_commit_over_a_changed_format_file(tmp_path, base, adapters):
    root = tmp_path / "s"
    with make_store(root, base, adapters, n=2) as m:
        path = m._store.slot_dir(0) / "mlx" / "adapter_config.json"
        path.write_text(path.read_text().replace('"lora"', '"dora"'))
        before = (root / "manifest.json").read_bytes()
        with pytest.raises(StoreError, match="mlx/adapter_config.json: checksum mismatch: modified since"):
            m.add(adapters[2], "t2")
        assert (root / "manifest.json").read_bytes() == before and len(m.history) == 2
