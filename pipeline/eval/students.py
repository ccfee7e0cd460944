"""Students trained from scratch on a (distilled) set, and tested on real images: with hard labels (the
set's class labels, cross-entropy), or with soft labels from a teacher (``fit(..., teacher=...)``:
pipeline/eval/teachers.py).

Architectures (docs/method.md section 5), all with instance norm (GroupNorm with one group per channel):
- ``convnet`` / ``convnet-N``: N x [conv3x3 -> norm -> ReLU -> avgpool 2] -> linear; width 128. Depth by
  default follows the image size so that the last map is 4 x 4 (ConvNet-3 at 32 px, ConvNet-6 at 256 px).
- ``resnetap10``: ResNet-10 ([1, 1, 1, 1] basic blocks) that downsamples by average pooling instead of
  strided convolutions (ResNetAP, from IDC); base width 64.
- ``resnet18``: ResNet-18 ([2, 2, 2, 2]), strided downsampling; base width 64.
ResNets take a CIFAR stem (conv3x3, no max-pool) at <= 64 px and the ImageNet stem (conv7x7/2 + max-pool)
above. Layer names follow torchvision's, so a torchvision state dict loads into ``norm="batch"`` models
(pipeline/eval/features.py uses that for ResNet-18 features).

Recipe (``StudentRecipe``): SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64, MultiStep at 2/3 and 5/6 of the
steps (gamma 0.2); augmentation RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3), horizontal flip (option),
colour jitter (brightness/contrast/saturation 0.4), CutMix (p = 1, beta = 1). Profiles:
- ``paper``: the published epochs by IPC (2000 for IPC <= 10, 1500 for <= 50, 1000 for <= 200).
- ``fast``: the same recipe for a fixed budget of optimiser steps (default 500): small sets on a CPU.
Headline = top-1 after the final epoch; the best top-1 over the evaluation points is kept beside it, labelled,
because that is what the public code reports (it picks the best epoch on the test set).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common.images import to_model_range
from pipeline.common.training import train_minibatches

ARCHITECTURES = ("convnet", "resnetap10", "resnet18")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":  # instance norm with a learned affine, as the dataset-distillation ConvNets
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'instance' or 'batch', got {kind!r}")


class ConvNet(nn.Module):
    """depth x [conv3x3 -> instance norm -> ReLU -> avgpool 2] -> linear."""

    def __init__(self, num_classes: int, depth: int = 3, width: int = 128, channels: int = 3, size: int = 32,
                 norm: str = "instance"):
        super().__init__()
        layers, c = [], channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, size = width, size // 2
        if size < 1:
            raise ValueError(f"ConvNet-{depth} halves the image {depth} times: too deep for this image size")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

    def embed(self, x):
        return self.features(x).flatten(1)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; ``pool_downsample`` halves by average pooling (ResNetAP)
    instead of a stride-2 convolution."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, pool_downsample: bool):
        super().__init__()
        self.pool = nn.AvgPool2d(2) if (pool_downsample and stride == 2) else nn.Identity()
        conv_stride = 1 if pool_downsample else stride
        self.conv1 = nn.Conv2d(cin, cout, 3, conv_stride, 1, bias=False)
        self.bn1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            if pool_downsample:
                self.downsample = nn.Sequential(nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                                                nn.Conv2d(cin, cout, 1, bias=False), _norm(norm, cout))
            else:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.pool(out)))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, width: int = 64, channels: int = 3,
                 size: int = 32, norm: str = "instance", pool_downsample: bool = False):
        super().__init__()
        small = size <= 64
        self.conv1 = nn.Conv2d(channels, width, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False)
        self.bn1 = _norm(norm, width)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stages = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1, norm, pool_downsample)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stages))
            cin = cout
        self.num_stages = len(blocks)
        self.fc = nn.Linear(cin, num_classes)

    def embed(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.embed(x))


def convnet_depth(size: int) -> int:
    """Depth that leaves a 4 x 4 map (ConvNet-3 at 32 px, ConvNet-6 at 256 px), within 1..6."""
    return int(min(6, max(1, round(math.log2(max(size, 8) / 4)))))


def build_model(arch: str, num_classes: int, channels: int = 3, size: int = 32, width: int = 0, depth: int = 0,
                norm: str = "instance") -> nn.Module:
    """``arch``: convnet, convnet-N, resnetap10, resnet18. ``width``/``depth`` 0 = the architecture's default."""
    name = arch.lower()
    if name.startswith("convnet"):
        if name != "convnet":
            suffix = name[len("convnet"):].lstrip("-")
            if not suffix.isdigit():
                raise ValueError(f"unknown architecture {arch!r} (convnet, convnet-N, resnetap10, resnet18)")
            depth = int(suffix)
        return ConvNet(num_classes, depth or convnet_depth(size), width or 128, channels, size, norm)
    if name == "resnetap10":
        return ResNet((1, 1, 1, 1), num_classes, width or 64, channels, size, norm, pool_downsample=True)
    if name == "resnet18":
        return ResNet((2, 2, 2, 2), num_classes, width or 64, channels, size, norm, pool_downsample=False)
    raise ValueError(f"unknown architecture {arch!r} (convnet, convnet-N, resnetap10, resnet18)")


# ------------------------------------------------------------------------------------------ recipe
def paper_epochs(ipc: int) -> int:
    """Published epochs by IPC (docs/method.md section 5); beyond 200 the 1000 of the largest published bin."""
    return 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000


@dataclass
class StudentRecipe:
    epochs: int = 300
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    arch: str = "convnet"
    depth: int = 0            # ConvNet depth; 0 = from the image size (3 at 32 px)
    width: int = 0            # 0 = the architecture's default (ConvNet 128, ResNets 64)
    crop_scale: float = 0.5   # RandomResizedCrop lower scale; 1.0 = no crop augmentation
    hflip: bool = False       # digits are not mirror-symmetric; natural images: True
    jitter: float = 0.0       # colour jitter strength for brightness, contrast and saturation (paper: 0.4)
    cutmix_prob: float = 0.0  # paper: 1.0
    cutmix_beta: float = 1.0
    eval_points: int = 10     # test accuracy measured at this many evenly spaced epochs (the last = final)
    profile: str = "custom"   # which profile made it (recorded in results)
    extra: dict = field(default_factory=dict)  # free-form notes recorded with the result

    def describe(self) -> str:
        aug = [f"crop {self.crop_scale}-1"] if self.crop_scale < 1 else []
        aug += ["flip"] if self.hflip else []
        aug += [f"jitter {self.jitter}"] if self.jitter else []
        aug += [f"CutMix p={self.cutmix_prob} beta={self.cutmix_beta}"] if self.cutmix_prob else []
        length = (f"{self.extra['fast_steps']} optimiser steps" if "fast_steps" in self.extra
                  else f"{self.epochs} epochs")
        return (f"{self.arch} (width {self.width or 'default'}, instance norm), {self.profile} profile: "
                f"{length}, SGD lr {self.lr} bs {self.batch_size}, aug: {', '.join(aug) or 'none'}")


PROFILES = ("paper", "fast")


def recipe_for(profile: str, ipc: int, n_images: int, *, fast_steps: int = 500, **overrides) -> StudentRecipe:
    """The published recipe (``paper``) or the same recipe for ``fast_steps`` optimiser steps (``fast``).

    ``overrides`` set any StudentRecipe field (e.g. arch, width, hflip, epochs).
    """
    base = StudentRecipe(epochs=paper_epochs(ipc), crop_scale=0.5, hflip=True, jitter=0.4, cutmix_prob=1.0,
                         cutmix_beta=1.0, profile=profile)
    if profile == "fast":
        batch = overrides.get("batch_size", base.batch_size)
        steps_per_epoch = max(1, -(-n_images // batch))
        base = replace(base, epochs=max(1, min(base.epochs, -(-fast_steps // steps_per_epoch))), eval_points=5,
                       extra={"fast_steps": fast_steps})
    elif profile != "paper":
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    unknown = set(overrides) - set(StudentRecipe.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown student setting(s): {', '.join(sorted(unknown))}")
    return replace(base, **overrides)


# ------------------------------------------------------------------------------------ augmentation
def random_resized_crop(x: torch.Tensor, scale: float, gen: torch.Generator,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Per image: a crop of area fraction U(scale, 1) and aspect ratio log-U(ratio), resized back to the
    full size (bilinear), as torchvision's RandomResizedCrop (which retries an over-wide crop; here its
    sides are clipped to the image instead)."""
    n = x.shape[0]
    area = scale + (1 - scale) * torch.rand(n, generator=gen)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=gen)
    aspect = torch.exp(log_r)
    sw = torch.sqrt(area * aspect).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sw)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sh)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sw, sh, cx, cy
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors each U(1 - s, 1 + s) per image, on [0, 1] pixels."""
    n = x.shape[0]

    def factor():
        return (1 + strength * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)).to(x.device, x.dtype)

    img = (x + 1) / 2
    img = (img * factor()).clamp(0, 1)
    grey = (0.299 * img[:, :1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]) if img.shape[1] == 3 else img
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    img = ((img - mean) * factor() + mean).clamp(0, 1)
    if img.shape[1] == 3:
        grey = 0.299 * img[:, :1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]
        img = ((img - grey) * factor() + grey).clamp(0, 1)
    return img * 2 - 1


def cutmix(x: torch.Tensor, y: torch.Tensor, beta: float, rng: np.random.Generator, gen: torch.Generator):
    """Paste a box of a shuffled batch; returns (x, y, y_shuffled, lam) with lam = the kept area share."""
    n, _, h, w = x.shape
    lam = float(rng.beta(beta, beta))
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    perm = torch.randperm(n, generator=gen).to(x.device)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, y, y[perm], lam


def augment(x: torch.Tensor, recipe: StudentRecipe, gen: torch.Generator) -> torch.Tensor:
    if recipe.crop_scale < 1.0:
        x = random_resized_crop(x, recipe.crop_scale, gen)
    if recipe.hflip:
        flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if recipe.jitter > 0:
        x = colour_jitter(x, recipe.jitter, gen)
    return x


# ---------------------------------------------------------------------------------------- training
@dataclass
class StudentResult:
    final_top1: float | None            # after the last epoch: the headline
    best_top1: float | None             # best over the evaluation points (as the public code): labelled
    best_epoch: int | None
    curve: list[tuple[int, float]]      # (epoch, top-1) at each evaluation point
    seconds: float
    model: nn.Module | None = None

    def summary(self) -> dict:
        return {"final_top1": self.final_top1, "best_top1": self.best_top1, "best_epoch": self.best_epoch,
                "curve": self.curve, "seconds": round(self.seconds, 2)}


def _eval_epochs(epochs: int, points: int) -> set[int]:
    points = max(1, min(points, epochs))
    return {round(epochs * k / points) for k in range(1, points + 1)}


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch: the soft-label loss
    (the T^2 keeps its gradients on the scale of the cross-entropy's as T changes)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def fit(images: np.ndarray, labels: np.ndarray, num_classes: int, recipe: StudentRecipe, seed: int = 0, *,
        test: tuple[np.ndarray, np.ndarray] | None = None, device: str = "cpu",
        teacher: Callable[[torch.Tensor], torch.Tensor] | None = None, temperature: float = 20.0) -> StudentResult:
    """Train one student; with ``test`` = (images, labels), measure top-1 at ``recipe.eval_points`` epochs.

    ``teacher``: the soft-label protocol. Every augmented batch (after crop, flip, jitter and CutMix) is
    relabelled by ``teacher(batch)`` (logits over the set's classes, in label order; no gradient) and the
    student minimises ``soft_label_loss`` at ``temperature`` instead of the cross-entropy on ``labels``.
    The teacher draws nothing: the augmentation draws, and so the batches, are those of hard labels.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    x, y = to_model_range(images).to(device), torch.tensor(np.asarray(labels), dtype=torch.long).to(device)
    model = build_model(recipe.arch, num_classes, x.shape[1], x.shape[-1], recipe.width, recipe.depth).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, -(-len(x) // recipe.batch_size))
    total = recipe.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [total * 2 // 3, total * 5 // 6], gamma=0.2)
    checkpoints = _eval_epochs(recipe.epochs, recipe.eval_points) if test is not None else set()
    curve: list[tuple[int, float]] = []

    def batch_loss(idx):
        xb, yb = augment(x[idx], recipe, gen), y[idx]
        if recipe.cutmix_prob > 0 and rng.random() < recipe.cutmix_prob:
            xb, ya, yb2, lam = cutmix(xb, yb, recipe.cutmix_beta, rng, gen)
            out = model(xb)
            if teacher is not None:
                return soft_label_loss(out, relabel(xb), temperature)
            return lam * F.cross_entropy(out, ya) + (1 - lam) * F.cross_entropy(out, yb2)
        out = model(xb)
        return F.cross_entropy(out, yb) if teacher is None else soft_label_loss(out, relabel(xb), temperature)

    def relabel(xb):
        with torch.no_grad():
            return teacher(xb).detach()

    def end_epoch(epoch):
        if epoch in checkpoints:
            curve.append((epoch, accuracy(model, *test, device=device)))

    train_minibatches(model, opt, sched, n=len(x), batch_size=recipe.batch_size, epochs=recipe.epochs,
                      generator=gen, batch_loss=batch_loss, end_epoch=end_epoch, device=device)
    if curve:
        best_epoch, best = max(curve, key=lambda p: (p[1], -p[0]))
        final = curve[-1][1]
    else:
        best_epoch = best = final = None
    return StudentResult(final, best, best_epoch, curve, time.perf_counter() - start, model)


def train_student(images: np.ndarray, labels: np.ndarray, num_classes: int, recipe: StudentRecipe,
                  seed: int = 0, device: str = "cpu") -> nn.Module:
    return fit(images, labels, num_classes, recipe, seed, device=device).model


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 500, device: str | None = None) -> np.ndarray:
    model.eval()
    device = device or next(model.parameters()).device
    out = [model(to_model_range(images[i:i + batch_size]).to(device)).argmax(1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: str | None = None) -> float:
    return float((predict(model, images, device=device) == np.asarray(labels)).mean())
