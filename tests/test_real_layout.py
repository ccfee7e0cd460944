"""The real hub layouts, end to end: `python -m pipeline distill --model DIR --vae VAEDIR` on a tiny ImageFolder.

The test writes, locally and with random weights, the folder layouts that `hf download` produces for
``facebook/DiT-XL-2-256`` and ``stabilityai/sd-vae-ft-mse``, with their published configs (reduced depth
and width for CI; every key, class name and file name as published), and runs distill on them. The
optional ``real_weights`` test runs the same command on the real weights when they are staged
(docs/models.md says how); it is skipped otherwise.

Where the published values come from (the configs themselves are not downloadable here):
- DiT-XL-2-256 (hub main branch, commit eab87f7 "upload model && weights", Jan 2023): files
  model_index.json (DiTPipeline, with an ``id2label`` table of the 1,000 ImageNet classes),
  transformer/, vae/, scheduler/, each with ``diffusion_pytorch_model.bin`` (main has no safetensors;
  a safetensors variant exists only in the open PR refs/pr/1). The transformer config is the one
  diffusers' DiT conversion wrote with the pre-DiT class ``Transformer2DModel``: num_layers 28,
  num_attention_heads 16, attention_head_dim 72 (hidden 1,152), patch_size 2, sample_size 32,
  in_channels 4, out_channels 8 (learned variance), num_embeds_ada_norm 1000, norm_type
  ada_norm_zero, activation_fn gelu-approximate, attention_bias true, norm_elementwise_affine false
  (DiT's own DiT-XL/2 definition and the values issue 14 lists; the rest are Transformer2DModel's
  keys of that diffusers era with their default values). The scheduler: DDIMScheduler, 1,000 linear
  betas 1e-4..0.02, clip_sample false (from the same conversion).
- sd-vae-ft-mse: AutoencoderKL, block_out_channels 128/256/512/512, 4 DownEncoderBlock2D /
  UpDecoderBlock2D, layers_per_block 2, latent_channels 4, norm_num_groups 32, sample_size 256, act_fn
  silu. Copies of its config written by diffusers 0.9 carry no ``scaling_factor`` (later ones carry
  0.18215, the class default); the test writes none, so the loader must fall back to 0.18215.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]

# Published values (see the module docstring); CI overrides only depth and width.
DIT_XL_2_256_TRANSFORMER = {
    "_class_name": "Transformer2DModel",
    "_diffusers_version": "0.12.0.dev0",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "cross_attention_dim": None,
    "dropout": 0.0,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_zero",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 32,
    "upcast_attention": False,
    "use_linear_projection": False,
}
DIT_XL_2_256_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.12.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "trained_betas": None,
}
SD_VAE_FT_MSE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# CI: 1 block instead of 28, 2 heads of the published 72 channels instead of 16; a VAE with the published
# 4 levels (so 8x down, 256 px <-> 4 x 32 x 32, as the real one) but 32 channels per level and 1 layer each.
CI_TRANSFORMER = {"num_layers": 1, "num_attention_heads": 2}
CI_VAE = {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
WNIDS = {"n01440764": 0, "n02102040": 217}  # tench, English springer: ImageNet-1K ids 0 and 217


def _save(model, folder: Path, config: dict) -> None:
    """save_pretrained as .bin (what the hub's main branch holds), then the published config.json."""
    model.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").exists()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_hub_layouts(root: Path, transformer_overrides: dict, vae_overrides: dict, seed: int = 0):
    """root/DiT-XL-2-256 and root/sd-vae-ft-mse as `hf download --local-dir` lays them out."""
    import torch
    from diffusers import AutoencoderKL, Transformer2DModel

    torch.manual_seed(seed)
    dit_dir, vae_dir = root / "DiT-XL-2-256", root / "sd-vae-ft-mse"
    tconf = {**DIT_XL_2_256_TRANSFORMER, **transformer_overrides}
    # Transformer2DModel with norm_type ada_norm_zero: the class and parameter names the hub weights
    # were written with.
    transformer = Transformer2DModel(**{k: v for k, v in tconf.items() if not k.startswith("_")})
    _save(transformer, dit_dir / "transformer", tconf)
    vconf = {**SD_VAE_FT_MSE, **vae_overrides}
    vae_args = {k: v for k, v in vconf.items() if not k.startswith("_")}
    _save(AutoencoderKL(**vae_args), dit_dir / "vae", {**vconf, "scaling_factor": 0.18215})
    _save(AutoencoderKL(**vae_args), vae_dir, vconf)
    (dit_dir / "scheduler").mkdir(parents=True)
    (dit_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(DIT_XL_2_256_SCHEDULER, indent=2))
    (dit_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": "0.12.0.dev0",
        "id2label": {str(i): f"class {i}" for i in range(1000)},
        "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return dit_dir, vae_dir, transformer


def _distill(model: Path, vae: str, data: Path, out: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline", "distill", "--model", str(model), "--vae", vae, "--data", str(data),
           "--out", str(out), "--ipc", "1", "--set", "sampler.num_steps=4", "--set", "sampler.t_stop=1",
           "--set", "tangent.neighbours=3", "--set", "tangent.dim=2"]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _check_output(out: Path) -> None:
    import pyarrow.parquet as pq
    from PIL import Image

    for wnid in WNIDS:
        pngs = sorted((out / "train" / wnid).glob("*.png"))
        assert [p.name for p in pngs] == [f"{wnid}_0000.png"]
        with Image.open(pngs[0]) as im:
            assert im.size == (256, 256) and im.mode == "RGB"  # sample_size 32 x the VAE's 8x
            assert np.asarray(im).std() > 0
        assert (out / "train" / wnid / "_SUCCESS").exists()
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["class"]: r["label"] for r in rows} == WNIDS  # wnid folders -> their ImageNet-1K ids


@pytest.fixture(scope="module")
def hub_layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return write_hub_layouts(root, CI_TRANSFORMER, CI_VAE)


def test_the_hub_layouts_load_with_their_own_class_names_and_weights(hub_layouts, caplog):
    import logging

    import torch

    from pipeline.models.loading import load_prior

    dit_dir, vae_dir, written = hub_layouts
    assert json.loads((dit_dir / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    assert not list(dit_dir.rglob("*.safetensors"))
    for vae in (str(vae_dir), None):  # --vae VAEDIR, and --vae "" (the model folder's own vae/)
        prior = load_prior(str(dit_dir), vae)
        assert type(prior.transformer).__name__ == "DiTTransformer2DModel"
        assert prior.image_size == 256 and prior.latent_shape == (4, 32, 32)
        assert prior.num_classes == 1000 and prior.null_class_id == 1000 and prior.learned_variance
        assert prior.scaling_factor == pytest.approx(0.18215)  # absent from sd-vae-ft-mse's config: the default
        # the weights written are the weights loaded (a key mismatch would leave a random init behind)
        loaded = prior.transformer.state_dict()
        assert set(loaded) == set(written.state_dict())
        assert all(torch.equal(loaded[k], v) for k, v in written.state_dict().items())
    # what distill reads before Ray starts, and what its encode stage loads, for both VAE choices
    from pipeline.config import ModelConfig
    from pipeline.models.refs import load_vae, prior_info

    for vae in (str(vae_dir), ""):
        cfg = ModelConfig(model=str(dit_dir), vae=vae)
        assert prior_info(cfg) == (256, 1000)
        model, dtype = load_vae(cfg)
        assert type(model).__name__ == "AutoencoderKL" and list(model.config.block_out_channels) == [32] * 4
    # .bin-only folders (the hub's main branch) load without diffusers logging an error about safetensors
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


@pytest.mark.slow
def test_distill_runs_on_the_hub_layouts(hub_layouts, tmp_path):
    dit_dir, vae_dir, _ = hub_layouts
    data = write_image_folder(tmp_path / "data", {w: 4 for w in WNIDS}, size=40)
    out = tmp_path / "out"
    res = _distill(dit_dir, str(vae_dir), data, out, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _check_output(out)
    run = json.loads((out / "run.json").read_text())
    text = json.dumps(run)
    assert str(dit_dir) in text and str(vae_dir) in text


# ------------------------------------------------------------------------------- real weights, optional
REAL_DIT = os.environ.get("MANIFOLDGD_DIT_DIR", "")
REAL_VAE = os.environ.get("MANIFOLDGD_VAE_DIR", "")


@pytest.mark.real_weights
@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DIT and REAL_VAE),
                    reason="set MANIFOLDGD_DIT_DIR and MANIFOLDGD_VAE_DIR to staged weights (docs/models.md)")
def test_distill_runs_on_the_real_weights(tmp_path):
    from pipeline.models.loading import load_prior

    prior = load_prior(REAL_DIT, REAL_VAE)
    cfg = prior.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (28, 16, 72)
    assert prior.image_size == 256 and prior.latent_shape == (4, 32, 32) and prior.num_classes == 1000
    assert 6.7e8 < sum(p.numel() for p in prior.transformer.parameters()) < 6.8e8  # DiT-XL/2: 675 M
    del prior
    data = write_image_folder(tmp_path / "data", {w: 4 for w in WNIDS}, size=40)
    res = _distill(Path(REAL_DIT), REAL_VAE, data, tmp_path / "out", timeout=3600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _check_output(tmp_path / "out")
