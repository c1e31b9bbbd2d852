"""On-disk adapter formats, one module each: :mod:`~kmerge_fast.formats.peft` is
peft's folder (``adapter_config.json`` + ``adapter_model.safetensors``), with its
rank / alpha pattern keys in :mod:`~kmerge_fast.formats.patterns`; other formats
(llama.cpp's GGUF, MLX-LM's folder) sit beside it. peft's and MLX-LM's weights
files are written by :mod:`~kmerge_fast.formats.safetensors_file`.

Each format reads into and writes from a :class:`kmerge_fast.LoRA`, whose
modules are keyed by base-model paths (:mod:`kmerge_fast.names`); a format's
own naming (peft's ``base_model.model.`` prefix) stays inside it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The formats :meth:`LoRA.save <kmerge_fast.LoRA.save>` writes and :meth:`LoRA.load <kmerge_fast.LoRA.load>` reads.
FORMATS = ("peft", "gguf", "mlx")


def check_format(format: str) -> str:
    """``format`` if it is one of :data:`FORMATS`; ValueError naming the argument otherwise."""
    if format not in FORMATS:
        raise ValueError(f"format: unknown {format!r}; choose from {list(FORMATS)}")
    return format


def detect(path: str | os.PathLike) -> str:
    """The format of an adapter on disk: ``gguf`` for a file ending in ``.gguf``, ``mlx`` for a
    folder holding ``adapters.safetensors`` (MLX-LM's weights), else ``peft``."""
    path = Path(path)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return "gguf"
    if (path / "adapters.safetensors").is_file():
        return "mlx"
    return "peft"
