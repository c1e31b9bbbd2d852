"""On-disk adapter formats, one module each: :mod:`~kmerge_fast.formats.peft` is
peft's folder (``adapter_config.json`` + ``adapter_model.safetensors``), with its
rank / alpha pattern keys in :mod:`~kmerge_fast.formats.patterns`; other formats
(llama.cpp's GGUF, MLX-LM's folder) sit beside it.

Each format reads into and writes from a :class:`kmerge_fast.LoRA`, whose
modules are keyed by base-model paths (:mod:`kmerge_fast.names`); a format's
own naming (peft's ``base_model.model.`` prefix) stays inside it.
"""
