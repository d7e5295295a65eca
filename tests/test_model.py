"""The AGE-VLM network: HF Llama parity, eager/fused parity, KV cache, gates, padding."""

from __future__ import annotations

import pytest
import torch

from agevlm_edge.hf_llama import from_pretrained_lm
from agevlm_edge.model import AgeVLM, AgeVLMConfig, build_config
from agevlm_edge.ops import XATTN_QK_PAD, attention

TINY = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
            vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=64)


def _model(seed: int = 0, **kw) -> AgeVLM:
    torch.manual_seed(seed)
    return AgeVLM(AgeVLMConfig(**{**TINY, **kw})).eval()


def _open_gates(m: AgeVLM, value: float = 0.7) -> None:
    with torch.no_grad():
        for blk in m.decoder.xattn.values():
            blk.attn_gate.fill_(value)
            blk.mlp_gate.fill_(value)


# Llama-3.2's rope_scaling with its context shrunk to this test's: of head size 8's four
# wavelengths (2*pi * 5000^(i/8): 6, 53, 444, 3736) one is kept, one blended, two scaled.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("n_kv,rope_scaling", [(4, None), (2, None), (2, LLAMA3_ROPE)])
def test_decoder_matches_transformers_llama(tmp_path, n_kv, rope_scaling):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=n_kv, rope_theta=5000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=256,
                         rope_scaling=rope_scaling)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = from_pretrained_lm(tmp_path, image_size=32, patch_size=8, vision_width=32,
                              vision_layers=1, vision_heads=2).eval()
    assert ours.cfg.cross_layers == (1,) and ours.cfg.n_kv_heads == n_kv
    assert bool(ours.cfg.rope_scaling) == bool(rope_scaling)
    ids = torch.randint(0, 97, (2, 200))             # positions past the original 64
    with torch.no_grad():
        ref = hf(ids).logits
        # Gates start at 0: with an image the decoder is still exactly the pretrained LM.
        got = ours(ids, pixel_values=torch.randn(2, 3, 32, 32)).logits
        eager = ours(ids, attn_impl="eager").logits
        gqa = ours(ids, attn_impl="gqa").logits       # rotary tables of the export's op
    for out in (got, eager, gqa):
        assert (out - ref).abs().max().item() <= 1e-4


def test_small_preset_is_about_150m_parameters():
    with torch.device("meta"):
        m = AgeVLM(build_config("small"))
    assert 140e6 <= sum(p.numel() for p in m.parameters()) <= 160e6
    assert m.cfg.cross_layers == (1, 9, 17, 25) and m.cfg.n_image_tokens == 196


def test_unsupported_rope_scaling_is_one_clear_error():
    from agevlm_edge.hf_llama import lm_config_from_hf

    base = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2}
    with pytest.raises(ValueError, match="rope_scaling of type 'yarn' is not supported"):
        lm_config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert "rope_scaling" not in lm_config_from_hf({**base, "rope_scaling": {"type": "default"}})
    with pytest.raises(ValueError, match="rope_scaling must be llama3's"):
        AgeVLMConfig(rope_scaling={"factor": 8.0})


def test_eager_and_fused_attention_agree_and_eager_returns_probabilities():
    m = _model()
    _open_gates(m)
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = m(ids, pixel_values=px, attention_mask=mask)
        eager = m(ids, pixel_values=px, attention_mask=mask, attn_impl="eager", output_xattn=True)
    assert (fused.logits - eager.logits).abs().max().item() < 1e-5
    probs = eager.xattn_probs[1]
    assert probs.shape == (2, 4, 9, 16)                       # [B, heads, text, image tokens]
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 9), atol=1e-5)
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    a, _ = attention(q, k, v, None, "fused")
    b, p = attention(q, k, v, None, "eager", need_probs=True)
    assert (a - b).abs().max() < 1e-5 and p.shape == (1, 4, 5, 7)


@pytest.mark.parametrize("arch", ["xattn", "concat"])
def test_kv_cache_and_precomputed_image_match_the_full_forward(arch):
    m = _model(arch=arch)
    _open_gates(m)
    ids, px = torch.randint(3, 97, (2, 10)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = m(ids, pixel_values=px).logits
        img = m.image_tokens(px)
        kv = m.cross_kv(img) if arch == "xattn" else None
        a = m(ids[:, :6], image_tokens=img, cross_kv=kv)
        b = m(ids[:, 6:], cross_kv=kv, past_key_values=a.past_key_values,
              attention_mask=torch.ones(2, 10, dtype=torch.long))
    assert full.shape == (2, 10, 97)
    assert (torch.cat([a.logits, b.logits], 1) - full).abs().max().item() < 1e-5


def test_gates_start_closed_and_open_gates_let_the_image_in():
    m = _model()
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        text_only = m(ids).logits
        a = m(ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
        _open_gates(m)
        b = m(ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
        c = m(ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
    assert torch.equal(a, text_only)
    assert (b - c).abs().max() > 1e-6  # small (0.02-std init) but real


@pytest.mark.parametrize("arch", ["xattn", "concat"])
def test_left_padded_batch_generates_like_single_prompts(arch):
    m = _model(arch=arch, seed=1)
    _open_gates(m)
    px = torch.randn(2, 3, 32, 32)
    p0, p1 = torch.randint(3, 97, (1, 3)), torch.randint(3, 97, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), p0], 1), p1])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    out = m.generate(batch, px, attention_mask=mask, max_new_tokens=6, eos_id=-1)
    one = m.generate(p0, px[:1], max_new_tokens=6, eos_id=-1)
    two = m.generate(p1, px[1:], max_new_tokens=6, eos_id=-1)
    assert torch.equal(out, torch.cat([one, two]))


def test_config_rejects_unknown_keys_and_places_cross_attention():
    with pytest.raises(ValueError, match="unknown model config keys: wat"):
        AgeVLMConfig.from_dict({"wat": 1})
    assert build_config("tiny").cross_layers == (1, 3)
    assert AgeVLMConfig(n_layers=6, xattn_every=1).cross_layers == (1, 2, 3, 4, 5)
    assert AgeVLMConfig(xattn_layers=(0, 2)).cross_layers == (0, 2)
    assert AgeVLMConfig(arch="concat").cross_layers == ()
    cfg = AgeVLMConfig.from_dict(build_config("tiny").to_dict())
    assert cfg == build_config("tiny")


@pytest.mark.parametrize("stem,patch", [("cnn", 4), ("cnn", 8), ("cnn", 16), ("conv", 8), ("patch", 8)])
def test_vision_stems_give_one_token_per_patch(stem, patch):
    m = _model(image_size=64, patch_size=patch, vision_stem=stem)
    tokens = m.vision(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, (64 // patch) ** 2, 32)
    assert m.image_tokens(torch.randn(1, 3, 64, 64)).shape == (1, (64 // patch) ** 2, 32)
    with pytest.raises(ValueError, match="vision_stem must be"):
        AgeVLMConfig(vision_stem="resnet")


def test_vision_skip_appends_each_patchs_own_first_layer_mean():
    m = _model(image_size=64, vision_skip=True)
    w, skip = 32, m.cfg.vision_out_width - 32
    assert skip == 8 and AgeVLMConfig.from_dict(m.cfg.to_dict()) == m.cfg
    m.vision.eval()                                   # BatchNorm from running stats: per-sample
    x = torch.randn(2, 3, 64, 64)
    tokens = m.vision(x)
    assert tokens.shape == (2, 64, w + skip)
    assert m.image_tokens(x).shape == (2, 64, 32)
    y = x.clone()
    y[:, :, 1:7, 1:7] += 1.0     # inside the first 8x8 patch, clear of the 3x3 conv's reach
    changed = (m.vision(y) - tokens).abs().amax(dim=0)             # (N, W)
    assert changed[0, w:].max() > 1e-3                # that patch's skip moves ...
    assert changed[1:, w:].max() < 1e-6               # ... and no other patch's skip
    assert changed[1:, :w].max() > 1e-3               # (the deep channels do see neighbours)
    for bad in (dict(vision_stem="conv"), dict(vision_stem="patch")):
        with pytest.raises(ValueError, match="vision_skip needs the built-in cnn stem"):
            AgeVLMConfig(vision_skip=True, **bad)


def test_gqa_form_matches_eager_on_a_left_padded_batch_and_its_own_cache():
    """attn_impl="gqa" rotates by cache slot, not by real-token count: the same scores (rotary
    is relative) for prefill and a decode step over its own cache, different cached keys."""
    m = _model(seed=2)
    _open_gates(m)
    ids, px = torch.randint(3, 97, (2, 7)), torch.randn(2, 3, 32, 32)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    real = mask.bool()
    with torch.no_grad():
        img = m.image_tokens(px)
        kv = m.cross_kv(img)
        a = m(ids, image_tokens=img, cross_kv=kv, attention_mask=mask, attn_impl="eager")
        g = m(ids, image_tokens=img, cross_kv=kv, attention_mask=mask, attn_impl="gqa")
        nxt, mask2 = a.logits[:, -1:].argmax(-1), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        a2, g2 = (m(nxt, cross_kv=kv, attention_mask=mask2, past_key_values=o.past_key_values,
                    attn_impl=impl) for o, impl in ((a, "eager"), (g, "gqa")))
    assert (a.logits[real] - g.logits[real]).abs().max().item() < 1e-5
    assert (a2.logits - g2.logits).abs().max().item() < 1e-5
    # The cross K/V in MultiHeadAttention's layout (what the mobile-gpu vision graph emits):
    # expanded to the query heads, key padded per head; the same logits as from [B,Hkv,N,hd].
    cfg, layer = m.cfg, str(m.cfg.cross_layers[0])
    mha = m.cross_kv(img, "mha")
    n_img = img.shape[1]
    assert mha[layer][0].shape == (2, n_img, cfg.xattn_heads * (cfg.head_dim + XATTN_QK_PAD))
    assert mha[layer][1].shape == (2, n_img, cfg.xattn_heads * cfg.head_dim)
    with torch.no_grad():
        g3 = m(ids, cross_kv=mha, attention_mask=mask, attn_impl="gqa")
    assert (g3.logits - g.logits).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="layout"):
        m.cross_kv(img, "bnhd")
    k_eager, k_gqa = a.past_key_values[0][0], g.past_key_values[0][0]
    assert torch.allclose(k_eager[1], k_gqa[1], atol=1e-6)          # no padding: same phases
    assert not torch.allclose(k_eager[0, :, -4:], k_gqa[0, :, -4:], atol=1e-3)   # shifted by 3
    with pytest.raises(ValueError, match="concat pads mid-sequence"):
        _model(arch="concat")(ids, pixel_values=px, attention_mask=mask, attn_impl="gqa")


def test_null_token_adds_one_learned_key_value_and_keeps_maps_over_the_patches():
    """xattn_null: one more cross K/V entry per layer (zeros at the start, drawn from no RNG, so
    every other weight initialises as without it); every attention path gives the same logits,
    and the probabilities stay over the image's patches, summing to what the null leaves."""
    plain, m = _model(), _model(xattn_null=True)
    extra = sorted(set(m.state_dict()) - set(plain.state_dict()))
    assert extra == [f"decoder.xattn.{i}.attn.null_{t}" for i in m.cfg.cross_layers for t in "kv"]
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in plain.state_dict().items())
    _open_gates(m)
    with torch.no_grad():
        for i in m.cfg.cross_layers:
            m.decoder.xattn[str(i)].attn.null_k.normal_()
            m.decoder.xattn[str(i)].attn.null_v.normal_()
    ids, px = torch.randint(3, 97, (2, 7)), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img = m.image_tokens(px)
        kv = m.cross_kv(img)
        eager = m(ids, image_tokens=img, attn_impl="eager", output_xattn=True)
        outs = [m(ids, image_tokens=img, attn_impl=impl).logits for impl in ("fused", "gqa", "mha")]
        outs.append(m(ids, cross_kv=m.cross_kv(img, "mha"), attn_impl="gqa").logits)
    layer = str(m.cfg.cross_layers[0])
    assert kv[layer][0].shape[2] == kv[layer][1].shape[2] == img.shape[1] + 1
    probs = eager.xattn_probs[m.cfg.cross_layers[0]]
    assert probs.shape == (2, 4, 7, 16)
    assert (probs.sum(-1) < 1 - 1e-3).all()
    for o in outs:
        assert (o - eager.logits).abs().max().item() < 1e-5
