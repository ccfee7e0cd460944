"""Teachers of the soft-label evaluation protocol: a fixed pre-trained classifier that relabels every
augmented training batch of a student (pipeline/eval/students.py ``fit(..., teacher=...)``).

``--teacher`` specs:
- ``mnist10k``: the shipped mnist10k feature net (pipeline/eval/features.py), a ConvNet-3 classifier of the
  10 digits, outputs in mnist10k's class order (folders ``0`` .. ``9``).
- ``resnet18[:PATH]``: torchvision's ImageNet ResNet-18, staged as for the features (``$MANIFOLDGD_RESNET18``
  or ``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth``; never downloaded); outputs = the 1,000 ImageNet
  classes, so the set's class folders must be ImageNet wnids.
- ``featurenet:PATH``: any net written by ``python -m pipeline.eval.features train`` (its classes: the
  ``classes`` list of its spec, else the built-in dataset's class order).
- ``auto``: the shipped net of a built-in dataset, else resnet18 if staged, else an error naming what to stage.

A teacher maps the set's class folders to its own output indices and keeps only those logits, so its
softmax is over the set's classes; a class it does not know is an error (``TeacherError``, one line).
The protocol itself (``label_protocol``) is a small dict recorded in every cell and results record.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from pipeline.eval import features
from pipeline.eval.features import FeatureLoadError
from pipeline.inputs.sources import imagenet_wnids

LABELS = ("hard", "soft")
# RDED's and SRe2L's public training code relabel CutMix batches at temperature 20 (and mixup batches at 4);
# the recipe here always uses CutMix, so 20 is the default (docs/evaluation.md, "Hard and soft labels").
DEFAULT_TEMPERATURE = 20.0
HARD = {"kind": "hard"}


class TeacherError(ValueError):
    """A teacher that cannot be found, loaded, or that does not know a class of the set."""


@dataclass(frozen=True)
class TeacherRef:
    """A resolved ``--teacher``: what loads it (``spec``, with an absolute path where it has one) and the name
    recorded beside every soft-label result (no machine path in it)."""
    spec: str
    name: str


def label_protocol(labels: str, teacher: TeacherRef | None = None, temperature: float = DEFAULT_TEMPERATURE) -> dict:
    """The protocol as recorded in a cell: ``{"kind": "hard"}`` or ``{"kind": "soft", "teacher": NAME,
    "temperature": T}``."""
    if labels == "hard":
        return dict(HARD)
    if labels != "soft":
        raise TeacherError(f"--labels must be one of {', '.join(LABELS)}, got {labels!r}")
    if teacher is None:
        raise TeacherError("--labels soft needs a teacher")
    return {"kind": "soft", "teacher": teacher.name, "temperature": float(temperature)}


def labels_of(record: dict) -> dict:
    """The protocol of a cell or results record; one without the field was trained with hard labels."""
    return record.get("labels") or dict(HARD)


def describe_labels(protocol: dict | None) -> str:
    """``hard labels`` or ``soft labels (teacher mnist10k, T=20)``: what every table header names."""
    p = protocol or HARD
    if p.get("kind", "hard") == "hard":
        return "hard labels"
    return f"soft labels (teacher {p['teacher']}, T={p['temperature']:g})"


# --------------------------------------------------------------------------------------- resolving
def resolve_teacher(spec: str, dataset: str | None) -> TeacherRef:
    """``--teacher SPEC`` -> a TeacherRef, checking that its weights exist (nothing is loaded yet).

    ``dataset``: the data the set was distilled from or is tested on (a built-in name brings its shipped net).
    """
    kind, _, path = spec.partition(":")
    builtin = (dataset or "").partition(":")[0]
    if kind == "auto" and not path:
        if builtin in features.SHIPPED:
            return TeacherRef(builtin, builtin)
        file = features._find("", features.RESNET18_FILE, "MANIFOLDGD_RESNET18")
        if file.is_file():
            return _resnet18_ref(file)
        raise TeacherError(
            f"--teacher auto: no teacher for {dataset or 'this data'}: stage torchvision's ImageNet ResNet-18 "
            f"({features.RESNET18_FILE}, from {features.RESNET18_URL}) in $MANIFOLDGD_RESNET18 or "
            f"{features.HUB_CHECKPOINTS}, or pass --teacher resnet18:PATH or featurenet:PATH")
    if kind in features.SHIPPED and not path:
        return TeacherRef(kind, kind)
    if kind == "resnet18":
        file = features._find(path, features.RESNET18_FILE, "MANIFOLDGD_RESNET18")
        if not file.is_file():
            raise TeacherError(f"--teacher {spec}: {features.RESNET18_FILE} not found at {file}: fetch "
                               f"{features.RESNET18_URL} where a network is available and pass --teacher "
                               f"resnet18:PATH, set $MANIFOLDGD_RESNET18, or copy it to {features.HUB_CHECKPOINTS}")
        return _resnet18_ref(file)
    if kind == "featurenet" and path:
        file = Path(path)
        if not file.is_file():
            raise TeacherError(f"--teacher {spec}: no such file {file}")
        return TeacherRef(f"featurenet:{file.resolve()}", f"featurenet {file.name}")
    raise TeacherError(f"--teacher {spec!r}: use auto, {', '.join(features.SHIPPED)}, resnet18[:PATH] or "
                       "featurenet:PATH")


def _resnet18_ref(file: Path) -> TeacherRef:
    name = "resnet18" if file.name == features.RESNET18_FILE else f"resnet18 {file.name}"
    return TeacherRef(f"resnet18:{file.resolve()}", name)


# ---------------------------------------------------------------------------------------- loading
class Teacher(nn.Module):
    """A frozen classifier restricted to a set's classes: ``teacher(x)`` takes a batch in the students'
    model range ([-1, 1], N x 3 x H x W, any size) and returns logits over the set's classes, in the set's
    order. Inputs are resized to the network's size (and normalised as ImageNet for ResNet-18)."""

    def __init__(self, name: str, module: nn.Module, kind: str, size: int, index: list[int]):
        super().__init__()
        self.name, self.kind, self.size = name, kind, size
        self.module = module.eval().requires_grad_(False)
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.kind == "resnet18":
            mean = torch.tensor(features.IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(features.IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            x = ((x + 1) / 2 - mean) / std
        return self.module(x).index_select(1, self.index)


def class_index(teacher_classes: list[str], classes: list[str], name: str) -> list[int]:
    """The teacher's output index of each of the set's classes; a class it does not know is an error."""
    where = {c: i for i, c in enumerate(teacher_classes)}
    unknown = [c for c in classes if c not in where]
    if unknown:
        shown = ", ".join(teacher_classes[:3]) + (", ..." if len(teacher_classes) > 3 else "")
        raise TeacherError(f"teacher {name} does not know class(es) {unknown[:5]}: its classes are "
                           f"{len(teacher_classes)} ({shown})")
    return [where[c] for c in classes]


def load_teacher(spec: str, classes: list[str], device: str = "cpu") -> Teacher:
    """The teacher a resolved spec names, restricted to ``classes`` (the set's class folders, in label order)."""
    kind, _, path = spec.partition(":")
    try:
        if kind == "resnet18":
            ex = features.load_resnet18(path)
            module, teacher_classes, size = ex.module, imagenet_wnids(), 224  # keeps torchvision's fc
            name = _resnet18_ref(Path(path)).name if path else "resnet18"
        else:
            file = features.shipped_path(kind) if kind in features.SHIPPED and not path else Path(path)
            ex = features.load_featurenet(file)
            module, teacher_classes, size = ex.module, featurenet_classes(file), ex.size
            name = kind if kind in features.SHIPPED else f"featurenet {file.name}"
    except FeatureLoadError as exc:
        raise TeacherError(str(exc)) from None
    index = class_index(teacher_classes, list(classes), name)
    return Teacher(name, module, "resnet18" if kind == "resnet18" else "featurenet", size, index).to(device)


@lru_cache(maxsize=2)
def cached_teacher(spec: str, classes: tuple[str, ...], device: str) -> Teacher:
    """One load per worker process for every student task that names the same teacher and classes."""
    return load_teacher(spec, list(classes), device)


def featurenet_classes(file: Path) -> list[str]:
    """A feature net's output classes: its spec's ``classes``, else its built-in dataset's class order."""
    with safe_open(str(file), "pt") as fh:
        spec = json.loads((fh.metadata() or {})["spec"])
    if spec.get("classes"):
        return [str(c) for c in spec["classes"]]
    from pipeline.inputs.datasets import load_builtin  # noqa: PLC0415 (only for nets without a class list)

    try:
        names = load_builtin(spec["dataset"], "test")[2]
    except KeyError:
        raise TeacherError(f"feature net {file.name} names no classes and {spec.get('dataset')!r} is not a "
                           "built-in dataset") from None
    if len(names) != spec["num_classes"]:
        raise TeacherError(f"feature net {file.name}: {spec['num_classes']} outputs, {len(names)} classes in "
                           f"{spec['dataset']}")
    return names
