"""Image helpers every stage shares: DiT's centre crop, uint8 <-> model range, PNG bytes, contact sheets,
and the one seeded random real subset (so `demo` and `benchmark` draw the same images for the same seed).

Pixels are uint8 (N, H, W, 3) arrays everywhere outside a model; a model sees float (N, 3, H, W) in [-1, 1].
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """DiT's preprocessing: while the short side is at least twice the target, halve with a BOX filter;
    resize the short side to the target (BICUBIC); centre-crop a square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(max(size, round(x * scale)) for x in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def crop_images(images: np.ndarray, size: int) -> np.ndarray:
    """Real images through the encode stage's preprocessing (RGB, DiT centre crop to ``size``)."""
    return np.stack([np.asarray(centre_crop(Image.fromarray(im).convert("RGB"), size)) for im in images])


def to_model_range(images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], on ``device`` when given."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # a Ray object-store array: torch warns on read-only memory
        images = images.copy()
    x = torch.from_numpy(images)
    if device is not None:
        x = x.to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


MARK_RGB = (230, 0, 0)  # the frame around an image the health check flagged


def contact_sheet(rows: list[list[np.ndarray]], pad: int = 2, zoom: int = 1,
                  marked: set[tuple[int, int]] | None = None) -> Image.Image:
    """One row of images per list, on white, ``pad`` pixels around and between them, scaled ``zoom`` x.
    ``marked``: (row, column) of images to frame in red (the ``pad`` pixels around them)."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    sheet = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, j in sorted(marked or ()):
        top, left = i * (h + pad), j * (w + pad)
        sheet[top: top + h + 2 * pad, left: left + w + 2 * pad] = MARK_RGB
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            sheet[pad + i * (h + pad): pad + i * (h + pad) + h, pad + j * (w + pad): pad + j * (w + pad) + w] = im
    image = Image.fromarray(sheet)
    return image.resize((sheet.shape[1] * zoom, sheet.shape[0] * zoom), Image.NEAREST) if zoom > 1 else image


def folder_sheet(train_dir: Path, flagged=(), zoom: int = 3) -> Image.Image:
    """The contact sheet of a distilled ``train/<class>/*.png`` folder: one row per class (sorted), ``zoom`` x.
    ``flagged``: image paths (relative to the run folder, as in the manifest, or absolute) framed in red."""
    train_dir = Path(train_dir)
    flagged = {Path(f).name for f in flagged}
    paths = [sorted(cls.glob("*.png")) for cls in sorted(p for p in train_dir.iterdir() if p.is_dir())]
    rows = [[np.asarray(Image.open(p).convert("RGB")) for p in row] for row in paths]
    marked = {(i, j) for i, row in enumerate(paths) for j, p in enumerate(row) if p.name in flagged}
    return contact_sheet(rows, zoom=zoom, marked=marked)


def folder_contact_sheet(train_dir: Path, out_path: Path, flagged=()) -> Path:
    """``folder_sheet`` at 3x, saved to ``out_path``."""
    folder_sheet(train_dir, flagged).save(out_path)
    return out_path


def load_png_folder(train_dir: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every ``train_dir/<class>/*.png`` of the given classes as (uint8 images, label = index in the list)."""
    images, labels = [], []
    for y, cls in enumerate(class_names):
        for p in sorted((train_dir / cls).glob("*.png")):
            images.append(np.asarray(Image.open(p).convert("RGB")))
            labels.append(y)
    return np.stack(images), np.asarray(labels)


def random_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` random items of each label (all of a smaller class), labels in sorted
    order; one seeded stream, so every command draws the same real subset for the same seed."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), min(per_class, int((labels == c).sum())),
                                      replace=False) for c in np.unique(labels)])
