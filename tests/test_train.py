"""Training: dice loss, recipes, exact resume, and 2-process data parallelism over gloo."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from agevlm_edge.errors import BadInput
from agevlm_edge.train.losses import dice_loss_sum, lm_loss_sum, phrase_maps
from agevlm_edge.train.recipe import apply_sets, preset_recipe, recipe_changes, recipe_from_dict
from conftest import assert_one_line_error, run_cli

SMALL_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64,
               "vision_width": 32, "vision_layers": 1, "vision_heads": 2, "xattn_layers": [1]}


def _recipe(stages: list[dict], **kw) -> dict:
    return {"variant": "guided", "seed": 5, "model": SMALL_MODEL, "log_every": 1,
            "checkpoint_every": 1000, "stages": stages, **kw}


STAGES = [
    {"name": "lm", "kind": "lm", "train": ["lm"], "steps": 4, "batch_size": 8, "lr": 3e-3, "warmup": 1},
    {"name": "vision", "kind": "vision", "train": ["vision"], "steps": 3, "batch_size": 8, "lr": 2e-3},
    {"name": "guided", "kind": "vlm", "train": ["projector", "xattn"], "steps": 4, "batch_size": 8,
     "lr": 2e-3, "warmup": 1, "questions": 1.0, "dice_weight": 1.0, "dice_fraction": 0.5,
     "gate_lr_mult": 30.0},
]


@pytest.fixture(scope="module")
def world(small_world):
    if not (small_world / "tokenizer.json").is_file():
        run_cli("data", "tokenizer", "--data", small_world, check_rc=0)
    return small_world


def test_dice_is_zero_exactly_when_attention_spreads_over_the_mask():
    mask = torch.tensor([[[0.0, 1.0, 1.0, 0.5]]])                       # (B, P, N)
    valid = torch.ones(1, 1, dtype=torch.bool)
    perfect = mask / mask.sum(-1, keepdim=True)                            # a' = m
    s, n = dice_loss_sum(perfect, mask, valid)
    assert n.item() == 1 and abs(s.item()) < 1e-6
    peak = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]])                          # all on one patch
    uniform = torch.full((1, 1, 4), 0.25)
    off = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    losses = [dice_loss_sum(m, mask, valid)[0].item() for m in (peak, uniform, off)]
    # peak: a' = [0, 2.5, 0, 0]; 1 - 2*2.5 / (6.25 + 2.25) = 0.41176...
    assert losses[0] == pytest.approx(1 - 5 / 8.5, abs=1e-5)
    assert 0 < losses[0] and 0 < losses[1] < 1 and losses[2] == pytest.approx(1.0)
    assert dice_loss_sum(off, mask, torch.zeros(1, 1, dtype=torch.bool))[1].item() == 0
    # an empty mask (an absent object, Stage.null_dice): the map's mass on the patches, which
    # is below 1 only when the null token (model xattn_null) takes the rest
    some = torch.tensor([[[0.1, 0.2, 0.0, 0.0]]], requires_grad=True)
    s, n = dice_loss_sum(some, torch.zeros(1, 1, 4), valid)
    assert n.item() == 1 and s.item() == pytest.approx(0.3)
    s.backward()
    assert torch.equal(some.grad, torch.ones(1, 1, 4))


def test_per_sample_loss_weighs_every_sample_alike():
    """loss_norm=sample: a one-token answer weighs as much as a long caption; token (the
    default) averages over all target tokens of the batch. Rows without a label do not count."""
    logits = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.full((3, 6), -100)
    labels[0, 1:] = torch.tensor([1, 2, 3, 4, 0])      # a caption: 5 target tokens
    labels[1, 5] = 2                                   # an answer: 1 target token
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                           ignore_index=-100, reduction="none")
    s, n = lm_loss_sum(logits, labels)
    assert n.item() == 6 and s.item() == pytest.approx(ce.sum().item(), rel=1e-6)
    s, n = lm_loss_sum(logits, labels, per_sample=True)
    assert n.item() == 2
    assert s.item() == pytest.approx(ce[0].sum().item() / 5 + ce[1, 4].item(), rel=1e-6)
    assert s.item() / n.item() != pytest.approx(ce.sum().item() / 6, rel=1e-3)


def test_phrase_maps_average_heads_layers_and_tokens():
    probs = {1: torch.zeros(1, 2, 3, 4), 3: torch.zeros(1, 2, 3, 4)}
    probs[1][0, :, 0, 0] = 1
    probs[3][0, :, 1, 1] = 1
    weights = torch.tensor([[[0.5, 0.5, 0.0]]])
    maps = phrase_maps(probs, (), weights)
    assert torch.allclose(maps, torch.tensor([[[0.25, 0.25, 0.0, 0.0]]]))
    assert torch.allclose(phrase_maps(probs, (3,), weights), torch.tensor([[[0.0, 0.5, 0.0, 0.0]]]))


def test_variants_are_one_switch_apart():
    g, ca, cc = (preset_recipe("tiny", v) for v in ("guided", "ca", "concat"))
    assert [s.name for s in g.stages] == ["lm", "vision", "align", "guided", "instruct"]
    assert g.stages[3].dice_weight > 0 and g.stages[3].dice_fraction == 0.1
    assert g.stages[4].dice_weight > 0 and g.stages[4].question_dice == 1.0
    assert g.stages[4].dice_fraction == 0.5
    smol = preset_recipe("smol", lm_dir="x").stages[-1]
    assert (smol.question_dice, smol.dice_fraction) == (0.5, 0.1)  # as measured
    assert all(s.dice_weight == 0 and s.question_dice == 0 for s in ca.stages + cc.stages)
    assert [s.steps for s in ca.stages] == [s.steps for s in g.stages]
    assert cc.model == {"arch": "concat"} and not any("xattn" in s.train for s in cc.stages)
    r = apply_sets(g, {"guided.dice_weight": "2.5", "seed": "7", "model.d_model": "128"})
    assert r.stages[3].dice_weight == 2.5 and r.seed == 7 and r.model["d_model"] == 128


def test_small_preset_trains_the_small_model_from_scratch(tmp_path, world):
    """`--preset small`: tiny's stages on the ~126M SmolLM2-shaped model (30 layers, width 576,
    16 px patches; its vocabulary the DATA DIR's), two steps a stage through the CLI."""
    from agevlm_edge.model import AgeVLMConfig

    small = preset_recipe("small")
    assert small.model_preset == "small" and small.stages == preset_recipe("tiny").stages
    sets = [a for st in small.stages for a in ("--set", f"{st.name}.steps=2", "--set",
                                               f"{st.name}.batch_size=2", "--set", f"{st.name}.warmup=1")]
    proc = run_cli("train", "--data", world, "--out", tmp_path / "r", "--preset", "small", *sets,
                   "--set", "log_every=1", check_rc=0)
    n = float(proc.stdout.split("guided (")[1].split("M params")[0])
    assert 100 <= n <= 150, proc.stdout                             # the "about 100-150M"
    cfg = AgeVLMConfig.from_dict(json.loads((tmp_path / "r" / "config.json").read_text())["model"])
    assert (cfg.n_layers, cfg.d_model, cfg.patch_size, cfg.cross_layers) == (30, 576, 16, (1, 9, 17, 25))
    assert "for 10 steps" in proc.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_recipe(STAGES[:1], model_preset="huge")))
    assert_one_line_error(run_cli("train", "--data", world, "--out", tmp_path / "b", "--config", bad),
                          "model_preset must be one of tiny, small")


def test_bad_recipes_fail_with_one_line(tmp_path, world):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_recipe(STAGES[:1], colour="red")))
    assert_one_line_error(run_cli("train", "--data", world, "--out", tmp_path / "r", "--config", bad),
                          "unknown recipe keys: colour")
    bad.write_text(yaml.safe_dump(_recipe([{**STAGES[0], "stpes": 3}])))
    assert_one_line_error(run_cli("train", "--data", world, "--out", tmp_path / "r", "--config", bad),
                          "unknown keys stpes")
    bad.write_text(yaml.safe_dump(_recipe([{**STAGES[0], "train": ["brain"]}])))
    assert_one_line_error(run_cli("train", "--data", world, "--out", tmp_path / "r", "--config", bad),
                          "train must list groups")
    assert_one_line_error(run_cli("train", "--data", world, "--out", tmp_path / "r", "--set",
                                  "nostage.steps=3"), "no recipe field or stage named 'nostage'")
    bad.write_text(yaml.safe_dump(_recipe([{**STAGES[2], "gate_lr_mult": 0}])))
    assert_one_line_error(run_cli("train", "--data", world, "--out", tmp_path / "r", "--config", bad),
                          "gate_lr_mult must be > 0")
    bad.write_text(yaml.safe_dump(_recipe([{**STAGES[2], "loss_norm": "word"}])))
    assert_one_line_error(run_cli("train", "--data", world, "--out", tmp_path / "r", "--config", bad),
                          "loss_norm must be token or sample")
    assert not (tmp_path / "r").exists()


def test_gates_take_their_own_learning_rate(tmp_path, world):
    """Adam's first step moves a parameter with a non-zero gradient by exactly its LR; at
    gates 0 only the gates have one, and they move by lr * gate_lr_mult."""
    from agevlm_edge.train.loop import train

    stage = {**STAGES[2], "steps": 1, "warmup": 1, "dice_weight": 0.0, "gate_lr_mult": 25.0}
    train(world, tmp_path / "r", recipe_from_dict(_recipe([stage])), limit=32)
    w = load_file(str(tmp_path / "r" / "model.safetensors"))
    gates = {k: v for k, v in w.items() if k.endswith("_gate")}
    # rel 1e-2: the attention gate's first gradient is ~1e-7, where Adam's eps (1e-8) shows
    assert gates and all(v.abs().item() == pytest.approx(2e-3 * 25, rel=1e-2) for v in gates.values())


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, world):
    from agevlm_edge.train.loop import train

    recipe = recipe_from_dict(_recipe(STAGES))
    train(world, tmp_path / "a", recipe, limit=64)
    msg = train(world, tmp_path / "b", recipe, stop_at_step=9, limit=64)   # inside the vlm stage
    assert "stopped at global step 9" in msg
    state_file = tmp_path / "b" / "training_state" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["global_step"] == 9
    # As if the first stretch had run on another kernel set: the resume records its own.
    here = state["environments"][0]
    assert here["from_step"] == 0 and here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    state["environments"][0] = {**here, "cpu_capability": "OTHER"}
    state_file.write_text(json.dumps(state))
    train(world, tmp_path / "b", recipe, resume=True, limit=64)
    assert json.loads(state_file.read_text())["environments"] == [
        {**here, "cpu_capability": "OTHER"}, here | {"from_step": 9}]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logs = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(logs(tmp_path / "a")) == strip(logs(tmp_path / "b"))
    tower = next(r["val"] for r in logs(tmp_path / "a") if r.get("stage") == "vision" and "val" in r)
    classes = json.loads((world / "dataset.json").read_text())["vocabulary"]["classes"]
    assert 0 < len(tower["weakest_classes"]) <= 3 and set(tower["weakest_classes"]) <= set(classes)


def test_a_kill_inside_the_final_save_leaves_a_resume_that_rewrites_the_weights(
        tmp_path, world, monkeypatch):
    """save() writes the model files before training_state/: killed between them, the run's
    state is the checkpoint before, and --resume redoes the tail and rewrites the weights
    (the other order left a run whose state said done over the older weights)."""
    import agevlm_edge.train.loop as loop

    recipe = recipe_from_dict(_recipe(STAGES[:1], checkpoint_every=2))
    loop.train(world, tmp_path / "a", recipe, limit=32)
    real = loop.save_model_files

    def killed_at_the_final_save(*args, **kw):
        if args[-1]["final"]:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(loop, "save_model_files", killed_at_the_final_save)
    with pytest.raises(KeyboardInterrupt):
        loop.train(world, tmp_path / "b", recipe, limit=32)
    monkeypatch.setattr(loop, "save_model_files", real)
    loop.train(world, tmp_path / "b", recipe, resume=True, limit=32)
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["final"] is True

def test_weakest_labels_are_the_lowest_f1_present_ones():
    from agevlm_edge.train.metrics import weakest

    true = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    # a: 1.0, b: 2*1/(1+2) = 0.667, c: never true (left out), d: 2*1/(1+2) = 0.667
    assert weakest(pred, true, ["a", "b", "c", "d"], k=2) == {"b": 0.6667, "d": 0.6667}
    assert list(weakest(pred, true, ["a", "b", "c", "d"])) == ["b", "d", "a"]


def test_two_process_gloo_loss_equals_single_process(tmp_path, world):
    stages = [STAGES[0], {**STAGES[2], "dice_fraction": 1.0}]
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(stages)))
    base = ["-m", "agevlm_edge.cli", "train", "--data", str(world), "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *base, "--out", str(tmp_path / "single")], check=True,
                   capture_output=True, env=env, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29533", *base, "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(p):
        rows = [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
        return [(r["stage"], r["step"], r["lm_loss"], r.get("dice_loss")) for r in rows if "lm_loss" in r]

    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 8
    for s, d in zip(single, ddp):
        assert s[:2] == d[:2]
        assert s[2] == pytest.approx(d[2], abs=1e-4)
        assert (s[3] is None) == (d[3] is None) and (s[3] is None or s[3] == pytest.approx(d[3], abs=1e-4))


def test_token_labels_are_the_patch_coverage_of_each_class_and_colour():
    from agevlm_edge.data.datadir import encode_mask
    from agevlm_edge.train.batches import token_labels

    m = np.zeros((8, 8), bool)
    m[0:4, 0:2] = True                      # patch (0,0) of a 2x2 grid, half covered
    m2 = np.zeros((8, 8), bool)
    m2[0:4, 0:4] = True                     # the same patch, fully covered, same class
    rec = {"objects": [{"class": "a", "colour": "red", "mask": encode_mask(m)},
                       {"class": "a", "colour": "blue", "mask": encode_mask(m2)}]}
    y = token_labels([rec], ["a", "b"], ["red", "blue"], 2).float()
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [1.0, 0.0, 0.5, 1.0]      # class capped at 1; both colours
    assert y[0, 1:].abs().sum() == 0


def test_mask_supervised_vision_ablation_changes_the_tower(tmp_path, world):
    """vision_labels: mask adds the per-token loss (bad values are one-line errors)."""
    from agevlm_edge.train.loop import train

    runs = {}
    for labels in ("image", "mask"):
        stage = {**STAGES[1], "vision_labels": labels}
        train(world, tmp_path / labels, recipe_from_dict(_recipe([stage])), limit=32)
        rows = [json.loads(x) for x in (tmp_path / labels / "metrics.jsonl").read_text().splitlines()]
        runs[labels] = [r["bce"] for r in rows if "bce" in r]
    assert runs["image"][0] != runs["mask"][0]
    with pytest.raises(Exception, match="vision_labels must be image or mask"):
        recipe_from_dict(_recipe([{**STAGES[1], "vision_labels": "boxes"}]))


def test_count_labels_mark_each_class_seen_two_or_more_times():
    from agevlm_edge.train.batches import count_labels

    recs = [{"objects": [{"class": "a"}, {"class": "b"}, {"class": "a"}]},
            {"objects": [{"class": "b"}, {"class": "b"}, {"class": "b"}, {"class": "z"}]},
            {"objects": [{"class": "a"}]}, {"objects": []}]
    assert count_labels(recs, ["a", "b"]).tolist() == [[1, 0], [0, 1], [0, 0], [0, 0]]


def test_count_labels_widen_the_head_and_are_validated(tmp_path, world):
    """count_labels adds C head columns and a count_f1; a later vision stage without them (and
    the mask ablation's per-token loss) trains the first columns; default heads stay C+K."""
    from agevlm_edge.data.datadir import load_meta
    from agevlm_edge.train.loop import train

    vocab = load_meta(world)["vocabulary"]
    C, K = len(vocab["classes"]), len(vocab["colours"])
    plain = {**STAGES[1], "steps": 2}
    counted = {**plain, "name": "counted", "count_labels": True, "vision_labels": "mask"}
    for name, stages, width in (("plain", [plain], C + K), ("count", [counted, plain], 2 * C + K)):
        train(world, tmp_path / name, recipe_from_dict(_recipe(stages)), limit=32)
        head = load_file(tmp_path / name / "training_state" / "head.safetensors")
        assert head["fc.weight"].shape[0] == width
        vals = {r["stage"]: r["val"] for r in map(json.loads, (tmp_path / name / "metrics.jsonl")
                                                  .read_text().splitlines()) if "val" in r}
        assert ("count_f1" in vals.get("counted", {})) == (name == "count")
        assert "count_f1" not in vals["vision"]
        assert 0 <= vals["vision"]["colour_f1"] <= 1
    # A paired study resumes a shared pre-vision checkpoint with count_labels on; once the
    # vision stage has begun, changing them is a one-line error.
    lm = STAGES[0]
    train(world, tmp_path / "pre", recipe_from_dict(_recipe([lm, plain])), stop_at_step=4, limit=32)
    shutil.copytree(tmp_path / "pre", tmp_path / "wide")
    train(world, tmp_path / "wide", recipe_from_dict(_recipe([lm, {**plain, "count_labels": True}])),
          resume=True, limit=32)
    assert load_file(tmp_path / "wide" / "training_state" / "head.safetensors")["fc.weight"].shape[0] == 2 * C + K
    train(world, tmp_path / "mid", recipe_from_dict(_recipe([lm, plain])), stop_at_step=5, limit=32)
    with pytest.raises(BadInput, match="vision head has .* labels where this recipe's has .*count_labels changed"):
        train(world, tmp_path / "mid", recipe_from_dict(_recipe([lm, {**plain, "count_labels": True}])),
              resume=True, limit=32)
    for bad in ({**STAGES[2], "count_labels": True}, {**plain, "count_labels": "yes"}):
        with pytest.raises(BadInput, match="count_labels (must be true or false|is true or false, and true only in a vision)"):
            recipe_from_dict(_recipe([bad]))


def test_context_questions_put_the_caption_before_the_question(world):
    from agevlm_edge.data.datadir import load_split
    from agevlm_edge.data.tokenizer import load_tokenizer
    from agevlm_edge.train.batches import context_questions

    tok = load_tokenizer(world / "tokenizer.json")
    recs = load_split(world, "train")[:3]
    samples = context_questions(recs, tok, bos=1, eos=2)
    assert len(samples) == sum(len(r["questions"]) for r in recs)
    s, rec, q = samples[1], recs[0], recs[0]["questions"][1]
    cap = rec["captions"][1 % len(rec["captions"])]["text"]
    assert s.ids[0] == 1 and s.ids[-1] == 2 and s.image == 0
    assert tok.decode(s.ids[1:s.prompt_len]) == f"{cap} Question: {q['question']} Answer:"
    assert tok.decode(s.ids[s.prompt_len:-1]).strip() == q["answer"]


def test_lm_stage_mixes_in_context_questions(tmp_path, world):
    from agevlm_edge.train.loop import train

    stage = {**STAGES[0], "steps": 2, "context_qa": 0.5}
    train(world, tmp_path / "r", recipe_from_dict(_recipe([stage])), limit=32)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= rows[-1]["val"]["val_context_yesno_acc"] <= 1
    with pytest.raises(Exception, match="context_qa must be in 0..1"):
        recipe_from_dict(_recipe([{**STAGES[0], "context_qa": 1.5}]))


def test_length_buckets_change_no_loss_and_keep_every_sample():
    """Length bucketing only removes padding: the summed loss of the buckets equals the loss
    of the whole batch, and every sample lands in exactly one bucket."""
    import torch

    from agevlm_edge.model import AgeVLM, build_config
    from agevlm_edge.train.batches import Sample, collate, length_buckets
    from agevlm_edge.train.steps import LMStep

    g = torch.Generator().manual_seed(0)
    samples = [Sample(0, [1] + torch.randint(3, 60, (int(n),), generator=g).tolist() + [2], 1)
               for n in torch.randint(2, 40, (11,), generator=g)]
    buckets = length_buckets(samples, 3)
    assert sorted(id(s) for b in buckets for s in b) == sorted(id(s) for s in samples)
    assert [len(b) for b in buckets] == [4, 3, 4]
    assert max(len(s.ids) for s in buckets[0]) <= min(len(s.ids) for s in buckets[-1])
    torch.manual_seed(0)
    step = LMStep(AgeVLM(build_config("tiny", vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2,
                                      ffn_hidden=128, n_layers=2)))
    whole = step([collate(samples, 0, 64, lm_only=True)])
    parts = step([collate(b, 0, 64, lm_only=True) for b in buckets])
    assert int(parts["lm_count"]) == int(whole["lm_count"])
    torch.testing.assert_close(parts["lm_sum"], whole["lm_sum"], rtol=1e-5, atol=1e-4)
    step.per_sample = True                           # loss_norm=sample: the same, per sample
    whole = step([collate(samples, 0, 64, lm_only=True)])
    parts = step([collate(b, 0, 64, lm_only=True) for b in buckets])
    assert int(parts["lm_count"]) == int(whole["lm_count"]) == len(samples)
    torch.testing.assert_close(parts["lm_sum"], whole["lm_sum"], rtol=1e-5, atol=1e-4)
    assert length_buckets(samples[:2], 3) == [[s] for s in sorted(samples[:2], key=lambda s: len(s.ids))]
    assert length_buckets(samples, 1) == [samples]   # unsorted: one bucket is the old batch


def test_question_phrases_are_the_asked_object_and_the_answer_position(world):
    """A question about a class in the image carries two phrases, the object word and the
    prompt's last token, both toward the union mask of that class's instances; an existence
    question about an absent class carries the prompt's last token with an empty mask
    (Stage.null_dice); other absent classes and relation questions carry none."""
    from agevlm_edge.data.datadir import decode_mask, load_split
    from agevlm_edge.data.tokenizer import load_tokenizer
    from agevlm_edge.eval.grounding import mask_to_grid
    from agevlm_edge.train.batches import load_split_data

    tok = load_tokenizer(world / "tokenizer.json")
    recs = load_split(world, "train")[:6]
    data = load_split_data(world, "train", tok, 64, 8, limit=6)
    qs = [(rec, q) for rec in recs for q in rec["questions"]]
    assert len(qs) == len(data.questions)
    checked = {"with": 0, "absent": 0, "without": 0}
    for (rec, q), s in zip(qs, data.questions):
        present = [o for o in rec["objects"] if o["class"] == q.get("object")]
        if q["type"] in ("existence", "colour", "count") and present:
            (obj_toks, g1), (ans, g2) = s.phrases
            assert tok.decode([s.ids[t] for t in obj_toks]).strip().startswith(q["object"])
            assert ans == [s.prompt_len - 1] and tok.decode([s.ids[s.prompt_len - 1]]) == ":"
            m = np.zeros((64, 64), bool)
            for o in present:
                m |= decode_mask(o["mask"])
            np.testing.assert_allclose(g1, mask_to_grid(m, 8).reshape(-1))
            assert g2 is g1
            checked["with"] += 1
        elif q["type"] == "existence":
            [(ans, g)] = s.phrases
            assert ans == [s.prompt_len - 1] and not g.any() and g.shape == (64,)
            checked["absent"] += 1
        else:
            assert s.phrases == []
            checked["without"] += 1
    assert checked["with"] and checked["absent"] and checked["without"]


def test_question_dice_draws_only_when_on_and_attaches_question_phrases(tmp_path, world):
    """question_dice = 0 keeps the batches of recipes written before it (no extra random
    draw); at 1 every question about a present object brings its two phrases to the batch."""
    from agevlm_edge.train.loop import Run, _generator
    from agevlm_edge.train.recipe import Stage

    recipe = recipe_from_dict(_recipe([STAGES[2]]))
    run = Run(world, tmp_path / "r", recipe, limit=32)
    base = Stage(**{**STAGES[2], "train": tuple(STAGES[2]["train"]), "dice_fraction": 0.0})
    off = run.vlm_samples(base, _generator(5, 0, 3))
    on = run.vlm_samples(dataclasses.replace(base, question_dice=1.0), _generator(5, 0, 3))
    assert [s.ids for s in off] == [s.ids for s in on]
    assert all(s.phrases == [] for s in off)
    with_phr = [s for s in on if s.phrases]
    assert with_phr and all(len(s.phrases) == 2 for s in with_phr)
    # null_dice: the same draws, and the picked questions about absent objects keep their
    # empty-mask phrase too (a model without the null token refuses it: Run's check)
    big = dataclasses.replace(base, question_dice=1.0, batch_size=64)
    on = run.vlm_samples(big, _generator(5, 0, 4))
    null = run.vlm_samples(dataclasses.replace(big, null_dice=True), _generator(5, 0, 4))
    assert [s.ids for s in null] == [s.ids for s in on]
    absent = [s for s in null if len(s.phrases) == 1]
    assert absent and all(not s.phrases[0][1].any() for s in absent)
    assert [s.phrases for s in null if len(s.phrases) == 2] == [s.phrases for s in on if s.phrases]
    with pytest.raises(BadInput, match="xattn_null"):
        Run(world, tmp_path / "n", recipe_from_dict(_recipe([{**STAGES[2], "null_dice": True}])), limit=8)
    assert [s.ids for s in run.vlm_samples(dataclasses.replace(base, question_dice=0.5), _generator(5, 0, 3))] \
        == [s.ids for s in off]
    unguided = run.vlm_samples(dataclasses.replace(base, question_dice=1.0, dice_weight=0.0), _generator(5, 0, 3))
    assert all(s.phrases == [] for s in unguided)
    with pytest.raises(Exception, match="question_dice in 0..1"):
        recipe_from_dict(_recipe([{**STAGES[2], "question_dice": 2.0}]))


def test_question_weights_pick_by_type_and_answer():
    from agevlm_edge.train.batches import question_weights

    recs = [{"questions": [{"type": "count", "answer": "one"}, {"type": "count", "answer": "two"},
                           {"type": "colour", "answer": "red"}]},
            {"questions": [{"type": "existence", "answer": "yes"}]}]
    assert question_weights(recs, {"count": 3, "count:two": 7}).tolist() == [3, 7, 1, 1]
    assert question_weights(recs, {"colour:red": 0}).tolist() == [1, 1, 0, 1]
    with pytest.raises(BadInput, match="'count:five', 'cout' match no train question.*types here: colour, count"):
        question_weights(recs, {"cout": 2, "count:five": 2})
    with pytest.raises(BadInput, match="weigh every train question 0"):
        question_weights(recs, {"count": 0, "colour": 0, "existence": 0})


def test_question_weights_steer_the_draw_and_bad_ones_fail_before_training(tmp_path, world):
    from agevlm_edge.train.loop import Run, _generator

    recipe = recipe_from_dict(_recipe([STAGES[2]]))
    run = Run(world, tmp_path / "r", recipe, limit=32)
    keys = [(q["type"], q["answer"]) for rec in run.train_data.records for q in rec["questions"]]
    types = sorted({t for t, _ in keys})
    assert len(types) > 1 and "count" in types
    base = recipe.stages[0]
    answers = {}      # a question sample's ids -> the (type, answer) it can stand for
    for s, k in zip(run.train_data.questions, keys):
        answers.setdefault(tuple(s.ids), set()).add(k)
    only = dataclasses.replace(base, batch_size=64, captions=0.0,
                               question_weights={t: 0 for t in types if t != "count"})
    drawn = run.vlm_samples(only, _generator(5, 0, 3))
    assert len(drawn) == 64 and all({t for t, _ in answers[tuple(s.ids)]} == {"count"} for s in drawn)
    assert len({tuple(s.ids) for s in drawn}) > 4
    # an answer's key wins over its type's: of the count questions only "zero" ones are left
    zero = dataclasses.replace(only, question_weights={**only.question_weights, "count": 0, "count:zero": 1})
    assert all(answers[tuple(s.ids)] == {("count", "zero")} for s in run.vlm_samples(zero, _generator(5, 0, 3)))
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(STAGES)))
    for setting, msg in (("{cout: 2}", "'cout' match no train question"),
                         ("{count: -1}", "question_weights maps TYPE or TYPE:ANSWER to a number >= 0"),
                         ("[count]", "question_weights must be a mapping")):
        assert_one_line_error(run_cli("train", "--data", world, "--out", tmp_path / "bad", "--config", cfg,
                                      "--set", f"guided.question_weights={setting}"), msg)
    assert not (tmp_path / "bad").exists()


def test_val_every_validates_inside_a_stage_without_changing_training(tmp_path, world):
    from agevlm_edge.train.loop import train

    stage = {**STAGES[0], "steps": 3}
    train(world, tmp_path / "a", recipe_from_dict(_recipe([stage])), limit=32)
    train(world, tmp_path / "b", recipe_from_dict(_recipe([{**stage, "val_every": 2}])), limit=32)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows if "val" in r] == [2, 3]
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="val_every must be >= 0"):
        recipe_from_dict(_recipe([{**STAGES[0], "val_every": -1}]))


def test_bad_settings_and_damaged_runs_are_one_line_errors_that_lose_nothing(tmp_path, world):
    import shutil

    from agevlm_edge.train.loop import train

    base = preset_recipe("tiny")
    for sets, msg in (({"seed": "abc"}, "seed must be an integer"),
                      ({"instruct.lr": "abc"}, "lr must be a number"),
                      ({"lm.batch_size": "1.5"}, "batch_size must be an integer"),
                      ({"model": "5"}, "model must be a mapping"),
                      ({"log_every": "0"}, "log_every and checkpoint_every must be >= 1"),
                      ({"variant": "best"}, "variant must be guided, ca or concat"),
                      ({"lm.lr": ".nan"}, "lr must be a finite number"),
                      ({"instruct.min_lr_ratio": ".inf"}, "min_lr_ratio must be a finite number"),
                      ({"lm.weight_decay": "-1"}, "weight_decay >= 0"),
                      ({"lm.min_lr_ratio": "2"}, "min_lr_ratio in 0..1"),
                      ({"instruct.captions": "-1"}, "mix weights >= 0"),
                      ({"guided.dice_layers": "[-1]"}, "dice_layers lists decoder layer indices"),
                      ({"seed": "["}, "not valid YAML"),
                      ({"seed": "2020-13-45"}, "not valid YAML .month must be in 1..12"),
                      ({"seed": str(2 ** 32)}, r"seed must be in 0\.\.4294967295"),  # 64-bit steps
                      ({"instruct.lr": "1" + "0" * 400}, "finite number, got an integer past the float range"),
                      ({"lm.train": "[lm, xattn]"}, "kind lm cannot train xattn"),
                      ({"instruct.train": "[vision, lm]"}, "kind vlm cannot train vision"),
                      ({"stages": "5"}, "stages must be a list")):
        with pytest.raises(BadInput, match=msg):
            apply_sets(base, sets)
    saved = json.loads(json.dumps(base.to_dict()))              # as config.json holds it
    assert recipe_changes(saved, base) == []
    older = {**saved, "stages": [{k: v for k, v in st.items() if k != "count_labels"}
                                 for st in saved["stages"]]}   # saved before the field existed
    assert recipe_changes(older, base) == []
    # stages pair by position, as resuming does: a new order is a change, not silence
    swapped = {**saved, "stages": [saved["stages"][1], saved["stages"][0], *saved["stages"][2:]]}
    names = [st.name for st in base.stages]
    assert recipe_changes(swapped, base) == [
        f"stages: {[names[1], names[0], *names[2:]]} -> {names}"]
    for damaged in ({"stages": None}, {"stages": [{"name": ["x"]}]}, [1], None):  # no traceback
        assert any(c.startswith("stages: ") for c in recipe_changes(damaged, base))
    assert recipe_changes(saved, apply_sets(base, {"seed": "3", "instruct.steps": "7"})) == [
        "seed: 0 -> 3", f"instruct.steps: {base.stages[-1].steps} -> 7"]
    with pytest.raises(BadInput, match="unknown recipe keys: 1, x"):
        recipe_from_dict({**base.to_dict(), 1: 2, "x": 3})
    with pytest.raises(BadInput, match="--scale must be a finite number"):
        preset_recipe("tiny", scale=float("nan"))
    assert apply_sets(base, {"instruct.lr": "1e-3"}).stages[-1].lr == 1e-3   # YAML 1.1's string
    out = tmp_path / "r"
    assert_one_line_error(run_cli("train", "--data", world, "--out", out, "--set", "=5"), "key is empty")
    assert_one_line_error(run_cli("train", "--data", world, "--out", out, "--set", "model.d_model=0"),
                          "d_model must be an integer >= 1")
    assert_one_line_error(run_cli("train", "--data", world, "--out", out, "--resume"), "no training_state")
    assert_one_line_error(run_cli("train", "--data", world, "--out", out, "--config", tmp_path),
                          "--config recipe", "is a directory")
    assert not out.exists()

    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(_recipe(STAGES[:2])))
    run = tmp_path / "a"
    train(world, run, recipe_from_dict(_recipe(STAGES[:2])), limit=32)
    weights = (run / "model.safetensors").read_bytes()
    # --overwrite deletes the old run only once everything else checked out
    assert_one_line_error(run_cli("train", "--data", world, "--out", run, "--config", cfg,
                                  "--set", "mask_source=sam:nope", "--overwrite"), "sam:nope")
    assert (run / "model.safetensors").read_bytes() == weights
    for sets, msg in ((["lm.lr=.nan"], "finite number"),
                      (["model.vocab_size=10"], "smaller than the tokenizer"),
                      (["vision.dice_weight=1", "vision.dice_layers=[2]"],   # cross layers: 1, 3
                       "not all cross-attention layers"),
                      (["model.xattn_layers=[99]"], "decoder layer index"),
                      (["model.vocab_size=abc"], "vocab_size must be an integer")):
        assert_one_line_error(run_cli("train", "--data", world, "--out", run, "--config", cfg,
                                      *[a for kv in sets for a in ("--set", kv)], "--overwrite"), msg)
        assert (run / "model.safetensors").read_bytes() == weights
    n_files = len(list(world.rglob("*")))
    assert_one_line_error(run_cli("train", "--data", world, "--out", world, "--config", cfg,
                                  "--overwrite"), "would replace the DATA DIR")
    assert len(list(world.rglob("*"))) == n_files
    shutil.copyfile(cfg, run / "r.yaml")          # a recipe kept in the run it trained
    assert_one_line_error(run_cli("train", "--data", world, "--out", run, "--config",
                                  run / "r.yaml", "--overwrite"), "would replace the --config")
    assert (run / "r.yaml").is_file() and (run / "model.safetensors").read_bytes() == weights
    # a damaged checkpoint or RUN DIR: one line naming the file
    bad = tmp_path / "b"
    shutil.copytree(run, bad)
    (bad / "training_state" / "state.json").write_text("")
    assert_one_line_error(run_cli("train", "--data", world, "--out", bad, "--config", cfg,
                                  "--resume"), "state.json")
    (bad / "model.safetensors").write_bytes(weights[:40])
    assert_one_line_error(run_cli("eval", "--model", bad, "--data", world, "--limit", "2"),
                          "model.safetensors", "not a readable safetensors file")
    shutil.copyfile(run / "model.safetensors", bad / "model.safetensors")
    (bad / "preprocessor.json").write_text("{")
    assert_one_line_error(run_cli("eval", "--model", bad, "--data", world, "--limit", "2"),
                          "preprocessor.json", "not valid JSON")
    # results never written over the inputs, nor under a file
    assert_one_line_error(run_cli("eval", "--model", run, "--data", world, "--out",
                                  run / "config.json"), "would replace a file of the model")
    assert_one_line_error(run_cli("eval", "--model", run, "--data", world, "--out",
                                  run / "config.json" / "r.json"), "is a file")
    assert (run / "model.safetensors").read_bytes() == weights


def test_resume_drops_a_torn_metrics_line_and_refuses_a_changed_recipe_or_optimizer(
        tmp_path, world, capsys):
    from agevlm_edge.train.loop import train

    recipe = recipe_from_dict(_recipe(STAGES[2:]))
    out = tmp_path / "r"
    train(world, out, recipe, stop_at_step=2, limit=32)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"global_step": 3, "loss"')                  # the kill came mid-line
    changed = apply_sets(recipe, {"guided.train": "[projector, xattn, lm]"})
    with pytest.raises(BadInput, match="optimizer state .* does not fit stage guided"):
        train(world, out, changed, resume=True, limit=32)
    assert ("guided.train: ['projector', 'xattn'] -> ['projector', 'xattn', 'lm']"
            in capsys.readouterr().err)                                 # said first
    torn = tmp_path / "torn"
    shutil.copytree(out, torn)
    for content in (b"", b"not a pickle"):                       # a torn or foreign optimizer.pt
        (torn / "training_state" / "optimizer.pt").write_bytes(content)
        with pytest.raises(BadInput, match="checkpoint in .* cannot be loaded"):
            train(world, torn, recipe, resume=True, limit=32)
    (out / "config.json").write_text('{"recipe"')       # read for the note only: no obstacle
    train(world, out, recipe, resume=True, limit=32)
    assert "differs" not in capsys.readouterr().err
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["global_step"] == STAGES[2]["steps"]


def test_a_stage_drawing_from_an_empty_pool_fails_before_anything_is_deleted(tmp_path, world):
    """A DATA DIR imported without questions (COCO captions alone, say): a stage that draws
    questions says so at once instead of a traceback at its first step."""
    from agevlm_edge.train.loop import train

    data = tmp_path / "noq"
    shutil.copytree(world, data)
    meta = json.loads((data / "dataset.json").read_text())
    split = data / meta["splits"]["train"]["file"]
    rows = [json.loads(ln) for ln in split.read_text().splitlines()]
    split.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "questions"}) + "\n"
                             for r in rows))
    out = tmp_path / "r"
    train(data, out, recipe_from_dict(_recipe(STAGES[:1])), limit=8)    # captions: enough
    kept = (out / "model.safetensors").read_bytes()
    for stage, msg in (({**STAGES[0], "context_qa": 0.5}, "stage lm draws yes/no questions .*"
                        "context_qa=0"),
                       (STAGES[2], "stage guided draws questions.*guided.questions=0")):
        with pytest.raises(BadInput, match=msg):
            train(data, out, recipe_from_dict(_recipe([stage])), overwrite=True, limit=8)
        assert (out / "model.safetensors").read_bytes() == kept


def test_device_choice_is_one_line_error_before_anything_is_written(tmp_path, world):
    from agevlm_edge.train.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BadInput, match="is not a device"):
        resolve_device("gpu0")
    with pytest.raises(BadInput, match="runs on cpu or cuda"):
        resolve_device("meta")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the no-GPU errors cannot be shown")
    out = tmp_path / "r"
    assert_one_line_error(run_cli("train", "--data", world, "--out", out, "--device", "cuda",
                                  "--scale", "0.01"), "--device cuda", "sees no CUDA GPU")
    assert not out.exists()
    assert_one_line_error(run_cli("eval", "--model", out, "--data", world, "--device", "cuda:1"),
                          "sees no CUDA GPU")
