"""kf.peft.add_weighted_adapter against peft's own method, on tiny Llama models built from configs."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import kmerge_fast as kf
from conftest import TRUNC_TOL

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraModel  # noqa: E402

# hidden, heads, kv heads, layers, MLP width: odd head counts and MLP widths included
# (RoPE needs an even head size, so the hidden size itself is even).
MODELS = [(64, 4, 2, 2, 128), (30, 3, 1, 1, 75), (36, 3, 3, 2, 61)]
WEIGHTS = [0.7, -0.4, 1.1]


def _peft_model(hidden, heads, kv_heads, layers, mlp, seed=0):
    """Adapters t1 (r 4, q/v), t2 (r 4, q/k, alpha 4), t3 (r 6, q/v/o/down, rank_pattern on o, rsLoRA),
    with random A and B."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=97,
                         max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(config).eval(),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="t1")
    model.add_adapter("t2", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj"]))
    model.add_adapter("t3", LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                      rank_pattern={"o_proj": 3}, use_rslora=True))
    with torch.no_grad():  # peft initialises B to zero: make every update non-trivial
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"h{m[0]}")
def model(request):
    return _peft_model(*request.param)


def _factors(model, adapter):
    out = {}
    for key, module in model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            out[key] = (module.lora_A[adapter].weight.detach().clone(), module.lora_B[adapter].weight.detach().clone())
    return out


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: c.to_dict() for k, c in model.peft_config.items()}


def _assert_unchanged(model, snapshot):
    state, configs = snapshot
    assert {k: c.to_dict() for k, c in model.peft_config.items()} == configs
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k


def _run_both(model, adapters, combination_type, **kw):
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    weights = WEIGHTS[:len(adapters)]
    theirs.add_weighted_adapter(adapters, weights, "merged", combination_type=combination_type, **kw)
    kf.peft.add_weighted_adapter(ours, adapters, weights, "merged", combination_type=combination_type, **kw)
    return ours, theirs


DETERMINISTIC = [
    ("svd", ["t1", "t3"], {}),
    ("svd", ["t1", "t2", "t3"], {"svd_rank": 3}),
    ("cat", ["t1", "t2", "t3"], {}),
    ("linear", ["t1", "t2"], {}),
    ("linear", ["t3"], {}),                      # one adapter: peft merges linearly whatever the type
    ("svd", ["t2"], {}),
    ("ties", ["t1", "t2"], {"density": 0.5}),
    ("ties", ["t1", "t2"], {"density": 0.8, "majority_sign_method": "frequency"}),
    ("magnitude_prune", ["t1", "t2"], {"density": 0.3}),
    ("ties_svd", ["t1", "t3"], {"density": 0.5}),
    ("ties_svd", ["t1", "t2", "t3"], {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", ["t1", "t2", "t3"], {"density": 0.6}),
    ("magnitude_prune_svd", ["t1", "t2"], {"density": 1.0}),
]


@pytest.mark.parametrize("combination_type,adapters,kw", DETERMINISTIC,
                         ids=[f"{c}-{''.join(a)}-{i}" for i, (c, a, _) in enumerate(DETERMINISTIC)])
def test_same_adapter_as_peft(model, backend, combination_type, adapters, kw):
    ours, theirs = _run_both(model, adapters, combination_type, **kw)
    assert ours.peft_config["merged"].to_dict() == theirs.peft_config["merged"].to_dict()
    f_ours, f_theirs = _factors(ours, "merged"), _factors(theirs, "merged")
    assert f_ours.keys() == f_theirs.keys() and f_ours
    factor_wise = combination_type in ("cat", "linear", "ties", "magnitude_prune") or len(adapters) == 1
    for key in f_theirs:
        (a1, b1), (a2, b2) = f_ours[key], f_theirs[key]
        if a2.shape[0] < a1.shape[0]:
            # peft replaces .data with a lower-rank tensor than its config's r (a rank_pattern module
            # merged factor-wise): its adapter then fails to reload. Ours is zero-padded to r.
            r = a2.shape[0]
            assert not a1[r:].any() and not b1[:, r:].any(), key
            a1, b1 = a1[:r], b1[:, :r]
        assert a1.shape == a2.shape and b1.shape == b2.shape and a1.dtype == a2.dtype, key
        if factor_wise:
            torch.testing.assert_close(a1, a2, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6)
        else:  # SVD factors are unique only up to signs and rotations: compare the product
            p1, p2 = (b1 @ a1).double(), (b2 @ a2).double()
            assert float((p1 - p2).norm() / p2.norm()) < 1e-5, key


def test_merged_model_runs_like_peft(model):
    ours, theirs = _run_both(model, ["t1", "t3"], "ties_svd", density=0.6)
    ids = torch.arange(12).reshape(2, 6) % 97
    for m in (ours, theirs):
        m.set_adapter("merged")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_svd_clamp_applied(model):
    ours, theirs = _run_both(model, ["t1", "t3"], "svd", svd_clamp=0.9)
    for key, (a, b) in _factors(ours, "merged").items():
        values = torch.cat([a.flatten(), b.flatten()])
        # after the clamp, at least 10% of the entries sit at the bound (ties at +-q)
        bound = values.abs().max()
        assert float((values.abs() >= bound * (1 - 1e-6)).float().mean()) >= 0.05, key
    assert ours.peft_config["merged"].to_dict() == theirs.peft_config["merged"].to_dict()


def test_dare_reproducible_with_generator(model):
    outs = []
    for seed in (1, 1, 2):
        m = copy.deepcopy(model)
        kf.peft.add_weighted_adapter(m, ["t1", "t2"], [1.0, 1.0], "merged", "dare_ties", density=0.5,
                                     generator=torch.Generator().manual_seed(seed))
        outs.append(_factors(m, "merged"))
    key = next(iter(outs[0]))
    assert torch.equal(outs[0][key][0], outs[1][key][0])
    assert not torch.equal(outs[0][key][0], outs[2][key][0])
    # without a generator the global RNG seeds it, as in peft
    again = []
    for _ in range(2):
        m = copy.deepcopy(model)
        torch.manual_seed(5)
        kf.peft.add_weighted_adapter(m, ["t1", "t2"], [1.0, 1.0], "merged", "dare_linear_svd", density=0.5)
        again.append(_factors(m, "merged")[key])
    assert torch.equal(again[0][0], again[1][0])


def test_patch_routes_peft_method(model):
    assert not kf.peft.is_patched()
    original = LoraModel.add_weighted_adapter
    reference = copy.deepcopy(model)
    kf.peft.add_weighted_adapter(reference, ["t1", "t3"], [0.5, 0.5], "merged", "ties_svd", density=0.5)
    kf.peft.patch()
    kf.peft.patch()  # idempotent
    try:
        assert kf.peft.is_patched() and LoraModel.add_weighted_adapter is not original
        m = copy.deepcopy(model)
        m.add_weighted_adapter(["t1", "t3"], [0.5, 0.5], "merged", combination_type="ties_svd", density=0.5)
        for key, (a, b) in _factors(reference, "merged").items():
            a2, b2 = _factors(m, "merged")[key]
            assert torch.equal(a, a2) and torch.equal(b, b2)  # the same code ran
        with pytest.raises(ValueError, match="already exists"):
            m.add_weighted_adapter(["t1"], [1.0], "merged")
    finally:
        kf.peft.unpatch()
    kf.peft.unpatch()
    assert LoraModel.add_weighted_adapter is original and not kf.peft.is_patched()


BAD = [
    (dict(combination_type="mean"), "combination_type: unknown"),
    (dict(adapters=[]), "adapters: need a non-empty"),
    (dict(adapters=["t1", "zzz"]), "adapter 'zzz' does not exist"),
    (dict(weights=[1.0]), "weights: 1 weights for 2 adapters"),
    (dict(weights=[1.0, float("nan")]), "weights: must be finite"),
    (dict(adapter_name="t2"), "'t2' already exists"),
    (dict(combination_type="ties"), "density: combination type 'ties' needs"),
    (dict(combination_type="ties_svd", density=0.0), "density"),
    (dict(combination_type="dare_linear", density=1.5), "density"),
    (dict(combination_type="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method"),
    (dict(adapters=["t1", "t3"], combination_type="linear"), "same r"),
    (dict(svd_rank=0), "svd_rank"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0][:20] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_leaves_model_unchanged(model, change, message):
    m = copy.deepcopy(model)
    before = _snapshot(m)
    args = dict(adapters=["t1", "t2"], weights=[0.5, 0.5], adapter_name="merged", combination_type="svd")
    args.update(change)
    with pytest.raises(ValueError, match=message):
        kf.peft.add_weighted_adapter(m, **args)
    _assert_unchanged(m, before)


def test_not_a_peft_model():
    with pytest.raises(TypeError, match="model: expected a peft"):
        kf.peft.add_weighted_adapter(torch.nn.Linear(2, 2), ["t1"], [1.0], "m")


def test_failed_injection_is_rolled_back(model, monkeypatch):
    m = copy.deepcopy(model)
    before = _snapshot(m)

    def broken(*args, **kwargs):
        raise RuntimeError("injection failed")

    monkeypatch.setattr(type(m.base_model), "inject_adapter", broken)
    with pytest.raises(RuntimeError, match="injection failed"):
        kf.peft.add_weighted_adapter(m, ["t1", "t2"], [0.5, 0.5], "merged")
    _assert_unchanged(m, before)


def test_unsupported_dora_falls_back_when_patched():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    m = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), adapter_name="t1")
    m.add_adapter("t2", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        kf.peft.add_weighted_adapter(m, ["t1", "t2"], [0.5, 0.5], "merged")
    assert "merged" not in m.peft_config
    kf.peft.patch()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.add_weighted_adapter(["t1", "t2"], [0.5, 0.5], "merged", combination_type="cat")
        assert any("using peft's add_weighted_adapter" in str(w.message) for w in caught)
        assert "merged" in m.peft_config
    finally:
        kf.peft.unpatch()


def test_truncation_close_to_optimal_on_a_wide_module():
    """The svd family's large-matrix path (subspace iteration) against the exact SVD."""
    from kmerge_fast.ops.numerics.top_svd import top_svd

    gen = torch.Generator().manual_seed(0)
    m = sum(torch.randn(300, 8, generator=gen) @ torch.randn(8, 420, generator=gen) for _ in range(4))
    m = m * (torch.rand(m.shape, generator=gen) < 0.5)
    a, b = top_svd(m, 8)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    optimal = float(s[8:].square().sum())
    ours = float((m.double() - b @ a).square().sum())
    assert optimal * (1 - 1e-9) <= ours <= optimal * (1 + TRUNC_TOL[torch.float32])


# peft's own tests (tests/test_custom_models.py of its sdist) match this message with re.escape(...)
MODULES_TO_SAVE_CLASH = ("Cannot add weighted adapters if they target the same module with modules_to_save, "
                         "but found 1 such instance(s).")


def _mlp_with_modules_to_save(second_trains_lin1: bool):
    """peft's test MLP: LoRA on lin0; adapter 'default' trains lin1 in full (modules_to_save), 'other' maybe too."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential()
    mlp.add_module("lin0", torch.nn.Linear(10, 20))
    mlp.add_module("relu", torch.nn.ReLU())
    mlp.add_module("lin1", torch.nn.Linear(20, 2))
    m = get_peft_model(mlp, LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    m.add_adapter("other", LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"] if second_trains_lin1 else None))
    return m


def _tiny_bert_seq_cls():
    """peft's test_multiple_adapters_seq_cls_mixed_modules_to_save_merging_adapters, on a BERT built from a
    config instead of bert-base-uncased from the hub: SEQ_CLS adapters both train the classifier head."""
    from peft import TaskType
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=37, vocab_size=50, max_position_embeddings=16))
    m = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS))
    m.add_adapter("other", LoraConfig(task_type=TaskType.SEQ_CLS))
    return m


@pytest.mark.parametrize("build", [lambda: _mlp_with_modules_to_save(True), _tiny_bert_seq_cls], ids=["mlp", "bert"])
def test_same_modules_to_save_raises_peft_error(build):
    """Two adapters that both train a module in full cannot be merged: the same ValueError as peft's, before
    anything is changed (peft's own suite checks the message; ours adds which module and adapters)."""
    m = build()
    with pytest.raises(ValueError) as theirs:
        m.add_weighted_adapter(["default", "other"], [1.0, 1.0], "merged")  # peft's own method (not patched)
    assert str(theirs.value) == MODULES_TO_SAVE_CLASH
    before = _snapshot(m)
    # peft checks the clash first: it is reported even with arguments that fail a later check (no density)
    for kw in (dict(), dict(combination_type="ties")):
        with pytest.raises(ValueError, match=re.escape(MODULES_TO_SAVE_CLASH)) as ours:
            kf.peft.add_weighted_adapter(m, ["default", "other"], [1.0, 1.0], "merged", **kw)
        assert "classifier" in str(ours.value) or "lin1" in str(ours.value)
        _assert_unchanged(m, before)
    kf.peft.patch()
    try:
        with pytest.raises(ValueError, match=re.escape(MODULES_TO_SAVE_CLASH)):
            m.add_weighted_adapter(["default", "other"], [1.0, 1.0], "merged")
    finally:
        kf.peft.unpatch()
    _assert_unchanged(m, before)


def test_mixed_modules_to_save_merges_like_peft():
    """Only one adapter trains lin1 in full: the merge works, and the new adapter gets its own copy of lin1
    (a fresh copy of the base module, as with peft: the trained copies are not merged)."""
    m = _mlp_with_modules_to_save(False)
    ours, theirs = copy.deepcopy(m), copy.deepcopy(m)
    theirs.add_weighted_adapter(["default", "other"], [1.0, 1.0], "merged")
    kf.peft.add_weighted_adapter(ours, ["default", "other"], [1.0, 1.0], "merged")
    wrapper = ours.base_model.model.lin1
    assert "merged" in wrapper.modules_to_save and "other" not in wrapper.modules_to_save
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 10)
    for model in (ours, theirs):
        model.set_adapter("merged")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
