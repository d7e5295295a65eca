"""`agevlm export`: RUN DIR -> EXPORT DIR (vision.onnx, decoder.onnx, manifest.json, ...).

    export_run(run, out, target="cpu")
      1. torch.onnx.export(dynamo=True) of export.graphs.VisionGraph and DecoderGraph
         (fused: opset 23, SDPA -> Attention and the exporter's RMSNormalization /
         RotaryEmbedding fusions; unfused: opset 18, the MatMul/Softmax chain);
      2. per-target rewrites (export.fusion: cpu keeps opset-23 Attention, self-attention
         GroupQueryAttention for the in-place cache (--kv-cache inplace); mobile-gpu is
         exported at opset 18 with com.microsoft GroupQueryAttention (export.contrib) and
         rewritten to the contrib norms etc., plus ORT-format files and the mobile usability
         verdicts);
      3. parity against PyTorch (export.parity) through the device runtime itself, and of
         the .ort copies against the .onnx graphs (mobile-gpu);
      4. manifest.json (hashes, graph signatures, op histograms, parity), written last.
    Every graph file is written by export.graphio.save_graph: the weights go to
    <graph>.onnx.data beside it (a lower load peak; no 2 GB protobuf cap).
    The directory is built aside and swapped in only when parity passes: a failed parity
    raises CheckFailed (exit 1) and leaves nothing behind.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from agevlm_edge import __version__
from agevlm_edge.errors import BadInput, CheckFailed
from agevlm_edge.fsutil import check_out, sha256_file, staged_dir, write_json_atomic
from agevlm_edge.runtime.manifest import FORMAT, FORMAT_VERSION

from .contrib import gqa_unfit, translation_table
from .fusion import apply_target, op_counts, target_opset
from .graphio import save_graph
from .graphs import DecoderGraph, VisionGraph, layer_names

TARGETS = ("cpu", "mobile-gpu")
# "inplace": self-attention as GroupQueryAttention, whose cache the runtime preallocates and
# the op appends to in place (past and present bound to one buffer); "concat": the cpu
# target's opset-23 Attention, the cache growing by a copy every step.
KV_CACHES = ("inplace", "concat")


def _export(module: torch.nn.Module, args: tuple, path: Path, opset: int, input_names: list[str],
            output_names: list[str], dynamic_shapes, translations: dict | None = None) -> None:
    """One graph through the dynamo exporter, quietly (it logs every pass at INFO)."""
    # onnxscript / onnx_ir log every pass at INFO once something (onnxruntime's quantization
    # tools) has configured the root logger
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, verbose=False,
                                    external_data=False,
                                    custom_translation_table=translations)
    name_nodes(program.model)
    save_graph(program.model, path)


def export_graphs(model, out_dir: Path, fused: bool = True, xattn_probs: bool = False,
                  naive_kv: bool = False, opset: int | None = None, gqa: bool = False,
                  mha_cross: bool = False) -> dict:
    """Write vision.onnx and decoder.onnx for ``model`` (eval mode, fp32) into ``out_dir``.

    ``fused`` picks the attention path (SDPA or the eager chain); the opset defaults to 23
    for fused (SDPA -> Attention) and 18 otherwise. ``gqa``: the self-attention becomes
    com.microsoft GroupQueryAttention with fused rotary (export.contrib), whose cache the
    runtime can update in place. ``mha_cross`` (with ``gqa``; mobile-gpu): the cross-attention
    becomes com.microsoft MultiHeadAttention over K/V that vision.onnx emits in its layout;
    otherwise it stays SDPA (opset-23 Attention, native GQA, on the cpu target).
    """
    from torch.export import Dim

    cfg = model.cfg
    opset = opset or (23 if fused else 18)
    names = layer_names(model)
    B, T, P = 2, 5, 3
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
    torch.manual_seed(0)
    pixels = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    naive_kv = naive_kv and cfg.arch == "xattn"
    # MultiHeadAttention's K/V layout straight from vision.onnx: expanded and padded once per
    # image instead of in every decode step.
    mha_cross = mha_cross and gqa and not xattn_probs and cfg.arch == "xattn" and not naive_kv
    kv_layout = "mha" if mha_cross else "bhnd"
    vision = VisionGraph(model, naive_kv, kv_layout).eval()
    with torch.no_grad():
        vis = vision(pixels)
    vis = vis if isinstance(vis, tuple) else (vis,)
    vis_names = ["image_embeds"] if cfg.arch == "concat" else \
        ["image_tokens"] if naive_kv else names["cross"]
    _export(vision, (pixels,), out_dir / "vision.onnx", opset, ["pixel_values"], vis_names,
            ({0: batch},))

    past = [torch.randn(B, cfg.n_kv_heads, P, cfg.head_dim) for _ in names["past"]]
    ids = torch.randint(3, cfg.vocab_size, (B, T))
    n_img = vis[0].shape[1] if cfg.arch == "concat" else 0
    mask = torch.ones(B, P + n_img + T, dtype=torch.long)
    image_dims = ({0: batch, 1: Dim("image_tokens", min=0)},) if cfg.arch == "concat" \
        else tuple({0: batch} for _ in vis)     # N is fixed by the model's image size
    dyn = ({0: batch, 1: seq}, {0: batch, 1: Dim("keys")},
           tuple({0: batch, 2: past_len} for _ in past) + image_dims)
    impl = "gqa" if gqa else "fused" if fused else "eager"
    # Probabilities from a fused cross-attention need opset 23's Attention (ops.attention).
    probs_chain = xattn_probs and (impl == "eager" or opset < 23)
    decoder = DecoderGraph(model, impl=impl, probs=xattn_probs, naive_kv=naive_kv,
                           xattn_impl="eager" if probs_chain else None).eval()
    out_names = ["logits"] + names["present"] + (names["probs"] if xattn_probs else [])
    _export(decoder, (ids, mask, *past, *vis), out_dir / "decoder.onnx", opset,
            ["input_ids", "attention_mask"] + names["past"] + vis_names, out_names, dyn,
            translation_table() if gqa else None)
    return {"opset": opset, "self_attention": "GroupQueryAttention" if gqa else impl,
            "cross_kv_layout": kv_layout if cfg.arch == "xattn" and not naive_kv else None,
            "cross_attention": "none (concat)" if cfg.arch == "concat" else
            "MatMul/Softmax (probabilities exported)" if probs_chain else
            "Attention (its softmax output exported as the probabilities)" if xattn_probs else
            "MultiHeadAttention (query and key zero-padded per head)" if mha_cross else
            "fused" if gqa else impl}


def module_path(node) -> str:
    """The module path a node came from ("decoder.layers.1.self_attn"), from the exporter's
    namespace metadata; "graph" for nodes outside any submodule."""
    ns = node.metadata_props.get("namespace", "")
    scopes = [seg.split(":")[0].strip() for seg in ns.split("/")[:-1]]
    scopes = [s for s in scopes if s and not s.startswith("_empty_nn_module_stack")]
    path = scopes[-1] if scopes else ""
    path = path[len("model."):] if path.startswith("model.") else path
    return path or "graph"


def name_nodes(model) -> None:
    """Rename every node of ``model`` (onnx_ir) "<module path>/<Op>_<k>" (k counts per path
    and op in graph order): stable across exports of the same model, readable in profiles, and
    what per-part quantization selects on."""
    seen: collections.Counter = collections.Counter()
    for node in model.graph:
        key = f"{module_path(node)}/{node.op_type}"
        node.name = f"{key}_{seen[key]}"
        seen[key] += 1


def graph_info(path: Path) -> dict:
    """Inputs/outputs (name, dtype, shape with symbolic dims) and the op histogram."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def io(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": shape})
        return out

    ops = op_counts(m)
    return {"file": path.name, "inputs": io(m.graph.input), "outputs": io(m.graph.output),
            "ops": dict(sorted(ops.items())), "nodes": len(m.graph.node),
            "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import}}


def object_words(data_dir: Path | None) -> list[str]:
    """Object names (classes, plurals, synonyms) from a DATA DIR, for heatmaps; [] without one."""
    if data_dir is None or not (Path(data_dir) / "dataset.json").is_file():
        return []
    from agevlm_edge.data.datadir import load_meta
    from agevlm_edge.eval.chair import word_map

    vocab = load_meta(data_dir).get("vocabulary", {})
    return sorted(word_map(vocab)) if vocab.get("classes") else []   # CHAIR's object words


def write_manifest(out_dir: Path, man: dict) -> dict:
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != "manifest.json")
    man = {**man, "files": {f: sha256_file(out_dir / f) for f in files}}
    man["graphs"] = {name: graph_info(out_dir / f"{name}.onnx") for name in ("vision", "decoder")}
    write_json_atomic(out_dir / "manifest.json", man)
    return man


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, target: str = "cpu",
               fused: bool = True, xattn_probs: bool = True, data_dir: str | os.PathLike | None = None,
               n_pairs: int = 20, overwrite: bool = False, naive_kv: bool = False,
               kv_cache: str = "inplace") -> dict:
    """Export a RUN DIR for ``target``, check parity, and write the EXPORT DIR atomically.

    ``kv_cache`` (KV_CACHES): "inplace" where the model fits GroupQueryAttention (fused, arch
    xattn, head size divisible by 16; else the export falls back to "concat" and says why in
    the manifest's self_attention); mobile-gpu is always "inplace" where it fits."""
    from agevlm_edge.checkpoint import load_model_files

    from .parity import check_fixed_vision_parity, check_ort_parity, check_parity

    if target not in TARGETS:
        raise BadInput(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    run_dir, out = Path(run_dir), Path(out)
    check_out(out, [("RUN DIR", run_dir)], overwrite)
    if data_dir is not None and not (Path(data_dir) / "dataset.json").is_file():
        raise BadInput(f"--data {data_dir} is not a DATA DIR (no dataset.json)")
    if kv_cache not in KV_CACHES:
        raise BadInput(f"unknown --kv-cache {kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
    if target == "mobile-gpu" and kv_cache == "concat":
        raise BadInput("--target mobile-gpu always runs self-attention as GroupQueryAttention "
                       "(what its runtimes take); drop --kv-cache concat or use --target cpu")
    if target == "mobile-gpu" and not fused:
        raise BadInput("--target mobile-gpu always fuses attention (its runtimes need the "
                       "contrib ops); drop --no-fuse or use --target cpu")
    model, tokenizer, pre, config = load_model_files(run_dir)
    xattn_probs = xattn_probs and model.cfg.arch == "xattn"
    data = Path(data_dir) if data_dir else (Path(config["data"]) if config.get("data") else None)
    data = data if data is not None and (data / "dataset.json").is_file() else None
    if data is not None:                 # the DATA DIR it reads (given, or the run's own)
        check_out(out, [("DATA DIR", data)], overwrite)
    t0 = time.perf_counter()
    with staged_dir(out, overwrite=overwrite) as tmp:
        no_gqa = ("--kv-cache concat" if kv_cache == "concat" else
                  "unfused export" if not fused else gqa_unfit(model.cfg))
        info = export_graphs(model, tmp, fused=fused, xattn_probs=xattn_probs, naive_kv=naive_kv,
                             opset=target_opset(target, fused), gqa=no_gqa is None,
                             mha_cross=target == "mobile-gpu")
        if no_gqa and kv_cache == "inplace" and fused:
            info["self_attention"] = (f"{'MultiHeadAttention' if target == 'mobile-gpu' else 'Attention'}"
                                      f" (not GroupQueryAttention: {no_gqa}; cache by concat)")
        rewrites = apply_target(tmp, target, fused)
        for name in ("tokenizer.json", "preprocessor.json"):
            shutil.copyfile(run_dir / name, tmp / name)
        man = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "created_by": f"agevlm-edge {__version__}", "target": target, "fused": fused,
               "opset": info["opset"], "self_attention": info["self_attention"],
               "cross_attention": info["cross_attention"],
               "cross_kv_layout": info["cross_kv_layout"],
               "kv_cache": "concat" if no_gqa else "inplace",
               "precision": "fp32", "scheme": {"name": "fp32"},
               "model": model.cfg.to_dict(), "xattn_probs": xattn_probs,
               "naive_kv": naive_kv and model.cfg.arch == "xattn",
               "object_words": object_words(data), "rewrites": rewrites,
               "source": {"run_dir": str(run_dir.resolve()),
                          "model_sha256": sha256_file(run_dir / "model.safetensors")}}
        write_manifest(tmp, man)
        parity = check_parity(model, tmp, data, n_pairs=n_pairs)
        if "ort_format" in rewrites:          # the .ort copies against the .onnx graphs
            parity["ort_format"] = check_ort_parity(tmp, data, n_pairs=n_pairs)
            parity["failures"] += parity["ort_format"]["failures"]
        if "fixed_shapes" in rewrites:        # the static-shape vision graph against vision.onnx
            parity["vision_fixed"] = check_fixed_vision_parity(tmp, data)
            parity["failures"] += parity["vision_fixed"]["failures"]
        parity["passed"] = not parity["failures"]
        man = write_manifest(tmp, {**man, "parity": parity,
                                   "export_seconds": round(time.perf_counter() - t0, 1)})
        if not parity["passed"]:
            raise CheckFailed(f"parity with PyTorch failed ({parity['failures'][0]}); "
                              "no export was written")
    size = sum(p.stat().st_size for p in Path(out).iterdir())
    return {"out": str(out), "target": target, "fused": fused, "bytes": size,
            "kv_cache": man["kv_cache"],
            "parity": {k: parity[k] for k in ("logits_max_abs_diff", "generations_identical",
                                              "pairs")},
            "ops": man["graphs"]["decoder"]["ops"]}
