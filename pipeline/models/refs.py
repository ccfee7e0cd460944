"""Model references as the pipeline sees them: built-in priors, the VAE alone, sizes from configs.

Functions take the config's ``model`` section (``pipeline.config.ModelConfig``: model, vae, revision, dtype).

``builtin:<name>`` names a prior shipped inside the package (pipeline/priors/<name>/, diffusers layout);
it stays symbolic in the config so that the config hash does not depend on where the package lives.
"""
from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from pipeline.common.errors import ConfigError
from pipeline.models.loading import PriorLoadError, hub_kwargs, load_part, load_prior, staging_help

BUILTIN = "builtin:"


def resolve(ref: str) -> str:
    """Turn ``builtin:<name>`` into the shipped folder; leave hub ids and paths alone."""
    if not ref.startswith(BUILTIN):
        return ref
    name = ref[len(BUILTIN):]
    folder = Path(str(resources.files("pipeline").joinpath("priors", name)))
    if not (folder / "transformer").is_dir():
        raise ConfigError("model.model", f"no built-in prior named {name!r} (looked in {folder})")
    return str(folder)


def vae_source(model) -> tuple[str, str | None]:
    """(reference, subfolder) of the VAE: its own repo, or the model folder's vae/."""
    if model.vae:
        return resolve(model.vae), None
    return resolve(model.model), "vae"


def torch_dtype(name: str, device: str):
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def load_vae(model, device: str = "cpu"):
    """The VAE alone (the encode stage needs nothing else); returns (vae, dtype)."""
    ref, sub = vae_source(model)
    dtype = torch_dtype(model.dtype, device)
    vae, err = load_part(AutoencoderKL, ref, sub, dtype=dtype, revision=model.revision or None)
    if err:
        raise PriorLoadError(f"could not load the VAE. Tried:\n  - {err}\n" + staging_help(ref, None))
    return vae.to(device).eval().requires_grad_(False), dtype


def load_model(model, device: str = "cpu"):
    """Transformer + VAE through the same ``load_prior`` that loads DiT-XL/2."""
    vae = resolve(model.vae) if model.vae else None
    return load_prior(resolve(model.model), vae, device=device, dtype=torch_dtype(model.dtype, device),
                      revision=model.revision or None)


def prior_info(model) -> tuple[int, int]:
    """(image size in pixels, number of classes) of the prior, from its configs alone (no weights)."""
    ref = resolve(model.model)
    vref, vsub = vae_source(model)
    try:
        tconf = DiTTransformer2DModel.load_config(ref, subfolder="transformer",
                                                  revision=model.revision or None, **hub_kwargs(ref))
        vconf = AutoencoderKL.load_config(vref, subfolder=vsub, revision=model.revision or None, **hub_kwargs(vref))
    except Exception as exc:
        where = " (hub unreachable: looked in the local cache only)" if hub_kwargs(ref) or hub_kwargs(vref) else ""
        raise PriorLoadError(f"could not read the model configs of {ref} / {vref}{where}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
                             + staging_help(ref, model.vae or None)) from None
    sample = tconf["sample_size"]
    sample = sample if isinstance(sample, int) else sample[0]
    return int(sample) * 2 ** (len(vconf["block_out_channels"]) - 1), int(tconf["num_embeds_ada_norm"] or 0)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")
_digest_cache: dict[tuple, str] = {}


def _folder_digest(folder: Path) -> str:
    """sha256 over every weight and config file under a local model folder (names, sizes, contents).

    Cached per process by (path, size, mtime) of each file, so the sampling actors that hash their
    config pay for it once."""
    files = [(p, p.stat()) for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    key = (str(folder),) + tuple((str(p), st.st_size, st.st_mtime_ns) for p, st in files)
    if key not in _digest_cache:
        h = hashlib.sha256()
        for p, st in files:
            h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0".encode())
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _digest_cache[key] = h.hexdigest()[:16]
    return _digest_cache[key]


def model_fingerprint(model) -> str:
    """What the model *references* do not say: the content of built-in and local model folders.

    A retrained ``builtin:mnist10k`` (or a local folder overwritten in place) keeps its name, so the name
    alone would let an old output folder resume as finished. Hub ids are left to ``revision``."""
    parts = []
    for ref in (model.model, model.vae):
        if not ref:
            continue
        try:
            path = Path(resolve(ref))
        except ConfigError:
            path = None  # reported by check_model with a better message
        parts.append(_folder_digest(path) if path is not None and path.is_dir() else "")
    return ":".join(parts) if any(parts) else ""
