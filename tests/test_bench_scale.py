"""bench/scale.py stays runnable against the pipeline as it is: its --smoke path runs the real distill driver on
3 classes, with stages 2 and 3 overlapped and with stage 2 as a barrier, and reads what the stages return
(one plan result per class, one result per work unit)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_rehearsal_runs_both_variants(tmp_path, ray_session, capsys):
    results = load_script(ROOT / "bench" / "scale.py", "scale_bench").main(["--smoke", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    by_variant = {r["variant"]: r for r in results}
    assert set(by_variant) == {"overlap", "barrier"}
    for r in results:
        # 3 classes x IPC 2 = 6 samples, cut into cross-class units of max_batch 4: 2 units, one plan per class
        assert r["images"] == 6 and r["units"] == 2 and len(r["unit_seconds"]) == 2
        assert len(r["plan_seconds_by_class"]) == 3 and r["plan_work_per_class_s"] > 0
        assert r["plan_and_sample_s"] > 0
    overlap, barrier = by_variant["overlap"], by_variant["barrier"]
    assert barrier["latents_shared"] and barrier["plan_sample_overlap_s"] == 0
    assert barrier["plan_and_sample_s"] >= barrier["plan_s"] + barrier["sample_s"] - 1e-6
    assert overlap["plan_and_sample_s"] >= overlap["plan_s"] + overlap["sample_s"] - overlap["plan_sample_overlap_s"] - 1e-6
    assert "barrier / overlap =" in out and "| plan + sample: barrier / overlap |" in out
    # The overlap changes when a unit runs, never what it writes.
    digests = [pq.read_table(tmp_path / f"out_3_{v}" / "manifest.parquet", columns=["path", "sha256"]).sort_by("path")
               for v in ("overlap", "barrier")]
    assert digests[0].equals(digests[1])
    assert json.loads((tmp_path / "results" / "scale_3_barrier.json").read_text())["variant"] == "barrier"
