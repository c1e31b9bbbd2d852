"""Adapter type and peft I/O: round trips through real peft, every refusal path."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kmerge_fast as kf
from conftest import DTYPES, random_lora, tiny_llama

peft = pytest.importorskip("peft")


def _peft_model(targets=("q_proj", "v_proj"), r=4, alpha=8, seed=0, **kw):
    """A tiny Llama with a LoRA whose B is random (peft initialises it to zero)."""
    model = tiny_llama(seed=seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **kw)
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def _lora_params(pm, adapter="default"):
    """{module path: (A, B, scaling)} of a peft model's adapter."""
    out = {}
    for name, module in pm.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            path = name.replace("base_model.model.", "", 1)
            out[path] = (module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach(),
                         module.scaling[adapter])
    return out


@pytest.mark.parametrize("kw", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"model.layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
])
def test_load_matches_peft(tmp_path, kw):
    pm = _peft_model(**kw)
    pm.save_pretrained(tmp_path)
    lora = kf.LoRA.load(tmp_path)
    truth = _lora_params(pm)
    assert len(lora.modules) == len(truth) == 4
    for path, (a, b, s) in truth.items():
        m = lora.modules["base_model.model." + path]
        torch.testing.assert_close(m.A, a, rtol=0, atol=0)
        torch.testing.assert_close(m.B, b, rtol=0, atol=0)
        assert m.scaling == pytest.approx(s, rel=1e-12)
    if kw.get("use_rslora"):
        assert lora.modules["base_model.model.model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_save_loads_in_peft_identically(tmp_path, dtype):
    base = tiny_llama().to(dtype)  # peft builds the LoRA layers in the base model's dtype
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj")]
    shapes = {n: (dict(base.named_modules())[n].out_features, 64) for n in names}
    # different ranks and scalings per module exercise rank_pattern / alpha_pattern
    ranks = {n: 1 + i % 3 for i, n in enumerate(names)}
    lora = random_lora(shapes, rank=ranks, dtype=dtype, seed=3)
    for i, m in enumerate(lora.modules.values()):
        m.scaling = [0.5, 2.0, 0.1, 3.0][i]
    lora.save(tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "ad", autocast_adapter_dtype=False)
    loaded = _lora_params(pm)
    assert set(loaded) == set(names)
    for n in names:
        m = lora.modules["base_model.model." + n]
        a, b, s = loaded[n]
        assert a.dtype == dtype
        torch.testing.assert_close(a, m.A, rtol=0, atol=0)
        torch.testing.assert_close(b, m.B, rtol=0, atol=0)
        assert s == pytest.approx(m.scaling, rel=1e-12)
    # and back through our loader
    again = kf.LoRA.load(tmp_path / "ad")
    for n, m in lora.modules.items():
        assert torch.equal(again.modules[n].A, m.A) and again.modules[n].scaling == pytest.approx(m.scaling, rel=1e-12)


def test_from_factors_names_and_scaling():
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    lora = kf.LoRA.from_factors({"layer.q": (a, b)}, scaling={"layer.q": 0.25})
    assert lora.names == ["layer.q"]
    m = lora.modules["layer.q"]
    torch.testing.assert_close(m.delta(), 0.25 * b @ a)
    assert (m.rank, m.shape) == (2, (3, 5))
    with pytest.raises(kf.AdapterError, match="no scaling"):
        kf.LoRA.from_factors({"x": (a, b)}, scaling={"y": 1.0})


# ------------------------------------------- module names: base-model paths
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def _pair(r=2, n_out=6, n_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)


def test_modules_keyed_by_base_names_and_looked_up_by_either():
    lora = kf.LoRA.from_factors({"x.q": _pair()})
    assert lora.names == ["x.q"] and list(lora.ranks) == ["x.q"]
    m = lora.modules["x.q"]
    assert lora.modules["base_model.model.x.q"] is m
    assert "x.q" in lora.modules and "base_model.model.x.q" in lora.modules and "x.v" not in lora.modules
    assert lora.modules.get("base_model.model.x.q") is m and lora.modules.get("x.v") is None
    assert isinstance(lora.modules, dict) and dict(lora.modules) == {"x.q": m}
    # writes by either name land on the base name
    lora.modules["base_model.model.x.v"] = lora.modules.pop("base_model.model.x.q")
    assert list(lora.modules) == ["x.v"]
    lora.modules.update({"base_model.model.x.k": m})
    lora.modules |= {"base_model.model.x.o": m}
    assert sorted(lora.modules) == ["x.k", "x.o", "x.v"]
    del lora.modules["base_model.model.x.k"]
    assert sorted(lora.modules.copy()) == ["x.o", "x.v"]


def test_a_base_path_that_starts_like_peft_keeps_its_name(tmp_path):
    """A base model whose module path itself begins with ``base_model.model.`` (a wrapped PeftModel)."""
    import copy
    import pickle

    odd = "base_model.model.x"
    lora = kf.LoRA.from_factors({"base_model.model." + odd: _pair(), "x": _pair(seed=1)})
    assert lora.names == [odd, "x"] and lora.modules[odd] is not lora.modules["x"]
    for again in (copy.deepcopy(lora.modules), pickle.loads(pickle.dumps(lora.modules)), lora.modules.copy()):
        assert type(again) is type(lora.modules) and list(again) == [odd, "x"]
    lora.save(tmp_path / "ad")
    assert sorted(load_file(tmp_path / "ad" / "adapter_model.safetensors")) == sorted(
        f"base_model.model.{n}.lora_{w}.weight" for n in (odd, "x") for w in "AB")
    assert kf.LoRA.load(tmp_path / "ad").names == [odd, "x"]


def test_from_factors_accepts_either_name_form():
    a = kf.LoRA.from_factors({Q: _pair(), "base_model.model." + V: _pair(seed=1)},
                             scaling={"base_model.model." + Q: 2.0, V: 0.5})
    assert a.names == [Q, V]
    assert (a.modules[Q].scaling, a.modules[V].scaling) == (2.0, 0.5)
    # the LoRA constructor normalises too
    b = kf.LoRA({"base_model.model." + Q: a.modules[Q]})
    assert b.names == [Q]
    with pytest.raises(kf.AdapterError, match=f"module '{Q}' given twice"):
        kf.LoRA.from_factors({Q: _pair(), "base_model.model." + Q: _pair()})
    with pytest.raises(kf.AdapterError, match="scaling given for unknown modules: \\['x'\\]"):
        kf.LoRA.from_factors({Q: _pair()}, scaling={Q: 1.0, "base_model.model.x": 1.0})
    # messages name the module by its base-model path
    with pytest.raises(kf.AdapterError, match=f"module '{Q}': rank mismatch"):
        kf.LoRA.from_factors({"base_model.model." + Q: (torch.zeros(2, 5), torch.zeros(6, 3))})


def test_peft_files_keep_peft_keys_and_round_trip_base_names(tmp_path):
    """Saving adds peft's prefix (the files are as before item 6), loading strips it."""
    a = kf.LoRA.from_factors({Q: _pair(r=4), V: _pair(r=2, seed=1)}, scaling={Q: 2.0, V: 0.5},
                             config={"base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM"})
    a.save(tmp_path / "ad")
    state = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert sorted(state) == sorted(f"base_model.model.{n}.lora_{w}.weight" for n in (Q, V) for w in "AB")
    assert torch.equal(state[f"base_model.model.{Q}.lora_A.weight"], a.modules[Q].A)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config == {
        "peft_type": "LORA", "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "rank_pattern": {"model\\.layers\\.0\\.self_attn\\.v_proj": 2},
        "alpha_pattern": {"model\\.layers\\.0\\.self_attn\\.v_proj": 1.0},
        "target_modules": [Q, V], "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
    }
    assert config == a.peft_config()
    again = kf.LoRA.load(tmp_path / "ad")
    assert again.names == [Q, V] and again.ranks == a.ranks
    assert again.modules["base_model.model." + V].scaling == pytest.approx(0.5)
    again.save(tmp_path / "again")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "ad" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    # names compare equal between loaded and built adapters: one merged module each
    merged = kf.merge([again, a], [0.5, 0.5], method="linear")
    assert merged.names == [Q, V]


def test_peft_saved_adapter_uses_the_base_models_module_names(tmp_path):
    pm = _peft_model()
    pm.save_pretrained(tmp_path / "ad")
    lora = kf.LoRA.load(tmp_path / "ad")
    base_names = {n for n, _ in tiny_llama().named_modules()}
    assert lora.names and set(lora.names) <= base_names
    assert Q in lora.names


def test_load_unprefixed_and_doubled_keys(tmp_path, saved):
    """A file without peft's prefix loads to the same names; one holding a module under both names is refused."""
    state = load_file(saved / "adapter_model.safetensors")
    plain = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    (tmp_path / "plain").mkdir()
    shutil.copy(saved / "adapter_config.json", tmp_path / "plain")
    save_file(plain, tmp_path / "plain" / "adapter_model.safetensors")
    assert kf.LoRA.load(tmp_path / "plain").names == kf.LoRA.load(saved).names
    name = next(k for k in state if k.endswith(".lora_A.weight")).removesuffix(".lora_A.weight")
    doubled = {**state, **{k: v.clone() for k, v in plain.items() if "base_model.model." + k in state and
                           k.startswith(name.removeprefix("base_model.model.") + ".")}}
    assert len(doubled) == len(state) + 2
    save_file(doubled, tmp_path / "plain" / "adapter_model.safetensors")
    with pytest.raises(kf.AdapterError, match=r"module 'model.l0.q' appears twice, as 'base_model.model.model.l0.q' "
                                              r"and as 'model.l0.q'"):
        kf.LoRA.load(tmp_path / "plain")


def test_clear_caches_forgets_cached_norms():
    a = kf.LoRA.from_factors({Q: _pair()})
    b = kf.LoRA.from_factors({Q: _pair(seed=1)})
    first = kf.similarity_matrix([a], [b])
    module = b.modules[Q]
    cached = [k for k in ("cpp/fast", "reference/fast", "cpp/precise", "reference/precise")
              if module.cached_sq_norm(k) is not None]
    assert cached, "similarity_matrix caches the norms"
    b.clear_caches()
    assert all(module.cached_sq_norm(k) is None for k in cached)
    torch.testing.assert_close(kf.similarity_matrix([a], [b]), first, rtol=0, atol=0)
    assert module.cached_sq_norm(cached[0]) is not None
    module.clear_cache()
    assert module.cached_sq_norm(cached[0]) is None



# ----------------------------------------------------------------- refusals
@pytest.fixture
def saved(tmp_path):
    lora = random_lora({"model.l0.q": (6, 5), "model.l0.v": (6, 5)}, rank=2)
    lora.save(tmp_path / "ad")
    return tmp_path / "ad"


def _rewrite_weights(path, edit):
    state = load_file(path / "adapter_model.safetensors")
    edit(state)
    save_file(state, path / "adapter_model.safetensors")


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(kf.AdapterError, match="not a directory"):
        kf.LoRA.load(tmp_path / "nope")
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(kf.AdapterError, match="missing adapter_model.safetensors"):
        kf.LoRA.load(saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(kf.AdapterError, match="adapter_config.json: missing"):
        kf.LoRA.load(saved)


def test_corrupt_files(saved):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(kf.AdapterError, match="adapter_model.safetensors: corrupt"):
        kf.LoRA.load(saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(kf.AdapterError, match="adapter_config.json: cannot parse"):
        kf.LoRA.load(saved)


@pytest.mark.parametrize("field,value,message", [
    ("peft_type", "IA3", "unsupported adapter type 'IA3'"),
    ("use_dora", True, "DoRA"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
    ("r", "eight", "field 'r' must be a positive integer, got 'eight'"),
])
def test_unsupported_configs(saved, field, value, message):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg[field] = value
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(kf.AdapterError, match=message):
        kf.LoRA.load(saved)


def test_bad_tensors_name_file_and_module(saved):
    key = "base_model.model.model.l0.q"
    _rewrite_weights(saved, lambda s: s.__setitem__(f"{key}.lora_A.weight", torch.full((2, 5), float("nan"))))
    with pytest.raises(kf.AdapterError, match=r"adapter_model.safetensors: module 'model.l0.q': lora_A contains NaN"):
        kf.LoRA.load(saved)
    _rewrite_weights(saved, lambda s: s.__setitem__(f"{key}.lora_A.weight", torch.randn(3, 5)))
    with pytest.raises(kf.AdapterError, match="rank mismatch"):
        kf.LoRA.load(saved)
    _rewrite_weights(saved, lambda s: s.pop(f"{key}.lora_A.weight"))
    with pytest.raises(kf.AdapterError, match="lora_A.weight is missing"):
        kf.LoRA.load(saved)


@pytest.mark.parametrize("key,message", [
    ("base_model.model.model.l0.q.lora_magnitude_vector", "DoRA"),
    ("base_model.model.model.embed.lora_embedding_A", "embedding"),
    ("base_model.model.model.l0.q.bias", "not a lora_A / lora_B weight"),
])
def test_unknown_keys(saved, key, message):
    _rewrite_weights(saved, lambda s: s.__setitem__(key, torch.zeros(4)))
    with pytest.raises(kf.AdapterError, match=message):
        kf.LoRA.load(saved)


def test_config_rank_must_match_tensors(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["r"] = 3
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(kf.AdapterError, match="config .* says 3"):
        kf.LoRA.load(saved)


def test_pickle_needs_opt_in(saved):
    state = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(state, saved / "adapter_model.bin")
    with pytest.raises(kf.AdapterError, match="pickled adapter refused"):
        kf.LoRA.load(saved)
    lora = kf.LoRA.load(saved, allow_pickle=True)
    assert torch.equal(lora.modules["base_model.model.model.l0.q"].A, state["base_model.model.model.l0.q.lora_A.weight"])


def test_bad_modules_in_memory():
    with pytest.raises(kf.AdapterError, match="module 'x': rank mismatch"):
        kf.LoRA.from_factors({"x": (torch.randn(2, 5), torch.randn(3, 4))})
    with pytest.raises(kf.AdapterError, match="only 2-D"):
        kf.LoRA.from_factors({"x": (torch.randn(2, 5, 1), torch.randn(3, 2))})
    with pytest.raises(kf.AdapterError, match="Inf"):
        kf.LoRA.from_factors({"x": (torch.randn(2, 5), torch.full((3, 2), float("inf")))})
    with pytest.raises(kf.AdapterError, match="dtype"):
        kf.LoRA.from_factors({"x": (torch.ones(2, 5, dtype=torch.int32), torch.ones(3, 2, dtype=torch.int32))})


def test_save_replaces_files_whole(tmp_path, saved):
    before = (saved / "adapter_model.safetensors").read_bytes()
    empty = kf.LoRA({})
    with pytest.raises(kf.AdapterError, match="no modules"):
        empty.save(saved)
    assert (saved / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in saved.iterdir() if p.name.endswith(".tmp")]
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    kf.LoRA.load(copy).save(copy)
    assert kf.LoRA.load(copy).names == kf.LoRA.load(saved).names


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_all_finite_finds_every_nan_and_inf(dtype):
    from kmerge_fast.lora import all_finite

    big = torch.finfo(dtype).max
    base = torch.full((7, 300), big, dtype=dtype)  # a float32 sum of these would overflow
    base[::2] = -big
    assert all_finite(base) and all_finite(base.T) and all_finite(base[:, ::3])
    assert all_finite(torch.empty(0, 5, dtype=dtype))
    for value in (math.nan, math.inf, -math.inf):
        for pos in (0, 1049, 2099):
            t = base.clone()
            t.view(-1)[pos] = value
            assert not all_finite(t) and not all_finite(t.T), (value, pos)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_all_finite_many_agrees_with_all_finite(dtype):
    """The batched check (one C++ pass when the extension is built) on views, NaN payloads and edge values."""
    from kmerge_fast.lora import all_finite, all_finite_many

    big = torch.finfo(dtype).max
    base = torch.full((9, 130), big, dtype=dtype)
    base[1::2] = -big
    base[3, :5] = torch.finfo(dtype).tiny / 4  # subnormals are finite
    base[4, :3] = -0.0
    cases = [base, base.T, base[:, ::3], base[2:5, 7:90], torch.empty(0, 4, dtype=dtype)]
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[dtype]
    for value in (math.nan, math.inf, -math.inf, "payload"):
        for pos in ((0, 0), (4, 77), (8, 129)):
            t = base.clone()
            if value == "payload":  # a NaN with other mantissa bits than torch's own
                t.view(bits)[pos] = -1  # all bits set: a negative NaN
            else:
                t[pos] = value
            cases += [t, t.T, t[:, pos[1]:pos[1] + 1]]
    got = all_finite_many(cases)
    assert got == [all_finite(t) for t in cases] == [bool(torch.isfinite(t).all()) for t in cases]
    assert not all(got)  # the bad cases are there
