"""pipeline/eval/ladder.py: equal budgets, the screen -> confirm -> choose selection on val, the tables."""
import json

import pytest

from pipeline.eval import ladder
from pipeline.eval.cells import save_cell
from pipeline.eval.methods import METHODS, parse_variants


def test_every_method_gets_the_same_budget_and_names_every_knob_its_defaults_could_change():
    table = ladder.variants(4, 0)
    per: dict[str, list[dict]] = {}
    for base, settings in table.values():
        per.setdefault(base, []).append(settings)
    assert set(per) == set(ladder.SPACES) and {len(s) for s in per.values()} == {4}
    assert {b for b, _ in (*ladder.RUNGS, *ladder.OPTIONS)} == set(ladder.SPACES)
    for base, settings in per.items():
        assert settings[0] == ladder.expand(ladder.SPACES[base].published)
        assert len({json.dumps(s, sort_keys=True) for s in settings}) == 4
        assert all(set(s) == set(settings[0]) for s in settings)
        assert METHODS[base].kind == "distill"
    # every method (or its setting) names what the shipped prior's tuned defaults set at any tuned IPC, so no
    # score depends on that file
    from pipeline.distill.run import prior_defaults
    for base, settings in per.items():
        for ipc in (1, 10):
            tuned = prior_defaults("mnist10k", METHODS[base].guidance, ipc)
            tuned_keys = {f"{sec}.{k}" for sec, fields in tuned.items() if sec != "cluster" for k in fields}
            named = set(settings[0]) | {item.partition("=")[0] for item in METHODS[base].sets}
            assert tuned_keys <= named, (base, ipc, tuned_keys - named)
    # every variant parses as a benchmark variant of its method
    args = ladder.variant_args(table)
    variants = parse_variants([args[i + 1] for i in range(0, len(args), 2)])
    assert set(variants) == set(table)
    assert ladder.variants(4, 0) == table and ladder.variants(4, 1) != table


def test_fewer_draws_than_values_still_draws_distinct_values():
    dit = [s["sampler.cfg_scale"] for b, s in ladder.variants(4, 0, ["dit"]).values()]
    assert dit[0] == 4.0 and len(set(dit)) == 4 and set(dit[1:]) < set(ladder.SPACES["dit"].grid["sampler.cfg_scale"])


def _cells(tmp_path, scores: dict[str, dict[int, float]], ipc=10):
    for name, per_seed in scores.items():
        for seed, top1 in per_seed.items():
            save_cell(tmp_path, {"method": name, "ipc": ipc, "seed": seed, "arch": "convnet", "eval_key": "k",
                                 "student": {"final_top1": top1, "best_top1": top1, "seconds": 1.0}})


def test_the_shortlist_is_the_top_of_the_screen_and_the_winner_the_best_over_all_seeds(tmp_path):
    table = ladder.variants(4, 0, ["mgd3"])
    screen, confirm = [10, 11], [12, 13, 14]
    # screening: t02 best, then t00, then t03; t01 is out. Confirming reverses t02 and t00.
    _cells(tmp_path, {"mgd3_t00": {10: 0.80, 11: 0.82}, "mgd3_t01": {10: 0.60, 11: 0.61},
                      "mgd3_t02": {10: 0.85, 11: 0.84}, "mgd3_t03": {10: 0.70, 11: 0.75}})
    assert ladder.shortlist(tmp_path, table, 10, screen, 3) == {"mgd3": ["mgd3_t02", "mgd3_t00", "mgd3_t03"]}
    assert "mgd3" not in ladder.choose(tmp_path, table, 10, screen, confirm, 3)["chosen"]  # not confirmed yet
    _cells(tmp_path, {"mgd3_t00": {12: 0.90, 13: 0.90, 14: 0.90}, "mgd3_t02": {12: 0.80, 13: 0.80, 14: 0.80},
                      "mgd3_t03": {12: 0.95, 13: 0.95, 14: 0.60}})
    result = ladder.choose(tmp_path, table, 10, screen, confirm, 3)
    chosen = result["chosen"]["mgd3"]
    assert chosen["variant"] == "mgd3_t00"  # (0.80 + 0.82 + 3 x 0.90) / 5 = 86.4 beats t02 (81.8) and t03 (80.0)
    assert chosen["all"]["n"] == 5 and abs(chosen["all"]["mean"] - 86.4) < 1e-9
    rows = {r["variant"]: r for r in result["settings"]["mgd3"]}
    assert not rows["mgd3_t01"]["shortlisted"] and rows["mgd3_t01"]["all"] is None
    # a missing screening cell leaves the method without a shortlist
    (tmp_path / "cells" / "mgd3_t01" / "ipc10_seed11_convnet.json").unlink()
    assert ladder.shortlist(tmp_path, table, 10, screen, 3) == {}


def test_tables_and_the_test_run_come_from_the_results_alone(tmp_path):
    table = ladder.variants(4, 0, ["mgd3", "repel"])
    scores = {n: {s: 0.5 + 0.01 * i + 0.001 * s for s in range(10, 15)} for i, n in enumerate(table)}
    _cells(tmp_path, scores)
    opts = ladder.LadderOptions("choose", out=str(tmp_path), methods="mgd3,repel")
    result = ladder.choose(tmp_path, table, 10, [10, 11], [12, 13, 14], 3)
    result.update({"protocol": opts.protocol(), "student": "s", "command": "c"})
    assert result["chosen"]["mgd3"]["variant"] == "mgd3_t03" and result["chosen"]["repel"]["variant"] == "rep_t03"
    md = ladder.ladder_markdown(result)
    assert "| **mgd3_t03, chosen** |" in md and "MGD3 + within-class repulsion" in md
    assert md.index("mgd3_t03") < md.index("mgd3_t00")  # best first
    winners = ladder.winners_table(result)
    assert set(winners) == {"mgd3_val", "repel_val"} and winners["mgd3_val"][1] == table["mgd3_t03"][1]


def test_unknown_methods_are_one_clear_error(capsys):
    assert ladder.main(["run", "--methods", "mgd3,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ladder.parse_options(["run", "--stage", "sometimes"])


def test_the_defaults_file_holds_each_modes_val_winner_and_the_overall_winners_mode(monkeypatch, tmp_path):
    import yaml

    from pipeline.distill import run as run_module
    from pipeline.distill.run import resolve_distill_config
    from pipeline.eval import defaults_file

    table = ladder.variants(4, 0, ["dit", "mgd3", "repel", "manifoldgd", "trust"])

    def chosen(variant, mean):
        return {"variant": variant, "settings": table[variant][1], "all": {"mean": mean, "std": 0.5, "n": 5},
                "screen": {"mean": mean, "std": 0.5, "n": 2}}

    ten = {"protocol": {"ipc": 10}, "chosen": {"dit": chosen("dit_t01", 80.0), "mgd3": chosen("mgd3_t02", 90.0),
                                              "repel": chosen("rep_t03", 91.0), "manifoldgd": chosen("mgd_t00", 88.0)}}
    one = {"protocol": {"ipc": 1}, "chosen": {"mgd3": chosen("mgd3_t01", 70.0), "trust": chosen("tru_t02", 75.0),
                                             "manifoldgd": chosen("mgd_t03", 76.0)}}
    path = tmp_path / "distill_defaults.yaml"
    defaults_file.write_section(path, ten, "r10.json")
    first = path.read_text()
    defaults_file.write_section(path, one, "r1.json")
    defaults_file.write_section(path, one, "r1.json")  # rewriting a section replaces it
    parsed = yaml.safe_load(path.read_text())
    assert set(parsed) == {"ipc1", "ipc10"} and path.read_text().count("ipc1:") == 1
    assert defaults_file.sections(path.read_text())[10] == defaults_file.sections(first)[10]  # IPC 10 kept as is
    p10, p1 = parsed["ipc10"], parsed["ipc1"]
    assert p10["guidance"] == "mode" and p1["guidance"] == "manifold"  # repel won at 10, ManifoldGD at 1
    assert p10["mode"]["sampler"]["repulsion"] == table["rep_t03"][1]["sampler.repulsion"]  # repel beat mgd3
    assert p1["mode"]["sampler"]["trust_region"] == table["tru_t02"][1]["sampler.trust_region"] > 0
    assert p10["mode"]["cluster"]["method"] == "kmeans" and p10["manifold"]["cluster"]["method"] == "divisive"
    assert p10["none"]["sampler"]["cfg_scale"] == table["dit_t01"][1]["sampler.cfg_scale"] and "none" not in p1
    real = run_module.load_yaml
    monkeypatch.setattr(run_module, "load_yaml",
                        lambda p: parsed if str(p).endswith("distill_defaults.yaml") else real(p))
    cfg = resolve_distill_config(data="mnist10k", ipc=10)  # a run that names no guidance gets the winner
    assert cfg.sampler.guidance == "mode" and cfg.cluster.method == "kmeans"
    assert cfg.sampler.repulsion == table["rep_t03"][1]["sampler.repulsion"]
    assert cfg.sampler.guidance_scale == table["rep_t03"][1]["sampler.guidance_scale"]
    cfg1 = resolve_distill_config(data="mnist10k", ipc=1)
    assert cfg1.sampler.guidance == "manifold" and cfg1.tangent.dim == table["mgd_t03"][1]["tangent.dim"]

def test_the_test_table_is_made_from_the_records_alone(tmp_path):
    from pipeline.eval.results import record, write_records

    winners = ladder.winners_table({"chosen": {"mgd3": {"settings": {"sampler.guidance_scale": 0.2}},
                                               "repel": {"settings": {"sampler.repulsion": 0.3}}}})
    variants = parse_variants([f"{n}={b}:" + ",".join(f"{k}={v}" for k, v in s.items()) for n, (b, s) in winners.items()])
    records = []
    for name, base_top1 in (("mgd3_val", 0.90), ("repel_val", 0.92)):
        for seed in range(5):
            cell = {"method": name, "ipc": 10, "seed": seed, "arch": "convnet", "eval_key": "k", "command": "cmd",
                    "student": {"final_top1": base_top1 + 0.002 * seed, "best_top1": 0.95, "seconds": 1.0}}
            records.append(record(cell, variants[name], "mnist10k:test", "a recipe"))
    path = write_records(tmp_path / "r.jsonl", records)
    doc = tmp_path / "doc.md"
    doc.write_text("x\n<!-- results:ladder_test begin -->\nold\n<!-- results:ladder_test end -->\n")
    assert ladder.main(["table", "--records", str(path), "--into", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and "mnist10k:test" in text
    assert "**90.4 +- 0.3** [95.0 +- 0.0] (n=5)" in text and "**92.4 +- 0.3** [95.0 +- 0.0] (n=5)" in text
    assert text.index("MGD3 (mode + k-means)") < text.index("within-class repulsion")  # the ladder's order


def test_the_sheet_shows_each_winners_set_with_its_flagged_samples_framed(tmp_path):
    import numpy as np
    from PIL import Image

    result = {"protocol": {**ladder.DEFAULTS}, "chosen": {
        "mgd3": {"variant": "mgd3_t01", "all": {"mean": 90.0}}, "repel": {"variant": "rep_t02", "all": {"mean": 91.0}},
        "trust": {"variant": "tru_t00", "all": {"mean": 92.0}}}}  # trust has no set on disk: left out
    for variant, flagged in (("mgd3_t01", ["train/b/b_0001.png"]), ("rep_t02", [])):
        run = tmp_path / "distill" / variant / "ipc10_seed10"
        for cls in ("a", "b"):
            (run / "train" / cls).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(run / "train" / cls / f"{cls}_{k:04d}.png")
        (run / "run.json").write_text(json.dumps({"health": {"flagged_images": flagged}}))
    picture = np.asarray(Image.open(ladder.sheet(tmp_path, result, tmp_path / "s.png")).convert("RGB"))
    red = (picture[..., 0] > 200) & (picture[..., 1] < 80)
    columns = np.flatnonzero(red.any(0))
    assert red.any() and columns.max() < picture.shape[1] // 2  # the one flagged sample, in the first panel
    assert picture.shape[1] > 2 * 4 * 2  # two panels side by side
    with pytest.raises(ValueError, match="no chosen method"):
        ladder.sheet(tmp_path / "empty", result, tmp_path / "t.png")
