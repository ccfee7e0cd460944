"""`manifoldgd demo`: the built-in default end to end, offline, on a laptop.

distill mnist10k (real MNIST digits) at IPC 10 with ManifoldGD guidance through Ray, using the prior that
ships with the package -> contact sheet (one row per class) -> a short evaluation: a ConvNet student
trained from scratch on the 100 distilled images vs on 100 random real training images (10 per class),
both tested on the 1,000 real test digits (the test half of the held-out set, see pipeline/datasets.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.preprocess import centre_crop


def contact_sheet(train_dir: Path, out_path: Path, pad: int = 2) -> Path:
    """One row per class (sorted), IPC images per row, written as a PNG."""
    from PIL import Image  # noqa: PLC0415

    rows = []
    for cls in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        rows.append([np.asarray(Image.open(p).convert("RGB")) for p in sorted(cls.glob("*.png"))])
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    sheet = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            sheet[pad + i * (h + pad): pad + i * (h + pad) + h, pad + j * (w + pad): pad + j * (w + pad) + w] = im
    Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST).save(out_path)
    return out_path


def load_imagefolder(train_dir: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image  # noqa: PLC0415

    images, labels = [], []
    for y, cls in enumerate(class_names):
        for p in sorted((train_dir / cls).glob("*.png")):
            images.append(np.asarray(Image.open(p).convert("RGB")))
            labels.append(y)
    return np.stack(images), np.asarray(labels)


def as_model_images(images: np.ndarray, size: int) -> np.ndarray:
    """Real digits through the same preprocessing as the encode stage (RGB, DiT centre crop)."""
    from PIL import Image  # noqa: PLC0415

    return np.stack([np.asarray(centre_crop(Image.fromarray(im).convert("RGB"), size)) for im in images])


def random_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                           for c in np.unique(labels)])


def evaluate_against_random(distilled_dir: Path, dataset: str, ipc: int, seeds: int, epochs: int) -> dict:
    from pipeline.datasets import load_builtin  # noqa: PLC0415
    from pipeline.students import StudentRecipe, accuracy, train_student  # noqa: PLC0415

    train_x, train_y, names = load_builtin(dataset, "train")
    test_x, test_y, _ = load_builtin(dataset, "test")
    syn_x, syn_y = load_imagefolder(distilled_dir / "train", names)
    size = syn_x.shape[1]
    test_x = as_model_images(test_x, size)
    recipe = StudentRecipe(epochs=epochs)
    result = {"distilled": [], "random_real": [], "epochs": epochs, "test_images": len(test_y)}
    for seed in range(seeds):
        idx = random_subset(train_y, ipc, seed)
        real_x = as_model_images(train_x[idx], size)
        result["distilled"].append(accuracy(train_student(syn_x, syn_y, len(names), recipe, seed), test_x, test_y))
        result["random_real"].append(accuracy(train_student(real_x, train_y[idx], len(names), recipe, seed),
                                              test_x, test_y))
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.cli import main as cli_main  # noqa: PLC0415

    from pipeline.distill import _builtin_prior  # noqa: PLC0415

    out = Path(args.out)
    start = time.perf_counter()
    if not any(s.startswith("model.model=") for s in args.set) and not _builtin_prior(args.data):
        print(f"manifoldgd demo: the built-in {args.data} prior is missing from this install. Train it "
              f"(about 40 minutes on 2 CPU cores) with\n  manifoldgd train-prior --data {args.data} "
              f"--out pipeline/priors/{args.data} --torch-threads 1\nthen run the demo again, or pass "
              "--set model.model=FOLDER --set model.vae= to use another prior.", file=sys.stderr)
        return 2
    code = cli_main(["distill", "--data", args.data, "--out", str(out), "--ipc", str(args.ipc),
                     "--guidance", "manifold", *sum((["--set", s] for s in args.set), [])])
    if code:
        return code
    sheet = contact_sheet(out / "train", out / "contact_sheet.png")
    print(f"\ndistilled images: {out / 'train'}  ({args.ipc} per class)")
    print(f"contact sheet:    {sheet}  (one row per class)")
    print(f"manifest:         {out / 'manifest.parquet'}")
    print(f"\nevaluating: ConvNet-3 students, {args.epochs} epochs, {args.seeds} seed(s), "
          f"tested on the real {args.data} test split ...", flush=True)
    res = evaluate_against_random(out, args.data, args.ipc, args.seeds, args.epochs)
    (out / "demo_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    n = args.ipc * 10
    for key, label in (("distilled", f"ManifoldGD distilled ({n} images)"),
                       ("random_real", f"random real subset ({n} images)")):
        accs = np.asarray(res[key]) * 100
        print(f"  {label:<38} top-1 {accs.mean():5.1f} +- {accs.std():4.1f} %")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="distill the built-in mnist10k, draw a contact sheet, evaluate vs random real")
    p.add_argument("--data", default="mnist10k")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--epochs", type=int, default=300, help="student epochs (fast profile)")
    p.add_argument("--seeds", type=int, default=2, help="student seeds (random subsets differ per seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
