"""The AGE-VLM paper's image-text matching diagnostic.

Per decoder layer, the cosine similarity between the mean image-token state and the mean
text-token state, for matched pairs (an image with its own caption) and mismatched pairs
(the same image with another image's caption). If the two distributions overlap (AUROC near
0.5), the layer's states do not tell whether the text fits the image: the paper's finding
for concatenation models.
"""

from __future__ import annotations

import os

import numpy as np

from .backend import EvalBackend
from .common import ImageStore, chunks


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]        # first index of each tie group
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    r = average_ranks(np.concatenate([pos, neg]))
    u = r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity along the last axis."""
    num = (a * b).sum(-1)
    return num / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def mismatch_order(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation with no fixed point: caption j != i for image i."""
    perm = np.random.default_rng(seed).permutation(n)
    # Shifting along a random cycle through all images never maps an image to itself.
    out = np.empty(n, dtype=np.int64)
    out[perm] = np.roll(perm, -1)
    return out


def _similarities(backend: EvalBackend, store: ImageStore, files: list[str],
                  texts: list[str], desc: str) -> np.ndarray:
    """[n, L] cosine similarity of mean image and mean text state per layer."""
    rows = []
    for sl in chunks(len(texts), desc):
        img, txt = backend.hidden_states(store.many(files[sl]), texts[sl])   # (B, L, D) each
        rows.append(cosine(img, txt))
    return np.concatenate(rows)


def itm_scores(matched: np.ndarray, mismatched: np.ndarray) -> dict:
    """Per-layer mean similarities and AUROC from [n, L] similarity arrays."""
    layers = [{"layer": li, "matched": float(matched[:, li].mean()),
               "mismatched": float(mismatched[:, li].mean()),
               "auroc": auroc(matched[:, li], mismatched[:, li])}
              for li in range(matched.shape[1])]
    return {"n_pairs": int(matched.shape[0]), "layers": layers,
            "mean_auroc": float(np.mean([d["auroc"] for d in layers])),
            "max_auroc": float(np.max([d["auroc"] for d in layers]))}


def run_itm(backend: EvalBackend, data_dir: str | os.PathLike, records: list[dict],
            seed: int = 0) -> dict:
    """Matched vs mismatched caption pairs over ``records`` (first caption of each)."""
    recs = [r for r in records if r.get("captions")]
    if len(recs) < 2:
        return {"skipped": "need at least 2 captioned images for mismatched pairs"}
    files = [r["file"] for r in recs]
    texts = [r["captions"][0]["text"] for r in recs]
    other = mismatch_order(len(recs), seed)
    store = ImageStore(data_dir, backend.image_size)
    matched = _similarities(backend, store, files, texts, "itm matched")
    mismatched = _similarities(backend, store, files, [texts[j] for j in other], "itm mismatched")
    return itm_scores(matched, mismatched)
