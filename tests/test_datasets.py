"""The built-in dataset mnist10k: the committed file, its split, loading, and export as ImageFolders."""
from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main as cli_main
from pipeline.inputs import datasets

REPO = Path(__file__).resolve().parents[1]


def _make_script():
    spec = importlib.util.spec_from_file_location("make_mnist10k", REPO / "scripts" / "make_mnist10k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    test_images, test_labels, _ = datasets.load_builtin("mnist10k", "test")
    assert test_images.shape == (2000, 28, 28)
    assert np.array_equal(test_labels, raw["labels"][raw["test_index"]].astype(np.int64))


def test_load_builtin_rejects_unknown_names_and_splits():
    with pytest.raises(KeyError, match="mnist10k"):
        datasets.load_builtin("cifar10")
    with pytest.raises(ValueError, match="split"):
        datasets.load_builtin("mnist10k", "val")


def test_export_dataset_writes_loadable_imagefolders(tmp_path, raw):
    from PIL import Image

    out = tmp_path / "mnist"
    assert cli_main(["export-dataset", "mnist10k", str(out)]) == 0
    for split, n in (("train", 8000), ("test", 2000)):
        _, labels, names = datasets.load_builtin("mnist10k", split)
        assert sorted(p.name for p in (out / split).iterdir()) == names
        per_class = [len(list((out / split / c).glob("*.png"))) for c in names]
        assert per_class == np.bincount(labels, minlength=10).tolist() and sum(per_class) == n
    # A file's index names its row in the .npz, and its pixels are that row's, losslessly.
    i = int(raw["test_index"][17])
    cls = str(raw["labels"][i])
    back = np.asarray(Image.open(out / "test" / cls / f"{cls}_{i:05d}.png"))
    assert np.array_equal(back, raw["images"][i])


def test_export_one_split_only(tmp_path):
    counts = datasets.export_imagefolder("mnist10k", tmp_path, splits=("test",))
    assert counts == {"test": 2000}
    assert not (tmp_path / "train").exists()


def test_exported_folder_is_read_by_the_pipeline_listing(tmp_path):
    from pipeline.inputs.sources import list_imagefolder

    datasets.export_imagefolder("mnist10k", tmp_path, splits=("test",))
    listing = list_imagefolder(tmp_path, "test")
    assert listing.classes == [str(d) for d in range(10)] and len(listing.files) == 2000
    assert not listing.rejected
