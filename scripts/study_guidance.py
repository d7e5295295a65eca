"""The guidance study: guided vs `ca` vs `concat` on the `hard` world, several seeds.

    python scripts/study_guidance.py --out runs/study [--seeds 0,1,2] [--scale 1.0]
        [--set instruct.question_dice=1.0 ...] [--world-set image_size=128 ...] [--data DIR]

Builds (once) a hard world (or takes the DATA DIR given by --data), trains each variant for
each seed with the tiny recipe, evaluates on the prior-broken `test` split and prints a
markdown table of mean +- std: POPE F1 per split, false-yes rate on absent prior partners vs
other absent objects, CHAIR_i, attention-mask IoU, pointing, and the matched/mismatched
image-text AUROC. Everything lands in --out (study.json, study.md); finished runs are reused and
a run stopped part-way resumes from its checkpoint, so an interrupted study picks up where it
stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from agevlm_edge.data.synth import synthesize
from agevlm_edge.data.tokenizer import build_tokenizer
from agevlm_edge.errors import BadInput
from agevlm_edge.eval.suite import evaluate
from agevlm_edge.fsutil import write_json_atomic, write_text_atomic
from agevlm_edge.train.loop import train
from agevlm_edge.train.recipe import apply_sets, preset_recipe, recipe_from_dict

VARIANTS = ("guided", "ca", "concat")


def last_val(run: Path, stage: str | None = None) -> dict:
    """The run's last validation metrics (after its last stage, or after ``stage``), {} when it
    has none; ``run`` is a RUN DIR or its metrics.jsonl (a copy under another name)."""
    path = run if run.suffix == ".jsonl" else run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()
            if '"val"' in line] if path.is_file() else []
    vals = [r["val"] for r in rows if stage is None or r.get("stage") == stage]
    return vals[-1] if vals else {}


def val_yesno(run: Path) -> float | None:
    """The run's last validation yes/no accuracy (after instruct): did its answers leave chance?"""
    return last_val(run).get("val_yesno_acc")


def saved_recipe(run: Path):
    """The recipe a RUN DIR was trained with (its config.json), through recipe_from_dict, so
    that fields added since the run took their defaults."""
    return recipe_from_dict(json.loads((run / "config.json").read_text())["recipe"])


def stopped_run_of(run: Path, recipe) -> bool:
    """True when ``run`` holds a checkpoint of this very recipe (a study stopped mid-run), so
    training resumes it (bit-exactly) instead of starting again."""
    try:
        saved = saved_recipe(run)
    except (OSError, ValueError, KeyError, BadInput):
        return False
    return (run / "training_state" / "state.json").is_file() and saved == recipe


def parse_pairs(pairs: list[str], what: str, example: str = "instruct.dice_fraction=1.0") -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; BadInput naming the option (``what``) for one without =."""
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise BadInput(f"{what} {bad[0]!r} is not KEY=VALUE, e.g. {example!r}")
    return dict(p.split("=", 1) for p in pairs)


def metrics(res: dict, run: Path) -> dict:
    s = res["suites"]
    pope = s["pope"]
    row = {"val_yesno": val_yesno(run)}
    row.update({f"pope_f1_{v}": f["f1"] for v, f in pope["files"].items()})
    fy = pope["summary"]["false_yes"]
    row["fy_partner"], row["fy_other"] = fy["prior_partner"]["rate"], fy["other_absent"]["rate"]
    row["chair_i"] = s["chair"]["chair_i"]
    row["mask_iou"], row["pointing"] = s["grounding"].get("iou"), s["grounding"].get("pointing")
    row["itm_auroc_mean_over_layers"] = s["itm"].get("mean_auroc")
    return row


def fmt(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the recipe's steps")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--preset", default="hard", help="world preset")
    ap.add_argument("--world-set", dest="world_sets", action="append", default=[],
                    metavar="KEY=VALUE", help="world setting, as `agevlm data synth --set` "
                    "(repeatable; e.g. image_size=128)")
    ap.add_argument("--data", type=Path, default=None,
                    help="an existing DATA DIR to train and evaluate on (default: OUT/data, "
                         "built once)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every run, as `agevlm train --set` (repeatable)")
    args = ap.parse_args()
    try:   # a wrong key fails here, before the world is built or any run trains
        sets = parse_pairs(args.sets, "--set")
        world = parse_pairs(args.world_sets, "--world-set", example="image_size=128")
        apply_sets(preset_recipe("tiny"), sets)
    except BadInput as e:
        ap.error(str(e))
    data = args.data or args.out / "data"
    if args.data and args.world_sets:
        ap.error("--world-set shapes the world this script builds; with --data the world "
                 "exists already: leave one out")
    if args.data and not (data / "tokenizer.json").is_file():
        ap.error(f"--data {data}: no tokenizer.json there; make the world with `agevlm data "
                 "synth` and `agevlm data tokenizer`, or leave --data out")
    if not (data / "tokenizer.json").is_file():
        try:
            print(synthesize(data, preset=args.preset, seed=0, n_train=args.n_train,
                             overwrite=True, overrides=world))
        except BadInput as e:
            ap.error(str(e))
        print(build_tokenizer(data))
    rows: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
    # seed-major, so that a study stopped part-way already holds one seed of every variant
    for seed in (int(s) for s in args.seeds.split(",")):
        for variant in rows:
            run, res_file = args.out / f"{variant}-s{seed}", args.out / f"{variant}-s{seed}.json"
            if not res_file.is_file():
                recipe = apply_sets(preset_recipe("tiny", variant, seed=seed, scale=args.scale), sets)
                resume = stopped_run_of(run, recipe)
                print(f"{'resuming' if resume else 'training'} {run}")
                print(train(data, run, recipe, resume=resume, overwrite=True))
                evaluate(run, data, out_json=res_file)
            rows[variant].append(metrics(json.loads(res_file.read_text()), run))
            table = write_table(args, rows)  # after every run: a stopped study keeps its table
    print(table)


def write_table(args: argparse.Namespace, rows: dict[str, list[dict]]) -> str:
    keys = list(next(r for rs in rows.values() for r in rs))
    lines = [f"| variant | seeds | {' | '.join(keys)} |", "|" + "---|" * (len(keys) + 2)]
    for variant, rs in rows.items():
        if rs:
            lines.append(f"| {variant} | {len(rs)} | " + " | ".join(fmt([r[k] for r in rs]) for k in keys) + " |")
    table = "\n".join(lines)
    write_json_atomic(args.out / "study.json", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    write_text_atomic(args.out / "study.md", table + "\n")
    return table


if __name__ == "__main__":
    main()
