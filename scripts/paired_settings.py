"""Paired comparison of recipe settings from one shared checkpoint per seed.

    python scripts/paired_settings.py --data DATA --out DIR --from instruct \
        --compare "instruct.dice_fraction=0.1" --compare "instruct.dice_fraction=1.0" \
        [--seeds 0,1,2] [--set KEY=VALUE ...] [--scale 1.0]

For each seed, trains the tiny recipe (with the --set overrides) once up to the start of the
--from stage, copies that checkpoint once per --compare setting (space-separated KEY=VALUE
pairs, as `agevlm train --set`), resumes each copy with its setting, evaluates it on DATA and
prints a markdown table: one row per seed and setting, mean +- std per setting, and the mean
paired difference of each later setting against the first. Everything before --from is shared
bit for bit, so a difference comes from the setting and the stages it changes, not from the
seed's draw of the earlier stages (whose spread is larger than most settings' effects).
Results land in --out (paired.json, paired.md); finished evaluations are reused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
from pathlib import Path

from study_guidance import fmt, last_val, metrics, parse_pairs, stopped_run_of

from agevlm_edge.errors import BadInput
from agevlm_edge.eval.suite import evaluate
from agevlm_edge.eval.vqa import balanced_accuracy
from agevlm_edge.fsutil import write_json_atomic, write_text_atomic
from agevlm_edge.train.loop import train
from agevlm_edge.train.recipe import apply_sets, preset_recipe


def step_of(run: Path) -> int:
    return json.loads((run / "training_state" / "state.json").read_text())["global_step"]


def row_of(res: dict, run: Path) -> dict:
    row = metrics(res, run)
    row["val_caption_loss"] = last_val(run).get("val_caption_loss")
    types = res["suites"]["vqa"]["types"]
    row.update({f"vqa_{t}": v["accuracy"] for t, v in types.items()})
    # from by_answer, since older results lack the balanced key
    row.update({f"vqa_{t}_balanced": balanced_accuracy(v.get("by_answer", {})) for t, v in types.items()})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="DATA DIR (agevlm data synth)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs and the table")
    ap.add_argument("--from", dest="from_stage", required=True,
                    help="the first stage the settings may change (e.g. instruct)")
    ap.add_argument("--compare", action="append", default=[], metavar="'KEY=VALUE ...'",
                    help="one setting to compare (repeat, at least 2; the first is the reference)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the recipe's steps")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override shared by every run (repeatable)")
    args = ap.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip().isdigit()]
        if len(seeds) != len(args.seeds.split(",")):
            raise BadInput(f"--seeds {args.seeds!r}: write comma-separated integers, e.g. 0,1,2")
        if len(args.compare) < 2:
            raise BadInput("give at least two --compare settings (the first is the reference)")
        base_sets = parse_pairs(args.sets, "--set")
        settings = [parse_pairs(shlex.split(c) or [c], "--compare") for c in args.compare]
        base = apply_sets(preset_recipe("tiny", seed=0, scale=args.scale), base_sets)
        names = [st.name for st in base.stages]
        if args.from_stage not in names:
            raise BadInput(f"--from {args.from_stage!r}: no such stage ({', '.join(names)})")
        first = names.index(args.from_stage)
        for s in settings:   # each setting may touch only --from and later stages
            for key in s:
                head = key.partition(".")[0]
                if head not in names[first:]:
                    raise BadInput(f"--compare {key}: only the stages from {args.from_stage} on "
                                   f"may differ ({', '.join(names[first:])}); put shared "
                                   "settings in --set")
            apply_sets(base, s)   # a wrong key or value fails here, before anything trains
    except BadInput as e:
        ap.error(str(e))
    except ValueError as e:   # shlex: an unclosed quote
        ap.error(f"--compare: {e}")
    try:
        run_all(args, base, base_sets, settings, first, seeds)
    except BadInput as e:   # a wrong DATA DIR or a damaged checkpoint: one line, exit 2
        ap.exit(2, f"paired_settings.py: error: {e}\n")


def run_all(args, base, base_sets, settings, first, seeds) -> None:
    stop = sum(st.steps for st in base.stages[:first])
    labels = [" ".join(f"{k}={v}" for k, v in s.items()) for s in settings]
    rows: dict[str, list[dict]] = {lb: [] for lb in labels}
    for seed in seeds:
        recipe_of = lambda s: apply_sets(preset_recipe("tiny", seed=seed, scale=args.scale),  # noqa: E731
                                         {**base_sets, **s})
        pre = args.out / f"s{seed}-pre"
        done = step_of(pre) if stopped_run_of(pre, recipe_of({})) else -1
        if stop and done != stop:
            resume = 0 <= done < stop
            print(f"{'resuming' if resume else 'training'} {pre} to step {stop}")
            print(train(args.data, pre, recipe_of({}), resume=resume, overwrite=True, stop_at_step=stop))
        for i, (label, s) in enumerate(zip(labels, settings)):
            run, res_file = args.out / f"s{seed}-c{i}", args.out / f"s{seed}-c{i}.json"
            if not (res_file.is_file() and stopped_run_of(run, recipe_of(s))):
                if stop:
                    shutil.rmtree(run, ignore_errors=True)
                    shutil.copytree(pre, run)
                print(f"s{seed}: {label}")
                print(train(args.data, run, recipe_of(s), resume=bool(stop), overwrite=True))
                evaluate(run, args.data, out_json=res_file)
            rows[label].append({"seed": seed, **row_of(json.loads(res_file.read_text()), run)})
            table = write_table(args, labels, rows)
    print(table)


def write_table(args: argparse.Namespace, labels: list[str], rows: dict[str, list[dict]]) -> str:
    keys = [k for k in next(r for rs in rows.values() for r in rs) if k != "seed"]
    head = [f"| setting | seed | {' | '.join(keys)} |", "|" + "---|" * (len(keys) + 2)]
    lines = [f"| {lb} | {r['seed']} | " + " | ".join(fmt([r[k]]) for k in keys) + " |"
             for lb in labels for r in rows[lb]]
    for lb in labels:
        if rows[lb]:
            lines.append(f"| {lb} | mean | " + " | ".join(fmt([r[k] for r in rows[lb]]) for k in keys) + " |")
    ref = {r["seed"]: r for r in rows[labels[0]]}
    for lb in labels[1:]:
        pairs = [(r, ref[r["seed"]]) for r in rows[lb] if r["seed"] in ref]
        if pairs:
            diff = []
            for k in keys:
                d = [a[k] - b[k] for a, b in pairs if a[k] is not None and b[k] is not None]
                diff.append(f"{round(statistics.mean(d), 3) + 0.0:+.3f}" if d else "-")  # no -0.000
            lines.append(f"| {lb} minus {labels[0]} | {len(pairs)} paired | " + " | ".join(diff) + " |")
    table = "\n".join(head + lines)
    write_json_atomic(args.out / "paired.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                 "rows": rows})
    write_text_atomic(args.out / "paired.md", table + "\n")
    return table


if __name__ == "__main__":
    main()
