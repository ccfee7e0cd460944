"""The prior's two networks, built from the diffusers classes DiT-XL/2 + SD VAE use, and what is done to them.

``AutoencoderKL`` and ``DiTTransformer2DModel`` are the classes ``load_prior`` loads, so a trained prior is
a standard diffusers folder. The functions below give the DiT its own paper's initialisation and training
set-up where diffusers' defaults differ (label dropout, one shared embedder), and fold the latent
statistics into the VAE.
"""
from __future__ import annotations

import copy

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from pipeline.prior.config import PriorTrainConfig


def build_vae(cfg: PriorTrainConfig):
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        norm_num_groups=min(32, min(cfg.vae_channels)), sample_size=cfg.image_size,
        # A mid-block attention costs 40% of the step time at 8x8 and is not needed for digits.
        mid_block_add_attention=False,
    )


def build_transformer(cfg: PriorTrainConfig, num_classes: int, latent_size: int):
    if cfg.hidden_size % cfg.num_heads:
        raise SystemExit(f"--hidden-size {cfg.hidden_size} must be a multiple of --num-heads {cfg.num_heads}")
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.latent_channels,
        out_channels=2 * cfg.latent_channels if cfg.learned_variance else cfg.latent_channels,
        num_layers=cfg.depth, sample_size=latent_size, patch_size=cfg.patch_size,
        num_embeds_ada_norm=num_classes,  # label table: num_classes + 1 rows, the last is the null class
    )
    dit_init_(model)
    return model


def dit_init_(model) -> None:
    """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, adaLN-Zero, zero output layer."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.pos_embed.proj.bias)
    with torch.no_grad():
        for block in model.transformer_blocks:
            emb = block.norm1.emb
            nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
            # Each block starts as the identity: its modulation (and so its gates) are zero.
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (model.proj_out_1, model.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


def disable_builtin_label_dropout(model) -> None:
    """diffusers drops labels inside every block's own LabelEmbedding, independently per block, in train().

    Classifier-free guidance needs the *whole* network to see the null class at once, so the training
    loop drops labels itself (one draw per sample) and the built-in per-block dropout is switched off.
    The table keeps its extra null row: its size was fixed when the model was built.
    """
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0


def share_embedders_(model) -> None:
    """Make every block use block 0's timestep + class embedder, as DiT's single ``t_embedder``/``y_embedder``.

    diffusers gives each block its own copy (its DiT-XL/2 conversion duplicates the shared one), which
    for a model trained from scratch means every block learns its own class table from its own gradient
    alone. Sharing them while training and writing copies at save time (:func:`untied_copy`) gives a
    standard diffusers checkpoint whose blocks hold identical embedders, like the converted DiT-XL/2.
    """
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared


def untied_copy(model):
    """A copy whose blocks own separate (identical) embedders, so ``save_pretrained`` sees no shared tensors."""
    out = copy.deepcopy(model)
    for block in out.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(out.transformer_blocks[0].norm1.emb)
    return out


def standardize_latents_(vae, mean, std) -> None:
    """Fold a per-channel affine map into the VAE so that its latent channels have ``mean`` 0 and ``std`` 1.

    The posterior mean and log-variance come out of ``quant_conv`` (1x1) and the decoder starts with
    ``post_quant_conv`` (1x1), so z' = (z - mean) / std is absorbed exactly: the encoder's mean rows are
    rescaled and shifted, the log-variance offset by -2 log std, and the decoder's first conv undoes it.
    The decoded image of every latent is unchanged; the diffusion model sees balanced channels instead
    of one scalar ``scaling_factor`` stretching channels whose spreads differ several-fold.
    """
    c = vae.config.latent_channels
    mean = mean.to(vae.quant_conv.weight.device, torch.float32)
    std = std.to(vae.quant_conv.weight.device, torch.float32)
    with torch.no_grad():
        qw, qb = vae.quant_conv.weight, vae.quant_conv.bias  # (2c, 2c, 1, 1), (2c,)
        qw[:c] /= std.view(c, 1, 1, 1)
        qb[:c] = (qb[:c] - mean) / std
        qb[c:] -= 2 * torch.log(std)
        pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias  # (c, c, 1, 1), (c,)
        pb += (pw[:, :, 0, 0] @ mean)
        pw *= std.view(1, c, 1, 1)
