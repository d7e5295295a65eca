"""CHAIR (Rohrbach et al., 2018): object hallucination in generated captions.

    CHAIR_s = captions with at least one hallucinated object / captions
    CHAIR_i = hallucinated object mentions / object mentions

Object words come from dataset.json's vocabulary (class names, plurals, synonyms and
synonym plurals, each mapped to its class), matched as whole words, case-insensitively,
longest first (so "stripes" is one mention of bar, not "stripe" + "s"); the words of a
multi-word name may be joined by spaces or hyphens ("hot-dog"), as the importer matches them.
An image's ground truth is, as in the original code, its annotated classes plus the classes
its reference captions name (COCO captions name objects its instances leave out).
"""

from __future__ import annotations

import os
import re

from ..data.vocab import term_regex, term_words
from ..errors import BadInput
from .backend import EvalBackend
from .common import ImageStore, chunks, ratio


def word_map(vocabulary: dict) -> dict[str, str]:
    """Every object word (lower case) -> its class, from dataset.json ``vocabulary``."""
    classes = vocabulary.get("classes", {})
    if not classes:
        raise BadInput("dataset.json has no vocabulary classes, and CHAIR needs the object words; "
                       "leave chair out with --suite (e.g. --suite pope)")
    out: dict[str, str] = {}
    for name, entry in classes.items():
        words = [name, entry.get("plural", ""), *entry.get("synonyms", []),
                 *entry.get("synonym_plurals", [])]
        out.update({term_words(w): name for w in words if w})
    return out


def mention_pattern(words: dict[str, str]) -> re.Pattern:
    """One regex of all object words, longest first so plurals win over their stems."""
    alts = sorted(words, key=lambda w: (-len(w), w))
    return re.compile(r"\b(" + "|".join(map(term_regex, alts)) + r")\b", re.IGNORECASE)


def mentions(caption: str, words: dict[str, str], pattern: re.Pattern | None = None) -> list[str]:
    """Classes mentioned in ``caption``, one entry per mention, in order."""
    pattern = pattern or mention_pattern(words)
    return [words[term_words(m.group(1))] for m in pattern.finditer(caption)]


def ground_truth(record: dict, words: dict[str, str], pattern: re.Pattern) -> set[str]:
    """The record's annotated classes and those its reference captions mention."""
    named = {c for cap in record.get("captions", []) for c in mentions(cap["text"], words, pattern)}
    return {o["class"] for o in record["objects"]} | named


def chair_scores(captions: list[str], truths: list[set[str]], words: dict[str, str],
                 pattern: re.Pattern | None = None) -> dict:
    """CHAIR_s, CHAIR_i and object recall for captions against their images' classes."""
    pattern = pattern or mention_pattern(words)
    n_ment = n_hall = n_bad_caps = covered = n_truth = 0
    per_caption = []
    for cap, truth in zip(captions, truths):
        found = mentions(cap, words, pattern)
        wrong = [c for c in found if c not in truth]
        n_ment, n_hall = n_ment + len(found), n_hall + len(wrong)
        n_bad_caps += bool(wrong)
        covered, n_truth = covered + len(truth & set(found)), n_truth + len(truth)
        per_caption.append({"caption": cap, "mentioned": found, "hallucinated": wrong})
    return {"n": len(captions), "chair_s": ratio(n_bad_caps, len(captions)),
            "chair_i": ratio(n_hall, n_ment), "mentions": n_ment, "hallucinated": n_hall,
            # Recall guards against the trivial CHAIR of 0 from captions that name nothing.
            "object_recall": ratio(covered, n_truth),
            "mean_words": ratio(sum(len(c.split()) for c in captions), len(captions)),
            "captions": per_caption}


def run_chair(backend: EvalBackend, data_dir: str | os.PathLike, meta: dict,
              records: list[dict], max_new_tokens: int = 40) -> dict:
    """Caption every record's image and score the captions with CHAIR."""
    words = word_map(meta.get("vocabulary", {}))
    store = ImageStore(data_dir, backend.image_size)
    caps: list[str] = []
    for sl in chunks(len(records), "chair"):
        caps += backend.caption(store.many([r["file"] for r in records[sl]]), max_new_tokens)
    pattern = mention_pattern(words)
    truths = [ground_truth(r, words, pattern) for r in records]
    res = chair_scores(caps, truths, words, pattern)
    for row, r in zip(res["captions"], records):
        row["image_id"] = r["image_id"]
    return res
