"""Markdown table (mean ± std over seeds) of the runs gpu_scale_study.sh evaluated.

    python scripts/scale_table.py [--paired-as guided,ca] DIR [DIR ...]

A DIR is one of:
- a RES_DIR with NAME.eval.json and NAME.metrics.jsonl per run, NAME being
  ``[VARIANT-]sSEED-xSCALE`` (no variant: guided), as gpu_scale_study.sh writes them (res/
  inside its results.tgz);
- the --out of scripts/study_guidance.py (study.json, VARIANT-sSEED.json, VARIANT-sSEED/);
- the --out of scripts/paired_settings.py (paired.json, sSEED-cI.json, sSEED-cI/), whose
  settings --paired-as names in --compare order (e.g. guided,ca).

Rows: variant and schedule; per seed and as mean ± std. Runs a DEADLINE stopped
(NAME.progress.jsonl) follow in a second table: where each got to and what its finished stages
validated at.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from study_guidance import fmt, last_val, metrics  # noqa: E402

NAME = re.compile(r"^(?:(guided|ca|concat)-)?s(\d+)-x([\d.]+)$")
STUDY = re.compile(r"^(guided|ca|concat)-s(\d+)$")
PAIRED = re.compile(r"^s(\d+)-c(\d+)$")
COLS = [("val yes/no", "val_yesno"), ("POPE F1 random", "pope_f1_random"),
        ("popular", "pope_f1_popular"), ("adversarial", "pope_f1_adversarial"),
        ("false-yes partner", "fy_partner"), ("other", "fy_other"), ("CHAIR_i", "chair_i"),
        ("IoU", "mask_iou"), ("pointing", "pointing"), ("matched/mismatched AUROC",
        "itm_auroc_mean_over_layers"), ("VQA colour", "vqa_colour"), ("tower class F1", "tower_f1")]


def scale_of(summary: Path) -> str:
    """The --scale a study script recorded in its study.json / paired.json, as NAME writes it."""
    return f"{float(json.loads(summary.read_text())['args']['scale']):g}"


def runs_of(d: Path, paired_as: list[str]):
    """(variant, seed, scale, eval JSON, metrics.jsonl) of each evaluated run in ``d``."""
    if (d / "study.json").is_file():          # scripts/study_guidance.py
        scale = scale_of(d / "study.json")
        for ev in sorted(d.glob("*-s*.json")):
            m = STUDY.match(ev.stem)
            if m:
                yield m.group(1), int(m.group(2)), scale, ev, d / ev.stem / "metrics.jsonl"
    elif (d / "paired.json").is_file():       # scripts/paired_settings.py
        scale = scale_of(d / "paired.json")
        for ev in sorted(d.glob("s*-c*.json")):
            m = PAIRED.match(ev.stem)
            if not m:
                continue
            i = int(m.group(2))
            if i >= len(paired_as):
                print(f"scale_table.py: {d}: setting c{i} has no name; pass --paired-as "
                      "NAME,NAME,... (one per --compare, in order)", file=sys.stderr)
                sys.exit(2)
            yield paired_as[i], int(m.group(1)), scale, ev, d / ev.stem / "metrics.jsonl"
    else:                                     # gpu_scale_study.sh's res/
        for ev in sorted(d.glob("*.eval.json")):
            name = ev.name[: -len(".eval.json")]
            m = NAME.match(name)
            if m:
                yield (m.group(1) or "guided", int(m.group(2)), m.group(3), ev,
                       d / f"{name}.metrics.jsonl")


def rows(res_dirs: list[Path], paired_as: list[str] = ()) -> dict[tuple[str, str], dict[int, dict]]:
    out: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for d in res_dirs:
        for variant, seed, scale, ev, mfile in runs_of(d, list(paired_as)):
            res = json.loads(ev.read_text())
            row = metrics(res, mfile)
            row["vqa_colour"] = res["suites"].get("vqa", {}).get("types", {}).get("colour", {}).get("accuracy")
            row["tower_f1"] = last_val(mfile, "vision").get("class_f1")
            out[(variant, scale)][seed] = row
    return out


def table(data: dict) -> str:
    lines = ["| variant, schedule, seed | " + " | ".join(c for c, _ in COLS) + " |",
             "|---" * (len(COLS) + 1) + "|"]
    order = {"guided": 0, "ca": 1, "concat": 2}
    key = lambda kv: (float(kv[0][1]), order.get(kv[0][0], 3), kv[0][0])  # noqa: E731
    for (variant, scale), seeds in sorted(data.items(), key=key):
        for seed, r in sorted(seeds.items()):
            lines.append(f"| {variant} x{scale}, {seed} | " + " | ".join(fmt([r[k]]) for _, k in COLS) + " |")
        if len(seeds) > 1:
            lines.append(f"| **{variant} x{scale}, mean ± std** | " +
                         " | ".join(fmt([r[k] for r in seeds.values()]) for _, k in COLS) + " |")
    return "\n".join(lines)


def progress(res_dirs: list[Path]) -> str:
    """Unfinished runs: the last logged stage and step, and each finished stage's validation."""
    lines = []
    for d in res_dirs:
        for f in sorted(d.glob("*.progress.jsonl")):
            recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            if not recs:
                continue
            last = recs[-1]
            vals = "; ".join(f"{r['stage']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["val"].items()
                                                           if k in ("class_f1", "val_yesno_acc"))
                             for r in recs if "val" in r and r["stage"] != "lm")
            lines.append(f"| {f.name[: -len('.progress.jsonl')]} | {last['stage']} step "
                         f"{last.get('step', '-')} (global {last['global_step']}) | {vals or '-'} |")
    if not lines:
        return ""
    return "\n".join(["| unfinished run | reached | validation after each finished stage |",
                      "|---|---|---|", *lines])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                    help="gpu_scale_study.sh's res/, or the --out of study_guidance.py or paired_settings.py")
    ap.add_argument("--paired-as", default="", metavar="NAME,NAME",
                    help="names of a paired_settings.py folder's settings, in --compare order")
    args = ap.parse_intermixed_args()   # options before, between or after the folders
    if missing := [str(d) for d in args.dirs if not d.is_dir()]:
        ap.error(f"no such folder: {', '.join(missing)}")
    paired_as = [n.strip() for n in args.paired_as.split(",") if n.strip()]
    print(table(rows(args.dirs, paired_as)))
    if (extra := progress(args.dirs)):
        print("\n" + extra)
