"""Does a run's vision tower underfit or overfit? Per-class F1 of its image-level head, on
train images and on val.

    python scripts/tower_fit.py --data DATA RUN [RUN ...] [--train-images 3000]

Loads each RUN DIR's tower and the head of its vision stage (training_state/head.safetensors,
which a finished run keeps) into the model of the first RUN's own recipe (its config.json, so
model settings such as 16 px patches carry over) and prints, for the first --train-images train
images and the val split, the mean over classes of each class's F1 and the per-class F1s (lowest
first). Train close to val means more or better tower training pays, not regularisation. A
diagnostic for docs/tiny-recipe.md, not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file
from study_guidance import saved_recipe

from agevlm_edge.train.loop import Run
from agevlm_edge.train.metrics import weakest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the runs' DATA DIR")
    ap.add_argument("runs", type=Path, nargs="+", help="RUN DIRs with the same kind of tower")
    ap.add_argument("--train-images", type=int, default=3000)
    args = ap.parse_args()
    data = None
    for rd in args.runs:
        if data is None:   # the split data once: every run given reads it alike
            data = Run(args.data, rd, saved_recipe(rd), limit=args.train_images)
        # the tower only: runs that differ elsewhere (model.xattn_null, say) share it
        tower = {k[len("vision."):]: v for k, v in load_file(rd / "model.safetensors").items()
                 if k.startswith("vision.")}
        try:
            data.model.vision.load_state_dict(tower)
        except RuntimeError as e:
            raise SystemExit(f"{rd}: not the vision tower of {args.runs[0]} ({e})") from None
        data.head.load_state_dict(load_file(rd / "training_state" / "head.safetensors"))
        data.model.eval()
        data.head.eval()
        n = len(data.classes)
        with torch.no_grad():   # every present class, lowest F1 first
            f1 = {name: weakest(data.head(data.vision_features(split))[:, :n] > 0,
                                split.labels[:, :n] > 0, data.classes, k=n)
                  for name, split in (("train", data.train_data), ("val", data.val_data))}
        mean = {name: sum(v.values()) / len(v) for name, v in f1.items()}
        print(f"{rd}: mean per-class F1 train {mean['train']:.3f}, val {mean['val']:.3f}")
        for name, v in f1.items():
            print(f"  {name:5s} " + " ".join(f"{c} {x:.2f}" for c, x in v.items()))


if __name__ == "__main__":
    main()
