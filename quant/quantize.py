"""`agevlm quantize`: EXPORT DIR (fp32) + Recipe -> EXPORT DIR (int8 / int4 / fp16).

    quantize_export(fp32 dir, out, make_recipe("int4", {"vision": "int8-dynamic"}), calib=DATA)
      per graph (vision.onnx, decoder.onnx):
        nodes --schemes.part_of / layer_of--> part, layer --recipe--> scheme
        WeightOnly  (MatMul -> MatMulNBits, Gather -> GatherBlockQuantized): RTN by onnxruntime's
                    MatMulNBitsQuantizer, GPTQ by quant.gptq on calibration activations
        Int8Dynamic (MatMul/Gather/Conv -> *Integer ops): optimum's preset, onnxruntime's
                    quantize_dynamic from the file
                    (smooth=ALPHA: quant.smooth's SmoothQuant first, for either int8 kind)
        Int8QDQ     (QuantizeLinear/DequantizeLinear): onnxruntime quantize_static, calibrated
        Fp16        OnnxModel.convert_float_to_float16, fp32 inputs and outputs but the KV cache
      then the quality check (quant.quality: top-1 agreement and KL vs fp32) and manifest.json.
The output is built aside and renamed into place; the fp32 EXPORT DIR is never touched.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import click
import onnx
from onnx import numpy_helper

from agevlm_edge import __version__
from agevlm_edge.errors import BadInput
from agevlm_edge.export.graphio import save_graph
from agevlm_edge.fsutil import check_out, staged_dir
from agevlm_edge.runtime.manifest import export_bytes, load_manifest

from .calib import CalibSet
from .smooth import smooth_model
from .schemes import (Fp16, Fp32, Int8Dynamic, Int8QDQ, PARTS, Recipe, WeightOnly, label,
                      layer_of, part_of)

GRAPHS = ("vision", "decoder")
WEIGHT_OPS = ("MatMul", "Gather", "Conv")


def weight_nodes(model: onnx.ModelProto, graph: str) -> dict[str, list[str]]:
    """{part: [node names]} of the nodes that carry a weight initializer."""
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, list[str]] = {p: [] for p in PARTS}
    for n in model.graph.node:
        part = part_of(n.name, graph)
        if part and n.op_type in WEIGHT_OPS and any(i in inits for i in n.input):
            out[part].append(n.name)
    return out


def fold_tied_lm_head(model: onnx.ModelProto) -> bool:
    """Give a tied lm_head its own [D, V] weight so the quantizers can see it.

        embed W [V, D] --Transpose--> [D, V] --> lm_head/MatMul    becomes
        lm_head.weight_t [D, V] (initializer) --> lm_head/MatMul

    Done whenever the embedding or lm_head is quantized, so each quantizer sees a weight
    only its own part uses (the embedding and lm_head take their schemes separately); with
    both fp32 nothing folds.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type != "MatMul" or not n.name.startswith("lm_head/"):
            continue
        t = producer.get(n.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            return False
        w = numpy_helper.to_array(inits[t.input[0]]).T.copy()
        g.initializer.append(numpy_helper.from_array(w, "lm_head.weight_t"))
        n.input[1] = "lm_head.weight_t"
        if not any(t.output[0] in m.input for m in g.node):
            g.node.remove(t)
        return True
    return False


def _weight_only(model: onnx.ModelProto, names: list[str], s: WeightOnly, calib, graph: str
                 ) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  MatMulNBitsQuantizer)

    kinds = {n.name: n.op_type for n in model.graph.node}
    if s.algo == "gptq":
        from .gptq import gptq_model

        matmuls = [n for n in names if kinds[n] == "MatMul"]
        gptq_model(model, calib.feeds(graph, s.calib_samples), matmuls, bits=s.bits,
                   block_size=s.block_size, symmetric=s.symmetric,
                   accuracy_level=s.accuracy_level)
        names = [n for n in names if kinds[n] == "Gather"]      # lookups: no activations, RTN
    # Conv (the vision stem) stays fp32; GatherBlockQuantized takes 4 bits only; HQQ no Gather.
    ops = ("MatMul", "Gather") if s.bits == 4 and s.algo != "hqq" else ("MatMul",)
    names = [n for n in names if kinds[n] in ops]
    if not names:
        return model
    axes = (("MatMul", 0), ("Gather", 1))[:len(ops)]
    if s.algo == "hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

        cfg = HQQWeightOnlyQuantConfig(block_size=s.block_size, bits=s.bits,
                                       op_types_to_quantize=ops, quant_axes=axes)
    else:
        cfg = DefaultWeightOnlyQuantConfig(block_size=s.block_size, is_symmetric=s.symmetric,
                                           accuracy_level=s.accuracy_level, bits=s.bits,
                                           op_types_to_quantize=ops, quant_axes=axes)
    # nodes_to_include only adds to op_types_to_quantize: exclude everything else instead.
    keep = set(names)
    others = [n.name for n in model.graph.node if n.name not in keep]
    q = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=cfg)
    q.process()
    return q.model.model


def _int8_dynamic(src: Path, names: list[str], s: Int8Dynamic, tmp: Path) -> onnx.ModelProto:
    """The graph at ``src`` (weights beside it) with ``names`` quantized under optimum's preset.

    optimum's ORTQuantizer gives the preset's settings; onnxruntime's quantize_dynamic applies
    them reading from the file: ORTQuantizer.quantize loads the graph and its quantizer saves
    and reloads it for shape inference, one copy more than quantize_dynamic, which loads the
    file with shape inference already done (peak RSS 4196 vs 3166 MB on a 912 MB decoder,
    benchmarks/bench_quant_memory.py).
    """
    from onnxruntime.quantization import quantize_dynamic
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    qcfg = getattr(AutoQuantizationConfig, s.preset)(
        is_static=False, per_channel=s.per_channel, nodes_to_quantize=names,
        operators_to_quantize=list(WEIGHT_OPS))
    dst = tmp / "dyn_out" / "model.onnx"
    dst.parent.mkdir(exist_ok=True)
    quantize_dynamic(src, dst, op_types_to_quantize=[getattr(o, "value", o) for o in qcfg.operators_to_quantize],
                     per_channel=qcfg.per_channel, reduce_range=qcfg.reduce_range,
                     weight_type=qcfg.weights_dtype, nodes_to_quantize=qcfg.nodes_to_quantize,
                     nodes_to_exclude=qcfg.nodes_to_exclude, use_external_data_format=True,
                     extra_options={"WeightSymmetric": qcfg.weights_symmetric,   # as ORTQuantizer
                                    "ActivationSymmetric": qcfg.activations_symmetric,
                                    "ForceSymmetric": qcfg.activations_symmetric and qcfg.weights_symmetric,
                                    "MatMulConstBOnly": False})
    return onnx.load(str(dst))


def _int8_qdq(model: onnx.ModelProto, names: list[str], s: Int8QDQ, calib, graph: str,
              tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds = feeds
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

        def __len__(self):
            return len(self.feeds)

        def set_range(self, start_index: int, end_index: int):
            self.it = iter(self.feeds[start_index:end_index])

    src, dst = tmp / f"qdq_{graph}_in.onnx", tmp / f"qdq_{graph}_out.onnx"
    save_graph(model, src)
    every_op = s.ops == "all"
    quantize_static(str(src), str(dst), Reader(calib.feeds(graph, s.calib_samples)),
                    quant_format=QuantFormat.QDQ, per_channel=s.per_channel,
                    activation_type=QuantType.QUInt16 if s.activations == "uint16" else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax,
                                      "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[s.calibration],
                    op_types_to_quantize=None if every_op else ["MatMul", "Gather"],
                    nodes_to_quantize=None if every_op else names, use_external_data_format=True,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                   # the histogram estimators stack a batch's activations into
                                   # one array, which fails on prompts of different lengths:
                                   # one sample per batch (histograms merge across batches)
                                   **({"CalibStridedMinMax": 1} if s.calibration != "minmax" else {})})
    return onnx.load(str(dst))


def quantize_graph(src: Path, graph: str, recipe: Recipe, calib, tmp: Path) -> tuple[onnx.ModelProto, dict]:
    """One graph of the fp32 export under ``recipe``; returns (model, what was done)."""
    model = onnx.load(str(src))
    if all(isinstance(recipe.scheme(p), Fp16) for p in PARTS):
        from onnxruntime.transformers.onnx_model import OnnxModel

        # inputs and outputs stay fp32, except the decoder's KV cache: fp32 there would put a
        # Cast of the whole cache on each side of every attention op at every step, and an
        # in-place cache would no longer be the op's own buffer (the runtime follows the
        # graph's cache dtype)
        keep = True if graph != "decoder" else [
            v.name for v in (*model.graph.input, *model.graph.output)
            if not v.name.startswith(("past_", "present_"))]
        om = OnnxModel(model)
        with contextlib.redirect_stdout(io.StringIO()):   # it prints a shape-inference note
            om.convert_float_to_float16(keep_io_types=keep)
        return om.model, {"fp16": "whole graph" + (", KV cache fp16" if graph == "decoder" else "")}
    if graph == "decoder" and not all(isinstance(recipe.scheme(p), Fp32) for p in ("embed", "lm_head")):
        fold_tied_lm_head(model)
    assigned: dict = {}                           # scheme -> node names (part, then layer)
    for p, names in weight_nodes(model, graph).items():
        for n in names:
            assigned.setdefault(recipe.scheme_for(p, layer_of(n)), []).append(n)
    done: dict = {}
    # Weight-only first (its quantizer skips nodes already rewritten), then int8 kinds; each
    # distinct scheme quantizes exactly the nodes assigned to it.
    order = sorted({s for s in recipe.schemes() if not isinstance(s, Fp32)},
                   key=lambda s: (not isinstance(s, WeightOnly), isinstance(s, Int8QDQ), str(s)))
    for s in order:
        names = assigned.get(s, [])
        if not names and not (isinstance(s, Int8QDQ) and s.ops == "all"):
            continue
        if getattr(s, "smooth", 0):
            done[f"smoothquant alpha {s.smooth:g}"] = smooth_model(
                model, calib.feeds(graph, s.calib_samples), names, s.smooth)["activations"]
        if isinstance(s, WeightOnly):
            model = _weight_only(model, names, s, calib, graph)
        elif isinstance(s, Int8Dynamic):
            src = tmp / "dyn_in" / "model.onnx"           # past 2 GB as well: weights beside it
            src.parent.mkdir(exist_ok=True)
            save_graph(model, src)
            del model                                      # the quantizer reads the file
            model = _int8_dynamic(src, names, s, tmp)
        elif isinstance(s, Int8QDQ):
            model = _int8_qdq(model, names, s, calib, graph, tmp)
        done[label(s)] = len(names)
    return model, done


def part_bytes(model: onnx.ModelProto, graph: str) -> dict[str, int]:
    """Initializer bytes by the part of the node that uses them ("other": norms, rotary
    tables), looking through the DequantizeLinear / Transpose a quantizer puts in between."""
    consumer: dict[str, onnx.NodeProto] = {}
    for n in model.graph.node:
        for i in n.input:
            consumer.setdefault(i, n)

    def user(name: str) -> str:
        node = consumer.get(name)
        for _ in range(4):
            if node is None or node.op_type not in ("DequantizeLinear", "Transpose", "Cast"):
                break
            node = consumer.get(node.output[0])
        return node.name if node is not None else ""

    out: dict[str, int] = {}
    for init in model.graph.initializer:
        part = part_of(user(init.name), graph) or "other"
        nbytes = len(init.raw_data) or numpy_helper.to_array(init).nbytes
        out[part] = out.get(part, 0) + nbytes
    return out


def _check_inputs(model_dir: Path, out: Path, recipe: Recipe, calib_dir, calib_text,
                  overwrite: bool) -> dict:
    man = load_manifest(model_dir)
    if man.get("precision") != "fp32":
        raise BadInput(f"{model_dir} is already quantized ({man.get('precision')}); quantize the "
                       "fp32 export instead")
    inputs = [("input EXPORT DIR", model_dir)] + [("DATA DIR", calib_dir)] * (calib_dir is not None) \
        + [("--calib-text file", calib_text)] * (calib_text is not None)
    check_out(out, inputs, overwrite)
    n_layers = int(man.get("model", {}).get("n_layers", 0))
    beyond = [i for i, _ in recipe.layers if i >= n_layers]
    if beyond:
        raise BadInput(f"--layer {beyond[0]}: {model_dir} has {n_layers} decoder layers "
                       f"(0-{n_layers - 1})")
    if calib_text is not None and calib_dir is None:
        raise BadInput("--calib-text replaces the calibration texts, the images still come from "
                       "a DATA DIR: pass --calib DATA_DIR too")
    needs = [s.name for s in recipe.schemes()
             if (isinstance(s, WeightOnly) and s.algo == "gptq") or isinstance(s, Int8QDQ)
             or getattr(s, "smooth", 0)]
    if needs and calib_dir is None:
        raise BadInput(f"{needs[0]} calibrates on data: pass --calib DATA_DIR")
    if calib_dir is not None and not (Path(calib_dir) / "dataset.json").is_file():
        raise BadInput(f"--calib {calib_dir} is not a DATA DIR (no dataset.json)")
    if any(isinstance(s, WeightOnly) and s.algo == "hqq" for s in recipe.schemes()):
        click.echo("agevlm: warning: hqq writes float zero points, which onnxruntime runs on a "
                   "slow kernel (measured 9.6 vs 0.8 ms/token); prefer algo=rtn or gptq", err=True)
    if man.get("target") == "mobile-gpu" and any(isinstance(s, (Int8QDQ, Int8Dynamic))
                                                 for s in recipe.schemes()):
        raise BadInput("the mobile-gpu target runs int4 (MatMulNBits) and fp16 on WebGPU; "
                       "int8 QuantizeLinear falls back to CPU there: quantize the cpu export")
    return man


def quantize_export(model_dir: str | os.PathLike, out: str | os.PathLike, recipe: Recipe,
                    calib_dir: str | os.PathLike | None = None, n_quality: int = 16,
                    seed: int = 0, overwrite: bool = False,
                    calib_text: str | os.PathLike | None = None) -> dict:
    """Quantize an fp32 EXPORT DIR into ``out`` under ``recipe``; returns a summary dict.
    ``calib_text``: a UTF-8 file, one text per line, that replaces the DATA DIR's prompts as
    the decoder's calibration and quality-check texts (images still come from ``calib_dir``)."""
    model_dir, out = Path(model_dir), Path(out)
    if n_quality < 1:
        raise BadInput(f"the quality check needs at least 1 text, got {n_quality}")
    man = _check_inputs(model_dir, out, recipe, calib_dir, calib_text, overwrite)
    calib = CalibSet(model_dir, calib_dir, seed=seed, text_file=calib_text)
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401 (sets up logging on import)

    # The quantizers log every node and pre-processing advice: quiet while they run.
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime", "optimum",
                                              "optimum.onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return _quantize(model_dir, out, recipe, man, calib, n_quality, overwrite)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quantize(model_dir: Path, out: Path, recipe: Recipe, man: dict, calib: CalibSet,
              n_quality: int, overwrite: bool) -> dict:
    from agevlm_edge.export.onnx_export import write_manifest

    from .quality import next_token_quality

    t0 = time.perf_counter()
    sizes: dict = {}
    with staged_dir(out, overwrite=overwrite) as tmp, \
            tempfile.TemporaryDirectory(prefix="agevlm-quant-") as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        done = {}
        for graph in GRAPHS:
            model, done[graph] = quantize_graph(model_dir / f"{graph}.onnx", graph, recipe, calib,
                                                Path(scratch))
            save_graph(model, tmp / f"{graph}.onnx")
            sizes[graph] = part_bytes(model, graph)
            del model                   # before the next graph loads
        calib.release()                 # the fp32 reference's weights, before the quality check
        gc.collect()
        for name in ("tokenizer.json", "preprocessor.json"):
            shutil.copyfile(model_dir / name, tmp / name)
        keep = {k: v for k, v in man.items() if k not in ("files", "graphs", "parity", "export_seconds")}
        new = {**keep, "created_by": f"agevlm-edge {__version__}", "precision": recipe.label(),
               "scheme": {"name": recipe.label(), "recipe": recipe.as_dict()},
               "quantized_from": {"dir": str(model_dir.resolve()), "parity": man.get("parity"),
                                  "manifest_files": man["files"]},
               "calibration": calib.describe(), "part_bytes": sizes, "applied": done}
        write_manifest(tmp, new)
        quality = next_token_quality(model_dir, tmp, calib.quality_pairs(n_quality))
        new = write_manifest(tmp, {**new, "quality": quality,
                                   "quantize_seconds": round(time.perf_counter() - t0, 1)})
    total, ref = export_bytes(out, new), export_bytes(model_dir, man)
    return {"out": str(out), "scheme": recipe.label(), "bytes": total, "fp32_bytes": ref,
            "size_ratio": round(total / ref, 4), "quality": quality}
