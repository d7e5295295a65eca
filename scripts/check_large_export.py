"""A model past protobuf's 2 GB limit, through export, the runtime and quantize.

    python scripts/check_large_export.py --out DIR [--d-model 1536] [--layers 12]

Builds a random xattn model whose fp32 weights pass 2 GB (default: 638M parameters, width
1536, 12 layers, cross-attention before every 2nd, SwiGLU 6144), exports it for the cpu
target (parity checked on 2 pairs), generates a few tokens on the device runtime, quantizes
it to int4 (RTN) and to int8-dynamic, and prints each step's files, sizes and seconds.
Exports write each graph's weights beside it (export.graphio), which is what makes this
possible: weights inside the protobuf stop at 2 GB.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a new directory for the run and exports")
    ap.add_argument("--d-model", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=12)
    a = ap.parse_args()
    import numpy as np
    import torch

    from agevlm_edge.checkpoint import save_model_files
    from agevlm_edge.data.tokenizer import train_bpe
    from agevlm_edge.export.onnx_export import export_run
    from agevlm_edge.model import AgeVLM, AgeVLMConfig
    from agevlm_edge.preprocess import Preprocessor
    from agevlm_edge.quant.quantize import quantize_export
    from agevlm_edge.quant.schemes import make_recipe
    from agevlm_edge.runtime.session import GenerationConfig, Runtime

    def files(d: Path) -> str:
        return ", ".join(f"{p.name} {p.stat().st_size / 1e9:.3f} GB" for p in sorted(d.iterdir())
                         if p.suffix in (".onnx", ".data"))

    a.out.mkdir(parents=True, exist_ok=False)
    tok = train_bpe(["a red circle left of a blue square", "is there a star in the image"] * 50, 300)
    torch.manual_seed(0)
    cfg = AgeVLMConfig(image_size=64, patch_size=8, vision_width=128, vocab_size=8192,
                       d_model=a.d_model, n_layers=a.layers, n_heads=a.d_model // 128, n_kv_heads=4,
                       ffn_hidden=4 * a.d_model, max_seq_len=256)
    model = AgeVLM(cfg).eval()
    with torch.no_grad():
        for g in model.gates():
            g.fill_(0.1)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e6:.0f}M parameters, {4 * n / 1e9:.2f} GB in fp32", flush=True)
    save_model_files(a.out / "run", model, tok, Preprocessor(64))
    del model
    t0 = time.perf_counter()
    r = export_run(a.out / "run", a.out / "fp32", xattn_probs=False, n_pairs=2)
    print(f"export: {time.perf_counter() - t0:.0f} s, parity {r['parity']}, "
          f"{files(a.out / 'fp32')}", flush=True)
    t0 = time.perf_counter()
    rt = Runtime(a.out / "fp32")
    img = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    ids = rt.generate(rt.encode_images([img]), [rt.prompt_ids("is there a star")],
                      GenerationConfig(max_new_tokens=4)).ids[0]
    print(f"runtime: loaded and generated {len(ids)} tokens in {time.perf_counter() - t0:.0f} s",
          flush=True)
    del rt
    for scheme in ("int4", "int8-dynamic"):
        t0 = time.perf_counter()
        q = quantize_export(a.out / "fp32", a.out / scheme, make_recipe(scheme), n_quality=2)
        print(f"quantize {scheme}: {time.perf_counter() - t0:.0f} s, {q['size_ratio']:.3f} x fp32, "
              f"top-1 vs fp32 {q['quality']['top1_agreement']:.3f}, {files(a.out / scheme)}",
              flush=True)


if __name__ == "__main__":
    main()
