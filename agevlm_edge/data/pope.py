"""POPE question sets, built as the POPE paper does (Li et al., 2023).

For each image, up to 3 present classes get a "yes" question and the same number of absent
classes a "no" question, so every file is yes/no balanced. Absent classes are sampled
  random:      uniformly among the absent classes;
  popular:     the most frequent classes of the reference split that are absent;
  adversarial: the absent classes that co-occur most often with the present ones in the
               reference split (the training split: that is where a language prior lives).
"""

from __future__ import annotations

import numpy as np

from .datadir import POPE_VARIANTS, pope_question


def build_pope(records: list[dict], classes: list[str], cooccurrence: np.ndarray,
               seed: int, per_image: int = 3) -> dict[str, list[dict]]:
    """Return {variant: rows} in the official POPE format plus ``image_id`` and ``object``.

    ``cooccurrence`` is the [C, C] image co-occurrence matrix of the reference split; its
    diagonal is each class's image frequency.
    """
    index = {c: i for i, c in enumerate(classes)}
    freq = np.diag(cooccurrence).astype(np.float64)
    out: dict[str, list[dict]] = {v: [] for v in POPE_VARIANTS}
    rng = np.random.default_rng(seed)
    for rec in records:
        present = sorted({index[o["class"]] for o in rec["objects"] if o["class"] in index})
        absent = [i for i in range(len(classes)) if i not in present]
        k = min(per_image, len(present), len(absent))
        if k == 0:
            continue
        yes = sorted(rng.choice(present, size=k, replace=False).tolist())
        co_score = cooccurrence[present].sum(axis=0).astype(np.float64)
        negatives = {
            "random": sorted(rng.choice(absent, size=k, replace=False).tolist()),
            # Ties broken by class index so the sets are deterministic.
            "popular": sorted(absent, key=lambda a: (-freq[a], a))[:k],
            "adversarial": sorted(absent, key=lambda a: (-co_score[a], -freq[a], a))[:k],
        }
        for variant in POPE_VARIANTS:
            rows = out[variant]
            for label, objs in (("yes", yes), ("no", negatives[variant])):
                for i in objs:
                    rows.append({
                        "question_id": len(rows) + 1,
                        "image": rec["file"],
                        "image_id": rec["image_id"],
                        "text": pope_question(classes[i]),
                        "label": label,
                        "object": classes[i],
                    })
    return out
