"""How an EXPORT DIR's graphs are written: `<name>.onnx` holds the graph, `<name>.onnx.data`
beside it the weights (ONNX external data). Export, its rewrites and quantize all write
through ``save_graph``; readers need nothing special (onnx.load and onnxruntime find the data
file next to the graph; the manifest hashes both).

Why not the weights inside the protobuf: onnxruntime then holds the file's bytes and the
tensors made from them at once while it loads. Measured on the smol VLM (SmolLM2-135M with the
576-token image path; `python benchmarks/bench_rss.py`): peak RSS of the device runtime fp32
949 -> 784 MB, int4 w4a8 331 -> 287 MB, for the same bytes on disk. And protobuf caps a
file at 2 GB, which a 1B-parameter LM in fp32 passes (scripts/check_large_export.py).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

DATA_SUFFIX = ".data"


def data_file(graph_path: str | os.PathLike) -> Path:
    """The weights file that goes with a graph file (decoder.onnx -> decoder.onnx.data)."""
    p = Path(graph_path)
    return p.with_name(p.name + DATA_SUFFIX)


def save_graph(model, path: str | os.PathLike) -> None:
    """Write ``model`` (onnx.ModelProto or onnx_ir.Model) to ``path``, its tensors of 1 KB
    and more to ``data_file(path)``. onnx_ir writes the data file aside and renames it into
    place, so rewriting a graph in place (its weights still read lazily from that file) is
    safe."""
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        ir.save(model, str(path), external_data=data_file(path).name, size_threshold_bytes=1024)
        return
    view = ir.serde.deserialize_model(model)
    ir.save(view, str(path), external_data=data_file(path).name, size_threshold_bytes=1024)
    # The IR view holds the proto's tensors in reference cycles: collect it now, so a caller
    # that drops the proto next gets its memory back at once (quantize's int8-dynamic does).
    del view
    gc.collect()


def weights_inside_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A copy of the EXPORT DIR ``src`` at ``dst`` with each graph's weights inside its
    protobuf (no .data files, no .ort copies), re-hashed: the layout exports had before,
    for comparisons (benchmarks/bench_rss.py) and for loaders that take a graph as one
    buffer. Graphs past 2 GB cannot be written this way."""
    import onnx

    from .onnx_export import write_manifest

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.onnx", "*" + DATA_SUFFIX, "*.ort",
                                                            "manifest.json"))
    for g in ("vision", "decoder"):
        onnx.save(onnx.load(str(src / f"{g}.onnx")), str(dst / f"{g}.onnx"))
    man = json.loads((src / "manifest.json").read_text())
    write_manifest(dst, {k: v for k, v in man.items() if k not in ("files", "graphs")})
    return dst
