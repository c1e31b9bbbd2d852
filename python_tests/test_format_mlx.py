"""MLX-LM adapter folders (kmerge_fast.formats.mlx), tested against MLX-LM's layout as its source describes it.

mlx does not run on Linux: nothing here loads the folder into MLX-LM itself.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kmerge_fast as kf
from kmerge_fast.formats import mlx as M

SHAPES = {"self_attn.q_proj": (32, 32), "self_attn.v_proj": (16, 32), "mlp.down_proj": (32, 48)}


def make_lora(rank=4, scaling=2.0, layers=(0, 1), prefix="base_model.model.", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for n in layers:
        for rel, (n_out, n_in) in SHAPES.items():
            r = rank(rel) if callable(rank) else rank
            factors[f"{prefix}model.layers.{n}.{rel}"] = (torch.randn(r, n_in, generator=g).to(dtype),
                                                          torch.randn(n_out, r, generator=g).to(dtype))
    if callable(scaling):
        scaling = {k: scaling(k) for k in factors}
    return kf.LoRA.from_factors(factors, scaling=scaling)


def delta(m):
    """dW = s * B @ A in float64."""
    return m.scaling * (m.B.double() @ m.A.double())


def by_base_name(lora):
    return {k[len("base_model.model."):] if k.startswith("base_model.model.") else k: m
            for k, m in lora.modules.items()}


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_exact(tmp_path, prefix, dtype):
    lora = make_lora(prefix=prefix, dtype=dtype)
    M.save_mlx(lora, tmp_path / "ad")
    back = by_base_name(M.load_mlx(tmp_path / "ad"))
    want = by_base_name(lora)
    assert set(back) == set(want)
    for name, m in want.items():
        assert back[name].A.dtype == dtype
        assert torch.equal(back[name].A, m.A) and torch.equal(back[name].B, m.B) and back[name].scaling == 2.0


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        M.save_mlx(make_lora(), tmp_path / "ad")
    finally:
        os.umask(old)
    for name in (M.WEIGHTS_NAME, M.CONFIG_NAME):
        assert (tmp_path / "ad" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == sorted([M.WEIGHTS_NAME, M.CONFIG_NAME])


def test_key_names_transposed_shapes_and_config(tmp_path):
    lora = make_lora(rank=3, scaling=0.25)
    M.save_mlx(lora, tmp_path / "ad", num_layers=16)
    with safe_open(tmp_path / "ad" / "adapters.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "mlx"}
        want = by_base_name(lora)
        assert keys == {f"{n}.lora_{x}" for n in want for x in "ab"}
        for name, m in want.items():
            la, lb = f.get_tensor(f"{name}.lora_a"), f.get_tensor(f"{name}.lora_b")
            n_out, n_in = m.B.shape[0], m.A.shape[1]
            assert tuple(la.shape) == (n_in, 3) and tuple(lb.shape) == (3, n_out)  # LoRALinear's shapes
            assert torch.equal(la, m.A.T) and torch.equal(lb, m.B.T)
            x = torch.randn(2, n_in)  # mlx_lm: y += scale * (x @ lora_a) @ lora_b == x @ dW.T
            torch.testing.assert_close(0.25 * (x @ la) @ lb, (x.double() @ delta(m).T).float())
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg == {"fine_tune_type": "lora", "num_layers": 16,
                   "lora_parameters": {"rank": 3, "scale": 0.25, "dropout": 0.0,
                                       "keys": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]}}
    M.save_mlx(lora, tmp_path / "all")
    assert json.loads((tmp_path / "all" / "adapter_config.json").read_text())["num_layers"] == -1


def test_mixed_ranks_pad_and_mixed_scalings_fold(tmp_path):
    ranks = {"self_attn.q_proj": 4, "self_attn.v_proj": 2, "mlp.down_proj": 4}
    lora = make_lora(rank=lambda rel: ranks[rel],
                     scaling=lambda k: 0.5 if k.endswith("v_proj") else 2.0)
    M.save_mlx(lora, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["lora_parameters"]["scale"] == 2.0
    back = by_base_name(M.load_mlx(tmp_path / "ad"))
    for name, m in by_base_name(lora).items():
        assert back[name].A.shape[0] == 4 and back[name].scaling == 2.0
        if name.endswith("v_proj"):
            torch.testing.assert_close(delta(back[name]), delta(m), rtol=1e-6, atol=1e-6)
            assert torch.count_nonzero(back[name].A[2:]) == 0 and torch.count_nonzero(back[name].B[:, 2:]) == 0
        else:
            assert torch.equal(back[name].B, m.B)


def test_refuses_modules_outside_layers_and_overwrite(tmp_path):
    factors = {"base_model.model.lm_head": (torch.randn(2, 32), torch.randn(10, 2)),
               "model.layers.0.mlp.up_proj": (torch.randn(2, 32), torch.randn(48, 2))}
    with pytest.raises(kf.AdapterError, match=r"ad.*lm_head"):
        M.save_mlx(kf.LoRA.from_factors(factors), tmp_path / "ad")
    assert not (tmp_path / "ad" / "adapters.safetensors").exists()
    M.save_mlx(make_lora(), tmp_path / "ad")
    before = (tmp_path / "ad" / "adapters.safetensors").read_bytes()
    with pytest.raises(kf.AdapterError, match="adapters.safetensors.*already exists"):
        M.save_mlx(make_lora(seed=1), tmp_path / "ad")
    assert (tmp_path / "ad" / "adapters.safetensors").read_bytes() == before
    M.save_mlx(make_lora(seed=1), tmp_path / "ad", overwrite=True)
    assert (tmp_path / "ad" / "adapters.safetensors").read_bytes() != before
    with pytest.raises(kf.AdapterError, match="num_layers=1 cannot cover layers 0..1"):
        M.save_mlx(make_lora(), tmp_path / "n", num_layers=1)
    assert [p.name for p in (tmp_path / "ad").iterdir()] != [] and not any(
        p.name.startswith(".") for p in (tmp_path / "ad").iterdir())


def _write(folder, config, tensors=None):
    folder.mkdir(exist_ok=True)
    if config is not None:
        (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(folder / "adapters.safetensors"))
    return folder


GOOD_CFG = {"fine_tune_type": "lora", "num_layers": 8,
            "lora_parameters": {"rank": 2, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}
GOOD_T = {"model.layers.3.self_attn.q_proj.lora_a": torch.randn(32, 2),
          "model.layers.3.self_attn.q_proj.lora_b": torch.randn(2, 32)}


def test_reads_mlx_lm_training_output(tmp_path):
    """A folder as mlx_lm.lora writes it (extra training fields in the config) loads."""
    cfg = dict(GOOD_CFG, model="mlx-community/x", iters=100, learning_rate=1e-5, lora_parameters=dict(
        GOOD_CFG["lora_parameters"]))
    del cfg["fine_tune_type"]  # older mlx_lm versions lack it; load_adapters defaults to "lora"
    lora = M.load_mlx(_write(tmp_path / "ad", cfg, GOOD_T))
    m = lora.modules[next(iter(lora.modules))]
    assert m.scaling == 20.0 and torch.equal(m.A, GOOD_T["model.layers.3.self_attn.q_proj.lora_a"].T)


@pytest.mark.parametrize("config,tensors,match", [
    (None, GOOD_T, r"adapter_config\.json: not found"),
    (GOOD_CFG, None, r"adapters\.safetensors: not found"),
    ("{not json", GOOD_T, r"adapter_config\.json: not valid JSON"),
    ("[1, 2]", GOOD_T, r"adapter_config\.json: holds list"),
    (dict(GOOD_CFG, fine_tune_type="dora"), GOOD_T, r"adapter_config\.json: field 'fine_tune_type' is 'dora'"),
    ({k: v for k, v in GOOD_CFG.items() if k != "num_layers"}, GOOD_T, r"field 'num_layers' is missing"),
    (dict(GOOD_CFG, num_layers="8"), GOOD_T, r"adapter_config\.json: field 'num_layers' is '8'"),
    ({k: v for k, v in GOOD_CFG.items() if k != "lora_parameters"}, GOOD_T, r"field 'lora_parameters' is missing"),
    (dict(GOOD_CFG, lora_parameters={"rank": 0, "scale": 1.0}), GOOD_T, r"field 'lora_parameters\.rank' is 0"),
    (dict(GOOD_CFG, lora_parameters={"rank": 2, "scale": "big"}), GOOD_T, r"field 'lora_parameters\.scale'"),
    (dict(GOOD_CFG, lora_parameters={"rank": 2, "scale": 1.0, "keys": "q"}), GOOD_T, r"lora_parameters\.keys"),
    (dict(GOOD_CFG, lora_parameters={"rank": 4, "scale": 1.0}), GOOD_T, r"field 'lora_parameters\.rank' is 4.*rank 2"),
    (dict(GOOD_CFG, lora_parameters={"rank": 2, "scale": 1.0, "keys": ["mlp.up_proj"]}), GOOD_T,
     r"field 'lora_parameters\.keys' lacks 'self_attn\.q_proj'"),
    (GOOD_CFG, {"model.layers.3.self_attn.q_proj.lora_a": torch.randn(32, 2)}, r"has lora_a but not lora_b"),
    (GOOD_CFG, dict(GOOD_T, **{"model.layers.3.self_attn.q_proj.m": torch.randn(32)}), r"'.*\.m' is not a LoRA"),
    (GOOD_CFG, {"lm_head.lora_a": torch.randn(32, 2), "lm_head.lora_b": torch.randn(2, 8)}, r"not inside a decoder"),
    (GOOD_CFG, {"model.layers.3.self_attn.q_proj.lora_a": torch.randn(32, 2),
                "model.layers.3.self_attn.q_proj.lora_b": torch.randn(3, 32)}, r"are not \(n_in, r\)"),
    (dict(GOOD_CFG, num_layers=2), dict(GOOD_T, **{"model.layers.0.self_attn.q_proj.lora_a": torch.randn(32, 2),
                                                  "model.layers.0.self_attn.q_proj.lora_b": torch.randn(2, 32)}),
     r"field 'num_layers' is 2, fewer than the 4 layers"),
])
def test_bad_folders_name_file_and_field(tmp_path, config, tensors, match):
    with pytest.raises(kf.AdapterError, match=match):
        M.load_mlx(_write(tmp_path / "ad", config, tensors))


def test_corrupt_weights_and_missing_folder(tmp_path):
    folder = _write(tmp_path / "ad", GOOD_CFG)
    (folder / "adapters.safetensors").write_bytes(b"\xff" * 40)
    with pytest.raises(kf.AdapterError, match=r"adapters\.safetensors: not a valid safetensors"):
        M.load_mlx(folder)
    with pytest.raises(kf.AdapterError, match="not a folder"):
        M.load_mlx(tmp_path / "nope")
    bad = dict(GOOD_T)
    bad["model.layers.3.self_attn.q_proj.lora_b"] = torch.full((2, 32), float("nan"))
    _write(folder, GOOD_CFG, bad)
    with pytest.raises(kf.AdapterError, match=r"adapters\.safetensors.*NaN"):
        M.load_mlx(folder)
