"""KV cache in device memory vs host memory between decode steps, on a GPU provider.

    .venv-webgpu/bin/python benchmarks/bench_kv_binding.py EXPORT_DIR [--provider webgpu]
        [--rounds 5] [--new-tokens 32] [--prompt-len 32]

The device runtime binds the decoder's present K/V to the provider's memory (cuda, webgpu:
`Runtime(kv_on_device=True)`, the default), so a decode step reads the cache where the last
one wrote it; the baseline binds them to host memory, a round trip of the whole cache per
step. On webgpu, an export whose self-attention is GroupQueryAttention ("kv_cache":
"inplace") also has its cache preallocated there and appended to in place; the third mode
keeps it in device memory but copied into a grown tensor every step (`kv_inplace=False`).
All run in this process, alternating for --rounds rounds (median per-token decode latency of
each round, then the median across rounds), and the ratios are printed. Runs in any
environment whose onnxruntime has the provider (for webgpu, the venv scripts/setup_webgpu.sh
makes; it needs only numpy, onnxruntime, tokenizers and Pillow).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir")
    ap.add_argument("--provider", default="webgpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    args = ap.parse_args()

    from agevlm_edge.runtime.bench import measure_runtime
    from agevlm_edge.runtime.session import Runtime

    rts = {"device": Runtime(args.export_dir, provider=args.provider),
           "host": Runtime(args.export_dir, provider=args.provider, kv_on_device=False)}
    labels = {"device": "device memory", "host": "host memory"}
    if rts["device"].kv_inplace:
        rts["device grown"] = Runtime(args.export_dir, provider=args.provider, kv_inplace=False)
        labels.update({"device": "device memory, in place", "device grown": "device memory, grown copy"})
    ms: dict[str, list[float]] = {m: [] for m in rts}
    for _ in range(args.rounds):
        for mode, rt in rts.items():
            r = measure_runtime(rt, args.prompt_len, args.new_tokens, repeats=1)
            ms[mode].append(r["decode_ms_per_token"])
    med = {m: statistics.median(v) for m, v in ms.items()}
    for m, v in ms.items():
        print(f"KV cache in {labels[m]:25}: {med[m]:8.2f} ms/token (rounds: "
              f"{', '.join(f'{x:.2f}' for x in v)})")
    print(f"device / host decode speed: {med['host'] / med['device']:.2f}x")
    ratios = {"speedup": med["host"] / med["device"]}
    if "device grown" in med:
        ratios["inplace_speedup"] = med["device grown"] / med["device"]
        print(f"in place / grown copy (both in device memory) decode speed: "
              f"{ratios['inplace_speedup']:.2f}x")
    print(json.dumps({"export": args.export_dir, "provider": args.provider, "ms_per_token": ms,
                      **ratios}))


if __name__ == "__main__":
    main()
