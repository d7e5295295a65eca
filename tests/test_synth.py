"""The grounded synthetic world: determinism, exact annotations, planted priors, POPE."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from agevlm_edge.data import synth
from agevlm_edge.data.datadir import POPE_VARIANTS, decode_mask, load_meta, load_split, read_jsonl
from agevlm_edge.data.world import CLASSES, COLOURS, SYNONYM_PLURALS
from conftest import assert_one_line_error, run_cli


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    kw = dict(preset="hard", n_train=60, n_val=10, n_test=20)
    synth.synthesize(a, seed=7, workers=1, **kw)
    synth.synthesize(b, seed=7, workers=2, **kw)
    synth.synthesize(c, seed=8, workers=1, **kw)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a)["train.jsonl"] != _tree_digest(c)["train.jsonl"]


def _noun_classes() -> dict[str, str]:
    """Every noun a caption may use (singular, plural, synonyms) -> its class."""
    out = {}
    for cls, (plural, syns) in CLASSES.items():
        out[cls] = out[plural] = cls
        for s in syns:
            out[s] = out[SYNONYM_PLURALS[s]] = cls
    return out


def test_records_are_exact_and_grounded(small_world):
    nouns = _noun_classes()
    records = load_split(small_world, "train")
    assert len(records) == 600
    for rec in records[:200]:
        for ob in rec["objects"]:
            m = decode_mask(ob["mask"])
            assert m.shape == (64, 64) and m.sum() == ob["area"] > 0
            ys, xs = np.nonzero(m)
            assert ob["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert ob["mask_source"] == "rendered" and ob["colour"] in COLOURS
        named = set()
        for cap in rec["captions"]:
            for ph in cap["phrases"]:
                colour, noun = cap["text"][ph["start"]:ph["end"]].lower().split(" ")
                for i in ph["objects"]:
                    ob = rec["objects"][i]
                    assert (ob["colour"], ob["class"]) == (colour, nouns[noun])
                    named.add(i)
        assert named == set(range(len(rec["objects"])))  # every object is grounded


def test_answers_follow_from_the_objects(small_world):
    for rec in load_split(small_world, "test")[:100]:
        objs = rec["objects"]
        for q in rec["questions"]:
            same = [o for o in objs if o["class"] == q["object"]]
            if q["type"] == "existence":
                assert q["answer"] == ("yes" if same else "no")
            elif q["type"] == "count":
                assert q["answer"] == ["zero", "one", "two", "three", "four"][len(same)]
            elif q["type"] == "colour":
                assert [q["answer"]] == [o["colour"] for o in same]
            elif q["type"] == "relation":
                a = same[0]
                b = next(o for o in objs if q["question"].endswith(f"the {o['class']}?"))
                left = (a["box"][0] + a["box"][2]) < (b["box"][0] + b["box"][2])
                assert q["answer"] == ("yes" if left else "no")


def test_prior_is_planted_without_changing_class_frequencies():
    cfg = synth.world_config("easy")
    classes = list(CLASSES)
    s = synth.fit_sampler(cfg, prior=True, seed=0)
    rng = np.random.default_rng(123)
    scenes = [{c for c, _ in synth.sample_classes(rng, s, int(rng.integers(1, 5)), classes)}
              for _ in range(20000)]
    freq = np.array([sum(c in sc for sc in scenes) for c in classes]) / len(scenes)
    # Sampling noise alone (std ~0.0026 at 20k scenes) spreads max/min to ~1.08; without
    # the fitted weights the partners would appear in ~1.8x as many images as the others.
    assert freq.max() / freq.min() < 1.15, dict(zip(classes, freq.round(3)))
    for _, partner in cfg.priors:
        assert abs(freq[classes.index(partner)] / freq.mean() - 1) < 0.1
    for trig, partner in cfg.priors:
        with_t = [partner in sc for sc in scenes if trig in sc]
        without = [partner in sc for sc in scenes if trig not in sc]
        assert abs(np.mean(with_t) - 0.8) < 0.04
        assert np.mean(without) < 0.12


def test_rendered_splits_keep_the_prior_in_train_and_break_it_in_test(small_world):
    stats = load_meta(small_world)["stats"]
    for pair in ("star->moon", "heart->arrow", "cross->bar"):
        tr, te = stats["train"]["priors"][pair], stats["test"]["priors"][pair]
        assert tr["p_partner_given_trigger"] > 0.6 > 0.2 > tr["p_partner_without_trigger"]
        assert te["p_partner_given_trigger"] < 0.35


def test_pope_is_balanced_and_adversarial_negatives_are_the_partners(small_world):
    meta = load_meta(small_world)
    test = {r["image_id"]: r for r in load_split(small_world, "test")}
    sets = {v: read_jsonl(small_world / f"pope_{v}.jsonl") for v in POPE_VARIANTS}
    for variant, rows in sets.items():
        yes = np.mean([r["label"] == "yes" for r in rows])
        assert abs(yes - 0.5) <= 0.01, variant
        assert {"question_id", "image", "text", "label"} <= set(rows[0])
        for r in rows:
            present = {o["class"] for o in test[r["image_id"]]["objects"]}
            assert (r["object"] in present) == (r["label"] == "yes")
            assert (small_world / r["image"]).is_file()
    adv = {}
    for r in sets["adversarial"]:
        if r["label"] == "no":
            adv.setdefault(r["image_id"], set()).add(r["object"])
    hits = [("moon" in adv[i]) for i, rec in test.items()
            if i in adv and {"star"} <= {o["class"] for o in rec["objects"]}
            and "moon" not in {o["class"] for o in rec["objects"]}]
    assert len(hits) >= 5 and np.mean(hits) == 1.0
    assert sets["adversarial"] != sets["popular"] != sets["random"]
    assert set(meta["pope"]["files"]) == {"test", "test_easy", "test_medium", "test_hard"}


def test_count_questions_ask_about_any_absent_class():
    # The first absent class in class order was the only one: "How many circles" meant "zero".
    from agevlm_edge.data.text import questions

    objs = [{"id": 0, "class": "star", "colour": "red", "box": [10, 10, 20, 20]}]
    asked = [q for s in range(300) for q in questions(np.random.default_rng(s), objs, list(CLASSES))
             if q["type"] == "count" and q["answer"] == "zero"]
    assert len({q["object"] for q in asked}) == len(CLASSES) - 1    # every absent class
    assert max(sum(q["object"] == c for q in asked) for c in CLASSES) < len(asked) / 4


def test_graded_test_splits_take_each_presets_difficulty_whatever_the_world():
    keys = ("min_objects", "max_objects", "min_size", "max_size", "noise", "contrast")
    for preset, sets in (("hard", {}), ("easy", {"noise": "0.2"}),
                         ("hard", {"image_size": "128", "min_size": "10", "max_size": "32"})):
        world = synth.world_config(preset, sets)
        plan = synth.split_plan(world)
        scale = world.image_size / 64
        for name in ("easy", "medium", "hard"):
            ref = synth.world_config(name)
            got = plan[f"test_{name}"][0]
            want = {k: getattr(ref, k) * (scale if k.endswith("_size") else 1) for k in keys}
            assert {k: getattr(got, k) for k in keys} == want, (preset, sets, name)
            assert (got.image_size, got.priors) == (world.image_size, world.priors)
        assert plan["test"][0] == world


def test_hard_preset_has_sub_patch_objects_clutter_and_occlusion(tmp_path):
    synth.synthesize(tmp_path / "h", preset="hard", seed=1, n_train=150, n_val=0, n_test=0,
                     workers=1)
    objs = [o for r in load_split(tmp_path / "h", "train") for o in r["objects"]]
    per_image = [len(r["objects"]) for r in load_split(tmp_path / "h", "train")]
    assert min(o["shape_size"] for o in objs) < 8  # smaller than one 8 px patch
    assert max(per_image) >= 7
    assert max(o["occluded"] for o in objs) > 0.1


def test_bad_settings_and_existing_output(tmp_path, small_world):
    assert_one_line_error(run_cli("data", "synth", "--out", tmp_path / "x", "--set", "colour=9"),
                          "unknown world setting 'colour'")
    assert_one_line_error(run_cli("data", "synth", "--out", tmp_path / "x", "--set",
                                  "prior_strength=0.99"), "prior_strength")
    assert_one_line_error(run_cli("data", "synth", "--out", tmp_path / "x", "--set",
                                  "max_objects=many"), "max_objects")
    assert_one_line_error(run_cli("data", "synth", "--out", tmp_path / "x", "--preset", "nope"),
                          "unknown world preset")
    for sets, msg in (("priors=star", "TRIGGER:PARTNER pairs"), ("priors=star:moon:heart", "pairs"),
                      ("n_train=inf", "n_train='inf' is not a valid int"),
                      ("max_objects=1", "priors= (none)")):
        assert_one_line_error(run_cli("data", "synth", "--out", tmp_path / "x", "--set", sets), msg)
    # the way out the message names works: one object per scene, no prior (this hung before)
    run_cli("data", "synth", "--out", tmp_path / "one", "--n-train", "6", "--n-val", "0",
            "--n-test", "2", "--set", "max_objects=1", "--set", "priors=", "--workers", "1",
            check_rc=0)
    assert {len(r["objects"]) for r in load_split(tmp_path / "one", "train")} == {1}
    proc = run_cli("data", "synth", "--out", tmp_path / "x", "--workers", "100000")
    assert proc.returncode == 2 and "--workers" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    assert_one_line_error(run_cli("data", "synth", "--out", keep, "--n-train", "5"), "--overwrite")
    assert (keep / "precious.txt").read_text() == "mine"
    run_cli("data", "synth", "--out", keep, "--n-train", "5", "--n-val", "0", "--n-test", "2",
            "--overwrite", check_rc=0)
    assert not (keep / "precious.txt").exists() and (keep / "dataset.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_sigterm_leaves_no_partial_directory(tmp_path):
    """A synth killed by SIGTERM (a scheduler, `timeout`) cleans up like one stopped by Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "agevlm_edge.cli", "data", "synth", "--out",
                             str(tmp_path / "w"), "--n-train", "5000", "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".w.*.partial")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".w.*.partial")), "synth never started writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
