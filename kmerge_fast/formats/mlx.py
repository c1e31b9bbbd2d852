"""MLX-LM LoRA adapter folders (``mlx_lm.generate --adapter-path``, ``mlx_lm.fuse``).

API::

    from kmerge_fast.formats.mlx import save_mlx, load_mlx
    save_mlx(lora, "adapters/qa_mlx")            # adapters.safetensors + adapter_config.json
    lora = load_mlx("adapters/qa_mlx")

Where the layout comes from
---------------------------
Read from MLX-LM's source (ml-explore/mlx-lm; not run: mlx does not run on
Linux, so this module is tested against the layout described here only):

* ``mlx_lm/tuner/lora.py``, ``LoRALinear``: ``lora_a`` has shape
  ``(input_dims, r)``, ``lora_b`` ``(r, output_dims)``, and the layer computes
  ``y = linear(x) + scale * (x @ lora_a) @ lora_b``; ``fuse`` adds
  ``(scale * lora_b.T) @ lora_a.T``. So ``lora_a = A.T``, ``lora_b = B.T`` and
  ``scale`` is our scaling (a multiplier, no division by the rank).
* ``mlx_lm/tuner/utils.py``, ``load_adapters``: reads ``adapter_config.json``
  (``fine_tune_type``, default ``"lora"``; ``num_layers``;
  ``lora_parameters`` = {``rank``, ``scale``, ``dropout``, ``keys``}), wraps
  the modules named by ``keys`` (paths relative to a decoder layer, such as
  ``self_attn.q_proj``) in the last ``num_layers`` layers
  (``model.layers[-max(num_layers, 0):]``, so ``-1``, indeed any value
  <= 0, means every layer) with
  one rank and one scale for all, then loads ``adapters.safetensors`` with
  ``strict=False``: weights for a module it did not wrap are ignored
  silently.
* Weight keys are the model's parameter paths:
  ``model.layers.N.self_attn.q_proj.lora_a`` / ``.lora_b`` (MLX-LM's Llama,
  Mistral and Qwen2 models name their modules as transformers does).

Conventions of this module
--------------------------
* Modules must be ``model.layers.N.<path>`` (peft's ``base_model.model.``
  prefix is stripped when present); others (``lm_head``) are refused with an
  :class:`~kmerge_fast.AdapterError` naming them.
* One rank: modules of a lower rank are padded with zero rows of A and zero
  columns of B up to the highest rank (dW unchanged); they load back at that
  rank.
* One scale: when modules' scalings differ, ``scale`` is the most common
  nonzero one and every other module's ``scaling / scale`` is folded into its
  B (in float64, then cast); dW unchanged up to that rounding.
* ``keys`` is the sorted set of layer-relative paths; ``dropout`` 0.0;
  ``num_layers`` is ``-1`` (all layers) unless given; a positive value must
  cover the adapter's layers (MLX-LM wraps only the last ``num_layers``
  layers; which these are depends on the base's depth, unknown here).
* dtypes: float32, float16 and bfloat16 are kept; float64 is written as float32.
  The safetensors header carries ``{"format": "mlx"}`` as ``mx.save_safetensors`` writes.
* Both files are written atomically (weights first, config last); existing
  ones are refused unless ``overwrite=True``.

:func:`load_mlx` refuses DoRA (``fine_tune_type: "dora"``) and full
fine-tunes, keys other than ``.lora_a`` / ``.lora_b``, a module whose rank is
not ``lora_parameters.rank`` or whose path is not in ``keys``, and layers
outside ``num_layers``; every error names the file and the field or module.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch

from ..errors import AdapterError
from ..files import atomic_write
from ..names import canonical_name
from . import safetensors_file

__all__ = ["save_mlx", "load_mlx", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
_LAYER_RE = re.compile(r"^model\.layers\.(0|[1-9][0-9]{0,5})\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)$")
_KEEP = (torch.float32, torch.float16, torch.bfloat16)
_MAX_CONFIG_BYTES = 16 << 20


def _most_common_nonzero(values: list[float]) -> float:
    counts = Counter(v for v in values if v != 0.0)
    return counts.most_common(1)[0][0] if counts else (values[0] if values else 1.0)


def save_mlx(lora, folder: str | os.PathLike, num_layers: int | None = None, overwrite: bool = False) -> None:
    """Write ``lora`` as an MLX-LM adapter folder (created if missing).

    Files: ``adapters.safetensors`` with ``model.layers.N.<path>.lora_a`` =
    A.T (n_in, r) and ``.lora_b`` = B.T (r, n_out); ``adapter_config.json``
    with ``fine_tune_type: "lora"``, ``num_layers`` and ``lora_parameters``
    {rank, scale, dropout, keys}. See the module docstring for the rank
    padding and scale folding.

    Raises:
        AdapterError: a module outside ``model.layers.N.``, a ``num_layers``
            that does not cover the adapter's layers, or existing files.
    """
    folder = Path(folder)
    weights_path, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not overwrite:
        for p in (weights_path, config_path):
            if p.exists():
                raise AdapterError(f"{p}: already exists (pass overwrite=True to replace it)")
    planned, bad = [], []
    for key, module in lora.modules.items():
        m = _LAYER_RE.match(canonical_name(key))
        if not m:
            bad.append(key)
        else:
            planned.append((key, canonical_name(key), int(m.group(1)), m.group(2), module))
    if bad:
        shown = ", ".join(repr(b) for b in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise AdapterError(f"{folder}: MLX-LM adapters hold only modules inside decoder layers "
                           f"(model.layers.N.<path>); cannot write {shown}")
    if not planned:
        raise AdapterError(f"{folder}: the adapter has no modules")
    names = [hf for _, hf, *_ in planned]
    if len(set(names)) != len(names):
        raise AdapterError(f"{folder}: two module keys name the same module (with and without peft's prefix)")
    layers = [layer for _, _, layer, _, _ in planned]
    span = max(layers) - min(layers) + 1
    if num_layers is None:
        num_layers = -1
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or (num_layers != -1 and num_layers < span):
        raise AdapterError(f"{folder}: num_layers={num_layers!r} cannot cover layers {min(layers)}..{max(layers)}; "
                           f"give -1 (all layers) or the base model's layer count")

    rank = max(int(m.A.shape[0]) for *_, m in planned)
    scalings = [float(m.scaling) for *_, m in planned]
    scale = _most_common_nonzero(scalings)
    tensors = {}
    for (key, hf, _, _, module), s in zip(planned, scalings):
        A, B = module.A.detach().to("cpu"), module.B.detach().to("cpu")
        dtype = A.dtype if A.dtype in _KEEP else torch.float32
        if s != scale:
            B = B.to(torch.float64) * (s / scale)
        A, B = A.to(dtype), B.to(dtype)
        if not bool(torch.isfinite(B).all()):
            raise AdapterError(f"{folder}: module {key!r}: folding its scaling {s} into lora_B overflows {dtype}")
        pad = rank - A.shape[0]
        if pad:
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])], 0)
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1)
        tensors[f"{hf}.lora_a"] = A.T.contiguous()
        tensors[f"{hf}.lora_b"] = B.T.contiguous()
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0,
                            "keys": sorted({rel for _, _, _, rel, _ in planned})},
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(weights_path, lambda tmp: safetensors_file.write(tmp, tensors, {"format": "mlx"}))
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(config_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _field(cfg: dict, name: str, where: Path):
    if name not in cfg:
        raise AdapterError(f"{where}: field {name!r} is missing")
    return cfg[name]


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError(f"{path}: not found (an MLX-LM adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    size = path.stat().st_size
    if size > _MAX_CONFIG_BYTES:
        raise AdapterError(f"{path}: {size} bytes, too large for an adapter config")
    try:
        cfg = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: holds {type(cfg).__name__}, expected a JSON object")
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        what = {"dora": "DoRA", "full": "a full fine-tune"}.get(kind, repr(kind))
        raise AdapterError(f"{path}: field 'fine_tune_type' is {kind!r}; {what} is not a LoRA adapter "
                           "(only 'lora' is read)")
    num_layers = _field(cfg, "num_layers", path)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise AdapterError(f"{path}: field 'num_layers' is {num_layers!r}, expected an integer")
    params = _field(cfg, "lora_parameters", path)
    if not isinstance(params, dict):
        raise AdapterError(f"{path}: field 'lora_parameters' is {type(params).__name__}, expected an object")
    rank = params.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"{path}: field 'lora_parameters.rank' is {rank!r}, expected a positive integer")
    scale = params.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AdapterError(f"{path}: field 'lora_parameters.scale' is {scale!r}, expected a finite number")
    keys = params.get("keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise AdapterError(f"{path}: field 'lora_parameters.keys' is {keys!r}, expected a list of strings")
    return {"num_layers": num_layers, "rank": rank, "scale": float(scale), "keys": keys}


def load_mlx(folder: str | os.PathLike):
    """Read an MLX-LM LoRA adapter folder as a :class:`kmerge_fast.LoRA`.

    Module names are the model's paths (``model.layers.0.self_attn.q_proj``);
    A = ``lora_a``.T (r, n_in), B = ``lora_b``.T (n_out, r), in the file's
    dtype (float32 when lora_a and lora_b differ); every module's scaling is
    ``lora_parameters.scale``.
    """
    import kmerge_fast as kf
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder (an MLX-LM adapter is a folder)")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    cfg = _read_config(config_path)
    if not weights_path.is_file():
        raise AdapterError(f"{weights_path}: not found")
    try:
        state = st_load(weights_path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{weights_path}: not a valid safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        module, _, which = key.rpartition(".")
        if which not in ("lora_a", "lora_b") or not module:
            raise AdapterError(f"{weights_path}: tensor {key!r} is not a LoRA factor (.lora_a / .lora_b); "
                               "DoRA magnitudes and full weights are not read")
        pairs.setdefault(module, {})[which] = t
    if not pairs:
        raise AdapterError(f"{weights_path}: holds no tensors")
    factors, layers = {}, []
    for module, ab in pairs.items():
        where = f"{weights_path}: module {module!r}"
        if set(ab) != {"lora_a", "lora_b"}:
            raise AdapterError(f"{where}: has {sorted(ab)[0]} but not {'lora_b' if 'lora_a' in ab else 'lora_a'}")
        m = _LAYER_RE.match(module)
        if not m:
            raise AdapterError(f"{where}: not inside a decoder layer (model.layers.N.<path>)")
        layers.append(int(m.group(1)))
        if cfg["keys"] is not None and m.group(2) not in cfg["keys"]:
            raise AdapterError(f"{config_path}: field 'lora_parameters.keys' lacks {m.group(2)!r}, which "
                               f"{WEIGHTS_NAME} holds for {module!r} (MLX-LM would ignore it)")
        la, lb = ab["lora_a"], ab["lora_b"]
        if la.dim() != 2 or lb.dim() != 2 or la.shape[1] != lb.shape[0]:
            raise AdapterError(f"{where}: lora_a {tuple(la.shape)} and lora_b {tuple(lb.shape)} are not "
                               "(n_in, r) and (r, n_out)")
        if la.shape[1] != cfg["rank"]:
            raise AdapterError(f"{config_path}: field 'lora_parameters.rank' is {cfg['rank']} but {module!r} "
                               f"has rank {la.shape[1]}")
        A, B = la.T.contiguous(), lb.T.contiguous()
        if A.dtype != B.dtype:
            A, B = A.float(), B.float()
        factors[module] = (A, B)
    span = max(layers) - min(layers) + 1
    if 0 < cfg["num_layers"] < span:  # num_layers <= 0 wraps every layer (layers[-max(n, 0):])
        raise AdapterError(f"{config_path}: field 'num_layers' is {cfg['num_layers']}, fewer than the "
                           f"{span} layers ({min(layers)}..{max(layers)}) the weights cover")
    try:
        return kf.LoRA.from_factors(factors, scaling=cfg["scale"])
    except AdapterError as e:
        raise AdapterError(f"{weights_path}: {e}") from None
