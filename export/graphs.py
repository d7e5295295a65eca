"""The modules that become ONNX graphs, with flat, named inputs and outputs.

    vision.onnx   pixel_values [B,3,H,W]
                    xattn:  -> cross_key_<i>, cross_value_<i> [B,Hkv,N,hd] per cross-attention layer i
                            (kv_layout "mha", the mobile-gpu decoder's MultiHeadAttention:
                            key [B,N,Hq*(hd+pad)], value [B,N,Hq*hd]; model.CrossAttention.mha_kv)
                    concat: -> image_embeds [B,N,D]
                    naive_kv (benchmark baseline): -> image_tokens [B,N,D]
    decoder.onnx  input_ids [B,T], attention_mask [B,S], past_key_<l>, past_value_<l> [B,Hkv,P,hd]
                    xattn:  + cross_key_<i>, cross_value_<i>
                    concat: + image_embeds [B,M,D] (M = N at prefill, 0 afterwards)
                    naive_kv: + image_tokens [B,N,D]
                  -> logits [B,T,V], present_key_<l>, present_value_<l> [B,Hkv,P+M+T,hd]
                    (+ xattn_probs_<i> [B,Hq,T,N] when exported with cross-attention probabilities)

attention_mask covers every key the step sees (past, then image tokens for a concat prefill,
then the new tokens; 1 = real, 0 = padding), so one graph serves prefill (an empty past) and
decode. Positions come from it (cumulative sum), as in `AgeVLM.forward`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from agevlm_edge.model import AgeVLM, attention_mask_4d


def layer_names(model: AgeVLM) -> dict[str, list[str]]:
    cfg = model.cfg
    past = [f"past_{kv}_{l}" for l in range(cfg.n_layers) for kv in ("key", "value")]
    present = [f"present_{kv}_{l}" for l in range(cfg.n_layers) for kv in ("key", "value")]
    cross = [f"cross_{kv}_{i}" for i in cfg.cross_layers for kv in ("key", "value")]
    return {"past": past, "present": present, "cross": cross,
            "probs": [f"xattn_probs_{i}" for i in cfg.cross_layers]}


class VisionGraph(nn.Module):
    """pixels -> every cross-attention layer's K/V (xattn), or projected image tokens (concat):
    the image side is computed once per image, never per generated token.

    ``naive_kv``: output the projected image tokens and leave the K/V projections to the
    decoder, which then redoes them every step (the benchmark's baseline). ``kv_layout``:
    AgeVLM.cross_kv's ("mha" for a decoder exported with impl "gqa" and no probabilities).
    """

    def __init__(self, model: AgeVLM, naive_kv: bool = False, kv_layout: str = "bhnd"):
        super().__init__()
        self.model, self.naive_kv, self.kv_layout = model, naive_kv, kv_layout

    def forward(self, pixel_values: torch.Tensor):
        img = self.model.image_tokens(pixel_values)
        if self.model.cfg.arch == "concat" or self.naive_kv:
            return img
        kv = self.model.cross_kv(img, self.kv_layout)
        return tuple(t for i in self.model.cfg.cross_layers for t in kv[str(i)])


class DecoderGraph(nn.Module):
    """One decoder step over new tokens with an explicit KV cache (see the module docstring).

    ``impl`` picks the attention path: "fused" (SDPA, which the exporter turns into the
    opset-23 Attention op), "eager" (the MatMul/Softmax chain, the unfused baseline) or
    "gqa" (self-attention as com.microsoft GroupQueryAttention, export.contrib).
    ``probs`` adds the cross-attention probabilities as outputs: at opset 23 the fused
    Attention op returns them as its softmax output; ``xattn_impl`` "eager" (opset 18, which
    has no such op) runs that cross-attention as the MatMul/Softmax chain instead.
    """

    def __init__(self, model: AgeVLM, impl: str = "fused", probs: bool = False,
                 naive_kv: bool = False, xattn_impl: str | None = None):
        super().__init__()
        self.model, self.impl, self.probs, self.naive_kv = model, impl, probs, naive_kv
        self.xattn_impl = xattn_impl
        self.n_layers = model.cfg.n_layers
        self.cross = [str(i) for i in model.cfg.cross_layers]

    def forward(self, input_ids, attention_mask, *tensors):
        m, cfg = self.model, self.model.cfg
        L = self.n_layers
        past = [(tensors[2 * l], tensors[2 * l + 1]) for l in range(L)]
        h = m.decoder.embed_tokens(input_ids)
        cross_kv = None
        if cfg.arch == "concat":
            h = torch.cat([tensors[2 * L], h], dim=1)              # image embeds (maybe 0 rows)
        elif self.naive_kv:                                          # K/V again every step
            cross_kv = m.cross_kv(tensors[2 * L])
        else:
            rest = tensors[2 * L:]
            cross_kv = {k: (rest[2 * j], rest[2 * j + 1]) for j, k in enumerate(self.cross)}
        q_len = h.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        mask = attention_mask_4d(attention_mask, q_len)
        h, presents, probs, _ = m.decoder(h, positions, mask, cross_kv, past, self.impl,
                                          self.probs, False, self.xattn_impl)
        if cfg.arch == "concat":
            h = h[:, q_len - input_ids.shape[1]:]                  # text positions only
        out = [m.lm_head(h)] + [t for kv in presents for t in kv]
        if self.probs:
            out += [probs[int(k)] for k in self.cross]
        return tuple(out)
