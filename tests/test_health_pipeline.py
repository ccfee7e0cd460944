"""pipeline/distill/health.py: the policy (keep / regenerate), the noise attempts, the manifest summary and the
contact sheet's marks. No Ray, no model: a fake sampler stands in."""
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.common.images import MARK_RGB, contact_sheet, folder_contact_sheet, png_bytes
from pipeline.config import ConfigError, DistillConfig, build_config, validate
from pipeline.distill.health import HEALTH_COLUMNS, HealthCheck, health_summary
from pipeline.models.noise import NoiseStreams, sample_seed

RNG = np.random.default_rng(0)
REAL = RNG.uniform(-1, 1, size=(300, 2)) @ np.linalg.qr(RNG.normal(size=(8, 2)))[0].T


def check(policy: str, attempts: int = 3) -> HealthCheck:
    hc = HealthCheck(out=None, threshold=4.0, policy=policy, max_attempts=attempts)
    X = REAL.astype(np.float32)
    from ops.health import reference_spacing
    hc.refs["a"] = (X, reference_spacing(X))
    hc.refs["b"] = (X + 5.0, reference_spacing(X))
    return hc


def good(n):
    return torch.as_tensor(REAL[:n] * 0.9, dtype=torch.float32)


def test_keep_records_and_never_resamples():
    lat = good(4)
    lat[2] += 20.0
    calls = []
    res = check("keep").sample(lambda rows, a: calls.append((rows, a)), ["a"] * 4, lat)
    assert calls == []
    assert res["flagged"].tolist() == [False, False, True, False]
    assert res["attempt"].tolist() == [0, 0, 0, 0]
    assert res["health_score"][2] > 4.0 > res["health_score"][[0, 1, 3]].max()
    assert set(HEALTH_COLUMNS) <= set(res)


def test_regenerate_takes_the_first_unflagged_attempt_and_keeps_the_best_when_all_fail():
    lat = good(3)
    lat[0] += 20.0  # attempt 1 still bad, attempt 2 fine
    lat[2] += 30.0  # every attempt bad: keep the least bad
    calls = []

    def again(rows, attempt):
        calls.append((list(rows), attempt))
        out = good(3)[rows].clone()
        for i, r in enumerate(rows):
            if r == 2:
                out[i] += 30.0 - 5.0 * attempt  # 25, then 20: better, still flagged
            elif attempt == 1:
                out[i] += 15.0
        return out

    with torch.inference_mode():  # the sampler returns inference tensors; the check must not write into them
        lat = lat.clone()
    res = check("regenerate", attempts=3).sample(again, ["a"] * 3, lat)
    assert calls == [([0, 2], 1), ([0, 2], 2)]
    assert res["flagged"].tolist() == [False, False, True]
    assert res["attempt"].tolist() == [2, 0, 2]
    torch.testing.assert_close(res["latents"][0], good(3)[0])
    # One attempt in all: nothing is resampled.
    calls.clear()
    lat = good(3)
    lat[0] += 20.0
    assert check("regenerate", attempts=1).sample(again, ["a"] * 3, lat)["flagged"].tolist() == [True, False, False]
    assert calls == []


def test_scores_use_each_rows_own_class():
    lat = torch.cat([good(2), good(2) + 5.0])
    res = check("keep").sample(None, ["a", "a", "b", "b"], lat)
    assert not res["flagged"].any()
    res = check("keep").sample(None, ["b", "b", "a", "a"], lat)
    assert res["flagged"].all()


def test_attempt_zero_is_the_old_noise_and_attempts_differ():
    old = int.from_bytes(hashlib.blake2b(b"manifoldgd/noise/3/1/2", digest_size=8).digest(), "little") & (2**63 - 1)
    assert sample_seed(3, 1, 2) == old == sample_seed(3, 1, 2, 0)
    assert len({sample_seed(3, 1, 2, a) for a in range(4)}) == 4
    base = NoiseStreams(3, [1, 1], [2, 5], (1, 2, 2)).draw()
    same = NoiseStreams(3, [1, 1], [2, 5], (1, 2, 2), [0, 0]).draw()
    other = NoiseStreams(3, [1, 1], [2, 5], (1, 2, 2), [1, 0]).draw()
    assert torch.equal(base, same)
    assert not torch.equal(base[0], other[0]) and torch.equal(base[1], other[1])
    # A row's attempt noise is the same whatever the other rows of its batch are.
    alone = NoiseStreams(3, [1], [2], (1, 2, 2), [1]).draw()
    assert torch.equal(alone[0], other[0])


def test_config_knobs_are_checked_and_hash_only_when_changed():
    base = DistillConfig().config_hash()
    assert "health" not in DistillConfig().hashed_dict()
    assert build_config({"health": {"policy": "keep"}}).config_hash() != base
    assert build_config({"health": {"threshold": 4.0}}).config_hash() == base
    for field, value, msg in (("policy", "drop", "health.policy"), ("threshold", 0, "health.threshold"),
                              ("max_attempts", 0, "health.max_attempts")):
        with pytest.raises(ConfigError, match=msg):
            validate(build_config({"health": {field: value}}), need_paths=False)


def test_summary_and_contact_sheet_marks(tmp_path):
    assert health_summary(tmp_path / "manifest.parquet")["flagged"] == 0
    pq.write_table(pa.table({"path": ["train/a/a_0000.png", "train/a/a_0001.png", "train/b/b_0000.png"],
                             "flagged": [False, True, False], "attempt": [0, 0, 2]}), tmp_path / "manifest.parquet")
    s = health_summary(tmp_path / "manifest.parquet")
    assert s == {"checked": 3, "flagged": 1, "regenerated": 1, "flagged_images": ["train/a/a_0001.png"]}
    for name, k in (("a", 0), ("a", 1), ("b", 0)):
        (tmp_path / "train" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / name / f"{name}_{k:04d}.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    from PIL import Image
    plain = np.asarray(Image.open(folder_contact_sheet(tmp_path / "train", tmp_path / "plain.png")))
    sheet = np.asarray(Image.open(folder_contact_sheet(tmp_path / "train", tmp_path / "s.png", s["flagged_images"])))
    red = np.all(sheet == MARK_RGB, axis=-1)
    assert not np.all(plain == MARK_RGB, axis=-1).any()
    # The frame is around row 0, column 1 only (pad 2, 4 px images, zoom 3): x in [6, 12) * 3 of the sheet.
    ys, xs = np.nonzero(red)
    assert ys.min() == 0 and ys.max() == 3 * (4 + 2 * 2) - 1
    assert xs.min() == 3 * (4 + 2) and xs.max() == 3 * (4 + 2 + 4 + 2 * 2) - 1
    # The image itself is untouched.
    assert np.array_equal(sheet[3 * 2:3 * 6, 3 * 8:3 * 12], np.zeros((12, 12, 3), np.uint8))
    assert contact_sheet([[np.zeros((4, 4, 3), np.uint8)]], marked={(0, 0)}).getpixel((0, 0)) == MARK_RGB
