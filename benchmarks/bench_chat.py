"""A conversation's kept self-attention cache vs answering each turn from an empty one.

    python benchmarks/bench_chat.py EXPORT_DIR [--turns 6] [--new-tokens 16] [--rounds 3]
        [--image PATH] [--threads N]

A caption, then questions. `Runtime.chat` (`agevlm infer --chat`) keeps the cache from turn to turn, so a turn's prefill
feeds only its own tokens; the baseline answers the same turn by one generation over the whole
transcript so far (the same tokens and answers: tests/test_export.py checks they agree), whose
prefill grows with every turn. Both use the image's cross K/V computed once. Each round runs
the conversation, then the baseline on its transcripts, in this process; printed: per turn,
the median time to first token and to the whole answer across rounds, and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ("Is there a red circle in the image?", "What colour is the square?",
             "How many stars are there?", "Is the cube left of the ball?",
             "Is there a green triangle in the image?", "What is above the circle?")


def timed(fn, *args, **kw) -> tuple[float, float]:
    """(seconds to the first chosen token, seconds to the end) of a generate-like call."""
    t0, first = time.perf_counter(), []
    fn(*args, on_token=lambda _r, _t: first or first.append(time.perf_counter()), **kw)
    end = time.perf_counter()
    return ((first[0] if first else end) - t0), end - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image", default=None, help="an image file (default: uniform noise)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import numpy as np

    from agevlm_edge.prompts import caption_prompt, question_prompt
    from agevlm_edge.runtime.session import GenerationConfig, Runtime

    rt = Runtime(args.export_dir, threads=args.threads)
    if args.image:
        pixels = rt.load_image(args.image)
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (3, rt.image_size, rt.image_size), np.uint8)
    state = rt.encode_images([pixels])
    cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    prompts = ([caption_prompt()] + [question_prompt(q) for q in QUESTIONS] * args.turns)[:args.turns]
    kept = {"ttft": [[] for _ in prompts], "turn": [[] for _ in prompts]}
    fresh = {"ttft": [[] for _ in prompts], "turn": [[] for _ in prompts]}
    for _ in range(args.rounds):
        conv, transcripts = rt.chat(state), []
        for k, p in enumerate(prompts):
            transcripts.append(conv.turn_ids(p))
            a, b = timed(conv.ask, p, cfg)
            kept["ttft"][k].append(a)
            kept["turn"][k].append(b)
        for k, ids in enumerate(transcripts):
            a, b = timed(rt.generate, state, [ids], cfg)
            fresh["ttft"][k].append(a)
            fresh["turn"][k].append(b)
    med = lambda xs: statistics.median(xs) * 1e3   # noqa: E731  (ms)
    print(f"{Path(args.export_dir).name}: {args.turns} turns of {args.new_tokens} new tokens at most, "
          f"{args.rounds} rounds (median ms)")
    print(f"{'turn':>4} {'transcript':>10} | {'TTFT kept':>9} {'TTFT fresh':>10} {'ratio':>6} | "
          f"{'turn kept':>9} {'turn fresh':>10} {'ratio':>6}")
    for k, ids in enumerate(transcripts):
        tk, tf = med(kept["ttft"][k]), med(fresh["ttft"][k])
        uk, uf = med(kept["turn"][k]), med(fresh["turn"][k])
        print(f"{k + 1:>4} {len(ids):>10} | {tk:9.1f} {tf:10.1f} {tf / tk:5.2f}x | "
              f"{uk:9.1f} {uf:10.1f} {uf / uk:5.2f}x")
    total_k = statistics.median(sum(r) for r in zip(*kept["turn"])) * 1e3
    total_f = statistics.median(sum(r) for r in zip(*fresh["turn"])) * 1e3
    print(f"whole conversation: kept cache {total_k:.1f} ms, fresh per turn {total_f:.1f} ms "
          f"({total_f / total_k:.2f}x)")


if __name__ == "__main__":
    main()
