"""A built-in prior's ``distill_defaults.yaml``, written from the ladder's val choice, one section per tuned IPC.

    ipc10:
      guidance: mode            # the mode of the best method on val at this IPC: a run naming none gets it
      mode:                     # per guidance mode: every setting of that mode's best method on val
        cluster: {method: kmeans}
        sampler: {guidance_scale: 0.3, t_stop: 0, trust_region: 1.0}
      manifold: ...

``manifoldgd distill`` reads the section of the nearest tuned IPC (``pipeline.distill.run.tuned_section``).
Each IPC's section is written on its own (``ladder choose --ipc N --write-defaults``); the others are kept.
"""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import parse_set
from pipeline.eval.methods import METHODS

HEADER = """\
# Settings tuned for this prior, applied by `manifoldgd distill` when it uses a built-in prior, between the
# published defaults and anything the user gives (--config, flags and --set win). One section per tuned IPC
# (a run uses the nearest): `guidance` is the mode of the best method on val there, the mode a run that names
# none gets; below it, per sampler.guidance mode, every setting of that mode's best method on val. Written by
# `python -m pipeline.eval.ladder choose --ipc N --write-defaults` (docs/ladder.md).
"""
SECTION = re.compile(r"^ipc(\d+):", re.MULTILINE)


def best_of_mode(result: dict) -> dict[str, tuple[str, dict]]:
    """Per guidance mode, the method of that mode with the best val mean and its chosen setting (ties: the
    method listed first)."""
    best: dict[str, tuple[str, dict]] = {}
    for base, ch in result["chosen"].items():
        mode = METHODS[base].guidance
        if mode not in best or ch["all"]["mean"] > best[mode][1]["all"]["mean"]:
            best[mode] = (base, ch)
    return best


def section(result: dict, results_path: str) -> str:
    """The ``ipc<N>:`` section for the ladder's choice at one IPC (``results_path`` names where it came from)."""
    ipc = result["protocol"]["ipc"]
    best = best_of_mode(result)
    winner = max(best.values(), key=lambda bc: bc[1]["all"]["mean"])
    lines = [f"ipc{ipc}:  # the val choice in {results_path}",
             f"  guidance: {METHODS[winner[0]].guidance}  # {winner[0]} won on val"]
    for mode in sorted(best):
        base, ch = best[mode]
        method = METHODS[base]
        fields = parse_set([*([f"cluster.method={method.cluster}"] if method.cluster else []), *method.sets,
                            *(f"{k}={v}" for k, v in sorted(ch["settings"].items()))])
        lines.append(f"  {mode}:  # {base}: {ch['variant']}, val top-1 {ch['all']['mean']:.2f} +- "
                     f"{ch['all']['std']:.2f} over {ch['all']['n']} seeds")
        for group, values in fields.items():
            lines.append(f"    {group}:")
            lines += [f"      {f}: {v}" for f, v in values.items()]
    return "\n".join(lines) + "\n"


def sections(text: str) -> dict[int, str]:
    """The ``ipc<N>:`` sections of a defaults file's text, by IPC (anything before the first is dropped)."""
    starts = [(m.start(), int(m.group(1))) for m in SECTION.finditer(text)]
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return {ipc: text[start:end].rstrip("\n") + "\n" for (start, ipc), end in zip(starts, ends)}


def compose(by_ipc: dict[int, str]) -> str:
    return HEADER + "".join(by_ipc[ipc] for ipc in sorted(by_ipc))


def write_section(path: Path, result: dict, results_path: str) -> None:
    """Replace (or add) the section of ``result``'s IPC in the file at ``path``, keeping the other IPCs'."""
    kept = sections(path.read_text()) if path.exists() else {}
    kept[result["protocol"]["ipc"]] = section(result, results_path)
    path.write_text(compose(kept))
