"""Training data from a DATA DIR: images as uint8 tensors, encoded captions with grounded
phrases (token indices + mask grids), encoded questions, image-level labels.

Text layout: agevlm_edge.text.encode_with_spans, shared with evaluation and the runtime
([bos] + prompt + target + [eos]). The loss covers the target tokens and eos; for LM
pretraining it covers everything after bos.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from agevlm_edge.data.datadir import decode_mask, load_meta, load_split
from agevlm_edge.data.tokenizer import span_tokens
from agevlm_edge.errors import BadInput
from agevlm_edge.eval.common import ImageStore
from agevlm_edge.eval.grounding import mask_to_grid
from agevlm_edge.text import encode_with_spans, prompt_ids
from agevlm_edge.prompts import caption_prompt, context_question_prompt, question_prompt, target_text

IGNORE = -100


@dataclass
class Sample:
    image: int                      # row in SplitData.images
    ids: list[int]
    prompt_len: int                 # tokens before the target (bos + prompt)
    phrases: list = field(default_factory=list)   # [(token indices, mask grid [N] float32)]


@dataclass
class SplitData:
    images: torch.Tensor            # uint8 [n, 3, S, S]
    labels: torch.Tensor            # float [n, C + K]: class presence, colour presence
    captions: list[Sample]
    questions: list[Sample]
    records: list[dict]


def check_pools(stages: list, data: SplitData, n_context: Callable[[], int],
                data_dir: Path) -> None:
    """Refuse a stage that draws from an empty pool of the train split (a DATA DIR imported
    without questions, say) before anything is trained or deleted. ``n_context``: how many
    reading-comprehension samples (context_questions) there are, counted only when asked."""
    for st in stages:
        need = []
        if st.kind == "vision":
            need.append((len(data.images), "images", "give a DATA DIR with train images"))
        elif st.kind == "lm":
            need.append((len(data.captions) + len(data.questions), "captions or questions",
                         "give a DATA DIR with text"))
            if st.n_context:
                need.append((n_context(), "yes/no questions to read in context",
                             f"--set {st.name}.context_qa=0"))
        else:
            if st.n_captions:
                need.append((len(data.captions), "captions", f"--set {st.name}.captions=0"))
            if st.batch_size - st.n_captions:
                need.append((len(data.questions), "questions", f"--set {st.name}.questions=0"))
        for n, what, fix in need:
            if not n:
                raise BadInput(f"stage {st.name} draws {what}, and {data_dir}'s train split has "
                               f"none; import them, or leave them out of the stage ({fix})")


def _load_images(data_dir: Path, records: list[dict], size: int) -> torch.Tensor:
    """uint8 [n, 3, S, S] through the evaluation's ImageStore (Preprocessor.to_uint8, one
    clear error per unreadable image); threads overlap PNG decoding."""
    store = ImageStore(data_dir, size)
    with ThreadPoolExecutor(4) as pool:
        arrays = list(pool.map(store.get, [r["file"] for r in records]))
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def _labels(records: list[dict], classes: list[str], colours: list[str]) -> torch.Tensor:
    """Image-level presence of each class and each colour.

    Separate colour labels, not class-colour pairs: with the 112 pairs of the easy world in
    the loss, class F1 after 300 tower steps was 0.58 against 0.81 with classes alone. The 8
    colour labels are learnt within 200 steps (F1 0.99); with them the classes reach 0.94 after
    600 steps, against 0.99 alone (one run each).
    """
    n = np.concatenate([_object_counts(records, "class", classes),
                        _object_counts(records, "colour", colours)], 1)
    return torch.from_numpy((n >= 1).astype(np.float32))


def count_labels(records: list[dict], classes: list[str]) -> torch.Tensor:
    """Image-level "two or more of this class" per class, float [n, C], from the object list
    (no masks: like _labels, it says what is in the image, not where). Stage.count_labels adds
    these to the vision stage, for the VQA count the presence labels do not teach.
    """
    return torch.from_numpy((_object_counts(records, "class", classes) >= 2).astype(np.float32))


def _object_counts(records: list[dict], key: str, names: list[str]) -> np.ndarray:
    """int [n, len(names)]: how many objects of each image have each name under ``key``
    (class or colour; an object without it, or with a name outside the list, is not counted)."""
    index = {x: i for i, x in enumerate(names)}
    n = np.zeros((len(records), len(names)), np.int64)
    for r, rec in enumerate(records):
        for ob in rec["objects"]:
            if ob.get(key) in index:
                n[r, index[ob[key]]] += 1
    return n


def token_labels(records: list[dict], classes: list[str], colours: list[str], grid: int
                 ) -> torch.Tensor:
    """Per-token labels for the mask-supervised vision ablation: float16 [n, grid*grid, C+K],
    the fraction of each patch that an object of that class (colour) covers (union, capped at 1).

    These teach the tower *where* each object is, so every fusion variant inherits grounding
    from them: the guided-vs-`ca` comparison uses image-level labels, this is reported apart.
    """
    C, K = len(classes), len(colours)
    ci, ki = {c: i for i, c in enumerate(classes)}, {k: i for i, k in enumerate(colours)}
    y = np.zeros((len(records), grid * grid, C + K), np.float32)
    for r, rec in enumerate(records):
        for ob in rec["objects"]:
            if ob.get("mask") is None:
                continue
            cover = mask_to_grid(decode_mask(ob["mask"]), grid).reshape(-1)
            for j in ([ci[ob["class"]]] if ob["class"] in ci else []) + \
                     ([C + ki[ob["colour"]]] if ob.get("colour") in ki else []):
                y[r, :, j] = np.minimum(1.0, y[r, :, j] + cover)
    return torch.from_numpy(y).half()


def _extra_masks(data_dir: Path, split: str, source: str) -> dict[tuple[str, int], dict] | None:
    """Masks from masks/<source>/<split>.jsonl (e.g. sam:vit_b), keyed by (image_id, object)."""
    if source == "rendered" or source == "annotation":
        return None
    from agevlm_edge.data.datadir import read_jsonl

    path = data_dir / "masks" / source.replace(":", "_") / f"{split}.jsonl"
    return {(r["image_id"], r["object"]): r["mask"] for r in read_jsonl(path, f"{source} masks")}


def load_split_data(data_dir: str | Path, split: str, tokenizer, image_size: int, patch: int,
                    mask_source: str = "rendered", limit: int | None = None,
                    bos: int = 1, eos: int = 2) -> SplitData:
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    records = load_split(data_dir, split)[:limit]
    vocab = meta["vocabulary"]
    classes, colours = list(vocab["classes"]), list(vocab.get("colours", []))
    grid = image_size // patch
    extra = _extra_masks(data_dir, split, mask_source)
    cap_prompt_len = len(prompt_ids(tokenizer, caption_prompt(), bos))
    captions, questions, q_cache = [], [], {}
    for i, rec in enumerate(records):

        def union_mask(objects: list[int]) -> np.ndarray:
            m = np.zeros((rec["height"], rec["width"]), bool)
            for o in objects:
                rle = extra.get((rec["image_id"], o)) if extra is not None else rec["objects"][o].get("mask")
                if rle is not None:
                    m |= decode_mask(rle)
            return m

        for cap in rec.get("captions", []):
            spans = [(ph["start"], ph["end"]) for ph in cap["phrases"]]
            ids, idx = encode_with_spans(tokenizer, caption_prompt(), cap["text"], spans,
                                         bos_id=bos, eos_id=eos)
            phrases = []
            for ph, toks in zip(cap["phrases"], idx):
                m = union_mask(ph["objects"])
                if toks and m.any():
                    phrases.append((toks, mask_to_grid(m, grid).reshape(-1)))
            captions.append(Sample(i, ids, cap_prompt_len, phrases))
        for q in rec.get("questions", []):
            key = (q["question"], q["answer"])
            if key not in q_cache:  # a few hundred distinct questions: encode each once
                prompt = question_prompt(q["question"])
                ids, _ = encode_with_spans(tokenizer, prompt, q["answer"], (), bos_id=bos, eos_id=eos)
                q_cache[key] = (ids, len(prompt_ids(tokenizer, prompt, bos)),
                                question_object_tokens(tokenizer, q))
            ids, prompt_len, obj_toks = q_cache[key]
            phrases = []
            if obj_toks and q.get("type") in QUESTION_PHRASE_TYPES:
                objs = [k for k, o in enumerate(rec["objects"]) if o["class"] == q["object"]]
                m = union_mask(objs)
                if m.any():
                    g = mask_to_grid(m, grid).reshape(-1)
                    phrases = [(obj_toks, g), ([prompt_len - 1], g)]
                elif not objs and q.get("type") == "existence":   # absent: Stage.null_dice
                    phrases = [([prompt_len - 1], np.zeros(grid * grid, np.float32))]
            questions.append(Sample(i, ids, prompt_len, phrases))
    return SplitData(_load_images(data_dir, records, image_size), _labels(records, classes, colours),
                     captions, questions, records)


# Questions about one object class, whose phrases (see question_object_tokens) the dice loss
# can use when that class is in the image; relation questions name two objects.
QUESTION_PHRASE_TYPES = ("existence", "colour", "count")


def question_object_tokens(tokenizer, q: dict) -> list[int]:
    """Token positions (in [bos] + prompt) of the asked object's word in a question sample.

    With the answer position (the prompt's last token, which predicts the answer) these are
    the question's grounded phrases: when the object is in the image the dice loss can pull
    both toward its mask (Stage.question_dice), so the query that decides the answer looks at
    the asked object. Empty when the question has no ``object`` or does not contain it.
    """
    obj = q.get("object")
    start = q["question"].find(obj) if obj else -1
    if start < 0:
        return []
    prompt = question_prompt(q["question"])
    head = prompt.index(q["question"])
    enc = tokenizer.encode(prompt, add_special_tokens=False)
    return [1 + t for t in span_tokens(enc.offsets, head + start, head + start + len(obj))]


def context_questions(records: list[dict], tokenizer, bos: int = 1, eos: int = 2) -> list[Sample]:
    """Text-only reading-comprehension samples for LM pretraining: each question of an image
    after one of its captions ("<caption> Question: ... Answer: <answer>").

    They teach the LM what a pretrained LM already knows: carry the asked object to the answer
    position and check it against the context. Without them the tiny LM has no reason to (an
    existence answer is yes or no for every object alike), and a cross-attention query at the
    answer position cannot tell which object was asked (measured on the easy world: the
    asked-object part of that hidden state was ~1% of its norm after 250 LM steps).
    """
    texts, answers, rows = [], [], []
    for i, rec in enumerate(records):
        caps = rec.get("captions", [])
        for j, q in enumerate(rec.get("questions", [])):
            if caps:
                texts.append(context_question_prompt(caps[j % len(caps)]["text"], q["question"]))
                answers.append(q["answer"])
                rows.append(i)
    heads = tokenizer.encode_batch(texts, add_special_tokens=False)
    tails = tokenizer.encode_batch([target_text(a) for a in answers], add_special_tokens=False)
    return [Sample(i, [bos] + h.ids + t.ids + [eos], 1 + len(h.ids))
            for i, h, t in zip(rows, heads, tails)]


def question_weights(records: list[dict], weights: dict) -> torch.Tensor:
    """Sampling weight of each question sample (the order of SplitData.questions) under a
    stage's ``question_weights``: a key ``TYPE`` weights every question of that type, a key
    ``TYPE:ANSWER`` the questions of that type with that answer and wins over ``TYPE``;
    unnamed questions weigh 1. A key no question matches is an error (a typo would otherwise
    train the default mix without a word), and so is a mix that weighs every question 0."""
    keys = [(str(q.get("type", "")), str(q.get("answer", "")))
            for rec in records for q in rec.get("questions", [])]
    types = {t for t, _ in keys}
    pairs = {f"{t}:{a}" for t, a in keys}
    unknown = sorted(k for k in weights if k not in types and k not in pairs)
    if unknown:
        raise BadInput(f"question_weights: {', '.join(map(repr, unknown))} match no train question; "
                       f"keys are TYPE or TYPE:ANSWER, types here: {', '.join(sorted(types))}")
    w = torch.tensor([float(weights.get(f"{t}:{a}", weights.get(t, 1.0))) for t, a in keys],
                     dtype=torch.float64)
    if not len(w) or w.sum() <= 0:
        raise BadInput("question_weights weigh every train question 0; give some a weight > 0")
    return w


def length_buckets(samples: list[Sample], n: int) -> list[list[Sample]]:
    """Split a batch into up to ``n`` buckets of similar length (sorted by length, equal counts).

    A batch is padded to its longest sample; captions (~21 tokens), questions (~15) and
    reading-comprehension texts (~33) mixed in one batch left half of every step's tokens as
    padding (measured on the easy world: real/padded 0.46-0.55 per stage). Each bucket is
    collated and run on its own and the loss sums are added, which changes no loss value.
    Sorting is stable, so the split is a pure function of the batch (resume stays exact).
    It is not bit-identical to one bucket: the float sums run in another order, and that
    alone moved one full `tiny` run off the trajectory on which yes/no answers leave chance
    (docs/tiny-recipe.md), so the default stays 1 and more buckets are opt-in.
    """
    n = max(1, min(n, len(samples)))
    if n == 1:
        return [list(samples)]   # as collated before buckets existed: bit-identical training
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    bounds = [round(k * len(samples) / n) for k in range(n + 1)]
    return [[samples[i] for i in order[a:b]] for a, b in zip(bounds, bounds[1:]) if b > a]


def collate(samples: list[Sample], pad_id: int, n_patches: int, lm_only: bool = False) -> dict:
    """Right-padded batch: input_ids, labels (targets only), attention_mask, image rows, and
    phrase tensors for the dice loss (token weights [B,P,T], masks [B,P,N], valid [B,P])."""
    B, T = len(samples), max(len(s.ids) for s in samples)
    P = max([len(s.phrases) for s in samples] + [1])
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    weights, masks = torch.zeros(B, P, T), torch.zeros(B, P, n_patches)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s.ids)
        ids[b, :n] = torch.tensor(s.ids)
        attn[b, :n] = 1
        start = 1 if lm_only else s.prompt_len
        labels[b, start:n] = ids[b, start:n]
        for p, (toks, grid) in enumerate(s.phrases):
            weights[b, p, toks] = 1.0 / len(toks)
            masks[b, p] = torch.from_numpy(grid)
            valid[b, p] = True
    return {"input_ids": ids, "labels": labels, "attention_mask": attn,
            "image": torch.tensor([s.image for s in samples]), "phrase_weights": weights,
            "phrase_masks": masks, "phrase_valid": valid}
