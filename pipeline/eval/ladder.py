"""The tuned ablation ladder and the guidance options beyond the paper, chosen on val with enough seeds.

    python -m pipeline.eval.ladder run    --ipc 10 --out runs/ladder10   # screen every setting, confirm the top 3
    python -m pipeline.eval.ladder choose --ipc 10 --out runs/ladder10 \\
        --results docs/results/mnist10k_ladder_ipc10.json                   # each method's winner, from val alone
    python -m pipeline.eval.ladder report --results docs/results/mnist10k_ladder_ipc10.json --into docs/ladder.md
    python -m pipeline.eval.ladder score  --results docs/results/mnist10k_ladder_ipc10.json \\
        --out runs/ladder_test --records docs/results/mnist10k_ladder.jsonl  # the winners, once, on test seeds 0-4
    python -m pipeline.eval.ladder table  --records docs/results/mnist10k_ladder.jsonl --into README.md
    python -m pipeline.eval.ladder sheet  --results docs/results/mnist10k_ladder_ipc10.json --out runs/ladder10 \\
        --to docs/img/ladder_ipc10.png                                      # every winner's set, flagged in red

Every method (each rung of the ladder: DiT, MGD3, the divisive tree, level-wise selection, the tangent
projection, radius annealing; the public code's variant; the new options) gets the same budget of
settings: a starting setting (the earlier one-seed sweep's winner for its guidance mode, see ``MODE``)
plus ``budget - 1`` more of its own grid, drawn as a seeded Latin hypercube (``pipeline.eval.tune.draws``).
Every setting names every knob that a built-in prior's tuned defaults could change, so no score depends on
a defaults file.

Selection, on the ``val`` split only:
1. screen: every setting with the screening seeds (2 by default);
2. confirm: the top ``top`` settings of each method by screening mean get the confirming seeds too (3 more,
   5 in all);
3. choose: each method's winner is the confirmed setting with the highest mean over all its seeds (ties:
   the earlier draw, the starting setting first).
IPC 1 is tuned on its own (``--ipc 1``, its own folder and results file). ``score`` then runs each
winner once on the test split with seeds 0-4, into a results file of its own: test scores choose nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.eval import report
from pipeline.eval.benchmark_options import parse_seeds
from pipeline.eval.cells import aggregate, cell_path
from pipeline.eval.defaults_file import write_section
from pipeline.eval.results import methods_of, read_records, rewrite_blocks, write_records
from pipeline.eval.stats import mean_std
from pipeline.eval.tune import STUDENT, Space, draws, expand, variant_args, variant_name

# Starting settings: the winners of the earlier one-seed sweep on the same val split (pipeline/eval/tune.py,
# docs/results/mnist10k_tuning.json), the mode one for every mode-guided method and the manifold one for every
# projected method, so that no rung starts from a setting that split already showed worse. Each names every
# knob a built-in prior's tuned defaults could change, so no score depends on the defaults file.
MODE = {"sampler.guidance_scale": 0.2, "sampler.t_stop": 10, "sampler.trust_region": 0.0}
MODE_GRID = {"sampler.guidance_scale": (0.1, 0.2, 0.3), "sampler.t_stop": (0, 10, 25)}
TANGENT = tuple({"tangent.dim": d, "tangent.neighbours": k} for d, k in ((8, 24), (16, 48), (32, 64)))
# trust region 1: chosen on val for the shipped prior's manifold mode (docs/health.md); it keeps large lambdas
# from diverging.
MANIFOLD = {"sampler.guidance_scale": 0.3, "sampler.t_stop": 25, "tangent.dim": 16, "tangent.neighbours": 48,
            "sampler.normal_weight": 0.25, "tangent.max_multiplier": 2, "tangent.schedule": "linear",
            "sampler.trust_region": 1.0}
MANIFOLD_GRID = {"sampler.guidance_scale": (0.2, 0.3, 0.5), "tangent.dim+neighbours": TANGENT,
                 "sampler.normal_weight": (0.0, 0.25, 0.5)}
SPACES = {sp.base: sp for sp in (
    Space("dit", "dit", {"sampler.cfg_scale": 4.0}, {"sampler.cfg_scale": (1.5, 2.0, 3.0, 6.0)}),
    Space("mgd3", "mgd3", MODE, MODE_GRID),
    Space("divisive", "div", MODE, MODE_GRID),
    Space("levelwise", "lvl", MODE, MODE_GRID),
    Space("manifold", "mfd", {**MANIFOLD, "tangent.max_multiplier": 1}, MANIFOLD_GRID),
    Space("manifoldgd", "mgd", MANIFOLD, MANIFOLD_GRID),
    # the public code's own tangent setting (d 3 from 12 points, exp annealing), its pull tuned over lengths
    # that matter (the published 0.1 is about 0.2% of the latent's norm)
    Space("public", "pub", {**MODE, "sampler.pull": 0.1, "tangent.dim": 3, "tangent.neighbours": 12,
                            "tangent.max_multiplier": 2, "tangent.schedule": "exp"},
          {**MODE_GRID, "sampler.pull": (1.0, 4.0, 16.0)}),
    Space("noiseaware", "nap", {**MANIFOLD, "sampler.t_stop": 10, "sampler.project_min_signal": 0.3},
          {"sampler.guidance_scale": (0.2, 0.3, 0.5), "tangent.dim+neighbours": TANGENT,
           "sampler.project_min_signal": (0.1, 0.3, 0.5)}),
    Space("repel", "rep", {**MODE, "sampler.repulsion": 0.3},
          {**MODE_GRID, "sampler.repulsion": (0.1, 0.3, 1.0)}),
    # the control for the projected methods, which all carry the trust region: MGD3 with it, its lambda
    # grid shifted up since the cap removes the divergence that limits MGD3's lambda
    Space("trust", "tru", {**MODE, "sampler.trust_region": 1.0},
          {"sampler.guidance_scale": (0.2, 0.3, 0.5), "sampler.t_stop": (0, 10, 25)}),
)}
# The ladder's rungs in order, and what each adds to the one before.
RUNGS = (("dit", "DiT, no guidance"), ("mgd3", "+ mode guidance toward k-means centroids (MGD3)"),
         ("divisive", "+ divisive tree (branching 1)"), ("levelwise", "+ level-wise IPC selection"),
         ("manifold", "+ tangent projection (no annealing)"), ("manifoldgd", "+ radius annealing (= ManifoldGD)"))
OPTIONS = (("public", "the public code's variant: mode term + unit pull"),
           ("noiseaware", "noise-aware projection (project only at signal >= s_min)"),
           ("repel", "MGD3 + within-class repulsion"), ("trust", "MGD3 + trust region (the control)"))
DEFAULTS = {"budget": 4, "seed": 0, "ipc": 10, "screen": "10-11", "confirm": "12-14", "top": 3,
            "test": "mnist10k:val", "data": "mnist10k"}
SCORE_SEEDS = "0-4"


def variants(budget: int, seed: int, methods: list[str] | None = None) -> dict[str, tuple[str, dict]]:
    """Variant name -> (base method, settings), for every (or the named) method's draws."""
    return {variant_name(sp, i): (sp.base, s) for name, sp in SPACES.items() if methods is None or name in methods
            for i, s in enumerate(draws(sp, budget, seed))}


@dataclass(frozen=True)
class LadderOptions:
    """One `python -m pipeline.eval.ladder` command, typed (``DEFAULTS`` are its protocol fields)."""

    action: str                     # run | choose | report | score | table
    out: str = "runs/ladder10"
    budget: int = DEFAULTS["budget"]
    seed: int = DEFAULTS["seed"]
    ipc: int = DEFAULTS["ipc"]
    screen: str = DEFAULTS["screen"]
    confirm: str = DEFAULTS["confirm"]
    top: int = DEFAULTS["top"]
    test: str = DEFAULTS["test"]
    data: str = DEFAULTS["data"]
    methods: str = ""               # comma-separated spaces to run (empty: all)
    stage: str = "both"             # run: screen | confirm | both
    results: str | None = None
    into: tuple[str, ...] = ()
    write_defaults: bool = False
    records: str | None = None      # score: where the test records go; table: where they are read
    to: str | None = None           # sheet: the PNG

    def protocol(self) -> dict:
        return {k: getattr(self, k) for k in DEFAULTS}

    def method_list(self) -> list[str]:
        names = [m.strip() for m in self.methods.split(",") if m.strip()] or list(SPACES)
        unknown = [m for m in names if m not in SPACES]
        if unknown:
            raise ValueError(f"--methods: unknown {', '.join(unknown)}; methods: {', '.join(SPACES)}")
        return names


def benchmark_argv(opts: LadderOptions, table: dict[str, tuple[str, dict]], seeds: str, test: str | None = None,
                   out: str | None = None) -> list[str]:
    return ["benchmark", "--data", opts.data, "--test", test or opts.test, "--out", out or opts.out,
            "--ipc", str(opts.ipc), "--seeds", seeds, "--methods", "", *STUDENT, *variant_args(table)]


def scores(out: Path, name: str, ipc: int, seeds: list[int], arch: str = "convnet") -> dict[int, float]:
    """Seed -> final top-1 (%) of a variant's finished cells."""
    cells = [json.loads(p.read_text()) for s in seeds if (p := cell_path(out, name, ipc, s, arch)).exists()]
    return {int(c["seed"]): round(100 * c["student"]["final_top1"], 2) for c in cells}


def all_scores(out: Path, table: dict[str, tuple[str, dict]], ipc: int, seeds: list[int]) -> dict[str, dict]:
    """Variant -> its seed -> final top-1 (%), every cell read once."""
    return {name: scores(out, name, ipc, seeds) for name in table}


def shortlist(out: Path, table: dict[str, tuple[str, dict]], ipc: int, screen: list[int], top: int,
              got: dict[str, dict] | None = None) -> dict:
    """Per method, its settings ranked by screening mean (best first; ties keep the earlier draw) and the top
    ``top`` of them; a method with a missing screening cell has no shortlist yet. ``got``: the scores, when
    the caller has read them already."""
    got = got or all_scores(out, table, ipc, screen)
    ranked: dict[str, list[tuple[str, float]]] = {}
    complete: dict[str, bool] = {}
    for name, (base, _) in table.items():
        on_screen = [got[name][s] for s in screen if s in got[name]]
        complete[base] = complete.get(base, True) and len(on_screen) == len(screen)
        ranked.setdefault(base, []).append((name, sum(on_screen) / max(len(on_screen), 1)))
    return {base: [n for n, _ in sorted(rows, key=lambda r: -r[1])][:top]
            for base, rows in ranked.items() if complete[base]}


def choose(out: Path, table: dict[str, tuple[str, dict]], ipc: int, screen: list[int], confirm: list[int],
           top: int) -> dict:
    """Every setting's val scores (per seed, screening mean, and all-seed mean for the shortlisted), and each
    method's winner: the shortlisted setting with the best mean over screening + confirming seeds."""
    seeds = screen + confirm
    got_all = all_scores(out, table, ipc, seeds)
    short = shortlist(out, table, ipc, screen, top, got_all)
    settings: dict[str, list[dict]] = {}
    chosen = {}
    for name, (base, values) in table.items():
        got = got_all[name]
        row = {"variant": name, "settings": values, "per_seed": {str(s): v for s, v in sorted(got.items())},
               "screen": mean_std([got.get(s) for s in screen]), "shortlisted": name in short.get(base, []),
               "all": mean_std([got.get(s) for s in seeds]) if name in short.get(base, []) else None}
        settings.setdefault(base, []).append(row)
    for base, rows in settings.items():
        finalists = [r for r in rows if r["shortlisted"]]
        if base in short and finalists and all(r["all"]["n"] == len(seeds) for r in finalists):
            best = max(finalists, key=lambda r: r["all"]["mean"])  # max keeps the first of ties
            chosen[base] = {k: best[k] for k in ("variant", "settings", "all", "screen")}
    return {"settings": settings, "chosen": chosen}


def ladder_markdown(result: dict) -> str:
    """The ladder and the options: each method's chosen setting and its val mean +- std over all seeds; then
    every setting tried, per method, with its per-seed scores."""
    proto = result["protocol"]
    seeds = parse_seeds(proto["screen"]) + parse_seeds(proto["confirm"])
    lines = [f"Made by `{result['command']}` (then `choose`); students `{result['student']}`, hard labels; "
             f"scored on `{proto['test']}`, IPC {proto['ipc']}; {proto['budget']} settings per method, each "
             f"screened with seeds {proto['screen']}, the top {proto['top']} of each method confirmed with "
             f"seeds {proto['confirm']}.", "",
             "| rung / option | chosen setting (or, screened only: the best screened) | val top-1, mean +- std "
             "over the seeds |", "| --- | --- | --- |"]
    n_screen = len(parse_seeds(proto["screen"]))
    for base, label in (*RUNGS, *OPTIONS):
        if base not in result["settings"]:
            continue
        start = expand(SPACES[base].published)

        def named(row, start=start):
            changed = ", ".join(f"{k.split('.')[-1]} {row['settings'][k]}" for k in start
                                if start[k] != row["settings"][k])
            return f"{row['variant']}: {changed or 'the starting setting'}"

        ch = result["chosen"].get(base)
        screened = [r for r in result["settings"][base] if r["screen"]["n"] == n_screen]
        if ch is not None:
            lines.append(f"| {label} | {named(ch)} | {ch['all']['mean']:.2f} +- {ch['all']['std']:.2f} "
                         f"({ch['all']['n']} seeds) |")
        elif len(screened) == len(result["settings"][base]):
            best = max(screened, key=lambda r: r["screen"]["mean"])
            lines.append(f"| {label} | screened only: {named(best)} | {best['screen']['mean']:.2f} +- "
                         f"{best['screen']['std']:.2f} ({n_screen} seeds) |")
        else:
            lines.append(f"| {label} | not run yet | - |")
    lines.append("")
    for base in (b for b in SPACES if b in result["settings"]):  # the spaces' order, whatever the file's
        rows = result["settings"][base]
        knobs = list(expand(SPACES[base].published))
        lines += [f"{base}: " + ", ".join(f"{k} {v}" for k, v in expand(SPACES[base].published).items())
                  + " (starting setting)", "",
                  "| setting | " + " | ".join(k.split(".")[-1] for k in knobs) + " | val top-1 per seed | screen mean "
                  "| all-seed mean |", "| --- |" + " --- |" * (len(knobs) + 3)]
        chosen = result["chosen"].get(base, {}).get("variant")
        for r in sorted(rows, key=lambda r: -(r["screen"]["mean"] or 0)):
            name = f"**{r['variant']}, chosen**" if r["variant"] == chosen else r["variant"]
            per = " / ".join(f"{v:.1f}" for _, v in sorted(r["per_seed"].items(), key=lambda kv: int(kv[0])))
            screen = "-" if r["screen"]["mean"] is None else f"{r['screen']['mean']:.2f}"
            every = f"{r['all']['mean']:.2f}" if r["all"] and r["all"]["n"] == len(seeds) else "-"
            lines.append(f"| {name} | " + " | ".join(str(r["settings"][k]) for k in knobs)
                         + f" | {per} | {screen} | {every} |")
        lines.append("")
    return "\n".join(lines)


def winners_table(result: dict) -> dict[str, tuple[str, dict]]:
    """The chosen settings as variants named ``<method>_val``, for the test run."""
    return {f"{base}_val": (base, ch["settings"]) for base, ch in result["chosen"].items()}


def test_table(records: list[dict]) -> str:
    """The winners' test scores (final-epoch top-1, mean +- std over the seeds) and their distribution metrics,
    from the records alone: one table per IPC, since each IPC has its own winners under the same names."""
    order = [f"{b}_val" for b, _ in (*RUNGS, *OPTIONS)]
    parts = []
    for ipc in sorted({r["ipc"] for r in records}):
        subset = [r for r in records if r["ipc"] == ipc]
        methods = [m for m in order if any(r["method"] == m for r in subset)]
        results = aggregate(subset, methods, [ipc], ["convnet"], methods_of(subset))
        results.update({"test": subset[0]["test"], "archs": ["convnet"], "recipe": {"convnet": subset[0]["recipe"]}})
        parts.append(f"**IPC {ipc}**\n\n" + report.markdown(results, parts=("commands", "variants", "metrics")))
    return "\n".join(parts)


def write_test_table(path: Path, into: tuple[str, ...]) -> int:
    text = test_table(read_records(path))
    print(text)
    for doc in into:
        rewrite_blocks(Path(doc), {"ladder_test": text})
        print(f"rewrote the ladder_test block in {doc}")
    return 0


def sheet(out: Path, result: dict, path: Path, seed: int | None = None) -> Path:
    """One panel per method: the contact sheet of its val winner's set (the first screening seed), the
    samples the health check flagged framed in red, the method's name and val score above."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    from pipeline.common.images import folder_sheet  # noqa: PLC0415

    proto = result["protocol"]
    seed = parse_seeds(proto["screen"])[0] if seed is None else seed
    panels = []
    for base, _ in (*RUNGS, *OPTIONS):
        ch = result["chosen"].get(base)
        run = out / "distill" / ch["variant"] / f"ipc{proto['ipc']}_seed{seed}" if ch else None
        if run is None or not (run / "run.json").exists():
            continue
        flagged = (json.loads((run / "run.json").read_text()).get("health") or {}).get("flagged_images", [])
        image = folder_sheet(run / "train", flagged, zoom=1)
        panel = Image.new("RGB", (image.width, image.height + 28), "white")
        panel.paste(image, (0, 28))
        text = f"{base} ({ch['variant']})\nval {ch['all']['mean']:.1f}, {len(flagged)} flagged"
        ImageDraw.Draw(panel).multiline_text((2, 1), text, fill="black", spacing=1)
        panels.append(panel)
    if not panels:
        raise ValueError(f"no chosen method has a set under {out}")
    width = sum(p.width for p in panels) + 6 * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + 6
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.convert("P", palette=Image.ADAPTIVE, colors=64).save(path, optimize=True)  # a figure: 64 colours
    return path


def parse_options(argv: list[str] | None = None) -> LadderOptions:
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.ladder", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("run", "choose", "report", "score", "table", "sheet"),
                   help="run = screen then confirm; choose = winners from the cells; report = tables from --results; "
                   "score = the winners on the test split, seeds 0-4; table = the test table from --records; "
                   "sheet = the winners' sets side by side (--to PNG)")
    p.add_argument("--out", default="runs/ladder10")
    for key, value in DEFAULTS.items():
        p.add_argument(f"--{key}", type=type(value), default=value)
    p.add_argument("--methods", default="", help=f"run: only these (comma-separated) of {', '.join(SPACES)}")
    p.add_argument("--stage", choices=("screen", "confirm", "both"), default="both",
                   help="run: the screening seeds, the confirming seeds of the shortlist (screening done), or both")
    p.add_argument("--results", help="choose: write every setting's val scores and the winners here (JSON); "
                   "report, score: read it")
    p.add_argument("--into", action="append", default=[], metavar="FILE",
                   help="rewrite the <!-- results:ladder_ipcN begin/end --> block of FILE")
    p.add_argument("--records", metavar="FILE", help="score: copy the test records here (JSON lines); "
                   "table: read them")
    p.add_argument("--to", metavar="PNG", help="sheet: where the picture goes")
    p.add_argument("--write-defaults", action="store_true",
                   help="choose: write the winners into this IPC's section of pipeline/priors/<data>/distill_defaults.yaml")
    args = p.parse_args(argv)
    return LadderOptions(**{**vars(args), "into": tuple(args.into)})


def run_ladder(opts: LadderOptions) -> int:
    from pipeline.cli import main as cli_main  # noqa: PLC0415 (the CLI's command table is imported lazily)

    methods = opts.method_list()
    table = variants(opts.budget, opts.seed, methods)
    screen, confirm = parse_seeds(opts.screen), parse_seeds(opts.confirm)
    if opts.action == "run":
        if opts.stage in ("screen", "both"):
            rc = cli_main(benchmark_argv(opts, table, opts.screen))
            if rc or opts.stage == "screen":
                return rc
        short = shortlist(Path(opts.out), table, opts.ipc, screen, opts.top)
        finalists = {n: table[n] for names in short.values() for n in names}
        return cli_main(benchmark_argv(opts, finalists, opts.confirm)) if finalists else 0
    if opts.action == "table":
        return write_test_table(Path(opts.records), opts.into)
    if opts.action == "choose":
        result = choose(Path(opts.out), table, opts.ipc, screen, confirm, opts.top)
        result.update({"protocol": opts.protocol(), "student": " ".join(STUDENT),
                       "command": "python -m pipeline.eval.ladder run "
                       + " ".join(f"--{k} {v}" for k, v in opts.protocol().items())})
    else:
        result = json.loads(Path(opts.results).read_text())
    if opts.action == "sheet":
        print(f"wrote {sheet(Path(opts.out), result, Path(opts.to or 'ladder.png'))}")
        return 0
    if opts.action == "score":
        proto = result["protocol"]
        test = proto["test"].split(":")[0] + ":test"
        rc = cli_main(["benchmark", "--data", proto["data"], "--test", test, "--out", opts.out,
                       "--ipc", str(proto["ipc"]), "--seeds", SCORE_SEEDS, "--methods", "", *STUDENT,
                       *variant_args(winners_table(result))])
        if rc == 0 and opts.records:
            fresh = read_records(Path(opts.out) / "results.jsonl")
            kept = [r for r in read_records(Path(opts.records)) if r["ipc"] != proto["ipc"]] \
                if Path(opts.records).exists() else []
            write_records(Path(opts.records), kept + fresh)  # one IPC's records replaced, the others kept
        return rc
    text = ladder_markdown(result)
    print(text)
    if opts.action == "choose" and opts.results:
        Path(opts.results).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.results).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if opts.action == "choose" and opts.write_defaults:
        missing = [b for b in methods if b not in result["chosen"]]
        if missing:
            print(f"not every method has a winner yet ({', '.join(missing)}): run the sweep first", file=sys.stderr)
            return 1
        target = Path(__file__).resolve().parents[1] / "priors" / opts.data / "distill_defaults.yaml"
        write_section(target, result, opts.results or "(not written)")
        print(f"wrote the IPC {opts.ipc} section of {target}")
    for path in opts.into:
        rewrite_blocks(Path(path), {f"ladder_ipc{result['protocol']['ipc']}": text})
        print(f"rewrote the ladder block in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run_ladder(parse_options(argv))
    except ValueError as exc:
        print(f"ladder: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
