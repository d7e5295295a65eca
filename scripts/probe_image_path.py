"""Where along the image path does a trained run lose an object's colour or class?

    python scripts/probe_image_path.py --run RUN --data DATA [--images 500] [--split test]

For every object of the first --images images of the split, the patch its mask covers most
(at least half) is read at each stage of the image path: the patch's mean RGB, the tower's
first conv layer (averaged over the patch), the tower's tokens, the projected tokens, and the
key and value vectors of every cross-attention layer (keys: what a text query can match;
values: what it reads). A linear softmax probe
per stage (70% of the objects to fit, 30% to score, features standardised) prints the held-out
accuracy for the object's colour and its class; chance is 1/8 and 1/14 on the synthetic
worlds. Used for docs/tiny-recipe.md (colour answers at chance); a diagnostic, not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agevlm_edge.checkpoint import load_model_files
from agevlm_edge.data.datadir import decode_mask, load_split
from agevlm_edge.eval.common import ImageStore


def probe(x: torch.Tensor, y: torch.Tensor, n_cls: int, steps: int = 300) -> float:
    """Held-out accuracy of a softmax probe fitted on the first 70% of rows."""
    fit = torch.arange(len(y)) < int(0.7 * len(y))
    x = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6)
    w = torch.zeros(x.shape[1], n_cls, requires_grad=True)
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(x[fit] @ w + b, y[fit]) + 1e-3 * w.pow(2).sum()).backward()
        opt.step()
    with torch.no_grad():
        return float(((x[~fit] @ w + b).argmax(1) == y[~fit]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="RUN DIR (built-in cnn tower)")
    ap.add_argument("--data", type=Path, required=True, help="DATA DIR of the synthetic world")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _, pre, _ = load_model_files(args.run)
    model.eval()
    cfg = model.cfg
    vocab = json.loads((args.data / "dataset.json").read_text())["vocabulary"]
    colours, classes = list(vocab["colours"]), list(vocab["classes"])
    records = load_split(args.data, args.split)[: args.images]
    store = ImageStore(args.data, cfg.image_size)
    grid, p = cfg.image_size // cfg.patch_size, cfg.patch_size
    feats: dict[str, list[torch.Tensor]] = {}
    y_colour, y_class = [], []
    with torch.no_grad():
        for i in range(0, len(records), 50):
            part = records[i:i + 50]
            px = torch.from_numpy(pre.normalize(np.stack(
                [np.asarray(im, np.uint8) for im in store.many([r["file"] for r in part])])))
            first = model.vision.stem[:3](px)                     # conv, BatchNorm, ReLU
            tokens = model.vision(px)
            projected = model.projector(tokens)
            stages = {"patch RGB mean": F.avg_pool2d(px, p), "first conv layer":
                      F.avg_pool2d(first, first.shape[-1] // grid)}
            stages = {k: v.flatten(2).transpose(1, 2) for k, v in stages.items()}
            stages |= {"tower tokens": tokens, "projected tokens": projected}
            for layer, (k, v) in sorted(model.cross_kv(projected).items(), key=lambda kv: int(kv[0])):
                stages[f"cross-attn K, layer {layer}"] = k.transpose(1, 2).flatten(2)  # (B, N, Hkv*hd)
                stages[f"cross-attn V, layer {layer}"] = v.transpose(1, 2).flatten(2)
            for b, rec in enumerate(part):
                for ob in rec["objects"]:
                    cover = decode_mask(ob["mask"]).reshape(grid, p, grid, p).mean((1, 3)).ravel()
                    j = int(cover.argmax())
                    if cover[j] < 0.5 or ob.get("colour") not in colours:
                        continue
                    for name, f in stages.items():
                        feats.setdefault(name, []).append(f[b, j])
                    y_colour.append(colours.index(ob["colour"]))
                    y_class.append(classes.index(ob["class"]))
    yc, yk = torch.tensor(y_colour), torch.tensor(y_class)
    print(f"{len(yc)} objects; held-out linear-probe accuracy (chance 1/{len(colours)} colour, "
          f"1/{len(classes)} class)")
    print(f"{'stage':28s} colour  class")
    for name, f in feats.items():
        x = torch.stack(f).float()
        print(f"{name:28s} {probe(x, yc, len(colours)):.3f}   {probe(x, yk, len(classes)):.3f}")


if __name__ == "__main__":
    main()
