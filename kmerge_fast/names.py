"""Module names: the one mapping between a base model's module paths and peft's keys.

A :class:`~kmerge_fast.LoRA` keys its modules by their path in the base model,
as ``model.named_modules()`` shows it (``model.layers.0.self_attn.q_proj``).
peft's files and ``PeftModel.named_modules()`` put ``base_model.model.`` in
front (PeftModel -> LoraModel -> base model); that prefix is a detail of the
peft format, added on save and stripped on load, and lookups accept it.
Torch-free.
"""

from __future__ import annotations

#: peft's prefix of every key of a saved adapter: PeftModel -> LoraModel -> base model.
PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """The key :attr:`LoRA.modules <kmerge_fast.LoRA.modules>` uses: the path in the base model.

    ``name`` may be that path or peft's key (the same with ``base_model.model.``
    in front); a non-string is returned as it is.
    """
    if isinstance(name, str) and name.startswith(PEFT_PREFIX):
        return name[len(PEFT_PREFIX):]
    return name


def peft_key(path: str) -> str:
    """peft's key of the module at ``path`` in the base model, as saved files hold it: ``base_model.model.`` + path."""
    return PEFT_PREFIX + path
