"""`manifoldgd demo`: the built-in default end to end, offline, on a laptop.

distill mnist10k (real MNIST digits) at IPC 10 with ManifoldGD guidance (``--guidance`` picks another mode)
through Ray, using the prior that ships with the package and its settings tuned on val for that mode ->
contact sheet (one row per class) -> a short evaluation: a ConvNet student trained from scratch on the 100
distilled images vs on 100 random real training images (10 per class), both tested on the 1,000 real test
digits (the test half of the held-out set, see pipeline/inputs/datasets.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ops.guidance import GUIDANCE_MODES
from pipeline.common.images import crop_images, folder_contact_sheet, load_png_folder, random_subset
from pipeline.distill.health import health_summary
from pipeline.distill.run import builtin_prior_exists, distill_command, resolve_distill_config
from pipeline.eval.students import StudentRecipe, accuracy, train_student
from pipeline.inputs.datasets import load_builtin


def evaluate_against_random(distilled_dir: Path, dataset: str, ipc: int, seeds: int, epochs: int) -> dict:
    train_x, train_y, names = load_builtin(dataset, "train")
    test_x, test_y, _ = load_builtin(dataset, "test")
    syn_x, syn_y = load_png_folder(distilled_dir / "train", names)
    size = syn_x.shape[1]
    test_x = crop_images(test_x, size)
    recipe = StudentRecipe(epochs=epochs)
    result = {"distilled": [], "random_real": [], "epochs": epochs, "test_images": len(test_y)}
    for seed in range(seeds):
        idx = random_subset(train_y, ipc, seed)
        real_x = crop_images(train_x[idx], size)
        result["distilled"].append(accuracy(train_student(syn_x, syn_y, len(names), recipe, seed), test_x, test_y))
        result["random_real"].append(accuracy(train_student(real_x, train_y[idx], len(names), recipe, seed),
                                              test_x, test_y))
    return result


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    start = time.perf_counter()
    if not any(s.startswith("model.model=") for s in args.set) and not builtin_prior_exists(args.data):
        print(f"manifoldgd demo: the built-in {args.data} prior is missing from this install. Train it "
              f"(about 40 minutes on 2 CPU cores) with\n  manifoldgd train-prior --data {args.data} "
              f"--out pipeline/priors/{args.data} --torch-threads 1\nthen run the demo again, or pass "
              "--set model.model=FOLDER --set model.vae= to use another prior.", file=sys.stderr)
        return 2
    code = distill_command(lambda: resolve_distill_config(data=args.data, out=str(out), ipc=args.ipc,
                                                          guidance=args.guidance, overrides=args.set))
    if code:
        return code
    flagged = health_summary(out / "manifest.parquet")["flagged_images"]
    sheet = folder_contact_sheet(out / "train", out / "contact_sheet.png", flagged)
    print(f"\ndistilled images: {out / 'train'}  ({args.ipc} per class)")
    print(f"contact sheet:    {sheet}  (one row per class"
          f"{f'; {len(flagged)} flagged sample(s) framed in red' if flagged else ''})")
    print(f"manifest:         {out / 'manifest.parquet'}")
    print(f"\nevaluating: ConvNet-3 students, {args.epochs} epochs, {args.seeds} seed(s), "
          f"tested on the real {args.data} test split ...", flush=True)
    res = evaluate_against_random(out, args.data, args.ipc, args.seeds, args.epochs)
    (out / "demo_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    n = args.ipc * 10
    for key, label in (("distilled", f"distilled, {args.guidance} guidance ({n} images)"),
                       ("random_real", f"random real subset ({n} images)")):
        accs = np.asarray(res[key]) * 100
        print(f"  {label:<44} top-1 {accs.mean():5.1f} +- {accs.std():4.1f} %")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="distill the built-in mnist10k, draw a contact sheet, evaluate vs random real")
    p.add_argument("--data", default="mnist10k")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--guidance", choices=GUIDANCE_MODES, default="manifold",
                   help="sampler.guidance: manifold (ManifoldGD), mode (MGD3), public, none (plain DiT)")
    p.add_argument("--epochs", type=int, default=300, help="student epochs (fast profile)")
    p.add_argument("--seeds", type=int, default=2, help="student seeds (random subsets differ per seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)
