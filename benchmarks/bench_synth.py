"""Synthetic-world generation speed: 1 worker vs all cores, measured in one run.

    python benchmarks/bench_synth.py [--n-train 20000] [--repeats 1]

Prints images/s for each worker count and their ratio. The issue's target: 20k training
images (plus val and the four test splits) in about a minute on this 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from agevlm_edge.data.synth import synthesize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    results = {}
    for workers in sorted({1, cores}):
        times = []
        for r in range(args.repeats):
            out = Path(tempfile.mkdtemp()) / "data"
            t0 = time.perf_counter()
            synthesize(out, n_train=args.n_train, workers=workers, seed=r)
            times.append(time.perf_counter() - t0)
            n_images = sum(1 for _ in out.rglob("*.png"))
            shutil.rmtree(out.parent)
        results[workers] = (statistics.median(times), n_images)
        print(f"workers={workers}: {n_images} images in {results[workers][0]:.1f}s median "
              f"({n_images / results[workers][0]:.0f} images/s)")
    if len(results) > 1:
        print(f"speed-up {cores} workers vs 1: {results[1][0] / results[cores][0]:.2f}x")


if __name__ == "__main__":
    main()
