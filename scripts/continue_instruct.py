"""Continue a finished tiny run with one more, fresh instruct stage (a probe of the recipe).

    python scripts/continue_instruct.py --run RUN --data DATA --out OUT [--steps 700] [--lr 1e-3]

Copies RUN to OUT and resumes it with the tiny recipe (the run's seed and variant) plus a
stage `instruct2`: the recipe's instruct stage with a new warmup + cosine schedule of --steps
at --lr. Prints the stage's validation metrics. Used to measure whether a seed whose yes/no
answers stayed at chance after the recipe's 600 instruct steps leaves chance with more
(docs/tiny-recipe.md); evaluate OUT with `agevlm eval --model OUT --data DATA`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from agevlm_edge.train.loop import train
from agevlm_edge.train.recipe import preset_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="finished RUN DIR of the tiny recipe")
    ap.add_argument("--data", type=Path, required=True, help="the DATA DIR it was trained on")
    ap.add_argument("--out", type=Path, required=True, help="new RUN DIR (replaced if present)")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    done = json.loads((args.run / "config.json").read_text())["recipe"]
    recipe = preset_recipe("tiny", done["variant"], seed=done["seed"])
    if json.loads(json.dumps(recipe.to_dict())) != done:
        raise SystemExit(f"{args.run} was not trained with the plain tiny recipe (--set or "
                         "--config changed it); this probe rebuilds that recipe only")
    instruct = next(s for s in recipe.stages if s.name == "instruct")
    more = dataclasses.replace(instruct, name="instruct2", steps=args.steps, lr=args.lr)
    recipe = dataclasses.replace(recipe, stages=tuple(recipe.stages) + (more,))
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.run, args.out)
    print(train(args.data, args.out, recipe, resume=True))
    for line in (args.out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val" in row and row.get("stage") == "instruct2":
            print(row["global_step"], row["val"])


if __name__ == "__main__":
    main()
