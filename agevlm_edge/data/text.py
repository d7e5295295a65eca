"""Captions with grounded phrase spans, and questions with answers, for one synthetic scene.

A phrase is "<colour> <noun>" ("red star", "two blue discs" -> span "blue discs") and links
to the instance ids it names. Nouns are sometimes synonyms (box for square) so CHAIR's
synonym handling is exercised by the data itself.
"""

from __future__ import annotations

import numpy as np

from .datadir import pope_question
from .world import CLASSES, SYNONYM_PLURALS

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SYNONYM_P = 0.25

_LIST_TEMPLATES = [
    "{list}.",
    "an image with {list}.",
    "a picture showing {list}.",
    "there {be} {list} in the image.",
    "{list} on a textured background.",
]


def _noun(rng: np.random.Generator, cls: str, plural: bool) -> str:
    plural_word, synonyms = CLASSES[cls]
    if synonyms and rng.random() < SYNONYM_P:
        syn = synonyms[int(rng.integers(len(synonyms)))]
        return SYNONYM_PLURALS[syn] if plural else syn
    return plural_word if plural else cls


def _position(cx: float, cy: float, size: int) -> str:
    col = ("left", "", "right")[min(int(3 * cx / size), 2)]
    row = ("top", "", "bottom")[min(int(3 * cy / size), 2)]
    if not row and not col:
        return "in the centre"
    if row and col:
        return f"at the {row} {col}"
    return f"on the {col}" if col else f"at the {row}"


def _groups(objects: list[dict]) -> list[list[dict]]:
    """Objects grouped by (class, colour), groups ordered left to right."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for ob in objects:
        groups.setdefault((ob["class"], ob["colour"]), []).append(ob)
    return sorted(groups.values(), key=lambda g: min(o["box"][0] for o in g))


class _Builder:
    """Appends text pieces and records the character span of each grounded phrase."""

    def __init__(self) -> None:
        self.text = ""
        self.phrases: list[dict] = []

    def add(self, piece: str, objects: list[int] | None = None) -> None:
        if objects is not None:
            self.phrases.append({"start": len(self.text), "end": len(self.text) + len(piece),
                                 "objects": objects})
        self.text += piece


def _caption(rng: np.random.Generator, objects: list[dict], size: int, with_pos: bool) -> dict:
    template = _LIST_TEMPLATES[int(rng.integers(len(_LIST_TEMPLATES)))]
    groups = _groups(objects)
    head, tail = template.split("{list}")
    plural_first = len(groups[0]) > 1 or len(groups) > 1
    b = _Builder()
    b.add(head.replace("{be}", "are" if plural_first else "is"))
    for gi, g in enumerate(groups):
        if gi:
            b.add(" and " if gi == len(groups) - 1 else ", ")
        n = len(g)
        b.add(("an " if g[0]["colour"][0] in "aeiou" else "a ") if n == 1 else f"{NUMBERS[n]} ")
        b.add(f"{g[0]['colour']} {_noun(rng, g[0]['class'], n > 1)}", [o["id"] for o in g])
        if with_pos and n == 1:
            b.add(" " + _position(*_centre(g[0]), size))
    b.add(tail)
    text = b.text[0].upper() + b.text[1:]
    return {"text": text, "phrases": b.phrases}


def _centre(ob: dict) -> tuple[float, float]:
    x0, y0, x1, y1 = ob["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def captions(rng: np.random.Generator, objects: list[dict], size: int, n: int) -> list[dict]:
    """n captions naming every object; the second and later ones add positions."""
    return [_caption(rng, objects, size, with_pos=i > 0) for i in range(n)]


def questions(rng: np.random.Generator, objects: list[dict], classes: list[str]) -> list[dict]:
    """Existence (POPE template), colour, count and left/right relation questions."""
    present = sorted({o["class"] for o in objects})
    absent = [c for c in classes if c not in present]
    out = []
    for c in rng.permutation(present)[:2].tolist():
        out.append({"question": pope_question(c), "answer": "yes", "type": "existence", "object": c})
    shuffled_absent = rng.permutation(absent).tolist()
    for c in shuffled_absent[:2]:
        out.append({"question": pope_question(c), "answer": "no", "type": "existence", "object": c})
    by_class = {c: [o for o in objects if o["class"] == c] for c in present}
    unique = [c for c in present if len(by_class[c]) == 1]
    for c in rng.permutation(unique)[:1].tolist():
        out.append({"question": f"What colour is the {c}?", "answer": by_class[c][0]["colour"],
                    "type": "colour", "object": c})
    # One absent class, a random one (the class list's first absent class made "How many
    # circles" mean "zero" to a model that never looked); drawn above, so the stream of draws
    # (images, captions, the other questions) stays as it was.
    count_pool = present + shuffled_absent[:1]
    c = count_pool[int(rng.integers(len(count_pool)))]
    out.append({"question": f"How many {CLASSES[c][0]} are there?",
                "answer": NUMBERS[len(by_class.get(c, []))], "type": "count", "object": c})
    out.extend(_relation(rng, by_class, unique))
    return out


def _relation(rng: np.random.Generator, by_class: dict, unique: list[str]) -> list[dict]:
    """One left/right question about two unique, horizontally separated objects."""
    if len(unique) < 2:
        return []
    a, b = rng.permutation(unique)[:2].tolist()
    xa, xb = _centre(by_class[a][0])[0], _centre(by_class[b][0])[0]
    if abs(xa - xb) < 3:  # too close to call left/right
        return []
    return [{"question": f"Is the {a} to the left of the {b}?",
             "answer": "yes" if xa < xb else "no", "type": "relation", "object": a}]
