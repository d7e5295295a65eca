"""bitsandbytes int8 / nf4 torch variants: they load, stay close to fp32 and run the suite."""

from __future__ import annotations

import copy

import pytest
import torch

from agevlm_edge.errors import BadInput
from agevlm_edge.model import AgeVLM, AgeVLMConfig
from agevlm_edge.quant.bnb import quantize_bnb, weight_bytes

CFG = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
           vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128)


@pytest.mark.parametrize("kind,tol", [("int8", 0.05), ("nf4", 0.3)])
def test_variants_stay_close_to_fp32_and_shrink_weights(kind, tol):
    torch.manual_seed(0)
    ref = AgeVLM(AgeVLMConfig(**CFG)).eval()
    with torch.no_grad():
        for blk in ref.decoder.xattn.values():
            blk.attn_gate.fill_(0.5)
    q = quantize_bnb(copy.deepcopy(ref), kind)
    ids, px = torch.randint(3, 96, (2, 7)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ref(ids, pixel_values=px).logits, q(ids, pixel_values=px).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < tol, rel           # quantized (not identical), yet close
    assert weight_bytes(q) < 0.6 * weight_bytes(ref)
    assert type(q.decoder.layers[0].mlp.up_proj).__name__ in ("Linear8bitLt", "Linear4bit")
    assert isinstance(q.vision.blocks[0].qkv, torch.nn.Linear)        # vision stays fp32
    assert q.generate(ids[:, :3], px, max_new_tokens=3, eos_id=-1).shape == (2, 3)


def test_unknown_variant_is_bad_input():
    with pytest.raises(BadInput, match="int8 or nf4"):
        quantize_bnb(AgeVLM(AgeVLMConfig(**CFG)), "int3")


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_suite_runs_on_a_bnb_variant_of_a_run_dir(tmp_path, small_world, kind):
    from agevlm_edge.checkpoint import save_model_files
    from agevlm_edge.data.tokenizer import corpus, train_bpe
    from agevlm_edge.preprocess import Preprocessor
    from agevlm_edge.quant.bnb import evaluate_bnb

    tok = train_bpe(corpus(small_world), 400)
    torch.manual_seed(0)
    model = AgeVLM(AgeVLMConfig(**{**CFG, "image_size": 64, "vocab_size": tok.get_vocab_size()}))
    save_model_files(tmp_path / "run", model, tok, Preprocessor(64))
    res = evaluate_bnb(tmp_path / "run", small_world, kind, suites="pope,vqa", limit=3,
                       out_json=tmp_path / "r.json")
    assert res["model"]["bnb"] == kind and res["model"]["weight_bytes"] < res["model"]["fp32_weight_bytes"]
    assert set(res["suites"]) == {"pope", "vqa"}
    assert (tmp_path / "r.json").is_file()
