"""Training step time with and without length bucketing, measured in one run.

    python benchmarks/bench_train_buckets.py [--data DATA] [--steps 12] [--buckets 1,2,3,4]

A batch is padded to its longest sample, and the default recipe mixes captions (~21 tokens),
questions (~15) and reading-comprehension texts (~33), so about half of every step's tokens
were padding. `Stage.length_buckets` runs each batch as that many length-sorted parts. This
prints, for the lm, guided and instruct stages of the default `tiny` recipe, the median
seconds per step (forward + backward, untrained model, 2 warm-up steps dropped) for each
bucket count, the ratio to one bucket, the padded-token share, and the loss (which must not
change). Without --data it synthesizes a 3000-image easy world in a temp dir first.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="DATA DIR with tokenizer.json")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--buckets", default="1,2,3,4")
    ap.add_argument("--limit", type=int, default=3000, help="train images loaded")
    args = ap.parse_args()

    from agevlm_edge.train.batches import collate, length_buckets
    from agevlm_edge.train.loop import Run, _generator, set_trainable
    from agevlm_edge.train.recipe import preset_recipe
    from agevlm_edge.train.steps import LMStep, VLMStep

    tmp = None
    data = args.data
    if data is None:
        from agevlm_edge.data.synth import synthesize
        from agevlm_edge.data.tokenizer import build_tokenizer

        tmp = tempfile.TemporaryDirectory()
        data = Path(tmp.name) / "data"
        synthesize(data, preset="easy", n_train=args.limit, n_val=100, n_test=50, seed=0)
        build_tokenizer(data)
    recipe = preset_recipe()
    run = Run(data, Path(tempfile.mkdtemp()), recipe, args.limit)
    run.cache_features()
    stages = {s.name: s for s in recipe.stages}
    counts = [int(k) for k in args.buckets.split(",")]
    print(f"{'stage':9} {'buckets':>7} {'s/step':>7} {'x 1 bucket':>10} {'padding':>8} {'loss':>8}")
    for name in ("lm", "guided", "instruct"):
        base = stages[name]
        set_trainable(run.model, base.train)
        ref = None
        for k in counts:
            stage = dataclasses.replace(base, length_buckets=k)
            module = LMStep(run.model) if base.kind == "lm" else VLMStep(run.model)
            step = run.step_lm if base.kind == "lm" else run.step_vlm
            times, real, padded = [], 0, 0
            for i in range(args.steps):
                t0 = time.perf_counter()
                out = step(module, stage, _generator(0, 0, i))
                out["loss"].backward()
                run.model.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
            for i in range(args.steps):   # padding share of the same batches, without the model
                draw = run.lm_samples if base.kind == "lm" else run.vlm_samples
                for part in length_buckets(draw(stage, _generator(0, 0, i)), k):
                    b = collate(part, run.cfg.pad_id, run.cfg.n_image_tokens)
                    real += int(b["attention_mask"].sum())
                    padded += b["attention_mask"].numel()
            med = statistics.median(times[2:] if len(times) > 3 else times)
            ref = ref or med
            print(f"{name:9} {k:>7} {med:>7.3f} {ref / med:>9.2f}x {1 - real / padded:>8.2f} "
                  f"{float(out['loss'].detach()):>8.4f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
