"""Small helpers the suites share: images as uint8 arrays, records, chunked progress."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import BadInput

CHUNK = 64  # items per backend call: one progress-bar step, bounded memory per call


def progress(total: int, desc: str):
    """A tqdm bar on stderr (silent when tqdm is missing: the device runtime lacks it)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the toolchain extra
        return None
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=False,
                disable=total == 0)


def chunks(n: int, desc: str, size: int = CHUNK) -> Iterator[slice]:
    """Slices of range(n), advancing a progress bar by the items done."""
    bar = progress(n, desc)
    try:
        for i in range(0, n, size):
            sl = slice(i, min(i + size, n))
            yield sl
            if bar is not None:
                bar.update(sl.stop - sl.start)
    finally:
        if bar is not None:
            bar.close()


class ImageStore:
    """Record images as uint8 [3, S, S] (Preprocessor.to_uint8), loaded once each."""

    def __init__(self, data_dir: str | os.PathLike, image_size: int):
        from ..preprocess import Preprocessor

        self.root = Path(data_dir)
        self.pre = Preprocessor(image_size=image_size)
        self._cache: dict[str, np.ndarray] = {}

    def get(self, file: str) -> np.ndarray:
        if file not in self._cache:
            from PIL import Image

            path = self.root / file
            try:
                with Image.open(path) as im:
                    self._cache[file] = self.pre.to_uint8(im)
            except FileNotFoundError:
                raise BadInput(f"image {path} is missing; the data directory is incomplete, "
                               "regenerate it with `agevlm data synth`") from None
            except OSError as e:
                raise BadInput(f"image {path} cannot be read ({e})") from None
        return self._cache[file]

    def many(self, files: list[str]) -> list[np.ndarray]:
        return [self.get(f) for f in files]


def select_records(records: list[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` records (all when None): every suite sees the same images."""
    if limit is not None and limit < 1:
        raise BadInput(f"limit must be at least 1, got {limit}")
    return records if limit is None else records[:limit]


def ratio(num: float, den: float) -> float | None:
    """num / den, or None when the denominator is 0 (JSON null: 'not measurable')."""
    return float(num) / den if den else None
