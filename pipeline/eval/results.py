"""The benchmark's compact results file: one JSON record per finished cell, and the tables made from it.

    OUT/results.jsonl       written by every benchmark report (the cells of the requested grid)
    docs/results/*.jsonl    the committed copy the README and docs tables are generated from

A record is one (method, IPC, seed, architecture) cell: the method's label and distill settings, the test
split that scored it, the student recipe, the label protocol (``labels``: ``{"kind": "hard"}`` or the soft
labels' teacher and temperature; a record without it, as the ones written before the field existed, was
trained with hard labels), the command that made it, the student's top-1 (fractions, as the
cells), the set's distribution metrics and its copy-detection summary. Lines are sorted, keys sorted, so
the file diffs cleanly. ``manifoldgd benchmark --report-only --results-file FILE --into README.md`` rebuilds
the tables from the file alone (no cell folder needed) and rewrites the marked blocks of the given files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.eval.methods import METHODS, Method
from pipeline.eval.teachers import labels_of

COPY_KEYS = ("frac_closer_than_any_train_pair", "frac_below_train_nn_p5", "nn_ratio_median")


def compact_copies(report: dict | None) -> dict | None:
    """A copy-detection report (``pipeline.common.copies.copy_check``) without its per-image lists: per
    space the three fractions/ratios and the median nearest-train distance beside the train reference."""
    if not report:
        return None
    out = {"features_name": report.get("features_name")}
    for space in ("pixels", "features"):
        r = report.get(space)
        out[space] = None if r is None else {**{k: r[k] for k in COPY_KEYS}, "nn_p50": r["nn"]["p50"],
                                             "train_nn_p50": r["train_nn"]["p50"], "n": r["n"],
                                             "n_train": r["n_train"]}
    return out


def record(cell: dict, method: Method, test: str, recipe: str) -> dict:
    """A cell as one compact record (the recipe as its one-line description, the copies compacted)."""
    student = cell["student"]
    return {"method": method.name, "label": method.label, "kind": method.kind, "guidance": method.guidance,
            "cluster": method.cluster, "sets": list(method.sets), "ipc": cell["ipc"], "seed": cell["seed"],
            "arch": cell["arch"], "test": test, "eval_key": cell["eval_key"], "recipe": recipe,
            "command": cell.get("command", ""), "n_images": cell.get("n_images"),
            "student": {k: student[k] for k in ("final_top1", "best_top1", "seconds")},
            "metrics": cell.get("metrics") or {}, "copies": compact_copies(cell.get("copies")),
            "distill_seconds": cell.get("distill_seconds"), "labels": labels_of(cell)}


def sort_key(r: dict) -> tuple:
    return r["method"], r["ipc"], r["seed"], r["arch"]


def write_records(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=sort_key))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def read_records(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no results file {path}")
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def methods_of(records: list[dict]) -> dict[str, Method]:
    """The method table the records name: the built-in methods, plus each variant as it was recorded."""
    table = dict(METHODS)
    for r in records:
        if r["method"] not in METHODS:
            table[r["method"]] = Method(r["method"], r["label"], r["kind"], r["guidance"], r["cluster"],
                                        tuple(r["sets"]))
    return table


# ------------------------------------------------------------------------ marked blocks in documents
BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z0-9_]+) begin[^>]*-->\n)(?P<body>.*?)(<!-- results:(?P=name) end -->)",
                   re.S)


def rewrite_blocks(path: Path, blocks: dict[str, str]) -> list[str]:
    """Replace the body of every ``<!-- results:NAME begin ... -->`` ... ``<!-- results:NAME end -->`` block
    of ``path`` whose NAME is in ``blocks`` (other blocks are another writer's: left alone); returns the
    names replaced. A file with no block this writer knows is an error (a typo, or the wrong file)."""
    text = Path(path).read_text()
    names = [m.group("name") for m in BLOCK.finditer(text) if m.group("name") in blocks]
    if not names:
        raise ValueError(f"{path}: no <!-- results:NAME begin --> block with NAME one of {', '.join(sorted(blocks))}")

    def body(m):
        if m.group("name") not in blocks:
            return m.group(0)
        return m.group(1) + blocks[m.group("name")].rstrip("\n") + "\n" + m.group(4)

    Path(path).write_text(BLOCK.sub(body, text))
    return names


def read_blocks(path: Path) -> dict[str, str]:
    """NAME -> body of every marked block of ``path`` (what a test compares with a fresh report)."""
    return {m.group("name"): m.group("body") for m in BLOCK.finditer(Path(path).read_text())}
