"""Image preprocessing, identical for training and the device runtime (numpy + Pillow only).

preprocessor.json: {"image_size": 64, "mean": [..3], "std": [..3]}; pixels are RGB, resized
with bilinear filtering when the size differs, scaled to [0, 1], then normalised.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessor:
    image_size: int = 64
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.25, 0.25, 0.25)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Preprocessor":
        d = json.loads(Path(path).read_text())
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]))

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """PIL image -> uint8 [3, S, S] (RGB, resized)."""
        image = image.convert("RGB")
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
