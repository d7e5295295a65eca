"""The functions model.py's attentions call: grouped-query attention with an eager and a fused
path, Llama's rotary embedding, and two custom ops that compute what onnxruntime's contrib ops
compute, so that the mobile-gpu export can map each onto one node (export/contrib.py).

    attention(q, k, v, mask, "fused")  SDPA (native GQA)       -> out
    attention(q, k, v, mask, "eager")  softmax(q.k/sqrt(hd)).v -> out, probs [B,Hq,T,S]
    attention(..., "fused", need_probs=True) while exporting: one opset-23 Attention node
                                       that returns its softmax too -> out, probs
    torch.ops.agevlm.gqa_rotary        com.microsoft GroupQueryAttention (rotary inside)
    torch.ops.agevlm.cross_mha         com.microsoft MultiHeadAttention

Importing this module registers the two custom ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              impl: str = "fused", need_probs: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grouped-query attention. q [B,Hq,T,hd], k/v [B,Hkv,S,hd], mask bool [B|1,1,T,S] (True=keep).

    "fused" runs SDPA; "eager" materialises the probabilities [B,Hq,T,S] and returns them.
    "fused" with ``need_probs`` is the eager chain in PyTorch (the dice loss differentiates it)
    and, inside an ONNX export, the opset-23 Attention op with qk_matmul_output_mode 3 (its
    fourth output is the softmax): a fused cross-attention that still gives the heatmaps
    their maps. Only opset >= 23 exports may ask for it (Decoder.forward's ``xattn_impl``).
    """
    if impl == "fused" and not need_probs:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out, None
    if impl == "fused" and torch.onnx.is_in_onnx_export():
        out, _, _, probs = torch.onnx.ops.attention(q, k, v, attn_mask=mask,
                                                    qk_matmul_output_mode=3)
        return out, probs
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])   # (B, Hq, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    return probs @ v, probs


def rope_inv_freq(head_dim: int, theta: float, device=None, scaling: dict | None = None
                  ) -> torch.Tensor:
    """[hd/2] rotary frequencies, Llama's; ``scaling`` is a config's llama3 rope_scaling
    (Llama-3.1/3.2: long wavelengths divided by ``factor``, short ones kept, a smooth blend
    between), as transformers' _compute_llama3_parameters computes it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if not scaling:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B,T] -> cos, sin [B,1,T,hd] in Hugging Face Llama's (rotate_half) layout."""
    inv_freq = rope_inv_freq(head_dim, theta, positions.device, scaling)
    freqs = positions.float()[..., None] * inv_freq                 # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                         # (B, T, hd)
    return emb.cos()[:, None], emb.sin()[:, None]                   # (B, 1, T, hd)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Written as HF Llama's rotate_half (slices, then cos/sin after the concat) so that the
    # ONNX rewriter recognises it and fuses it into one RotaryEmbedding op (export/fusion.py).
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin


def rope_cache(max_positions: int, head_dim: int, theta: float, scaling: dict | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, hd/2]: the rotary tables GroupQueryAttention takes (one half of
    rope_cos_sin's rows, which repeat them)."""
    freqs = torch.arange(max_positions).float()[:, None] * rope_inv_freq(head_dim, theta,
                                                                          scaling=scaling)
    return freqs.cos(), freqs.sin()


@torch.library.custom_op("agevlm::gqa_rotary", mutates_args=())
def gqa_rotary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
               past_v: torch.Tensor, bias: torch.Tensor, cos_cache: torch.Tensor,
               sin_cache: torch.Tensor, num_heads: int, kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention over a KV cache as onnxruntime's com.microsoft GroupQueryAttention
    computes it (do_rotary=1); the export of the mobile-gpu target maps this op onto that one.

    q [B,T,Hq*hd], k/v [B,T,Hkv*hd] (before rotary), past [B,Hkv,P,hd], bias [B,1,T,P+T]
    (additive), cos/sin_cache [max_positions, hd/2] -> (out [B,T,Hq*hd], present_k, present_v
    [B,Hkv,P+T,hd]). The step's token t is rotated by its cache slot P+t, the same in every
    row, where the model's other paths use its count of real tokens. With left padding the two
    differ by the row's pad count for every token of the row alike; rotary scores depend only
    on position differences, so the outputs agree to rounding (tested), while the cached keys
    carry the slot phases and must be continued by this path.
    """
    B, T, _ = q.shape
    hd, P = past_k.shape[-1], past_k.shape[2]
    cos = torch.cat([cos_cache, cos_cache], -1)[P:P + T]                    # (T, hd)
    sin = torch.cat([sin_cache, sin_cache], -1)[P:P + T]
    q = apply_rope(q.view(B, T, num_heads, hd).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(B, T, kv_heads, hd).transpose(1, 2), cos, sin)
    k = torch.cat([past_k, k], dim=2)
    v = torch.cat([past_v, v.view(B, T, kv_heads, hd).transpose(1, 2)], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=num_heads != kv_heads)
    return out.transpose(1, 2).reshape(B, T, -1), k, v


@gqa_rotary.register_fake
def _(q, k, v, past_k, past_v, bias, cos_cache, sin_cache, num_heads, kv_heads):
    B, T, _ = q.shape
    shape = (B, kv_heads, past_k.shape[2] + T, past_k.shape[-1])
    return q.new_empty(q.shape), past_k.new_empty(shape), past_k.new_empty(shape)


# Zeros added to each head's query and key for cross_mha: they leave q.k unchanged, and a
# query/key head size unlike the value's keeps onnxruntime off its flash-attention kernel,
# which on the WebGPU adapter we can test (Mesa's software Vulkan) gives wrong results for
# more than one query (scripts/probe_webgpu_mha.py); 4 keeps the head size vec4-aligned.
XATTN_QK_PAD = 4


@torch.library.custom_op("agevlm::cross_mha", mutates_args=())
def cross_mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float
              ) -> torch.Tensor:
    """Non-causal attention as onnxruntime's com.microsoft MultiHeadAttention computes it; the
    mobile-gpu export maps this op onto that one. q [B,T,Hq*dq], k [B,N,Hq*dq], v [B,N,Hq*dv]
    (one K/V head per query head; dq may exceed dv: zero padding) -> [B,T,Hq*dv]."""
    B, T, _ = q.shape
    heads = lambda x: x.view(B, x.shape[1], num_heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=scale)
    return out.transpose(1, 2).reshape(B, T, -1)


@cross_mha.register_fake
def _(q, k, v, num_heads, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
