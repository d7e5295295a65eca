"""Does a model's answer to "How many X are there?" carry the count, below the argmax?

    python scripts/count_signal.py --model RUN_DIR --data DATA [--splits val,test]

For every count question whose answer is one or more (zero is the existence question again),
the log-probability margin of the first answer token, log p(" two") - log p(" one"), with the
image; per reference answer its median and how often it is above 0 (the model would say
"two"), and the AUROC of the margin between two-or-more and one. An AUROC near 0.5 says the
answer position holds no count; well above 0.5 with the margin below 0 says the count is
there and the commoner "one" wins the argmax. Used for docs/tiny-recipe.md; a diagnostic,
not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from agevlm_edge.data.datadir import load_split
from agevlm_edge.data.text import NUMBERS
from agevlm_edge.eval.common import ImageStore
from agevlm_edge.eval.itm import auroc
from agevlm_edge.eval.suite import load_backend


def token_id(tokenizer, word: str) -> int:
    ids = tokenizer.encode(" " + word, add_special_tokens=False).ids
    if len(ids) != 1:
        raise SystemExit(f"count_signal.py: ' {word}' is {len(ids)} tokens in this tokenizer; "
                         "the margin needs one")
    return ids[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="RUN DIR (torch)")
    ap.add_argument("--data", type=Path, required=True, help="DATA DIR it was trained on")
    ap.add_argument("--splits", default="val,test")
    args = ap.parse_args()
    backend, _ = load_backend(args.model, device="cpu")
    rows = [(r["file"], q["question"], q["answer"]) for split in args.splits.split(",")
            for r in load_split(args.data, split) for q in r.get("questions", [])
            if q.get("type") == "count" and q["answer"] != "zero"]
    store = ImageStore(args.data, backend.image_size)
    logp = backend.first_token_logprobs(store.many([f for f, _, _ in rows]), [q for _, q, _ in rows])
    one, two = token_id(backend.tokenizer, "one"), token_id(backend.tokenizer, "two")
    margin = logp[:, two] - logp[:, one]
    answers = np.array([a for _, _, a in rows])
    print(f"{args.model} on {args.data} ({args.splits}): log p(' two') - log p(' one')")
    for a in sorted(set(answers), key=NUMBERS.index):
        m = margin[answers == a]
        print(f"  {a:<6} n {len(m):4d}  median {np.median(m):6.2f}  above 0 {np.mean(m > 0):.3f}")
    print(f"  AUROC two-or-more vs one: {auroc(margin[answers != 'one'], margin[answers == 'one']):.3f}")


if __name__ == "__main__":
    main()
