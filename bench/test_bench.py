"""pytest-benchmark cases on a small version of the benchmark shapes.

Run: ``pytest bench/`` (CI runs ``pytest python_tests`` and never collects these).
Shapes: 4 modules of 256 x 256 (n_out x n_in), rank r = 8, float32;
merge: SVD merge of 4 adapters (R = 32) into rank 8;
similarity: cos of 1 newcomer vs 8 stored adapters, norms cold (reset before every round);
peft: ``kf.peft.add_weighted_adapter`` (svd, 4 adapters r=8) on a 2-layer Llama of hidden 256 (skipped without peft).
ops: ``bench_ops`` on two small modules with no time budget (a smoke test of every C++ kernel row).
The cpp cases are skipped while ``kmerge_fast._C`` is not built.
"""

from __future__ import annotations

import pytest
import torch

import kmerge_fast as kf

from . import harness as h

SHAPES = {f"model.layers.{i}.self_attn.q_proj": (256, 256) for i in range(4)}
RANK = 8
BACKENDS = ["reference", "cpp"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in kf.backends():
        pytest.skip(f"backend {request.param!r} unavailable: {kf.ops.unavailable_reasons().get(request.param)}")
    with kf.use_backend(request.param):
        yield request.param


def test_merge_svd(benchmark, backend):
    loras = h.random_adapters(4, torch.float32, SHAPES, rank=RANK)
    merged = benchmark(kf.merge, loras, [0.25] * 4, method="svd", rank=RANK)
    assert merged.ranks == {kf.lora.canonical_name(n): RANK for n in SHAPES}


def test_similarity_cos_cold(benchmark, backend):
    adapters = h.random_adapters(9, torch.float32, SHAPES, rank=RANK, seed=1)
    new, stored = adapters[0], adapters[1:]
    sims = benchmark.pedantic(kf.similarity_matrix, args=([new], stored), kwargs={"metric": "cos"},
                              setup=lambda: h.reset_norm_caches(adapters), rounds=50, iterations=1)
    assert sims.shape == (1, 8)


def test_similarity_cos_warm(benchmark, backend):
    adapters = h.random_adapters(9, torch.float32, SHAPES, rank=RANK, seed=1)
    new, stored = adapters[0], adapters[1:]
    kf.similarity_matrix(stored, stored[:1])  # cache the stored adapters' norms
    sims = benchmark.pedantic(kf.similarity_matrix, args=([new], stored), kwargs={"metric": "cos"},
                              setup=lambda: h.reset_norm_caches([new]), rounds=50, iterations=1)
    assert sims.shape == (1, 8)


def test_peft_add_weighted_adapter_svd(benchmark, backend):
    """kf.peft.add_weighted_adapter (svd, 4 adapters r=8) on a tiny config-built Llama (hidden 256, 2 layers)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from .bench_peft import MERGED, build_peft_model, delete_merged

    model = build_peft_model(layers=2, hidden=256, heads=4, kv_heads=2, n_adapters=4, rank=RANK, alpha=2 * RANK)
    adapters = [f"a{i}" for i in range(4)]
    benchmark.pedantic(kf.peft.add_weighted_adapter, args=(model, adapters, [0.25] * 4, MERGED),
                       kwargs={"combination_type": "svd"}, setup=lambda: delete_merged(model), rounds=20,
                       iterations=1)
    assert MERGED in model.peft_config


def test_bench_ops_smoke():
    """bench_ops on two small modules with no time budget: every row times its kernel and agrees with torch."""
    if "cpp" not in kf.backends():
        pytest.skip(f"backend 'cpp' unavailable: {kf.ops.unavailable_reasons().get('cpp')}")
    from .bench_ops import HEADERS, run_all

    shapes = {"model.layers.0.self_attn.q_proj": (96, 80), "model.layers.0.self_attn.k_proj": (40, 80)}
    rows = [dict(zip(HEADERS, row)) for row in run_all(shapes, shapes, h.machine_info(), budget_s=0.0)]
    assert {r["op"] for r in rows} == {"gram", "apply", "truncate", "dense_merge", "abs_kth", "weighted_sum"}
    for r in rows:
        assert r["modules"] == 2 and r["time ms"] > 0 and r["rate"] > 0, r
        if r["rel. diff"] is not None:
            assert r["rel. diff"] < 1e-2, r


def test_machine_header_names_the_gpu_only_when_there_is_one():
    m = {"cpu": "cpu", "isa": "avx2", "cores": 2, "torch_threads": 2, "python": "3.11", "torch": "2.13",
         "kmerge_fast": "0.1", "commit": "abc", "backends": ["cpp"], "peak_fp32_gflops": 1.0, "peak_fp64_gflops": 0.5}
    assert "GPU" not in h.machine_header(m)
    assert "backends ['cpp']; GPU NVIDIA H200.\n" in h.machine_header({**m, "gpu": "NVIDIA H200"})
