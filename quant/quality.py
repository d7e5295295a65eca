"""Next-token agreement of a quantized export with its fp32 reference, right after quantizing.

Both exports read the same teacher-forced texts about the same images; at every real
(non-padding) position we compare the next-token distributions:
    top1_agreement = mean [argmax p_ref == argmax p_cand]
    kl             = mean KL(p_ref || p_cand)   (nats; float64 log-softmax)
numpy + the device runtime only.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from agevlm_edge.runtime.session import Runtime, log_softmax


def compare_logits(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, V] logits each -> (top-1 agree [n] bool, KL(ref || cand) [n])."""
    lr, lc = log_softmax(ref), log_softmax(cand)
    kl = (np.exp(lr) * (lr - lc)).sum(-1)
    return ref.argmax(-1) == cand.argmax(-1), np.maximum(kl, 0.0)


def next_token_quality(ref_dir: str | os.PathLike, cand_dir: str | os.PathLike,
                       pairs: tuple[Sequence[np.ndarray], Sequence[str]], batch: int = 8) -> dict:
    """Top-1 agreement and mean KL over every real position of ``pairs`` (images, texts)."""
    ref, cand = Runtime(ref_dir, verify=False), Runtime(cand_dir, verify=False)
    images, texts = pairs
    agree, kls = [], []
    for s in range(0, len(texts), batch):
        seqs = [ref.prompt_ids(t)[: ref.max_seq_len] for t in texts[s:s + batch]]
        ims = list(images[s:s + batch])
        _, keys, lr, _, _ = ref.prefill(ref.encode_images(ims), seqs, want_probs=False)
        _, _, lc, _, _ = cand.prefill(cand.encode_images(ims), seqs, want_probs=False)
        real = keys[:, keys.shape[1] - lr.shape[1]:].astype(bool)
        a, k = compare_logits(lr[real], lc[real])
        agree.append(a)
        kls.append(k)
    a, k = np.concatenate(agree), np.concatenate(kls)
    return {"positions": int(a.size), "texts": len(texts), "top1_agreement": round(float(a.mean()), 4),
            "kl_mean": round(float(k.mean()), 6), "kl_max": round(float(k.max()), 6)}
