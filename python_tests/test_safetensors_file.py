"""kmerge_fast.formats.safetensors_file: the streamed writer produces safetensors' own file, byte for byte."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as reference_save

import kmerge_fast as kf
from kmerge_fast.errors import AdapterError
from kmerge_fast.formats import safetensors_file

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _tensors(dtypes, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 13), (1, 1), (0, 5), (3,), (2, 3, 5)]   # odd sizes: offsets not multiples of 8
    out = {}
    for i, shape in enumerate(shapes * 2):
        dtype = dtypes[i % len(dtypes)]
        out[f"m{(i * 7) % 10}.w\u00e9ight"] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return out


@pytest.mark.parametrize("dtypes", [[d] for d in DTYPES] + [DTYPES], ids=lambda ds: "+".join(map(str, ds)))
def test_file_equals_safetensors_own(tmp_path, dtypes):
    tensors = _tensors(dtypes)
    tensors["t.transposed"] = torch.randn(6, 4, dtype=torch.float64).to(dtypes[0]).T   # not contiguous
    safetensors_file.write(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == reference_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("bad", [torch.zeros(2, 2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.float32,
                                                                                    device="meta")])
def test_unsupported_tensor_is_refused_before_writing(tmp_path, bad):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(AdapterError, match=r"x\.safetensors: tensor 'bad'"):
        safetensors_file.write(target, {"a": torch.zeros(2), "bad": bad}, {})
    assert target.read_bytes() == b"old"


def test_big_endian_host_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(AdapterError, match=r"x\.safetensors: writing safetensors needs a little-endian host"):
        safetensors_file.write(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {})
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("dtype", DTYPES)
def test_peft_and_mlx_files_load_back(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    modules = {f"model.layers.{i}.self_attn.q_proj": kf.LoRAModule(torch.randn(3, 10, generator=g).to(dtype),
                                                                    torch.randn(6, 3, generator=g).to(dtype), 2.0)
               for i in range(2)}
    lora = kf.LoRA(modules)
    lora.save(tmp_path / "peft")
    back = kf.LoRA.load(tmp_path / "peft")
    for name, m in modules.items():
        assert torch.equal(back.modules[name].A, m.A) and torch.equal(back.modules[name].B, m.B)
    lora.save(tmp_path / "mlx", format="mlx")
    mlx = load_file(tmp_path / "mlx" / "adapters.safetensors")
    for name, m in modules.items():
        assert torch.equal(mlx[f"{name}.lora_a"], m.A.T)
