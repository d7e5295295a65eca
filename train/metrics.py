"""Validation metrics of the training stages (label F1, the weakest labels) and the
metrics.jsonl log's trim on resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agevlm_edge.fsutil import write_text_atomic


def f1(pred: torch.Tensor, true: torch.Tensor) -> float:
    tp = (pred & true).sum().item()
    p, t = pred.sum().item(), true.sum().item()
    return round(2 * tp / (p + t), 4) if p + t else 0.0


def weakest(pred: torch.Tensor, true: torch.Tensor, names: list[str], k: int = 3) -> dict:
    """The k labels with the lowest F1 (columns of pred / true), lowest first, among those
    present: which shapes the tower confuses (compare eval's POPE errors by object)."""
    per = {n: f1(pred[:, i], true[:, i]) for i, n in enumerate(names) if true[:, i].any()}
    return dict(sorted(per.items(), key=lambda kv: kv[1])[:k])


def truncate_metrics(path: Path, global_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:      # a line torn by the kill that stopped the run
            continue
        if isinstance(row, dict) and row.get("global_step", 0) <= global_step:
            keep.append(ln)
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))
