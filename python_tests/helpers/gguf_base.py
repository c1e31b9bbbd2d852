"""A tiny base model GGUF for tests of the GGUF adapter format (test_format_gguf.py, test_store_formats.py).

A Llama of 2 layers with llama.cpp's tensor names and small shapes, written
with ``gguf.GGUFWriter``. Its q/v shapes are those of conftest's
``family_adapters`` (q 32 x 32, v 16 x 32), so a store of those adapters can
emit GGUF slots against it. Importing this module needs the ``gguf`` package.
"""

from __future__ import annotations

import gguf
import numpy as np

from kmerge_fast.formats import gguf as G

HIDDEN, N_HEAD, N_KV, FFN, LAYERS = 32, 4, 2, 48, 2
HEAD_DIM = HIDDEN // N_HEAD
SHAPES = {  # layer-relative module -> (n_out, n_in)
    "self_attn.q_proj": (N_HEAD * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (N_KV * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (N_KV * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, N_HEAD * HEAD_DIM),
    "mlp.gate_proj": (FFN, HIDDEN),
    "mlp.up_proj": (FFN, HIDDEN),
    "mlp.down_proj": (HIDDEN, FFN),
}
CONFIG = {"model_type": "llama", "num_attention_heads": N_HEAD, "num_key_value_heads": N_KV,
          "num_hidden_layers": LAYERS, "hidden_size": HIDDEN}


def write_base(path, arch="llama", n_head=N_HEAD, n_kv=N_KV, layers=LAYERS, shapes=SHAPES, general_type="model"):
    """A tiny base model GGUF with llama.cpp's tensor names (numpy shapes (n_out, n_in)); returns its path."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(general_type)
    w.add_block_count(layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_token_list([f"t{i}" for i in range(16)])
    w.add_tensor("token_embd.weight", np.zeros((16, HIDDEN), np.float32))
    for n in range(layers):
        w.add_tensor(f"blk.{n}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        for rel, shape in shapes.items():
            w.add_tensor(G.gguf_tensor_name(f"model.layers.{n}.{rel}"), np.zeros(shape, np.float16))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
