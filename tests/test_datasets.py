"""The built-in dataset mnist10k: the committed file, its split, loading, and export as ImageFolders."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from pipeline.cli import main as cli_main
from pipeline.inputs import datasets

REPO = Path(__file__).resolve().parents[1]



def _make_script():
    return load_script(REPO / "scripts" / "make_mnist10k.py", "make_mnist10k")


@pytest.fixture(scope="module")
def raw():
    with resources.files("pipeline").joinpath("data", "mnist10k.npz").open("rb") as fh:
        with np.load(fh, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def test_committed_file_is_small_and_has_the_documented_arrays(raw):
    path = Path(str(resources.files("pipeline").joinpath("data", "mnist10k.npz")))
    assert path.stat().st_size <= 2 * 1024 * 1024
    assert raw["images"].shape == (10000, 28, 28) and raw["images"].dtype == np.uint8
    assert raw["labels"].shape == (10000,) and raw["labels"].dtype == np.uint8
    assert list(raw["class_names"]) == [str(d) for d in range(10)]
    assert sorted(np.unique(raw["labels"]).tolist()) == list(range(10))
    # Real digits, not blank or constant arrays: dark background, bright strokes, varied images.
    assert raw["images"].max() == 255 and np.median(raw["images"]) == 0
    assert len({im.tobytes() for im in raw["images"][:500]}) == 500


def test_split_is_8000_2000_disjoint_complete_and_stratified(raw):
    train, test = raw["train_index"], raw["test_index"]
    assert len(train) == 8000 and len(test) == 2000
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(10000))
    counts = np.bincount(raw["labels"], minlength=10)
    test_counts = np.bincount(raw["labels"][test], minlength=10)
    # Proportional: each class within one image of 20% of its size.
    assert np.all(np.abs(test_counts - counts * 0.2) < 1.0)


def test_committed_split_is_what_the_seeded_script_produces(raw):
    script = _make_script()
    train, test = script.stratified_split(raw["labels"], script.TEST_TOTAL, script.SPLIT_SEED)
    assert np.array_equal(train, raw["train_index"]) and np.array_equal(test, raw["test_index"])
    other_train, _ = script.stratified_split(raw["labels"], script.TEST_TOTAL, script.SPLIT_SEED + 1)
    assert not np.array_equal(other_train, train)  # the seed matters, so equality above is meaningful


def test_largest_remainder_counts_sum_exactly():
    script = _make_script()
    counts = np.array([7, 7, 7])
    sizes = script.stratified_test_counts(counts, 10)
    assert sizes.sum() == 10 and sizes.max() - sizes.min() <= 1


def test_script_converts_package_json_exactly(tmp_path):
    """The conversion round-trips the package's 3-decimal values to the original bytes."""
    script = _make_script()
    rng = np.random.default_rng(0)
    pixels = {d: rng.integers(0, 256, size=(2 + d % 3, 28, 28)) for d in range(10)}
    digits = tmp_path / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    for d, arr in pixels.items():
        values = ",".join(f"{v / 255:.3f}".rstrip("0").rstrip(".") for v in arr.reshape(-1))
        (digits / f"{d}.json").write_text('{ "data": [' + values + "] }")
    images, labels = script.read_digits(tmp_path / "package")
    assert np.array_equal(images, np.concatenate([pixels[d] for d in range(10)]).astype(np.uint8))
    assert np.array_equal(np.bincount(labels), [len(pixels[d]) for d in range(10)])


def test_load_builtin_returns_each_split(raw):
    assert "mnist10k" in datasets.builtin_names()
    images, labels, names = datasets.load_builtin("mnist10k", "train")
    assert images.shape == (8000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and names == [str(d) for d in range(10)]
    assert np.array_equal(images, raw["images"][raw["train_index"]])
    heldout_images, heldout_labels, _ = datasets.load_builtin("mnist10k", "heldout")
    assert heldout_images.shape == (2000, 28, 28)  # what "test" meant before the val/test cut
    assert np.array_equal(heldout_labels, raw["labels"][raw["test_index"]].astype(np.int64))
    for split in ("val", "test"):
        images, labels, _ = datasets.load_builtin("mnist10k", split)
        rows = datasets.split_index("mnist10k", split)
        assert images.shape == (1000, 28, 28)
        assert np.array_equal(images, raw["images"][rows])
        assert np.array_equal(labels, raw["labels"][rows].astype(np.int64))


def test_load_builtin_rejects_unknown_names_and_splits():
    with pytest.raises(KeyError, match="mnist10k"):
        datasets.load_builtin("cifar10")
    with pytest.raises(ValueError, match="split"):
        datasets.load_builtin("mnist10k", "dev")
    with pytest.raises(ValueError, match="split"):
        datasets.parse_spec("mnist10k:dev")


# ----------------------------------------------------------------------------- the val/test halves
def test_val_and_test_are_disjoint_halves_of_the_heldout_set(raw):
    val = datasets.split_index("mnist10k", "val")
    test = datasets.split_index("mnist10k", "test")
    assert len(val) == 1000 and len(test) == 1000
    assert len(np.intersect1d(val, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([val, test])), raw["test_index"])
    assert len(np.intersect1d(val, raw["train_index"])) == 0 and len(np.intersect1d(test, raw["train_index"])) == 0
    assert np.all(np.diff(val) > 0) and np.all(np.diff(test) > 0)


def test_val_and_test_are_stratified(raw):
    labels = raw["labels"]
    heldout = np.bincount(labels[raw["test_index"]], minlength=10)
    val = np.bincount(labels[datasets.split_index("mnist10k", "val")], minlength=10)
    test = np.bincount(labels[datasets.split_index("mnist10k", "test")], minlength=10)
    assert np.array_equal(val + test, heldout)
    # As even as the data allows: half of each class (the held-out set has 173 to 225 per class, so not
    # 100 each), the odd ones out alternating between the halves.
    assert np.all(np.abs(val - test) <= 1)
    assert np.all((val == test) == (heldout % 2 == 0))
    assert (val > test).sum() == (test > val).sum()


def test_val_and_test_are_stable():
    """The halves are pinned: any change to the rule, the salt or the data fails here (results chosen on
    val and reported on test would otherwise silently stop being comparable)."""
    import hashlib

    digest = {s: hashlib.sha256(datasets.split_index("mnist10k", s).astype("<i8").tobytes()).hexdigest()
              for s in ("val", "test")}
    assert digest == {"val": "f7f240d1e6a67d2a51a9f795b5fee2b44b13f8452780b50036a960dc764bc447",
                      "test": "6248ae071169bc85722bf8aaa0c1a2cfdf5902bb4709d9b715c7aa03e223b64c"}


def test_halves_rule_depends_on_the_salt_and_is_order_free(monkeypatch):
    labels = np.repeat(np.arange(3), [9, 10, 11]).astype(np.uint8)
    heldout = np.arange(30)
    val, test = datasets.heldout_halves("x", heldout, labels)
    assert len(val) + len(test) == 30 and abs(len(val) - len(test)) <= 1
    assert np.bincount(labels[val]).tolist() == [5, 5, 5] and np.bincount(labels[test]).tolist() == [4, 5, 6]
    shuffled = np.random.default_rng(0).permutation(heldout)
    assert np.array_equal(datasets.heldout_halves("x", shuffled, labels)[0], val)  # input order does not matter
    monkeypatch.setattr(datasets, "HALVES_SALT", "another salt")
    assert not np.array_equal(datasets.heldout_halves("x", heldout, labels)[0], val)


def test_parse_spec():
    assert datasets.parse_spec("mnist10k") == ("mnist10k", "test")
    assert datasets.parse_spec("mnist10k:val") == ("mnist10k", "val")
    assert datasets.parse_spec("mnist10k:heldout") == ("mnist10k", "heldout")
    assert datasets.parse_spec("/data/imagenette2") is None


def test_export_dataset_writes_loadable_imagefolders(tmp_path, raw):
    from PIL import Image

    out = tmp_path / "mnist"
    assert cli_main(["export-dataset", "mnist10k", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    for split, n in (("train", 8000), ("val", 1000), ("test", 1000)):
        _, labels, names = datasets.load_builtin("mnist10k", split)
        assert sorted(p.name for p in (out / split).iterdir()) == names
        per_class = [len(list((out / split / c).glob("*.png"))) for c in names]
        assert per_class == np.bincount(labels, minlength=10).tolist() and sum(per_class) == n
    # A file's index names its row in the .npz, and its pixels are that row's, losslessly.
    i = int(datasets.split_index("mnist10k", "test")[17])
    cls = str(raw["labels"][i])
    back = np.asarray(Image.open(out / "test" / cls / f"{cls}_{i:05d}.png"))
    assert np.array_equal(back, raw["images"][i])


def test_export_one_split_only(tmp_path):
    counts = datasets.export_imagefolder("mnist10k", tmp_path, splits=("test",))
    assert counts == {"test": 1000}
    assert not (tmp_path / "train").exists() and not (tmp_path / "val").exists()


def test_export_dataset_cli_splits_val(tmp_path):
    assert cli_main(["export-dataset", "mnist10k", str(tmp_path), "--splits", "val"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]
    names = {p.name for p in (tmp_path / "val").rglob("*.png")}
    val_rows = {int(n.split("_")[1][:5]) for n in names}
    assert val_rows == set(datasets.split_index("mnist10k", "val").tolist())


def test_exported_folder_is_read_by_the_pipeline_listing(tmp_path):
    from pipeline.inputs.sources import list_imagefolder

    datasets.export_imagefolder("mnist10k", tmp_path, splits=("test",))
    listing = list_imagefolder(tmp_path, "test")
    assert listing.classes == [str(d) for d in range(10)] and len(listing.files) == 1000
    assert not listing.rejected
