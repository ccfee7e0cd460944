"""The encode stage: latents are the VAE posterior mean x scale, independent of how rows are batched."""
import numpy as np
import torch

from pipeline.distill.encode import VAEEncoder, decode_batch, flip_for


def _encoder(prior, micro=8):
    return VAEEncoder({"model": str(prior), "vae": "", "revision": "", "dtype": "auto"}, threads=1,
                      micro_batch=micro)


def test_latents_do_not_depend_on_batch_composition(tiny_prior):
    enc = _encoder(tiny_prior)
    px = np.random.default_rng(0).integers(0, 255, (13, 16, 16, 3), dtype=np.uint8)
    together = enc._encode_padded(px)
    split = np.concatenate([enc._encode_padded(px[:5]), enc._encode_padded(px[5:])])
    alone = np.concatenate([enc._encode_padded(px[i:i + 1]) for i in range(13)])
    np.testing.assert_array_equal(together, split)
    np.testing.assert_array_equal(together, alone)


def test_latent_is_scaled_posterior_mean(tiny_prior):
    enc = _encoder(tiny_prior, micro=2)
    px = np.random.default_rng(1).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = enc.vae.encode(x).latent_dist.mean
    expected = (mean * enc.vae.config.scaling_factor).reshape(2, -1).numpy()
    np.testing.assert_allclose(enc._encode_padded(px), expected, atol=1e-5)


def test_failed_rows_pass_through_with_their_reason(tiny_prior):
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, format="PNG")
    batch = {"id": np.array(["a/1.png", "a/2.png"], dtype=object), "class_name": np.array(["a", "a"], dtype=object),
             "label": np.array([0, 0]), "bytes": np.array([buf.getvalue(), b""], dtype=object)}
    decoded = decode_batch(batch, image_size=16, hflip=False, seed=0)
    assert list(decoded["error"]) == ["", "empty file"]
    out = _encoder(tiny_prior)(decoded)
    assert np.abs(out["latent"][0]).sum() > 0 and np.all(out["latent"][1] == 0)
    assert list(out["error"]) == ["", "empty file"]


def test_hflip_is_a_deterministic_function_of_id_and_seed():
    flips = [flip_for(f"c/{i}.png", 0) for i in range(200)]
    assert flips == [flip_for(f"c/{i}.png", 0) for i in range(200)]
    assert 60 < sum(flips) < 140  # about half
    assert flips != [flip_for(f"c/{i}.png", 1) for i in range(200)]


def test_a_batch_where_every_row_failed_keeps_the_latent_width(tiny_prior):
    """A class whose first files all fail must not write a narrower latent column than the rest."""
    enc = _encoder(tiny_prior)
    ok = decode_batch({"id": np.array(["a/1"], dtype=object), "class_name": np.array(["a"], dtype=object),
                       "label": np.array([0]), "bytes": np.array([b"junk"], dtype=object)},
                      image_size=16, hflip=False, seed=0)
    failed = enc(ok)
    px = np.random.default_rng(2).integers(0, 255, (1, 16, 16, 3), dtype=np.uint8)
    assert len(failed["latent"][0]) == enc._encode_padded(px).shape[1] == enc.latent_dim(16)


def test_ray_data_batch_size_does_not_change_latents(tiny_prior):
    """runtime.encode_batch_size (rows per actor call) is not hashed: the VAE always sees model.encode_batch
    rows, so cutting the same rows into calls of 3 + 5 or 8 gives the same bytes."""
    enc = _encoder(tiny_prior, micro=4)
    px = np.random.default_rng(3).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)

    def call(rows):
        n = len(rows)
        batch = {"id": np.array([f"a/{i}" for i in range(n)], dtype=object),
                 "class_name": np.array(["a"] * n, dtype=object), "label": np.zeros(n, dtype=np.int64),
                 "pixels": rows, "error": np.array([""] * n, dtype=object)}
        return np.stack(enc(batch)["latent"])

    np.testing.assert_array_equal(call(px), np.concatenate([call(px[:3]), call(px[3:])]))


def test_encode_batch_is_hashed_and_the_ray_batch_size_is_not():
    from pipeline.config import build_config

    base = build_config({}).config_hash()
    assert build_config({"runtime": {"encode_batch_size": 7}}).config_hash() == base
    assert build_config({"model": {"encode_batch": 7}}).config_hash() != base
