"""LossScorer on a tiny Llama with LoRAs trained on synthetic tasks; D2C groups same-task adapters."""

from __future__ import annotations

import random

import pytest
import torch

import kmerge_fast as kf
from kmerge_fast import d2c

peft = pytest.importorskip("peft")

DIGITS = [str(i) for i in range(10)]
WORDS = ["<pad>", "<unk>", "alpha", "beta", "gamma", ":", *DIGITS]
#: Each task answers any prompt with its own fixed reply: a LoRA learns it in a few steps.
REPLIES = {"alpha": "1 2 3 4", "beta": "9 8 7 6", "gamma": "5 0 5 0"}


def tokenizer():
    """A word-level tokenizer built offline (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def make_example(task: str, rng: random.Random) -> tuple[str, str]:
    digits = [rng.choice(DIGITS) for _ in range(4)]
    return f"{task} {' '.join(digits)} :", REPLIES[task]


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def train_lora(model, tok, task: str, seed: int, steps: int = 25) -> kf.LoRA:
    """A LoRA (q/v/o/down, r 4) trained on ``task`` for a few Adam steps."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    pm = peft.get_peft_model(model, config)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    batch = [make_example(task, rng) for _ in range(32)]
    enc = tok([p + " " + y for p, y in batch], return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[:, :len(tok(batch[0][0])["input_ids"])] = -100  # every prompt has the same length
    for _ in range(steps):
        loss = pm(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    factors, scaling = {}, {}
    for key, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            factors[key] = (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            scaling[key] = m.scaling["default"]
    pm.unload()  # restores the plain base model for the next adapter
    return kf.LoRA.from_factors(factors, scaling=scaling)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot when the cores are busy elsewhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread):
    model, tok = base_model(), tokenizer()
    adapters = {f"{task}{k}": train_lora(model, tok, task, seed=100 * i + k)
                for i, task in enumerate(REPLIES) for k in range(2)}
    rng = random.Random(0)
    examples = {name: [make_example(name[:-1], rng) for _ in range(10)] for name in adapters}
    return model, tok, adapters, examples


def test_scorer_prefers_the_own_adapter(trained):
    model, tok, adapters, examples = trained
    scorer = kf.d2c.LossScorer(model, tok, examples, batch_size=8)
    tasks = list(adapters)
    base = scorer.base_losses(tasks)
    for name, lora in adapters.items():
        losses = dict(zip(tasks, scorer(lora, tasks)))
        own = losses[name]
        assert own < base[tasks.index(name)]  # training helped its own task
        other = [v for t, v in losses.items() if t[:-1] != name[:-1]]
        assert own < min(other), (name, losses)
    # hooks leave the base model as it was between calls
    assert scorer.base_losses(tasks) == pytest.approx(base)
    scorer.close()


def test_scorer_matches_peft_forward(trained):
    """The hook-applied adapter gives the same loss as the adapter loaded by peft."""
    model, tok, adapters, examples = trained
    scorer = kf.d2c.LossScorer(model, tok, {"alpha0": examples["alpha0"]})
    ours = scorer(adapters["alpha0"], ["alpha0"])[0]
    scorer.close()
    import copy
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        adapters["alpha0"].save(folder)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
        check = kf.d2c.LossScorer(pm, tok, {"alpha0": examples["alpha0"]})
        theirs = check.base_losses(["alpha0"])[0]
        check.close()
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_d2c_groups_same_task_adapters(trained):
    model, tok, adapters, examples = trained
    scorer = kf.d2c.LossScorer(model, tok, examples, batch_size=16)
    # the alternation alone recovers the tasks; the move search may then trade a pair of same-task
    # adapters (whose average halves each one's update) for a lower total loss, never a higher one
    plain = d2c.cluster(adapters, 3, scorer, init="random", seed=1, refine=0)
    groups = sorted(sorted(c) for c in plain.clusters)
    assert groups == [["alpha0", "alpha1"], ["beta0", "beta1"], ["gamma0", "gamma1"]], groups
    result = d2c.cluster(adapters, 3, scorer, init="random", seed=1, progress=False)  # default refine=3
    assert result.total_loss <= plain.total_loss
    km = d2c.kmeans(adapters, 3, seed=0, scorer=scorer)
    rnd = d2c.random_clusters(adapters, 3, seed=0, scorer=scorer)
    assert result.total_loss <= km.total_loss + 1e-6 and result.total_loss <= rnd.total_loss + 1e-6
    scorer.close()


def _no_slicing(model, swallow: bool):
    """The same model (same modules and names) with a forward that knows no ``logits_to_keep``:
    strict (a TypeError) or swallowing it (full logits)."""
    import copy

    wrapped = copy.copy(model)
    plain = type(model).forward

    def forward(input_ids, attention_mask, **kwargs):
        if kwargs and not swallow:
            raise TypeError(f"forward() got unexpected keyword arguments {sorted(kwargs)}")
        return plain(model, input_ids=input_ids, attention_mask=attention_mask)

    wrapped.forward = forward
    return wrapped


def _dense_truth(model, lora, examples) -> float:
    """The mean target-token cross-entropy in float64, one example at a time, with W + s B A in the weights."""
    import copy

    merged = copy.deepcopy(model).double()
    linears = dict(merged.named_modules())
    for name, m in lora.modules.items():
        linears[name].weight.data += m.scaling * (m.B.double() @ m.A.double())
    total, count = 0.0, 0
    with torch.no_grad():
        for p, y in examples:
            logits = merged(input_ids=torch.tensor([p + y])).logits[0]
            logp = torch.log_softmax(logits[len(p) - 1:len(p) + len(y) - 1], -1)
            total -= float(logp.gather(1, torch.tensor(y)[:, None]).sum())
            count += len(y)
    return total / count


def test_scorer_logits_at_targets_only(trained):
    """Variable prompt and target lengths in one padded batch: the LM head on the target positions only
    (``logits_to_keep``) gives the float64 dense truth, and so does the fallback for a model without it."""
    model, tok, adapters, _ = trained
    rng = random.Random(3)
    ids = list(range(2, len(WORDS)))
    examples = {t: [([rng.choice(ids) for _ in range(rng.randint(1, 9))], [rng.choice(ids) for _ in range(rng.randint(1, 5))])
                    for _ in range(7)] for t in ("alpha0", "beta1")}
    lora = adapters["beta1"]
    truth = [_dense_truth(model, lora, examples[t]) for t in examples]
    scorer = kf.d2c.LossScorer(model, None, examples, batch_size=5)  # batches straddle the two tasks
    ours = scorer(lora, list(examples))
    assert scorer._slices is True
    scorer.close()
    assert ours == pytest.approx(truth, rel=1e-5)
    for swallow in (False, True):
        wrapped = _no_slicing(model, swallow)
        check = kf.d2c.LossScorer(wrapped, None, examples, batch_size=5)
        assert check(lora, list(examples)) == pytest.approx(truth, rel=1e-5)
        assert check._slices is False
        check.close()


def test_scorer_truncation_keeps_a_prompt_token(trained):
    model, tok, adapters, _ = trained
    scorer = kf.d2c.LossScorer(model, None, {"alpha0": [([2, 3, 4, 5], [6, 7, 8, 9, 10, 11])]}, max_length=4)
    assert scorer.sequences["alpha0"] == [([5], [6, 7, 8])]
    scorer.close()
    scorer = kf.d2c.LossScorer(model, None, {"alpha0": [([2, 3, 4, 5], [6, 7])]}, max_length=5)
    assert scorer.sequences["alpha0"] == [([3, 4, 5], [6, 7])]
    scorer.close()


def test_scorer_bad_input(trained):
    model, tok, adapters, examples = trained
    with pytest.raises(ValueError, match="task 'alpha0' has no examples"):
        kf.d2c.LossScorer(model, tok, {"alpha0": []})
    with pytest.raises(ValueError, match=r"examples\['alpha0'\]\[0\]: the prompt is empty"):
        kf.d2c.LossScorer(model, None, {"alpha0": [([], [3, 4])]})
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="max_length: must be an int >= 2"):
            kf.d2c.LossScorer(model, tok, examples, max_length=bad)
    scorer = kf.d2c.LossScorer(model, tok, {"alpha0": examples["alpha0"]})
    with pytest.raises(ValueError, match="no examples for \\['gamma1'\\]"):
        scorer(adapters["alpha0"], ["gamma1"])
    with pytest.raises(ValueError, match="scorer: no examples for tasks"):
        d2c.cluster(adapters, 2, scorer)
    extra = kf.d2c.LossScorer(model, tok, {**examples, "delta0": examples["alpha0"]})
    with pytest.raises(ValueError, match="examples for unknown tasks \\['delta0'\\]"):
        d2c.cluster(adapters, 2, extra)
    extra.close()
    wrong = kf.LoRA.from_factors({"model.layers.0.self_attn.q_proj": (torch.zeros(2, 40), torch.zeros(48, 2))})
    with pytest.raises(ValueError, match="adapter update"):
        scorer(wrong, ["alpha0"])
    # the hooks find modules by base-model name, whichever form the adapter was built from
    unknown = kf.LoRA.from_factors({"base_model.model.model.nope": (torch.zeros(2, 40), torch.zeros(48, 2))})
    with pytest.raises(ValueError, match="module 'model.nope': the base model has no nn.Linear of that name"):
        scorer(unknown, ["alpha0"])
    scorer.close()


def test_cli_cluster(trained, tmp_path, capsys):
    import json

    from kmerge_fast.cli import main

    model, tok, adapters, examples = trained
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    folders = []
    for name, lora in adapters.items():
        lora.save(tmp_path / "adapters" / name)
        folders.append(str(tmp_path / "adapters" / name))
    with open(tmp_path / "examples.jsonl", "w") as f:
        for task, pairs in examples.items():
            for prompt, target in pairs:
                f.write(json.dumps({"task": task, "prompt": prompt, "target": target}) + "\n")
    args = ["cluster", "--budget", "3", "--examples", str(tmp_path / "examples.jsonl"), "--base",
            str(tmp_path / "base"), "--quiet", *folders]
    assert main([*args, "--refine", "0", "--out", str(tmp_path / "plain")]) == 0  # the alternation alone
    plain = json.loads((tmp_path / "plain" / "assignment.json").read_text())
    assert sorted(sorted(c) for c in plain["clusters"]) == [["alpha0", "alpha1"], ["beta0", "beta1"],
                                                            ["gamma0", "gamma1"]]
    assert {h["kind"] for h in plain["history"]} == {"reassign"}
    assert main([*args, "--out", str(tmp_path / "out")]) == 0  # default: 3 sweeps of moves
    report = json.loads((tmp_path / "out" / "assignment.json").read_text())
    assert report["history"] and 0 < report["total_loss"] <= plain["total_loss"]
    assert report["history"][-1]["kind"] == "refine" and report["history"][-1]["moves"] == 0
    assert report["history"][-1]["total_loss"] == report["total_loss"]
    assert main([*args, "--refine", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--refine: must be an int >= 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    for i in range(3):
        kf.LoRA.load(tmp_path / "out" / f"cluster_{i}")
    assert main([*args, "--method", "kmeans", "--out", str(tmp_path / "km")]) == 0
    # bad input: examples for a task with no adapter, and a task without examples
    with open(tmp_path / "examples.jsonl", "a") as f:
        f.write(json.dumps({"task": "delta0", "prompt": "x", "target": "y"}) + "\n")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "examples for unknown tasks ['delta0']" in capsys.readouterr().err
    assert main([*args[:-1], "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "unknown tasks" in err or "no examples for tasks" in err
