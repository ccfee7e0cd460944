"""The benchmark's folders and cells: where each set and each finished student lives, when a cell can be
reused, the aggregate over seeds, and the encoded latents that distill folders share.

    OUT/distill/<method>/ipc<k>_seed<s>/          a distill output folder
    OUT/real/<method>/ipc<k>_seed<s>/             a real baseline (ImageFolder + selection.json)
    OUT/cells/<method>/ipc<k>_seed<s>_<arch>.json  one finished student + the set's metrics
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.common.outputs import atomic_write_json
from pipeline.eval.evaluate import summarise
from pipeline.eval.methods import LADDER, MAIN, METHODS, Method
from pipeline.eval.stats import mean_std
from pipeline.eval.teachers import labels_of

SET_METRICS = ("fid", "mean_l2", "mmd2", "mmd_paper")


# ------------------------------------------------------------------------------------- paths and keys
def set_dir(out: Path, method: Method, ipc: int, seed: int) -> Path:
    return out / ("distill" if method.kind == "distill" else "real") / method.name / f"ipc{ipc}_seed{seed}"


def cell_path(out: Path, method: str, ipc: int, seed: int, arch: str) -> Path:
    return out / "cells" / method / f"ipc{ipc}_seed{seed}_{arch}.json"


def eval_key(recipe: dict, test: str, features: str | None, labels: dict | None = None) -> str:
    """What a cell's result depends on besides its set: the student recipe, the test set, the features and
    the label protocol (``pipeline.eval.teachers.label_protocol``). Hard labels add nothing to the key, so
    the cells made before soft labels existed keep their key and are reused; soft labels (teacher and
    temperature) always give another key."""
    parts = {"recipe": recipe, "test": test, "features": features}
    if labels is not None and labels.get("kind", "hard") != "hard":
        parts["labels"] = labels
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------- cells
def load_cell(path: Path, key: str) -> dict | None:
    """The cell at ``path`` when it was made with the settings ``key`` names, else None."""
    if not path.exists():
        return None
    cell = json.loads(path.read_text())
    return cell if cell.get("eval_key") == key else None


def save_cell(out: Path, cell: dict) -> Path:
    """Write a finished cell (its ``method``, ``ipc``, ``seed``, ``arch`` name the file) whole."""
    path = cell_path(out, cell["method"], cell["ipc"], cell["seed"], cell["arch"])
    atomic_write_json(path, cell)
    return path


def distill_seconds(out: Path, method: Method, ipc: int, seed: int) -> float | None:
    """How long the set's distill run took (its run.json), None for a real set."""
    run = set_dir(out, method, ipc, seed) / "run.json"
    if method.kind != "distill" or not run.exists():
        return None
    timings = json.loads(run.read_text()).get("timings_s", {})
    return round(float(timings.get("total", 0.0)), 1)


def cells_in(out: Path, methods, ipcs, seeds, archs) -> list[dict]:
    """The finished cells of a grid under ``out`` (missing ones are skipped)."""
    return [json.loads(p.read_text()) for name in methods for ipc in ipcs for arch in archs for s in seeds
            if (p := cell_path(out, name, ipc, s, arch)).exists()]


def collect(out: Path, methods, ipcs, seeds, archs, table: dict[str, Method] | None = None) -> dict:
    """Aggregate the finished cells under ``out``: mean +- std over seeds per (method, IPC, architecture)."""
    return aggregate(cells_in(out, methods, ipcs, seeds, archs), methods, ipcs, archs, table)


def aggregate(cells: list[dict], methods, ipcs, archs, table: dict[str, Method] | None = None) -> dict:
    """Cells (or results-file records: the same keys) -> the rows of results.json, in method order."""
    table = table or METHODS
    rows, commands = [], set()
    for name in methods:
        for ipc in ipcs:
            for arch in archs:
                group = sorted((c for c in cells if (c["method"], c["ipc"], c["arch"]) == (name, ipc, arch)),
                               key=lambda c: c["seed"])
                if not group:
                    continue
                rows.append(aggregate_row(table[name], ipc, arch, group))
                commands.update(c.get("command", "") for c in group)
    return {"rows": rows, "main": [m for m in MAIN if m in methods],
            "ladder": [(label, m) for label, m in LADDER if m in methods],
            "commands": sorted(c for c in commands if c), "labels": {m: table[m].label for m in methods},
            "variants": [m for m in methods if m not in METHODS],
            "variant_settings": {m: list(table[m].sets) for m in methods if m not in METHODS}}


COPY_STATS = ("frac_closer_than_any_train_pair", "nn_ratio_median")


def aggregate_row(method: Method, ipc: int, arch: str, cells: list[dict]) -> dict:
    """One row of results.json: the seeds' cells of one (method, IPC, architecture)."""
    copies = {space: {k: mean_std([((c.get("copies") or {}).get(space) or {}).get(k) for c in cells])
                      for k in COPY_STATS} for space in ("pixels", "features")}
    return {"method": method.name, "label": method.label, "ipc": ipc, "arch": arch, "labels": labels_of(cells[0]),
            "seeds": [c["seed"] for c in cells], **summarise([c["student"] for c in cells]),
            "metrics": {k: mean_std([c["metrics"].get(k) for c in cells]) for k in SET_METRICS},
            "copies": copies, "distill_seconds": mean_std([c.get("distill_seconds") for c in cells])}


# --------------------------------------------------------------------------------- shared latents
def latent_key(cfg_dict: dict) -> str:
    """What the encoded latents depend on: the data section and the model section (VAE, dtype, revision)."""
    return json.dumps({"data": cfg_dict["data"], "model": cfg_dict["model"]}, sort_keys=True)


def share_latents(out_root: Path, target: Path, key: str) -> None:
    """Hard-link (or copy across filesystems) the encoded latents of any finished run under
    ``out_root/distill`` whose data and model match ``key`` into a new run folder, so that the training
    set is encoded once per benchmark. A folder made with another model or data is never a source."""
    if (target / "_work" / "latents" / "_DONE").exists():
        return
    src = None
    for stamp in sorted(out_root.glob("distill/*/*/_work/config.json")):
        work = stamp.parent
        if (work / "latents" / "_DONE").exists() and latent_key(json.loads(stamp.read_text())["config"]) == key:
            src = work / "latents"
            break
    if src is None:
        return
    shutil.copytree(src, target / "_work" / "latents", copy_function=link_or_copy, dirs_exist_ok=True)


def link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
