"""LoRA adapters in memory: :class:`LoRA`, :class:`LoRAModule` and their checks.

A LoRA module holds ``A`` (r x n_in), ``B`` (n_out x r) and a scalar ``scaling``
s; its update to the base weight is ``dW = s * B @ A`` (n_out x n_in). A
:class:`LoRA` maps module names to such modules. A module's name is its path
in the base model, as ``model.named_modules()`` shows it, e.g.
``"model.layers.0.self_attn.q_proj"``; lookups also accept peft's key of it
(the same with ``base_model.model.`` in front, see :mod:`kmerge_fast.names`).

The on-disk format (peft's) is :mod:`kmerge_fast.formats.peft`, reached
through :meth:`LoRA.load`, :meth:`LoRA.load_bytes` and :meth:`LoRA.save`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .errors import AdapterError
from .names import canonical_name
from . import ops

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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

    def cached_sq_norm(self, arithmetic: str | None) -> float | None:
        """The cached ``||dW||_F^2`` if ``arithmetic`` computed it and the factors did not change since.

        ``arithmetic`` names how it was computed (similarity uses
        ``"<backend>/<precise|fast>"``). Keyed that way because l2 distances
        subtract the norms from inner products: both must come from the same
        arithmetic, or an adapter's distance to itself is rounding noise
        magnified by a square root. ``None``: whichever arithmetic computed it
        (for a use that needs no such agreement).
        """
        if self._norm_cache is not None and arithmetic is None:
            arithmetic = self._norm_cache[0][0]
        if self._norm_cache is not None and self._norm_cache[0] == self._norm_key(arithmetic):
            return self._norm_cache[1]
        return None

    def cache_sq_norm(self, value: float, arithmetic: str) -> None:
        self._norm_cache = (self._norm_key(arithmetic), float(value))

    def clear_cache(self) -> None:
        """Forget the cached ``||dW||_F^2`` (:meth:`cached_sq_norm` returns None until it is cached again).

        Never needed for correctness (an in-place change of the factors already
        invalidates it); for timing a "cold" similarity call.
        """
        self._norm_cache = None


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
    return ops.all_finite(tensors)


def first_non_finite(modules: Mapping[str, LoRAModule]) -> tuple[str, str] | None:
    """(module name, ``"A"`` or ``"B"``) of the first factor holding NaN or Inf, or None; one batched pass."""
    flags = iter(all_finite_many([t for m in modules.values() for t in (m.A, m.B)]))
    for name in modules:
        for label in ("A", "B"):
            if not next(flags):
                return name, label
    return None


class ModuleMap(dict):
    """The dict :attr:`LoRA.modules`: base-model module path -> :class:`LoRAModule`.

    Keys are paths in the base model (``model.layers.0.self_attn.q_proj``).
    Every lookup or write by key also accepts peft's key of the module
    (``base_model.model.`` + the path): ``[]``, ``in``, ``get``, ``pop``,
    ``setdefault``, ``del``, ``update`` and ``|=`` take a key held as it is,
    else the key with peft's prefix removed. Iteration, ``keys()`` and
    ``items()`` give the paths.
    """

    __slots__ = ()

    def __init__(self, modules: Mapping | None = None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def _key(self, name):
        return name if super().__contains__(name) else canonical_name(name)

    def __getitem__(self, name):
        return super().__getitem__(self._key(name))

    def __contains__(self, name) -> bool:
        return super().__contains__(self._key(name))

    def __setitem__(self, name, module) -> None:
        super().__setitem__(self._key(name), module)

    def __delitem__(self, name) -> None:
        super().__delitem__(self._key(name))

    def get(self, name, default=None):
        return super().get(self._key(name), default)

    def pop(self, name, *default):
        return super().pop(self._key(name), *default)

    def setdefault(self, name, default=None):
        return super().setdefault(self._key(name), default)

    def update(self, other=(), /, **kwargs) -> None:
        items = other.items() if isinstance(other, Mapping) else other
        for name, module in items:
            self[name] = module
        for name, module in kwargs.items():
            self[name] = module

    def __ior__(self, other):
        self.update(other)
        return self

    def __or__(self, other):
        out = self.copy()
        out.update(other)
        return out

    def copy(self) -> "ModuleMap":
        return exact_module_map(self)

    def __reduce__(self):  # copy, deepcopy and pickle keep the keys as they are
        return exact_module_map, (dict(self),)


def exact_module_map(modules: Mapping) -> ModuleMap:
    """A ModuleMap holding ``modules``' keys unchanged (they must be base-model paths already)."""
    out = ModuleMap()
    dict.update(out, modules)
    return out


def _module_map(modules: Mapping[str, LoRAModule]) -> ModuleMap:
    """``modules`` keyed by base-model paths; a module given under both of its names is an AdapterError."""
    out = ModuleMap()
    given: dict[str, str] = {}  # path -> the name it was given as
    for name, module in modules.items():
        key = canonical_name(name)
        if key in given:
            raise AdapterError(f"module {key!r} given twice, as {given[key]!r} and as {name!r}")
        given[key] = name
        dict.__setitem__(out, key, module)
    return out


class LoRA:
    """A LoRA adapter: module name -> :class:`LoRAModule`.

    Build one with :meth:`load` (a peft adapter folder) or :meth:`from_factors`
    (tensors); write it with :meth:`save`.

    Attributes:
        modules: a :class:`ModuleMap` (a dict) from each module's path in the
            base model (``model.layers.0.self_attn.q_proj``, as
            ``model.named_modules()`` names it) to its LoRAModule. Lookups also
            accept peft's key (``base_model.model.model.layers.0.self_attn.q_proj``).
        config: the extra fields of the peft config to carry through a save
            (``base_model_name_or_path``, ``task_type``); rank, alpha and target
            modules are always derived from the modules themselves.
    """

    def __init__(self, modules: Mapping[str, LoRAModule], config: Mapping | None = None, source: str = ""):
        """``modules``: name -> LoRAModule, each name a base-model path or peft's key of it.

        A :class:`ModuleMap` (another adapter's ``modules``) is taken as it is.
        Any other mapping has peft's prefix removed from its keys, so a path
        that itself begins with ``base_model.model.`` (a base model that is a
        wrapped PeftModel) must be given in peft's form, as for :meth:`from_factors`.
        """
        # A ModuleMap's keys are base-model paths already: stripping again would rename
        # a path that itself begins with peft's prefix.
        self.modules: ModuleMap = exact_module_map(modules) if isinstance(modules, ModuleMap) else _module_map(modules)
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
        or peft's key (the same with ``base_model.model.`` in front); the
        adapter keys the module by the path either way, and one module given
        under both names is an AdapterError. ``scaling`` is one float for all
        modules or a dict per name (in either form).
        """
        scales = _module_map(scaling) if isinstance(scaling, Mapping) else None
        modules = {}
        for name, pair in factors.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise AdapterError(f"module {name!r}: expected a pair (A, B), got {type(pair).__name__}")
            A, B = pair
            if scales is not None:
                if name not in scales:
                    raise AdapterError(f"module {name!r}: no scaling given (scaling dict lacks it)")
                s = float(scales[name])
            else:
                s = float(scaling)
            modules[name] = LoRAModule(A, B, s)
        if scales is not None:
            extra = set(scales) - {canonical_name(name) for name in factors}
            if extra:
                raise AdapterError(f"scaling given for unknown modules: {sorted(extra)[:5]}")
        return cls(_module_map(modules), config)

    # -------------------------------------------------------------- properties
    @property
    def names(self) -> list[str]:
        """The modules' paths in the base model, in order."""
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

    def clear_caches(self) -> None:
        """Forget every module's cached ``||dW||_F^2`` (see :meth:`LoRAModule.clear_cache`).

        The next similarity call then recomputes the norms, as for a new
        adapter: for timing "cold" calls. Results do not change.
        """
        for m in self.modules.values():
            m.clear_cache()

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LoRA":
        """A copy with factors converted (a no-op conversion shares storage)."""
        return LoRA(
            exact_module_map({n: LoRAModule(m.A.to(device=device, dtype=dtype), m.B.to(device=device, dtype=dtype),
                                            m.scaling) for n, m in self.modules.items()}),
            self.config,
        )

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return f"LoRA({len(self.modules)} modules, ranks={ranks}, dtype={self.dtype})"

    # ---------------------------------------------------------------------- I/O
    @classmethod
    def load(cls, path: str | os.PathLike, allow_pickle: bool = False, device: str | torch.device = "cpu",
             format: str | None = None, base=None) -> "LoRA":
        """Read an adapter: a peft folder (the default), a llama.cpp GGUF LoRA file or an MLX-LM folder.

        Each file is read once, whole, into private memory (the config only up
        to :data:`~kmerge_fast.formats.peft.MAX_CONFIG_BYTES`), then parsed by the same code as
        :meth:`load_bytes`. The returned adapter owns its tensors: rewriting,
        truncating or deleting the files afterwards changes nothing in it (no
        memory map of the file is kept, so no SIGBUS either).

        Args:
            path: folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
            allow_pickle: also accept a pickled ``adapter_model.bin`` (loaded with
                ``torch.load(weights_only=True)``). Off by default: pickles can run code.
            device: where to put the factors.
            format: ``"peft"``, ``"gguf"`` or ``"mlx"``; by default detected from
                ``path`` (:func:`kmerge_fast.formats.detect`: a ``.gguf`` file, a folder
                with ``adapters.safetensors``, else peft).
            base: GGUF only: the base GGUF file or transformers config, needed to undo
                llama.cpp's q/k row permutation in files that kmerge_fast did not write
                (:func:`kmerge_fast.formats.gguf.load_gguf`).

        Raises:
            AdapterError: missing, oversized or corrupt files, an invalid config
                field (see :meth:`load_bytes`), an unsupported peft type (DoRA,
                embedding or convolution LoRA, non-LoRA methods), unknown keys,
                A/B shape or rank mismatches, NaN/Inf values.
        """
        from . import formats

        format = formats.check_format(format) if format is not None else formats.detect(path)
        if format != "gguf" and base is not None:
            raise ValueError(f"base: only the gguf format takes a base, not {format!r}")
        if format == "gguf":
            from .formats.gguf import load_gguf

            return load_gguf(path, base).to(device=device)
        if format == "mlx":
            from .formats.mlx import load_mlx

            return load_mlx(path).to(device=device)
        from .formats import peft

        return peft.load(path, allow_pickle, device, cls=cls)

    @classmethod
    def load_bytes(cls, config: bytes, weights: bytes, where: str | os.PathLike,
                   device: str | torch.device = "cpu") -> "LoRA":
        """Parse a peft LoRA adapter given as the contents of its two files.

        Args:
            config: the bytes of ``adapter_config.json`` (at most
                :data:`~kmerge_fast.formats.peft.MAX_CONFIG_BYTES`).
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
          matched as peft does (see
          :func:`~kmerge_fast.formats.patterns.compile_pattern_key`: bounded work,
          never a hang).
        """
        from .formats import peft

        return peft.from_bytes(config, weights, where, device, pickled=False, cls=cls)

    def save(self, path: str | os.PathLike, atomic: bool = True, format: str = "peft", **options) -> None:
        """Write the adapter as a peft adapter folder (created if needed), or in another format.

        ``format="gguf"``: a llama.cpp GGUF LoRA file; ``options`` are
        :func:`~kmerge_fast.formats.gguf.save_gguf`'s (``base`` required: the base
        GGUF file or transformers config; ``dtype``, ``task_names``, ``overwrite``).
        ``format="mlx"``: an MLX-LM adapter folder; ``options`` are
        :func:`~kmerge_fast.formats.mlx.save_mlx`'s (``num_layers``, ``overwrite``).
        Both write atomically. The rest of this docstring is the peft format's.

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
        The files key each module by peft's name, ``base_model.model.`` + its path.
        """
        from . import formats

        if formats.check_format(format) == "gguf":
            from .formats.gguf import save_gguf

            return save_gguf(self, path, **options)
        if format == "mlx":
            from .formats.mlx import save_mlx

            return save_mlx(self, path, **options)
        if options:
            raise ValueError(f"{sorted(options)[0]}: not an option of the peft format")
        from .formats import peft

        peft.save(self, path, atomic)

    def peft_config(self) -> dict:
        """The ``adapter_config.json`` contents describing this adapter for peft."""
        from .formats import peft

        return peft.peft_config(self)

