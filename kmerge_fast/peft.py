"""A drop-in backend for peft's ``add_weighted_adapter``.

``kf.peft.add_weighted_adapter(model, ...)`` takes the same arguments and has
the same effect as ``model.add_weighted_adapter(...)`` on a ``PeftModel`` (or
its ``LoraModel``): a new adapter whose config is the first input's with
``r = lora_alpha = new rank``, the union of the target modules and no rank or
alpha patterns, and whose weights are the merge, computed by :func:`kmerge_fast.merge`.

``kf.peft.patch()`` makes peft's own ``LoraModel.add_weighted_adapter`` (and so
``PeftModel.add_weighted_adapter``) run this function until
``kf.peft.unpatch()``; layers kmerge_fast does not handle (Conv2d LoRA, DoRA,
LoRA on ``nn.Parameter`` targets) fall back to peft's implementation with a
warning while patched.

Modules trained in full (``modules_to_save``) are handled as peft handles them: two
adapters that both train the same module raise peft's ``ValueError`` (same message,
then the modules and adapters named); otherwise the new adapter gets a fresh copy of
the base module (trained copies are not merged). peft's own tests of
``add_weighted_adapter`` run against this patch in python_tests/test_peft_suite.py.

Differences from peft, all deliberate:

- bad arguments raise ``ValueError`` before the model is touched: an existing
  ``adapter_name`` (peft silently returns), weights of the wrong length or
  not finite (peft truncates / propagates NaN), a missing or out-of-range
  ``density``, an unknown ``majority_sign_method``;
- ``svd_full_matrices`` and ``svd_driver`` are accepted and ignored (the
  truncation never forms full SVD factors);
- DARE masks come from a seed drawn from ``generator`` (default: torch's
  global RNG, so ``torch.manual_seed`` reproduces a merge, as with peft), not
  from ``torch.bernoulli``: same distribution, different draws;
- magnitude pruning keeps every value tied with the k-th largest;
- every module of the new adapter has the config's rank r: a module merged at
  a lower rank (a ``rank_pattern`` module merged factor-wise, ``cat`` over
  adapters that miss the module) is zero-padded. peft sometimes stores the
  lower-rank tensor instead, which then disagrees with its own config.
"""

from __future__ import annotations

import functools
import operator
import warnings
from dataclasses import replace
from typing import Sequence

import torch

from .lora import LoRA, canonical_name
from .merge import check_weights, merge
from .methods import PEFT_NAMES, check_args, lookup


class Unsupported(ValueError):
    """The model holds LoRA layers kmerge_fast cannot merge (peft's own method can)."""


def _lora_model(model):
    """The ``LoraModel`` behind a ``PeftModel`` (or the argument itself)."""
    from peft.tuners.lora import LoraModel

    inner = getattr(model, "base_model", None)
    if isinstance(inner, LoraModel):
        return inner
    if isinstance(model, LoraModel):
        return model
    raise TypeError(f"model: expected a peft PeftModel or LoraModel with LoRA adapters, got {type(model).__name__}")


def _config_rank(config) -> int:
    """peft's per-adapter rank for allocation: r, or the largest of rank_pattern."""
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _plan(lora_model, adapters, weights, adapter_name, combination_type, svd_rank, density, majority_sign_method):
    """Validate everything; return (method, new_rank, new_target_modules, weights)."""
    configs = lora_model.peft_config
    lookup(combination_type, PEFT_NAMES.method)
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
        raise ValueError(f"adapters: need a non-empty list of adapter names, got {adapters!r}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters: names repeat in {list(adapters)}")
    for name in adapters:
        if name not in configs:
            raise ValueError(f"adapters: adapter {name!r} does not exist (the model has {list(configs)})")
    _check_modules_to_save(lora_model, adapters)  # peft's first check after existence: same order, same error
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name: need a non-empty string, got {adapter_name!r}")
    if adapter_name in configs:
        raise ValueError(f"adapter_name: an adapter named {adapter_name!r} already exists")
    weights = check_weights(weights, len(adapters)) if weights is not None else None
    if weights is None:
        raise ValueError("weights: need one weight per adapter")
    method = "linear" if len(adapters) == 1 else combination_type  # as peft: one adapter merges linearly
    # peft ignores the arguments a method does not take (density, svd_rank, svd_clamp)
    entry, _ = check_args(method, svd_rank, density, majority_sign_method, names=PEFT_NAMES, ignore_unused=True)
    for name in adapters:
        config = configs[name]
        if getattr(config, "target_parameters", None):
            raise Unsupported(f"adapter {name!r} targets nn.Parameter (target_parameters); not supported")
        if getattr(config, "use_dora", False):
            raise Unsupported(f"adapter {name!r} is a DoRA adapter; only plain LoRA is supported")
    ranks = [_config_rank(configs[name]) for name in adapters]
    if entry.family == "factor_wise":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination type {method!r} needs all adapters to have the same r, got {ranks}")
        new_rank = ranks[0]
    elif entry.family == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    kinds = {type(configs[name].target_modules) for name in adapters}
    if len(kinds) > 1:
        raise ValueError("adapters: target_modules mix strings (regex) and lists; peft cannot combine them")
    if kinds == {str}:
        targets = "|".join(f"({configs[name].target_modules})" for name in adapters)
    elif kinds == {set}:
        targets = functools.reduce(operator.or_, (configs[name].target_modules for name in adapters))
    else:
        raise ValueError(f"adapters: unsupported target_modules type {kinds.pop().__name__}")
    return method, new_rank, targets, weights


def _check_modules_to_save(lora_model, adapters) -> None:
    """Refuse adapters of which two or more train the same module in full (``modules_to_save``).

    Such trained copies are whole modules, not low-rank updates: there is nothing to merge them with.
    The message starts with peft's own, word for word (peft's test suite matches it), then names the
    modules and the adapters that train each.
    """
    from peft.utils import ModulesToSaveWrapper

    clashes = []
    for key, module in lora_model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            holders = [a for a in adapters if a in module.modules_to_save]
            if len(holders) > 1:
                clashes.append(f"{key!r} by {holders}")
    if clashes:
        raise ValueError("Cannot add weighted adapters if they target the same module with modules_to_save, but "
                         f"found {len(clashes)} such instance(s). adapters: modules trained in full "
                         f"(modules_to_save) by more than one of them: {'; '.join(clashes)}")


def _lora_layers(lora_model) -> dict[str, object]:
    """Canonical module name -> LoraLayer, for every LoRA layer of the model."""
    from peft.tuners.lora import LoraLayer

    return {canonical_name(key): m for key, m in lora_model.model.named_modules() if isinstance(m, LoraLayer)}


def _factors(layer, adapter: str):
    """(A, B) parameters of ``adapter`` on ``layer`` (Linear or Embedding LoRA), or None."""
    if adapter in layer.lora_A:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    elif adapter in getattr(layer, "lora_embedding_A", {}):
        a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    else:
        return None
    return a, b


def _extract(layers: dict, adapter: str) -> LoRA:
    """The adapter's factors as a kmerge_fast LoRA (views of the model's tensors, no copies)."""
    factors, scaling = {}, {}
    for name, layer in layers.items():
        pair = _factors(layer, adapter)
        if pair is None:
            continue
        a, b = pair
        if a.dim() != 2 or b.dim() != 2:
            raise Unsupported(f"module {name!r}: adapter {adapter!r} is a {type(layer).__name__} LoRA layer "
                              f"({a.dim()}-D factors); only Linear and Embedding layers are supported")
        if layer.use_dora.get(adapter, False):
            raise Unsupported(f"module {name!r}: adapter {adapter!r} uses DoRA; only plain LoRA is supported")
        factors[name] = (a.detach(), b.detach())
        scaling[name] = float(layer.scaling[adapter])
    if not factors:
        raise ValueError(f"adapters: adapter {adapter!r} has no LoRA layer in the model")
    return LoRA.from_factors(factors, scaling=scaling)


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None,
                         density: float | None = None, majority_sign_method: str = "total",
                         *, generator: torch.Generator | None = None) -> None:
    """peft's ``add_weighted_adapter``, computed by kmerge_fast (same arguments, same effect).

    Args:
        model: a ``PeftModel`` or ``LoraModel`` holding the ``adapters``.
        adapters, weights: the adapter names to merge and one finite weight each.
        adapter_name: the new adapter's name (must not exist yet).
        combination_type: one of peft's types (``kmerge_fast.methods.METHODS``);
            with a single adapter peft (and this) merges ``linear``.
        svd_rank: rank of the ``svd`` family's result (default: the largest input rank).
        svd_clamp: peft's quantile clamp of the ``svd`` family's factors.
        svd_full_matrices, svd_driver: accepted for compatibility, ignored.
        density, majority_sign_method: for TIES / DARE / magnitude pruning.
        generator: keyword-only, the ``torch.Generator`` DARE's seed is drawn from.

    The model is unchanged if anything is wrong with the arguments or the adapters.
    """
    lora_model = _lora_model(model)
    method, new_rank, targets, weights = _plan(lora_model, adapters, weights, adapter_name, combination_type,
                                               svd_rank, density, majority_sign_method)
    layers = _lora_layers(lora_model)
    loras = [_extract(layers, name) for name in adapters]
    entry = lookup(method)
    merged = merge(loras, weights, method=method, rank=new_rank if entry.takes_rank else None,
                   density=float(density) if entry.takes_density else None,
                   majority_sign_method=majority_sign_method, svd_clamp=svd_clamp if entry.takes_rank else None,
                   generator=generator)
    _install(lora_model, adapters[0], adapter_name, new_rank, targets, merged)


def _install(lora_model, template: str, adapter_name: str, rank: int, targets, merged: LoRA) -> None:
    """Add ``adapter_name`` with ``merged``'s factors (zero-padded to ``rank``); undone on failure."""
    from peft.utils.other import _freeze_adapter

    previous_active = lora_model.active_adapter
    lora_model.peft_config[adapter_name] = replace(lora_model.peft_config[template], r=rank, lora_alpha=rank,
                                                   target_modules=targets, alpha_pattern={}, rank_pattern={})
    try:
        lora_model.inject_adapter(lora_model.model, adapter_name)
        _freeze_adapter(lora_model.model, adapter_name)
        for name, layer in _lora_layers(lora_model).items():
            pair = _factors(layer, adapter_name)
            if pair is None:
                continue
            a, b = pair
            a.data.zero_()
            b.data.zero_()
            module = merged.modules.get(name)
            if module is not None:  # cat's rank may be below the config's: the rest stays zero, as in peft
                r = min(module.rank, a.shape[0])
                a.data[:r] = module.A[:r].to(a.device, a.dtype)
                b.data[:, :r] = module.B[:, :r].to(b.device, b.dtype)
    except BaseException:
        if adapter_name in lora_model.peft_config:
            try:
                lora_model.delete_adapter(adapter_name)
            except Exception:  # the injection failed half way: drop the config at least
                lora_model.peft_config.pop(adapter_name, None)
            lora_model.set_adapter(previous_active)
        raise


# ------------------------------------------------------------------ patching
_original = None


def _patched(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None, svd_clamp=None,
             svd_full_matrices=True, svd_driver=None, density=None, majority_sign_method="total"):
    try:
        return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                                    svd_full_matrices, svd_driver, density, majority_sign_method)
    except Unsupported as e:
        warnings.warn(f"kmerge_fast cannot merge these adapters ({e}); using peft's add_weighted_adapter",
                      stacklevel=2)
        return _original(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                         svd_full_matrices, svd_driver, density, majority_sign_method)


def patch() -> None:
    """Route ``LoraModel.add_weighted_adapter`` (and so ``PeftModel``'s) through kmerge_fast. Idempotent."""
    global _original
    from peft.tuners.lora import LoraModel

    if _original is None:
        _original = LoraModel.add_weighted_adapter
        LoraModel.add_weighted_adapter = functools.wraps(_original)(_patched)


def unpatch() -> None:
    """Restore peft's own ``add_weighted_adapter``. Idempotent."""
    global _original
    from peft.tuners.lora import LoraModel

    if _original is not None:
        LoraModel.add_weighted_adapter = _original
        _original = None


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return _original is not None
