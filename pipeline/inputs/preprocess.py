"""Safe decoding and DiT's preprocessing: one bad file yields a reason, never an exception.

DiT's centre crop: while the short side is at least twice the target, halve with a BOX filter; resize
the short side to the target (BICUBIC); centre-crop a square. Pixels stay uint8 here; the VAE stage
scales them to [-1, 1].
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from pipeline.common.images import centre_crop

# Pillow raises DecompressionBombError above 2x this many pixels and only warns above 1x; a warning is
# promoted to an error here, so that what counts as a bomb does not depend on how warnings are set.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def decode_image(data: bytes, size: int, hflip: bool = False) -> tuple[np.ndarray | None, str]:
    """Return ``(pixels (size, size, 3) uint8, "")`` or ``(None, reason)``."""
    if not data:
        return None, "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.seek(0)  # animated images: the first frame
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    # 16-bit greyscale: rescale to 8 bits instead of letting convert() clip
                    arr = np.asarray(im, dtype=np.float64)
                    top = 65535.0 if arr.max() > 255 else 255.0
                    im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(background, rgba)
                im = im.convert("RGB")
                if min(im.size) < 1:
                    return None, "image has no pixels"
                im = centre_crop(im, size)
                if hflip:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
                return np.asarray(im, dtype=np.uint8), ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"decompression bomb: {exc}"[:300]
    except Exception as exc:
        return None, f"cannot decode: {type(exc).__name__}: {exc}"[:300]
