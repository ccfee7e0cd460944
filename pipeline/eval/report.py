"""The benchmark's outputs for people: a Markdown table, a bar chart drawn with PIL, a sample grid per set.

matplotlib is not a dependency: the chart is a few rectangles and labels, drawn with PIL.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipeline.common.images import folder_contact_sheet
from pipeline.eval.teachers import describe_labels

PALETTE = [(90, 90, 90), (160, 160, 160), (76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82),
           (129, 114, 179), (147, 120, 96), (218, 139, 195), (140, 140, 60), (100, 181, 205), (255, 196, 0),
           (0, 128, 128), (178, 34, 34), (106, 90, 205), (46, 139, 87)]


def _cell(stat: dict, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.{digits}f} +- {stat['std']:.{digits}f}"


def _rows(results: dict, arch: str) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["ipc"]): r for r in results["rows"] if r["arch"] == arch}


def split_name(results: dict) -> str:
    """The data that scored the students, as a reader should see it (``mnist10k:test``, a folder)."""
    test = results.get("test") or "the real test split"
    return f"{test}:test" if test and ":" not in test and "/" not in test and test.isidentifier() else test


def markdown(results: dict, parts=("commands", "main", "ladder", "variants", "metrics", "copies")) -> str:
    """Top-1 tables (final epoch headline, best epoch beside it) for the main methods, the ladder and the
    variants, per architecture, each header naming the label protocol (``results["protocol"]``; none = hard
    labels); then the distribution metrics with the feature extractor named; then the copy detection.
    ``parts`` picks the sections (README shows fewer than docs/evaluation.md)."""
    rows = results["rows"]
    if not rows:
        return "no finished cells yet\n"
    archs = results.get("archs") or sorted({r["arch"] for r in rows})
    ipcs = sorted({r["ipc"] for r in rows})
    lines = []
    commands = results.get("commands") or ([results["command"]] if results.get("command") else [])
    if commands and "commands" in parts:
        lines += ["Made by:", ""] + [f"    {c}" for c in commands] + [""]
    header = "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |"
    sep = "| --- |" + " --- |" * len(ipcs)
    for arch in archs:
        by = _rows(results, arch)
        recipe = results.get("recipe", {}).get(arch, arch)
        lines += [f"#### Top-1 (%) on {split_name(results)}, {describe_labels(results.get('protocol'))}, {recipe}", "",
                  "Final epoch (headline); [best epoch, as the public code reports it]; mean +- std over seeds "
                  "(n = seeds that finished).", ""]

        def line(label, name, by=by):
            cells = []
            for i in ipcs:
                r = by.get((name, i))
                cells.append("not run" if r is None else
                             f"**{_cell(r['final_top1'])}** [{_cell(r['best_epoch_top1'])}] (n={r['final_top1']['n']})")
            return f"| {label} | " + " | ".join(cells) + " |"

        main = results.get("main") or []
        if main and "main" in parts:
            lines += [header, sep] + [line(by_label(results, m), m) for m in main] + [""]
        ladder = results.get("ladder") or []
        if any(m not in main for _, m in ladder) and "ladder" in parts:  # not when main already shows every rung
            lines += ["Ablation ladder (docs/method.md section 6):", "", header, sep]
            lines += [line(label, m) for label, m in ladder] + [""]
        variants = results.get("variants") or []
        if variants and "variants" in parts:
            lines += ["Variants (settings on top of the named base method):", "", header, sep]
            lines += [line(by_label(results, m), m) for m in variants] + [""]
    by = _rows(results, archs[0])
    if "metrics" in parts and any(r["metrics"]["fid"]["n"] for r in rows):
        lines += [f"#### Distribution metrics vs the real images of {split_name(results)} "
                  f"(features: {results.get('features')})", "",
                  "FID-style Frechet distance / l2 of mean embeddings / MMD^2 (this project's: biased, RBF with "
                  "2h^2 = 2 x median squared distance) / MMD (the papers': square root of the unbiased MMD^2, "
                  "gamma = 1 / median squared distance), mean +- std over seeds; lower is closer. The two MMDs are "
                  "not comparable with each other. Small sets (IPC 1: 10 images) make FID strongly biased upward.", ""]
        lines += _set_table(results, by, ipcs, "FID / l2 / MMD^2 (ours) / MMD (paper)", _metrics)
    if "copies" in parts and any(((r.get("copies") or {}).get("pixels") or {}).get("nn_ratio_median", {}).get("n")
                                 for r in rows):
        lines += ["#### Copy detection vs the real training images", "",
                  "Per set: the fraction of images closer to a training image than any two training images are to "
                  "each other / the median distance to the nearest training image over the training set's own "
                  "median nearest-neighbour distance (leave-one-out); in pixels, then in features "
                  f"({results.get('features')}). A set of training images reads 1 / 0; new images drawn like the "
                  "data read about 0 / 1. Mean over seeds.", ""]
        lines += _set_table(results, by, ipcs, "pixels / features", _copies)
    return "\n".join(lines) + "\n"


def _set_table(results: dict, by: dict, ipcs: list[int], what: str, cell) -> list[str]:
    """One row per method, one column per IPC: ``cell(row)`` of each set that ran ("-" where none did)."""
    lines = ["| method | " + " | ".join(f"IPC {i}: {what}" for i in ipcs) + " |", "| --- |" + " --- |" * len(ipcs)]
    for m in _order(results):
        cells = [cell(r) if (r := by.get((m, i))) is not None else "-" for i in ipcs]
        lines.append(f"| {by_label(results, m)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _metrics(r: dict) -> str:
    mt = r["metrics"]
    if not mt["fid"]["n"]:
        return "-"
    return (f"{_cell(mt['fid'], 2)} / {_cell(mt['mean_l2'], 2)} / {_cell(mt['mmd2'], 4)} / "
            f"{_cell(mt.get('mmd_paper'), 4)}")


def _copies(r: dict) -> str:
    c = r.get("copies") or {}
    return " / ".join(_copy(c.get(space)) for space in ("pixels", "features"))


def _copy(stats: dict | None) -> str:
    if not stats or not stats["nn_ratio_median"]["n"]:
        return "-"
    frac = stats["frac_closer_than_any_train_pair"]["mean"]
    return f"{'n/a' if frac is None else f'{frac:.2f}'}, {stats['nn_ratio_median']['mean']:.2f}"


# The tables a document can ask for with <!-- results:NAME begin --> ... <!-- results:NAME end -->.
BLOCKS = {"headline": ("main", "variants"), "full": ("commands", "main", "ladder", "variants", "metrics", "copies")}


def blocks(results: dict) -> dict[str, str]:
    return {name: markdown(results, parts) for name, parts in BLOCKS.items()}


def _order(results: dict) -> list[str]:
    """Main methods, then the ladder's extra steps, then the variants."""
    return list(dict.fromkeys([*(results.get("main") or []), *(m for _, m in results.get("ladder") or []),
                               *(results.get("variants") or [])]))


def by_label(results: dict, method: str) -> str:
    if method in results.get("labels", {}):
        return results["labels"][method]
    for r in results["rows"]:
        if r["method"] == method:
            return r["label"]
    return method


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: a fixed bitmap font
        return ImageFont.load_default()


def bar_chart(results: dict, path: Path, arch: str | None = None) -> Path | None:
    """Grouped bars: one group per IPC, one bar per method (final-epoch top-1), error bars = std."""
    arch = arch or (results.get("archs") or [None])[0]
    by = _rows(results, arch)
    if not by:
        return None
    ipcs = sorted({i for _, i in by})
    methods = [m for m in _order(results) if any((m, i) in by for i in ipcs)]
    bar_w, gap, left, top, bottom, plot_h = 22, 30, 70, 60, 40, 360
    legend_h = 22 * len(methods) + 10
    width = left + len(ipcs) * (len(methods) * bar_w + gap) + gap + 20
    height = top + plot_h + bottom + legend_h
    img = Image.new("RGB", (max(width, 640), height), "white")
    draw = ImageDraw.Draw(img)
    f_tiny, f_small, f_title = _font(10), _font(12), _font(15)
    draw.text((left, 12), f"Top-1 on real test (%), final epoch, {arch}, {describe_labels(results.get('protocol'))}; "
              "error bar = std over seeds",
              fill="black", font=f_title)
    y0 = top + plot_h

    def ypos(v):
        return y0 - plot_h * v / 100

    for tick in range(0, 101, 20):
        y = ypos(tick)
        draw.line([(left, y), (img.width - 10, y)], fill=(225, 225, 225))
        draw.text((left - 30, y - 7), f"{tick}", fill="black", font=f_small)
    draw.line([(left, top), (left, y0)], fill="black")
    draw.line([(left, y0), (img.width - 10, y0)], fill="black")
    for gi, ipc in enumerate(ipcs):
        gx = left + gap + gi * (len(methods) * bar_w + gap)
        for mi, m in enumerate(methods):
            r = by.get((m, ipc))
            if r is None or r["final_top1"]["mean"] is None:
                continue
            mean, std = r["final_top1"]["mean"], r["final_top1"]["std"]
            x = gx + mi * bar_w
            draw.rectangle([x + 2, ypos(mean), x + bar_w - 2, y0], fill=PALETTE[mi % len(PALETTE)])
            cx = x + bar_w / 2
            draw.line([(cx, ypos(min(100, mean + std))), (cx, ypos(max(0, mean - std)))], fill="black", width=1)
            for yv in (min(100, mean + std), max(0, mean - std)):
                draw.line([(cx - 4, ypos(yv)), (cx + 4, ypos(yv))], fill="black")
            draw.text((x + 2, ypos(min(100, mean + std)) - 14), f"{mean:.0f}", fill="black", font=f_tiny)
        draw.text((gx + len(methods) * bar_w / 2 - 18, y0 + 8), f"IPC {ipc}", fill="black", font=f_small)
    ly = y0 + bottom
    for mi, m in enumerate(methods):
        draw.rectangle([left, ly + 22 * mi, left + 14, ly + 22 * mi + 14], fill=PALETTE[mi % len(PALETTE)])
        draw.text((left + 22, ly + 22 * mi), by_label(results, m), fill="black", font=f_small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def sample_grid(set_dir: Path, path: Path) -> Path | None:
    """One row per class, every image of the set (demo's contact sheet, 3x, pixel-exact)."""
    root = set_dir / "train"
    if not root.is_dir():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return folder_contact_sheet(root, path)
