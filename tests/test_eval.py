"""Evaluation suites: metric correctness with fake backends of known behaviour, and the
PyTorch backend end to end on tiny random models (xattn and concat)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from agevlm_edge.data.datadir import decode_mask, load_meta, load_split
from agevlm_edge.errors import BadInput
from agevlm_edge.eval import chair, grounding, itm, pope, vqa
from agevlm_edge.eval.common import ImageStore
from agevlm_edge.eval.suite import format_report, run_suite
from agevlm_edge.text import BOS_ID, decode_generated, encode_with_spans, prompt_ids
from agevlm_edge.prompts import caption_prompt, parse_yes_no

S, G = 64, 8                                        # image size, patch grid of the tiny models


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from agevlm_edge.data.synth import synthesize

    out = tmp_path_factory.mktemp("evalworld") / "data"
    synthesize(out, n_train=60, n_val=10, n_test=30, workers=1, seed=0)
    return out


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    from agevlm_edge.data.tokenizer import corpus, train_bpe

    return train_bpe(corpus(data_dir), 400)


# ----------------------------------------------------------------------------- fake backends
class Oracle:
    """Knows every record: answers, captions and masks come from the DATA DIR itself."""

    image_size, grid = S, G

    def __init__(self, data_dir, split: str = "test"):
        store = ImageStore(data_dir, S)
        self.meta = load_meta(data_dir)
        self.partners = pope.prior_partners(self.meta)
        self.by_image = {store.get(r["file"]).tobytes(): r for r in load_split(data_dir, split)}

    def record(self, image: np.ndarray) -> dict:
        return self.by_image[image.tobytes()]

    def says_yes(self, rec: dict, obj: str) -> bool:
        return obj in {o["class"] for o in rec["objects"]}

    def answer(self, images, questions, max_new_tokens=4):
        out = []
        for im, q in zip(images, questions):
            rec = self.record(im)
            pope_q = re.match(r"Is there an? (.+) in the image\?", q)   # POPE's template
            if pope_q:
                out.append("yes" if self.says_yes(rec, pope_q.group(1)) else "no")
            else:
                out.append(next(x["answer"] for x in rec["questions"] if x["question"] == q))
        return out

    def caption(self, images, max_new_tokens=40):
        return [self.record(im)["captions"][0]["text"] for im in images]

    def target(self, rec: dict, text: str, span) -> np.ndarray:
        cap = next(c for c in rec["captions"] if c["text"] == text)
        ph = next(p for p in cap["phrases"] if (p["start"], p["end"]) == tuple(span))
        masks = {o["id"]: decode_mask(o["mask"]) for o in rec["objects"]}
        return grounding.mask_to_grid(np.logical_or.reduce([masks[i] for i in ph["objects"]]), G)

    def phrase_maps(self, images, texts, spans):
        return [[self.target(self.record(im), t, s) for s in sp]
                for im, t, sp in zip(images, texts, spans)]

    def hidden_states(self, images, texts):
        """Layer 0 sees nothing (constant states); layer 1 holds class indicator vectors."""
        words = chair.word_map(self.meta["vocabulary"])
        classes = sorted(self.meta["vocabulary"]["classes"])
        onehot = lambda names: np.array([c in names for c in classes], np.float32) + 0.1
        img = np.stack([[np.ones(len(classes)), onehot({o["class"] for o in self.record(im)["objects"]})]
                        for im in images])
        txt = np.stack([[np.ones(len(classes)), onehot(set(chair.mentions(t, words)))] for t in texts])
        return img, txt


class AlwaysYes(Oracle):
    def answer(self, images, questions, max_new_tokens=4):
        return ["Yes, there is."] * len(questions)


class PriorHallucinator(Oracle):
    """Says yes to present objects and to the partner of any present trigger."""

    def says_yes(self, rec, obj):
        present = {o["class"] for o in rec["objects"]}
        return obj in present or any(self.partners.get(t) == obj for t in present)


class OneWrongObject(Oracle):
    """The true caption plus one object the image does not contain."""

    def caption(self, images, max_new_tokens=40):
        out = []
        for im, cap in zip(images, super().caption(images)):
            present = {o["class"] for o in self.record(im)["objects"]}
            wrong = sorted(set(self.meta["vocabulary"]["classes"]) - present)[0]
            out.append(f"{cap} There is also a {wrong}.")
        return out


class UniformMaps(Oracle):
    def phrase_maps(self, images, texts, spans):
        return [[np.full((G, G), 1 / G**2, np.float32) for _ in sp] for sp in spans]


# ----------------------------------------------------------------------------- POPE
@pytest.mark.parametrize("answer,parsed", [("No, there is not.", "no"), ("Yes.", "yes"),
                                           ("not sure", "no"), ("yes, no doubt", "no"),
                                           ("Yes. No.", "yes"), ("", "yes"), (" no", "no"),
                                           ("No", "no"), ("no.", "no"), ("none", "yes"),
                                           ("north", "yes"), ("I know", "yes"),
                                           # the official script's own quirks, kept
                                           ("NO", "yes"), ("Not sure", "yes"),
                                           ("no,thing", "yes"), ("No!", "yes")])
def test_pope_parsing_follows_the_official_script(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_pope_oracle_is_perfect_and_lists_every_answer(data_dir):
    res = run_suite(Oracle(data_dir), data_dir, suites="pope")["suites"]["pope"]
    assert set(res["files"]) == {"random", "popular", "adversarial"}
    for f in res["files"].values():
        assert f["f1"] == f["accuracy"] == f["precision"] == f["recall"] == 1.0
        assert f["yes_ratio"] == 0.5 and f["n"] == len(f["answers"]) > 0
        assert f["false_yes"]["prior_partner"]["yes"] == f["false_yes"]["other_absent"]["yes"] == 0
        assert {"question_id", "object", "label", "prediction"} <= set(f["answers"][0])
        assert all(a["label"] == a["prediction"] for a in f["answers"])


def test_pope_always_yes(data_dir):
    res = run_suite(AlwaysYes(data_dir), data_dir, suites=["pope"])["suites"]["pope"]
    for f in res["files"].values():
        assert (f["yes_ratio"], f["recall"], f["precision"], f["accuracy"]) == (1.0, 1.0, 0.5, 0.5)
        assert f["f1"] == pytest.approx(2 / 3)


def test_a_pope_file_without_questions_for_the_images_stays_out_of_the_means(data_dir, tmp_path):
    # It counted as 0: a perfect model read mean F1 0.667 and yes-ratio 0.333.
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    meta = load_meta(d)
    first = {r["image_id"] for r in load_split(d, "test")[:5]}
    path = d / meta["pope"]["files"]["test"]["random"]
    kept = [line for line in path.read_text().splitlines()
            if json.loads(line)["image_id"] not in first]
    path.write_text("\n".join(kept) + "\n")
    res = run_suite(Oracle(d), d, suites="pope", limit=5)["suites"]["pope"]
    assert res["files"]["random"]["n"] == 0 and res["files"]["random"]["f1"] is None
    s = res["summary"]
    assert (s["mean_accuracy"], s["mean_f1"], s["mean_yes_ratio"]) == (1.0, 1.0, 0.5)
    assert pope.binary_metrics([], [])["f1"] is None
    assert pope.binary_metrics(["yes", "no"], ["no", "no"])["f1"] == 0.0   # never says yes
    assert "random" in format_report({"data_dir": str(d), "split": "test", "images": 5,
                                      "suites": {"pope": res}})


def test_pope_separates_prior_partner_hallucination(data_dir):
    res = run_suite(PriorHallucinator(data_dir), data_dir, suites="pope")["suites"]["pope"]
    fy = res["summary"]["false_yes"]
    assert fy["prior_partner"]["n"] > 0 and fy["prior_partner"]["rate"] == 1.0
    assert fy["other_absent"]["n"] > 0 and fy["other_absent"]["rate"] == 0.0
    adv = res["files"]["adversarial"]
    assert adv["recall"] == 1.0 and adv["fp"] == adv["false_yes"]["prior_partner"]["n"] > 0
    # Each flip is listed: partner questions answered yes with label no.
    flips = [a for a in adv["answers"] if a["label"] != a["prediction"]]
    assert len(flips) == adv["fp"] and all(a["prediction"] == "yes" for a in flips)
    assert {a["object"] for a in flips} <= set(res["partners"].values())


def test_pope_errors_by_object(data_dir):
    ok = run_suite(Oracle(data_dir), data_dir, suites="pope")["suites"]["pope"]["summary"]["by_object"]
    assert ok and all(d["false_yes"] == d["false_no"] == 0 for d in ok.values())
    assert sum(d["present"] for d in ok.values()) > 0 and sum(d["absent"] for d in ok.values()) > 0
    res = run_suite(PriorHallucinator(data_dir), data_dir, suites="pope")
    by = res["suites"]["pope"]["summary"]["by_object"]
    wrong = {o for o, d in by.items() if d["false_yes"] or d["false_no"]}
    assert wrong and wrong <= set(res["suites"]["pope"]["partners"].values())
    assert all(by[o]["false_no"] == 0 and by[o]["false_yes_rate"] > 0 for o in wrong)
    # the total over objects is the distinct-question false-yes count of the summary
    fy = res["suites"]["pope"]["summary"]["false_yes"]
    assert sum(d["false_yes"] for d in by.values()) == fy["prior_partner"]["yes"] + fy["other_absent"]["yes"]
    worst = sorted(sorted(wrong), key=lambda o: -by[o]["false_yes"])[0]
    assert f"most wrong answers: {worst} (FY {by[worst]['false_yes']}/{by[worst]['absent']}, FN 0/" \
        in format_report(res)
    yes = run_suite(AlwaysYes(data_dir), data_dir, suites="pope")["suites"]["pope"]["summary"]["by_object"]
    assert all(d["false_yes_rate"] in (1.0, None) and d["false_no"] == 0 for d in yes.values())


def test_binary_metrics_by_hand():
    m = pope.binary_metrics(["yes", "yes", "no", "no", "no"], ["yes", "no", "yes", "no", "no"])
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 2)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["accuracy"] == 0.6 and m["yes_ratio"] == 0.4
    assert pope.absent_kind("moon", {"star", "ring"}, {"star": "moon"}) == "prior_partner"
    assert pope.absent_kind("moon", {"ring"}, {"star": "moon"}) == "other_absent"


# ----------------------------------------------------------------------------- CHAIR
def test_chair_words_by_hand(data_dir):
    words = chair.word_map(load_meta(data_dir)["vocabulary"])
    assert chair.mentions("Two STRIPES, a crescent and a starfish; one box.", words) == ["bar", "moon", "square"]
    res = chair.chair_scores(["A red star and two blue moons.", "Three stripes and a box.", "Nothing."],
                             [{"star"}, {"bar", "square"}, {"ring"}], words)
    assert res["mentions"] == 4 and res["hallucinated"] == 1
    assert res["chair_s"] == pytest.approx(1 / 3) and res["chair_i"] == pytest.approx(1 / 4)
    assert res["object_recall"] == pytest.approx(3 / 4)
    assert res["captions"][0]["hallucinated"] == ["moon"]


def test_chair_oracle_is_clean_and_one_wrong_object_is_counted_exactly(data_dir):
    clean = run_suite(Oracle(data_dir), data_dir, suites="chair")["suites"]["chair"]
    assert clean["chair_s"] == 0.0 and clean["chair_i"] == 0.0 and clean["object_recall"] > 0.9
    bad = run_suite(OneWrongObject(data_dir), data_dir, suites="chair")["suites"]["chair"]
    n = bad["n"]
    assert n == 30 and bad["chair_s"] == 1.0
    assert bad["hallucinated"] == n and bad["mentions"] == clean["mentions"] + n
    assert bad["chair_i"] == pytest.approx(n / (clean["mentions"] + n))


def test_chair_reads_hyphenated_names_and_counts_what_reference_captions_name():
    from agevlm_edge.data.vocab import coco_vocabulary

    words = chair.word_map({"classes": coco_vocabulary(
        ["person", "dog", "hot dog", "teddy bear", "bear", "dining table"])})
    assert chair.mentions("A hot-dog and a Teddy-Bear; hot  dogs.", words) == [
        "hot dog", "teddy bear", "hot dog"]
    # Original CHAIR: an object the reference captions name is no hallucination, even where
    # the instances leave it out (COCO rarely annotates every table).
    rec = {"objects": [{"class": "person"}], "captions": [{"text": "A man sitting at a table."}]}
    assert chair.ground_truth(rec, words, chair.mention_pattern(words)) == {"person", "dining table"}


# ----------------------------------------------------------------------------- grounding
def test_a_phrase_with_an_empty_mask_has_no_grounding_target():
    from agevlm_edge.data.datadir import encode_mask

    empty, full = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    full[8:16, 8:16] = True
    rec = {"objects": [{"id": 0, "mask": encode_mask(empty)}, {"id": 1, "mask": encode_mask(full)}],
           "captions": [{"text": "a dot and a box", "phrases": [
               {"start": 2, "end": 5, "objects": [0]}, {"start": 12, "end": 15, "objects": [1]}]}]}
    [(ci, spans, grids)] = grounding.phrase_targets(rec, 8)
    assert spans == [(12, 15)] and grids[0][1, 1] == 1.0


def test_mask_to_grid_is_exact_area_fraction():
    m = np.zeros((64, 64), bool)
    m[8:16, 16:24] = True                          # exactly patch (1, 2)
    m[32:36, 0:8] = True                           # upper half of patch (4, 0)
    g = grounding.mask_to_grid(m, 8)
    assert g.dtype == np.float32 and g.shape == (8, 8)
    assert g[1, 2] == 1.0 and g[4, 0] == 0.5 and g.sum() == 1.5
    odd = np.random.default_rng(0).random((50, 70)) > 0.6   # sizes not multiples of the grid
    assert grounding.mask_to_grid(odd, 8).mean() == pytest.approx(odd.mean(), abs=1e-6)


def test_topk_iou_and_pointing_by_hand():
    frac = np.zeros((4, 4), np.float32)
    frac[0, 0], frac[0, 1], frac[3, 3] = 1.0, 0.6, 0.2        # binary set {(0,0), (0,1)}
    heat = np.zeros((4, 4))
    heat[0, 0], heat[2, 2] = 0.9, 0.5                         # top-2: (0,0), (2,2)
    assert grounding.topk_iou(heat, frac) == pytest.approx(1 / 3)
    assert grounding.pointing_hit(heat, frac)
    small = np.zeros((4, 4), np.float32)
    small[1, 1] = 0.3                                         # no patch >= 0.5: argmax patch
    assert grounding.topk_iou(small, small) == 1.0 and not grounding.pointing_hit(heat, small)


def test_grounding_exact_maps_score_one_and_uniform_maps_do_not(data_dir):
    exact = run_suite(Oracle(data_dir), data_dir, suites="grounding")["suites"]["grounding"]
    assert exact["n"] > 50 and exact["skipped"] == 0
    assert exact["iou"] == 1.0 and exact["pointing"] == 1.0
    assert exact["random_iou"] < 0.5
    uni = run_suite(UniformMaps(data_dir), data_dir, suites="grounding")["suites"]["grounding"]
    assert uni["n"] == exact["n"] and uni["iou"] < 0.5


# ----------------------------------------------------------------------------- ITM / VQA
def test_auroc_on_hand_made_scores():
    from scipy.stats import rankdata

    same = np.full(10, 0.3)
    assert itm.auroc(same, same) == 0.5
    assert itm.auroc(np.array([0.8, 0.9, 1.0]), np.array([0.1, 0.2])) == 1.0
    assert itm.auroc(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == 0.0
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)  # ties
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert itm.auroc(pos, neg) == pytest.approx(brute)
    assert np.array_equal(itm.average_ranks(np.r_[pos, neg]), rankdata(np.r_[pos, neg]))
    order = itm.mismatch_order(7)
    assert sorted(order) == list(range(7)) and all(order != np.arange(7))


def test_vqa_oracle_scores_one_per_type(data_dir):
    res = run_suite(Oracle(data_dir), data_dir, suites="vqa")["suites"]["vqa"]
    assert res["accuracy"] == 1.0 and res["n"] > 0
    assert {t for t, d in res["types"].items() if d["n"]} == set(vqa.TYPES)
    by_hand = vqa.vqa_scores(["count", "count", "colour"], ["two", "one", "red"], [" Two ", "two", "red"])
    assert by_hand["types"]["count"]["accuracy"] == 0.5 and by_hand["accuracy"] == pytest.approx(2 / 3)
    # Per reference answer, with what was said instead: "one" was answered "two".
    assert by_hand["types"]["count"]["by_answer"] == {
        "one": {"n": 1, "correct": 0, "predicted": {"two": 1}, "accuracy": 0.0},
        "two": {"n": 1, "correct": 1, "predicted": {"two": 1}, "accuracy": 1.0}}
    assert by_hand["types"]["count"]["balanced_accuracy"] == 0.5
    assert by_hand["types"]["existence"]["balanced_accuracy"] is None   # no such questions
    skewed = vqa.vqa_scores(["count"] * 4, ["one", "one", "one", "two"], ["one"] * 4)["types"]["count"]
    assert skewed["accuracy"] == 0.75 and skewed["balanced_accuracy"] == 0.5
    text = format_report({"data_dir": "d", "split": "test", "images": 2,
                          "suites": {"vqa": by_hand}})
    assert "count by answer: one 0.000 (1), two 1.000 (1)" in text
    assert any(ln.split() == ["count", "2", "0.500", "0.500"] for ln in text.splitlines())
    assert "colour by answer" not in text  # one reference answer: nothing to split


def test_itm_separates_informative_layers_only(data_dir):
    res = run_suite(Oracle(data_dir), data_dir, suites="itm")["suites"]["itm"]
    flat, informative = res["layers"]
    assert res["n_pairs"] == 30
    assert flat["auroc"] == 0.5 and flat["matched"] == pytest.approx(flat["mismatched"])
    assert informative["auroc"] > 0.9 and informative["matched"] > informative["mismatched"]


# ----------------------------------------------------------------------------- text & errors
def test_encode_with_spans_maps_phrases_after_the_caption_prompt(tokenizer):
    text = "A cyan pentagon, a green cross and a yellow moon."
    spans = [(2, 15), (19, 30), (0, 0)]
    ids, idx = encode_with_spans(tokenizer, caption_prompt(), text, spans)
    head = prompt_ids(tokenizer, caption_prompt())
    assert ids[:len(head)] == head and head[0] == BOS_ID
    # Same ids as encoding the joined training string.
    assert ids[len(head):] == tokenizer.encode(" " + text, add_special_tokens=False).ids
    assert tokenizer.decode([ids[i] for i in idx[0]]).strip() == "cyan pentagon"
    assert tokenizer.decode([ids[i] for i in idx[1]]).strip() == "green cross"
    assert idx[2] == [] and min(idx[0]) >= len(head)
    with_eos, _ = encode_with_spans(tokenizer, caption_prompt(), text, spans, eos_id=2)
    assert with_eos == ids + [2]
    assert decode_generated(tokenizer, ids[len(head):] + [2, 5, 6]) == text


def test_bad_input_is_one_clear_error(data_dir, tmp_path):
    with pytest.raises(BadInput, match="unknown eval suite bleu"):
        run_suite(Oracle(data_dir), data_dir, suites="pope,bleu")
    with pytest.raises(BadInput, match="split 'nope' is not in"):
        run_suite(Oracle(data_dir), data_dir, split="nope")
    with pytest.raises(BadInput, match="no POPE files for split 'train'"):
        run_suite(Oracle(data_dir, "train"), data_dir, suites="pope", split="train")
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    (broken / "pope_random.jsonl").unlink()
    with pytest.raises(BadInput, match="pope_random.jsonl .*missing"):
        run_suite(Oracle(data_dir), broken, suites="pope")
    (broken / "pope_random.jsonl").write_text("")
    with pytest.raises(BadInput, match="POPE file random .* has no questions"):
        run_suite(Oracle(data_dir), broken, suites="pope")
    (broken / "pope_random.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(BadInput, match="line 1 needs image_id, text and a yes/no label"):
        run_suite(Oracle(data_dir), broken, suites="pope")
    (broken / "test.jsonl").write_text("[1, 2, 3]\n")
    with pytest.raises(BadInput, match="record 1 of .*test.jsonl needs image_id, file, objects"):
        run_suite(Oracle(data_dir), broken, suites="pope")
    (broken / "test.jsonl").write_text('{"image_id": "a", "file": "a.png", "objects": [{"id": 0}]}\n')
    with pytest.raises(BadInput, match="record 1 of .*each with a class"):
        run_suite(Oracle(data_dir), broken, suites="pope")
    rec = load_split(data_dir, "test")[0]
    (broken / "test.jsonl").write_text(json.dumps(
        {**rec, "questions": [{"type": "colour", "question": "What colour is the star?"}]}) + "\n")
    with pytest.raises(BadInput, match="record 1 of .*each with a question and an answer"):
        run_suite(Exploding(), broken, suites="pope,vqa")
    meta = json.loads((broken / "dataset.json").read_text())
    (broken / "dataset.json").write_text(json.dumps({**meta, "vocabulary": {}}))
    shutil.copy(data_dir / "test.jsonl", broken / "test.jsonl")
    with pytest.raises(BadInput, match="no vocabulary classes.*--suite"):   # before pope runs
        run_suite(Exploding(), broken, suites="pope,chair")
    for bad in ([1], {**meta, "splits": {"test": {}}}, {**meta, "vocabulary": {"classes": ["x"]}}):
        (broken / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(BadInput, match="dataset.json (is malformed|has schema_version None)"):
            run_suite(Oracle(data_dir), broken, suites="pope")


def test_an_image_too_large_to_decode_is_one_clear_error(data_dir, tmp_path):
    """A PNG whose header claims 20000 x 20000 pixels: Pillow's DecompressionBombError, not an
    OSError, must still become BadInput."""
    import struct
    import zlib

    broken = tmp_path / "bomb"
    shutil.copytree(data_dir, broken)
    first = load_split(broken, "test")[0]["file"]
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body)))
    (broken / first).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    with pytest.raises(BadInput, match=f"image .*{first}.* cannot be read"):
        ImageStore(broken, S).get(first)


def test_pope_questions_without_an_object_count_in_the_metrics_only(data_dir, tmp_path):
    """An imported POPE question whose text names no object in POPE's form has no `object`:
    it is scored, and left out of the false-yes split and the errors by object."""
    part = tmp_path / "part"
    shutil.copytree(data_dir, part)
    rows = [json.loads(line) for line in (part / "pope_random.jsonl").read_text().splitlines()]
    for r in rows[::2]:
        del r["object"]
    (part / "pope_random.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = run_suite(PriorHallucinator(data_dir), data_dir, suites="pope")["suites"]["pope"]
    res = run_suite(PriorHallucinator(data_dir), part, suites="pope")["suites"]["pope"]
    f, g = res["files"]["random"], full["files"]["random"]
    assert f["n"] == g["n"] and f["accuracy"] == g["accuracy"] and f["fp"] == g["fp"]
    with_object = [r for r in rows if "object" in r and r["label"] == "no"]
    assert sum(d["n"] for d in f["false_yes"].values()) == len(with_object) < g["tn"] + g["fp"]
    assert sum(a["object"] is None for a in f["answers"]) == len(rows[::2])
    assert all(o for o in res["summary"]["by_object"])


class Exploding:
    """A backend that fails the test if any suite asks it anything."""

    image_size, grid = S, G

    def answer(self, *a, **k):
        raise AssertionError("a suite ran before the data was checked")

    caption = xattn_maps = answer


# ----------------------------------------------------------------------------- TorchBackend
@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; two spin-waiting threads on a busy 2-core box
    were measured 50x slower. Restored afterwards for the other test modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_model(tokenizer, arch: str):
    import torch

    from agevlm_edge.model import AgeVLM, AgeVLMConfig

    torch.manual_seed(0)
    cfg = AgeVLMConfig(image_size=S, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                       vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=2, n_heads=4,
                       n_kv_heads=2, ffn_hidden=64, arch=arch)
    model = AgeVLM(cfg).eval()
    with torch.no_grad():                           # open the gates: the image must matter
        for blk in model.decoder.xattn.values():
            blk.attn_gate.fill_(0.7)
            blk.mlp_gate.fill_(0.7)
    return model


@pytest.mark.parametrize("arch", ["xattn", "concat"])
def test_torch_backend_runs_every_suite(data_dir, tokenizer, arch, one_thread):
    from agevlm_edge.eval import TorchBackend
    from agevlm_edge.preprocess import Preprocessor

    b = TorchBackend(_tiny_model(tokenizer, arch), tokenizer, Preprocessor(S), batch_size=8)
    res = run_suite(b, data_dir, limit=5)
    assert res["images"] == 5 and set(res["suites"]) == {"pope", "chair", "grounding", "itm", "vqa"}
    json.dumps(res)                                 # plain JSON types only
    for f in res["suites"]["pope"]["files"].values():
        assert 0 <= f["accuracy"] <= 1 and 0 <= f["yes_ratio"] <= 1
        assert {a["image_id"] for a in f["answers"]} <= {r["image_id"] for r in load_split(data_dir, "test")[:5]}
    layers = res["suites"]["itm"]["layers"]
    assert len(layers) == 2 and all(0 <= d["auroc"] <= 1 and -1 <= d["matched"] <= 1 for d in layers)
    assert res["suites"]["vqa"]["n"] > 0 and "CHAIR_s" in format_report(res)

    recs = load_split(data_dir, "test")[:3]
    imgs = ImageStore(data_dir, S).many([r["file"] for r in recs])
    texts = [r["captions"][1]["text"] for r in recs]       # different lengths: left padding
    spans = [[(p["start"], p["end"]) for p in r["captions"][1]["phrases"]] for r in recs]
    maps = b.phrase_maps(imgs, texts, spans)
    lp = b.first_token_logprobs(imgs, ["Is there a moon in the image?"] * 3)
    assert lp.shape == (3, tokenizer.get_vocab_size())
    assert np.allclose(np.exp(lp).sum(1), 1, atol=1e-4)
    img_h, txt_h = b.hidden_states(imgs, texts)
    assert img_h.shape == txt_h.shape == (3, 2, 32)
    if arch == "concat":
        assert maps is None and res["suites"]["grounding"]["skipped"].startswith("the model has no")
        return
    g = res["suites"]["grounding"]
    assert g["n"] > 0 and 0 <= g["iou"] <= 1 and 0 <= g["pointing"] <= 1
    assert [len(m) for m in maps] == [len(s) for s in spans]
    for m in (m for row in maps for m in row):
        assert m.shape == (G, G) and m.sum() == pytest.approx(1, abs=1e-4)
    # Padding must not change a row: each text alone gives the same maps as the batch.
    alone = b.phrase_maps(imgs[2:], texts[2:], spans[2:])[0]
    assert all(np.allclose(a, c, atol=1e-5) for a, c in zip(alone, maps[2]))
    assert b.answer(imgs[:1], ["What colour is the moon?"]) == \
        b.answer(imgs, ["What colour is the moon?", "Is there a moon in the image?", "How many"])[:1]


def test_evaluate_a_run_dir_writes_json(data_dir, tokenizer, tmp_path, one_thread):
    from agevlm_edge.checkpoint import save_model_files
    from agevlm_edge.eval import evaluate
    from agevlm_edge.preprocess import Preprocessor

    run = tmp_path / "run"
    save_model_files(run, _tiny_model(tokenizer, "xattn"), tokenizer, Preprocessor(S))
    out = tmp_path / "eval.json"
    res = evaluate(run, data_dir, "pope,grounding", out_json=out, limit=2)
    assert json.loads(out.read_text()) == res
    assert res["model"]["arch"] == "xattn" and list(res["suites"]) == ["pope", "grounding"]
    with pytest.raises(BadInput, match="not a RUN DIR"):
        evaluate(tmp_path, data_dir, "pope")
    with pytest.raises(BadInput, match="unknown eval suite"):
        evaluate(run, data_dir, "popee")


def test_eval_modules_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, agevlm_edge.eval, agevlm_edge.eval.suite; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
