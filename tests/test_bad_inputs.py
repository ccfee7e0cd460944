"""Every kind of bad input survives a run and is accounted for: files found = encoded + quarantined."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.cli import main
from pipeline.inputs.preprocess import decode_image


def _rgb(seed: int, size=(24, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_bad_dataset(root):
    """Class `good` (valid images, some unusual), class `bad` (one of each broken kind), an empty class,
    and a class `few` with fewer images than IPC."""
    train = root / "train"
    good, bad, few = train / "good", train / "bad", train / "few"
    for d in (good, bad, few, train / "empty"):
        d.mkdir(parents=True)
    usable = {
        "plain.png": _save(_rgb(0), "PNG"),
        "png named.JPEG": _save(_rgb(1), "PNG"),
        "cmyk.jpg": _save(_rgb(2).convert("CMYK"), "JPEG"),
        "grey.png": _save(_rgb(3).convert("L"), "PNG"),
        "palette.png": _save(_rgb(4).convert("P"), "PNG"),
        "la.png": _save(_rgb(5).convert("LA"), "PNG"),
        "rgba.png": _save(_rgb(6).convert("RGBA"), "PNG"),
        "sixteen.png": _save(Image.fromarray(np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 97), "PNG"),
        "animated.gif": None,
        "tiny 1x1.png": _save(_rgb(7, (1, 1)), "PNG"),
        "long 1x4000.png": _save(_rgb(8, (1, 4000)), "PNG"),
        "ünïcödé 名前.png": _save(_rgb(9), "PNG"),
        "rotated.jpg": None,
    }
    frames = [_rgb(10 + i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    usable["animated.gif"] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    usable["rotated.jpg"] = _save(_rgb(13, (30, 20)), "JPEG", exif=exif.tobytes())
    for name, data in usable.items():
        (good / name).write_bytes(data)
    for i in range(2):
        (few / f"f{i}.png").write_bytes(_save(_rgb(20 + i), "PNG"))
    broken = {
        "truncated.jpg": _save(_rgb(30, (64, 64)), "JPEG")[:300],
        "zero.png": b"",
        "notes.txt": b"hello",
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        ".hidden.png": _save(_rgb(31), "PNG"),
        "bomb.png": _save(Image.new("1", (10000, 10000)), "PNG"),
    }
    for name, data in broken.items():
        (bad / name).write_bytes(data)
    os.symlink("loop_b.png", bad / "loop_a.png")
    os.symlink("loop_a.png", bad / "loop_b.png")
    (bad / "ok.png").write_bytes(_save(_rgb(40), "PNG"))  # the class still has one usable image
    return root, set(usable), {f"bad/{n}" for n in broken} | {"bad/loop_a.png", "bad/loop_b.png"}


def test_unusual_but_valid_images_decode():
    exif = Image.Exif()
    exif[0x0112] = 6
    arr, reason = decode_image(_save(_rgb(13, (30, 20)), "JPEG", exif=exif.tobytes()), 16)
    assert reason == "" and arr.shape == (16, 16, 3)
    # EXIF rotation is applied: a 30 x 20 landscape turned by 90 degrees has 30 rows before cropping
    with Image.open(io.BytesIO(_save(_rgb(13, (30, 20)), "JPEG", exif=exif.tobytes()))) as im:
        from PIL import ImageOps
        assert ImageOps.exif_transpose(im).size == (20, 30)
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    arr, _ = decode_image(_save(sixteen, "PNG"), 8)
    assert arr.min() == 255  # 16-bit white stays white, not clipped garbage
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    arr, _ = decode_image(_save(rgba, "PNG"), 8)
    assert arr.min() == 255  # transparent pixels composite onto white


def test_bad_files_get_reasons():
    assert decode_image(b"", 8)[1] == "empty file"
    assert "decode" in decode_image(_save(_rgb(0, (64, 64)), "JPEG")[:300], 8)[1]
    assert "bomb" in decode_image(_save(Image.new("1", (10000, 10000)), "PNG"), 8)[1]


def test_distill_survives_and_accounts_for_everything(tmp_path, tiny_prior, ray_session):
    root, usable, broken = make_bad_dataset(tmp_path / "data")
    out = tmp_path / "out"
    args = ["distill", "--data", str(root), "--out", str(out), "--ipc", "3", "--model", str(tiny_prior),
            "--vae", "", "--set", "sampler.num_steps=3", "--set", "sampler.t_stop=1",
            "--set", "tangent.neighbours=3", "--set", "tangent.dim=1"]
    assert main(args) == 0
    quarantine = {r["path"]: r["reason"] for r in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert set(quarantine) == broken, set(quarantine) ^ broken
    assert quarantine["bad/loop_a.png"] == "symlink loop"
    assert quarantine["bad/.hidden.png"] == "hidden file"
    assert "bomb" in quarantine["bad/bomb.png"]
    run = json.loads((out / "run.json").read_text())
    counts = run["counts"]
    assert counts["found"] == len(usable) + 2 + 1 + len(broken)
    assert counts["found"] == counts["encoded"] + counts["quarantined"]
    assert counts["classes"] == 3 and run["counts"]["classes_without_images"] == ["empty"]
    assert "few" in counts["classes_with_repeated_centroids"] and "bad" in counts["classes_with_repeated_centroids"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    per_class = {}
    for row in manifest:
        per_class.setdefault(row["class"], []).append(row)
    assert {c: len(v) for c, v in per_class.items()} == {"good": 3, "bad": 3, "few": 3}
    assert all(r["repeated_centroid"] for r in per_class["few"])
    few_hashes = {r["sha256"] for r in per_class["few"]}
    assert len(few_hashes) == 3  # repeated centroids still get distinct noise: distinct images


def test_corrupt_leading_batches_and_an_all_corrupt_class_never_crash(tmp_path, tiny_prior, ray_session):
    """Class `a`: its first files (more than one encode batch, sorting first) are corrupt; class `dead`: every
    file is. The run completes, `a` is planned from its good files, `dead` gets no output and a reason."""
    train = tmp_path / "data" / "train"
    for cls in ("a", "dead"):
        (train / cls).mkdir(parents=True)
    for i in range(5):  # > 2 Ray Data batches of encode_batch_size 2
        (train / "a" / f"0{i}_bad.png").write_bytes(b"not a png " + bytes([i]))
        (train / "dead" / f"{i}.png").write_bytes(b"")
    for i in range(4):
        (train / "a" / f"1{i}_ok.png").write_bytes(_save(_rgb(50 + i), "PNG"))
    out = tmp_path / "out"
    args = ["distill", "--data", str(tmp_path / "data"), "--out", str(out), "--ipc", "2", "--model", str(tiny_prior),
            "--vae", "", "--set", "sampler.num_steps=3", "--set", "sampler.t_stop=1",
            "--set", "tangent.neighbours=3", "--set", "tangent.dim=1", "--set", "runtime.encode_batch_size=2",
            "--set", "model.encode_batch=2"]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["classes_without_images"] == ["dead"]
    assert run["counts"]["encoded"] == 4 and run["counts"]["quarantined"] == 10
    assert sorted(p.name for p in (out / "train" / "a").glob("*.png")) and not (out / "train" / "dead").exists()
