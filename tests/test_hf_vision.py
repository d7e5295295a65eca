"""Pretrained Hugging Face vision towers (CLIP, SigLIP, ConvNeXt) from local directories:
same tokens as transformers, end-to-end forward, RUN DIR round trip without the HF dir,
clear errors, and `agevlm train --vision-dir` skipping the vision stage."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from agevlm_edge.model import AgeVLM, AgeVLMConfig
from agevlm_edge.preprocess import HF_DEFAULT_NORM, Preprocessor
from conftest import assert_one_line_error, run_cli

DECODER = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
               xattn_layers=(1,))
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           image_size=64, patch_size=8)
# kind -> (tokens N, width W): ViTs 64 px / 8 px patches = 64 tokens; the 3-stage ConvNeXt
# has stride 4 * 2 * 2 = 16, so a 4 x 4 map of its last stage's 48 channels.
GEOMETRY = {"clip_vision": (64, 32), "clip_full": (64, 32), "siglip": (64, 32), "convnext": (16, 48)}


def _save_hf(kind: str, path) -> type:
    """Save a tiny random transformers vision model (safetensors) to `path`; returns the
    class whose own output the tower must reproduce."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "clip_vision":
        model, cls = tf.CLIPVisionModel(tf.CLIPVisionConfig(**VIT)), tf.CLIPVisionModel
    elif kind == "clip_full":    # a whole CLIP (text + vision): only its vision half is used
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, vocab_size=50)
        model, cls = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=VIT,
                                                projection_dim=16)), tf.CLIPVisionModel
    elif kind == "siglip":
        model, cls = tf.SiglipVisionModel(tf.SiglipVisionConfig(**VIT)), tf.SiglipVisionModel
    else:
        cfg = tf.ConvNextConfig(hidden_sizes=[16, 32, 48], depths=[1, 1, 1], num_stages=3,
                                image_size=64)
        model, cls = tf.ConvNextModel(cfg), tf.ConvNextModel
    model.save_pretrained(path, safe_serialization=True)
    return cls


def _reference_tokens(cls, path, pixels: torch.Tensor) -> torch.Tensor:
    ref = cls.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    with torch.no_grad():
        h = ref(pixel_values=pixels).last_hidden_state
    if h.dim() == 4:
        return h.flatten(2).transpose(1, 2)        # ConvNeXt (B, C, h, w) -> (B, h*w, C)
    return h[:, 1:] if cls.__name__.startswith("CLIP") else h


def _pretrained_vlm(path, **decoder) -> AgeVLM:
    torch.manual_seed(1)
    model = AgeVLM(AgeVLMConfig(vision_hf_dir=str(path), **{**DECODER, **decoder}))
    model.vision.load_pretrained(path)
    with torch.no_grad():                 # open the gates so the image reaches the logits
        for blk in model.decoder.xattn.values():
            blk.attn_gate.fill_(0.7)
            blk.mlp_gate.fill_(0.7)
    return model.eval()


@pytest.mark.parametrize("kind", list(GEOMETRY))
def test_tower_reproduces_transformers_and_the_vlm_runs(tmp_path, kind):
    cls = _save_hf(kind, tmp_path / "hf")
    model = _pretrained_vlm(tmp_path / "hf")
    n, w = GEOMETRY[kind]
    cfg = model.cfg
    assert (cfg.n_image_tokens, cfg.vision_width, cfg.image_size) == (n, w, 64)
    assert (model.vision.n_tokens, model.vision.width) == (n, w)
    assert model.projector.pos.shape == (n, cfg.d_model)
    assert not any(p.requires_grad for p in model.vision.parameters())   # frozen as built
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.vision(pixels)
        out = model(torch.randint(3, 97, (2, 9)), pixel_values=pixels)
    assert tokens.shape == (2, n, w)
    assert torch.allclose(tokens, _reference_tokens(cls, tmp_path / "hf", pixels), atol=1e-5, rtol=0)
    assert out.logits.shape == (2, 9, 97) and torch.isfinite(out.logits).all()


def hf_run_dir(root, kind: str, world):
    """A RUN DIR of a tiny VLM (gates open) on a saved random `kind` tower, with a tokenizer
    trained on ``world``'s texts, whose vocabulary the decoder takes."""
    from agevlm_edge.checkpoint import save_model_files
    from agevlm_edge.data.tokenizer import corpus, train_bpe

    tok = train_bpe(corpus(world), 400)
    _save_hf(kind, root / "hf")
    model = _pretrained_vlm(root / "hf", vocab_size=tok.get_vocab_size())
    save_model_files(root / "run", model, tok,
                     Preprocessor.from_hf_dir(root / "hf", model.cfg.image_size))
    return root / "run"


@pytest.mark.parametrize("kind", ["siglip", "convnext"])
def test_a_model_with_a_hf_tower_exports_and_passes_parity(tmp_path, kind, small_world):
    from agevlm_edge.export.onnx_export import export_run

    r = export_run(hf_run_dir(tmp_path, kind, small_world), tmp_path / "export",
                   data_dir=small_world, n_pairs=4)
    man = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert r["parity"]["generations_identical"] == 4 and man["parity"]["passed"]
    n, w = GEOMETRY[kind]
    assert man["parity"]["vision_shapes"]["cross_key_1"] == [2, 2, n, 8]
    assert man["parity"]["vision_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("kind", ["siglip", "convnext"])
def test_run_dir_reloads_without_the_hf_dir(tmp_path, kind):
    from tokenizers import Tokenizer, models

    from agevlm_edge.checkpoint import load_model_files, save_model_files

    _save_hf(kind, tmp_path / "hf")
    model = _pretrained_vlm(tmp_path / "hf")
    pre = Preprocessor.from_hf_dir(tmp_path / "hf", model.cfg.image_size)
    save_model_files(tmp_path / "run", model, Tokenizer(models.BPE()), pre)
    shutil.rmtree(tmp_path / "hf")         # the RUN DIR must be self-contained
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert stored["vision_hf_config"]["model_type"] == model.cfg.vision_hf_config["model_type"]
    loaded, _, pre2, _ = load_model_files(tmp_path / "run")
    assert pre2 == pre and loaded.cfg == model.cfg
    ids, pixels = torch.randint(3, 97, (2, 9)), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=pixels).logits,
                           loaded(ids, pixel_values=pixels).logits)


def test_preprocessor_takes_the_hf_image_processors_normalisation(tmp_path):
    _save_hf("siglip", tmp_path)
    assert Preprocessor.from_hf_dir(tmp_path, 64) == Preprocessor(64, *HF_DEFAULT_NORM["siglip"])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"height": 64}}))
    assert Preprocessor.from_hf_dir(tmp_path, 64) == Preprocessor(64, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


def test_convnext_image_size_follows_its_image_processor(tmp_path):
    _save_hf("convnext", tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 96}}))
    cfg = AgeVLMConfig(vision_hf_dir=str(tmp_path), **DECODER)
    assert (cfg.image_size, cfg.patch_size, cfg.n_image_tokens) == (96, 16, 36)


def test_unsupported_or_missing_dirs_fail_clearly(tmp_path):
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match=r"unsupported vision model_type 'vit'; supported: clip, "):
        AgeVLMConfig(vision_hf_dir=str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="no config.json"):
        AgeVLMConfig(vision_hf_dir=str(tmp_path / "nowhere"))
    _save_hf("siglip", tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    model = AgeVLM(AgeVLMConfig(vision_hf_dir=str(tmp_path / "noweights"), **DECODER))
    with pytest.raises(ValueError, match="no loadable safetensors"):
        model.vision.load_pretrained(tmp_path / "noweights")


# ----------------------------------------------------------------------------- training
SMALL_MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64,
               "xattn_layers": [1]}
STAGES = [
    {"name": "vision", "kind": "vision", "train": ["vision"], "steps": 3, "batch_size": 8, "lr": 2e-3},
    {"name": "align", "kind": "vlm", "train": ["projector", "xattn"], "steps": 2, "batch_size": 8,
     "lr": 2e-3, "warmup": 1, "questions": 1.0, "dice_weight": 1.0, "dice_fraction": 0.5},
]


@pytest.fixture(scope="module")
def world(small_world):
    if not (small_world / "tokenizer.json").is_file():
        run_cli("data", "tokenizer", "--data", small_world, check_rc=0)
    return small_world


def test_train_with_vision_dir_skips_the_vision_stage(tmp_path, world):
    _save_hf("clip_vision", tmp_path / "hf")
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"seed": 5, "model": SMALL_MODEL, "log_every": 1,
                                      "stages": STAGES}))
    base = ("train", "--data", world, "--config", recipe, "--vision-dir")
    assert_one_line_error(run_cli(*base, tmp_path / "nowhere", "--out", tmp_path / "bad"),
                          "no config.json")
    proc = run_cli(*base, tmp_path / "hf", "--out", tmp_path / "run", check_rc=0)
    assert "stage vision skipped: the vision tower is pretrained" in proc.stdout + proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"align"}
    assert json.loads((tmp_path / "run" / "preprocessor.json").read_text())["mean"] == [0.4, 0.5, 0.6]
    # the frozen tower leaves training exactly as pretrained
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert all(torch.equal(trained[f"vision.model.{k}"], v) for k, v in hf.items())
