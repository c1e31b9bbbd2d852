"""LoRA adapters in memory, and their on-disk format (peft's).

A LoRA module holds ``A`` (r x n_in), ``B`` (n_out x r) and a scalar ``scaling``
s; its update to the base weight is ``dW = s * B @ A`` (n_out x n_in). A
:class:`LoRA` is a dict of such modules keyed by peft's module key without
the adapter name, e.g. ``"base_model.model.model.layers.0.self_attn.q_proj"``.

On disk an adapter is a folder with ``adapter_config.json`` and
``adapter_model.safetensors``, exactly as ``PeftModel.save_pretrained`` writes
it, so adapters move freely between peft and kmerge_fast. :meth:`LoRA.load`
reads each file once into private memory and :meth:`LoRA.load_bytes` parses
given bytes, with the same checks: a loaded adapter never depends on its files
afterwards, and every malformed config field is an :class:`AdapterError` that
names the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

# Python's own regex parser, for pattern keys (compile_pattern_key).
try:  # Python >= 3.11
    from re import _constants as _sre_c, _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c
    import sre_parse as _sre_parse

from .errors import AdapterError
from .files import atomic_write
from .ops import cpu

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

#: Largest ``adapter_config.json`` accepted, in bytes. peft's configs are a few
#: KiB; the bound keeps a hostile or mistaken file from being read whole.
MAX_CONFIG_BYTES = 1 << 20
#: Longest ``rank_pattern`` / ``alpha_pattern`` key accepted (peft's keys are module paths).
MAX_PATTERN_KEY_CHARS = 1000
#: Most automaton instructions a regex pattern key may compile to (counted repeats are unrolled).
MAX_PATTERN_PROGRAM = 2000
#: Most automaton steps one regex pattern key may take over one load (about a second of Python).
MAX_PATTERN_WORK = 1_000_000

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

        Each file is read once, whole, into private memory (the config only up
        to :data:`MAX_CONFIG_BYTES`), then parsed by the same code as
        :meth:`load_bytes`. The returned adapter owns its tensors: rewriting,
        truncating or deleting the files afterwards changes nothing in it (no
        memory map of the file is kept, so no SIGBUS either).

        Args:
            path: folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
            allow_pickle: also accept a pickled ``adapter_model.bin`` (loaded with
                ``torch.load(weights_only=True)``). Off by default: pickles can run code.
            device: where to put the factors.

        Raises:
            AdapterError: missing, oversized or corrupt files, an invalid config
                field (see :meth:`load_bytes`), an unsupported peft type (DoRA,
                embedding or convolution LoRA, non-LoRA methods), unknown keys,
                A/B shape or rank mismatches, NaN/Inf values.
        """
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
            return cls._from_bytes(config, _read_file(weights_path), path, device, pickled=False)
        if pickle_path.is_file():
            if not allow_pickle:
                raise AdapterError(
                    f"{pickle_path}: pickled adapter refused (pickles can run code); pass allow_pickle=True "
                    "if you trust this file"
                )
            return cls._from_bytes(config, _read_file(pickle_path), path, device, pickled=True)
        raise AdapterError(f"{path}: missing {WEIGHTS_NAME}")

    @classmethod
    def load_bytes(cls, config: bytes, weights: bytes, where: str | os.PathLike,
                   device: str | torch.device = "cpu") -> "LoRA":
        """Parse a peft LoRA adapter given as the contents of its two files.

        Args:
            config: the bytes of ``adapter_config.json`` (at most :data:`MAX_CONFIG_BYTES`).
            weights: the bytes of ``adapter_model.safetensors``.
            where: the adapter's folder, for messages only: errors name
                ``<where>/adapter_config.json`` or ``<where>/adapter_model.safetensors``.
            device: where to put the factors.

        The tensors are copied out of ``weights`` into memory of their own, so
        the caller may reuse or change its buffer afterwards. Validation and
        errors are :meth:`load`'s. Config fields are checked as follows (each
        violation is an :class:`AdapterError` naming the file and the field):

        * ``r``: a positive integer; ``lora_alpha``: a finite number.
        * ``use_rslora``, ``use_dora``, ``fan_in_fan_out``: JSON booleans (or
          absent / null = false); a string such as ``"false"`` is refused.
        * ``rank_pattern`` / ``alpha_pattern``: absent, null or an object whose
          values are positive integers / finite numbers and whose keys are
          matched as peft does (see :func:`compile_pattern_key`: bounded work,
          never a hang).
        """
        return cls._from_bytes(config, weights, where, device, pickled=False)

    @classmethod
    def _from_bytes(cls, config: bytes, weights: bytes, where: str | os.PathLike, device,
                    pickled: bool) -> "LoRA":
        """The one parser behind :meth:`load` and :meth:`load_bytes` (``pickled``: ``weights``
        is an ``adapter_model.bin`` for ``torch.load``)."""
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

        modules = {}
        for name, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                missing = ({"A", "B"} - set(ab)).pop()
                raise AdapterError(f"{weights_path}: module {name!r}: lora_{missing}.weight is missing")
            module_path = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
            r, alpha = cfg.rank_and_alpha(module_path)
            check_module(name, ab["A"], ab["B"], 1.0, str(weights_path))  # values: in cls() below
            if ab["A"].shape[0] != r:
                raise AdapterError(
                    f"{weights_path}: module {name!r}: lora_A has rank {ab['A'].shape[0]} but the config "
                    f"({cfg_path.name}, r / rank_pattern) says {r}"
                )
            scaling = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
            modules[name] = LoRAModule(ab["A"], ab["B"], float(scaling))
        return cls(modules, cfg.keep, str(weights_path))

    def save(self, path: str | os.PathLike, atomic: bool = True) -> None:
        """Write the adapter as a peft adapter folder (created if needed).

        ``PeftModel.from_pretrained(base, path)`` loads it with identical factors
        and scalings. Ranks and scalings that differ between modules are written
        as peft's ``rank_pattern`` / ``alpha_pattern`` (alpha = scaling * r).
        Each file is written to a temporary name, flushed and fsynced, then
        renamed into place, so a failure never leaves a half-written file
        (:func:`kmerge_fast.files.atomic_write`). Files get the permissions
        ``open()`` would give them: ``0o666`` minus the umask. A module of rank 0
        is refused (peft cannot load ``r = 0``).
        ``atomic=False`` writes the files in place and does not fsync them: for a
        caller that makes a fresh folder durable itself (the online store).
        """
        from safetensors.torch import save as serialize

        if not self.modules:
            raise AdapterError(f"{path}: refusing to save an adapter with no modules")
        for name, m in self.modules.items():
            if m.rank == 0:  # adapter_config.json would need r = 0, which peft (and load) refuse
                raise AdapterError(f"{path}: module {name!r} has rank 0, which a peft adapter cannot hold; "
                                   "drop the module (its update is zero)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, m in self.modules.items():
            state[f"{name}.lora_A.weight"] = m.A.detach().contiguous().cpu()
            state[f"{name}.lora_B.weight"] = m.B.detach().contiguous().cpu()
        config = self.peft_config()

        # Serialised here and written with open(): safetensors' save_file() writes a
        # file of its own with mode 0600 and renames it over the target.
        weights = serialize(state, metadata={"format": "pt"})
        del state

        def write_weights(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(weights)

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


# ------------------------------------------------------------ pattern keys
_REGEX_META = frozenset(".^$*+?{}[]\\|()")


def compile_pattern_key(key: str):
    """A predicate ``matches(module_path) -> bool`` for one rank_pattern / alpha_pattern key.

    It answers exactly what peft (0.21, ``get_pattern_key``) computes,
    ``re.match(rf"(.*\\.)?({key})$", module_path) is not None``, but in bounded
    time whatever the key, so that no config can hang the loader (Python's
    backtracking ``re`` takes exponential time on keys such as ``(a+)+``):

    * A *fixed* key, made of plain characters, ``\\``-escaped punctuation (as
      ``re.escape`` writes it) and ``.`` (any character but a newline, as in a
      regex), has one length L; it is compared with the last L characters of
      the path, which must be the whole path or follow a ``.``. O(L) per path.
      peft's and :meth:`LoRA.save`'s keys are all of this kind.
    * Any other key is a regex. Python's own parser reads it; it then runs as
      an automaton (a DFA built lazily from the Thompson NFA, as RE2 does),
      never by backtracking. Supported: literals, classes and escapes such as
      ``\\d``, ``.``, groups, ``|``, greedy and lazy repeats, ``^``, ``$``,
      ``\\A``, ``\\Z``. Refused with a ValueError: backreferences, lookarounds,
      conditionals, atomic groups, possessive repeats, inline flags, word
      boundaries, keys over :data:`MAX_PATTERN_KEY_CHARS` characters or
      :data:`MAX_PATTERN_PROGRAM` instructions, and (when matched) a key that
      spends more than :data:`MAX_PATTERN_WORK` automaton steps in one load.

    Raises:
        ValueError: the key is invalid or refused; the message says why.
    """
    if not isinstance(key, str):
        raise ValueError(f"expected a string, got {type(key).__name__}")
    if len(key) > MAX_PATTERN_KEY_CHARS:
        raise ValueError(f"longer than {MAX_PATTERN_KEY_CHARS} characters")
    tokens = _fixed_tokens(key)
    return _fixed_matcher(tokens) if tokens is not None else _RegexKey(key).matches


def _fixed_tokens(key: str) -> list[str | None] | None:
    """The characters of a fixed key, None for a ``.`` wildcard; None when ``key`` is a real regex."""
    tokens: list[str | None] = []
    i = 0
    while i < len(key):
        c = key[i]
        if c == "\\":
            # "\" + an ASCII letter or digit is a class, an anchor or a group reference.
            if i + 1 == len(key) or (key[i + 1].isascii() and key[i + 1].isalnum()):
                return None
            tokens.append(key[i + 1])
            i += 2
            continue
        if c == ".":
            tokens.append(None)
        elif c in _REGEX_META:
            return None
        else:
            tokens.append(c)
        i += 1
    return tokens


def _fixed_matcher(tokens: list[str | None]):
    n_tokens = len(tokens)
    literal = None if None in tokens else "".join(tokens)

    def whole(path: str) -> bool:
        """``(.*\\.)?(key)`` matches all of ``path``."""
        cut = len(path) - n_tokens
        if cut < 0 or (cut > 0 and (path[cut - 1] != "." or "\n" in path[:cut])):
            return False
        tail = path[cut:]
        if literal is not None:
            return tail == literal
        return all(ch != "\n" if t is None else ch == t for t, ch in zip(tokens, tail))

    # "$" also matches just before a final newline.
    return lambda path: whole(path) or (path.endswith("\n") and whole(path[:-1]))


_CATEGORIES = {
    _sre_c.CATEGORY_DIGIT: re.compile(r"\d"), _sre_c.CATEGORY_NOT_DIGIT: re.compile(r"\D"),
    _sre_c.CATEGORY_SPACE: re.compile(r"\s"), _sre_c.CATEGORY_NOT_SPACE: re.compile(r"\S"),
    _sre_c.CATEGORY_WORD: re.compile(r"\w"), _sre_c.CATEGORY_NOT_WORD: re.compile(r"\W"),
}
_ASSERTIONS = (_sre_c.AT_BEGINNING, _sre_c.AT_BEGINNING_STRING, _sre_c.AT_END, _sre_c.AT_END_STRING)


class _RegexKey:
    """peft's ``(.*\\.)?(key)$`` as a Thompson NFA run as a lazily built DFA (see :func:`compile_pattern_key`).

    Instructions: ``("char", predicate)`` consumes one character,
    ``("split", x, y)`` forks, ``("jmp", x)``, ``("assert", at_code)`` is a
    zero-width anchor, ``("match",)`` accepts. A DFA state is the set of NFA
    instructions alive before a character; transitions are cached, so each
    (state, character) pair costs NFA work once, and the total is capped by
    :data:`MAX_PATTERN_WORK`.
    """

    def __init__(self, key: str):
        try:
            parsed = _sre_parse.parse(rf"(.*\.)?({key})$")
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from None
        except RecursionError:
            raise ValueError("regular expression nested too deeply") from None
        if parsed.state.flags & ~_sre_c.SRE_FLAG_UNICODE:
            raise ValueError("inline flags such as (?i) are not supported")
        self.prog: list[tuple] = []
        self._seq(parsed)
        self._emit("match")
        self.work = 0
        self._closures: dict = {}
        self._steps: dict = {}

    # compilation
    def _emit(self, *instruction) -> int:
        if len(self.prog) >= MAX_PATTERN_PROGRAM:
            raise ValueError(f"regular expression too large (over {MAX_PATTERN_PROGRAM} automaton instructions)")
        self.prog.append(list(instruction))
        return len(self.prog) - 1

    def _seq(self, items) -> None:
        for op, av in items:
            self._node(op, av)

    def _node(self, op, av) -> None:
        c = _sre_c
        if op is c.LITERAL:
            ch = chr(av)
            self._emit("char", lambda x: x == ch)
        elif op is c.NOT_LITERAL:
            ch = chr(av)
            self._emit("char", lambda x: x != ch)
        elif op is c.ANY:
            self._emit("char", lambda x: x != "\n")
        elif op is c.IN:
            self._emit("char", self._class(av))
        elif op is c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise ValueError("inline flags such as (?i:...) are not supported")
            self._seq(sub)
        elif op is c.BRANCH:
            jumps = []
            alternatives = av[1]
            for alt in alternatives[:-1]:
                split = self._emit("split", len(self.prog) + 1, None)
                self._seq(alt)
                jumps.append(self._emit("jmp", None))
                self.prog[split][2] = len(self.prog)
            self._seq(alternatives[-1])
            for j in jumps:
                self.prog[j][1] = len(self.prog)
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT):  # greedy or lazy: the same set of matches
            lo, hi, item = av
            start = len(self.prog)
            if lo:
                self._seq(item)
                if len(self.prog) == start:  # an empty item: repeating it adds nothing
                    return
                for _ in range(lo - 1):
                    self._seq(item)
            if hi == c.MAXREPEAT:
                loop = self._emit("split", len(self.prog) + 1, None)
                self._seq(item)
                self._emit("jmp", loop)
                self.prog[loop][2] = len(self.prog)
            else:
                splits = []
                for _ in range(hi - lo):
                    splits.append(self._emit("split", len(self.prog) + 1, None))
                    self._seq(item)
                for s in splits:
                    self.prog[s][2] = len(self.prog)
        elif op is c.AT and av in _ASSERTIONS:
            self._emit("assert", av)
        else:
            name = {c.GROUPREF: "backreferences", c.ASSERT: "lookarounds", c.ASSERT_NOT: "lookarounds",
                    c.GROUPREF_EXISTS: "conditionals", c.AT: "this anchor (only ^, $, \\A, \\Z are)"}.get(op, str(op))
            raise ValueError(f"regular expression uses {name}, which pattern keys do not support")

    @staticmethod
    def _class(items):
        tests = []
        negate = False
        for op, av in items:
            if op is _sre_c.NEGATE:
                negate = True
            elif op is _sre_c.LITERAL:
                tests.append(lambda x, ch=chr(av): x == ch)
            elif op is _sre_c.RANGE:
                tests.append(lambda x, lo=av[0], hi=av[1]: lo <= ord(x) <= hi)
            elif op is _sre_c.CATEGORY and av in _CATEGORIES:
                tests.append(lambda x, rx=_CATEGORIES[av]: rx.match(x) is not None)
            else:
                raise ValueError(f"character class uses {op}, which pattern keys do not support")
        return lambda x: any(t(x) for t in tests) != negate

    # matching
    def _spend(self, steps: int) -> None:
        self.work += steps
        if self.work > MAX_PATTERN_WORK:
            raise ValueError(f"regular expression too costly to match (over {MAX_PATTERN_WORK} automaton steps)")

    def _closure(self, state: frozenset, anchors: tuple) -> tuple[tuple, bool]:
        """(the "char" instructions reachable from ``state`` without consuming, whether "match" is)."""
        cached = self._closures.get((state, anchors))
        if cached is not None:
            return cached
        at_start, at_dollar, at_string_end = anchors
        holds = {_sre_c.AT_BEGINNING: at_start, _sre_c.AT_BEGINNING_STRING: at_start,
                 _sre_c.AT_END: at_dollar, _sre_c.AT_END_STRING: at_string_end}
        seen = set()
        stack = list(state)
        chars = []
        matched = False
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = self.prog[pc]
            kind = ins[0]
            if kind == "char":
                chars.append(pc)
            elif kind == "split":
                stack += (ins[1], ins[2])
            elif kind == "jmp":
                stack.append(ins[1])
            elif kind == "assert":
                if holds[ins[1]]:
                    stack.append(pc + 1)
            else:
                matched = True
        self._spend(len(seen))
        result = (tuple(sorted(chars)), matched)
        self._closures[(state, anchors)] = result
        return result

    def _step(self, chars: tuple, x: str) -> frozenset:
        nxt = self._steps.get((chars, x))
        if nxt is None:
            self._spend(len(chars) + 1)
            nxt = frozenset(pc + 1 for pc in chars if self.prog[pc][1](x))
            self._steps[(chars, x)] = nxt
        return nxt

    def matches(self, path: str) -> bool:
        n = len(path)
        state = frozenset((0,))
        for i in range(n + 1):
            anchors = (i == 0, i == n or (i == n - 1 and path[-1] == "\n"), i == n)
            chars, matched = self._closure(state, anchors)
            if matched:  # re.match: a match of any prefix of the path counts
                return True
            if i == n or not chars:
                return False
            state = self._step(chars, path[i])
        return False


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
