"""What kind of hallucinations make up a run's CHAIR_i: misnamed objects or invented ones?

    python scripts/chair_breakdown.py --eval EVAL_JSON --data DATA [--top 12]

Reads the captions that `agevlm eval` scored (eval.json's chair suite) and the split's
records, and prints: how many objects each caption mentions against how many the image has;
how many hallucinated mentions sit in captions that mention exactly as many objects as the
image holds (a present object called by a wrong name) against surplus mentions (an object
made up beside the real ones); how many hallucinated classes are the planted prior partner of
a present trigger object (the world's `priors`, as POPE's false-yes split counts them),
against the number expected if each wrong name were drawn uniformly from the classes absent
from its image; and the commonest (missed present class -> hallucinated class) pairs of a
caption. Used for docs/tiny-recipe.md; a diagnostic, not a test.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from agevlm_edge.data.datadir import load_meta, load_split
from agevlm_edge.eval.pope import absent_kind, prior_partners


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=Path, required=True, help="eval.json written by `agevlm eval`")
    ap.add_argument("--data", type=Path, required=True, help="DATA DIR the evaluation ran on")
    ap.add_argument("--top", type=int, default=12, help="confusion pairs to list")
    args = ap.parse_args()
    ev = json.loads(args.eval.read_text())
    records = {r["image_id"]: r for r in load_split(args.data, ev.get("split", "test"))}
    meta = load_meta(args.data)
    classes, partner = set(meta["vocabulary"]["classes"]), prior_partners(meta)
    diff, pairs = collections.Counter(), collections.Counter()
    halluc = in_matched = to_partner = surplus = 0
    expected = 0.0
    for cap in ev["suites"]["chair"]["captions"]:
        objects = records[cap["image_id"]]["objects"]
        present = {o["class"] for o in objects}
        n_objects, n_mentioned = len(objects), len(cap["mentioned"])
        diff[n_mentioned - n_objects] += 1
        surplus += max(0, n_mentioned - n_objects)
        halluc += len(cap["hallucinated"])
        in_matched += len(cap["hallucinated"]) if n_mentioned == n_objects else 0
        missed = present - set(cap["mentioned"])
        absent = classes - present
        partners = {c for c in absent if absent_kind(c, present, partner) == "prior_partner"}
        for h in cap["hallucinated"]:
            to_partner += h in partners
            expected += len(partners) / max(len(absent), 1)
            pairs.update((m, h) for m in missed)
    n = sum(diff.values())
    print(f"{n} captions; mentions minus objects in the image: "
          + ", ".join(f"{d:+d}: {c}" for d, c in sorted(diff.items())))
    print(f"hallucinated mentions: {halluc}; in captions with as many mentions as objects "
          f"(misnamings): {in_matched}; surplus mentions over all captions: {surplus}")
    print(f"hallucinated classes that are the prior partner of a present trigger: {to_partner} "
          f"(uniformly wrong names would give {expected:.0f})")
    print("commonest (missed present class -> hallucinated class) in one caption:")
    for (m, h), c in pairs.most_common(args.top):
        print(f"  {m:10s} -> {h:10s} {c}")


if __name__ == "__main__":
    main()
