"""LossScorer: the loss of each task's examples under a merged adapter on a causal LM.

The adapter is applied through forward hooks on the base model's target
``nn.Linear`` layers (y += s * (x A^T) B^T), whose factors are swapped in
place for each call: no peft model is re-created, any rank works, and the
base weights are never modified.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .lora import LoRA


class _Hooks:
    """Forward hooks adding the current adapter's update to the target linears."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.active: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.linears.items()]

    def _hook(self, name: str):
        def add_update(module, inputs, output):
            factors = self.active.get(name)
            if factors is None:
                return output
            a, b, s = factors
            return output + s * ((inputs[0].to(a.dtype) @ a.T) @ b.T).to(output.dtype)

        return add_update

    def load(self, lora: LoRA, dtype: torch.dtype, device) -> None:
        active = {}
        for name, m in lora.modules.items():  # keyed by the base model's module names
            linear = self.linears.get(name)
            if linear is None:
                raise ValueError(f"module {name!r}: the base model has no nn.Linear of that name")
            if (linear.out_features, linear.in_features) != m.shape:
                raise ValueError(f"module {name!r}: adapter update {m.shape} but the base layer is "
                                 f"{(linear.out_features, linear.in_features)}")
            active[name] = (m.A.to(device, dtype), m.B.to(device, dtype), m.scaling)
        self.active = active

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class LossScorer:
    """``scorer(merged, tasks) -> [loss per task]``: mean token cross-entropy of each task's targets.

    Args:
        model: a causal LM (``transformers`` ``*ForCausalLM``) - the base model, without adapters.
        tokenizer: turns text into ids (``tokenizer(text, add_special_tokens=...)["input_ids"]``);
            None if the examples are already token id lists.
        examples: task -> list of (prompt, target) pairs, text or token id lists
            (about 10 per task is the intended size).
        batch_size: sequences per forward pass.
        max_length: sequences are cut to this many tokens: the prompt from the left, keeping at least one
            of its tokens (it predicts the first target token), then the target from the right.

    The loss is teacher-forced: for prompt p and target t the model sees p + t
    and the cross-entropy is averaged over the target tokens of all the task's
    examples. Runs under ``torch.inference_mode()`` in the model's dtype; the LM
    head runs only on the positions that predict a target token (transformers'
    ``logits_to_keep``), the cross-entropy in float32.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, examples: Mapping[str, Sequence], batch_size: int = 16,
                 max_length: int = 512):
        if not isinstance(examples, Mapping) or not examples:
            raise ValueError("examples: need a non-empty dict task -> list of (prompt, target)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: must be an int >= 2 (a prompt token and a target token), got {max_length!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.pad_id = self._pad_id()
        self.sequences: dict[str, list[tuple[list[int], list[int]]]] = {}
        for task, pairs in examples.items():
            if not pairs:
                raise ValueError(f"examples: task {task!r} has no examples")
            self.sequences[task] = [self._encode(task, i, pair) for i, pair in enumerate(pairs)]
        self._hooks = _Hooks(model)
        self.forward_passes = 0
        self._slices: bool | None = None   # does the model honour logits_to_keep? (None: not asked yet)

    def _pad_id(self) -> int:
        if self.tokenizer is None:
            return 0
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0

    def _ids(self, text, add_special: bool) -> list[int]:
        if isinstance(text, (list, tuple)):
            return [int(x) for x in text]
        if self.tokenizer is None:
            raise ValueError("tokenizer: needed for text examples (or pass token id lists)")
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _encode(self, task: str, i: int, pair) -> tuple[list[int], list[int]]:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"examples[{task!r}][{i}]: expected a (prompt, target) pair")
        prompt, target = self._ids(pair[0], True), self._ids(pair[1], False)
        if not target:
            raise ValueError(f"examples[{task!r}][{i}]: the target is empty")
        if not prompt:
            raise ValueError(f"examples[{task!r}][{i}]: the prompt is empty (no position predicts the first "
                             "target token)")
        if len(prompt) + len(target) > self.max_length:  # keep the target's start and the prompt's end
            target = target[:self.max_length - 1]
            prompt = prompt[-(self.max_length - len(target)):]
        return prompt, target

    @property
    def tasks(self) -> list[str]:
        return list(self.sequences)

    def __call__(self, merged: LoRA, tasks: Sequence[str]) -> list[float]:
        """The mean target-token cross-entropy of each task's examples with ``merged`` applied."""
        unknown = [t for t in tasks if t not in self.sequences]
        if unknown:
            raise ValueError(f"tasks: no examples for {unknown[:5]}")
        param = next(self.model.parameters())
        self._hooks.load(merged, param.dtype, param.device)
        try:
            return self._losses(list(tasks), param.device)
        finally:
            self._hooks.active = {}

    def base_losses(self, tasks: Sequence[str]) -> list[float]:
        """Each task's loss under the base model alone (no adapter)."""
        param = next(self.model.parameters())
        return self._losses(list(tasks), param.device)

    def _losses(self, tasks: list[str], device) -> list[float]:
        items = [(t, p, y) for t in tasks for p, y in self.sequences[t]]
        total = {t: 0.0 for t in tasks}
        count = {t: 0 for t in tasks}
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                batch = items[start:start + self.batch_size]
                width = max(len(p) + len(y) for _, p, y in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                keep = torch.zeros(len(batch), width, dtype=torch.bool)   # positions predicting a target token
                for row, (_, p, y) in enumerate(batch):
                    seq = p + y
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                    keep[row, len(p) - 1:len(seq) - 1] = True             # position j predicts token j + 1
                targets = torch.tensor([v for _, _, y in batch for v in y], device=device)
                logits = self._target_logits(ids.to(device), mask.to(device), keep.to(device))
                self.forward_passes += 1
                ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu()
                at = 0
                for task, _, y in batch:
                    total[task] += float(ce[at:at + len(y)].sum())
                    count[task] += len(y)
                    at += len(y)
        out = [total[t] / count[t] for t in tasks]
        if not all(math.isfinite(v) for v in out):
            raise ValueError(f"model: non-finite loss for tasks {[t for t, v in zip(tasks, out) if not math.isfinite(v)]}")
        return out

    def _target_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """float32 logits (n_kept, vocab) at the ``keep`` positions (batch, width), in row-major order.

        Asks the model for those positions only (transformers' boolean ``logits_to_keep``): the LM head
        then runs on a few target positions instead of every position, and no (batch, width, vocab)
        float tensor is formed (hundreds of MB at a 50k vocabulary). A model that rejects or ignores
        the argument gets the full logits, then the selection.
        """
        if self._slices:
            return self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
        if self._slices is None:  # first call: does the model honour the argument?
            try:
                logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            except TypeError:  # a forward without the argument (or **kwargs that refuse it)
                logits = None
            self._slices = logits is not None and logits.dim() == 2 and logits.shape[0] == int(keep.sum())
            if self._slices:
                return logits.float()
            if logits is not None and logits.shape[:2] == keep.shape:  # ignored: these are the full logits
                return logits[keep].float()
        return self.model(input_ids=ids, attention_mask=mask).logits[keep].float()

    def close(self) -> None:
        """Remove the hooks from the model."""
        self._hooks.remove()
