"""Peak RSS of the device runtime: graphs with their weights beside them (what `agevlm export`
and `agevlm quantize` write, export.graphio) against the same graphs with the weights inside
the protobuf (how exports were written before), in one command.

    python benchmarks/bench_rss.py EXPORT [EXPORT ...] [--work DIR] [--rounds 2]
    python benchmarks/bench_rss.py --lm-dir HF_DIR --work DIR    # the smol VLM, fp32 and int4

For each EXPORT DIR a copy with the weights inside the protobuf is written under --work; both
run the benchmark protocol of `agevlm bench` (one image, a 32-token prompt, greedy steps), each
in a process of its own, round robin over --rounds rounds, largest peak RSS (VmHWM) kept. With
--lm-dir and no EXPORT it builds the smol VLM at 576 image tokens and its int4 w4a8 variant the
way benchmarks/bench_decode.py does (same work-dir names, so that run's exports are reused).
Prints per export the artifact size, both peaks, their ratio and each against the export
issue's budget (1.3 x artifact + 150 MB).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def inline_copy(src: Path, dst: Path) -> Path:
    """``src`` with the weights inside its graphs, made once per --work dir."""
    from agevlm_edge.export.graphio import weights_inside_copy

    if (dst / "manifest.json").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    return weights_inside_copy(src, dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="*", type=Path, help="EXPORT DIRs (agevlm export / quantize)")
    ap.add_argument("--lm-dir", type=Path, default=None,
                    help="SmolLM2 HF dir (agevlm lm import-gguf): build the smol exports")
    ap.add_argument("--work", type=Path, default=None, help="where the copies (and smol exports) go")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    if not a.exports and a.lm_dir is None:
        ap.error("give EXPORT DIRs, or --lm-dir to build the smol VLM's")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-rss-"))
    work.mkdir(parents=True, exist_ok=True)
    exports = list(a.exports)
    if not exports:
        import bench_decode as bd

        run = bd.smol_run_dir(a.lm_dir, work / "run-576", 192)
        fp32 = bd.export(run, work / "fused-576")
        exports = [fp32, bd.quantized(fp32, work / "w4a8-576", "int4")]
    for d in exports:
        if not (d / "manifest.json").is_file():
            ap.error(f"{d} is not an EXPORT DIR (no manifest.json); make one with `agevlm export`")
    from agevlm_edge.runtime.bench import measure_command, round_robin, rss_over_budget

    pairs = {d: inline_copy(d, work / f"{d.name}-inline") for d in exports}
    commands = {}
    for d, inline in pairs.items():
        commands[str(d)] = measure_command(d, repeats=1, new_tokens=a.new_tokens)
        commands[str(inline)] = measure_command(inline, repeats=1, new_tokens=a.new_tokens)
    print(f"[bench_rss] {len(commands)} exports, one process each, {a.rounds} rounds", flush=True)
    rows = round_robin(commands, a.rounds)
    print(f"{'export':24} {'MB':>7} {'RSS inside':>10} {'RSS beside':>10} {'beside/inside':>13} "
          f"{'/budget inside':>14} {'/budget beside':>14} {'tok/s beside/inside':>19}")
    for d, inline in pairs.items():
        out, inn = rows[str(d)], rows[str(inline)]
        print(f"{d.name:24} {out['artifact_mb']:7.1f} {inn['peak_rss_mb']:10.1f} "
              f"{out['peak_rss_mb']:10.1f} {out['peak_rss_mb'] / inn['peak_rss_mb']:13.3f} "
              f"{rss_over_budget(inn):14.3f} {rss_over_budget(out):14.3f} "
              f"{out['decode_tokens_per_s'] / inn['decode_tokens_per_s']:19.3f}")


if __name__ == "__main__":
    main()
