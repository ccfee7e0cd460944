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
