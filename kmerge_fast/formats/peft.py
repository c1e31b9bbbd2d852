"""peft's adapter format: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

Exactly what ``PeftModel.save_pretrained`` writes, so adapters move freely
between peft and kmerge_fast. :func:`load` reads each file once into private
memory and :func:`load_bytes` parses given bytes, with the same checks: a
loaded adapter never depends on its files afterwards, and every malformed
config field is an :class:`AdapterError` that names the file and the field.
:meth:`LoRA.load <kmerge_fast.LoRA.load>`, ``load_bytes``, ``save`` and
``peft_config`` call the functions here.

The files key each module by peft's name, ``base_model.model.`` + its path in
the base model (:func:`kmerge_fast.names.peft_key`); a :class:`LoRA` keys it by
the path alone. Loading strips the prefix, saving adds it back. Rank and
alpha pattern keys are matched by :mod:`kmerge_fast.formats.patterns`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import LoRA, LoRAModule, check_module, exact_module_map
from ..errors import AdapterError
from ..files import atomic_write
from ..names import canonical_name, peft_key
from . import safetensors_file
from .patterns import compile_pattern_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

#: Largest ``adapter_config.json`` accepted, in bytes. peft's configs are a few
#: KiB; the bound keeps a hostile or mistaken file from being read whole.
MAX_CONFIG_BYTES = 1 << 20

_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# Keys peft writes for adapter kinds we do not merge; named in the error so the
# user learns why the file was refused.
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora=True)",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "lora_bias": "LoRA with trainable bias (lora_bias=True)",
}


def load(path: str | os.PathLike, allow_pickle: bool = False, device: str | torch.device = "cpu",
         cls: type[LoRA] = LoRA) -> LoRA:
    """:meth:`LoRA.load <kmerge_fast.LoRA.load>`: read a peft adapter folder into a ``cls``."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory (expected a peft adapter folder)")
    if not cfg_path.is_file():
        raise AdapterError(f"{cfg_path}: missing (not a peft adapter folder?)")
    config = _read_file(cfg_path, MAX_CONFIG_BYTES)
    weights_path = path / WEIGHTS_NAME
    pickle_path = path / PICKLE_WEIGHTS_NAME
    if weights_path.is_file():
        return from_bytes(config, _read_file(weights_path), path, device, pickled=False, cls=cls)
    if pickle_path.is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{pickle_path}: pickled adapter refused (pickles can run code); pass allow_pickle=True "
                "if you trust this file"
            )
        return from_bytes(config, _read_file(pickle_path), path, device, pickled=True, cls=cls)
    raise AdapterError(f"{path}: missing {WEIGHTS_NAME}")


def from_bytes(config: bytes, weights: bytes, where: str | os.PathLike, device="cpu", pickled: bool = False,
               cls: type[LoRA] = LoRA) -> LoRA:
    """The one parser behind :meth:`LoRA.load <kmerge_fast.LoRA.load>` and ``LoRA.load_bytes``.

    ``pickled``: ``weights`` is an ``adapter_model.bin`` for ``torch.load``.
    Messages name a module by its path in the base model, a tensor by its key.
    """
    folder = Path(where)
    cfg_path = folder / CONFIG_NAME
    weights_path = folder / (PICKLE_WEIGHTS_NAME if pickled else WEIGHTS_NAME)
    if len(config) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{cfg_path}: {len(config)} bytes, larger than the {MAX_CONFIG_BYTES} bytes an "
                           "adapter config may have")
    cfg = _AdapterConfig.parse(config, str(cfg_path))
    state = (_parse_pickle if pickled else _parse_safetensors)(weights, weights_path, device)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY_RE.match(key)
        if match is None:
            why = next((v for k, v in _UNSUPPORTED_KEYS.items() if k in key), None)
            detail = f"unsupported adapter kind: {why}" if why else "not a lora_A / lora_B weight"
            raise AdapterError(f"{weights_path}: key {key!r}: {detail}")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor

    modules: dict[str, LoRAModule] = {}
    file_keys: dict[str, str] = {}  # module path -> its key in the file
    for key, ab in pairs.items():
        name = canonical_name(key)  # messages name the module by its path, as everywhere
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise AdapterError(f"{weights_path}: module {name!r}: lora_{missing}.weight is missing")
        if name in file_keys:
            raise AdapterError(f"{weights_path}: module {name!r} appears twice, as {file_keys[name]!r} and "
                               f"as {key!r}")
        file_keys[name] = key
        r, alpha = cfg.rank_and_alpha(name)
        check_module(name, ab["A"], ab["B"], 1.0, str(weights_path))  # values: in cls() below
        if ab["A"].shape[0] != r:
            raise AdapterError(
                f"{weights_path}: module {name!r}: lora_A has rank {ab['A'].shape[0]} but the config "
                f"({cfg_path.name}, r / rank_pattern) says {r}"
            )
        scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        modules[name] = LoRAModule(ab["A"], ab["B"], float(scaling))
    # Keyed by base-model paths already: a ModuleMap, so that the LoRA does not strip them again.
    return cls(exact_module_map(modules), cfg.keep, str(weights_path))


def save(lora: LoRA, path: str | os.PathLike, atomic: bool = True) -> None:
    """:meth:`LoRA.save <kmerge_fast.LoRA.save>`: write ``lora`` as a peft adapter folder."""
    if not lora.modules:
        raise AdapterError(f"{path}: refusing to save an adapter with no modules")
    for name, m in lora.modules.items():
        if m.rank == 0:  # adapter_config.json would need r = 0, which peft (and load) refuse
            raise AdapterError(f"{path}: module {name!r} has rank 0, which a peft adapter cannot hold; "
                               "drop the module (its update is zero)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, m in lora.modules.items():
        key = peft_key(name)
        state[f"{key}.lora_A.weight"] = m.A.detach().contiguous().cpu()
        state[f"{key}.lora_B.weight"] = m.B.detach().contiguous().cpu()
    config = peft_config(lora)

    def write_weights(tmp: str) -> None:
        # Streamed from the tensors (not safetensors' save_file(), which writes a file of its own with
        # mode 0600 and renames it over the target)
        safetensors_file.write(tmp, state, {"format": "pt"})

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    for name, write in ((WEIGHTS_NAME, write_weights), (CONFIG_NAME, write_config)):
        if atomic:
            atomic_write(path / name, write)
        else:
            write(str(path / name))


def peft_config(lora: LoRA) -> dict:
    """:meth:`LoRA.peft_config <kmerge_fast.LoRA.peft_config>`: the ``adapter_config.json`` contents."""
    ranks = {n: m.rank for n, m in lora.modules.items()}
    alphas = {n: m.scaling * m.rank for n, m in lora.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    # Exact, regex-escaped module paths: peft matches pattern keys as regexes.
    rank_pattern = {re.escape(n): ranks[n] for n in lora.modules if ranks[n] != r}
    alpha_pattern = {re.escape(n): alphas[n] for n in lora.modules if alphas[n] != alpha}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": lora.config.get("base_model_name_or_path"),
        "task_type": lora.config.get("task_type"),
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(lora.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def _short(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: messages quote user data, which may be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_finite_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


@dataclass
class _AdapterConfig:
    """The fields of ``adapter_config.json`` the loader uses, validated (see :meth:`LoRA.load_bytes`)."""

    r: int
    alpha: float
    rank_pattern: list  # [(key, matches(module_path) -> bool, value)] in the file's order
    alpha_pattern: list
    use_rslora: bool
    keep: dict  # fields carried through a save
    where: str

    @classmethod
    def parse(cls, data: bytes, where: str) -> "_AdapterConfig":
        try:
            cfg = json.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise AdapterError(f"{where}: cannot parse: {e}") from None
        if not isinstance(cfg, dict):
            raise AdapterError(f"{where}: expected a JSON object")
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{where}: unsupported adapter type {_short(cfg.get('peft_type'))}; "
                               "only LoRA is supported")
        flags = {}
        for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
            value = cfg.get(key)
            # A string such as "false" is truthy: refuse it rather than guess.
            if value is not None and not isinstance(value, bool):
                raise AdapterError(f"{where}: field {key!r} must be true or false, got {_short(value)}")
            flags[key] = bool(value)
        if flags["use_dora"]:
            raise AdapterError(f"{where}: DoRA adapters (use_dora=true) are not supported")
        if flags["fan_in_fan_out"]:
            raise AdapterError(f"{where}: fan_in_fan_out=true (Conv1D layers) is not supported")
        r = cfg.get("r", 8)
        if not _is_positive_int(r):
            raise AdapterError(f"{where}: field 'r' must be a positive integer, got {_short(r)}")
        alpha = cfg.get("lora_alpha", 8)
        if not _is_finite_number(alpha):
            raise AdapterError(f"{where}: field 'lora_alpha' must be a finite number, got {_short(alpha)}")
        return cls(
            r=r,
            alpha=alpha,
            rank_pattern=cls._patterns(cfg, "rank_pattern", where, _is_positive_int, "a positive integer"),
            alpha_pattern=cls._patterns(cfg, "alpha_pattern", where, _is_finite_number, "a finite number"),
            use_rslora=flags["use_rslora"],
            keep={k: cfg[k] for k in ("base_model_name_or_path", "task_type") if k in cfg},
            where=where,
        )

    @staticmethod
    def _patterns(cfg: dict, field_name: str, where: str, valid, expected: str) -> list:
        patterns = cfg.get(field_name)
        if patterns is None:
            return []
        if not isinstance(patterns, dict):
            raise AdapterError(f"{where}: field {field_name!r} must be an object {{module pattern: value}}, "
                               f"got {type(patterns).__name__}")
        out = []
        for key, value in patterns.items():
            if not valid(value):
                raise AdapterError(f"{where}: field {field_name!r}: key {_short(key)}: value must be {expected}, "
                                   f"got {_short(value)}")
            try:
                matches = compile_pattern_key(key)
            except ValueError as e:
                raise AdapterError(f"{where}: field {field_name!r}: key {_short(key)}: {e}") from None
            out.append((key, matches, value))
        return out

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """(r, lora_alpha) of one module: the value of the first pattern key matching it, else the default."""
        values = []
        for field_name, patterns, default in (("rank_pattern", self.rank_pattern, self.r),
                                              ("alpha_pattern", self.alpha_pattern, self.alpha)):
            for key, matches, value in patterns:
                try:
                    hit = matches(module_path)
                except ValueError as e:  # a regex key over its work budget
                    raise AdapterError(f"{self.where}: field {field_name!r}: key {_short(key)}: {e}") from None
                if hit:
                    values.append(value)
                    break
            else:
                values.append(default)
        return values[0], values[1]


# ---------------------------------------------------------------- file bytes
def _read_file(path: Path, limit: int | None = None) -> bytes:
    """The whole contents of ``path`` in private memory; over ``limit`` bytes is an AdapterError."""
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as e:
        raise AdapterError(f"{path}: cannot read: {e}") from None
    if limit is not None and len(data) > limit:
        raise AdapterError(f"{path}: larger than {limit} bytes, the most an adapter config may have")
    return data


def _own(state: dict, device) -> dict:
    """Each tensor of ``state`` copied, contiguous, into memory of its own on ``device``.

    The loaders' tensors may be views of a buffer (safetensors' per-tensor
    bytes) or share one storage between keys (a pickle of views); a copy makes
    each factor independent of the file, the buffer and the other factors.
    Tensors are replaced one at a time, so the peak is one extra tensor.
    """
    for key in list(state):
        t = state[key]
        if isinstance(t, torch.Tensor):
            state[key] = t.to(device=device, memory_format=torch.contiguous_format, copy=True)
    return state


def _parse_safetensors(data: bytes, path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        state = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise AdapterError(f"{path}: corrupt or unreadable safetensors file: {e}") from None
    # load() returns the tensors in hash order; sort them by name as load_file() does, so
    # that module order (and every result that depends on it) is the same on every run.
    return _own({key: state[key] for key in sorted(state)}, device)


def _parse_pickle(data: bytes, path: Path, device) -> dict[str, torch.Tensor]:
    import io

    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # torch raises many kinds here
        raise AdapterError(f"{path}: cannot read: {e}") from None
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: expected a state dict")
    return _own(state, device)
