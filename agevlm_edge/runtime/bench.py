"""`agevlm bench`: time-to-first-token, decode speed and peak memory of EXPORT DIRs on the
device runtime, each measured in its own process (so peak RSS is that export's alone), all
in one command, round-robin over several rounds, so the ratios compare like with like on a
shared machine.

Protocol per export and process: one seeded random image and a 32-token prompt; TTFT =
vision graph + prefill; decode = the median per-token latency over ``new_tokens`` greedy
steps (eos does not stop it); the median of ``repeats`` runs after a warm-up. Across rounds,
the median again.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import BadInput
from .manifest import export_bytes


def prompt_of(tokenizer, n: int, bos: int) -> list[int]:
    """Exactly n ids: bos + a fixed English text's tokens, repeated as needed."""
    text = ("Question: Describe the objects in the picture, their colours and where they are. "
            "Answer:")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return [bos] + (ids * (n // max(len(ids), 1) + 1))[:n - 1]


def decode_loop(step, first_logits, n: int) -> list[float]:
    """Per-token seconds of n greedy steps; ``step(token ids [B,1]) -> logits``."""
    times, logits = [], first_logits
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1)[:, None]
        t0 = time.perf_counter()
        logits = step(nxt)
        times.append(time.perf_counter() - t0)
    return times


def measure(export_dir: str | os.PathLike, prompt_len: int = 32, new_tokens: int = 64,
            repeats: int = 3, threads: int | None = None, provider: str = "cpu") -> dict:
    """TTFT and decode figures of one EXPORT DIR in this process."""
    from .session import Runtime

    return measure_runtime(Runtime(export_dir, provider=provider, threads=threads),
                           prompt_len, new_tokens, repeats)


def measure_runtime(rt, prompt_len: int = 32, new_tokens: int = 64, repeats: int = 3) -> dict:
    """``measure`` on a loaded Runtime (one warm-up run, then ``repeats`` timed ones)."""
    export_dir = rt.dir
    room = rt.max_seq_len - rt.context_image_tokens - 1    # the last step's position included
    if prompt_len < 1 or new_tokens < 1 or prompt_len + new_tokens > room:
        raise BadInput(f"--prompt-len {prompt_len} and --new-tokens {new_tokens} must each be at "
                       f"least 1 and together at most {room} ({export_dir}'s maximum context); "
                       "lower them")
    image = np.random.default_rng(0).integers(0, 256, (3, rt.image_size, rt.image_size), dtype=np.uint8)
    prompt = [prompt_of(rt.tokenizer, prompt_len, rt.bos_id)]
    ttft, per_token = [], []
    for _ in range(repeats + 1):                       # the first run warms up, not counted
        t0 = time.perf_counter()
        state = rt.encode_images([image])
        _, mask, logits, past, _ = rt.prefill(state, prompt, reserve=prompt_len + new_tokens + 1)
        ttft.append(time.perf_counter() - t0)
        box = {"past": past, "mask": mask}

        def step(tok):
            box["mask"] = np.concatenate([box["mask"], np.ones((1, 1), np.int64)], 1)
            lg, box["past"], _ = rt.step(tok, box["mask"], box["past"], state, prefill=False)
            return lg

        per_token.append(statistics.median(decode_loop(step, logits, new_tokens)))
    ttft, per_token = ttft[1:], per_token[1:]
    size = export_bytes(export_dir, rt.manifest)     # what this process loads (no .ort copies)
    return {"dir": str(export_dir), "target": rt.manifest.get("target"),
            "fused": rt.manifest.get("fused"), "precision": rt.manifest.get("precision"),
            "image_tokens": (rt.image_size // int(rt.cfg["patch_size"])) ** 2,
            "ttft_ms": 1e3 * statistics.median(ttft),
            "decode_ms_per_token": 1e3 * statistics.median(per_token),
            "decode_tokens_per_s": 1.0 / statistics.median(per_token),
            "artifact_mb": size / 1e6,
            "peak_rss_mb": peak_rss_mb()}


def rss_over_budget(row: dict) -> float:
    """A measured row's peak RSS over the export issue's budget, 1.3 x artifact + 150 MB
    (<= 1 meets it)."""
    return row["peak_rss_mb"] / (1.3 * row["artifact_mb"] + 150)


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, because ru_maxrss survives exec: a child started by
    a big parent would report the parent's peak (measured: every export showed 3951 MB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_dirs(dirs: list[str | os.PathLike], rounds: int = 3, **kw) -> list[dict]:
    """``measure`` each dir in a fresh process, round-robin for ``rounds`` rounds, so drifting
    load on a shared machine hits every export alike; per dir, the median of its rounds
    (peak RSS: the largest)."""
    for d in dirs:
        if not (Path(d) / "manifest.json").is_file():
            raise BadInput(f"{d} is not an EXPORT DIR (no manifest.json); make one with `agevlm export`")
    return list(round_robin({str(d): measure_command(d, **kw) for d in dirs}, rounds).values())


def measure_command(export_dir: str | os.PathLike, **kw) -> list[str]:
    """The command line that runs ``measure`` on one EXPORT DIR in a fresh process (its
    keyword arguments as flags) and prints the figures as one JSON line."""
    return [sys.executable, "-m", "agevlm_edge.runtime.bench", str(export_dir)] + cli_flags(**kw)


def cli_flags(**kw) -> list[str]:
    """Keyword arguments as command-line flags (prompt_len=32 -> --prompt-len 32; None: left out)."""
    return [a for k, v in kw.items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]


def round_robin(commands: dict[str, list[str]], rounds: int = 3) -> dict[str, dict]:
    """Run every command (each prints its figures as one JSON line, last) once per round, in
    turn, for ``rounds`` rounds; per name, the first round's row with the medians of
    ttft_ms and decode_ms_per_token across rounds (decode_tokens_per_s from that median) and
    the largest peak_rss_mb."""
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(max(1, rounds)):
        for name, args in commands.items():
            proc = subprocess.run(args, capture_output=True, text=True)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                last = last.removeprefix("agevlm: error: ")
                raise BadInput(f"benchmarking {name} failed: {last}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = {}
    for name, rs in runs.items():
        row = dict(rs[0])
        for k in ("ttft_ms", "decode_ms_per_token"):
            row[k] = statistics.median(r[k] for r in rs)
        row["decode_tokens_per_s"] = 1e3 / row["decode_ms_per_token"]
        if "peak_rss_mb" in row:
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        row["rounds"] = len(rs)
        out[name] = row
    return out


def format_table(rows: list[dict]) -> str:
    """One line per export, with speed ratios against the first row."""
    base = rows[0]
    head = (f"{'export':32} {'img tok':>7} {'TTFT ms':>8} {'ms/tok':>7} {'tok/s':>7} {'x first':>7} "
            f"{'MB':>7} {'RSS MB':>7} {'RSS/budget':>10}")
    lines = [head]
    for r in rows:
        name = Path(r["dir"]).name
        lines.append(f"{name[:32]:32} {r['image_tokens']:7d} {r['ttft_ms']:8.1f} "
                     f"{r['decode_ms_per_token']:7.2f} {r['decode_tokens_per_s']:7.1f} "
                     f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:7.2f} "
                     f"{r['artifact_mb']:7.1f} {r['peak_rss_mb']:7.1f} "
                     f"{rss_over_budget(r):10.2f}")
    return "\n".join(lines)


def _main() -> None:
    ap = argparse.ArgumentParser(description="measure one EXPORT DIR (used by agevlm bench)")
    ap.add_argument("dir")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--provider", default="cpu")
    a = ap.parse_args()
    try:
        print(json.dumps(measure(a.dir, a.prompt_len, a.new_tokens, a.repeats, a.threads, a.provider)))
    except BadInput as e:
        print(f"agevlm: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _main()
