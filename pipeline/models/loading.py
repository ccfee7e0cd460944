"""Load the diffusion prior: a class-conditional DiT transformer and the VAE that decodes its latents.

Both load with diffusers' ``from_pretrained`` from a hub id or a local folder, so the real
``facebook/DiT-XL-2-256`` (diffusers layout: transformer/, vae/, scheduler/) and
``stabilityai/sd-vae-ft-mse`` (weights at the repo root) load unchanged, and so does any small
prior saved with ``save_pretrained`` in the same layout. Every size the sampler needs is read from
the configs; nothing assumes 256 px.
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from huggingface_hub import constants as hf_constants

DEFAULT_MODEL = "facebook/DiT-XL-2-256"
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"


class PriorLoadError(RuntimeError):
    """The transformer or VAE could not be loaded; the message says what was tried and how to fix it."""


@dataclass
class Prior:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    scaling_factor: float
    image_size: int
    latent_shape: tuple[int, int, int]  # (C, H, W) of one latent
    num_classes: int
    null_class_id: int  # the class-embedding row that means "no class" (CFG's unconditional branch)
    learned_variance: bool  # the transformer also predicts DiT's variance interpolation channels
    model_id: str
    vae_id: str

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def latent_dim(self) -> int:
        c, h, w = self.latent_shape
        return c * h * w


def looks_like_path(ref: str) -> bool:
    """A reference that can only mean a folder (a hub id is ``name`` or ``owner/name``)."""
    return (
        ref.startswith(("/", "./", "../", "~", "\\"))
        or ref.count("/") > 1
        or (len(ref) > 1 and ref[1] == ":")  # a Windows drive
    )


def _describe(ref: str, subfolder: str | None, revision: str | None) -> str:
    where = f"subfolder '{subfolder}'" if subfolder else "repo root"
    if Path(ref).expanduser().is_dir():
        return f"local folder {Path(ref).expanduser()} ({where})"
    if looks_like_path(ref):
        return f"local folder {Path(ref).expanduser()} (does not exist)"
    offline = " with HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else (
        " (hub unreachable: local cache only)" if hub_unreachable() else "")
    rev = f", revision {revision}" if revision else ""
    return f"hub id '{ref}' ({where}{rev}){offline}, cache HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}"


@functools.cache
def hub_unreachable() -> bool:
    """True when the hub cannot be used now: HF_HUB_OFFLINE is set, or its endpoint does not accept a TCP
    connection within 3 s. Then hub ids are looked up in the local cache only (``local_files_only``), so a
    missing model fails at once with the staging help instead of after ~30 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    url = urlparse(hf_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return True
    return False


def hub_kwargs(ref: str) -> dict:
    """Extra from_pretrained / load_config arguments for ``ref``: cache-only for a hub id while the hub is
    unreachable; nothing for a local folder."""
    return {"local_files_only": True} if not Path(ref).expanduser().is_dir() and hub_unreachable() else {}


def load_part(cls, ref: str, subfolder: str | None, *, dtype, revision):
    """``cls.from_pretrained`` for a local folder or hub id; returns (model, None) or (None, failure line)."""
    what = _describe(ref, subfolder, revision)
    path = Path(ref).expanduser()
    if not path.is_dir() and looks_like_path(ref):
        return None, f"{cls.__name__}: {what}"
    source = str(path) if path.is_dir() else ref
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if subfolder:
        kwargs["subfolder"] = subfolder
    folder = path / subfolder if subfolder else path
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        # The hub's main branch of facebook/DiT-XL-2-256 holds only .bin weights: say so, rather than
        # let diffusers log an ERROR about the missing .safetensors before it falls back to them.
        kwargs["use_safetensors"] = False
    if revision is not None and not path.is_dir():
        kwargs["revision"] = revision
    kwargs.update(hub_kwargs(ref))
    try:
        return cls.from_pretrained(source, **kwargs), None
    # A loader boundary: whatever diffusers / huggingface_hub raise (OSError, HTTP, value errors),
    # the user needs one message about staging weights, with the original cause attached.
    except Exception as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{cls.__name__}: {what}: {type(exc).__name__}: {cause}"


def staging_help(model: str, vae: str | None) -> str:
    repos = [model] + ([vae] if vae else [])
    downloads = "; ".join(f"hf download {r} --local-dir /shared/models/{r.split('/')[-1]}" for r in repos)
    return (
        "To run without hub access, stage the weights first, on a machine that has it:\n"
        f"  (a) a plain folder: {downloads}\n"
        "      (older clients: huggingface-cli download ...), then pass those folders as model / vae; or\n"
        "  (b) a shared cache: export HF_HOME=/shared/hf and download the same ids into it, then set\n"
        "      HF_HOME=/shared/hf and HF_HUB_OFFLINE=1 on every node.\n"
        "A model folder needs the diffusers layout (transformer/, and vae/ when vae=None); a VAE folder\n"
        "holds config.json and the weights at its root."
    )


def load_prior(
    model: str = DEFAULT_MODEL,
    vae: str | None = DEFAULT_VAE,
    *,
    device="cpu",
    dtype=None,
    revision: str | None = None,
    subfolder_transformer: str = "transformer",
    subfolder_vae: str = "vae",
) -> Prior:
    """Load transformer + VAE; ``vae=None`` uses the model's own ``vae/`` subfolder.

    ``revision`` applies to hub ids only. Raises :class:`PriorLoadError` (one message for both
    parts) when anything is missing or the hub cannot be reached.
    """
    # The real DiT-XL-2-256 config says "Transformer2DModel" (its pre-DiT class name); its keys
    # are a superset of DiTTransformer2DModel's, which is what we load it as.
    transformer, t_err = load_part(DiTTransformer2DModel, model, subfolder_transformer, dtype=dtype, revision=revision)
    vae_ref, vae_sub = (model, subfolder_vae) if vae is None else (vae, None)
    vae_model, v_err = load_part(AutoencoderKL, vae_ref, vae_sub, dtype=dtype, revision=revision)
    failures = [e for e in (t_err, v_err) if e]
    if failures:
        raise PriorLoadError(
            "could not load the diffusion prior. Tried:\n  - " + "\n  - ".join(failures) + "\n"
            + staging_help(model, vae)
        )
    transformer = transformer.to(device).eval().requires_grad_(False)
    vae_model = vae_model.to(device).eval().requires_grad_(False)
    return describe_prior(transformer, vae_model, model_id=model, vae_id=vae or f"{model}/{subfolder_vae}")


def describe_prior(transformer, vae, *, model_id: str = "", vae_id: str = "") -> Prior:
    """Wrap already-built modules, deriving every size from their configs."""
    tc, vc = transformer.config, vae.config
    sample = tc.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    channels = int(tc.in_channels)
    out_channels = int(tc.out_channels or channels)
    if tc.num_embeds_ada_norm is None:
        raise PriorLoadError(f"{model_id or 'transformer'} is not class-conditional (num_embeds_ada_norm is None)")
    if int(vc.latent_channels) != channels:
        raise PriorLoadError(f"VAE latent channels {vc.latent_channels} != transformer in_channels {channels}")
    downsample = 2 ** (len(vc.block_out_channels) - 1)
    if h != w:
        raise PriorLoadError(f"non-square latents {h}x{w} are not supported")
    return Prior(
        transformer=transformer,
        vae=vae,
        scaling_factor=float(vc.scaling_factor),
        image_size=h * downsample,
        latent_shape=(channels, h, w),
        num_classes=int(tc.num_embeds_ada_norm),
        # The label table has num_embeds_ada_norm + 1 rows; the extra last row is the null class.
        null_class_id=int(tc.num_embeds_ada_norm),
        learned_variance=out_channels == 2 * channels,
        model_id=model_id,
        vae_id=vae_id,
    )
