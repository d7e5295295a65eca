"""Short-answer VQA accuracy per question type (exact match after strip + lower case).

Only the closed types of the synthetic world are scored; open-ended (imported LLaVA)
questions have no exact answer and are counted as skipped.
"""

from __future__ import annotations

import os

from .backend import EvalBackend
from .common import ImageStore, chunks, ratio

TYPES = ("existence", "colour", "count", "relation")


def normalize(answer: str) -> str:
    return answer.strip().lower()


def balanced_accuracy(by_answer: dict) -> float | None:
    """The mean of the accuracies per reference answer (None without answers)."""
    accs = [v["accuracy"] for v in by_answer.values()]
    return sum(accs) / len(accs) if accs else None


def vqa_scores(qtypes: list[str], answers: list[str], preds: list[str]) -> dict:
    """Accuracy overall and per type, with counts; per type also per reference answer, with what
    was said instead (``by_answer``: a type's accuracy can hide an answer never given, e.g. a
    model that never counts past one scores 0.89 on count questions where 11% are two or more),
    and ``balanced_accuracy``, the mean of the per-answer accuracies (that model: ~0.5 of 1).
    """
    per = {t: {"n": 0, "correct": 0, "by_answer": {}} for t in TYPES}
    for t, a, p in zip(qtypes, answers, preds):
        a, p = normalize(a), normalize(p)
        per[t]["n"] += 1
        per[t]["correct"] += a == p
        d = per[t]["by_answer"].setdefault(a, {"n": 0, "correct": 0, "predicted": {}})
        d["n"] += 1
        d["correct"] += a == p
        d["predicted"][p] = d["predicted"].get(p, 0) + 1
    for d in per.values():
        d["accuracy"] = ratio(d["correct"], d["n"])
        d["by_answer"] = {a: {**v, "accuracy": ratio(v["correct"], v["n"])}
                          for a, v in sorted(d["by_answer"].items())}
        d["balanced_accuracy"] = balanced_accuracy(d["by_answer"])
    total = sum(d["n"] for d in per.values())
    return {"n": total, "accuracy": ratio(sum(d["correct"] for d in per.values()), total),
            "types": per}


def run_vqa(backend: EvalBackend, data_dir: str | os.PathLike, records: list[dict],
            max_new_tokens: int = 4) -> dict:
    """Ask every closed-type question of ``records`` and score exact matches."""
    qs = [(r["file"], q) for r in records for q in r.get("questions", []) if q.get("type") in TYPES]
    skipped = sum(len(r.get("questions", [])) for r in records) - len(qs)
    store = ImageStore(data_dir, backend.image_size)
    preds: list[str] = []
    for sl in chunks(len(qs), "vqa"):
        part = qs[sl]
        preds += backend.answer(store.many([f for f, _ in part]),
                                [q["question"] for _, q in part], max_new_tokens)
    res = vqa_scores([q["type"] for _, q in qs], [q["answer"] for _, q in qs], preds)
    return {**res, "skipped": skipped}
