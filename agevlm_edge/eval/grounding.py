"""Grounding: does a phrase's cross-attention map land on the object the phrase names?

For each caption phrase, the backend's phrase map [g, g] is compared with the union of the
phrase's object masks, area-downsampled to the patch grid (mask fraction per patch):
  IoU@k:    the k highest patches of the map vs the binarised mask grid (fraction >= 0.5,
            or its argmax patch when no patch reaches 0.5), k = size of that binary set;
  pointing: the map's argmax patch has mask fraction > 0 (the pointing game).
A random-map baseline (seeded uniform noise) is reported beside them for scale.
numpy only: ``mask_to_grid`` is reused by the trainer's dice loss.
"""

from __future__ import annotations

import os

import functools

import numpy as np

from ..data.datadir import decode_mask
from .backend import EvalBackend
from .common import ImageStore, chunks, ratio


@functools.lru_cache(maxsize=64)
def _area_weights(n: int, g: int) -> np.ndarray:
    """[g, n]: overlap of pixel j ([j, j+1)) with cell i ([i*n/g, (i+1)*n/g)), / cell size."""
    edges = np.arange(g + 1) * (n / g)
    lo = np.maximum(edges[:-1, None], np.arange(n)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(n)[None, :] + 1)
    return (np.clip(hi - lo, 0, None) / (n / g)).astype(np.float64)


def mask_to_grid(mask: np.ndarray, grid: int) -> np.ndarray:
    """bool [H, W] -> float32 [grid, grid]: the fraction of each patch the mask covers.

    Exact area averaging, also when H or W is not a multiple of ``grid`` (the image is
    resized to the model's square input, so patch cells stretch the same way).
    """
    m = np.asarray(mask, dtype=np.float64)
    out = _area_weights(m.shape[0], grid) @ m @ _area_weights(m.shape[1], grid).T
    return out.astype(np.float32)


def binary_grid(frac: np.ndarray) -> np.ndarray:
    """Patches with mask fraction >= 0.5, or the single fullest patch when none is."""
    b = frac >= 0.5
    if not b.any():
        b = np.zeros_like(b)
        b.flat[int(np.argmax(frac))] = True
    return b


def topk_iou(heat: np.ndarray, frac: np.ndarray) -> float:
    """IoU of the map's k highest patches with binary_grid(frac), k = its size."""
    target = binary_grid(frac).ravel()
    k = int(target.sum())
    top = np.zeros_like(target)
    top[np.argsort(-heat.ravel(), kind="stable")[:k]] = True
    return float((top & target).sum() / (top | target).sum())


def pointing_hit(heat: np.ndarray, frac: np.ndarray) -> bool:
    """The pointing game: the map's argmax patch touches the mask."""
    return bool(frac.flat[int(np.argmax(heat))] > 0)


def phrase_targets(record: dict, grid: int) -> list[tuple[int, list[tuple[int, int]], list[np.ndarray]]]:
    """Per caption of a record: (caption index, phrase spans, mask-fraction grids). A phrase
    whose masks have no pixel (an imported zero-area polygon) has no target and is left out:
    binary_grid would make patch (0, 0) its target."""
    masks = {o["id"]: decode_mask(o["mask"]) for o in record["objects"]}
    out = []
    for ci, cap in enumerate(record.get("captions", [])):
        spans, grids = [], []
        for ph in cap.get("phrases", []):
            objs = [masks[i] for i in ph["objects"] if i in masks]
            union = np.logical_or.reduce(objs) if objs else None
            if union is not None and union.any():
                spans.append((ph["start"], ph["end"]))
                grids.append(mask_to_grid(union, grid))
        if spans:
            out.append((ci, spans, grids))
    return out


def grounding_scores(maps: list[np.ndarray], fracs: list[np.ndarray], seed: int = 0) -> dict:
    """Mean IoU@k and pointing hit rate of maps, and of seeded random maps (baseline)."""
    keep = [(m, f) for m, f in zip(maps, fracs) if np.isfinite(m).all()]
    rng = np.random.default_rng(seed)
    rand = [rng.random(f.shape) for _, f in keep]
    mean = lambda xs: ratio(sum(xs), len(xs))
    return {"n": len(keep), "skipped": len(maps) - len(keep),
            "iou": mean([topk_iou(m, f) for m, f in keep]),
            "pointing": mean([pointing_hit(m, f) for m, f in keep]),
            "random_iou": mean([topk_iou(r, f) for r, (_, f) in zip(rand, keep)]),
            "random_pointing": mean([pointing_hit(r, f) for r, (_, f) in zip(rand, keep)])}


def run_grounding(backend: EvalBackend, data_dir: str | os.PathLike, records: list[dict],
                  maps_out: list | None = None) -> dict:
    """Phrase maps for every grounded caption phrase of ``records``, scored against masks;
    the maps themselves are appended to ``maps_out`` when given (the drift gate compares them)."""
    grid = backend.grid
    items = [(r, ci, spans, grids) for r in records for ci, spans, grids in phrase_targets(r, grid)]
    store = ImageStore(data_dir, backend.image_size)
    maps: list[np.ndarray] = []
    for sl in chunks(len(items), "grounding"):
        part = items[sl]
        got = backend.phrase_maps(store.many([r["file"] for r, *_ in part]),
                                  [r["captions"][ci]["text"] for r, ci, *_ in part],
                                  [spans for _, _, spans, _ in part])
        if got is None:
            return {"skipped": "the model has no cross-attention (concat): no phrase maps"}
        maps += [m for row in got for m in row]
    fracs = [f for *_, grids in items for f in grids]
    if maps_out is not None:
        maps_out.extend(maps)
    return {**grounding_scores(maps, fracs), "grid": grid, "captions": len(items)}
