"""Feature extractors for the distribution metrics (FID, l2 of means, MMD), named beside every number.

``load_extractor(spec)``:
- ``mnist10k``: a ConvNet-3 (width 64, instance norm) trained on the real mnist10k *train* split, shipped as
  ``pipeline/data/mnist10k_features.safetensors`` (how it was trained is in its metadata and in
  docs/evaluation.md; rebuild with ``python -m pipeline.eval.features train mnist10k``). Features = its
  flattened last map (1,024-d), the input to its linear head.
- ``inception-v3[:PATH]``: the TorchScript Inception-v3 of the FID reference (``inception-2015-12-05.pt``,
  2,048-d pool features, takes uint8 images of any size). No torchvision needed; the file must be staged.
- ``resnet18[:PATH]``: torchvision's ImageNet ResNet-18 state dict (``resnet18-f37072fd.pth``) loaded into
  the project's own ResNet-18 (torchvision layer names, batch norm); 512-d penultimate features at 224 px.
- ``featurenet:PATH``: any feature net written by ``train_feature_net``.
Weights are never downloaded here: a missing file raises ``FeatureLoadError`` saying where to put it.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.common.images import crop_images, to_model_range
from pipeline.eval.students import ResNet, StudentRecipe, build_model, fit
from pipeline.inputs.datasets import load_builtin

HUB_CHECKPOINTS = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
RESNET18_FILE = "resnet18-f37072fd.pth"
RESNET18_URL = "https://download.pytorch.org/models/" + RESNET18_FILE
SHIPPED = {"mnist10k": "mnist10k_features.safetensors"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureLoadError(RuntimeError):
    """A feature extractor whose weights cannot be found or read."""


@dataclass
class FeatureExtractor:
    name: str          # what produced the numbers: printed and written beside every metric
    module: torch.nn.Module
    kind: str          # featurenet | inception | resnet18
    size: int          # input size the network expects (images are resized to it)
    device: str = "cpu"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float64 (N, D)."""
        out = []
        for i in range(0, len(images), batch_size):
            out.append(self._embed(images[i:i + batch_size]).double().cpu())
        return torch.cat(out).numpy()

    def _embed(self, images: np.ndarray) -> torch.Tensor:
        if self.kind == "inception":
            # the reference network takes uint8 NCHW at any size and resizes to 299 itself
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
            return self.module(x, return_features=True)
        x = to_model_range(images).to(self.device)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.kind == "resnet18":
            mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            x = ((x + 1) / 2 - mean) / std
        return self.module.embed(x)


# ---------------------------------------------------------------------------------------- loading
def _find(explicit: str, filename: str, env: str) -> Path:
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get(env):
        candidates.append(Path(os.environ[env]))
    candidates.append(HUB_CHECKPOINTS / filename)
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def _missing(what: str, path: Path, filename: str, url: str, env: str) -> FeatureLoadError:
    return FeatureLoadError(
        f"{what} weights not found at {path}. This machine cannot download them: fetch {url} where a network "
        f"is available and pass --features {what}:/path/to/{filename}, set {env}, or copy it to "
        f"{HUB_CHECKPOINTS / filename}. (For mnist10k use --features mnist10k, which ships.)")


def load_inception(path: str = "", device: str = "cpu") -> FeatureExtractor:
    file = _find(path, INCEPTION_FILE, "MANIFOLDGD_INCEPTION")
    if not file.is_file():
        raise _missing("inception-v3", file, INCEPTION_FILE, INCEPTION_URL, "MANIFOLDGD_INCEPTION")
    try:
        module = torch.jit.load(str(file), map_location=device).eval()
    except Exception as exc:
        raise FeatureLoadError(f"cannot load {file} as TorchScript Inception-v3: {type(exc).__name__}: {exc}") from None
    return FeatureExtractor(f"inception-v3 pool3 (2048-d, {file.name})", module, "inception", 299, device)


def load_resnet18(path: str = "", device: str = "cpu") -> FeatureExtractor:
    file = _find(path, RESNET18_FILE, "MANIFOLDGD_RESNET18")
    if not file.is_file():
        raise _missing("resnet18", file, RESNET18_FILE, RESNET18_URL, "MANIFOLDGD_RESNET18")
    model = ResNet((2, 2, 2, 2), 1000, 64, 3, 224, norm="batch")
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise FeatureLoadError(f"cannot load {file} as a torchvision ResNet-18 state dict: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    return FeatureExtractor(f"resnet18 ImageNet penultimate (512-d, {file.name})", model.to(device).eval(),
                            "resnet18", 224, device)


def load_featurenet(path: str | Path, device: str = "cpu") -> FeatureExtractor:
    path = Path(path)
    if not path.is_file():
        raise FeatureLoadError(f"feature net file not found: {path}")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        spec = json.loads(meta["spec"])
        model = build_model(spec["arch"], spec["num_classes"], 3, spec["size"], spec["width"])
        model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    except Exception as exc:
        raise FeatureLoadError(f"cannot load feature net {path}: {type(exc).__name__}: {exc}") from None
    name = (f"{spec['name']} ({spec['arch']} w{spec['width']} trained on the {spec['dataset']} train split, "
            f"real test top-1 {100 * spec['test_top1']:.1f}%)")
    return FeatureExtractor(name, model.to(device).eval(), "featurenet", spec["size"], device)


def shipped_path(dataset: str) -> Path:
    return Path(str(resources.files("pipeline").joinpath("data", SHIPPED[dataset])))


def load_extractor(spec: str, device: str = "cpu") -> FeatureExtractor:
    """``mnist10k`` | ``inception-v3[:PATH]`` | ``resnet18[:PATH]`` | ``featurenet:PATH``."""
    kind, _, path = spec.partition(":")
    if kind in SHIPPED and not path:
        return load_featurenet(shipped_path(kind), device)
    if kind == "inception-v3":
        return load_inception(path, device)
    if kind == "resnet18":
        return load_resnet18(path, device)
    if kind == "featurenet" and path:
        return load_featurenet(path, device)
    raise FeatureLoadError(f"unknown feature extractor {spec!r}: use {', '.join(SHIPPED)}, inception-v3[:PATH], "
                           "resnet18[:PATH] or featurenet:PATH")


def default_extractor(dataset: str) -> str:
    """The shipped feature net for a built-in dataset, Inception-v3 (the FID convention) otherwise."""
    return dataset if dataset in SHIPPED else "inception-v3"


# --------------------------------------------------------------------------------------- training
def train_feature_net(dataset: str, out: Path, *, epochs: int = 6, width: int = 64, seed: int = 0,
                      size: int = 32) -> dict:
    """Train a ConvNet classifier on the built-in dataset's train split (the test split only measures it)
    and save it with its spec as safetensors metadata. Returns the spec."""
    train_x, train_y, names = load_builtin(dataset, "train")
    test_x, test_y, _ = load_builtin(dataset, "test")
    train_x, test_x = crop_images(train_x, size), crop_images(test_x, size)
    recipe = StudentRecipe(epochs=epochs, arch="convnet", width=width, lr=0.05, crop_scale=0.8, eval_points=1,
                           batch_size=128, profile="featurenet")
    res = fit(train_x, train_y, len(names), recipe, seed, test=(test_x, test_y))
    spec = {"name": f"{dataset}-featurenet", "arch": "convnet", "width": width, "size": size,
            "num_classes": len(names), "dataset": dataset, "test_top1": res.final_top1, "seed": seed,
            "recipe": recipe.describe(), "command": f"python -m pipeline.eval.features train {dataset} --epochs {epochs} "
            f"--width {width} --seed {seed}", "features": "flattened last feature map (input of the linear head)"}
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in res.model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"spec": json.dumps(spec)})
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.features")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and save the shipped feature net of a built-in dataset")
    t.add_argument("dataset", choices=sorted(SHIPPED))
    t.add_argument("--out", help="default: the shipped file under pipeline/data/")
    t.add_argument("--epochs", type=int, default=6)
    t.add_argument("--width", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else shipped_path(args.dataset)
    spec = train_feature_net(args.dataset, out, epochs=args.epochs, width=args.width, seed=args.seed)
    print(json.dumps(spec, indent=2))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
