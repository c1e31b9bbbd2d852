"""Shared fixtures: backends, dtypes, tolerances (stated once), adapter factories."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

# Without a CUDA device the Triton kernels can only run under Triton's interpreter,
# which must be chosen before Triton is first imported (kmerge_fast imports it lazily).
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kmerge_fast as kf  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

#: Relative error of a value *stored* in each dtype (output rounding).
STORE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
#: Kernels accumulate half inputs in float32, so results computed from the exact
#: input values (not stored back in half) meet the float32 bound for every dtype.
ACCUM_TOL = 1e-5
#: Truncation: error of our rank-r approximation minus the optimal one, over ||M||_F.
TRUNC_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-4}


def available_backends() -> list[str]:
    """Backends runnable on CPU tensors here (triton needs a GPU or the interpreter)."""
    names = [b for b in kf.backends() if b != "triton"]
    return names


@pytest.fixture(params=available_backends())
def backend(request):
    with kf.use_backend(request.param):
        yield request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


# ------------------------------------------------------------------ devices
#: Where ``random_lora`` puts its factors (the last entry): the CPU, or a device chosen with ``adapters_on``.
_ADAPTER_DEVICES = [torch.device("cpu")]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` with the same strides (a strided view stays strided)."""
    if t.device == device:
        return t
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    return out.copy_(t)


@contextlib.contextmanager
def adapters_on(device: torch.device):
    """Inside the block ``random_lora`` makes its factors on ``device`` (test_triton.py runs
    the shared cases of helpers/ on CUDA tensors this way); ``dense64`` stays on the CPU."""
    _ADAPTER_DEVICES.append(torch.device(device))
    try:
        yield
    finally:
        _ADAPTER_DEVICES.pop()


# --------------------------------------------------------------- adapters
def random_lora(shapes: dict[str, tuple[int, int]], rank: int | dict = 4, dtype=torch.float32,
                scaling: float | dict = 0.5, seed: int = 0, strided: bool = False) -> kf.LoRA:
    """A LoRA with Gaussian factors; ``shapes`` maps module name -> (n_out, n_in).

    ``strided=True`` makes every factor a non-contiguous view (every other column
    of a wider tensor) to exercise stride handling. The factors lie on the CPU,
    or on the device of an enclosing ``adapters_on`` (strides kept).
    """
    device = _ADAPTER_DEVICES[-1]
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (n_out, n_in) in shapes.items():
        r = rank[name] if isinstance(rank, dict) else rank
        if strided:
            a = torch.randn(r, 2 * n_in, generator=g)[:, ::2]
            b = torch.randn(n_out, 2 * r, generator=g)[:, ::2]
        else:
            a = torch.randn(r, n_in, generator=g)
            b = torch.randn(n_out, r, generator=g)
        factors[name] = (to_device(a.to(dtype), device), to_device(b.to(dtype), device))
    return kf.LoRA.from_factors(factors, scaling=scaling)


def dense64(module) -> torch.Tensor:
    """Float64 truth of a module's update from its stored factors, on the CPU."""
    return (module.scaling * (module.B.double() @ module.A.double())).cpu()


SHAPES_SMALL = {"q": (12, 10), "k": (6, 10)}
SHAPES_AWKWARD = {"odd": (577, 193), "thin": (1, 33), "wide": (5, 301)}

#: Two layers of q_proj (32 x 32) and v_proj (16 x 32): the modules of ``family_adapters``.
FAMILY_SHAPES = {f"model.layers.{i}.self_attn.{p}": (32, 32) if p == "q_proj" else (16, 32)
                 for i in range(2) for p in ("q_proj", "v_proj")}


def family_adapters(n: int, families: int = 3, rank: int = 4, seed: int = 0, dtype=torch.float32) -> list[kf.LoRA]:
    """Adapters in ``families`` groups: a shared random update per group plus noise, so routing is meaningful."""
    g = torch.Generator().manual_seed(seed)
    bases = [{name: (torch.randn(rank, shape[1], generator=g), torch.randn(shape[0], rank, generator=g))
              for name, shape in FAMILY_SHAPES.items()} for _ in range(families)]
    out = []
    for k in range(n):
        base = bases[k % families]
        factors = {name: (a + 0.6 * torch.randn(a.shape, generator=g), b + 0.6 * torch.randn(b.shape, generator=g))
                   for name, (a, b) in base.items()}
        out.append(kf.LoRA.from_factors({n_: (a.to(dtype), b.to(dtype)) for n_, (a, b) in factors.items()},
                                        scaling=0.5 + 0.25 * (k % 3)))
    return out


def tiny_llama(hidden: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised Llama built from a config (no downloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interpret: Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "triton_gpu: Triton kernels compiled for a CUDA device")
    config.addinivalue_line("markers", "quality: the quality benchmark's tiny end-to-end mode")


def pytest_report_header(config):
    return f"kmerge_fast backends: {kf.backends()}; KMERGE_FAST_BACKEND={os.environ.get('KMERGE_FAST_BACKEND')}"


def spy_inner_products(monkeypatch) -> list:
    """Record the batch of every cpu / reference ``inner_products`` call (the calls still run)."""
    from kmerge_fast.ops.backend import cpp as cpu, reference

    calls = []
    for mod in (cpu, reference):
        original = mod.inner_products
        monkeypatch.setattr(mod, "inner_products",
                            lambda batch, precise=False, _o=original: calls.append(batch) or _o(batch, precise))
    return calls
