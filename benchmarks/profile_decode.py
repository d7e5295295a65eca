"""Where a decode step's time goes: onnxruntime's profiler over an export's decoder calls.

    python benchmarks/profile_decode.py EXPORT_DIR [--new-tokens 48] [--rounds 2]

Runs the device runtime (CPU provider) with its decoder session profiled: one gray image, a
32-token prompt, greedy steps. Prints each op type's share of kernel time, each model part's
(quant.schemes.part_of, from the node names, which follow module paths; "other" for nodes
of no part), and the share of each call spent outside any kernel. Shares, not absolute times: the profiler
slows every call alike.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def main() -> None:
    import onnxruntime as ort

    from agevlm_edge.quant.schemes import part_of
    from agevlm_edge.runtime.session import GenerationConfig, Runtime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    rt = Runtime(a.export)
    tmp = tempfile.mkdtemp(prefix="profile-decode-")
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tmp, "decoder")
    rt.decoder = ort.InferenceSession(str(a.export / "decoder.onnx"), opts,
                                      providers=["CPUExecutionProvider"])
    image = rt.encode_images([np.full((3, rt.image_size, rt.image_size), 100, np.uint8)])
    prompt = [rt.bos_id] + [10 + i for i in range(31)]
    for _ in range(a.rounds):
        rt.generate(image, [prompt], GenerationConfig(max_new_tokens=a.new_tokens))
    events = json.load(open(glob.glob(rt.decoder.end_profiling())[0]))
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    by_op, by_part = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            by_part[part_of(e["name"][: -len("_kernel_time")], "decoder") or "other"] += e["dur"]
    kernels = sum(by_op.values())
    print(f"{len(runs)} decoder calls, median {statistics.median(runs) / 1e3:.2f} ms (profiled); "
          f"outside kernels {1 - kernels / sum(runs):.1%} of call time")
    for name, v in by_op.most_common(10):
        print(f"  {name:28} {v / kernels:6.1%}")
    for name, v in by_part.most_common():
        print(f"  part {name:23} {v / kernels:6.1%}")


if __name__ == "__main__":
    main()
