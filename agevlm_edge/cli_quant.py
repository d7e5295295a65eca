"""The quantization commands of `agevlm` (quantize, drift, search, report); cli.py registers
them on the group. As there, each command parses flags and calls ONE library function, and
heavy libraries are imported inside commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .fsutil import check_out_file


@click.command("quantize")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="fp32 EXPORT DIR (made by `agevlm export`).")
@click.option("--scheme", required=True, metavar="SCHEME[:KEY=VALUE,...]",
              help="fp16 | int8-dynamic[:preset=avx2|avx512_vnni|arm64,per_channel=,smooth=ALPHA,"
                   "calib_samples=N] | int8-qdq[:ops=matmul|all,per_channel=,calib_samples=N,"
                   "smooth=ALPHA,activations=uint8|uint16,calibration=minmax|percentile|entropy] | "
                   "int4[:block_size=16|32|64|128|256,symmetric=true,algo=rtn|gptq|hqq,"
                   "accuracy_level=0|4,calib_samples=N] | w4a8 | w4a32 (int4 at accuracy level "
                   "4 / 0, same options) | int2 (deliberately bad). smooth=ALPHA (e.g. 0.5): "
                   "SmoothQuant before int8, calibrated on --calib; activations=uint16: A16W8.")
@click.option("--part", "parts", multiple=True, metavar="PART=SCHEME",
              help="Another scheme for one part: vision, xattn, self_attn, mlp, embed (the "
                   "token lookup table), lm_head; fp32 keeps it (repeatable, e.g. --part "
                   "vision=int8-dynamic --part lm_head=fp32).")
@click.option("--layer", "layers", multiple=True, metavar="LAYERS=SCHEME",
              help="Another scheme for decoder layers (their self-attention, MLP and the "
                   "cross-attention block before them), overriding --scheme/--part there: "
                   "e.g. --layer 0=fp32 --layer 2-3=int8-dynamic (see `agevlm search`'s layer "
                   "sensitivity).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="EXPORT DIR to write.")
@click.option("--calib", "calib_dir", type=click.Path(path_type=Path), default=None,
              help="DATA DIR to calibrate on (needed by gptq and int8-qdq; val split first).")
@click.option("--calib-text", "calib_text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 file, one text per line: the decoder calibrates (and the quality "
                   "check reads) these texts instead of the DATA DIR's captions and questions, "
                   "e.g. prose like your users' prompts. Images still come from --calib.")
@click.option("--quality-texts", default=16, show_default=True, type=click.IntRange(1, 100000),
              help="Teacher-forced texts for the top-1 agreement / KL check vs fp32.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed for picking calibration samples.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def quantize_cmd(model_dir, scheme, parts, layers, out, calib_dir, calib_text, quality_texts,
                 seed, overwrite) -> None:
    """Quantize an fp32 EXPORT DIR, then measure next-token agreement with it.

    The recipe (one scheme per part), the bytes per part and the top-1 agreement and KL of
    next-token distributions vs fp32 are stored in the new manifest.json.
    """
    from .quant.quantize import quantize_export
    from .quant.schemes import make_recipe, parse_layer_options, parse_part_options

    recipe = make_recipe(scheme, parse_part_options(parts), parse_layer_options(layers))
    r = quantize_export(model_dir, out, recipe, calib_dir=calib_dir, n_quality=quality_texts,
                        seed=seed, overwrite=overwrite, calib_text=calib_text)
    q = r["quality"]
    click.echo(f"quantized {r['out']} ({r['scheme']}): {r['bytes'] / 1e6:.2f} MB = "
               f"{r['size_ratio']:.3f} x fp32; vs fp32 on {q['positions']} positions: top-1 "
               f"agreement {q['top1_agreement']:.3f}, KL {q['kl_mean']:.4f}")


def _budget_options(f):
    for opt in reversed([
        click.option("--budget", "budget_file", type=click.Path(path_type=Path), default=None,
                     help="JSON/YAML file of limits (keys as the flags below, with underscores)."),
        click.option("--pope-f1-drop", type=float, default=None,
                     help="Largest POPE F1 drop per split, points [default: 1.0]."),
        click.option("--chair-i-rise", type=float, default=None,
                     help="Largest CHAIR_i rise, points [default: 1.0]."),
        click.option("--yes-ratio-shift", type=float, default=None,
                     help="Largest POPE yes-ratio shift per split, points [default: 2.0]."),
    ]):
        f = opt(f)
    return f


@click.command("drift")
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="fp32 EXPORT DIR.")
@click.option("--candidate", required=True, type=click.Path(path_type=Path),
              help="Quantized EXPORT DIR to check.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="DATA DIR whose split both are evaluated on.")
@_budget_options
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N images of the split.")
@click.option("--out", "out_json", type=click.Path(path_type=Path), default=None,
              help="Where to write drift.json [default: ./drift.json].")
def drift_cmd(reference, candidate, data_dir, budget_file, pope_f1_drop, chair_i_rise,
              yes_ratio_shift, split, limit, out_json) -> int:
    """The hallucination-drift gate: exit 1 when the candidate is over the budget.

    Both exports answer the same POPE questions (three splits) and caption the same images;
    the gate checks POPE F1 drop, CHAIR_i rise and yes-ratio shift, and reports grounding
    IoU, attention-map drift, answer flips and the first-token KL beside them.
    """
    from .quant.drift import format_drift, load_budget, run_drift

    out_json = out_json or Path("drift.json")
    check_out_file(out_json, [("reference", reference), ("candidate", candidate),
                              ("DATA DIR", data_dir)] + [("budget file", budget_file)] * bool(budget_file))
    budget = load_budget(budget_file, pope_f1_drop=pope_f1_drop, chair_i_rise=chair_i_rise,
                         yes_ratio_shift=yes_ratio_shift)
    res = run_drift(reference, candidate, data_dir, budget, split=split, limit=limit,
                    out_json=out_json)
    click.echo(format_drift(res))
    return 0 if res["passed"] else 1


@click.command("search")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="fp32 EXPORT DIR.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="DATA DIR: calibration (val split) and the drift gate (test split).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Directory for search.json and the chosen variant (OUT/variant).")
@_budget_options
@click.option("--ladder", default="int4:algo=gptq;int8-dynamic;fp32",
              show_default=True, metavar="SCHEME;SCHEME;...",
              help="Schemes to try, separated by ';', ending with fp32 "
                   "(each part tries them smallest first).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Gate on the first N test images only.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed for calibration samples.")
@click.option("--layer-groups", default=4, show_default=True, type=click.IntRange(min=0),
              help="Also measure the sensitivity of the decoder layers in this many groups of "
                   "consecutive layers (each group alone on the ladder's first scheme; 0: skip).")
@click.option("--calib-text", "calib_text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 file, one text per line: every candidate's decoder calibrates on these "
                   "texts instead of --data's captions and questions (as `agevlm quantize "
                   "--calib-text`; for GPTQ rungs on a pretrained LM, text like its users' "
                   "prompts). The gate still runs on --data.")
@click.option("--confirm-limit", type=click.IntRange(min=2), default=None, metavar="N",
              help="Then gate the candidates that passed again on the first N test images "
                   "(N > --limit), smallest first, and choose the first that passes there too "
                   "(a pick at the budget's edge can pass on 100 images and fail on 300; each "
                   "confirmation costs about N/--limit gates).")
@click.option("--keep-candidates", is_flag=True, help="Keep every evaluated candidate export.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def search_cmd(model_dir, data_dir, out, budget_file, pope_f1_drop, chair_i_rise,
               yes_ratio_shift, ladder, limit, seed, layer_groups, calib_text, confirm_limit,
               keep_candidates, overwrite) -> None:
    """Find the smallest per-part precision assignment inside the drift budget.

    Parts: vision, xattn, self_attn, mlp, embed, lm_head. First each part's sensitivity
    (that part alone on its smallest rung), and each decoder layer group's (its
    self-attention, MLP and cross-attention alone on the ladder's first scheme: where in
    depth the damage is), then greedy up until the gate passes (one rung at a time,
    round-robin: the most sensitive part on the lowest rung goes up next), then greedy down
    (repeated until a pass lowers nothing), then, where an in-layer part stayed above the
    ladder's first scheme, layer groups down to it one at a time (least sensitive first).
    With --confirm-limit, the passing candidates are gated again on more images before one
    is chosen. Every candidate is quantized and gated for real; search.json keeps the path.
    """
    from .quant.drift import load_budget
    from .quant.search import format_search, run_search

    budget = load_budget(budget_file, pope_f1_drop=pope_f1_drop, chair_i_rise=chair_i_rise,
                         yes_ratio_shift=yes_ratio_shift)
    res = run_search(model_dir, data_dir, out, budget, tuple(s.strip() for s in ladder.split(";")),
                     limit=limit, seed=seed, overwrite=overwrite, keep_candidates=keep_candidates,
                     layer_groups=layer_groups, calib_text=calib_text,
                     confirm_limit=confirm_limit)
    click.echo(format_search(res))


@click.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="DATA DIR every variant is evaluated on (test split).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="REPORT DIR to write.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N test images.")
@click.option("--bench-rounds", default=1, show_default=True, type=click.IntRange(0, 1000),
              help="Round-robin speed rounds over the exports (0: no speed columns).")
@click.option("--bnb", is_flag=True, help="Also evaluate bitsandbytes int8 and nf4 variants of "
              "each RUN DIR (PyTorch reference points for GPU users).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def report_cmd(dirs, data_dir, out, limit, bench_rounds, bnb, overwrite) -> None:
    """Accuracy vs size of EXPORT DIRs, RUN DIRs and search outputs: report.md, report.html
    (self-contained), report.json and PNG plots (size vs POPE adversarial F1 and vs CHAIR_i
    with the Pareto front, decode tokens/s and time to first token)."""
    from .report import build_report, check_report_args

    kinds = check_report_args(list(dirs), out, data_dir, overwrite)     # before any measuring
    extra = []
    if bnb:
        from .quant.bnb import bnb_report_rows

        for d, kind, _ in kinds:
            if kind == "run":
                extra += bnb_report_rows(d, data_dir, limit)
    rep = build_report(list(dirs), out, data_dir, limit=limit, bench_rounds=bench_rounds,
                       extra_rows=extra, overwrite=overwrite, checked=kinds,
                       command=" ".join(["agevlm"] + sys.argv[1:]))
    click.echo((Path(out) / "report.md").read_text())
    click.echo(f"report written to {out} (report.md, report.html, report.json, "
               f"{', '.join(rep['plots'])})")


COMMANDS = (quantize_cmd, drift_cmd, search_cmd, report_cmd)
