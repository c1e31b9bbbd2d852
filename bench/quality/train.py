"""One LoRA per task on q/k/v/o, a fixed recipe and the SAME seed for every adapter.

As in the published scripts every adapter starts from the same A (peft draws
lora_A from the seeded RNG; lora_B starts at zero). Loss on the target tokens
(+ EOS) only; prompts and targets are tokenised separately, exactly as
``kf.d2c.LossScorer`` does, so training, scoring and decoding see the same ids.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

import torch

import kmerge_fast as kf

from .tasks import Example


@dataclass
class Recipe:
    rank: int = 8
    alpha: int = 16
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0          # the same for every adapter

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def encode(tok, prompt: str, target: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids + EOS) - the target part empty when ``target`` is None."""
    p = list(tok(prompt, add_special_tokens=True)["input_ids"])
    if target is None:
        return p, []
    return p, list(tok(target, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]


def _batch(pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ids, mask and labels (-100 outside the targets)."""
    width = max(len(p) + len(y) for p, y in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for i, (p, y) in enumerate(pairs):
        seq = p + y
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(y)
        mask[i, :len(seq)] = 1
    return ids, mask, labels


def train_lora(model, tok, train: list[Example], recipe: Recipe, stream_seed: int = 0) -> tuple[kf.LoRA, dict]:
    """Train one adapter; returns it (a kf.LoRA) and stats (seconds, first / last loss).

    ``recipe.seed`` fixes the initialisation (the same for all adapters);
    ``stream_seed`` only orders the task's training examples.
    """
    import peft

    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    config = peft.LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.targets),
                             lora_dropout=0.0, bias="none")
    pm = peft.get_peft_model(model, config)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    pairs = [encode(tok, e.prompt, e.target) for e in train]
    rng = random.Random(stream_seed)
    order: list[int] = []
    losses = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:
            more = list(range(len(pairs)))
            rng.shuffle(more)
            order += more
        idx, order = order[:recipe.batch_size], order[recipe.batch_size:]
        ids, mask, labels = _batch([pairs[i] for i in idx], pad)
        lr = recipe.lr * min(1.0, (step + 1) / max(1, recipe.steps // 10))   # short warm-up
        for g in opt.param_groups:
            g["lr"] = lr
        # the LM head only on the positions that predict a target token (saves most of its 49k-vocab matmul)
        inner = pm.get_base_model()
        hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
        keep = labels[:, 1:] != -100
        logits = inner.lm_head(hidden[:, :-1][keep]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    factors, scaling = {}, {}
    for key, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            factors[key] = (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
            scaling[key] = m.scaling["default"]
    pm.unload()   # the plain base model again, for the next adapter
    model.eval()
    lora = kf.LoRA.from_factors(factors, scaling=scaling,
                                config={"task_type": "CAUSAL_LM"})
    stats = {"seconds": time.perf_counter() - start, "first_loss": losses[0], "last_loss": losses[-1]}
    return lora, stats
