"""Students, feature extractors, `manifoldgd evaluate` and `manifoldgd benchmark` (tiny models, 2 classes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.eval import students
from pipeline.eval.students import (
    StudentRecipe,
    build_model,
    colour_jitter,
    cutmix,
    fit,
    paper_epochs,
    random_resized_crop,
    recipe_for,
)


# ------------------------------------------------------------------------------------------ students
@pytest.mark.parametrize("arch", ["convnet", "convnet-2", "resnetap10", "resnet18"])
@pytest.mark.parametrize("size", [16, 96])
def test_architectures_shapes_and_instance_norm(arch, size):
    model = build_model(arch, 7, 3, size, width=8)
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 7)
    assert model.embed(x).shape[0] == 2
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels for m in norms)


def test_resnetap_downsamples_by_pooling_resnet18_by_stride():
    ap, r18 = build_model("resnetap10", 10, 3, 32, width=8), build_model("resnet18", 10, 3, 32, width=8)
    strided = lambda m: [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.stride != (1, 1)]  # noqa: E731
    assert not strided(ap) and any(isinstance(c, nn.AvgPool2d) for c in ap.modules())
    assert len(strided(r18)) == 6  # 3 stages x (main conv + shortcut)
    blocks = lambda m: sum(isinstance(c, students.BasicBlock) for c in m.modules())  # noqa: E731
    assert blocks(ap) == 4 and blocks(r18) == 8


def test_convnet_depth_follows_image_size():
    assert students.convnet_depth(32) == 3 and students.convnet_depth(256) == 6
    assert sum(isinstance(m, nn.Conv2d) for m in build_model("convnet", 10, 3, 128).modules()) == 5
    with pytest.raises(ValueError):
        build_model("vgg11", 10)


def test_recipes():
    assert [paper_epochs(i) for i in (1, 10, 11, 50, 51, 200)] == [2000, 2000, 1500, 1500, 1000, 1000]
    paper = recipe_for("paper", 10, 100)
    assert (paper.epochs, paper.cutmix_prob, paper.cutmix_beta, paper.crop_scale, paper.jitter, paper.hflip) == \
        (2000, 1.0, 1.0, 0.5, 0.4, True)
    fast = recipe_for("fast", 10, 100, fast_steps=300)
    steps_per_epoch = 2  # 100 images, batch 64
    assert fast.epochs * steps_per_epoch >= 300 > (fast.epochs - 1) * steps_per_epoch
    assert recipe_for("fast", 1, 10, fast_steps=10**6).epochs == 2000  # never beyond the published epochs
    assert recipe_for("paper", 50, 500, arch="resnet18", hflip=False).hflip is False
    with pytest.raises(ValueError):
        recipe_for("paper", 10, 100, no_such_knob=1)
    with pytest.raises(ValueError):
        recipe_for("slow", 10, 100)


def test_full_crop_is_identity_and_jitter_zero_is_identity():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    same = random_resized_crop(x, 1.0, gen, ratio=(1.0, 1.0))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(colour_jitter(x, 0.0, gen), x, atol=1e-6, rtol=0)
    crop = random_resized_crop(x, 0.5, gen)
    assert crop.shape == x.shape and not torch.allclose(crop, x)


def test_cutmix_label_weight_is_the_kept_area():
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    x = torch.arange(8, dtype=torch.float32)[:, None, None, None].expand(8, 3, 16, 16).clone()
    y = torch.arange(8)
    for _ in range(20):
        mixed, ya, yb, lam = cutmix(x, y, 1.0, rng, gen)
        kept = (mixed[:, 0] == x[:, 0]).float().mean(dim=(1, 2))
        moved = yb != ya
        torch.testing.assert_close(kept[moved], torch.full_like(kept[moved], lam))
        assert torch.equal(ya, y)


def test_fit_learns_a_separable_task_and_reports_final_and_best():
    rng = np.random.default_rng(0)
    images = np.zeros((20, 16, 16, 3), np.uint8)
    labels = np.arange(20) % 2
    images[labels == 0, ..., 0] = 220
    images[labels == 1, ..., 2] = 220
    images = np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    recipe = StudentRecipe(epochs=15, width=8, lr=0.05, eval_points=3, cutmix_prob=1.0, jitter=0.2)
    res = fit(images, labels, 2, recipe, seed=0, test=(images[::-1], labels[::-1]))
    assert [e for e, _ in res.curve] == [5, 10, 15]
    assert res.final_top1 == res.curve[-1][1] == 1.0
    assert res.best_top1 >= res.final_top1
    again = fit(images, labels, 2, recipe, seed=0, test=(images[::-1], labels[::-1]))
    assert again.curve == res.curve  # seeded: the same run twice


# ------------------------------------------------------------------------------------------ features
def test_shipped_mnist10k_features_are_named_and_separate_classes():
    from pipeline.common.images import crop_images
    from pipeline.eval.features import load_extractor
    from pipeline.inputs.datasets import load_builtin

    ex = load_extractor("mnist10k")
    assert "mnist10k train split" in ex.name and "%" in ex.name
    x, y, _ = load_builtin("mnist10k", "test")
    x, y = crop_images(x[::10], 32), y[::10]
    f = ex(x)
    assert f.shape == (len(x), 1024) and np.isfinite(f).all()
    # nearest class mean in feature space: a feature that ignores the digit would sit near 10%
    means = np.stack([f[y == c].mean(0) for c in range(10)])
    pred = ((f[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == y).mean() > 0.85


def test_missing_weights_fail_clearly(tmp_path, monkeypatch):
    from pipeline.eval import features

    monkeypatch.setattr(features, "HUB_CHECKPOINTS", tmp_path)
    monkeypatch.delenv("MANIFOLDGD_INCEPTION", raising=False)
    for spec, filename in (("inception-v3", features.INCEPTION_FILE), ("resnet18", features.RESNET18_FILE)):
        with pytest.raises(features.FeatureLoadError, match=filename):
            features.load_extractor(spec)
    with pytest.raises(features.FeatureLoadError, match="unknown"):
        features.load_extractor("vgg")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(features.FeatureLoadError, match="cannot load"):
        features.load_extractor(f"resnet18:{bad}")


def test_resnet18_loads_a_torchvision_layout_state_dict(tmp_path):
    from pipeline.eval.features import load_extractor
    from pipeline.eval.students import ResNet

    ref = ResNet((2, 2, 2, 2), 1000, 64, 3, 224, norm="batch").eval()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    ex = load_extractor(f"resnet18:{path}")
    images = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
    f = ex(images)
    assert f.shape == (2, 512) and "resnet18" in ex.name
    assert {"conv1.weight", "layer4.1.bn2.running_var", "fc.weight"} <= set(ref.state_dict())  # torchvision names


class _TinyInception(nn.Module):
    def forward(self, x, return_features: bool = False):
        return x.float().mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit: the reference Inception is TorchScript
def test_inception_torchscript_path(tmp_path):
    from pipeline.eval.features import load_extractor

    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    ex = load_extractor(f"inception-v3:{path}")
    images = np.full((3, 10, 10, 3), 7, np.uint8)
    np.testing.assert_allclose(ex(images), 7.0)


# ---------------------------------------------------------------------------------------- evaluate
def _folders(tmp_path: Path):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "distilled", {"a": 3, "b": 3}, size=16, seed=0)
    write_image_folder(tmp_path / "real", {"a": 5, "b": 5, "c": 2}, size=16, seed=1)
    return tmp_path / "distilled", tmp_path / "real"


def test_evaluate_command_writes_mean_and_std_over_seeds(tmp_path, ray_session):
    from pipeline.cli import main

    distilled, real = _folders(tmp_path)
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--distilled", str(distilled), "--test", str(real / "train"), "--seeds", "2",
                 "--profile", "fast", "--fast-steps", "3", "--student", "width=8", "--arch", "convnet,resnetap10",
                 "--features", "mnist10k", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["n_distilled"] == 6 and report["n_test"] == 10  # class c of the test folder is not distilled
    for arch in ("convnet", "resnetap10"):
        r = report["results"][arch]
        finals = np.array([s["final_top1"] for s in r["seeds"]]) * 100
        assert [s["seed"] for s in r["seeds"]] == [0, 1]
        assert r["final_top1"]["mean"] == pytest.approx(finals.mean(), abs=0.01)
        assert r["final_top1"]["std"] == pytest.approx(finals.std(), abs=0.01)
        assert all(s["best_top1"] >= s["final_top1"] for s in r["seeds"])
    assert "mnist10k train split" in report["metrics"]["features"] and report["metrics"]["fid"] >= 0
    m = report["metrics"]  # both MMDs, under distinct keys: the paper's kernel has twice the gamma
    assert m["mmd2"] >= 0 and m["mmd_paper"] >= 0 and m["mmd_paper_gamma"] > 0
    assert m["mmd_paper_gamma"] == pytest.approx(1 / (2 * m["mmd_bandwidth"] ** 2) * 2, rel=1e-4)


def test_evaluate_rejects_a_test_set_without_the_classes(tmp_path):
    from conftest import write_image_folder

    from pipeline.cli import main

    distilled, _ = _folders(tmp_path)
    write_image_folder(tmp_path / "other", {"x": 2}, size=16)
    assert main(["evaluate", "--distilled", str(distilled), "--test", str(tmp_path / "other")]) == 2
    assert main(["evaluate", "--distilled", str(tmp_path / "nowhere"), "--test", "mnist10k"]) == 2


# --------------------------------------------------------------------------------------- benchmark
def test_parse_methods_and_variants():
    from pipeline.eval.methods import METHODS, parse_methods, parse_variants

    assert parse_methods("random,kmeans_real") == ["random", "kmeans_real", "mgd3"]
    assert parse_methods("ladder") == ["mgd3", "divisive", "levelwise", "manifold", "manifoldgd"]
    with pytest.raises(ValueError):
        parse_methods("nope")
    variants = parse_variants(["lam03=manifold:sampler.guidance_scale=0.3,tangent.dim=8"])
    v = variants["lam03"]
    assert (v.guidance, v.cluster) == ("manifold", "divisive")
    assert v.sets == (*METHODS["manifold"].sets, "sampler.guidance_scale=0.3", "tangent.dim=8")
    assert "tangent.max_multiplier=1" in v.sets
    assert parse_methods("dit", {**METHODS, **variants}) == ["dit", "lam03"]
    for bad in ("x=random:a=1", "x=nothing:a=1", "dit=mgd3:a=1", "x=mgd3"):
        with pytest.raises(ValueError):
            parse_variants([bad])


def test_benchmark_distill_config_is_what_the_distill_command_line_resolves(tmp_path):
    """The benchmark builds each run's config directly (no argv): it must be the config, and so the hash,
    folder and bytes, of `manifoldgd distill` with the same flags, for the shipped prior and for a hub id."""
    from pipeline.cli import build_parser
    from pipeline.distill.run import resolve_config
    from pipeline.eval.benchmark import distill_config
    from pipeline.eval.benchmark_options import BenchmarkOptions
    from pipeline.eval.methods import METHODS, parse_variants

    table = {**METHODS, **parse_variants(["lam03=manifold:sampler.guidance_scale=0.3"])}
    for data, model, vae in (("mnist10k", None, None), (str(tmp_path / "folder"), "facebook/DiT-XL-2-256", "")):
        args = BenchmarkOptions(data=data, model=model, vae=vae, set=("sampler.num_steps=3", "tangent.dim=16"))
        for name in ("dit", "mgd3", "divisive", "manifold", "manifoldgd", "lam03"):
            m, out = table[name], tmp_path / name
            argv = ["distill", "--data", data, "--out", str(out), "--ipc", "10", "--seed", "2",
                    "--guidance", m.guidance, "--cluster", m.cluster]
            argv += (["--model", model] if model is not None else []) + (["--vae", vae] if vae is not None else [])
            for s in [*args.set, *m.sets]:
                argv += ["--set", s]
            expected = resolve_config(build_parser(["distill"]).parse_args(argv))
            got = distill_config(args, m, 10, 2, out)
            assert got.to_dict() == expected.to_dict() and got.config_hash() == expected.config_hash(), name
    assert distill_config(args, table["manifold"], 1, 0, tmp_path).tangent.max_multiplier == 1  # the method's own


def test_random_real_set_is_the_demos_subset():
    """`benchmark`'s random real set and `demo`'s draw the same images for the same seed."""
    from pipeline.common.images import random_subset
    from pipeline.eval.baselines import RealPool, random_ids
    from pipeline.inputs.datasets import load_builtin

    _, train_y, names = load_builtin("mnist10k", "train")
    pool = RealPool("mnist10k", 32)
    for seed in (0, 3):
        demo = random_subset(train_y, 4, seed)
        bench = random_ids(pool, 4, seed)
        assert [int(i.split("/")[1]) for c in names for i in bench[c]] == demo.tolist()
        assert all(len(bench[c]) == 4 for c in names)
    assert random_ids(pool, 4, 0) != random_ids(pool, 4, 1)


def test_mean_std_population_std_scaled_and_rounded():
    from pipeline.eval.evaluate import summarise
    from pipeline.eval.stats import mean_std

    assert mean_std([1.0, 2.0, None]) == {"mean": 1.5, "std": 0.5, "n": 2}  # raw: the benchmark's metrics
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}
    runs = [{"final_top1": 0.91234, "best_top1": 0.95, "seconds": 1.0},
            {"final_top1": 0.81234, "best_top1": 0.95, "seconds": 2.0}]
    assert summarise(runs) == {"final_top1": {"mean": 86.23, "std": 5.0, "n": 2},
                               "best_epoch_top1": {"mean": 95.0, "std": 0.0, "n": 2}, "seconds": 3.0}


def test_benchmark_end_to_end_and_resume(tmp_path, tiny_prior, ray_session):
    from conftest import write_image_folder
    from PIL import Image

    from pipeline.cli import main
    from pipeline.inputs.preprocess import decode_image

    data = write_image_folder(tmp_path / "data", {"a": 6, "b": 6}, size=16, seed=0)
    write_image_folder(tmp_path / "test", {"a": 4, "b": 4}, size=16, seed=1)
    out = tmp_path / "bench"
    argv = ["benchmark", "--data", str(data), "--test", str(tmp_path / "test" / "train"), "--model", str(tiny_prior),
            "--vae", "", "--out", str(out), "--ipc", "2", "--seeds", "1", "--methods", "random,kmeans_real",
            "--profile", "fast", "--fast-steps", "2", "--student", "width=4", "--features", "mnist10k",
            "--set", "sampler.num_steps=3", "--set", "sampler.t_stop=1", "--set", "runtime.progress=false"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"random", "kmeans_real", "mgd3"}
    assert all(r["final_top1"]["n"] == 1 and r["metrics"]["fid"]["n"] == 1 for r in rows.values())
    assert "mnist10k train split" in results["features"]
    table = (out / "table.md").read_text()
    assert "Random real" in table and "MGD3" in table and results["features"] in table
    assert Image.open(out / "chart.png").size[0] >= 640
    assert sorted(p.name for p in (out / "samples").iterdir()) == \
        ["kmeans_real_ipc2.png", "mgd3_ipc2.png", "random_ipc2.png"]
    # the k-means baseline holds real training images, distinct, IPC per class
    real = {c: [decode_image(p.read_bytes(), 16)[0] for p in sorted((data / "train" / c).glob("*.png"))]
            for c in ("a", "b")}
    selection = json.loads((out / "real" / "kmeans_real" / "ipc2_seed0" / "selection.json").read_text())
    for c, ids in selection.items():
        assert len(set(ids)) == 2
        for k in range(2):
            png = np.asarray(Image.open(out / "real" / "kmeans_real" / "ipc2_seed0" / "train" / c / f"{c}_{k:04d}.png"))
            assert any(np.array_equal(png, im) for im in real[c])
    check_results_file_and_copies(tmp_path, out, argv)
    # a rerun resumes: every cell is skipped and left as it was
    cells = sorted((out / "cells").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cells]
    assert main(argv) == 0
    assert [p.stat().st_mtime_ns for p in cells] == stamps
    # another student setting is a different cell: it is trained, not reused
    assert main([*argv, "--student", "lr=0.02"]) == 0
    assert any(p.stat().st_mtime_ns != s for p, s in zip(cells, stamps))
    # --report-only runs nothing: a method never run is reported as such, and no folder appears for it
    report_argv = [*argv, "--report-only"]
    report_argv[report_argv.index("random,kmeans_real")] = "random,dit"
    assert main(report_argv) == 0
    assert not (out / "distill" / "dit").exists()
    table = (out / "table.md").read_text()
    assert "| DiT (no guidance) | not run |" in table and "Random real" in table


def check_results_file_and_copies(tmp_path, out, argv):
    """results.jsonl holds one record per cell; the tables regenerate from it alone; copy detection
    tells real training images (exact copies) from generated ones."""
    from pipeline.cli import main
    from pipeline.eval.results import read_blocks, read_records

    records = read_records(out / "results.jsonl")
    assert sorted((r["method"], r["ipc"], r["seed"], r["arch"]) for r in records) == \
        [("kmeans_real", 2, 0, "convnet"), ("mgd3", 2, 0, "convnet"), ("random", 2, 0, "convnet")]
    by = {r["method"]: r for r in records}
    assert all(r["test"] == argv[argv.index("--test") + 1] and r["command"].startswith("manifoldgd benchmark")
               for r in records)
    assert "cluster.branching" not in by["mgd3"]["sets"] and by["mgd3"]["guidance"] == "mode"
    # random real images are training images: every one is an exact copy, in pixels and in features
    for space in ("pixels", "features"):
        assert by["random"]["copies"][space]["frac_closer_than_any_train_pair"] == 1.0
        assert by["random"]["copies"][space]["nn_p50"] == 0.0
    # the tiny random prior's samples are nowhere near a training image
    assert by["mgd3"]["copies"]["pixels"]["frac_closer_than_any_train_pair"] == 0.0
    assert by["mgd3"]["copies"]["pixels"]["nn_ratio_median"] > 0.5

    # the same tables from the file alone, in a folder with no cells; --into rewrites marked blocks only
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- results:headline begin -->\nstale\n<!-- results:headline end -->\noutro\n"
                   "<!-- results:full begin (generated) -->\n<!-- results:full end -->\n")
    other = tmp_path / "from_file"
    report = [*argv, "--report-only", "--results-file", str(out / "results.jsonl"), "--into", str(doc)]
    report[report.index(str(out))] = str(other)
    assert main(report) == 0
    assert not (other / "cells").exists()
    assert (other / "table.md").read_text() == (out / "table.md").read_text()
    blocks = read_blocks(doc)
    assert "stale" not in blocks["headline"] and "Random real" in blocks["headline"]
    assert "Ablation" not in blocks["headline"] and "Copy detection" in blocks["full"]
    assert doc.read_text().startswith("intro\n") and "outro\n" in doc.read_text()
    # records scored on another test set are not this table's; an unknown block name is an error
    elsewhere = [*report]
    elsewhere[elsewhere.index("--test") + 1] = str(tmp_path / "test")
    assert main([a for a in elsewhere if a not in ("--into", str(doc))]) == 0
    assert (other / "table.md").read_text() == "no finished cells yet\n"
    doc.write_text("<!-- results:nosuch begin -->\n<!-- results:nosuch end -->\n")
    assert main(report) == 2


def test_parse_seeds_subsets():
    from pipeline.eval.benchmark import parse_seeds

    assert parse_seeds("3") == [0, 1, 2] and parse_seeds(2) == [0, 1]
    assert parse_seeds("3-5") == [3, 4, 5] and parse_seeds("10,11") == [10, 11]
    assert parse_seeds("0,3-4") == [0, 3, 4]
    for bad in ("3-x", "1,1", "", "5-3"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_tuning_budget_is_equal_and_covers_every_knob_value():
    from pipeline.eval import tune

    table = tune.variants(12, 0)
    per_method = {}
    for base, settings in table.values():
        per_method.setdefault(base, []).append(settings)
    assert {b: len(s) for b, s in per_method.items()} == {"mgd3": 12, "manifoldgd": 12}
    for base, settings in per_method.items():
        space = tune.SPACES[base]
        assert settings[0] == tune.expand(space.published)  # the published setting is always tried
        assert len({json.dumps(s, sort_keys=True) for s in settings}) == 12  # distinct
        assert all(set(s) == set(settings[0]) for s in settings)  # every knob named in every setting
        for knob, values in space.grid.items():  # the Latin hypercube tries every value of every knob
            for v in values:
                flat = tune.expand({knob: v})
                assert any(all(s[k] == x for k, x in flat.items()) for s in settings[1:]), (base, knob, v)
    assert tune.variants(12, 0) == table and tune.variants(12, 1) != table  # seeded


def test_tuning_choice_is_the_best_mean_on_the_tuning_seeds(tmp_path):
    from pipeline.eval import tune
    from pipeline.eval.cells import save_cell

    table = tune.variants(3, 0)
    scores = {"mgd3_t00": (0.80, 0.82), "mgd3_t01": (0.90, 0.70), "mgd3_t02": (0.85, 0.84),
              "mgd_t00": (0.75, 0.75), "mgd_t01": (0.75, 0.75), "mgd_t02": (0.5, 1.0)}
    for name, pair in scores.items():
        for seed, top1 in zip((10, 11), pair):
            save_cell(tmp_path, {"method": name, "ipc": 10, "seed": seed, "arch": "convnet", "eval_key": "k",
                                 "student": {"final_top1": top1, "best_top1": top1, "seconds": 1.0}})
    result = tune.choose(tmp_path, table, 10, [10, 11])
    assert result["chosen"]["mgd3"]["variant"] == "mgd3_t02"  # 0.845 beats 0.81 and 0.80
    assert result["chosen"]["manifoldgd"]["variant"] == "mgd_t00"  # a tie keeps the earlier (published) one
    result.update({"protocol": {**tune.DEFAULTS, "budget": 3}, "student": "s", "command": "c"})
    md = tune.tuning_markdown(result)
    assert "| **mgd3_t02, chosen** |" in md and "| mgd3_t00 (published) |" in md
    assert md.index("mgd3_t02") < md.index("mgd3_t00 (published)") < md.index("mgd3_t01")  # best first
    (tmp_path / "cells" / "mgd_t02" / "ipc10_seed11_convnet.json").unlink()
    assert "manifoldgd" not in tune.choose(tmp_path, table, 10, [10, 11])["chosen"]  # no choice on a missing cell


def test_latents_are_shared_only_between_runs_of_the_same_data_and_model(tmp_path):
    from pipeline.eval.cells import latent_key, share_latents

    def finished_run(name, model):
        work = tmp_path / "out" / "distill" / name / "ipc1_seed0" / "_work"
        (work / "latents" / "class_name=a").mkdir(parents=True)
        (work / "latents" / "class_name=a" / "part.parquet").write_text(model)
        (work / "latents" / "_DONE").write_text("ok\n")
        cfg = {"data": {"path": "d", "hflip": False}, "model": {"model": model, "vae": ""}, "ipc": 1}
        (work / "config.json").write_text(json.dumps({"config_hash": name, "config": cfg}))
        return cfg

    cfg_a = finished_run("a", "prior-A")
    target = tmp_path / "out" / "distill" / "new" / "ipc1_seed1"
    other = {**cfg_a, "model": {"model": "prior-B", "vae": ""}}
    share_latents(tmp_path / "out", target, latent_key(other))
    assert not (target / "_work" / "latents").exists()  # another model's latents are never borrowed
    share_latents(tmp_path / "out", target, latent_key({**cfg_a, "ipc": 50}))  # IPC does not matter
    copied = target / "_work" / "latents" / "class_name=a" / "part.parquet"
    source = tmp_path / "out" / "distill" / "a" / "ipc1_seed0" / "_work" / "latents" / "class_name=a" / "part.parquet"
    assert copied.read_text() == "prior-A" and copied.stat().st_ino == source.stat().st_ino  # hard link
    assert (target / "_work" / "latents" / "_DONE").exists()


def test_report_marks_missing_cells(tmp_path):
    from pipeline.eval import report

    stat = {"mean": 50.0, "std": 1.0, "n": 2}
    none = {"mean": None, "std": None, "n": 0}
    results = {"rows": [{"method": "random", "label": "Random real", "ipc": 1, "arch": "convnet",
                         "final_top1": stat, "best_epoch_top1": stat,
                         "metrics": {"fid": none, "mean_l2": none, "mmd2": none}}],
               "main": ["random", "manifoldgd"], "ladder": [], "archs": ["convnet"]}
    results["rows"].append({**results["rows"][0], "ipc": 10})
    results["rows"].append({**results["rows"][0], "method": "manifoldgd", "label": "ManifoldGD"})
    text = report.markdown(results)
    assert "**50.0 +- 1.0**" in text and "not run" in text
    assert report.bar_chart(results, tmp_path / "c.png").exists()


def test_load_test_builtin_maps_classes_by_name():
    from pipeline.eval.evaluate import load_test
    from pipeline.inputs.datasets import load_builtin

    _, y, names = load_builtin("mnist10k", "test")
    x3, y3 = load_test("mnist10k", ["7", "2"], 32)
    assert x3.shape[1:] == (32, 32, 3) and x3.dtype == np.uint8
    assert (y3 == 0).sum() == (y == names.index("7")).sum() and (y3 == 1).sum() == (y == names.index("2")).sum()
    with pytest.raises(ValueError, match="no test images"):
        load_test("mnist10k", ["7", "cat"], 32)


def test_load_test_builtin_split_suffix_selects_val_test_or_heldout():
    from pipeline.eval.evaluate import load_test

    classes = [str(d) for d in range(10)]
    val_x, val_y = load_test("mnist10k:val", classes, 32)
    test_x, test_y = load_test("mnist10k:test", classes, 32)
    bare_x, _ = load_test("mnist10k", classes, 32)
    held_x, _ = load_test("mnist10k:heldout", classes, 32)
    assert len(val_x) == len(test_x) == 1000 and len(held_x) == 2000
    assert np.array_equal(bare_x, test_x)  # a bare name means the test half
    # the halves share no image (no two mnist10k digits are identical, docs/builtin.md)
    assert not {x.tobytes() for x in val_x} & {x.tobytes() for x in test_x}
    assert np.abs(np.bincount(val_y, minlength=10) - np.bincount(test_y, minlength=10)).max() <= 1
    with pytest.raises(ValueError, match="split"):
        load_test("mnist10k:dev", classes, 32)


def test_benchmark_options_come_from_the_parsed_command_line_and_reproduce_it():
    """Every option of the `benchmark` parser is a field of BenchmarkOptions (and nothing else is), and the
    recorded command line parses back to the same options."""
    import dataclasses
    import shlex

    from pipeline.cli import build_parser
    from pipeline.eval.benchmark_options import BenchmarkOptions

    argv = ["benchmark", "--data", "mnist10k", "--ipc", "1,10", "--seeds", "0,3-4", "--profile", "fast",
            "--set", "sampler.num_steps=3", "--variant", "lam03=manifoldgd:sampler.guidance_scale=0.3",
            "--student", "width=32", "--no-copies"]
    args = build_parser(["benchmark"]).parse_args(argv)
    opts = BenchmarkOptions.from_namespace(args)
    parser_fields = set(vars(args)) - {"func", "command", "verbose"}
    assert parser_fields == {f.name for f in dataclasses.fields(BenchmarkOptions)}
    assert opts.set == ("sampler.num_steps=3",) and opts.seeds == "0,3-4" and not opts.copies
    again = build_parser(["benchmark"]).parse_args(shlex.split(opts.command_line().removeprefix("manifoldgd ")))
    reparsed = BenchmarkOptions.from_namespace(again)
    assert dataclasses.replace(reparsed, copies=False) == opts  # --no-copies is not a recorded setting


def test_tune_options_are_typed_and_make_the_benchmark_command():
    from pipeline.eval import tune

    opts = tune.parse_options(["run", "--budget", "3", "--seeds", "10-11", "--into", "a.md"])
    assert isinstance(opts, tune.TuneOptions) and opts.budget == 3 and opts.into == ("a.md",)
    assert opts.protocol() == {**tune.DEFAULTS, "budget": 3, "seeds": "10-11"}
    argv = tune.benchmark_argv(opts)
    assert argv[argv.index("--seeds") + 1] == "10-11" and argv[argv.index("--test") + 1] == tune.DEFAULTS["test"]
    assert sum(a == "--variant" for a in argv) == len(tune.variants(3, 0))
