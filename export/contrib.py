"""com.microsoft contrib ops emitted at export (mobile-gpu; the in-place cache).

The model's self-attention in its "gqa" form is one custom op (`agevlm::gqa_rotary`,
agevlm_edge/ops.py); here it is translated into onnxruntime's `GroupQueryAttention` (rotary
fused, grouped K/V read without expansion, the KV cache appended inside the op), through the
dynamo exporter's custom translation table. Both targets emit it (cpu with `--kv-cache
inplace`, the default): when the runtime binds one buffer [B,Hkv,capacity,hd] as past and
present, onnxruntime's CPU kernel (and its WebGPU kernel, on a device buffer) writes the
step's K/V into it at slot P (seqlens_k + 1 - T) instead of copying the cache, which is what
the cpu target uses it for:

    query, key, value [B,T,H*hd]  past_key/value [B,Hkv,P,hd]  attention_bias [B,1,T,P+T]
    seqlens_k = P+T-1 per row (int32), total_sequence_length = P+T, cos/sin_cache
      -> output [B,T,Hq*hd], present_key/value [B,Hkv,P+T,hd]

(In place: past and present are one buffer [B,Hkv,C,hd], C >= P+T, its slots past P+T unread.)
Every row counts all P+T cache slots as its own; the padding mask lives in attention_bias.
On mobile-gpu its cross-attention (`agevlm::cross_mha`) becomes one `MultiHeadAttention` (scale given:
query and key carry zero padding per head, ops.XATTN_QK_PAD, which keeps the kernel off the
flash-attention path that gave wrong results for multi-token queries on WebGPU here):

    query [B,T,Hq*(hd+4)], key [B,N,Hq*(hd+4)], value [B,N,Hq*hd] -> output [B,T,Hq*hd]

Models it does not fit (`gqa_unfit`: concat, head sizes not divisible by 16) keep SDPA: opset-23
Attention on cpu, rewritten into MultiHeadAttention by export.fusion on mobile-gpu.
onnxruntime's CPU kernel refuses a multi-token step over a non-empty past at batch > 1; the
runtime never makes one (prefill starts from an empty past, decode steps are one token).
onnxscript builds ops from their ONNX schemas, and the onnx package knows no contrib schemas:
`translation_table` registers the ones these ops need (GroupQueryAttention's inputs up to
attention_bias, MultiHeadAttention's first three: the subsets the translations fill) before
the export.
"""

from __future__ import annotations

_GQA_INPUTS = [("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"),
               ("seqlens_k", "M"), ("total_sequence_length", "M"), ("cos_cache", "T"),
               ("sin_cache", "T"), ("position_ids", "P"), ("attention_bias", "T")]


def _register_schemas() -> None:
    import onnx
    from onnx.defs import OpSchema

    opt, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    types = [("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
             ("P", ["tensor(int64)"], "")]
    if not onnx.defs.has("GroupQueryAttention", "com.microsoft"):
        required = {"query", "key", "value", "seqlens_k", "total_sequence_length"}
        onnx.defs.register_schema(OpSchema(
            "GroupQueryAttention", "com.microsoft", 1,
            inputs=[OpSchema.FormalParameter(n, t, "", param_option=single if n in required else opt)
                    for n, t in _GQA_INPUTS],
            outputs=[OpSchema.FormalParameter(n, "T", "") for n in ("output", "present_key", "present_value")],
            type_constraints=types,
            attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "")
                        for a in ("num_heads", "kv_num_heads", "do_rotary")]))
    if not onnx.defs.has("MultiHeadAttention", "com.microsoft"):
        onnx.defs.register_schema(OpSchema(
            "MultiHeadAttention", "com.microsoft", 1,
            inputs=[OpSchema.FormalParameter(n, "T", "") for n in ("query", "key", "value")],
            outputs=[OpSchema.FormalParameter("output", "T", "")], type_constraints=types[:1],
            attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                        OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")]))


def _gqa_rotary(q, k, v, past_k, past_v, bias, cos_cache, sin_cache, num_heads: int, kv_heads: int):
    import onnxscript
    from onnxscript import opset18 as op

    msft = onnxscript.values.Opset("com.microsoft", 1)
    # From the bias [B,1,T,P+T], which every layer shares, so the layers share these nodes.
    total = op.Cast(op.Shape(bias, start=3, end=4), to=6)
    one = op.CastLike(op.Constant(value_ints=[1]), total)
    seqlens = op.Expand(op.Sub(total, one), op.Shape(bias, start=0, end=1))
    return msft.GroupQueryAttention(q, k, v, past_k, past_v, seqlens,
                                    op.Squeeze(total, op.Constant(value_ints=[0])),
                                    cos_cache, sin_cache, None, bias,
                                    num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1,
                                    _outputs=3)


def _cross_mha(q, k, v, num_heads: int, scale: float):
    import onnxscript

    msft = onnxscript.values.Opset("com.microsoft", 1)
    return msft.MultiHeadAttention(q, k, v, num_heads=num_heads, scale=scale)


def gqa_unfit(cfg) -> str | None:
    """Why this model's self-attention cannot be GroupQueryAttention, or None when it can."""
    if cfg.arch != "xattn":
        return "concat models pad between image and text tokens (see ops.gqa_rotary)"
    if cfg.head_dim % 16:
        return f"onnxruntime's GroupQueryAttention needs a head size divisible by 16, not {cfg.head_dim}"
    return None


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export(dynamo=True)."""
    import torch

    import agevlm_edge.ops  # noqa: F401  (registers torch.ops.agevlm.gqa_rotary, cross_mha)

    _register_schemas()
    return {torch.ops.agevlm.gqa_rotary.default: _gqa_rotary,
            torch.ops.agevlm.cross_mha.default: _cross_mha}
