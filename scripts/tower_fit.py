"""Does a run's vision tower underfit or overfit? Per-class F1 of its image-level head, on
train images and on val.

    python scripts/tower_fit.py --data DATA RUN [RUN ...] [--train-images 3000]

Loads each RUN DIR's tower and the head of its vision stage (training_state/head.safetensors,
which a finished run keeps) and prints, for the first --train-images train images and the val
split, the mean over classes of each class's F1 and the per-class F1s. Train close to val
means more or better tower training pays, not regularisation. A diagnostic for README's
"Known gap", not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from agevlm_edge.train.loop import Run
from agevlm_edge.train.recipe import preset_recipe


def per_class_f1(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    tp = (pred & true).sum(0).float()
    return 2 * tp / (pred.sum(0) + true.sum(0)).clamp(min=1).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the runs' DATA DIR")
    ap.add_argument("runs", type=Path, nargs="+", help="RUN DIRs of the tiny recipe")
    ap.add_argument("--train-images", type=int, default=3000)
    args = ap.parse_args()
    data = None
    for rd in args.runs:
        if data is None:   # the split data once: every run of the preset reads it alike
            data = Run(args.data, rd, preset_recipe("tiny"), limit=args.train_images)
        res = data.model.load_state_dict(load_file(rd / "model.safetensors"), strict=False)
        if res.unexpected_keys or set(res.missing_keys) - {"lm_head.weight"}:   # tied to the embedding
            raise SystemExit(f"{rd}: not a tiny-preset RUN DIR ({res})")
        data.head.load_state_dict(load_file(rd / "training_state" / "head.safetensors"))
        data.model.eval()
        data.head.eval()
        n = len(data.classes)
        with torch.no_grad():
            f1 = {name: per_class_f1(data.head(data.vision_features(split))[:, :n] > 0,
                                     split.labels[:, :n] > 0)
                  for name, split in (("train", data.train_data), ("val", data.val_data))}
        print(f"{rd}: mean per-class F1 train {f1['train'].mean():.3f}, val {f1['val'].mean():.3f}")
        for name, v in f1.items():
            print(f"  {name:5s} " + " ".join(f"{c} {x:.2f}" for c, x in zip(data.classes, v.tolist())))


if __name__ == "__main__":
    main()
