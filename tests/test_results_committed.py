"""The committed results: README's and docs/evaluation.md's tables are what the committed files give, the
earlier one-seed sweep on val is what the code draws, and no test-split record chose anything."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from pipeline.cli import main
from pipeline.eval import tune
from pipeline.eval.benchmark import parse_seeds
from pipeline.eval.results import read_blocks, read_records

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "results" / "mnist10k.jsonl"
TUNING = ROOT / "docs" / "results" / "mnist10k_tuning.json"
# The command README.md and docs/evaluation.md print beside their tables (checked below to be there).
REPORT = ("manifoldgd benchmark --data mnist10k --test mnist10k:test --ipc 1,10 --seeds 3 --methods main "
          "--profile fast --student width=32 --student hflip=false --report-only "
          "--results-file docs/results/mnist10k.jsonl --out runs/report_mnist10k --into README.md --into docs/evaluation.md")


def _flat(text: str) -> str:
    return " ".join(text.replace("\\\n", " ").split())


def test_readme_and_evaluation_tables_regenerate_from_the_committed_results(tmp_path, monkeypatch):
    for doc in ("README.md", "docs/evaluation.md"):
        assert _flat(REPORT) in _flat((ROOT / doc).read_text()), f"{doc} must show the command that made its tables"
    argv = shlex.split(REPORT)[1:]
    copies = {}
    for doc in ("README.md", "docs/evaluation.md"):
        copies[doc] = tmp_path / doc.replace("/", "_")
        shutil.copy(ROOT / doc, copies[doc])
        argv[argv.index(doc)] = str(copies[doc])
    argv[argv.index("runs/report_mnist10k")] = str(tmp_path / "report")
    monkeypatch.chdir(ROOT)  # the results file is named relative to the repo, as in the docs
    assert main(argv) == 0
    assert "headline" in read_blocks(ROOT / "README.md") and "full" in read_blocks(ROOT / "docs" / "evaluation.md")
    for doc, copy in copies.items():
        committed, regenerated = read_blocks(ROOT / doc), read_blocks(copy)
        assert committed and committed == regenerated, doc
    # the numbers in README's table exist in the file: one record per (method, IPC, seed)
    records = read_records(TABLE)
    assert {(r["method"], r["ipc"], r["seed"]) for r in records} >= {(m, i, s) for m in ("mgd3", "manifoldgd")
                                                                      for i in (1, 10) for s in range(3)}


def test_no_test_record_chose_anything_in_the_tuning_sweep():
    result = json.loads(TUNING.read_text())
    proto = result["protocol"]
    assert proto["test"] == "mnist10k:val"
    records = read_records(TABLE)
    assert {r["test"] for r in records} == {"mnist10k:test"}
    assert not set(parse_seeds(proto["seeds"])) & {r["seed"] for r in records}  # tuning seeds are not table seeds
    # the sweep is what the code draws today, with the same budget for both methods
    table = tune.variants(proto["budget"], proto["seed"])
    for rows in result["settings"].values():
        assert len(rows) == proto["budget"]
        assert all(r["settings"] == table[r["variant"]][1] for r in rows)
    # and docs/evaluation.md's sweep table is the file's
    assert read_blocks(ROOT / "docs" / "evaluation.md")["tuning"] == tune.tuning_markdown(result).rstrip("\n") + "\n"
