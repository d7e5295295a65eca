"""Class words for imported captions: COCO category names, their plurals and synonyms, and
the matcher that grounds a caption's class words in the image's instances (used by the
importer; dataset.json's ``vocabulary`` is what CHAIR reads later)."""

from __future__ import annotations

import re

# Words captions use for COCO categories (in the spirit of CHAIR's synonym list). The name and
# its plural always match; the COCO supercategory is deliberately not a synonym.
COCO_SYNONYMS = {
    "person": ["man", "woman", "boy", "girl", "child", "kid", "baby", "lady", "guy", "player"],
    "bicycle": ["bike"], "motorcycle": ["motorbike"], "airplane": ["plane", "jet"],
    "car": ["automobile"], "tv": ["television"], "couch": ["sofa"],
    "cell phone": ["phone", "cellphone", "mobile phone"], "dining table": ["table"],
    "sports ball": ["ball", "soccer ball", "tennis ball"], "hair drier": ["hair dryer"],
    "donut": ["doughnut"], "potted plant": ["plant", "houseplant"], "fire hydrant": ["hydrant"],
    "handbag": ["purse"], "teddy bear": ["teddy"], "skis": ["ski"], "laptop": ["notebook"],
}
IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
    "knife": "knives", "sheep": "sheep", "skis": "skis", "scissors": "scissors",
}


def plural(word: str) -> str:
    """Plural of a (possibly multi-word) class name: irregular table, then simple rules."""
    head, _, last = word.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        many = IRREGULAR_PLURALS[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        many = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        many = last[:-1] + "ies"
    else:
        many = last + "s"
    return f"{head} {many}" if head else many


def coco_vocabulary(classes: list[str]) -> dict[str, dict]:
    """{name: {plural, synonyms}}; synonyms carry their plurals so readers need no rules."""
    taken = set(classes) | {plural(c) for c in classes}
    vocab = {}
    for name in classes:
        words = []
        for syn in COCO_SYNONYMS.get(name, []):
            words += [syn, plural(syn)]
        # A word that is another class's own name belongs to that class.
        vocab[name] = {"plural": plural(name),
                       "synonyms": [s for s in dict.fromkeys(words) if s not in taken]}
    return vocab


def term_words(term: str) -> str:
    """Lower case, words joined by one space: "Hot-Dog" and "hot  dog" are one term."""
    return " ".join(re.split(r"[\s-]+", term.strip().lower()))


def term_regex(term: str) -> str:
    """A term's words as a regex, joined by any spaces or hyphens ("hot dog" ~ "Hot-Dog")."""
    return r"[\s-]+".join(map(re.escape, term.split()))


def term_matcher(vocab: dict[str, dict]) -> tuple[re.Pattern, dict[str, str]] | None:
    """One case-insensitive whole-word regex over every class word, longest first."""
    term_class: dict[str, str] = {}
    for name, entry in vocab.items():
        for term in (name, entry["plural"], *entry["synonyms"]):
            term_class.setdefault(term_words(term), name)
    if not term_class:
        return None
    # Longest first, so "hot dog" wins over "dog" and "dining table" over "table".
    terms = sorted(term_class, key=lambda t: (-len(t), t))
    alternation = "|".join(map(term_regex, terms))
    return re.compile(rf"\b(?:{alternation})\b", re.IGNORECASE), term_class


def grounded_phrases(text: str, matcher: tuple[re.Pattern, dict[str, str]] | None,
                     objects: list[dict]) -> list[dict]:
    """Spans of class words in ``text`` that name instances present in the image."""
    if matcher is None:
        return []
    pattern, term_class = matcher
    phrases = []
    for m in pattern.finditer(text):
        name = term_class[term_words(m.group(0))]
        ids = [o["id"] for o in objects if o["class"] == name]
        if ids:  # a word for an absent class grounds nothing (a hallucination in the text)
            phrases.append({"start": m.start(), "end": m.end(), "objects": ids})
    return phrases
