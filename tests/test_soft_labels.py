"""The soft-label evaluation protocol: the loss, the teacher's class mapping, the cell key, the CLI."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.eval.cells import eval_key
from pipeline.eval.students import StudentRecipe, build_model, fit, recipe_for, soft_label_loss
from pipeline.eval.teachers import (
    TeacherError,
    describe_labels,
    label_protocol,
    labels_of,
    load_teacher,
    resolve_teacher,
)

ROOT = Path(__file__).resolve().parents[1]


def _tiny_teacher_file(path: Path, classes: list[str], size: int = 16, seed: int = 0) -> Path:
    """A tiny ConvNet classifier saved as `python -m pipeline.eval.features train` saves one, with its classes."""
    torch.manual_seed(seed)
    model = build_model("convnet", len(classes), 3, size, width=4)
    spec = {"name": "tiny-teacher", "arch": "convnet", "width": 4, "size": size, "num_classes": len(classes),
            "dataset": "none", "test_top1": 0.5, "classes": classes}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"spec": json.dumps(spec)})
    return path


def _two_colour_set(n: int = 20, size: int = 16, seed: int = 0):
    """Class 0 red, class 1 blue, with noise: separable by colour."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    labels = np.arange(n) % 2
    images[labels == 0, ..., 0] = 220
    images[labels == 1, ..., 2] = 220
    return np.clip(images + rng.normal(0, 20, images.shape), 0, 255).astype(np.uint8), labels


# ---------------------------------------------------------------------------------------------- loss
def test_soft_loss_is_t_squared_times_the_kl_computed_by_hand():
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(0, 2, (4, 3)), rng.normal(0, 2, (4, 3))
    for t in (1.0, 4.0, 20.0):
        def softmax(z):
            e = np.exp(z / t - (z / t).max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

        p, q = softmax(teacher), softmax(student)
        by_hand = t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
        got = soft_label_loss(torch.tensor(student), torch.tensor(teacher), t)
        assert float(got) == pytest.approx(by_hand, rel=1e-9)
    same = torch.tensor(teacher)
    assert float(soft_label_loss(same, same, 4.0)) == pytest.approx(0.0, abs=1e-12)  # KL of a law with itself


def test_a_teacher_drives_the_student_and_hard_labels_are_unchanged_without_one():
    """A teacher that swaps the two colours teaches the swap: soft labels replace the set's labels."""
    images, labels = _two_colour_set()
    recipe = StudentRecipe(epochs=15, width=8, lr=0.05, eval_points=1, cutmix_prob=1.0, jitter=0.2)

    def swapped(x):  # logits over (class 0, class 1): says "0" for blue images, "1" for red ones
        red, blue = x[:, 0].mean(dim=(1, 2)), x[:, 2].mean(dim=(1, 2))
        return 10 * torch.stack([blue - red, red - blue], dim=1)

    hard = fit(images, labels, 2, recipe, seed=0, test=(images, labels))
    soft = fit(images, labels, 2, recipe, seed=0, test=(images, labels), teacher=swapped, temperature=1.0)
    assert hard.final_top1 == 1.0 and soft.final_top1 == 0.0
    again = fit(images, labels, 2, recipe, seed=0, test=(images, labels), teacher=swapped, temperature=1.0)
    assert again.curve == soft.curve  # seeded: the teacher draws nothing
    # the student's weights differ from hard labels' even with a teacher that agrees with the labels
    agree = fit(images, labels, 2, recipe, seed=0, teacher=lambda x: -swapped(x), temperature=4.0)
    diff = [float((a - b).abs().max()) for a, b in zip(hard.model.state_dict().values(),
                                                        agree.model.state_dict().values())]
    assert max(diff) > 1e-3


# ------------------------------------------------------------------------------------------- teacher
def test_teacher_logits_are_restricted_to_the_sets_classes_in_its_order(tmp_path):
    path = _tiny_teacher_file(tmp_path / "teacher.safetensors", ["a", "b", "c"])
    ref = resolve_teacher(f"featurenet:{path}", None)
    assert ref.name == "featurenet teacher.safetensors" and str(tmp_path) not in ref.name
    full = load_teacher(ref.spec, ["a", "b", "c"])
    part = load_teacher(ref.spec, ["c", "a"])
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(part(x), full(x)[:, [2, 0]])
    assert part(torch.rand(2, 3, 32, 32)).shape == (2, 2)  # another image size is resized to the teacher's
    with pytest.raises(TeacherError, match=r"does not know class\(es\) \['d'\]"):
        load_teacher(ref.spec, ["a", "d"])


def test_mnist10k_teacher_is_the_shipped_classifier_in_digit_order():
    from pipeline.common.images import to_model_range
    from pipeline.eval.evaluate import load_test

    assert resolve_teacher("auto", "mnist10k:val").spec == "mnist10k"
    x, y = load_test("mnist10k:val", ["7", "2"], 32)
    t = load_teacher("mnist10k", ["7", "2"])
    assert (t(to_model_range(x)).argmax(1).numpy() == y).mean() > 0.95
    with pytest.raises(TeacherError, match="cat"):
        load_teacher("mnist10k", ["7", "cat"])


def test_resnet18_teacher_maps_imagenet_wnids_to_its_1000_outputs(tmp_path):
    from pipeline.eval import features
    from pipeline.eval.students import ResNet
    from pipeline.inputs.sources import imagenet_wnids

    torch.manual_seed(0)
    ref_net = ResNet((2, 2, 2, 2), 1000, 64, 3, 224, norm="batch").eval()
    path = tmp_path / features.RESNET18_FILE
    torch.save(ref_net.state_dict(), path)
    wnids = imagenet_wnids()
    classes = [wnids[5], wnids[999], wnids[0]]
    t = load_teacher(resolve_teacher(f"resnet18:{path}", None).spec, classes)
    assert t.name == "resnet18"
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    mean = torch.tensor(features.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(features.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref_net(((x + 1) / 2 - mean) / std)[:, [5, 999, 0]]
    torch.testing.assert_close(t(x), expected)
    with pytest.raises(TeacherError, match="golden_retriever"):
        load_teacher(f"resnet18:{path}", [wnids[0], "golden_retriever"])


def test_auto_without_a_builtin_dataset_or_a_staged_resnet18_names_what_to_stage(tmp_path, monkeypatch):
    from pipeline.eval import features

    monkeypatch.setattr(features, "HUB_CHECKPOINTS", tmp_path)
    monkeypatch.delenv("MANIFOLDGD_RESNET18", raising=False)
    with pytest.raises(TeacherError, match=features.RESNET18_FILE):
        resolve_teacher("auto", str(tmp_path / "imagefolder"))
    torch.save({}, tmp_path / features.RESNET18_FILE)  # staged: auto picks it (loading is checked later)
    assert resolve_teacher("auto", str(tmp_path / "imagefolder")).name == "resnet18"
    for bad in ("vgg", "featurenet:" + str(tmp_path / "nowhere.safetensors")):
        with pytest.raises(TeacherError, match="--teacher"):
            resolve_teacher(bad, "mnist10k")


# -------------------------------------------------------------------------------- cells and records
def _old_eval_key(recipe: dict, test: str, features: str | None) -> str:
    """The cell key as it was computed before the label protocol existed."""
    blob = json.dumps({"recipe": recipe, "test": test, "features": features}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def test_eval_key_hard_labels_is_the_old_key_and_soft_labels_another():
    recipe = asdict(recipe_for("fast", 10, 100, width=32, hflip=False))
    args = (recipe, "mnist10k:val", "feats")
    old = _old_eval_key(*args)
    assert eval_key(*args) == old and eval_key(*args, label_protocol("hard")) == old and eval_key(*args, None) == old
    ref = resolve_teacher("mnist10k", None)
    soft = eval_key(*args, label_protocol("soft", ref, 20.0))
    assert soft != old
    assert eval_key(*args, label_protocol("soft", ref, 4.0)) not in (soft, old)  # the temperature counts
    other = eval_key(*args, {"kind": "soft", "teacher": "resnet18", "temperature": 20.0})
    assert other not in (soft, old)  # and the teacher


def test_the_committed_hard_label_cells_keep_their_key():
    """Every record of the committed results file recomputes to its recorded key: existing cells are reused."""
    from pipeline.eval.results import read_records

    records = read_records(ROOT / "docs" / "results" / "mnist10k.jsonl")
    assert records and all("labels" not in r for r in records)  # written before the field existed
    for r in records:
        recipe = asdict(recipe_for("fast", r["ipc"], r["n_images"], fast_steps=500, width=32, hflip=False,
                                   arch=r["arch"]))
        assert recipe_for("fast", r["ipc"], r["n_images"], fast_steps=500, width=32, hflip=False).describe() == r["recipe"]
        key = eval_key(recipe, r["test"], r["metrics"].get("features"), labels_of(r))
        assert key == r["eval_key"], (r["method"], r["ipc"], r["seed"])


def test_protocol_is_recorded_and_named_in_the_table_header():
    from pipeline.eval import report
    from pipeline.eval.methods import METHODS
    from pipeline.eval.results import record

    assert labels_of({}) == {"kind": "hard"} and describe_labels(labels_of({})) == "hard labels"
    soft = label_protocol("soft", resolve_teacher("mnist10k", None), 4.0)
    assert describe_labels(soft) == "soft labels (teacher mnist10k, T=4)"
    cell = {"method": "random", "ipc": 1, "seed": 0, "arch": "convnet", "eval_key": "k", "labels": soft,
            "student": {"final_top1": 0.5, "best_top1": 0.6, "seconds": 1.0}}
    assert record(cell, METHODS["random"], "mnist10k:val", "r")["labels"] == soft
    assert record({**cell, "labels": None}, METHODS["random"], "mnist10k:val", "r")["labels"] == {"kind": "hard"}
    stat = {"mean": 50.0, "std": 1.0, "n": 2}
    none = {"mean": None, "std": None, "n": 0}
    results = {"rows": [{"method": "random", "label": "Random real", "ipc": 1, "arch": "convnet",
                         "final_top1": stat, "best_epoch_top1": stat,
                         "metrics": {"fid": none, "mean_l2": none, "mmd2": none}}],
               "main": ["random"], "ladder": [], "archs": ["convnet"]}
    assert "#### Top-1 (%) on the real test split, hard labels, " in report.markdown(results)
    assert ", soft labels (teacher mnist10k, T=4), " in report.markdown({**results, "protocol": soft})


def test_one_default_temperature_everywhere():
    import inspect

    from pipeline.eval.benchmark_options import BenchmarkOptions
    from pipeline.eval.teachers import DEFAULT_TEMPERATURE

    assert inspect.signature(fit).parameters["temperature"].default == DEFAULT_TEMPERATURE
    assert BenchmarkOptions(data="x").soft_temperature == DEFAULT_TEMPERATURE


def test_benchmark_command_line_records_the_protocol_and_parses_back():
    import shlex

    from pipeline.cli import build_parser
    from pipeline.eval.benchmark_options import BenchmarkOptions

    hard = BenchmarkOptions(data="mnist10k")
    assert "--labels" not in hard.command_line()  # hard-label commands read as before
    argv = ["benchmark", "--data", "mnist10k", "--labels", "soft", "--teacher", "mnist10k", "--soft-temperature", "4"]
    opts = BenchmarkOptions.from_namespace(build_parser(["benchmark"]).parse_args(argv))
    assert (opts.labels, opts.teacher, opts.soft_temperature) == ("soft", "mnist10k", 4.0)
    again = build_parser(["benchmark"]).parse_args(shlex.split(opts.command_line().removeprefix("manifoldgd ")))
    assert BenchmarkOptions.from_namespace(again) == opts


# ------------------------------------------------------------------------------------------------ CLI
def _folders(tmp_path: Path):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "distilled", {"a": 3, "b": 3}, size=16, seed=0)
    write_image_folder(tmp_path / "real", {"a": 5, "b": 5, "c": 2}, size=16, seed=1)
    return tmp_path / "distilled", tmp_path / "real" / "train"


def test_evaluate_soft_labels_end_to_end(tmp_path, ray_session):
    from pipeline.cli import main

    distilled, real = _folders(tmp_path)
    teacher = _tiny_teacher_file(tmp_path / "teacher.safetensors", ["c", "b", "a"])
    common = ["evaluate", "--distilled", str(distilled), "--test", str(real), "--seeds", "1", "--profile", "fast",
              "--fast-steps", "3", "--student", "width=4", "--features", "none"]
    soft_out, hard_out = tmp_path / "soft.json", tmp_path / "hard.json"
    assert main([*common, "--labels", "soft", "--teacher", f"featurenet:{teacher}", "--soft-temperature", "4",
                 "--out", str(soft_out)]) == 0
    assert main([*common, "--out", str(hard_out)]) == 0
    soft, hard = json.loads(soft_out.read_text()), json.loads(hard_out.read_text())
    assert soft["labels"] == {"kind": "soft", "teacher": "featurenet teacher.safetensors", "temperature": 4.0}
    assert hard["labels"] == {"kind": "hard"}
    assert len(soft["results"]["convnet"]["seeds"]) == 1 and soft["results"]["convnet"]["final_top1"]["n"] == 1


@pytest.mark.parametrize("extra, words", [
    (["--labels", "soft", "--teacher", "featurenet:{tmp}/missing.safetensors"], "no such file"),
    (["--labels", "soft", "--teacher", "auto"], "resnet18-f37072fd.pth"),
    (["--labels", "soft", "--teacher", "mnist10k"], "does not know class"),
    (["--teacher", "mnist10k"], "apply to --labels soft"),
    (["--labels", "soft", "--teacher", "mnist10k", "--soft-temperature", "0"], "--soft-temperature"),
])
def test_evaluate_without_a_usable_teacher_exits_2_with_one_line(tmp_path, monkeypatch, capsys, extra, words):
    from pipeline.cli import main
    from pipeline.eval import features

    monkeypatch.setattr(features, "HUB_CHECKPOINTS", tmp_path)
    monkeypatch.delenv("MANIFOLDGD_RESNET18", raising=False)
    distilled, real = _folders(tmp_path)
    argv = ["evaluate", "--distilled", str(distilled), "--test", str(real), "--features", "none"]
    assert main([*argv, *(a.replace("{tmp}", str(tmp_path)) for a in extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("manifoldgd: error:") and words in err


def test_benchmark_never_reuses_a_cell_across_protocols(tmp_path, tiny_prior, ray_session):
    from conftest import write_image_folder

    from pipeline.cli import main
    from pipeline.eval.results import read_records

    data = write_image_folder(tmp_path / "data", {"a": 4, "b": 4}, size=16, seed=0)
    write_image_folder(tmp_path / "test", {"a": 3, "b": 3}, size=16, seed=1)
    teacher = _tiny_teacher_file(tmp_path / "teacher.safetensors", ["b", "a", "z"])
    out = tmp_path / "bench"
    hard = ["benchmark", "--data", str(data), "--test", str(tmp_path / "test" / "train"), "--model", str(tiny_prior),
            "--vae", "", "--out", str(out), "--ipc", "1", "--seeds", "1", "--methods", "random", "--profile", "fast",
            "--fast-steps", "2", "--student", "width=4", "--features", "none", "--no-copies"]
    soft = [*hard, "--labels", "soft", "--teacher", f"featurenet:{teacher}", "--soft-temperature", "4"]
    cell = out / "cells" / "random" / "ipc1_seed0_convnet.json"

    def run(argv):
        assert main(argv) == 0
        return json.loads(cell.read_text()), read_records(out / "results.jsonl"), (out / "table.md").read_text()

    c_hard, r_hard, t_hard = run(hard)
    c_soft, r_soft, t_soft = run(soft)
    assert c_hard["labels"] == {"kind": "hard"} and r_hard[0]["labels"] == {"kind": "hard"}
    expected = {"kind": "soft", "teacher": "featurenet teacher.safetensors", "temperature": 4.0}
    assert c_soft["labels"] == expected and r_soft[0]["labels"] == expected
    assert c_soft["eval_key"] != c_hard["eval_key"]  # trained again, not reused
    assert ", hard labels, " in t_hard and ", soft labels (teacher featurenet teacher.safetensors, T=4), " in t_soft
    assert "--labels soft" in c_soft["command"] and "--labels" not in c_hard["command"]
    stamp = cell.stat().st_mtime_ns
    assert run(soft)[0] == c_soft and cell.stat().st_mtime_ns == stamp  # the same protocol: reused
    c_again, _, _ = run(hard)
    assert c_again["labels"] == {"kind": "hard"} and c_again["eval_key"] == c_hard["eval_key"]
    # a report asked for one protocol leaves the other's records out
    report = [*soft, "--report-only", "--results-file", str(out / "results.jsonl")]
    report[report.index(str(out))] = str(tmp_path / "report")
    assert main(report) == 0
    assert (tmp_path / "report" / "table.md").read_text() == "no finished cells yet\n"
