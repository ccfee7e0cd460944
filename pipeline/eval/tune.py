"""Equal-budget tuning of MGD3 and ManifoldGD on a validation split, and the choice it makes.

    python -m pipeline.eval.tune run    --out runs/tune_mnist10k      # the sweep (a benchmark with variants)
    python -m pipeline.eval.tune choose --out runs/tune_mnist10k \\
        --results docs/results/mnist10k_tuning.json                   # pick on val (the earlier one-seed sweep)
    python -m pipeline.eval.tune report --results docs/results/mnist10k_tuning.json \
        --into docs/evaluation.md                                       # the sweep's table, from the file alone

Each method gets the same budget: its published setting plus ``budget - 1`` other settings of its own
grid, drawn as a seeded Latin hypercube (every value of every knob is tried). MGD3 is tuned over lambda and
t_stop; ManifoldGD over lambda, tangent dimension d with its neighbour count K, the normal weight and the
radius annealing schedule. Every drawn setting names every knob of its method's grid, so none depends on a
tuned defaults file. Every setting runs at the same IPC, with the same seeds (disjoint from the reported
table's) and the same students, scored on the ``val`` split only; the winner per method is the highest
mean final-epoch top-1 over the tuning seeds (ties: the earlier draw, the published setting first).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.eval.cells import cell_path
from pipeline.eval.results import rewrite_blocks
from pipeline.eval.stats import mean_std


@dataclass(frozen=True)
class Space:
    base: str                            # the benchmark method the settings go on top of
    prefix: str                          # variant names: <prefix>_t00 (the published setting), _t01, ...
    published: dict
    grid: dict[str, tuple]               # knob -> values; a value may be a dict of several settings


ANNEAL = {"off": {"tangent.max_multiplier": 1}, **{s: {"tangent.max_multiplier": 2, "tangent.schedule": s}
                                                   for s in ("exp", "linear", "cosine")}}
SPACES = {
    "mgd3": Space("mgd3", "mgd3", {"sampler.guidance_scale": 0.1, "sampler.t_stop": 25},
                  {"sampler.guidance_scale": (0.05, 0.1, 0.2, 0.3, 0.5, 0.8), "sampler.t_stop": (0, 10, 25, 35)}),
    "manifoldgd": Space(
        "manifoldgd", "mgd",
        {"sampler.guidance_scale": 0.1, "tangent.dim": 3, "tangent.neighbours": 12, "sampler.normal_weight": 0.0,
         "tangent.max_multiplier": 2, "tangent.schedule": "exp"},
        {"sampler.guidance_scale": (0.05, 0.1, 0.2, 0.3, 0.5, 0.8),
         "tangent.dim+neighbours": tuple({"tangent.dim": d, "tangent.neighbours": k}
                                         for d, k in ((3, 12), (8, 24), (16, 48), (32, 64), (64, 128))),
         "sampler.normal_weight": (0.0, 0.25, 0.5),
         "annealing": tuple(ANNEAL.values())}),
}
DEFAULTS = {"budget": 12, "seed": 0, "ipc": 10, "seeds": "10-10", "test": "mnist10k:val", "data": "mnist10k"}
STUDENT = ["--profile", "fast", "--student", "width=32", "--student", "hflip=false", "--features", "none"]


def expand(point: dict) -> dict:
    """A grid point (knob -> value, a value possibly a dict of settings) -> flat distill settings."""
    out = {}
    for knob, value in point.items():
        out.update(value if isinstance(value, dict) else {knob: value})
    return out


def draws(space: Space, budget: int, seed: int) -> list[dict]:
    """The published setting, then ``budget - 1`` distinct other grid points, drawn as a seeded Latin
    hypercube over the grid: each knob's values are repeated to ``budget - 1`` entries and shuffled
    independently, so every value of every knob is tried at least ``(budget - 1) // len(values)`` times
    (a plain random draw can miss a value altogether; with fewer draws than values, a random subset of the
    values is tried once each). A draw with a repeated point is redrawn."""
    published = expand(space.published)
    n = budget - 1
    size = 1
    for values in space.grid.values():
        size *= len(values)
    if n > size - 1:
        raise ValueError(f"budget {budget} exceeds the {size} settings of {space.base}'s grid")
    rng = random.Random(f"{space.base}:{seed}")
    for _ in range(10_000):
        columns = []
        for values in space.grid.values():
            if n < len(values):  # fewer draws than values: which values are tried is drawn too
                values = rng.sample(list(values), len(values))
            column = [values[i % len(values)] for i in range(n)]
            rng.shuffle(column)
            columns.append(column)
        points = [{**published, **expand(dict(zip(space.grid, row, strict=True)))} for row in zip(*columns, strict=True)]
        keys = [json.dumps(p, sort_keys=True) for p in [published, *points]]
        if len(set(keys)) == len(keys):
            return [published, *points]
    raise ValueError(f"could not draw {n} distinct settings of {space.base}'s grid")


def variant_name(space: Space, i: int) -> str:
    return f"{space.prefix}_t{i:02d}"


def variants(budget: int, seed: int) -> dict[str, tuple[str, dict]]:
    """Variant name -> (base method, settings), for every method's draws."""
    return {variant_name(sp, i): (sp.base, s) for sp in SPACES.values() for i, s in enumerate(draws(sp, budget, seed))}


def variant_args(table: dict[str, tuple[str, dict]]) -> list[str]:
    out = []
    for name, (base, settings) in table.items():
        out += ["--variant", f"{name}={base}:" + ",".join(f"{k}={v}" for k, v in settings.items())]
    return out


@dataclass(frozen=True)
class TuneOptions:
    """One `python -m pipeline.eval.tune` command, typed (``DEFAULTS`` are its protocol fields)."""

    action: str                     # run | choose | report | variants
    out: str = "runs/tune_mnist10k"
    budget: int = DEFAULTS["budget"]
    seed: int = DEFAULTS["seed"]
    ipc: int = DEFAULTS["ipc"]
    seeds: str = DEFAULTS["seeds"]
    test: str = DEFAULTS["test"]
    data: str = DEFAULTS["data"]
    results: str | None = None
    into: tuple[str, ...] = ()

    def protocol(self) -> dict:
        return {k: getattr(self, k) for k in DEFAULTS}


def benchmark_argv(opts: TuneOptions) -> list[str]:
    return ["benchmark", "--data", opts.data, "--test", opts.test, "--out", opts.out, "--ipc", str(opts.ipc),
            "--seeds", opts.seeds, "--methods", "", *STUDENT, *variant_args(variants(opts.budget, opts.seed))]


def choose(out: Path, table: dict[str, tuple[str, dict]], ipc: int, seeds: list[int], arch: str = "convnet") -> dict:
    """Every setting's mean val score and each method's winner (a method with a missing cell has none)."""
    scored: dict[str, list[dict]] = {sp.base: [] for sp in SPACES.values()}
    for name, (base, settings) in table.items():
        cells = [json.loads(p.read_text()) for s in seeds if (p := cell_path(out, name, ipc, s, arch)).exists()]
        top1 = mean_std([c["student"]["final_top1"] for c in cells], scale=100)
        scored[base].append({"variant": name, "settings": settings, "val_top1": top1,
                             "per_seed": {str(c["seed"]): round(100 * c["student"]["final_top1"], 2) for c in cells}})
    chosen = {}
    for base, rows in scored.items():
        complete = [r for r in rows if r["val_top1"]["n"] == len(seeds)]
        if complete and len(complete) == len(rows):
            chosen[base] = max(complete, key=lambda r: r["val_top1"]["mean"])  # max keeps the first of ties
    return {"settings": scored, "chosen": chosen}


def tuning_markdown(result: dict) -> str:
    """Every setting tried, per method, best first: its val top-1 per tuning seed and mean; the choice marked."""
    proto = result["protocol"]
    lines = [f"Made by `{result['command']}` (then `python -m pipeline.eval.tune choose`); students "
             f"`{result['student']}`; scored on `{proto['test']}`, IPC {proto['ipc']}, seeds {proto['seeds']}; "
             f"{proto['budget']} settings per method.", ""]
    for base, rows in result["settings"].items():
        chosen = result["chosen"].get(base, {}).get("variant")
        published = SPACES[base].published
        knobs = list(expand(published))
        lines += [f"{base} (published: " + ", ".join(f"{k} {published[k]}" for k in knobs) + ")", "",
                  "| setting | " + " | ".join(k.split(".")[-1] for k in knobs) + " | val top-1 per seed | mean |",
                  "| --- |" + " --- |" * (len(knobs) + 2)]
        for r in sorted(rows, key=lambda r: -(r["val_top1"]["mean"] or 0)):
            name = r["variant"] + (" (published)" if r["settings"] == expand(published) else "")
            name = f"**{name}, chosen**" if r["variant"] == chosen else name
            seeds = " / ".join(f"{v:.1f}" for _, v in sorted(r["per_seed"].items(), key=lambda kv: int(kv[0])))
            mean = "-" if r["val_top1"]["mean"] is None else f"{r['val_top1']['mean']:.2f}"
            lines.append(f"| {name} | " + " | ".join(str(r["settings"][k]) for k in knobs) + f" | {seeds} | {mean} |")
        lines.append("")
    return "\n".join(lines)


def parse_options(argv: list[str] | None = None) -> TuneOptions:
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("run", "choose", "report", "variants"),
                   help="run the sweep; choose from its cells; report = tables from the --results file alone")
    p.add_argument("--out", default="runs/tune_mnist10k")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key}", type=type(value), default=value)
    p.add_argument("--results", help="choose: write every setting's val score and the choice here (JSON); "
                   "report: read it")
    p.add_argument("--into", action="append", default=[], metavar="FILE",
                   help="rewrite the <!-- results:tuning begin/end --> block of FILE with the sweep's table")
    args = p.parse_args(argv)
    return TuneOptions(**{**vars(args), "into": tuple(args.into)})


def main(argv: list[str] | None = None) -> int:
    return run_tune(parse_options(argv))


def run_tune(opts: TuneOptions) -> int:
    table = variants(opts.budget, opts.seed)
    if opts.action == "variants":
        print(" ".join(variant_args(table)))
        return 0
    if opts.action == "run":
        from pipeline.cli import main as cli_main  # noqa: PLC0415 (the CLI's command table is imported lazily)
        return cli_main(benchmark_argv(opts))
    if opts.action == "report":
        result = json.loads(Path(opts.results).read_text())
    else:
        from pipeline.eval.benchmark_options import parse_seeds  # noqa: PLC0415
        result = choose(Path(opts.out), table, opts.ipc, parse_seeds(opts.seeds))
        result.update({"protocol": opts.protocol(), "student": " ".join(STUDENT),
                       "command": "python -m pipeline.eval.tune run "
                       + " ".join(f"--{k} {v}" for k, v in opts.protocol().items())})
        if set(result["chosen"]) != set(SPACES):
            print("not every setting has a cell for every tuning seed: run the sweep first", file=sys.stderr)
            return 1
    print(tuning_markdown(result))
    if opts.results and opts.action == "choose":
        Path(opts.results).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.results).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    for path in opts.into:
        rewrite_blocks(Path(path), {"tuning": tuning_markdown(result)})
        print(f"rewrote the tuning block in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
