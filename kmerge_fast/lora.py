"""LoRA adapters: the public names of :mod:`kmerge_fast.adapter` and :mod:`kmerge_fast.formats.peft`.

The code lives in

* :mod:`kmerge_fast.adapter`: :class:`LoRA`, :class:`LoRAModule`, their checks
  and the finiteness scan;
* :mod:`kmerge_fast.names`: module names (base-model paths) and peft's keys;
* :mod:`kmerge_fast.formats.peft`: peft's adapter folder (load, save, config);
* :mod:`kmerge_fast.formats.patterns`: peft's rank / alpha pattern keys.

This module re-exports what it defined before that split, so
``from kmerge_fast.lora import LoRA`` and ``kf.lora.CONFIG_NAME`` keep working.
"""

from .adapter import (
    SUPPORTED_DTYPES,
    LoRA,
    LoRAModule,
    ModuleMap,
    all_finite,
    all_finite_many,
    check_module,
    first_non_finite,
)
from .formats.patterns import MAX_PATTERN_KEY_CHARS, MAX_PATTERN_PROGRAM, MAX_PATTERN_WORK, compile_pattern_key
from .formats.peft import CONFIG_NAME, MAX_CONFIG_BYTES, PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from .names import PEFT_PREFIX, canonical_name, peft_key

__all__ = [
    "CONFIG_NAME",
    "MAX_CONFIG_BYTES",
    "MAX_PATTERN_KEY_CHARS",
    "MAX_PATTERN_PROGRAM",
    "MAX_PATTERN_WORK",
    "PEFT_PREFIX",
    "PICKLE_WEIGHTS_NAME",
    "SUPPORTED_DTYPES",
    "WEIGHTS_NAME",
    "LoRA",
    "LoRAModule",
    "ModuleMap",
    "all_finite",
    "all_finite_many",
    "canonical_name",
    "check_module",
    "compile_pattern_key",
    "first_non_finite",
    "peft_key",
]
