"""LoRA adapters in memory, and their on-disk format (peft's).

A LoRA module holds ``A`` (r x n_in), ``B`` (n_out x r) and a scalar ``scaling``
s; its update to the base weight is ``dW = s * B @ A`` (n_out x n_in). A
:class:`LoRA` is a dict of such modules keyed by peft's module key without
the adapter name, e.g. ``"base_model.model.model.layers.0.self_attn.q_proj"``.

On disk an adapter is a folder with ``adapter_config.json`` and
``adapter_model.safetensors``, exactly as ``PeftModel.save_pretrained`` writes
it, so adapters move freely between peft and kmerge_fast.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .errors import AdapterError
from .ops import cpu

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

#: peft's prefix of every key of a saved adapter: PeftModel -> LoraModel -> base model.
PEFT_PREFIX = "base_model.model."

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# Keys peft writes for adapter kinds we do not merge; named in the error so the
# user learns why the file was refused.
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora=True)",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "lora_bias": "LoRA with trainable bias (lora_bias=True)",
}


@dataclass
class LoRAModule:
    """One low-rank update ``dW = scaling * B @ A``.

    Attributes:
        A: (r, n_in) tensor, floating point.
        B: (n_out, r) tensor, same dtype and device as ``A``.
        scaling: the scalar s (peft: ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float = 1.0
    # Cached squared Frobenius norm of dW, keyed on the tensors' identity and
    # version counters so that any in-place change invalidates it.
    _norm_cache: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(n_out, n_in): the shape of the base weight this module updates."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense update ``s * B @ A`` (n_out x n_in), for tests and debugging only.

        Computed in ``dtype`` (default: float32 for half types, else the factors' dtype).
        """
        if dtype is None:
            dtype = torch.promote_types(self.A.dtype, torch.float32)
        return self.scaling * (self.B.to(dtype) @ self.A.to(dtype))

    def _norm_key(self, arithmetic: str) -> tuple:
        return (arithmetic, self.A.data_ptr(), self.A._version, self.B.data_ptr(), self.B._version, self.scaling)

    def cached_sq_norm(self, arithmetic: str) -> float | None:
        """The cached ``||dW||_F^2`` if ``arithmetic`` computed it and the factors did not change since.

        ``arithmetic`` names how it was computed (similarity uses
        ``"<backend>/<precise|fast>"``). Keyed that way because l2 distances
        subtract the norms from inner products: both must come from the same
        arithmetic, or an adapter's distance to itself is rounding noise
        magnified by a square root.
        """
        if self._norm_cache is not None and self._norm_cache[0] == self._norm_key(arithmetic):
            return self._norm_cache[1]
        return None

    def cache_sq_norm(self, value: float, arithmetic: str) -> None:
        self._norm_cache = (self._norm_key(arithmetic), float(value))


def check_module(name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, where: str = "") -> None:
    """Raise :class:`AdapterError` unless (A, B, scaling) is a well-formed LoRA module.

    ``where`` names the file (or other source) for the message. Checks the
    structure (types, shapes, dtypes, devices) and the scaling; the factors'
    values (NaN / Inf) are :func:`first_non_finite`'s, for all modules at once.
    """
    src = f"{where}: " if where else ""
    for label, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise AdapterError(f"{src}module {name!r}: lora_{label} is {type(t).__name__}, expected a torch.Tensor")
        if t.dim() != 2:
            raise AdapterError(
                f"{src}module {name!r}: lora_{label} has shape {tuple(t.shape)}; only 2-D (linear-layer) "
                "LoRA weights are supported (convolution LoRA is not)"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise AdapterError(f"{src}module {name!r}: lora_{label} has dtype {t.dtype}, expected one of "
                               f"{[str(d) for d in SUPPORTED_DTYPES]}")
    if A.shape[0] != B.shape[1]:
        raise AdapterError(
            f"{src}module {name!r}: rank mismatch, lora_A is {tuple(A.shape)} (r x in) but lora_B is "
            f"{tuple(B.shape)} (out x r)"
        )
    if A.dtype != B.dtype:
        raise AdapterError(f"{src}module {name!r}: lora_A is {A.dtype} but lora_B is {B.dtype}")
    if A.device != B.device:
        raise AdapterError(f"{src}module {name!r}: lora_A is on {A.device} but lora_B on {B.device}")
    if not math.isfinite(float(scaling)):
        raise AdapterError(f"{src}module {name!r}: scaling is {scaling}")


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or Inf.

    One fused min/max reduction proves it: NaN propagates into both, and an
    Inf is the min or the max. It never overflows and is ~5x cheaper than
    ``isfinite(t).all()`` (it runs on every factor of every adapter built).
    """
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def all_finite_many(tensors: list[torch.Tensor]) -> list[bool]:
    """:func:`all_finite` of each 2-D tensor, the CPU ones in one C++ call when it is built.

    The C++ scan tests exponent bits on the extension's own threads. torch's
    reductions would also wake torch's thread pool, whose workers then spin
    for a while and take cores from the next kernel (measured: ~10 ms of CPU
    per 8-adapter merge on 2 cores).
    """
    flags: list[bool | None] = [None] * len(tensors)
    if cpu.unavailable_reason() is None:
        on_cpu = [i for i, t in enumerate(tensors)
                  if t.dim() == 2 and t.numel() and cpu.unsupported_reason(t.device, t.dtype) is None]
        for i, ok in zip(on_cpu, cpu.all_finite([tensors[i] for i in on_cpu])):
            flags[i] = ok
    return [all_finite(t) if f is None else f for t, f in zip(tensors, flags)]


def first_non_finite(modules: Mapping[str, LoRAModule]) -> tuple[str, str] | None:
    """(module name, ``"A"`` or ``"B"``) of the first factor holding NaN or Inf, or None; one batched pass."""
    flags = iter(all_finite_many([t for m in modules.values() for t in (m.A, m.B)]))
    for name in modules:
        for label in ("A", "B"):
            if not next(flags):
                return name, label
    return None


def canonical_name(name: str) -> str:
    """peft's key of a module: ``base_model.model.`` + its path in the base model."""
    return name if name.startswith(PEFT_PREFIX) else PEFT_PREFIX + name


def _pattern_value(patterns: Mapping[str, object], module_path: str, default):
    """peft's rule for rank_pattern / alpha_pattern: the first key that matches the
    end of the module path as a regex (``(.*\\.)?(key)$``) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


class LoRA:
    """A LoRA adapter: module key -> :class:`LoRAModule`.

    Build one with :meth:`load` (a peft adapter folder) or :meth:`from_factors`
    (tensors); write it with :meth:`save`.

    Attributes:
        modules: dict from peft module key (without adapter name) to LoRAModule.
        config: the extra fields of the peft config to carry through a save
            (``base_model_name_or_path``, ``task_type``); rank, alpha and target
            modules are always derived from the modules themselves.
    """

    def __init__(self, modules: Mapping[str, LoRAModule], config: Mapping | None = None, source: str = ""):
        self.modules: dict[str, LoRAModule] = dict(modules)
        self.config: dict = dict(config or {})
        for name, m in self.modules.items():
            check_module(name, m.A, m.B, m.scaling, source)
        bad = first_non_finite(self.modules)
        if bad:
            src = f"{source}: " if source else ""
            raise AdapterError(f"{src}module {bad[0]!r}: lora_{bad[1]} contains NaN or Inf")

    # ------------------------------------------------------------------ build
    @classmethod
    def from_factors(
        cls,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        scaling: float | Mapping[str, float] = 1.0,
        config: Mapping | None = None,
    ) -> "LoRA":
        """Build an adapter from ``{name: (A, B)}`` with A (r x in), B (out x r).

        ``name`` is a module's path in the base model (``model.layers.0.self_attn.q_proj``)
        or peft's key (the same with ``base_model.model.`` in front); both give
        peft's key. ``scaling`` is one float for all modules or a dict per name.
        """
        modules = {}
        for name, pair in factors.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise AdapterError(f"module {name!r}: expected a pair (A, B), got {type(pair).__name__}")
            A, B = pair
            if isinstance(scaling, Mapping):
                if name not in scaling:
                    raise AdapterError(f"module {name!r}: no scaling given (scaling dict lacks it)")
                s = float(scaling[name])
            else:
                s = float(scaling)
            modules[canonical_name(name)] = LoRAModule(A, B, s)
        if isinstance(scaling, Mapping):
            extra = set(scaling) - set(factors)
            if extra:
                raise AdapterError(f"scaling given for unknown modules: {sorted(extra)[:5]}")
        return cls(modules, config)

    # -------------------------------------------------------------- properties
    @property
    def names(self) -> list[str]:
        return list(self.modules)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the factors (None for an adapter without modules)."""
        for m in self.modules.values():
            return m.dtype
        return None

    @property
    def device(self) -> torch.device | None:
        for m in self.modules.values():
            return m.A.device
        return None

    @property
    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.modules.items()}

    def nbytes(self) -> int:
        """Bytes held by the factors."""
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LoRA":
        """A copy with factors converted (a no-op conversion shares storage)."""
        return LoRA(
            {n: LoRAModule(m.A.to(device=device, dtype=dtype), m.B.to(device=device, dtype=dtype), m.scaling)
             for n, m in self.modules.items()},
            self.config,
        )

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return f"LoRA({len(self.modules)} modules, ranks={ranks}, dtype={self.dtype})"

    # ---------------------------------------------------------------------- I/O
    @classmethod
    def load(cls, path: str | os.PathLike, allow_pickle: bool = False, device: str | torch.device = "cpu") -> "LoRA":
        """Read a peft LoRA adapter folder.

        Args:
            path: folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
            allow_pickle: also accept a pickled ``adapter_model.bin`` (loaded with
                ``torch.load(weights_only=True)``). Off by default: pickles can run code.
            device: where to put the factors.

        Raises:
            AdapterError: missing or corrupt files, an unsupported peft type (DoRA,
                embedding or convolution LoRA, non-LoRA methods), unknown keys,
                A/B shape or rank mismatches, NaN/Inf values.
        """
        path = Path(path)
        cfg_path = path / CONFIG_NAME
        if not path.is_dir():
            raise AdapterError(f"{path}: not a directory (expected a peft adapter folder)")
        if not cfg_path.is_file():
            raise AdapterError(f"{cfg_path}: missing (not a peft adapter folder?)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterError(f"{cfg_path}: cannot parse: {e}") from None
        if not isinstance(cfg, dict):
            raise AdapterError(f"{cfg_path}: expected a JSON object")
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{cfg_path}: unsupported adapter type {cfg.get('peft_type')!r}; only LoRA is supported")
        if cfg.get("use_dora"):
            raise AdapterError(f"{cfg_path}: DoRA adapters (use_dora=true) are not supported")
        if cfg.get("fan_in_fan_out"):
            raise AdapterError(f"{cfg_path}: fan_in_fan_out=true (Conv1D layers) is not supported")
        for key in ("r", "lora_alpha"):
            if key in cfg and not isinstance(cfg[key], (int, float)):
                raise AdapterError(f"{cfg_path}: {key!r} must be a number, got {cfg[key]!r}")

        weights_path = path / WEIGHTS_NAME
        pickle_path = path / PICKLE_WEIGHTS_NAME
        if weights_path.is_file():
            state = _read_safetensors(weights_path, device)
        elif pickle_path.is_file():
            if not allow_pickle:
                raise AdapterError(
                    f"{pickle_path}: pickled adapter refused (pickles can run code); pass allow_pickle=True "
                    "if you trust this file"
                )
            weights_path = pickle_path
            try:
                state = torch.load(pickle_path, map_location=device, weights_only=True)
            except Exception as e:  # torch raises many kinds here
                raise AdapterError(f"{pickle_path}: cannot read: {e}") from None
            if not isinstance(state, dict):
                raise AdapterError(f"{pickle_path}: expected a state dict")
        else:
            raise AdapterError(f"{path}: missing {WEIGHTS_NAME}")

        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = _KEY_RE.match(key)
            if match is None:
                why = next((v for k, v in _UNSUPPORTED_KEYS.items() if k in key), None)
                detail = f"unsupported adapter kind: {why}" if why else "not a lora_A / lora_B weight"
                raise AdapterError(f"{weights_path}: key {key!r}: {detail}")
            pairs.setdefault(match["module"], {})[match["which"]] = tensor

        r_default = cfg.get("r", 8)
        alpha_default = cfg.get("lora_alpha", 8)
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        use_rslora = bool(cfg.get("use_rslora", False))
        modules = {}
        for name, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                missing = ({"A", "B"} - set(ab)).pop()
                raise AdapterError(f"{weights_path}: module {name!r}: lora_{missing}.weight is missing")
            module_path = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
            r = _pattern_value(rank_pattern, module_path, r_default)
            alpha = _pattern_value(alpha_pattern, module_path, alpha_default)
            check_module(name, ab["A"], ab["B"], 1.0, str(weights_path))  # values: in cls() below
            if ab["A"].shape[0] != r:
                raise AdapterError(
                    f"{weights_path}: module {name!r}: lora_A has rank {ab['A'].shape[0]} but the config "
                    f"({cfg_path.name}, r / rank_pattern) says {r}"
                )
            scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
            modules[name] = LoRAModule(ab["A"], ab["B"], float(scaling))
        keep = {k: cfg[k] for k in ("base_model_name_or_path", "task_type") if k in cfg}
        return cls(modules, keep, str(weights_path))

    def save(self, path: str | os.PathLike, atomic: bool = True) -> None:
        """Write the adapter as a peft adapter folder (created if needed).

        ``PeftModel.from_pretrained(base, path)`` loads it with identical factors
        and scalings. Ranks and scalings that differ between modules are written
        as peft's ``rank_pattern`` / ``alpha_pattern`` (alpha = scaling * r).
        Each file is written to a temporary name, flushed and fsynced, then
        renamed into place, so a failure never leaves a half-written file.
        ``atomic=False`` writes the files in place and does not fsync them: for a
        caller that makes a fresh folder durable itself (the online store).
        """
        from safetensors.torch import save_file

        if not self.modules:
            raise AdapterError(f"{path}: refusing to save an adapter with no modules")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, m in self.modules.items():
            state[f"{name}.lora_A.weight"] = m.A.detach().contiguous().cpu()
            state[f"{name}.lora_B.weight"] = m.B.detach().contiguous().cpu()
        config = self.peft_config()

        def write_weights(tmp: str) -> None:
            save_file(state, tmp, metadata={"format": "pt"})

        def write_config(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)

        for name, write in ((WEIGHTS_NAME, write_weights), (CONFIG_NAME, write_config)):
            if atomic:
                atomic_write(path / name, write)
            else:
                write(str(path / name))

    def peft_config(self) -> dict:
        """The ``adapter_config.json`` contents describing this adapter for peft."""
        paths = {n: (n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n) for n in self.modules}
        ranks = {n: m.rank for n, m in self.modules.items()}
        alphas = {n: m.scaling * m.rank for n, m in self.modules.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        alpha = int(alpha) if float(alpha).is_integer() else alpha
        # Exact, regex-escaped module paths: peft matches pattern keys as regexes.
        rank_pattern = {re.escape(paths[n]): ranks[n] for n in self.modules if ranks[n] != r}
        alpha_pattern = {re.escape(paths[n]): alphas[n] for n in self.modules if alphas[n] != alpha}
        return {
            "peft_type": "LORA",
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
            "task_type": self.config.get("task_type"),
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "target_modules": sorted(paths.values()),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
        }


def atomic_write(target: Path, write) -> None:
    """Create ``target`` through ``write(tmp_path)`` on a temporary file in the same
    folder, fsync it, rename it over ``target`` (atomic on POSIX), then fsync the
    folder so that the rename itself survives a power loss."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file: its contents reach the disk before this returns."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a folder: makes the creation, renaming or removal of its entries durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: corrupt or unreadable safetensors file: {e}") from None
