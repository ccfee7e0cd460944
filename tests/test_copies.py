"""ops.copies: nearest-training-image distances, the leave-one-out reference, and the copy fraction."""
from __future__ import annotations

import numpy as np
import pytest

from ops.copies import CopyReference, copy_report, nearest_train, summarise


def _brute(q, t, exclude_self=False):
    d = np.sqrt(((q[:, None, :].astype(np.float64) - t[None, :, :]) ** 2).sum(-1))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return d.min(1), d.argmin(1)


@pytest.mark.parametrize("chunk,train_chunk", [(7, 11), (512, 4096), (1, 3)])
def test_nearest_train_matches_brute_force_whatever_the_chunks(chunk, train_chunk):
    rng = np.random.default_rng(0)
    t, q = rng.normal(size=(40, 6)), rng.normal(size=(23, 6))
    d, i = nearest_train(q, t, chunk=chunk, train_chunk=train_chunk)
    bd, bi = _brute(q, t)
    assert np.allclose(d, bd, rtol=1e-6) and np.array_equal(i, bi)
    d, i = nearest_train(t, t, chunk=chunk, train_chunk=train_chunk, exclude_self=True)
    bd, bi = _brute(t, t, exclude_self=True)
    assert np.allclose(d, bd, rtol=1e-6) and np.array_equal(i, bi)
    assert np.all(i != np.arange(len(t)))  # never its own neighbour


def test_images_of_any_shape_and_dtype_are_flattened():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 256, size=(30, 4, 4, 3), dtype=np.uint8)
    q = t[[5, 9]].copy()
    d, i = nearest_train(q, t, chunk=4, train_chunk=8)
    assert d.tolist() == [0.0, 0.0] and i.tolist() == [5, 9]


def test_an_exact_copy_is_flagged_and_a_far_image_is_not():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(300, 64))
    ref = CopyReference.of(train, chunk=64, train_chunk=100)
    fresh = rng.normal(size=(20, 64))           # new draws of the same distribution
    far = train[:5] + 50.0                      # far from everything
    near = train[[11]] + 1e-3                   # a copy with invisible noise
    images = np.concatenate([train[[42]], near, fresh, far])
    r = copy_report(images, ref, chunk=16, train_chunk=128)
    assert r["n"] == 27 and r["n_train"] == 300
    assert r["nn"]["min"] == 0.0                # exact, not float32 round-off
    assert r["closest"][0] == [0, 42, 0.0] and r["closest"][1][:2] == [1, 11]
    assert r["frac_closer_than_any_train_pair"] == pytest.approx(2 / 27)
    assert r["min_train_pair"] == pytest.approx(ref.train_nn.min()) and r["min_train_pair"] > 5
    # the reference is the training set's own leave-one-out distances
    assert r["train_nn"]["p50"] == pytest.approx(np.median(_brute(train, train, True)[0]), rel=1e-9)


def test_fresh_images_are_not_flagged_and_sit_where_the_data_sits():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(400, 32))
    r = copy_report(rng.normal(size=(100, 32)), CopyReference.of(train))
    assert r["frac_closer_than_any_train_pair"] == 0.0
    assert 0.85 < r["nn_ratio_median"] < 1.2
    assert r["frac_below_train_nn_p5"] < 0.2


def test_a_set_of_copies_is_flagged_whole():
    rng = np.random.default_rng(4)
    train = rng.normal(size=(200, 16))
    pick = rng.choice(200, 30, replace=False)
    r = copy_report(train[pick], CopyReference.of(train))
    assert r["frac_closer_than_any_train_pair"] == 1.0 and r["frac_below_train_nn_p5"] == 1.0
    assert r["nn"]["max"] == 0.0 and r["nn_ratio_median"] == 0.0
    assert all(pick[c[0]] == c[1] for c in r["closest"])


def test_a_duplicate_in_the_training_set_makes_the_pair_rule_undefined():
    rng = np.random.default_rng(5)
    train = rng.normal(size=(50, 8))
    train[7] = train[30]
    ref = CopyReference.of(train)
    assert ref.min_pairwise == 0.0 and ref.train_nn_index[7] == 30 and ref.train_nn_index[30] == 7
    assert copy_report(train[:3], ref)["frac_closer_than_any_train_pair"] is None


def test_summarise_and_bad_input():
    s = summarise(np.arange(101.0))
    assert s == {"min": 0.0, "p5": 5.0, "p50": 50.0, "mean": 50.0, "max": 100.0}
    with pytest.raises(ValueError, match="differ"):
        nearest_train(np.zeros((2, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="training set itself"):
        nearest_train(np.zeros((2, 3)), np.zeros((4, 3)), exclude_self=True)
    with pytest.raises(ValueError, match="non-empty"):
        nearest_train(np.zeros((0, 3)), np.zeros((4, 3)))


# ------------------------------------------------------------------------------ pipeline wiring
def _real(split, n, size=32):
    from pipeline.eval.prior_quality import real_images

    x, y, names = real_images("mnist10k", split, size)
    keep = np.random.default_rng(0).choice(len(x), n, replace=False)
    return x[keep], y[keep], names


def test_copy_check_flags_training_digits_and_not_held_out_ones_in_both_spaces():
    from pipeline.common.copies import copy_check, copy_references, describe
    from pipeline.eval.features import load_extractor

    train, _, _ = _real("train", 600)
    val, _, _ = _real("val", 40)
    ex = load_extractor("mnist10k")
    refs = copy_references(train, ex)
    images = np.concatenate([train[:5], val])
    report = copy_check(images, refs, ex)
    assert "mnist10k" in report["features_name"]
    for space in ("pixels", "features"):
        r = report[space]
        assert r["n"] == 45 and r["n_train"] == 600
        assert sorted(c[0] for c in r["closest"]) == [0, 1, 2, 3, 4] and all(c[2] < 1e-9 for c in r["closest"])
        # the 5 copies are flagged; real held-out digits (none is in train) mostly are not
        assert 5 / 45 <= r["frac_closer_than_any_train_pair"] <= 10 / 45
    assert len(describe(report)) == 2
    with pytest.raises(ValueError, match="same size"):
        copy_check(_real("val", 3, size=16)[0], refs, ex)


@pytest.mark.slow
def test_prior_quality_reports_copies_in_its_json(tmp_path, monkeypatch):
    import json

    from conftest import save_tiny_prior

    from pipeline.cli import main
    from pipeline.eval import prior_quality as prior_quality

    prior = save_tiny_prior(tmp_path / "prior", num_classes=10)
    small = {"train": _real("train", 300, 16), "test": _real("test", 50, 16)}
    monkeypatch.setattr(prior_quality, "real_images", lambda dataset, split, size: small[split])
    out = tmp_path / "q.json"
    code = main(["prior-quality", "--prior", str(prior), "--n-per-class", "2", "--num-steps", "2",
                 "--classifier-epochs", "1", "--min-fraction", "0", "--json", str(out)])
    assert code == 0
    copies = json.loads(out.read_text())["copies"]
    for space in ("pixels", "features"):
        assert copies[space]["n"] == 20 and copies[space]["n_train"] == 300
        assert copies[space]["train_nn"]["p50"] > 0
        assert 0 <= copies[space]["frac_closer_than_any_train_pair"] <= 1
    # random-weight noise images are nowhere near a digit
    assert copies["pixels"]["nn"]["min"] > copies["pixels"]["train_nn"]["p50"]
    assert main(["prior-quality", "--prior", str(prior), "--n-per-class", "1", "--num-steps", "2",
                 "--classifier-epochs", "1", "--min-fraction", "0", "--json", str(out), "--no-copies"]) == 0
    assert json.loads(out.read_text())["copies"] is None
