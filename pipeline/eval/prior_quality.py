"""`manifoldgd prior-quality`: does the prior draw the class it is asked for?

A small CNN is trained on the real train split of a built-in dataset (its real test accuracy is printed,
so the judge is known to be a good one); the prior then draws unguided class-conditional samples with
DiT's protocol (50 DDPM steps, CFG 4.0, learned variance; ``GuidedSampler`` with guidance "none") and
the command prints the fraction the classifier assigns to the conditioning class, per class and overall.
Exit code 1 when that fraction is below ``--min-fraction`` (0.9 by default). It also reports whether
the samples copy training images (``pipeline.common.copies``: nearest-training-image distances in pixels and in the
shipped feature net's space, against the training set's own leave-one-out distances).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common.copies import copy_check, copy_references, describe
from pipeline.common.images import contact_sheet, crop_images, to_model_range
from pipeline.common.log import get_logger
from pipeline.common.training import train_minibatches
from pipeline.eval.features import FeatureLoadError, default_extractor, load_extractor
from pipeline.inputs.datasets import load_builtin
from pipeline.models.loading import load_prior
from pipeline.models.refs import resolve
from pipeline.models.sampler import GuidedSampler, SamplerConfig

log = get_logger("prior-quality").info


class DigitClassifier(nn.Module):
    """Three conv -> ReLU -> max-pool stages and a linear head: ~99% on MNIST within a few epochs."""

    def __init__(self, num_classes: int, channels: int = 3, width: int = 32):
        super().__init__()
        layers, c = [], channels
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (background-padded): tolerance to off-centre samples."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int = 4,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = to_model_range(images), torch.as_tensor(labels, dtype=torch.long)
    model = DigitClassifier(num_classes, channels=x.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    return train_minibatches(model, opt, sched, n=len(x), batch_size=batch_size, epochs=epochs, generator=gen,
                             batch_loss=lambda idx: F.cross_entropy(model(_shift(x[idx], gen)), y[idx]))


@torch.no_grad()
def classify(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    model.eval()
    return torch.cat([model(to_model_range(images[i:i + batch_size])).argmax(1)
                      for i in range(0, len(images), batch_size)]).numpy()


@dataclass
class QualityReport:
    classifier_test_accuracy: float
    fraction_correct: float
    per_class: dict[str, float]
    n_per_class: int
    cfg_scale: float
    num_steps: int
    seconds_classifier: float
    seconds_sampling: float
    copies: dict | None = None   # pipeline.common.copies.copy_check of all samples vs the real train split
    seconds_copies: float = 0.0

    def passed(self, minimum: float) -> bool:
        return self.fraction_correct >= minimum


def real_images(dataset: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A built-in split through the encode stage's preprocessing (RGB, DiT centre crop to ``size``)."""
    images, labels, names = load_builtin(dataset, split)
    return crop_images(images, size), labels, names


def measure_prior_quality(prior_dir: str, dataset: str = "mnist10k", *, n_per_class: int = 50,
                          cfg_scale: float = 4.0, num_steps: int = 50, seed: int = 0,
                          classifier_epochs: int = 4, samples_out: str = "", copies: bool = True) -> QualityReport:
    prior = load_prior(prior_dir, None)
    size = prior.image_size
    t0 = time.perf_counter()
    train_x, train_y, names = real_images(dataset, "train", size)
    test_x, test_y, _ = real_images(dataset, "test", size)
    if prior.num_classes != len(names):
        raise SystemExit(f"the prior has {prior.num_classes} classes, {dataset} has {len(names)}")
    clf = train_classifier(train_x, train_y, len(names), epochs=classifier_epochs, seed=seed)
    test_acc = float((classify(clf, test_x) == test_y).mean())
    t1 = time.perf_counter()
    log(f"classifier trained on {len(train_x)} real {dataset} train images: "
        f"real test accuracy {test_acc:.4f} ({t1 - t0:.0f} s)")

    sampler = GuidedSampler(prior, SamplerConfig(num_steps=num_steps, cfg_scale=cfg_scale, guidance="none",
                                                 seed=seed, max_batch=max(1, n_per_class)))
    per_class, sheet, drawn = {}, [], []
    for c, name in enumerate(names):
        images = sampler.sample(c, range(n_per_class))
        drawn.append(images)
        per_class[name] = float((classify(clf, images) == c).mean())
        sheet.append(images[: min(10, n_per_class)])
        log(f"class {name}: {per_class[name]:.2f} of {n_per_class} samples classified as {name}")
    t2 = time.perf_counter()
    if samples_out:
        Path(samples_out).parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(sheet).save(samples_out)
        log(f"samples: {samples_out}")
    copy_report = _copy_check(np.concatenate(drawn), train_x, dataset) if copies else None
    return QualityReport(test_acc, float(np.mean(list(per_class.values()))), per_class, n_per_class,
                         cfg_scale, num_steps, t1 - t0, t2 - t1, copy_report, time.perf_counter() - t2)


def _copy_check(samples: np.ndarray, train_x: np.ndarray, dataset: str) -> dict:
    """Do the samples copy training images? Pixels, and the dataset's feature net where one exists."""
    try:
        extractor = load_extractor(default_extractor(dataset))
    except FeatureLoadError as exc:
        log(f"copies: pixels only ({str(exc).split('. ')[0]})")
        extractor = None
    report = copy_check(samples, copy_references(train_x, extractor), extractor)
    for line in describe(report):
        log(f"copies, {line}")
    return report


def _command(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure_prior_quality(resolve(args.prior), args.data, n_per_class=args.n_per_class,
                                   cfg_scale=args.cfg_scale, num_steps=args.num_steps, seed=args.seed,
                                   classifier_epochs=args.classifier_epochs, samples_out=args.samples,
                                   copies=not args.no_copies)
    verdict = "PASS" if report.passed(args.min_fraction) else "FAIL"
    print(f"[prior-quality] {verdict}: {report.fraction_correct:.4f} of {report.n_per_class * len(report.per_class)} "
          f"unguided samples (CFG {report.cfg_scale}, {report.num_steps} steps) classified as their "
          f"conditioning class (required >= {args.min_fraction}); classifier real test accuracy "
          f"{report.classifier_test_accuracy:.4f}; sampling {report.seconds_sampling:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report.__dict__, indent=1))
    return 0 if report.passed(args.min_fraction) else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prior-quality",
        help="fraction of unguided class-conditional samples a real-data classifier assigns to their class",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--prior", default="builtin:mnist10k", help="prior folder (diffusers layout) or builtin:NAME")
    p.add_argument("--data", default="mnist10k", help="built-in dataset the classifier is trained and tested on")
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier-epochs", type=int, default=4)
    p.add_argument("--min-fraction", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; 1 is faster on a machine busy with other work)")
    p.add_argument("--samples", default="", help="write a contact sheet of samples (one row per class) here")
    p.add_argument("--json", default="", help="write the report as JSON here")
    p.add_argument("--no-copies", action="store_true",
                   help="skip the copy check (nearest training images; its leave-one-out pass over the train "
                        "split is the slow part)")
    p.set_defaults(func=_command)
