"""Why the mobile-gpu cross-attention pads its query and key: one com.microsoft
MultiHeadAttention node on WebGpuExecutionProvider vs the CPU provider vs numpy.

    .venv/bin/python scripts/probe_webgpu_mha.py        (needs .venv-webgpu: scripts/setup_webgpu.sh)

Builds one-node graphs (non-causal attention of S query tokens over L keys, N heads of size H,
keys and values as [B, L, N*H] or as BNSH [B, N, L, H], default or explicit scale; and the
export's form: query and key zero-padded to H+4 per head, keys [B, L, N*(H+4)], values
[B, L, N*H], scale H^-0.5), runs each on both providers in the onnxruntime-webgpu venv and
prints the largest absolute error of each against a numpy reference (inputs ~N(0, 1), so
outputs are O(1)). On this machine's only WebGPU adapter (Mesa's software Vulkan) every
single-query case of the plain node agreed to ~1e-6 and every multi-query case (S > 1, the
prefill; L > 8) was 5e-2 to 8e-1 off, whatever N, H, L, layout and scale, in
onnxruntime-webgpu 1.25.1 and 1.27.0 alike. Those cases take onnxruntime's flash-attention
kernel (query/key head size = value head size, a multiple of 4); it reads the keys in tiles
of the subgroup size (8 here), and its output matches a model of that kernel whose per-tile
scores are not reset between tiles to 3e-7, so the shader as compiled for this adapter keeps
them. With the padded query and key the head sizes differ, onnxruntime takes its other
attention kernels (still on WebGPU), and every case agrees to ~1e-6.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from agevlm_edge.ops import XATTN_QK_PAD as PAD

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv-webgpu" / "bin" / "python"

RUNNER = r"""
import json, sys
import numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.log_severity_level = 3
for case in json.loads(sys.argv[1]):
    feeds = dict(np.load(case + ".npz"))
    for prov in ("WebGpuExecutionProvider", "CPUExecutionProvider"):
        sess = ort.InferenceSession(case + ".onnx", so, providers=[prov])
        np.save(f"{case}.{prov}.npy", sess.run(None, feeds)[0])
print("ok")
"""


def mha_model(S: int, L: int, N: int, H: int, bnsh: bool, scale: float | None, pad: int = 0
              ) -> onnx.ModelProto:
    kv_shape = [1, N, L, H] if bnsh else [1, L, N * H]
    k_shape = [1, L, N * (H + pad)] if pad else kv_shape
    ins = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, S, N * (H + pad)]),
           helper.make_tensor_value_info("k", TensorProto.FLOAT, k_shape),
           helper.make_tensor_value_info("v", TensorProto.FLOAT, kv_shape)]
    attrs = {"num_heads": N} | ({"scale": scale} if scale is not None else {})
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", **attrs)
    graph = helper.make_graph([node], "mha", ins, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


def reference(q, k, v, N: int, H: int, bnsh: bool, scale: float | None) -> np.ndarray:
    S = q.shape[1]
    heads = (lambda x: x.reshape(1, -1, N, H).transpose(0, 2, 1, 3))
    qh, kh, vh = heads(q), (k if bnsh else heads(k)), (v if bnsh else heads(v))
    s = qh @ kh.transpose(0, 1, 3, 2) * (scale if scale is not None else H ** -0.5)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(1, S, N * H)


def main() -> None:
    if not VENV_PY.is_file():
        sys.exit(f"no {VENV_PY}: run scripts/setup_webgpu.sh first")
    rng = np.random.default_rng(0)
    cases = [(*c, False) for c in itertools.product([1, 2, 7, 32], [16, 64], [4, 8], [16, 64],
                                                    [False, True], [None, 0.3])]
    cases += [(S, L, N, H, False, None, True) for S, L, N, H in
              itertools.product([1, 2, 7, 32], [16, 64], [4, 8], [16, 64])]
    pad_heads = lambda x, N, H: np.pad(x.reshape(*x.shape[:2], N, H), ((0, 0),) * 3 + ((0, PAD),)
                                       ).reshape(*x.shape[:2], -1)
    with tempfile.TemporaryDirectory() as tmp:
        names, refs = [], {}
        for i, (S, L, N, H, bnsh, scale, padded) in enumerate(cases):
            kv = (1, N, L, H) if bnsh else (1, L, N * H)
            q = rng.standard_normal((1, S, N * H)).astype(np.float32)
            k, v = (rng.standard_normal(kv).astype(np.float32) for _ in range(2))
            name = f"{tmp}/c{i}"
            if padded:                       # the export's form (ops.cross_mha)
                onnx.save(mha_model(S, L, N, H, bnsh, H ** -0.5, PAD), name + ".onnx")
                np.savez(name + ".npz", q=pad_heads(q, N, H), k=pad_heads(k, N, H), v=v)
            else:
                onnx.save(mha_model(S, L, N, H, bnsh, scale), name + ".onnx")
                np.savez(name + ".npz", q=q, k=k, v=v)
            names.append(name)
            refs[name] = reference(q, k, v, N, H, bnsh, scale)
        proc = subprocess.run([str(VENV_PY), "-c", RUNNER, json.dumps(names)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"the WebGPU run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        print(f"{'S':>3} {'L':>3} {'N':>2} {'H':>3} {'kv layout':>14} {'scale':>5} {'webgpu err':>10} {'cpu err':>8}")
        worst: dict[tuple[bool, bool], float] = {}
        for name, (S, L, N, H, bnsh, scale, padded) in zip(names, cases):
            err = {p: float(np.abs(np.load(f"{name}.{p}ExecutionProvider.npy") - refs[name]).max())
                   for p in ("WebGpu", "CPU")}
            worst[padded, S > 1] = max(worst.get((padded, S > 1), 0.0), err["WebGpu"])
            layout = "BSD, q/k padded" if padded else "BNSH" if bnsh else "BSD"
            print(f"{S:3d} {L:3d} {N:2d} {H:3d} {layout:>14} {scale or '-':>5} "
                  f"{err['WebGpu']:10.1e} {err['CPU']:8.1e}")
    for padded in (False, True):
        print(f"\nlargest WebGPU error{', query and key padded' if padded else ''}: single-query "
              f"(decode) {worst[padded, False]:.1e}, multi-query (prefill) {worst[padded, True]:.1e}", end="")
    print()


if __name__ == "__main__":
    main()
