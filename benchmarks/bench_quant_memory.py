"""Peak RSS of int8-dynamic quantization: onnxruntime's quantize_dynamic reading the graph from
its file (what `agevlm quantize` runs) against optimum's ORTQuantizer on the same graph (what
it ran before: ORTQuantizer.quantize loads the graph, and its quantizer saves and reloads it
for shape inference), in one command.

    python benchmarks/bench_quant_memory.py [EXPORT] [--work DIR] [--d-model 1024] [--layers 10]

Each way quantizes the fp32 decoder (every weight node, the avx2 preset, per channel) in a
process of its own, --rounds times round robin, and `quantize_export` with the int8-dynamic
and the int4 schemes (both graphs, the quality check) once each; each process reports its
peak RSS (VmHWM) and seconds. Without EXPORT, a random xattn model (246M parameters, ~1 GB fp32 by default)
is built and exported under --work (once; reused on the next run). Prints the peaks, their
ratio and each over the decoder's weight bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


WAYS = ("optimum", "ours", "quantize:int8-dynamic", "quantize:int4")


def peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def build_export(work: Path, d_model: int, layers: int) -> Path:
    """A random xattn model of width ``d_model`` and its fp32 cpu export (once per --work)."""
    out = work / f"fp32-d{d_model}-l{layers}"
    if (out / "manifest.json").is_file():
        return out
    import torch

    from agevlm_edge.checkpoint import save_model_files
    from agevlm_edge.data.tokenizer import train_bpe
    from agevlm_edge.export.onnx_export import export_run
    from agevlm_edge.model import AgeVLM, AgeVLMConfig
    from agevlm_edge.preprocess import Preprocessor

    tok = train_bpe(["a red circle left of a blue square", "is there a star in the image"] * 50, 300)
    torch.manual_seed(0)
    cfg = AgeVLMConfig(image_size=64, patch_size=8, vision_width=128, vocab_size=8192,
                       d_model=d_model, n_layers=layers, n_heads=d_model // 128, n_kv_heads=4,
                       ffn_hidden=4 * d_model, max_seq_len=256)
    model = AgeVLM(cfg).eval()
    with torch.no_grad():
        for g in model.gates():
            g.fill_(0.1)
    run = work / f"run-d{d_model}-l{layers}"
    save_model_files(run, model, tok, Preprocessor(64))
    del model
    export_run(run, out, xattn_probs=False, n_pairs=2)
    return out


def child(way: str, export: Path, out: Path) -> dict:
    """One way of quantizing, in this process; returns its peak RSS and seconds."""
    import logging

    import onnx

    from agevlm_edge.quant.quantize import WEIGHT_OPS, _int8_dynamic, weight_nodes
    from agevlm_edge.quant.schemes import Int8Dynamic

    logging.disable(logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    src = export / "decoder.onnx"
    names = [n for ns in weight_nodes(onnx.load(str(src), load_external_data=False), "decoder").values()
             for n in ns]
    t0 = time.perf_counter()
    if way == "ours":
        _int8_dynamic(src, names, Int8Dynamic(), out)
    elif way == "optimum":
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        cfg = AutoQuantizationConfig.avx2(is_static=False, per_channel=True, nodes_to_quantize=names,
                                          operators_to_quantize=list(WEIGHT_OPS))
        ORTQuantizer.from_pretrained(export, file_name="decoder.onnx").quantize(
            quantization_config=cfg, save_dir=out, file_suffix="", use_external_data_format=True)
    else:
        from agevlm_edge.quant.quantize import quantize_export
        from agevlm_edge.quant.schemes import make_recipe

        scheme = way.split(":", 1)[1]
        quantize_export(export, out / scheme, make_recipe(scheme), n_quality=2)
    return {"peak_mb": round(peak_mb(), 1), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", nargs="?", type=Path, help="an fp32 EXPORT DIR (default: build one)")
    ap.add_argument("--work", type=Path, default=None, help="scratch (and the built export)")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.export, a.child_out)))
        return
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-quant-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    export = a.export or build_export(work, a.d_model, a.layers)
    if not (export / "manifest.json").is_file():
        ap.error(f"{export} is not an EXPORT DIR (no manifest.json); make one with `agevlm export`")
    weights_mb = (export / "decoder.onnx.data").stat().st_size / 2**20 \
        if (export / "decoder.onnx.data").is_file() else (export / "decoder.onnx").stat().st_size / 2**20
    print(f"[bench_quant_memory] {export}: decoder weights {weights_mb:.0f} MB; "
          f"{a.rounds} rounds, one process per quantization", flush=True)
    res: dict[str, list[dict]] = {w: [] for w in WAYS}
    for r in range(a.rounds):
        for way in WAYS if r == 0 else WAYS[:2]:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                p = subprocess.run([sys.executable, __file__, str(export), "--child", way,
                                    "--child-out", tmp], capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"[bench_quant_memory] {way} failed:\n{p.stderr[-2000:]}")
            res[way].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"  round {r} {way:22} peak {res[way][-1]['peak_mb']:7.0f} MB  "
                  f"{res[way][-1]['seconds']:6.1f} s", flush=True)
    med = {w: statistics.median(x["peak_mb"] for x in rows) for w, rows in res.items()}
    print(f"{'way':40} {'peak MB':>8} {'/ weights':>9}")
    for w, label in (("optimum", "optimum ORTQuantizer (decoder)"),
                     ("ours", "quantize_dynamic from the file (decoder)"),
                     ("quantize:int8-dynamic", "quantize_export int8-dynamic (all)"),
                     ("quantize:int4", "quantize_export int4 (all)")):
        print(f"{label:40} {med[w]:8.0f} {med[w] / weights_mb:9.2f}")
    print(f"from the file / ORTQuantizer: {med['ours'] / med['optimum']:.3f}")


if __name__ == "__main__":
    main()
