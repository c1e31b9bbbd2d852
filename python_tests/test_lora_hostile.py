"""The adapter reader and writer against hostile and careless input (issue 19, items 3 and 12).

A loaded adapter is independent of its files; every malformed config field is
an AdapterError that names the file and the field; no pattern key can hang
the loader; saved files get the umask's permissions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import kmerge_fast as kf
from kmerge_fast import lora as lora_mod
from kmerge_fast.formats import patterns
from conftest import random_lora

SHAPES = {"model.l0.q": (12, 10), "model.l0.v": (12, 10), "model.l1.q": (12, 10)}


def _clone(lora: kf.LoRA) -> kf.LoRA:
    return kf.LoRA({n: lora_mod.LoRAModule(m.A.clone(), m.B.clone(), m.scaling) for n, m in lora.modules.items()},
                   lora.config)


def _assert_same(a: kf.LoRA, b: kf.LoRA) -> None:
    assert a.names == b.names
    for n in a.names:
        assert torch.equal(a.modules[n].A, b.modules[n].A) and torch.equal(a.modules[n].B, b.modules[n].B), n
        assert a.modules[n].scaling == b.modules[n].scaling


@pytest.fixture
def saved(tmp_path):
    random_lora(SHAPES, rank=2, seed=1).save(tmp_path / "ad")
    return tmp_path / "ad"


def _config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _write_config(folder, cfg) -> None:
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


# ------------------------------------------------- item 3: independent of the file
def test_loaded_adapter_survives_rewrite_of_its_file(saved):
    """Rewriting the weights file in place (same inode, same size) changes nothing in a loaded adapter."""
    lora = kf.LoRA.load(saved)
    reference = _clone(lora)
    other = random_lora(SHAPES, rank=2, seed=99)
    other.save(saved.parent / "other")
    new = (saved.parent / "other" / "adapter_model.safetensors").read_bytes()
    weights = saved / "adapter_model.safetensors"
    assert len(new) == weights.stat().st_size
    with open(weights, "r+b") as f:  # in place: same inode, same size, other values
        f.write(new)
    _assert_same(lora, reference)
    torch.testing.assert_close(kf.similarity_matrix([lora, other]), kf.similarity_matrix([reference, other]),
                               rtol=0, atol=0)
    merged, expected = kf.merge([lora, other]), kf.merge([reference, other])
    for n in merged.names:
        torch.testing.assert_close(merged.modules[n].delta(), expected.modules[n].delta(), rtol=0, atol=0)


def test_loaded_adapter_survives_truncation_of_its_file(saved):
    """Truncating the file and then using the tensors must not crash the process (no SIGBUS from a map)."""
    reference = kf.LoRA.load(saved)
    expected = kf.similarity_matrix([reference, reference]).tolist()
    total = sum(float(m.A.double().sum() + m.B.double().sum()) for m in reference.modules.values())
    script = textwrap.dedent(f"""
        import os, torch
        torch.set_num_threads(1)
        import kmerge_fast as kf
        lora = kf.LoRA.load({str(saved)!r})
        os.truncate({str(saved / "adapter_model.safetensors")!r}, 0)
        print(repr(sum(float(m.A.double().sum() + m.B.double().sum()) for m in lora.modules.values())))
        print(kf.similarity_matrix([lora, lora]).tolist())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=saved.parent)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    lines = out.stdout.strip().splitlines()
    assert float(lines[0]) == total
    assert eval(lines[1]) == expected


def test_pickled_adapter_is_independent_of_its_file_and_owns_its_memory(saved):
    state = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    # A and B of one module as views of one storage: torch.save keeps the sharing.
    key = "base_model.model.model.l0.q"
    a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
    flat = torch.cat([a.flatten(), b.flatten()])
    state[f"{key}.lora_A.weight"] = flat[:a.numel()].view(a.shape)
    state[f"{key}.lora_B.weight"] = flat[a.numel():].view(b.shape)
    torch.save(state, saved / "adapter_model.bin")
    lora = kf.LoRA.load(saved, allow_pickle=True)
    reference = _clone(lora)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, saved / "adapter_model.bin")
    _assert_same(lora, reference)
    for t in (lora.modules[key].A, lora.modules[key].B):  # not views keeping the shared storage alive
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_load_bytes_equals_load_and_owns_its_memory(saved):
    config = (saved / "adapter_config.json").read_bytes()
    weights = bytearray((saved / "adapter_model.safetensors").read_bytes())
    lora = kf.LoRA.load_bytes(config, weights, saved)
    _assert_same(lora, kf.LoRA.load(saved))
    reference = _clone(lora)
    weights[:] = bytes(len(weights))  # the caller reuses its buffer
    _assert_same(lora, reference)
    for m in lora.modules.values():
        for t in (m.A, m.B):  # a storage of its own, exactly the tensor's size
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_load_bytes_errors_name_the_files(saved):
    config = (saved / "adapter_config.json").read_bytes()
    weights = (saved / "adapter_model.safetensors").read_bytes()
    where = re.escape(str(saved / "adapter_config.json"))
    with pytest.raises(kf.AdapterError, match=f"^{where}: cannot parse"):
        kf.LoRA.load_bytes(b"{not json", weights, saved)
    with pytest.raises(kf.AdapterError, match=f"^{where}: .*larger than"):
        kf.LoRA.load_bytes(b" " * (lora_mod.MAX_CONFIG_BYTES + 1), weights, saved)
    where = re.escape(str(saved / "adapter_model.safetensors"))
    with pytest.raises(kf.AdapterError, match=f"^{where}: corrupt"):
        kf.LoRA.load_bytes(config, weights[:40], saved)
    nan = bytearray(weights)
    nan[-4:] = torch.tensor([float("nan")]).numpy().tobytes()  # the last float of the last tensor
    with pytest.raises(kf.AdapterError, match=f"^{where}: module .* contains NaN"):
        kf.LoRA.load_bytes(config, bytes(nan), saved)


def test_load_module_order_is_sorted_and_stable(tmp_path):
    """safetensors' bytes loader returns tensors in hash order; modules must come out sorted every time."""
    names = [f"model.l{i}.{p}" for i in (3, 1, 2, 0) for p in ("v", "q")]
    random_lora({n: (4, 4) for n in names}, rank=1).save(tmp_path / "ad")
    expected = sorted(names)
    for _ in range(3):
        assert kf.LoRA.load(tmp_path / "ad").names == expected


# ------------------------------------------------------ item 12: config fields
@pytest.mark.parametrize("fields,message", [
    ({"r": 0}, "field 'r' must be a positive integer, got 0"),
    ({"r": -2}, "field 'r' must be a positive integer"),
    ({"r": 2.5}, "field 'r' must be a positive integer"),
    ({"r": True}, "field 'r' must be a positive integer"),
    ({"lora_alpha": "16"}, "field 'lora_alpha' must be a finite number"),
    ({"lora_alpha": 10 ** 400}, "field 'lora_alpha' must be a finite number"),
    ({"use_rslora": "false"}, "field 'use_rslora' must be true or false, got 'false'"),
    ({"use_dora": "false"}, "field 'use_dora' must be true or false"),
    ({"fan_in_fan_out": 0}, "field 'fan_in_fan_out' must be true or false"),
    ({"rank_pattern": ["q"]}, "field 'rank_pattern' must be an object"),
    ({"alpha_pattern": "v=3"}, "field 'alpha_pattern' must be an object"),
    ({"rank_pattern": {"q": "2"}}, "field 'rank_pattern': key 'q': value must be a positive integer, got '2'"),
    ({"rank_pattern": {"q": 0}}, "field 'rank_pattern': key 'q': value must be a positive integer"),
    ({"alpha_pattern": {"q": None}}, "field 'alpha_pattern': key 'q': value must be a finite number"),
    ({"alpha_pattern": {"q": [1]}}, "field 'alpha_pattern': key 'q': value must be a finite number"),
    ({"rank_pattern": {"q_proj(": 2}}, "field 'rank_pattern': key 'q_proj\\(': invalid regular expression"),
    ({"alpha_pattern": {"(?=l0)l0.q": 2}}, "field 'alpha_pattern': key .*lookarounds"),
    ({"rank_pattern": {r"(l0)\.\1": 2}}, "field 'rank_pattern': key .*backreferences"),
    ({"rank_pattern": {"(?i:Q)": 2}}, "field 'rank_pattern': key .*inline flags"),
    ({"rank_pattern": {"x" * 1001: 2}}, "field 'rank_pattern': key .*longer than 1000 characters"),
    ({"rank_pattern": {"q{3000}": 2}}, "field 'rank_pattern': key .*too large"),
])
def test_bad_config_fields_name_file_and_field(saved, fields, message):
    cfg = _config(saved)
    cfg.update(fields)
    _write_config(saved, cfg)
    with pytest.raises(kf.AdapterError, match=re.escape(str(saved / "adapter_config.json")) + ": " + message):
        kf.LoRA.load(saved)


def test_non_finite_alpha_literal(saved):
    text = (saved / "adapter_config.json").read_text()
    (saved / "adapter_config.json").write_text(re.sub(r'"lora_alpha": [^,\n]+', '"lora_alpha": NaN', text))
    with pytest.raises(kf.AdapterError, match="field 'lora_alpha' must be a finite number, got nan"):
        kf.LoRA.load(saved)


def test_rank_zero_is_refused_not_divided_by(tmp_path):
    """Rank-0 tensors with r = 0 passed every check and then divided by zero; save refuses them too."""
    lora = kf.LoRA.from_factors({"model.x": (torch.zeros(0, 5), torch.zeros(3, 0))})
    with pytest.raises(kf.AdapterError, match="module 'model.x' has rank 0"):
        lora.save(tmp_path / "ad")
    assert not (tmp_path / "ad" / "adapter_model.safetensors").exists()
    (tmp_path / "ad").mkdir(exist_ok=True)
    save_file({"base_model.model.model.x.lora_A.weight": torch.zeros(0, 5),
               "base_model.model.model.x.lora_B.weight": torch.zeros(3, 0)},
              tmp_path / "ad" / "adapter_model.safetensors")
    for cfg, field in (({"r": 0}, "'r'"), ({"r": 4, "rank_pattern": {"x": 0}}, "'rank_pattern': key 'x'")):
        _write_config(tmp_path / "ad", {"peft_type": "LORA", "lora_alpha": 8, **cfg})
        with pytest.raises(kf.AdapterError, match=f"adapter_config.json: field {field}.*positive integer"):
            kf.LoRA.load(tmp_path / "ad")


def test_use_rslora_needs_a_real_bool(saved):
    cfg = _config(saved)
    cfg["use_rslora"] = False
    _write_config(saved, cfg)
    assert kf.LoRA.load(saved).modules["base_model.model.model.l0.q"].scaling == pytest.approx(cfg["lora_alpha"] / 2)
    cfg["use_rslora"] = True
    _write_config(saved, cfg)
    assert kf.LoRA.load(saved).modules["base_model.model.model.l0.q"].scaling == pytest.approx(
        cfg["lora_alpha"] / 2 ** 0.5)


def test_config_file_size_is_bounded(saved):
    cfg_path = saved / "adapter_config.json"
    with open(cfg_path, "a") as f:  # valid JSON, padded with whitespace past the bound
        f.write(" " * lora_mod.MAX_CONFIG_BYTES)
    with pytest.raises(kf.AdapterError, match=re.escape(str(cfg_path)) + r": larger than 1048576 bytes"):
        kf.LoRA.load(saved)


# ---------------------------------------------------------------- pattern keys
_KEYS = ["q_proj", "v_proj", "model.layers.1.self_attn.q_proj", re.escape("model.layers.1.self_attn.q_proj"),
         ".*q_proj", r"layers\.[0-3]\..*", "(q|k)_proj", "layers.1", "lay.rs.1", "^model", "proj$", "a)|(b",
         "q_proj|v_proj", "x?q_proj", r"(?:self_attn|mlp)\.\w+", "[^.]+", r"\d+\.self_attn\.q_proj", "",
         r"q_proj\Z", r"\Aq_proj", "(a+)+", "a{2,3}b", "(|a)*q", r"[a-c\d]{2}", r"\.q_proj", r"\-", "proj\n"]
_PATHS = ["model.layers.1.self_attn.q_proj", "model.layers.10.self_attn.q_proj", "model.layers.1.mlp.up_proj",
          "q_proj", "xq_proj", "aab", "aaab", "b", "a", "", "model", "proj\n", "x.proj\n", "a\nb.q_proj",
          "a.b\nq_proj", "12.self_attn.q_proj", ".q_proj", "..q_proj", "-", "x.-", "layers.1", "layersX1", "aq"]


def test_pattern_keys_match_exactly_as_peft_does():
    """compile_pattern_key agrees with peft's ``re.match(rf"(.*\\.)?({key})$", path)`` on every pair."""
    for key in _KEYS:
        peft_rule = re.compile(rf"(.*\.)?({key})$")
        matches = lora_mod.compile_pattern_key(key)
        for path in _PATHS:
            assert matches(path) == bool(peft_rule.match(path)), (key, path)


def test_rank_pattern_regex_keys_load_like_peft(tmp_path):
    names = {f"model.layers.{i}.self_attn.{p}": (8, 6) for i in range(3) for p in ("q_proj", "v_proj")}
    random_lora(names, rank={n: 3 if ".2." in n or n.endswith("v_proj") else 2 for n in names}).save(tmp_path / "ad")
    cfg = _config(tmp_path / "ad")
    cfg.update(r=2, lora_alpha=4, rank_pattern={r"layers\.2\..*": 3, "v_proj": 3}, alpha_pattern={"(q|v)_proj": 6})
    _write_config(tmp_path / "ad", cfg)
    lora = kf.LoRA.load(tmp_path / "ad")
    for n, m in lora.modules.items():
        assert m.scaling == pytest.approx(6 / m.rank), n


def test_crafted_pattern_key_cannot_hang_the_loader(tmp_path):
    """``(a+)+`` against ``model.aaaa...a.q`` backtracks 2^40 times in Python's re; the loader answers at once.

    Run in a child with a timeout so that a regression fails instead of hanging the suite.
    """
    module = "model." + "a" * 40 + ".q"
    random_lora({module: (4, 4), "model.b": (4, 4)}, rank={module: 1, "model.b": 2}).save(tmp_path / "ad")
    cfg = _config(tmp_path / "ad")
    # the first key cannot match "....q" and backtracks; the second is the same trap, and matches
    cfg.update(r=2, rank_pattern={"(a+)+": 5, "(a+)+|(a+)+\\.q": 1})
    _write_config(tmp_path / "ad", cfg)
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        import kmerge_fast as kf
        print(sorted(kf.LoRA.load({str(tmp_path / "ad")!r}).ranks.values()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[1, 2]"


def test_pattern_key_work_is_capped(saved, monkeypatch):
    monkeypatch.setattr(patterns, "MAX_PATTERN_WORK", 50)
    cfg = _config(saved)
    cfg["rank_pattern"] = {"(x|l)*[0-9]+.*zz": 2}
    _write_config(saved, cfg)
    with pytest.raises(kf.AdapterError, match="field 'rank_pattern': key .*too costly to match"):
        kf.LoRA.load(saved)


# --------------------------------------------------------- save: permissions
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        random_lora(SHAPES, rank=2).save(tmp_path / "ad")
        (tmp_path / "probe").write_text("x")  # what open() gives under this umask
    finally:
        os.umask(old)
    expected = (tmp_path / "probe").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "ad" / name).stat().st_mode & 0o777 == expected, name
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_atomic_write_leaves_target_and_no_temp_on_error(tmp_path):
    from kmerge_fast.files import atomic_write

    target = tmp_path / "f.json"
    target.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new"
