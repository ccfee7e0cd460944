"""Labels -> folder names (pipeline/common/names.py) and the write layer's guard (pipeline/common/outputs.py):
property tests over arbitrary strings, and the listing rules that use them."""
from __future__ import annotations

import io
import os
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.common.names import (
    MAX_FOLDER_BYTES,
    LabelCollisionError,
    check_distinct,
    collision_key,
    folder_name,
    folder_names,
    is_safe,
    label_of,
)
from pipeline.common.outputs import OutputDir, UnsafePathError
from pipeline.config import ConfigError, DataConfig
from pipeline.inputs.sources import list_source

# Labels as a user's data may hold them: any Unicode (surrogates included, which no filesystem accepts),
# path-like strings made of the characters that matter for paths, and long ones.
PATHISH = st.lists(st.sampled_from(["/", ".", "..", "\\", "\0", "~", "%", "a", "A", "\u00e9", "e\u0301", " ", "_"]),
                   max_size=30).map("".join)
LABELS = st.one_of(st.text(), st.text(alphabet=st.characters(exclude_categories=()), max_size=20), PATHISH,
                   st.text(min_size=150, max_size=400), st.from_regex(r"[A-Za-z0-9._-]{190,210}", fullmatch=True))
EVIL = ["../escape", "..", "a/b", "/abs", "ok", ".", "", "../../x", "x" * 300, "\u00e9" * 300, "a\0b", ".hidden",
        "_SUCCESS"]
# The longest file name the writer makes from a folder name: the image (k up to 99999) and its temp file.
LONGEST_FILE_SUFFIX = len("_99999.png") + len("..12345678.tmp")


def _valid_linux_name(name: str) -> bool:
    raw = name.encode("utf-8", "surrogatepass")
    return 0 < len(raw) <= 255 and "/" not in name and "\0" not in name and name not in (".", "..")


@given(LABELS)
@settings(max_examples=250, deadline=None)
@example("../escape")
@example("..")
@example("/abs")
@example("")
@example("x" * 300)
@example("\u00e9" * 300)
def test_any_label_gives_one_valid_linux_file_name(label):
    folder = folder_name(label)
    assert _valid_linux_name(folder) and not folder.startswith((".", "_"))
    assert len(folder.encode()) <= MAX_FOLDER_BYTES
    assert _valid_linux_name(f".{folder}_99999.png.12345678.tmp")  # the writer's longest name from it
    assert len(folder) + LONGEST_FILE_SUFFIX <= 255
    assert folder.isascii() and unicodedata.is_normalized("NFC", folder)


@given(LABELS, st.integers(0, 99999))
@settings(max_examples=300, deadline=None)
@example("../../x", 0)
@example("/abs", 0)
@example("..", 3)
def test_every_path_made_from_a_label_stays_inside_the_output_folder(label, k):
    with tempfile.TemporaryDirectory() as tmp:
        out = OutputDir(Path(tmp) / "out")
        root = out.root.resolve()
        folder = folder_name(label)
        for path in (out.class_dir(folder), out.image_path(folder, k), out.manifest_part(folder),
                     out.centroid_file(folder)):
            assert root in path.resolve().parents
            assert path.resolve().parent.name in ("train", "manifest", "centroids", folder)
        assert out.image_path(folder, k).parent == out.train / folder


@given(LABELS)
@settings(max_examples=300, deadline=None)
def test_a_label_comes_back_from_its_folder_name_unless_it_was_cut(label):
    folder = folder_name(label)
    if "~" in folder:  # cut with a hash suffix: only the run's classes.json knows the label
        assert label_of(folder) is None
        prefix, digest = folder.rsplit("~", 1)
        assert len(digest) == 16 and all(c in "0123456789abcdef" for c in digest)
        assert label == "" or (not is_safe(label) and label_of(prefix) == label[:len(label_of(prefix))])
    else:
        assert label_of(folder) == label


@given(st.from_regex(r"[A-Za-z0-9-][A-Za-z0-9._-]{0,199}", fullmatch=True))
@settings(max_examples=200, deadline=None)
@example("n01440764")
@example("0")
@example("9")
@example("golden_retriever")
def test_safe_labels_keep_their_bytes(label):
    assert is_safe(label) and folder_name(label) == label


@given(LABELS, LABELS)
@settings(max_examples=300, deadline=None)
@example("Cat", "cat")
@example("\u00e9", "e\u0301")
@example("x" * 300, "x" * 301)
@example("%41", "A")
@example("a/b", "a%2Fb")
@example("", "~")
@example(".", "%2E")
def test_distinct_labels_never_share_a_folder(a, b):
    assume(a != b)
    assert folder_name(a) != folder_name(b)
    if collision_key(a) != collision_key(b):  # what check_distinct lets through
        assert folder_name(a).casefold() != folder_name(b).casefold()


@given(st.lists(LABELS, max_size=12))
@settings(max_examples=300, deadline=None)
@example(["Cat", "dog", "cat"])
@example(["\u00e9", "e\u0301"])
@example(EVIL)
def test_a_set_of_labels_is_refused_naming_two_or_gets_distinct_folders_under_case_folding(labels):
    try:
        folders = folder_names(labels)
    except LabelCollisionError as exc:
        message = str(exc)
        assert "\n" not in message
        named = [label for label in set(labels) if repr(label) in message]
        assert len({collision_key(label) for label in named}) < len(named)  # two named, one key
        return
    assert len({f.casefold() for f in folders.values()}) == len(set(labels))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LABELS, min_size=1, max_size=6, unique_by=collision_key))
def test_the_folders_can_be_made_and_written_on_this_filesystem(labels):
    with tempfile.TemporaryDirectory() as tmp:
        out = OutputDir(Path(tmp) / "out")
        folders = folder_names(labels)
        for folder in folders.values():
            out.image_path(folder, 0).parent.mkdir(parents=True)
            out.image_path(folder, 0).write_bytes(b"png")
        made = sorted(os.listdir(out.train))
        assert made == sorted(folders.values())  # one folder per label, nothing else
        assert all(len(os.listdir(out.train / f)) == 1 for f in made)


# ------------------------------------------------------------------------------------- the write guard
@pytest.mark.parametrize("name", ["..", ".", "../escape", "/abs", "a/b", "", ".hidden", "_work", "a\0b", "x" * 201])
def test_the_write_layer_refuses_a_name_that_is_not_one_safe_component(tmp_path, name):
    out = OutputDir(tmp_path / "out")
    for make in (out.class_dir, out.manifest_part, out.centroid_file, lambda n: out.image_path(n, 0)):
        with pytest.raises(UnsafePathError, match="refusing"):
            make(name)


def test_the_write_layer_refuses_a_path_that_resolves_outside_through_a_link(tmp_path):
    out = OutputDir(tmp_path / "out")
    (tmp_path / "elsewhere").mkdir()
    out.train.mkdir(parents=True)
    (out.train / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError, match="outside the output folder"):
        out.image_path("linked", 0)
    with pytest.raises(UnsafePathError):
        out.child("..", "x")
    assert out.child("train", "ok", "ok_0000.png") == out.train / "ok" / "ok_0000.png"


# ----------------------------------------------------------------------------------- the listing rules
def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path: Path, labels: list) -> Path:
    pq.write_table(pa.table({"image": [_png()] * len(labels), "label": labels}), path)
    return path


@pytest.mark.parametrize("pair", [("Cat", "cat"), ("\u00e9t\u00e9", "e\u0301te\u0301"), ("ﬁsh", "fish")])
def test_labels_that_differ_only_in_case_or_normalisation_are_refused_naming_both(tmp_path, pair):
    path = _parquet(tmp_path / "d.parquet", [pair[0], "dog", pair[1]])
    with pytest.raises(ConfigError, match="differ only in case") as err:
        list_source(DataConfig(path=str(path)))
    assert repr(pair[0]) in str(err.value) and repr(pair[1]) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(LabelCollisionError):
        check_distinct(pair)


def test_null_labels_are_quarantine_rows_and_the_rest_keyed_by_folder(tmp_path):
    path = _parquet(tmp_path / "d.parquet", ["a/b", None, "ok", None, "a/b"])
    listing = list_source(DataConfig(path=str(path)))
    assert listing.classes == ["a%2Fb", "ok"] and listing.num_rows == 3
    assert listing.rejected == [(f"{path}#row 1", "null label"), (f"{path}#row 3", "null label")]
    assert listing.source_labels == {"a%2Fb": "a/b", "ok": "ok"} and listing.renamed() == [("a/b", "a%2Fb")]
    assert sorted(listing.labels.values()) == [0, 1]


def test_integer_labels_with_nulls_stay_the_model_ids(tmp_path):
    path = _parquet(tmp_path / "d.parquet", [3, None, 7])
    listing = list_source(DataConfig(path=str(path)))
    assert listing.labels == {"3": 3, "7": 7} and len(listing.rejected) == 1


def test_imagefolder_names_are_mapped_and_the_class_map_uses_the_names_on_disk(tmp_path):
    for name in ("chat noir", "dog"):
        (tmp_path / "d" / name).mkdir(parents=True)
        (tmp_path / "d" / name / "x.png").write_bytes(_png())
    (tmp_path / "map.txt").write_text("chat noir 5\ndog 2\n")
    listing = list_source(DataConfig(path=str(tmp_path / "d"), class_map=str(tmp_path / "map.txt")))
    assert listing.classes == ["chat%20noir", "dog"] and listing.labels == {"chat%20noir": 5, "dog": 2}
    assert sorted(listing.files) == [("chat noir/x.png", "chat%20noir"), ("dog/x.png", "dog")]
    (tmp_path / "map.txt").write_text("chat noir five\n")
    with pytest.raises(ConfigError, match=r"data.class_map: .*line 1: expected '<label> <id>'"):
        list_source(DataConfig(path=str(tmp_path / "d"), class_map=str(tmp_path / "map.txt")))
