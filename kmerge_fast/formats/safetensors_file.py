"""Writing a safetensors file tensor by tensor, without a serialised copy of the whole file.

``safetensors.torch.save`` returns the whole file as one ``bytes`` object; for a
Llama-3.2-1B adapter that is 14 MB of fresh memory per write, filled and then
copied again into the page cache. :func:`write` streams each tensor's own memory
to the file instead. Its output is the file ``safetensors.torch.save`` produces
(the tests compare the bytes): an 8-byte little-endian header length, the JSON
header (``__metadata__`` first, then every tensor with its dtype, shape and
``[begin, end)`` byte offsets, no whitespace) padded with spaces to a multiple
of 8 bytes, then the tensors' bytes, in the header's order: the widest dtype
first (F64, F32, BF16, F16: safetensors' dtype order, descending), by name
within a dtype.

Reading stays with the ``safetensors`` package (:mod:`kmerge_fast.formats.peft`).
"""

from __future__ import annotations

import json
import os
import struct
import sys

import torch

from ..errors import AdapterError

#: safetensors' names of the dtypes an adapter holds (kmerge_fast.adapter.SUPPORTED_DTYPES), in
#: safetensors' dtype order (a file lists the later ones first).
DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
_ORDER = {dtype: i for i, dtype in enumerate(DTYPE_NAMES)}


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (CPU tensors of the dtypes of :data:`DTYPE_NAMES`) and the string ``metadata``
    as a safetensors file at ``path`` (created or truncated with ``open(path, "wb")``'s permissions).

    Raises:
        AdapterError: a tensor not on the CPU or of another dtype (naming the tensor and ``path``), or a
            big-endian host (safetensors is little-endian; the tensors' bytes are written as they lie in
            memory); nothing is written then.
    """
    if sys.byteorder != "little":
        raise AdapterError(f"{path}: writing safetensors needs a little-endian host, this one is {sys.byteorder}")
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES or t.device.type != "cpu":
            raise AdapterError(f"{path}: tensor {name!r} is {t.dtype} on {t.device}; a safetensors file here "
                               f"holds CPU tensors of {list(DTYPE_NAMES.values())}")
    names = sorted(tensors, key=lambda n: (-_ORDER[tensors[n].dtype], n))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            # a byte view of the tensor's own memory: written without a copy (one if not contiguous)
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
