"""Attention and normalisation fusion per target.

cpu: the dynamo exporter at opset 23 already emits the fused forms this target wants:
SDPA becomes the standard `Attention` op (GQA natively, for self- and cross-attention) and
its onnxscript optimizer fuses our RMSNorm and HF-style rotary into `RMSNormalization` and
`RotaryEmbedding` (model.apply_rope is written in the form that rule matches). Here we only
count them, so a model change that silently breaks a fusion shows up in the manifest and in
tests.
"""

from __future__ import annotations

import collections
from pathlib import Path

from agevlm_edge.errors import BadInput


def op_counts(path: Path) -> collections.Counter:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return collections.Counter(n.op_type for n in m.graph.node)


def apply_target(out_dir: Path, target: str, fused: bool) -> dict:
    """Rewrite the graphs in ``out_dir`` for ``target``; returns what was fused, by op."""
    if target == "mobile-gpu":
        raise BadInput("the mobile-gpu target is not implemented yet; export with --target cpu")
    ops = op_counts(out_dir / "decoder.onnx")
    return {"decoder": {k: ops.get(k, 0) for k in ("Attention", "RMSNormalization",
                                                   "RotaryEmbedding")}}
