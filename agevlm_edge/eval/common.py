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

            from ..preprocess import DECODE_ERRORS

            path = self.root / file
            try:
                with Image.open(path) as im:
                    self._cache[file] = self.pre.to_uint8(im)
            except FileNotFoundError:
                raise BadInput(f"image {path} is missing; the data directory is incomplete, "
                               "regenerate it with `agevlm data synth`") from None
            except DECODE_ERRORS as e:
                raise BadInput(f"image {path} cannot be read ({e}); replace it or regenerate "
                               "the DATA DIR") from None
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


FALLBACK_QUESTIONS = ("Is there a circle in the image?", "What colour is the square?",
                      "How many objects are there?", "Is there a star in the image?")


def image_prompt_pairs(data_dir: str | os.PathLike | None, image_size: int, n: int,
                       splits: tuple[str, ...] = ("test", "val")) -> tuple[list[np.ndarray], list[str]]:
    """n (uint8 image [3,S,S], prompt) pairs: caption prompts and questions on the images of
    the first of ``splits`` a DATA DIR has, then seeded noise images with fixed prompts.

    Export parity takes the test split; quantization calibrates on val/train so that the
    drift gate (on test) never sees its calibration images.
    """
    from ..prompts import caption_prompt, question_prompt

    images, prompts = [], []
    if data_dir is not None:
        from ..data.datadir import load_meta, split_names, load_split

        have = split_names(load_meta(data_dir))
        split = next((s for s in splits if s in have), None)
        store = ImageStore(data_dir, image_size)
        for i, rec in enumerate(load_split(data_dir, split)[:n] if split else []):
            images.append(store.get(rec["file"]))
            qs = rec.get("questions", [])
            prompts.append(question_prompt(qs[0]["question"]) if qs and i % 2 else caption_prompt())
    rng = np.random.default_rng(0)
    while len(images) < n:
        images.append(rng.integers(0, 256, (3, image_size, image_size), dtype=np.uint8))
        i = len(prompts)
        prompts.append(caption_prompt() if i % 2 == 0 else
                       question_prompt(FALLBACK_QUESTIONS[i // 2 % len(FALLBACK_QUESTIONS)]))
    return images, prompts
