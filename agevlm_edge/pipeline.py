"""`agevlm pipeline`: the main job on the embedded synthetic world, stage by stage.

Each stage writes its own artifact atomically under --out and appends a line to
pipeline.json, so a run can be read (and a failed one diagnosed) stage by stage. The
quantization stages run on the cpu export: the standard schemes, the drift gate on each (a
variant over budget is a finding written to drift-*.json, not a pipeline failure), the
precision search and the accuracy-vs-size report.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from .errors import BadInput
from .fsutil import write_json_atomic

# Sizes of the embedded default world: the full run and the short one tests use.
FULL = dict(n_train=20000, n_val=500, n_test=500)
SHORT = dict(n_train=400, n_val=50, n_test=60)
SHORT_SCALE = 0.02          # training steps of the short run, as a fraction of the recipe
SHORT_EVAL_IMAGES = 10


def _stage(log: list[dict], out: Path, name: str, fn, *args, **kwargs) -> str:
    click.echo(f"[pipeline] {name} ...", err=True)
    t0 = time.perf_counter()
    summary = fn(*args, **kwargs)
    log.append({"stage": name, "seconds": round(time.perf_counter() - t0, 2), "summary": summary})
    write_json_atomic(out / "pipeline.json", {"stages": log})
    click.echo(f"[pipeline] {name}: {summary}", err=True)
    return summary


def run_pipeline(out: str | os.PathLike, preset: str = "tiny", seed: int = 0, short: bool = False,
                 overwrite: bool = False, scale: float | None = None, device: str = "cpu") -> None:
    """data synth (easy world) -> masks (exact, rendered) -> tokenizer -> train (guided) -> eval
    -> export (cpu and mobile-gpu, parity checked) -> one example `infer` with a heatmap
    -> quantize the standard set -> drift gate each -> precision search -> report."""
    from .data.masks import make_masks
    from .data.synth import synthesize
    from .data.tokenizer import build_tokenizer
    from .eval.suite import evaluate, format_report
    from .export.onnx_export import export_run
    from .runtime.infer import run_infer
    from .train.devices import resolve_device
    from .train.loop import train
    from .train.recipe import preset_recipe

    if short and scale is not None:
        raise BadInput("--short sets its own schedule; pass --short or --scale, not both")
    resolve_device(device)                 # a GPU this machine lacks: before anything is written
    recipe = preset_recipe(preset, "guided", seed=seed, scale=SHORT_SCALE if short else scale or 1.0)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInput(f"pipeline --out {out} is a file; choose a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"pipeline output {out} already exists and is not empty; "
                       "pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    log: list[dict] = []
    sizes = SHORT if short else FULL
    _stage(log, out, "data synth", synthesize, data, preset="easy", seed=seed, overwrite=True,
           **sizes)
    _stage(log, out, "data masks", make_masks, data, seed=seed)
    _stage(log, out, "data tokenizer", build_tokenizer, data)
    _stage(log, out, "train", train, data, out / "run", recipe, overwrite=True, device=device)
    results = {}

    def _eval() -> str:
        results.update(evaluate(out / "run", data, out_json=out / "eval.json",
                                limit=SHORT_EVAL_IMAGES if short else None, device=device))
        pope = results["suites"]["pope"]["summary"]
        return (f"POPE mean F1 {pope['mean_f1']:.3f}, CHAIR_i "
                f"{results['suites']['chair']['chair_i']}, written to {out / 'eval.json'}")

    _stage(log, out, "eval", _eval)

    def _export(target: str) -> str:
        r = export_run(out / "run", out / f"export-{target}", target=target, data_dir=data,
                       overwrite=True)
        p = r["parity"]
        return (f"{r['out']} ({r['bytes'] / 1e6:.1f} MB), parity logits max abs diff "
                f"{p['logits_max_abs_diff']:.1e}, greedy generations identical "
                f"{p['generations_identical']}/{p['pairs']}")

    _stage(log, out, "export cpu", _export, "cpu")
    _stage(log, out, "export mobile-gpu", _export, "mobile-gpu")

    def _infer() -> str:
        from .data.datadir import load_split

        rec = load_split(data, "test")[0]
        pieces: list[str] = []
        answers = run_infer(out / "export-cpu", data / rec["file"], ["Caption:"],
                            heatmap=out / "heatmap.png", write=pieces.append)
        return f"{rec['file']}: {answers[0]!r}, heatmap {out / 'heatmap.png'}"

    _stage(log, out, "infer", _infer)
    _quant_stages(log, out, data, short)
    click.echo(format_report(results))
    click.echo(f"pipeline finished: {out} (stages: {', '.join(s['stage'] for s in log)})")


# The standard set: what users compare first. GPTQ w4a8 is the int4 the search starts from.
STANDARD_SCHEMES = {"fp16": "fp16", "int8-dynamic": "int8-dynamic", "int8-qdq": "int8-qdq",
                    "int4-b32-gptq": "int4:algo=gptq", "int4-b128-rtn": "int4:block_size=128"}


def _quant_stages(log: list[dict], out: Path, data: Path, short: bool) -> None:
    """quantize -> drift -> search -> report, on out/export-cpu."""
    from .quant.drift import Budget, profile, run_drift
    from .quant.quantize import quantize_export
    from .quant.schemes import make_recipe
    from .quant.search import assignment_text, run_search
    from .report import build_report

    ref, limit = out / "export-cpu", SHORT_EVAL_IMAGES if short else None
    variants = {name: out / f"quant-{name}" for name in STANDARD_SCHEMES}

    def _quantize() -> str:
        rs = [quantize_export(ref, variants[n], make_recipe(spec), calib_dir=data, overwrite=True)
              for n, spec in STANDARD_SCHEMES.items()]
        return "; ".join(f"{r['scheme']} {r['size_ratio']:.3f}x, top-1 vs fp32 "
                         f"{r['quality']['top1_agreement']:.3f}" for r in rs)

    ref_profile: dict = {}
    profiles: dict[str, dict] = {}      # measured once, used by the search and the report too

    def _drift() -> str:
        ref_profile.update(profile(ref, data, limit=limit))
        profiles[str(ref)] = ref_profile
        for d in variants.values():
            profiles[str(d)] = profile(d, data, limit=limit)
        res = {n: run_drift(ref, d, data, Budget(), limit=limit, ref_profile=ref_profile,
                            cand_profile=profiles[str(d)], out_json=out / f"drift-{n}.json")
               for n, d in variants.items()}
        return ", ".join(f"{n} {'pass' if r['passed'] else 'OVER'}" for n, r in res.items())

    found: dict = {}

    def _search() -> str:
        found.update(run_search(ref, data, out / "search", Budget(), limit=limit,
                                overwrite=True, ref_profile=ref_profile))
        c = found["chosen"]
        return (f"chosen {c['candidate']} at {c['size_ratio']:.3f} x fp32 ({assignment_text(c)}) "
                f"-> {found['variant']}")

    def _report() -> str:
        chosen = [Path(found["variant"])] if Path(found["variant"]) != ref else []
        rep = build_report([out / "run", ref, *variants.values(), *chosen, out / "search"],
                           out / "report", data, limit=limit, overwrite=True, profiles=profiles,
                           command=f"agevlm pipeline --out {out}{' --short' * short} (report stage)")
        return f"{out / 'report'}: report.md, report.html, {', '.join(rep['plots'])}"

    _stage(log, out, "quantize", _quantize)
    _stage(log, out, "drift", _drift)
    _stage(log, out, "search", _search)
    _stage(log, out, "report", _report)
