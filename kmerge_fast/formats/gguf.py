"""GGUF LoRA adapters, as llama.cpp reads them (``--lora``, ``llama_adapter_lora_init``).

API::

    from kmerge_fast.formats.gguf import save_gguf, load_gguf, gguf_metadata
    save_gguf(lora, "qa.gguf", base="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="f16", task_names=["qa_en"])
    lora = load_gguf("qa.gguf", base=None)      # base needed only for files other writers made

Where the conventions come from
-------------------------------
* llama.cpp ``src/llama-adapter.cpp`` (``llama_adapter_lora_init_impl``): it
  requires ``general.type = "adapter"``, ``adapter.type = "lora"`` and a
  ``general.architecture`` equal to the base model's; it reads the float32
  ``adapter.lora.alpha`` and applies ``scale = user_scale * alpha / rank`` with
  ``rank = lora_b.ne[0]`` (alpha 0 or absent: ``scale = user_scale``); every
  tensor is named ``<base tensor name>.lora_a`` / ``.lora_b``, the base tensor
  must exist, and its shape is checked as ``base.ne[0] == lora_a.ne[0]``
  (n_in), ``base.ne[1] == lora_b.ne[1]`` (n_out), ``lora_a.ne[1] == lora_b.ne[0]``
  (r). Non-array metadata (``adapter.lora.task_name``) is what llama-server
  shows for the adapter.
* llama.cpp ``convert_hf_to_gguf.py``: ``LlamaModel`` (registered for
  ``LlamaForCausalLM`` *and* ``MistralForCausalLM``, GGUF architecture
  ``llama``) permutes the rows of ``q_proj`` and ``k_proj`` weights with
  ``permute(w, n_head, n_head_kv)`` (below); ``Qwen2Model`` (architecture
  ``qwen2``) does not permute.
* The ``gguf`` package (version 0.19.0 here) gives the GGUF tensor names
  (``gguf.TENSOR_NAMES``, ``gguf.MODEL_TENSORS``) and key names
  (``gguf.Keys``) and writes the file (``gguf.GGUFWriter``).

Conventions of this module
--------------------------
Supported base models: GGUF architecture ``llama`` (HF ``model_type``
``llama`` or ``mistral``; q/k permuted) and ``qwen2`` (HF ``qwen2``; no
permutation). Module names (peft's ``base_model.model.`` prefix is stripped
when present) map, for layer N, as::

    model.layers.N.self_attn.q_proj -> blk.N.attn_q.weight       (rows of B permuted)
    model.layers.N.self_attn.k_proj -> blk.N.attn_k.weight       (rows of B permuted, kv heads)
    model.layers.N.self_attn.v_proj -> blk.N.attn_v.weight
    model.layers.N.self_attn.o_proj -> blk.N.attn_output.weight
    model.layers.N.mlp.gate_proj    -> blk.N.ffn_gate.weight
    model.layers.N.mlp.up_proj      -> blk.N.ffn_up.weight
    model.layers.N.mlp.down_proj    -> blk.N.ffn_down.weight

Any other module (``lm_head``, ``embed_tokens``, a name this table does not
know) is refused with :class:`~kmerge_fast.AdapterError` naming it. The
HF-side table is ours (it is checked against ``gguf.get_tensor_name_map`` in
the tests); the GGUF-side names are the package's.

Tensors: ``<gguf name>.lora_a`` holds A with numpy shape (r, n_in), i.e.
GGUF ``ne = [n_in, r]``; ``<gguf name>.lora_b`` holds B with numpy shape
(n_out, r), ``ne = [r, n_out]`` (GGUF lists dimensions fastest-first, the
reverse of numpy's order; ``GGUFWriter`` reverses numpy shapes itself).
Stored as F32, F16 or BF16 (``dtype=``); :func:`load_gguf` also reads Q8_0
(dequantised to float32). Each module's pair is written a-then-b.

Rows of B for ``attn_q`` / ``attn_k`` of a ``llama`` base are permuted as
llama.cpp's converter permutes the base weights: :func:`permute_rows` with
``n_head`` for q and ``n_head_kv`` for k; :func:`load_gguf` applies the
inverse. Without it the adapter loads and runs but is silently wrong.

Scaling: llama.cpp has one ``alpha`` per file and divides it by each
module's rank, so a module's scaling ``s`` is exact when ``alpha = s * r``.
When the products ``s_i * r_i`` (as float32) differ between modules,
``alpha`` is the most common nonzero product and every other module's factor
``s_i * r_i / alpha`` is folded into its B (in float64, then cast). After a
load, ``scaling = alpha / r`` (1.0 when alpha is 0 or absent, as llama.cpp).
``alpha`` is stored as float32, so a scaling not representable as
float32-alpha-over-r comes back rounded to float32 precision.

Metadata written: ``general.architecture``, ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32),
``adapter.lora.task_name`` (the task names joined by ``", "``; names may not
contain a comma) when task names are given, and, for permuted architectures,
``kmerge_fast.head_count`` / ``kmerge_fast.head_count_kv`` (uint32, ours;
llama.cpp ignores unknown keys) so that :func:`load_gguf` can undo the
permutation without the base. Files from other writers (llama.cpp's
``convert_lora_to_gguf.py``) lack them: pass ``base=`` to load those.

``base`` (for saving; optional for loading) is a base GGUF file path (its
architecture, ``<arch>.attention.head_count[_kv]`` and tensor names and
shapes are read, and every module must match a base tensor of the same
shape), or a transformers config: a ``PretrainedConfig`` object (e.g.
``transformers.LlamaConfig``), a dict, a ``config.json`` path or a folder
holding one (``model_type``, ``num_attention_heads``,
``num_key_value_heads``, ``num_hidden_layers``, ``head_dim`` /
``hidden_size`` are read).

Files are read by a bounded parser of our own (not ``gguf.GGUFReader``,
which loops for ~2**64 steps on a 45-byte file whose array length is
corrupt): every count and length is checked against the bytes left, so a
corrupt or truncated file fails fast with an AdapterError naming it. Files
are written atomically (temporary file in the same folder, then rename);
an existing target is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import AdapterError
from ..files import atomic_write
from ..names import canonical_name

__all__ = ["save_gguf", "load_gguf", "gguf_metadata", "permute_rows", "unpermute_rows", "gguf_tensor_name",
           "hf_module_name", "SUPPORTED_ARCHITECTURES", "HF_TO_GGUF_ARCH"]


#: GGUF architecture -> whether llama.cpp's converter permutes q/k rows (convert_hf_to_gguf.py).
SUPPORTED_ARCHITECTURES = {"llama": True, "qwen2": False}
#: HF ``model_type`` -> GGUF ``general.architecture`` (convert_hf_to_gguf.py registrations).
HF_TO_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

#: Module path inside a decoder layer -> gguf.MODEL_TENSOR member name.
_LAYER_MODULES = {
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
_LAYER_RE = re.compile(r"^model\.layers\.(0|[1-9][0-9]{0,5})\.(.+)$")
_BLK_RE = re.compile(r"^blk\.(0|[1-9][0-9]{0,5})\.([a-z_]+)\.weight$")
_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_OURS_HEADS = "kmerge_fast.head_count"
_OURS_HEADS_KV = "kmerge_fast.head_count_kv"
_MAX_CONFIG_BYTES = 16 << 20


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency of this format
        raise AdapterError("the GGUF format needs the 'gguf' package (pip install gguf)") from e
    return gguf


@functools.lru_cache(maxsize=1)
def _gguf_kinds() -> dict[str, str]:
    """Layer module path -> GGUF tensor kind (``attn_q``), from the gguf package's TENSOR_NAMES."""
    g = _gguf()
    out = {}
    for rel, member in _LAYER_MODULES.items():
        template = g.TENSOR_NAMES[getattr(g.MODEL_TENSOR, member)]  # "blk.{bid}.attn_q"
        out[rel] = template.split(".", 2)[2]
    return out


def gguf_tensor_name(module: str) -> str | None:
    """The GGUF base tensor name (``blk.3.attn_q.weight``) for a module, or None if llama.cpp cannot place it."""
    m = _LAYER_RE.match(canonical_name(module))
    if not m or m.group(2) not in _LAYER_MODULES:
        return None
    return f"blk.{int(m.group(1))}.{_gguf_kinds()[m.group(2)]}.weight"


def hf_module_name(tensor: str) -> str | None:
    """Inverse of :func:`gguf_tensor_name`: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj``."""
    m = _BLK_RE.match(tensor)
    if not m:
        return None
    for rel, kind in _gguf_kinds().items():
        if kind == m.group(2):
            return f"model.layers.{int(m.group(1))}.{rel}"
    return None


# ----------------------------------------------------------------------------- permutation
def _check_heads(rows: int, n_heads: int, what: str) -> None:
    if n_heads <= 0 or rows % (2 * n_heads):
        raise AdapterError(f"{what}: {rows} rows cannot be split into {n_heads} heads of an even size "
                           "(wrong head count for this base model?)")


def permute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's ``permute(w, n_head, n_head_kv)`` on the rows of ``t`` (rows = n_heads * head_dim).

    ``w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)``:
    within each head, the two halves of the rotary dimensions are interleaved.
    Pass ``n_head`` for q and ``n_head_kv`` for k.
    """
    rows = t.shape[0]
    _check_heads(rows, n_heads, "permute_rows")
    return t.reshape(n_heads, 2, rows // n_heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def unpermute_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows`."""
    rows = t.shape[0]
    _check_heads(rows, n_heads, "unpermute_rows")
    return t.reshape(n_heads, rows // n_heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


# ----------------------------------------------------------------------------- bounded reader
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_T_STRING, _T_ARRAY, _T_FLOAT32, _T_UINT32 = 8, 9, 6, 4
_MAX_KEPT_ARRAY = 4096  # longer arrays (a tokenizer's) are skipped, not decoded


class _Corrupt(Exception):
    pass


@dataclass
class _Skipped:
    """An array value too long to keep (its length)."""
    length: int


@dataclass
class _TensorInfo:
    ggml_type: int
    ne: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def np_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.ne))


@dataclass
class _GGUFFile:
    path: str
    kv: dict[str, tuple[int, Any]] = field(default_factory=dict)
    tensors: dict[str, _TensorInfo] = field(default_factory=dict)

    def get(self, key: str, default=None):
        item = self.kv.get(key)
        return default if item is None else item[1]


class _Parser:
    def __init__(self, buf, n: int):
        self.buf, self.n, self.pos = buf, n, 0

    def take(self, k: int, what: str) -> int:
        if k < 0 or self.pos + k > self.n:
            raise _Corrupt(f"truncated: {what} needs {k} bytes at offset {self.pos}, the file has {self.n}")
        p = self.pos
        self.pos += k
        return p

    def scalar(self, fmt: str, what: str):
        p = self.take(struct.calcsize("<" + fmt), what)
        return struct.unpack_from("<" + fmt, self.buf, p)[0]

    def string(self, what: str, keep: bool = True) -> str | None:
        n = self.scalar("Q", f"{what} (length)")
        p = self.take(n, what)
        if not keep:
            return None
        try:
            return bytes(self.buf[p:p + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype in _SCALAR_FMT:
            return self.scalar(_SCALAR_FMT[vtype], what)
        if vtype == _T_STRING:
            return self.string(what)
        if vtype == _T_ARRAY:
            itype = self.scalar("I", f"{what} (array type)")
            count = self.scalar("Q", f"{what} (array length)")
            keep = count <= _MAX_KEPT_ARRAY
            if itype in _SCALAR_FMT:
                fmt = _SCALAR_FMT[itype]
                p = self.take(count * struct.calcsize("<" + fmt), what)
                return list(struct.unpack_from(f"<{count}{fmt}", self.buf, p)) if keep else _Skipped(count)
            if itype == _T_STRING:
                if count * 8 > self.n - self.pos:  # each string takes at least its 8-byte length
                    raise _Corrupt(f"truncated: {what} claims {count} strings, more than the bytes left")
                items = [self.string(f"{what}[{i}]", keep) for i in range(count)]
                return items if keep else _Skipped(count)
            raise _Corrupt(f"{what}: unsupported array element type {itype}")
        raise _Corrupt(f"{what}: unknown value type {vtype}")


def _parse(buf, n: int, path: str) -> _GGUFFile:
    g = _gguf()
    out = _GGUFFile(path)
    p = _Parser(buf, n)
    if n < 4 or bytes(buf[:4]) != b"GGUF":
        raise _Corrupt("not a GGUF file (no 'GGUF' magic)")
    p.take(4, "magic")
    version = p.scalar("I", "version")
    if version & 0xFFFF == 0 and version:
        raise _Corrupt("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise _Corrupt(f"unsupported GGUF version {version} (2 and 3 are read)")
    n_tensors = p.scalar("Q", "tensor count")
    n_kv = p.scalar("Q", "metadata count")
    if n_kv * 12 > n - p.pos or n_tensors * 24 > n - p.pos:
        raise _Corrupt(f"truncated: header claims {n_kv} metadata entries and {n_tensors} tensors, "
                       f"more than the file's {n} bytes can hold")
    for i in range(n_kv):
        key = p.string(f"metadata key #{i}")
        vtype = p.scalar("I", f"type of {key!r}")
        if key in out.kv:
            raise _Corrupt(f"duplicate metadata key {key!r}")
        out.kv[key] = (vtype, p.value(vtype, f"value of {key!r}"))
    infos = []
    for i in range(n_tensors):
        name = p.string(f"tensor name #{i}")
        n_dims = p.scalar("I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
        ne = tuple(p.scalar("Q", f"dimensions of tensor {name!r}") for _ in range(n_dims))
        ggml_type = p.scalar("I", f"type of tensor {name!r}")
        offset = p.scalar("Q", f"offset of tensor {name!r}")
        if name in out.tensors:
            raise _Corrupt(f"duplicate tensor {name!r}")
        infos.append((name, ne, ggml_type, offset))
        out.tensors[name] = None  # placeholder, for the duplicate check
    alignment = g.GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in out.kv:
        vtype, alignment = out.kv["general.alignment"]
        if vtype != _T_UINT32 or alignment == 0 or alignment & (alignment - 1):
            raise _Corrupt(f"general.alignment {alignment!r} is not a power of two (uint32)")
    data_start = -(-p.pos // alignment) * alignment
    for name, ne, ggml_type, offset in infos:
        try:
            qtype = g.GGMLQuantizationType(ggml_type)
            block, type_size = g.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name!r} has unknown type {ggml_type}") from None
        if ne[0] % block:
            raise _Corrupt(f"tensor {name!r}: row of {ne[0]} is not a multiple of the {qtype.name} block {block}")
        nbytes = math.prod(ne) // block * type_size
        start = data_start + offset
        if offset % alignment:
            raise _Corrupt(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {alignment}")
        if start + nbytes > n:
            raise _Corrupt(f"truncated: tensor {name!r} needs bytes {start}..{start + nbytes}, the file has {n}")
        out.tensors[name] = _TensorInfo(ggml_type, ne, start, nbytes)
    return out


class _Opened:
    """``with _Opened(path) as (f, buf)``: the parsed header and the file's bytes (an mmap)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def __enter__(self):
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise AdapterError(f"{self.path}: cannot open GGUF file: {e.strerror or e}") from None
        try:
            size = os.fstat(self._fh.fileno()).st_size
            if size < 24:
                raise AdapterError(f"{self.path}: not a GGUF file (only {size} bytes)")
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                return _parse(self._mm, size, self.path), self._mm
            except _Corrupt as e:
                self._mm.close()
                raise AdapterError(f"{self.path}: corrupt GGUF file: {e}") from None
        except BaseException:
            self._fh.close()
            raise

    def __exit__(self, *exc):
        self._mm.close()
        self._fh.close()
        return False


def _read_tensor(f: _GGUFFile, buf, name: str) -> torch.Tensor:
    g = _gguf()
    t = f.tensors[name]
    raw = np.frombuffer(buf[t.start:t.start + t.nbytes], dtype=np.uint8)  # a copy: no view of the mmap
    qtype = g.GGMLQuantizationType(t.ggml_type)
    shape = t.np_shape
    if qtype == g.GGMLQuantizationType.F32:
        return torch.from_numpy(raw.view("<f4").reshape(shape).copy())
    if qtype == g.GGMLQuantizationType.F16:
        return torch.from_numpy(raw.view("<f2").reshape(shape).copy())
    if qtype == g.GGMLQuantizationType.BF16:
        return torch.from_numpy(raw.view("<i2").reshape(shape).copy()).view(torch.bfloat16)
    if qtype == g.GGMLQuantizationType.Q8_0:
        rows = raw.reshape(math.prod(shape[:-1]), -1)
        return torch.from_numpy(np.ascontiguousarray(g.quants.dequantize(rows, qtype), dtype=np.float32).reshape(shape))
    raise AdapterError(f"{f.path}: tensor {name!r} has type {qtype.name}; F32, F16, BF16 and Q8_0 are read")


# ----------------------------------------------------------------------------- the base model
@dataclass
class _Base:
    arch: str
    head_count: int | None
    head_count_kv: int | None
    n_layers: int | None
    head_dim: int | None
    tensors: dict[str, tuple[int, ...]] | None  # GGUF name -> numpy shape, for a base GGUF
    source: str

    @property
    def permutes(self) -> bool:
        return SUPPORTED_ARCHITECTURES[self.arch]


def _int_or_none(value, what: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterError(f"{source}: {what} is {value!r}, expected a positive integer")
    return value


def _check_arch(arch, source: str, what: str) -> str:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise AdapterError(f"{source}: {what} {arch!r} is not supported for GGUF adapters "
                           f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})")
    return arch


def _base_from_gguf(path: str) -> _Base:
    with _Opened(path) as (f, _):
        kind = f.get("general.type", "model")
        if kind != "model":
            raise AdapterError(f"{path}: general.type is {kind!r}; the base must be a model GGUF, not an adapter")
        arch = _check_arch(f.get("general.architecture"), path, "general.architecture")
        heads = f.get(f"{arch}.attention.head_count")
        heads_kv = f.get(f"{arch}.attention.head_count_kv", heads)
        for key, v in ((f"{arch}.attention.head_count", heads), (f"{arch}.attention.head_count_kv", heads_kv)):
            if isinstance(v, (list, _Skipped)):
                raise AdapterError(f"{path}: {key} is per-layer; only one head count for all layers is supported")
        tensors = {name: t.np_shape for name, t in f.tensors.items()}
        return _Base(arch, _int_or_none(heads, f"{arch}.attention.head_count", path),
                     _int_or_none(heads_kv, f"{arch}.attention.head_count_kv", path),
                     _int_or_none(f.get(f"{arch}.block_count"), f"{arch}.block_count", path), None, tensors, path)


def _base_from_config(cfg: Mapping, source: str) -> _Base:
    model_type = cfg.get("model_type")
    if model_type not in HF_TO_GGUF_ARCH:
        raise AdapterError(f"{source}: model_type {model_type!r} is not supported for GGUF adapters "
                           f"(supported: {sorted(HF_TO_GGUF_ARCH)})")
    heads = _int_or_none(cfg.get("num_attention_heads"), "num_attention_heads", source)
    heads_kv = _int_or_none(cfg.get("num_key_value_heads") or heads, "num_key_value_heads", source)
    head_dim = cfg.get("head_dim")
    if head_dim is None and heads and isinstance(cfg.get("hidden_size"), int):
        head_dim = cfg["hidden_size"] // heads
    return _Base(HF_TO_GGUF_ARCH[model_type], heads, heads_kv,
                 _int_or_none(cfg.get("num_hidden_layers"), "num_hidden_layers", source),
                 _int_or_none(head_dim, "head_dim", source), None, source)


def _resolve_base(base) -> _Base:
    """A base GGUF path, a config.json path or folder, a config dict, or a transformers config object."""
    if base is None:
        raise AdapterError("a base model is needed: pass base= a base GGUF file or a transformers config")
    if isinstance(base, (str, os.PathLike)):
        path = Path(base)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise AdapterError(f"{path}: base model file not found")
        try:
            with open(path, "rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise AdapterError(f"{path}: cannot read the base model: {e.strerror or e}") from None
        if magic == b"GGUF":
            return _base_from_gguf(str(path))
        try:
            size = path.stat().st_size
            if size > _MAX_CONFIG_BYTES:
                raise AdapterError(f"{path}: {size} bytes, too large for a config.json")
            cfg = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{path}: neither a GGUF file nor a valid config.json ({e})") from None
        if not isinstance(cfg, dict):
            raise AdapterError(f"{path}: config.json holds {type(cfg).__name__}, expected an object")
        return _base_from_config(cfg, str(path))
    if isinstance(base, Mapping):
        return _base_from_config(base, "base config")
    if hasattr(base, "model_type"):
        keys = ("model_type", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim",
                "hidden_size")
        return _base_from_config({k: getattr(base, k, None) for k in keys}, f"{type(base).__name__}")
    raise AdapterError(f"base must be a GGUF path, a config.json path or folder, a dict or a transformers config, "
                       f"not {type(base).__name__}")


def _heads_for(base: _Base, rel: str, where: str) -> int | None:
    """Head count for the permutation of this module's rows (None: not permuted)."""
    if not base.permutes or rel not in ("self_attn.q_proj", "self_attn.k_proj"):
        return None
    n = base.head_count if rel == "self_attn.q_proj" else base.head_count_kv
    if n is None:
        raise AdapterError(f"{where}: the head count of {base.source} is unknown; it is needed to permute "
                           f"{rel} for llama.cpp")
    return n


def _check_against_base(info: _Base, gname: str, n_out: int, n_in: int, what: str) -> None:
    """Refuse an update whose base tensor is absent from a base GGUF, or of another shape."""
    if info.tensors is None:
        return
    if gname not in info.tensors:
        raise AdapterError(f"{what}: tensor {gname!r} does not exist in the base {info.source}")
    if tuple(info.tensors[gname]) != (n_out, n_in):
        shape = " x ".join(str(d) for d in info.tensors[gname])
        raise AdapterError(f"{what}: update is {n_out} x {n_in} (out x in) but the base tensor {gname!r} "
                           f"is {shape}")


# ----------------------------------------------------------------------------- save
def _task_string(task_names) -> str | None:
    if task_names is None:
        return None
    names = [task_names] if isinstance(task_names, str) else list(task_names)
    for t in names:
        if not isinstance(t, str) or not t or "," in t:
            raise AdapterError(f"task name {t!r}: task names must be non-empty strings without commas "
                               "(they are joined with ', ' into adapter.lora.task_name)")
    return ", ".join(names)


def _plan_modules(lora, where: str) -> list[tuple[str, str, int, str, Any]]:
    """(module key, hf name, layer, layer-relative path, LoRAModule) per module; refuses unplaceable ones."""
    planned, bad, seen = [], [], {}
    for key, module in lora.modules.items():
        hf = canonical_name(key)
        m = _LAYER_RE.match(hf)
        if not m or m.group(2) not in _LAYER_MODULES:
            bad.append(key)
            continue
        if hf in seen:
            raise AdapterError(f"{where}: modules {seen[hf]!r} and {key!r} are the same module")
        seen[hf] = key
        planned.append((key, hf, int(m.group(1)), m.group(2), module))
    if bad:
        shown = ", ".join(repr(b) for b in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise AdapterError(
            f"{where}: llama.cpp cannot place these modules: {shown}. GGUF adapters hold only "
            f"model.layers.N.{{{', '.join(_LAYER_MODULES)}}} (lm_head and embeddings are not supported)")
    if not planned:
        raise AdapterError(f"{where}: the adapter has no modules")
    return planned


def _choose_alpha(products: list[float]) -> float:
    """The float32 alpha: the most common nonzero float32 product s_i * r_i (1.0 if all are 0)."""
    counts = Counter(float(np.float32(p)) for p in products if float(np.float32(p)) != 0.0)
    if not counts:
        return 1.0
    return counts.most_common(1)[0][0]


def save_gguf(lora, path: str | os.PathLike, base, dtype: str = "f32", task_names=None,
              overwrite: bool = False) -> None:
    """Write ``lora`` as a llama.cpp GGUF LoRA adapter at ``path``.

    Args:
        lora: a :class:`kmerge_fast.LoRA`; module names with or without peft's prefix.
        path: the ``.gguf`` file to create (its folder is created if missing).
        base: the base model: a base GGUF path (verified tensor by tensor), or a
            transformers config (object, dict, config.json or its folder).
        dtype: ``"f32"``, ``"f16"`` or ``"bf16"`` for both factors.
        task_names: a task name or a list of them, stored in ``adapter.lora.task_name``.
        overwrite: replace an existing ``path`` (refused by default).

    Raises:
        AdapterError: a module llama.cpp cannot place, an unsupported
            architecture, a shape that does not match the base, a value that
            overflows ``dtype``, or an existing ``path``.
    """
    g = _gguf()
    path = Path(path)
    where = str(path)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    if path.exists() and not overwrite:
        raise AdapterError(f"{where}: already exists (pass overwrite=True to replace it)")
    task_string = _task_string(task_names)
    planned = _plan_modules(lora, where)
    info = _resolve_base(base)

    products = [float(m.scaling) * int(m.A.shape[0]) for *_, m in planned]
    alpha = _choose_alpha(products)
    torch_dtype = _DTYPES[dtype]
    tensors = []
    for (key, hf, layer, rel, module), product in zip(planned, products):
        what = f"{where}: module {key!r}"
        gname = f"blk.{layer}.{_gguf_kinds()[rel]}.weight"
        n_out, n_in = int(module.B.shape[0]), int(module.A.shape[1])
        if info.n_layers is not None and layer >= info.n_layers:
            raise AdapterError(f"{what}: layer {layer}, but the base {info.source} has {info.n_layers} layers")
        _check_against_base(info, gname, n_out, n_in, what)
        heads = _heads_for(info, rel, what)
        if heads is not None:
            _check_heads(n_out, heads, what)
            if info.head_dim is not None and n_out != heads * info.head_dim:
                raise AdapterError(f"{what}: {n_out} output rows, but {info.source} has {heads} heads of "
                                   f"{info.head_dim} ({heads * info.head_dim} rows)")
        A = module.A.detach().to("cpu")
        B = module.B.detach().to("cpu")
        f32_product = float(np.float32(product))
        if f32_product != alpha:  # fold this module's own scaling into B
            B = B.to(torch.float64) * (product / alpha)
        A, B = A.to(torch_dtype), B.to(torch_dtype)
        for label, t in (("A", A), ("B", B)):
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{what}: lora_{label} does not fit in {dtype} (overflow or NaN)")
        if heads is not None:
            B = permute_rows(B, heads)
        tensors.append((gname + ".lora_a", A.contiguous()))
        tensors.append((gname + ".lora_b", B.contiguous()))

    def write(tmp: str) -> None:
        writer = g.GGUFWriter(None, info.arch)
        writer.add_type(g.GGUFType.ADAPTER)
        writer.add_string(g.Keys.Adapter.TYPE, "lora")
        writer.add_float32(g.Keys.Adapter.LORA_ALPHA, alpha)
        if task_string is not None:
            writer.add_string(g.Keys.Adapter.LORA_TASK_NAME, task_string)
        if info.permutes:
            writer.add_uint32(_OURS_HEADS, int(info.head_count or 0))
            writer.add_uint32(_OURS_HEADS_KV, int(info.head_count_kv or 0))
        for name, t in tensors:
            if t.dtype == torch.bfloat16:
                raw = t.view(torch.int16).numpy().view(np.uint8)
                writer.add_tensor(name, raw, raw_dtype=g.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(name, t.numpy())
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


# ----------------------------------------------------------------------------- load
def _string_field(f: _GGUFFile, key: str):
    vtype, value = f.kv.get(key, (None, None))
    if vtype is None:
        return None
    if vtype != _T_STRING:
        raise AdapterError(f"{f.path}: {key} is not a string (type {vtype})")
    return value


def gguf_metadata(path: str | os.PathLike) -> dict:
    """The adapter metadata of a GGUF LoRA file, without its tensors.

    Keys: ``architecture``, ``type`` (general.type), ``adapter_type``,
    ``alpha`` (float, 0.0 when absent), ``task_names`` (list, split on
    ``", "``; empty when absent), ``prompt_prefix`` (or None), ``head_count``
    / ``head_count_kv`` (ours; None when absent), ``tensors`` (name -> numpy shape).
    """
    with _Opened(path) as (f, _):
        return _metadata(f)


def _metadata(f: _GGUFFile) -> dict:
    alpha_type, alpha = f.kv.get("adapter.lora.alpha", (_T_FLOAT32, 0.0))
    if alpha_type not in _SCALAR_FMT or alpha_type == 7 or not math.isfinite(float(alpha)):
        raise AdapterError(f"{f.path}: adapter.lora.alpha is {alpha!r} (type {alpha_type}), expected a float32")
    tasks = _string_field(f, "adapter.lora.task_name")
    heads = {}
    for key in (_OURS_HEADS, _OURS_HEADS_KV):
        v = f.get(key)
        heads[key] = int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
    return {
        "architecture": _string_field(f, "general.architecture"),
        "type": _string_field(f, "general.type"),
        "adapter_type": _string_field(f, "adapter.type"),
        "alpha": float(alpha),
        "task_names": tasks.split(", ") if tasks else [],
        "prompt_prefix": _string_field(f, "adapter.lora.prompt_prefix"),
        "head_count": heads[_OURS_HEADS],
        "head_count_kv": heads[_OURS_HEADS_KV],
        "tensors": {name: t.np_shape for name, t in f.tensors.items()},
    }


def load_gguf(path: str | os.PathLike, base=None):
    """Read a GGUF LoRA adapter (ours or llama.cpp's ``convert_lora_to_gguf.py``) as a :class:`kmerge_fast.LoRA`.

    Module names come back as base-model paths (``model.layers.3.self_attn.q_proj``);
    factors keep the file's dtype (F32, F16, BF16; Q8_0 becomes float32);
    ``scaling = alpha / r`` per module. ``base`` (same forms as
    :func:`save_gguf`) is needed to undo the q/k permutation of a ``llama``
    file that lacks our head-count keys, and when given is also checked
    against (architecture, tensor names and shapes).
    """
    import kmerge_fast as kf

    where = str(path)
    with _Opened(path) as (f, buf):
        meta = _metadata(f)
        if meta["type"] != "adapter":
            raise AdapterError(f"{where}: not an adapter (general.type is {meta['type']!r}, expected 'adapter')")
        if meta["adapter_type"] != "lora":
            raise AdapterError(f"{where}: adapter.type is {meta['adapter_type']!r}, expected 'lora'")
        arch = _check_arch(meta["architecture"], where, "general.architecture")
        info = _resolve_base(base) if base is not None else None
        if info is not None and info.arch != arch:
            raise AdapterError(f"{where}: architecture {arch!r}, but the base {info.source} is {info.arch!r}")
        if info is None:
            info = _Base(arch, meta["head_count"], meta["head_count_kv"], None, None, None, where)
        else:
            for ours, theirs, key in ((meta["head_count"], info.head_count, _OURS_HEADS),
                                      (meta["head_count_kv"], info.head_count_kv, _OURS_HEADS_KV)):
                if ours is not None and theirs is not None and ours != theirs:
                    raise AdapterError(f"{where}: {key} is {ours} but the base {info.source} has {theirs}")

        pairs: dict[str, dict[str, str]] = {}
        for name in f.tensors:
            if name.endswith(".lora_a") or name.endswith(".lora_b"):
                pairs.setdefault(name[:-7], {})[name[-1]] = name
            else:
                raise AdapterError(f"{where}: tensor {name!r} is not a LoRA factor (.lora_a / .lora_b)")
        if not pairs:
            raise AdapterError(f"{where}: the adapter has no tensors")
        factors, scalings = {}, {}
        for gname, ab in pairs.items():
            if set(ab) != {"a", "b"}:
                raise AdapterError(f"{where}: tensor {gname!r} has lora_{next(iter(ab))} but no "
                                   f"lora_{'b' if 'a' in ab else 'a'}")
            hf = hf_module_name(gname)
            if hf is None:
                raise AdapterError(f"{where}: tensor {gname!r} has no module this reader maps "
                                   f"(supported: blk.N.{{{', '.join(_gguf_kinds().values())}}}.weight)")
            ta, tb = f.tensors[ab["a"]], f.tensors[ab["b"]]
            if len(ta.ne) != 2 or len(tb.ne) != 2 or ta.ne[1] != tb.ne[0]:
                raise AdapterError(f"{where}: tensor {gname!r}: lora_a ne={list(ta.ne)} and lora_b ne={list(tb.ne)} "
                                   "are not [n_in, r] and [r, n_out]")
            n_in, r, n_out = ta.ne[0], ta.ne[1], tb.ne[1]
            _check_against_base(info, gname, n_out, n_in, f"{where}: tensor {gname!r}")
            A, B = _read_tensor(f, buf, ab["a"]), _read_tensor(f, buf, ab["b"])
            if A.dtype != B.dtype:
                A, B = A.float(), B.float()
            heads = _heads_for(info, hf.split(".", 3)[3], f"{where}: tensor {gname!r}")
            if heads is not None:
                try:
                    B = unpermute_rows(B, heads)
                except AdapterError as e:
                    raise AdapterError(f"{where}: tensor {gname!r}: {e}") from None
            factors[hf] = (A, B)
            scalings[hf] = meta["alpha"] / r if meta["alpha"] else 1.0
    try:
        return kf.LoRA.from_factors(factors, scaling=scalings)
    except AdapterError as e:
        raise AdapterError(f"{where}: {e}") from None
