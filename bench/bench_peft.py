"""End-to-end ``add_weighted_adapter`` on a peft model: peft's own method vs ``kf.peft.add_weighted_adapter``.

Run from the repository root::

    python -m bench.bench_peft            # peft on all 64 modules (several minutes per svd case)
    python -m bench.bench_peft --quick    # peft on a 2-layer model (8 modules), scaled to 64 modules

Model: a ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no download) with
the Llama-3.2-1B attention shapes (hidden 2048, 16 layers, 32 heads, 8 kv
heads: q/o 2048x2048, k/v 512x2048) but vocab 128 and MLP width 64, wrapped
by ``get_peft_model`` + ``add_adapter`` with 8 LoRA adapters ``a0``..``a7``
(r = 32, lora_alpha = 64, q/k/v/o_proj). Every LoRA A and B is refilled with
N(0, 0.02) from a generator seeded by the parameter's name (peft inits B to
zero), so the update is non-trivial and a 2-layer model holds exactly the
adapters of layers 0-1 of the 16-layer one.

Cases: ``combination_type="svd"`` and ``"ties_svd"`` (density 0.5,
majority_sign_method "total"), merging the first k = 2 and k = 8 adapters
with weights 1/k into rank 32; float32 only: peft computes the SVD on the CPU
in the adapters' dtype and ``torch.linalg.svd`` has no float16 CPU kernel, so
peft cannot run fp16 adapters here.

Per case and path (rows):

- ``peft``: ``model.add_weighted_adapter(...)`` (peft 0.21: one dense dW per
  module, a full ``torch.linalg.svd``). One timed run, no warm-up (minutes on
  the full model). ``--quick`` runs it on the 2-layer model (8 modules).
- ``kf (<backend>)``: ``kf.peft.add_weighted_adapter(model, ...)`` (same
  signature and effect), on the same model as the peft row, and with
  ``--quick`` also on the full 16-layer model. One warm-up run (which is the
  memory run), then the median of a few timed runs. The backend is the first
  of ``kf.backends()`` (``cpp`` when built) or ``$KMERGE_FAST_BACKEND``.

Every call adds a new adapter ``merged``; it is deleted (untimed) before the
next call. Both libraries' code paths are warmed up once on a tiny model
first (imports, LAPACK), so no row pays one-time costs.

Columns:

- ``time s``: the call's seconds (peft: one run; kf: median of ``runs``);
  ``s / 64 modules``: scaled to the 64 modules of the full model (times 64 / modules;
  only the 8-module rows of ``--quick`` are scaled).
- ``x (peft/kf)``: the peft row's ``s / 64 modules`` over this row's; ``speed target``:
  the issue's targets, svd >= 100x, ties_svd >= 10x faster end to end.
- ``peak extra MiB``: the process peak RSS during the call above the RSS
  before it: ``gc.collect()`` and glibc ``malloc_trim(0)``, read VmRSS,
  reset the peak (``echo 5 > /proc/self/clear_refs``), call, read VmHWM.
  ``retained MiB``: VmRSS after the call (gc + trim again) minus before: the
  new adapter's memory (27 MiB of factors for 64 modules at r = 32, plus
  whatever else the call keeps alive). ``mem. target`` (ties_svd): lower peak
  than peft on the same model.
- ``BA rel. diff``: max over the checked modules (q/k/v/o of layer 0 and
  q_proj of the last peft layer) of ||B A - B_p A_p||_F / ||B_p A_p||_F,
  kf's merged adapter against peft's (the factors are unique only up to
  rotations; the products should agree to ~1e-5 for svd; for ties_svd the
  combined M has a flat, noise-like spectrum, so near-ties of sigma_r and
  sigma_{r+1} make the product itself non-unique).
- ``approx. err kf/peft - 1``: max over the checked modules of ||M - B A||_F /
  ||M - B_p A_p||_F - 1, M the dense combined update peft truncates
  (``peft.utils.merge_utils.task_arithmetic`` / ``ties`` of the modules'
  ``get_delta_weight``). peft's full SVD is optimal, so 0 is the best
  possible (up to rounding); kf's subspace iteration stops within 1e-5 of it.
"""

from __future__ import annotations

import gc
import os
import zlib

import torch

import kmerge_fast as kf

from . import harness as h

RANK = h.LLAMA_1B_RANK                  # r = 32
ALPHA = int(RANK * h.LLAMA_1B_SCALING)  # lora_alpha = 64
N_ADAPTERS = 8
DENSITY = 0.5
PROJECTIONS = tuple(h.LLAMA_1B_ATTENTION)  # q_proj, k_proj, v_proj, o_proj
MERGED = "merged"
TARGETS = {"svd": 100.0, "ties_svd": 10.0}


# ------------------------------------------------------------------ model
def build_peft_model(layers: int = h.LLAMA_1B_LAYERS, hidden: int = 2048, heads: int = 32, kv_heads: int = 8,
                     intermediate: int = 64, vocab: int = 128, n_adapters: int = N_ADAPTERS, rank: int = RANK,
                     alpha: int = ALPHA, std: float = 0.02, seed: int = 0):
    """A PeftModel over a config-built LlamaForCausalLM holding adapters ``a0``.. with random A and B.

    Each LoRA parameter is drawn from N(0, std) with a generator seeded by
    crc32(its name) + seed: models of different depth share the adapters of their common layers.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=64)
    lora = dict(r=rank, lora_alpha=alpha, target_modules=list(PROJECTIONS))
    model = get_peft_model(LlamaForCausalLM(config).eval(), LoraConfig(**lora), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed)
                p.normal_(0.0, std, generator=g)
    return model


def lora_layers(model) -> dict[str, object]:
    """``layers.{i}.self_attn.{proj}`` -> the model's LoraLayer."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for key, m in model.named_modules():
        if isinstance(m, LoraLayer):
            out[key[key.index("layers."):]] = m
    return out


def delete_merged(model) -> None:
    if MERGED in model.peft_config:
        model.delete_adapter(MERGED)
    gc.collect()


# ----------------------------------------------------------------- memory


# ---------------------------------------------------------------- checks
def check_modules(layers: int) -> list[str]:
    return [f"layers.0.self_attn.{p}" for p in PROJECTIONS] + [f"layers.{layers - 1}.self_attn.q_proj"]


def merged_products(model, names: list[str]) -> dict[str, torch.Tensor]:
    """float64 scaling * B @ A of the ``merged`` adapter on ``names``."""
    layers = lora_layers(model)
    out = {}
    for name in names:
        layer = layers[name]
        a, b = layer.lora_A[MERGED].weight.detach(), layer.lora_B[MERGED].weight.detach()
        out[name] = layer.scaling[MERGED] * (b.double() @ a.double())
    return out


def dense_targets(model, names: list[str], adapters: list[str], weights: list[float],
                  combination_type: str) -> dict[str, torch.Tensor]:
    """float64 M per module: peft's own dense combination of the modules' get_delta_weight."""
    from peft.utils.merge_utils import task_arithmetic, ties

    layers = lora_layers(model)
    w = torch.tensor(weights)
    out = {}
    with torch.no_grad():
        for name in names:
            deltas = [layers[name].get_delta_weight(a) for a in adapters]
            m = task_arithmetic(deltas, w) if combination_type == "svd" else ties(deltas, w, DENSITY, "total")
            out[name] = m.double()
    return out


def compare(ours: dict, peft: dict, dense: dict) -> tuple[float, float]:
    """(max BA rel. diff vs peft, max approx-error ratio ours/peft minus 1) over the checked modules."""
    diff = max(float((ours[n] - peft[n]).norm() / peft[n].norm()) for n in peft)
    ratio = max(float((dense[n] - ours[n]).norm() / (dense[n] - peft[n]).norm()) for n in peft)
    return diff, ratio - 1.0


# ------------------------------------------------------------------ runs
def peft_call(model, adapters, weights, combination_type):
    kw = {"density": DENSITY} if combination_type == "ties_svd" else {}
    return lambda: model.add_weighted_adapter(adapters, weights, MERGED, combination_type=combination_type, **kw)


def kf_call(model, adapters, weights, combination_type):
    kw = {"density": DENSITY} if combination_type == "ties_svd" else {}
    return lambda: kf.peft.add_weighted_adapter(model, adapters, weights, MERGED,
                                                combination_type=combination_type, **kw)


def warm_up() -> None:
    """Run both paths once per combination type on a tiny model (imports, LAPACK, thread pools)."""
    tiny = build_peft_model(layers=1, hidden=64, heads=4, kv_heads=2, n_adapters=2, rank=4, alpha=8)
    for ct in TARGETS:
        for call in (peft_call, kf_call):
            try:
                call(tiny, ["a0", "a1"], [0.5, 0.5], ct)()
            except Exception as e:  # the real run reports it in its row
                print(f"[bench] warm-up {call.__name__} {ct}: {e!r}")
            delete_merged(tiny)
    del tiny
    gc.collect()


def run_kf(model, backend, adapters, weights, ct, check, budget_s, min_runs, max_runs):
    """(Timing or None, why, peak MiB, retained MiB, products of the checked modules)."""
    call = kf_call(model, adapters, weights, ct)
    delete_merged(model)
    first, why = h.try_backend(backend, lambda: h.peak_call(call))  # warm-up + memory run
    if why:
        delete_merged(model)
        return None, why, None, None, None
    t_first, peak, kept = first
    products = merged_products(model, check)
    delete_merged(model)
    runs = max(min_runs, min(max_runs, int(budget_s / max(t_first, 1e-9))))
    with kf.use_backend(backend):
        timing = h.measure(call, setup=lambda: delete_merged(model), warmup=0, repeats=runs)
    delete_merged(model)
    return timing, None, peak, kept, products


def run_case(ct: str, k: int, peft_model, kf_models: list, backend: str, quick: bool) -> list[list]:
    adapters = [f"a{i}" for i in range(k)]
    weights = [1.0 / k] * k
    peft_layers = len(lora_layers(peft_model)) // len(PROJECTIONS)
    check = check_modules(peft_layers)
    case = f"{ct}" + (f" d={DENSITY}" if ct == "ties_svd" else "")
    target = TARGETS[ct]
    print(f"[bench] {case} k={k}: peft on {peft_layers} layers ...", flush=True)

    delete_merged(peft_model)
    t_peft, peak_peft, kept_peft = h.peak_call(peft_call(peft_model, adapters, weights, ct))
    peft_products = merged_products(peft_model, check)
    delete_merged(peft_model)
    dense = dense_targets(peft_model, check, adapters, weights, ct)
    peft_modules = len(PROJECTIONS) * peft_layers
    peft_64 = t_peft * 64 / peft_modules
    scaled = f", x{64 / peft_modules:g}" if peft_modules != 64 else ""
    rows = [[case, k, "peft", f"{peft_modules}{scaled}", t_peft, 1, peft_64, 1.0, "", peak_peft, kept_peft,
             None, None, ""]]

    for model in kf_models:
        n_layers = len(lora_layers(model)) // len(PROJECTIONS)
        modules = len(PROJECTIONS) * n_layers
        print(f"[bench] {case} k={k}: kf ({backend}) on {n_layers} layers ...", flush=True)
        timing, why, peak, kept, products = run_kf(
            model, backend, adapters, weights, ct, check,
            budget_s=3.0 if quick else 20.0, min_runs=1 if quick else 3, max_runs=7)
        label = f"kf ({backend})"
        if why:
            rows.append([case, k, label, modules, why, None, None, None, None, None, None, None, None, None])
            continue
        kf_64 = timing.seconds * 64 / modules
        ratio = peft_64 / kf_64
        speed = f">= {target:g}x: {'yes' if ratio >= target else 'NO'}"
        if ct != "ties_svd":
            mem = ""
        elif model is not peft_model:
            mem = "n/a (other model)"
        elif peak is None or peak_peft is None:
            mem = "n/a (no peak)"
        else:
            mem = f"lower: {'yes' if peak < peak_peft else 'NO'}"
        diff, err_ratio = compare(products, peft_products, dense)
        scaled = f", x{64 / modules:g}" if modules != 64 else ""
        rows.append([case, k, label, f"{modules}{scaled}", timing.seconds, timing.runs, kf_64, ratio, speed,
                     peak, kept, diff, err_ratio, mem])
    return rows


def main(argv=None) -> None:
    args = h.parse_quick(__doc__, "peft on a 2-layer model (8 modules), its time scaled to 64 modules", argv)
    torch.manual_seed(0)
    backend = os.environ.get(kf.ops.ENV_VAR) or kf.backends()[0]
    h.machine_info()  # the matmul peaks, before anything else is in memory
    print(f"[bench] warming up on a tiny model; kmerge_fast backend {backend!r}", flush=True)
    warm_up()

    full = build_peft_model(layers=h.LLAMA_1B_LAYERS)
    if args.quick:
        small = build_peft_model(layers=2)
        peft_model, kf_models = small, [small, full]
    else:
        peft_model, kf_models = full, [full]

    rows = []
    for ct in TARGETS:
        for k in (2, N_ADAPTERS):
            rows.extend(run_case(ct, k, peft_model, kf_models, backend, args.quick))

    headers = ["case", "k", "path", "modules", "time s", "runs", "s / 64 modules", "x (peft/kf)", "speed target",
               "peak extra MiB", "retained MiB", "BA rel. diff", "approx. err kf/peft - 1",
               "mem. target"]
    scope = ("QUICK: peft ran on a 2-layer model (8 modules) and its time is scaled x8 to 64 modules; "
             "kf ran on that model and on the full 16-layer one (64 modules). Peak memory compares only "
             "rows on the same model." if args.quick else "All rows on the full 16-layer model (64 modules).")
    notes = f"""
End-to-end `add_weighted_adapter` on a config-built LlamaForCausalLM with Llama-3.2-1B attention shapes
(q/o 2048x2048, k/v 512x2048 per layer), vocab 128, MLP 64; 8 LoRA adapters r={RANK}, lora_alpha={ALPHA}
on q/k/v/o_proj, A and B ~ N(0, 0.02); weights 1/k, merged rank {RANK}, float32. {scope}
kmerge_fast backend: {backend}. peft: one run; kf: median of `runs` after one warm-up (the memory run).
`x (peft/kf)` = peft s / 64 modules over the row's. Targets (the issue's): svd >= 100x and ties_svd >= 10x
faster end to end, ties_svd with a lower peak. `peak extra MiB` = VmHWM during the call - VmRSS before;
`retained MiB` = VmRSS after - before. `BA rel. diff` vs peft's merged adapter and
`approx. err kf/peft - 1` (||M - BA||_F ratio minus 1, M = peft's dense combination; 0 = optimal)
are maxima over q/k/v/o of layer 0 and q_proj of the last layer peft ran.
"""
    h.report("peft-quick" if args.quick else "peft", "peft add_weighted_adapter: peft vs kmerge_fast",
             headers, rows, notes, {**vars(args), "backend": backend})


if __name__ == "__main__":
    main()
