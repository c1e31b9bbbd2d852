"""One LoRA per task on q/k/v/o, trained until its held-out score plateaus.

Initialisation (``Recipe.init``):

- ``"independent"`` (the primary arm): every adapter draws its own random
  LoRA-A, as users train adapters and as the authors' released code does
  (donaldssh/K-Merge ``run_experiments.py`` calls ``get_peft_model`` before
  ``set_seed``, so A comes from an unseeded RNG state per run).
- ``"shared"`` (the second, labelled arm): every adapter starts from the same
  A (one seed for all). peft's factor-wise ``linear`` merge then returns
  (nearly) the *sum* of the members' updates instead of their average.

Prompts go through the model's chat template (``encode``); the loss is on the
target tokens and the end-of-turn token only. Prompts and targets are
tokenised separately, exactly as scoring and ``kf.d2c.LossScorer`` see them.
Training runs the base in bfloat16 under autocast where the recipe asks
(on the CPU, AMX / AVX-512 BF16 make it ~1.3x faster than float32 here), on
the model's device; the LoRA factors stay float32 and come back to the CPU.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import asdict, dataclass

import torch

import kmerge_fast as kf

from .tasks import Example

INITS = ("independent", "shared")


@dataclass
class Recipe:
    rank: int = 16
    alpha: int = 32
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_steps: int = 80
    min_steps: int = 40
    check_every: int = 20      # held-out exact match every this many steps
    target_exact: float = 0.97  # stop once the held-out exact match reaches this
    batch_size: int = 16
    lr: float = 2e-3
    init: str = "independent"  # see the module docstring
    seed: int = 0              # "shared": the one initialisation seed; "independent": mixed with the task name
    autocast: bool = True      # bf16 autocast on the model's device (the real model)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    def init_seed(self, task: str) -> int:
        if self.init == "shared":
            return self.seed
        return int.from_bytes(hashlib.sha1(f"{self.seed}-{task}".encode()).digest()[:4], "little")


def encode(tok, prompt: str, target: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids + end of turn); the target part empty when ``target`` is None.

    With a chat template (the real model) the prompt is the user turn plus the
    assistant header, exactly as ``apply_chat_template(..., add_generation_prompt=True)``
    renders it (SmolLM2 adds its default system turn); the end of turn is the
    tokenizer's EOS (``<|im_end|>`` for SmolLM2). Without one (the tiny word-level
    tokenizer) the prompt is the plain text.
    """
    if getattr(tok, "chat_template", None):
        p = tok.apply_chat_template([{"role": "user", "content": prompt.strip()}], tokenize=True,
                                    add_generation_prompt=True)
        p = list(p["input_ids"] if hasattr(p, "keys") else p)
    else:
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


def _factors(pm) -> tuple[dict, dict]:
    factors, scaling = {}, {}
    for key, m in pm.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            factors[key] = (m.lora_A["default"].weight.detach().float().cpu().clone(),
                            m.lora_B["default"].weight.detach().float().cpu().clone())
            scaling[key] = m.scaling["default"]
    return factors, scaling


def train_lora(model, tok, train: list[Example], recipe: Recipe, task: str, stream_seed: int = 0,
               held_out=None) -> tuple[kf.LoRA, dict]:
    """Train one adapter for ``task``; returns it (a kf.LoRA) and its training record.

    ``held_out() -> exact match`` (of the model as it is, the adapter active, on examples
    disjoint from train and test) is called every ``recipe.check_every`` steps; training stops at
    ``recipe.max_steps``, or after ``recipe.min_steps`` once the held-out score
    reaches ``recipe.target_exact`` or stops improving (less than +0.01 over
    the best of the earlier checks). The record holds seconds, seconds per
    step, the curve ``[(step, mean train loss since the last check, held-out)]``,
    the final train loss and held-out score, and how far A moved
    (``a_moved`` = mean over modules of |A - A0|_F / |A0|_F).
    """
    import peft

    start = time.perf_counter()
    torch.manual_seed(recipe.init_seed(task))
    config = peft.LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.targets),
                             lora_dropout=0.0, bias="none")
    pm = peft.get_peft_model(model, config)
    a0 = {k: a.clone() for k, (a, _) in _factors(pm)[0].items()}
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    pairs = [encode(tok, e.prompt, e.target) for e in train]
    rng = random.Random(stream_seed)
    order: list[int] = []
    losses, curve = [], []
    best, step = -1.0, 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    inner = pm.get_base_model()
    device = next(inner.parameters()).device   # the model's (bench.quality's --device); batches go there
    warmup = max(1, recipe.min_steps // 8)
    train_seconds = 0.0
    while step < recipe.max_steps:
        t0 = time.perf_counter()
        if len(order) < recipe.batch_size:
            more = list(range(len(pairs)))
            rng.shuffle(more)
            order += more
        idx, order = order[:recipe.batch_size], order[recipe.batch_size:]
        ids, mask, labels = (x.to(device) for x in _batch([pairs[i] for i in idx], pad))
        for g in opt.param_groups:
            g["lr"] = recipe.lr * min(1.0, (step + 1) / warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.autocast):
            hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
            keep = labels[:, 1:] != -100
            # the LM head only where a target token is predicted (most of a 49k-vocab matmul saved)
            logits = inner.lm_head(hidden[:, :-1][keep]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        train_seconds += time.perf_counter() - t0
        if held_out is not None and (step % recipe.check_every == 0 or step == recipe.max_steps):
            pm.eval()
            score = held_out()
            pm.train()
            recent = losses[-recipe.check_every:]
            curve.append((step, sum(recent) / len(recent), score))
            plateau = score < best + 0.01
            best = max(best, score)
            if step >= recipe.min_steps and (score >= recipe.target_exact or plateau):
                break
    factors, scaling = _factors(pm)
    moved = [float((factors[k][0] - a0[k]).norm() / a0[k].norm()) for k in factors]
    pm.unload()   # the plain base model again, for the next adapter
    model.eval()
    lora = kf.LoRA.from_factors(factors, scaling=scaling, config={"task_type": "CAUSAL_LM"})
    stats = {"seconds": time.perf_counter() - start, "steps": step, "seconds_per_step": train_seconds / step,
             "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]), "curve": curve,
             "held_out": curve[-1][2] if curve else None, "a_moved": sum(moved) / len(moved),
             "init_seed": recipe.init_seed(task)}
    return lora, stats
