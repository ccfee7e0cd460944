"""The committed ladder results: the val sweep's file is what the code draws and what docs/ladder.md shows;
the test records score exactly the val winners, on seeds the sweep never used; the tables regenerate."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.eval import ladder
from pipeline.eval.benchmark_options import parse_seeds
from pipeline.eval.methods import METHODS
from pipeline.eval.results import read_blocks, read_records

ROOT = Path(__file__).resolve().parents[1]
VALS = sorted((ROOT / "docs" / "results").glob("mnist10k_ladder_ipc*.json"))
TEST = ROOT / "docs" / "results" / "mnist10k_ladder.jsonl"


@pytest.mark.parametrize("path", VALS, ids=lambda p: p.name)
def test_the_val_sweep_is_what_the_code_draws_and_what_the_doc_shows(path):
    result = json.loads(path.read_text())
    proto = result["protocol"]
    assert path.name == f"mnist10k_ladder_ipc{proto['ipc']}.json"
    assert proto["test"] == "mnist10k:val"
    for base, rows in result["settings"].items():
        drawn = ladder.variants(proto["budget"], proto["seed"], [base])
        assert {r["variant"]: r["settings"] for r in rows} == {n: s for n, (_, s) in drawn.items()}, base
        seeds = {str(s) for s in parse_seeds(proto["screen"]) + parse_seeds(proto["confirm"])}
        for r in rows:  # only tuning seeds; a shortlisted setting was screened on every screening seed
            assert set(r["per_seed"]) <= seeds, (base, r["variant"])
            assert not r["shortlisted"] or r["screen"]["n"] == len(parse_seeds(proto["screen"]))
    for chosen in result["chosen"].values():  # a winner was confirmed on every seed
        assert chosen["all"]["n"] == len(parse_seeds(proto["screen"]) + parse_seeds(proto["confirm"]))
    assert read_blocks(ROOT / "docs" / "ladder.md")[f"ladder_ipc{proto['ipc']}"].strip() == \
        ladder.ladder_markdown(result).strip()


def test_the_test_records_score_the_val_winners_once_on_other_seeds():
    records = read_records(TEST)
    assert records and {r["test"] for r in records} == {"mnist10k:test"}
    vals = {json.loads(p.read_text())["protocol"]["ipc"]: json.loads(p.read_text()) for p in VALS}
    assert {r["ipc"] for r in records} <= set(vals)  # no IPC scored on test without its val sweep
    for ipc, result in vals.items():
        proto = result["protocol"]
        tuning = set(parse_seeds(proto["screen"]) + parse_seeds(proto["confirm"]))
        scored = [r for r in records if r["ipc"] == ipc]
        assert not tuning & {r["seed"] for r in scored}
        assert all(r["seed"] in parse_seeds(ladder.SCORE_SEEDS) for r in scored)
        winners = ladder.winners_table(result)
        for r in scored:
            assert r["method"] in winners, f"{r['method']} was not chosen on val at IPC {ipc}"
            base, settings = winners[r["method"]]
            assert r["sets"] == [*METHODS[base].sets, *(f"{k}={v}" for k, v in settings.items())]
    text = ladder.test_table(records).strip()
    for doc in ("README.md", "docs/ladder.md"):
        assert read_blocks(ROOT / doc)["ladder_test"].strip() == text, doc


def test_the_shipped_defaults_are_the_val_winners_at_every_tuned_ipc():
    """pipeline/priors/mnist10k/distill_defaults.yaml is what `choose --write-defaults` writes from the committed
    val sweeps, one section per IPC, and a run of the prior at each IPC gets its winner's mode and settings."""
    from pipeline.distill.run import resolve_distill_config
    from pipeline.eval import defaults_file

    shipped = ROOT / "pipeline" / "priors" / "mnist10k" / "distill_defaults.yaml"
    vals = {json.loads(p.read_text())["protocol"]["ipc"]: (p, json.loads(p.read_text())) for p in VALS}
    expected = {ipc: defaults_file.section(result, str(p.relative_to(ROOT))) for ipc, (p, result) in vals.items()}
    assert shipped.read_text() == defaults_file.compose(expected)
    for ipc, (_, result) in vals.items():
        best = max(result["chosen"].items(), key=lambda bc: bc[1]["all"]["mean"])
        cfg = resolve_distill_config(data="mnist10k", ipc=ipc)
        assert cfg.sampler.guidance == METHODS[best[0]].guidance
        assert cfg.cluster.method == (METHODS[best[0]].cluster or "divisive")
        for key, value in best[1]["settings"].items():
            group, field = key.split(".")
            assert getattr(getattr(cfg, group), field) == value, (ipc, key)
