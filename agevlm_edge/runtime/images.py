"""Image files -> uint8 [3, S, S] for the runtime, with one clear error per bad input.

Pillow decodes; palette, grey, RGBA (composited on white), 16-bit and CMYK images are
converted to 8-bit RGB as training converts them (preprocess.to_rgb); a file that is empty,
truncated, not an image or too large to decode safely is refused with a BadInput that says so.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import BadInput
from ..preprocess import Preprocessor, to_rgb

MAX_PIXELS = 64_000_000      # ~8000 x 8000; larger files are refused, not decoded


def load_image(path: str | os.PathLike, pre: Preprocessor) -> np.ndarray:
    """Decode, convert and resize an image file to the model's uint8 [3, S, S]."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"image {path} is a directory; give one image file")
    if not path.is_file():
        raise BadInput(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise BadInput(f"image {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise BadInput(f"image {path} is {w}x{h}, over the {MAX_PIXELS:,}-pixel "
                                   "limit; downscale it first")
                im.load()
                rgb = to_rgb(im)
    except BadInput:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInput(f"{path} is not an image Pillow can decode (or is too large); "
                       "use PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"image {path} could not be decoded ({e}); the file may be truncated "
                       "or corrupted") from None
    return pre.to_uint8(rgb)
