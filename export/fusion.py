"""Attention and normalisation fusion per target, and the mobile artifacts.

cpu: the dynamo exporter at opset 23 already emits the fused forms this target wants:
SDPA becomes the standard `Attention` op (GQA natively; cross-attention when exported without
its probabilities, which need the unfused chain; self-attention with `--kv-cache concat` or
where GroupQueryAttention does not fit, else com.microsoft `GroupQueryAttention` from
export.contrib, for the runtime's in-place cache) and
its onnxscript optimizer fuses our RMSNorm and HF-style rotary into `RMSNormalization` and
`RotaryEmbedding` (ops.apply_rope is written in the form that rule matches). Here we only
count them, so a model change that silently breaks a fusion shows up in the manifest and in
tests.

mobile-gpu: exported at opset 18 (phone and web runtimes take the contrib ops, not opset-23
Attention) with the self-attention already com.microsoft `GroupQueryAttention` (rotary fused)
and the cross-attention one `MultiHeadAttention` whose query and key are zero-padded per head
(export.contrib; its K/V come from vision.onnx in that layout), then onnxscript's ORT
transformer fusions rewrite the norms into `SimplifiedLayerNormalization` /
`SkipSimplifiedLayerNormalization` (and SDPA into `MultiHeadAttention` for models
GroupQueryAttention does not fit), ops the WebGPU execution provider runs. The vision graph
gets the norm and gelu fusions only (ort_fuse). On this machine's WebGPU adapter (Mesa's
software Vulkan) onnxruntime's flash-attention prefill kernel, which GroupQueryAttention and
MultiHeadAttention with equal query/value head sizes take for every multi-token query, is
wrong beyond 8 keys (scripts/probe_webgpu_mha.py; single-token steps are right): the padded
cross-attention avoids it in the graph, and the device runtime checks each GPU session once
and prefills one token per call where it finds the fault (Runtime.multi_token_fault).
fp16 is `agevlm quantize --scheme fp16` of this
export (tests/test_webgpu.py runs it on WebGPU). The ORT-format files (`*.ort`, Fixed
optimisation: CPU-EP rewrites baked in; export.parity.check_ort_parity runs them against the
.onnx graphs, and `agevlm infer --graph-format ort` runs them) and onnxruntime's mobile
usability verdicts (NNAPI, CoreML) are added to the EXPORT DIR and the manifest, with
vision_fixed.onnx: the vision graph unfused and with static shapes, for the NNAPI / CoreML
providers (fixed_vision).
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

GRAPHS = ("vision", "decoder")


def op_counts(path_or_model) -> collections.Counter:
    """Nodes per op type ("com.microsoft.X" for contrib ops), of a file or a loaded model."""
    import onnx

    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else \
        onnx.load(str(path_or_model), load_external_data=False)
    return collections.Counter((f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type
                               for n in m.graph.node)


def target_opset(target: str, fused: bool) -> int:
    return 23 if target == "cpu" and fused else 18


def ort_fuse(path: Path, attention: bool = True) -> dict[str, int]:
    """onnxscript's ORT transformer fusions (attention, norms, rotary, gelu), in place;
    returns the fusions applied by name.

    `fuse_xformers` rather than `optimize_for_ort`: the latter also folds Transpose/scale
    into com.microsoft `FusedMatMul`, which the WebGPU execution provider has no kernel for
    (measured: those MatMuls fell back to the CPU). ``attention=False``: the norm and gelu
    fusions only, attention stays a MatMul/Softmax chain (the vision graph: on WebGPU the
    bidirectional com.microsoft `Attention` / `MultiHeadAttention` these fusions make of a
    ViT's attention gave outputs 14% of their scale away from the CPU provider's, measured on
    a SigLIP tower's first layer, where the chain agrees to 1e-6).
    """
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import _core as fusions

    from .graphio import save_graph

    model = ir.load(str(path))
    if attention:
        model, counts = fusions.fuse_xformers(model)
    else:
        model = fusions._pre_optimize(model)
        counts = {name: fn(model) for name, fn in (
            ("erf_gelu", fusions.fuse_erfgelu), ("rms_normalization", fusions.fuse_rms_normalization),
            ("skip_layer_normalization", fusions.fuse_skip_layer_normalization),
            ("skip_rms_normalization", fusions.fuse_skip_rms_normalization),
            ("gelu", fusions.fuse_gelu), ("bias_gelu", fusions.fuse_bias_gelu))}
        fusions.optimize(model)
    save_graph(model, path)
    return {k: v for k, v in sorted(counts.items()) if v}


def to_ort_format(out_dir: Path) -> dict:
    """`convert_onnx_models_to_ort --optimization_style Fixed` for each graph; the .ort files,
    with what they need at run time. Fixed bakes in this onnxruntime's CPU execution provider
    rewrites (e.g. its internal NHWC Conv), so they load on this onnxruntime version or a newer
    one, and not on WebGPU (measured with onnxruntime-webgpu 1.27: a WebGPU session refused
    vision.ort's NHWC Conv, and every session refused decoder.ort, written with a newer
    GroupQueryAttention schema); WebGPU takes the .onnx graphs."""
    import onnxruntime as ort

    made = []
    for name in GRAPHS:
        src = out_dir / f"{name}.onnx"
        proc = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
                               str(src), "--optimization_style", "Fixed"],
                              capture_output=True, text=True)
        ort_file = out_dir / f"{name}.ort"
        if proc.returncode or not ort_file.is_file():
            raise RuntimeError(f"ORT-format conversion of {src.name} failed: "
                               f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        made.append(ort_file.name)
    for extra in out_dir.glob("*.config"):       # the converter's op-type config: not needed
        extra.unlink()
    return {"files": made, "optimization_style": "Fixed", "provider": "cpu",
            "onnxruntime": ort.__version__}


def mobile_usability(path: Path) -> dict:
    """onnxruntime's check_onnx_model_mobile_usability verdicts for one graph."""
    proc = subprocess.run([sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability",
                           str(path)], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    verdicts = {}
    for m in re.finditer(r"Model should perform well with (.+?) (as is|if modified to have fixed "
                         r"input shapes): (YES|NO|MAYBE)", text):
        key = m.group(1) + (" (fixed shapes)" if m.group(2) != "as is" else "")
        verdicts[key] = m.group(3)
    rec = re.search(r"For optimal performance the model should be used with the (.+?)\.?\s*$", text, re.M)
    return {"verdicts": verdicts, "recommendation": rec.group(1).strip() if rec else None}


FIXED_VISION = "vision_fixed.onnx"
DECODER_NOT_FIXED = ("the decoder keeps dynamic shapes: its self-attention cache grows every "
                     "step, and a fixed-shape decoder would need a static cache of the whole "
                     "context, which is not built")


def fixed_vision(out_dir: Path) -> dict:
    """vision_fixed.onnx: vision.onnx as exported (before the mobile fusions), one image per
    call, every shape static. NNAPI and CoreML take only static shapes, and none of the contrib
    ops the fusions make (BiasGelu, SimplifiedLayerNormalization): onnxruntime's checker gives
    this graph to CoreML MLProgram whole on the tiny tower, where the fused dynamic one gets
    NO (the manifest records both verdicts). The runtime loads it on --provider coreml|nnapi."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    from .graphio import save_graph

    model = onnx.load(str(out_dir / "vision.onnx"))
    inp = model.graph.input[0]
    shape = [1] + [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    make_input_shape_fixed(model.graph, inp.name, shape)
    fix_output_shapes(model)
    save_graph(model, out_dir / FIXED_VISION)
    return {"file": FIXED_VISION, "input_shape": shape, "decoder": DECODER_NOT_FIXED}


def apply_target(out_dir: Path, target: str, fused: bool) -> dict:
    """Rewrite the graphs in ``out_dir`` for ``target``; returns what was done, for the manifest."""
    if target == "cpu":
        ops = op_counts(out_dir / "decoder.onnx")
        return {"decoder": {k: ops.get(k, 0) for k in ("Attention", "com.microsoft.GroupQueryAttention",
                                                       "RMSNormalization", "RotaryEmbedding")}}
    done: dict = {"fixed_shapes": fixed_vision(out_dir), "fusions": {}, "usability": {}}
    for name in GRAPHS:
        done["fusions"][name] = ort_fuse(out_dir / f"{name}.onnx", attention=name == "decoder")
    for name in GRAPHS + ("vision_fixed",):
        done["usability"][name] = mobile_usability(out_dir / f"{name}.onnx")
    done["ort_format"] = to_ort_format(out_dir)
    return done
