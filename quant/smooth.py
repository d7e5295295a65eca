"""SmoothQuant (Xiao et al. 2023, arXiv 2211.10438) on an ONNX graph, before int8 quantization.

int8 activations are quantized per tensor (dynamic: one range per call; QDQ: one calibrated
range), so a few input channels of much larger magnitude (real LLMs have them: SmolLM2's
int8-dynamic perplexity rose 90% without any treatment) leave the other channels a handful of
levels. Weights are quantized per output channel and have room. SmoothQuant moves the
difficulty across: for the activation X [.., K] feeding MatMuls with weights W [K, N]

    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha)      (per input channel j)
    X W = (X / s) (diag(s) W)

which is exact in fp32. Here X / s is a Mul by 1/s inserted once per activation (q/k/v share
their input, so they share the Mul and each gets its rows scaled), where the paper folds 1/s
into the preceding norm: the same arithmetic, one elementwise op more, and it also covers
activations with no norm before them (o_proj, down_proj, the projector). max|X_j| comes from
calibration feeds through gptq.activation_rows, as GPTQ's statistics.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .gptq import _find_node, _initializer, _quantizable, activation_rows

EPS = 1e-5


def collect_absmax(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]],
                   activations: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each named tensor over the feeds, float64."""
    out: dict[str, np.ndarray] = {}
    for values in activation_rows(model, feeds, activations):
        for a, x in values.items():
            x = np.abs(x).max(0)
            out[a] = np.maximum(out[a], x) if a in out else x
    if len(out) != len(set(activations)):
        raise ValueError("collect_absmax needs at least one feed")
    return out


def smooth_model(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]],
                 node_names: Sequence[str], alpha: float = 0.5) -> dict:
    """Smooth the activation inputs of the named MatMuls (those with a 2-D float32 weight
    initializer that only they use) in place; returns {"smoothed": [...], "skipped": [...],
    "activations": n}. The graph computes the same function afterwards (up to float rounding).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    groups: dict[str, list[onnx.NodeProto]] = {}      # activation -> the MatMuls it feeds
    skipped = []
    for name in node_names:
        node = _find_node(model.graph, name)[1] if _quantizable(model, name) else None
        if node is not None and uses.get(node.input[1], 0) == 1:   # a shared weight cannot take two scalings
            groups.setdefault(node.input[0], []).append(node)
        else:
            skipped.append(name)
    targets = [n.name for nodes in groups.values() for n in nodes]
    if not groups:
        return {"smoothed": [], "skipped": skipped, "activations": 0}
    absmax = collect_absmax(model, feeds, list(groups))
    graph = model.graph
    for act, nodes in groups.items():
        weights = [numpy_helper.to_array(_initializer(graph, n.input[1])).astype(np.float64)
                   for n in nodes]
        w_max = np.max([np.abs(w).max(1) for w in weights], axis=0)          # [K]
        s = np.power(np.maximum(absmax[act], EPS), alpha) / np.power(np.maximum(w_max, EPS), 1 - alpha)
        s = np.where((absmax[act] > 0) & (w_max > 0), s, 1.0)               # dead channels: leave
        for n, w in zip(nodes, weights):
            init = _initializer(graph, n.input[1])
            init.CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), init.name))
        prefix = nodes[0].name.split("/", 1)[0]
        inv, out = f"{prefix}.smooth_inv_scale", f"{prefix}/SmoothQuant_output"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        names = {n.name for n in nodes}
        for n in nodes:
            n.input[0] = out
        first = min(i for i, g in enumerate(graph.node) if g.name in names)
        graph.node.insert(first, helper.make_node("Mul", [act, inv], [out],
                                                  name=f"{prefix}/SmoothQuant_Mul"))
    return {"smoothed": targets, "skipped": skipped, "activations": len(groups)}
