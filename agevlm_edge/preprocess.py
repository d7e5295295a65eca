"""Image preprocessing, identical for training and the device runtime (numpy + Pillow only).

preprocessor.json: {"image_size": 64, "mean": [..3], "std": [..3]}; pixels are RGB, resized
with bilinear filtering when the size differs, scaled to [0, 1], then normalised.
With a pretrained Hugging Face tower, mean and std are its image processor's
(`Preprocessor.from_hf_dir`); its resize/crop steps are replaced by the square resize here.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BadInput
from .fsutil import read_json

# What Pillow raises for a file it cannot decode: truncated or not an image (OSError,
# SyntaxError), bad data (ValueError), more pixels than it will decode safely.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# Mean/std that the published checkpoints of each tower family ship in their
# preprocessor_config.json (openai/clip-*, google/siglip-*, facebook/convnext-*), for a dir
# without that file. ConvNeXt's is ImageNet's, not ConvNextImageProcessor's 0.5 default.
# Copied, not imported: the device runtime has no transformers.
HF_DEFAULT_NORM = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "convnext": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _rgb(v) -> tuple:
    """A per-channel value as 3 floats (HF processor files may give one for all three)."""
    return (float(v),) * 3 if isinstance(v, (int, float)) else tuple(float(x) for x in v)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, one conversion for importing, training and the runtime:
    alpha composited on white (a plain convert drops it and shows what transparency hid),
    16-bit scaled to 8 (a plain convert clips it at 255), float by its range (0..1 or as
    integers)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        hi = (65535.0 if image.mode.startswith("I;16") or top > 255
              else 1.0 if image.mode == "F" and top <= 1 else 255.0)
        image = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocessor:
    image_size: int = 64
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.25, 0.25, 0.25)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Preprocessor":
        d = read_json(path, "preprocessor config")
        try:
            return cls(int(d["image_size"]), tuple(float(x) for x in d["mean"]),
                       tuple(float(x) for x in d["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(f"{path} needs image_size, mean and std ({e!r}); re-save it") from None

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, image_size: int) -> "Preprocessor":
        """The normalisation of a local HF vision model's image processor at ``image_size``
        (the tower's, AgeVLMConfig.image_size): preprocessor_config.json's image_mean and
        image_std, or its family's usual ones (HF_DEFAULT_NORM) when the dir has no such file."""
        path = Path(path)
        family = json.loads((path / "config.json").read_text()).get("model_type", "").split("_")[0]
        mean, std = HF_DEFAULT_NORM[family]
        proc_file = path / "preprocessor_config.json"
        if proc_file.is_file():
            proc = json.loads(proc_file.read_text())
            mean, std = proc.get("image_mean", mean), proc.get("image_std", std)
            if not proc.get("do_normalize", True):
                mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(int(image_size), _rgb(mean), _rgb(std))

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """PIL image -> uint8 [3, S, S] (RGB by to_rgb, resized)."""
        image = to_rgb(image)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()

    def normalize(self, chw_uint8: np.ndarray) -> np.ndarray:
        """uint8 [..., 3, S, S] -> float32 normalised, same shape."""
        x = chw_uint8.astype(np.float32) / 255.0
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return (x - mean) / std

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.normalize(self.to_uint8(image))
