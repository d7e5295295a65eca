"""AGE-VLM: config, projector, Llama decoder with interleaved gated cross-attention, and the
LLaVA-style concatenation baseline. The vision tower it builds is vision.py's (trained from
scratch) or hf_vision.py's (pretrained); hf_llama.py loads Llama checkpoints into the decoder.

    pixels [B,3,H,W] --VisionTower--> [B,N,Wv] --Projector--> img [B,N,D]
                                                                  |
    ids [B,T] -> embed -> ( LlamaLayer_i ; if i in xattn_layers: GatedXAttn_i(., img) )* -> norm -> lm_head
                       (arch="concat": img is prepended to the token embeddings instead)

Decoder state-dict keys are Hugging Face Llama's with `model.` -> `decoder.`, so pretrained
LlamaForCausalLM checkpoints (SmolLM2, TinyLlama, Llama-3.2) load unchanged (hf_llama.py);
cross-attention blocks live beside the layers (`decoder.xattn.<i>`), so they never disturb
those keys.
Image inputs are explicit forward arguments (pixels, or precomputed cross K/V), never state.
Every attention has two paths behind one function (ops.attention): "eager" (returns
probabilities, needed by the dice loss and heatmaps) and "fused" (SDPA), tested to agree; the
self-attention has a third, "gqa" (ops.gqa_rotary: onnxruntime's GroupQueryAttention, which
the mobile-gpu export emits), with the cross-attention then as ops.cross_mha (onnxruntime's
MultiHeadAttention).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import XATTN_QK_PAD, apply_rope, attention, rope_cache, rope_cos_sin
from .vision import VisionTower, cnn_plan


@dataclass
class AgeVLMConfig:
    # vision tower (built-in): a stem to one token per patch, then `vision_layers` ViT blocks
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 0
    vision_heads: int = 4
    vision_stem: str = "cnn"         # "cnn": BatchNorm CNN; "conv": light conv stem; "patch": linear
    vision_skip: bool = False        # cnn stem: append the first conv layer's activations, averaged
                                     # per patch, to every token (the colour the deep layers drop)
    # ... or a pretrained Hugging Face tower (CLIP, SigLIP, ConvNeXt; see hf_vision.py): its
    # vision config is read once from vision_hf_dir into vision_hf_config, which a RUN DIR
    # stores, so reloading never needs the dir; image_size, patch_size (the pixel stride of
    # one token) and vision_width then follow that config, replacing any value given
    vision_hf_dir: str = ""
    vision_hf_config: dict = field(default_factory=dict)
    # language model (Llama family)
    vocab_size: int = 512
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 0                # 0: d_model // n_heads
    ffn_hidden: int = 768            # a multiple of 128: int4 blocks and bnb's CPU nf4 packing
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)   # HF's llama3 rope_scaling (Llama-3.2); {}: none
    rms_eps: float = 1e-5
    max_seq_len: int = 256
    tie_embeddings: bool = True
    # fusion
    arch: str = "xattn"              # "xattn" (AGE-VLM, and the unguided `ca`) or "concat"
    xattn_every: int = 2             # cross-attention before layers 1, 1+every, ...
    xattn_layers: tuple = ()         # explicit layer indices (overrides xattn_every)
    xattn_heads: int = 0             # 0: n_heads
    xattn_kv_heads: int = 0          # 0: n_kv_heads
    xattn_null: bool = False         # a learned "nothing here" key/value after the image tokens of
                                     # every cross-attention (CrossAttention.kv)
    # special tokens (ids in the tokenizer)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        sizes = ("image_size", "patch_size", "vision_width", "vocab_size", "d_model", "n_layers",
                 "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len")
        for name in sizes + ("vision_layers", "head_dim", "xattn_heads", "xattn_kv_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (name in sizes):
                raise ValueError(f"{name} must be an integer >= {int(name in sizes)}, got {v!r}")
        self.head_dim = self.head_dim or self.d_model // self.n_heads
        self.xattn_heads = self.xattn_heads or self.n_heads
        self.xattn_kv_heads = self.xattn_kv_heads or self.n_kv_heads
        self.xattn_layers = tuple(int(i) for i in self.xattn_layers)
        if any(not 0 <= i < self.n_layers for i in self.xattn_layers):
            raise ValueError(f"xattn_layers {list(self.xattn_layers)}: each must be a decoder "
                             f"layer index in 0..{self.n_layers - 1}")
        if self.vision_hf_dir or self.vision_hf_config:
            from .hf_vision import normalize_vision_config, tower_geometry, vision_config_from_dir

            self.vision_hf_config = normalize_vision_config(self.vision_hf_config) \
                if self.vision_hf_config else vision_config_from_dir(self.vision_hf_dir)
            for name, value in tower_geometry(self.vision_hf_config).items():
                setattr(self, name, value)
        if self.arch not in ("xattn", "concat"):
            raise ValueError(f"arch must be 'xattn' or 'concat', got {self.arch!r}")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.vision_stem not in ("cnn", "conv", "patch"):
            raise ValueError(f"vision_stem must be 'cnn', 'conv' or 'patch', got {self.vision_stem!r}")
        if self.vision_stem in ("cnn", "conv") and self.patch_size not in (4, 8, 16, 32) \
                and not self.vision_hf_config:
            raise ValueError(f"the {self.vision_stem} stem needs a power-of-two patch_size in 4..32")
        if self.vision_skip and (self.vision_stem != "cnn" or self.vision_hf_config):
            raise ValueError("vision_skip needs the built-in cnn stem (vision_stem='cnn', no vision_hf_dir)")
        if self.n_heads % self.n_kv_heads or self.xattn_heads % self.xattn_kv_heads:
            raise ValueError("query heads must be a multiple of key/value heads")
        rope_keys = {"factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"}
        if self.rope_scaling and not (rope_keys <= set(self.rope_scaling) and all(
                isinstance(self.rope_scaling[k], (int, float)) and self.rope_scaling[k] > 0
                for k in rope_keys) and self.rope_scaling["high_freq_factor"]
                > self.rope_scaling["low_freq_factor"]):
            raise ValueError(f"rope_scaling must be llama3's positive {', '.join(sorted(rope_keys))} "
                             f"(high_freq_factor > low_freq_factor), got {self.rope_scaling}")

    @property
    def cross_layers(self) -> tuple[int, ...]:
        """Decoder layers preceded by a gated cross-attention block (none for concat).

        By default not before layer 0: there the queries are context-free token embeddings
        and could not use, say, a colour word to pick their object.
        """
        if self.arch == "concat":
            return ()
        if self.xattn_layers:
            return tuple(sorted(self.xattn_layers))
        return tuple(range(1, self.n_layers, self.xattn_every))

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_out_width(self) -> int:
        """Width of the tower's tokens: vision_width, plus the skip's channels with vision_skip."""
        skip = cnn_plan(self.vision_width, self.patch_size)[0][0] if self.vision_skip else 0
        return self.vision_width + skip

    @classmethod
    def from_dict(cls, d: dict) -> "AgeVLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["xattn_layers"] = list(self.xattn_layers)
        return d


# ----------------------------------------------------------------------------- presets
def _tiny(**kw) -> AgeVLMConfig:
    return AgeVLMConfig(**kw)


def _small(**kw) -> AgeVLMConfig:
    # ~SmolLM2-135M-shaped decoder, 224 px images in 16 px patches (196 image tokens), four
    # cross-attention blocks (the paper's count) and a 256-wide ViT: 154.5M parameters, of
    # which the decoder's 134.5M (the "about 100-150M"; 175M with 8 blocks and 384).
    base = dict(image_size=224, patch_size=16, vision_width=256, vision_layers=6,
                vision_heads=4, vision_stem="conv", vocab_size=49152, d_model=576, n_layers=30,
                n_heads=9, n_kv_heads=3, ffn_hidden=1536, rope_theta=100000.0, max_seq_len=2048,
                xattn_every=8, rms_eps=1e-5)
    return AgeVLMConfig(**{**base, **kw})


PRESETS = {"tiny": _tiny, "small": _small}


def build_config(preset: str = "tiny", **overrides) -> AgeVLMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset](**overrides)


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class _Projections(nn.Module):
    """The q/k/v/o projections of an attention with grouped KV heads (Llama's names, so that
    checkpoints load and exported node names follow them)."""

    def __init__(self, d: int, n_heads: int, n_kv: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv, head_dim
        self.q_proj = nn.Linear(d, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d, bias=False)


class SelfAttention(_Projections):
    def forward(self, x, cos, sin, mask, past, impl):
        """impl "gqa": cos/sin are rope_cache tables, mask an additive bias (Decoder.forward)."""
        B, T, _ = x.shape
        if impl == "gqa":
            if past is None:
                past = (x.new_zeros(B, self.n_kv, 0, self.hd),) * 2
            out, k, v = torch.ops.agevlm.gqa_rotary(self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                                    past[0], past[1], mask, cos, sin,
                                                    self.n_heads, self.n_kv)
            return self.o_proj(out), (k, v)
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)   # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)      # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out, _ = attention(q, k, v, mask, impl)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: AgeVLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, cos, sin, mask, past, impl):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, impl)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class CrossAttention(_Projections):
    """q from text hidden states, k/v from projected image tokens (no RoPE: images are sets).

    q and k are RMS-normalised per head (as in Llama-3.2-Vision's cross-attention), so the
    attention logits start at a useful scale instead of ~0 from two small projections
    (measured on oracle image features: matched-vs-shuffled caption loss gap 0.30 vs 0.21
    after 300 steps).
    """

    def __init__(self, d: int, n_heads: int, n_kv: int, head_dim: int, eps: float = 1e-5,
                 null: bool = False):
        super().__init__(d, n_heads, n_kv, head_dim)
        self.q_norm, self.k_norm = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        self.null = null
        if null:   # zeros: no random draw, so every other weight initialises as without it
            self.null_k = nn.Parameter(torch.zeros(n_kv, head_dim))
            self.null_v = nn.Parameter(torch.zeros(n_kv, head_dim))

    def kv(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B,N,D] -> k, v [B,Hkv,N,hd]: computed once per image, reused for every token.

        With ``null`` one more key/value follows the image tokens ([B,Hkv,N+1,hd]): a learned
        place for a query to put its weight when nothing in the image matches it (softmax
        weights sum to 1, so without it an absent object's query still reads the best partial
        match at full weight). The key is learned as is, not through k_norm (whose gradient at
        the zero start is 1/sqrt(eps))."""
        B, N, _ = img.shape
        k = self.k_norm(self.k_proj(img).view(B, N, self.n_kv, self.hd)).transpose(1, 2)
        v = self.v_proj(img).view(B, N, self.n_kv, self.hd).transpose(1, 2)
        if self.null:
            k = torch.cat([k, self.null_k.to(k.dtype).expand(B, -1, -1).unsqueeze(2)], dim=2)
            v = torch.cat([v, self.null_v.to(v.dtype).expand(B, -1, -1).unsqueeze(2)], dim=2)
        return k, v

    def mha_kv(self, kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B,Hkv,N,hd] -> cross_mha's key [B,N,Hq*(hd+XATTN_QK_PAD)] and value
        [B,N,Hq*hd]: expanded to the query heads, the key zero-padded per head. The mobile-gpu
        vision graph outputs this layout, so the decoder does not redo it every step."""
        rep = self.n_heads // self.n_kv
        B, _, N, _ = kv[0].shape
        # Written with Concat (stack, cat), not Expand and Pad (repeat_interleave, F.pad):
        # CoreML's MLProgram provider has no Expand or Pad (onnxruntime's usability checker),
        # and the static-shape vision graph (export.fusion.fixed_vision) is meant for it.
        flat = lambda t: torch.stack([t] * rep, dim=2).reshape(B, -1, N, t.shape[-1]) \
            .transpose(1, 2).reshape(B, N, -1)
        k = kv[0]
        return flat(torch.cat([k, k[..., :XATTN_QK_PAD] * 0], dim=-1)), flat(kv[1])

    def forward(self, x, kv, impl, need_probs):
        """impl "mha" (without probabilities): one cross_mha op, query zero-padded per head,
        over kv in mha_kv's layout (3-D; 4-D [B,Hkv,N,hd] is converted here); else
        attention()."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.hd))
        if impl == "mha" and not need_probs:
            k, v = kv if kv[0].dim() == 3 else self.mha_kv(kv)
            out = torch.ops.agevlm.cross_mha(F.pad(q, (0, XATTN_QK_PAD)).reshape(B, T, -1), k, v,
                                             self.n_heads, self.hd ** -0.5)
            return self.o_proj(out), None
        out, probs = attention(q.transpose(1, 2), kv[0], kv[1], None, impl, need_probs)
        if probs is not None and self.null:   # the maps are over the image's patches only
            probs = probs[..., :-1]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), probs


class GatedXAttnBlock(nn.Module):
    """Flamingo / Llama-3.2-Vision block; tanh gates start at 0 so the LM starts unchanged.

        x = x + tanh(attn_gate) * XAttn(norm(x), image)
        x = x + tanh(mlp_gate)  * MLP(norm(x))
    """

    def __init__(self, cfg: AgeVLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.attn = CrossAttention(cfg.d_model, cfg.xattn_heads, cfg.xattn_kv_heads, cfg.head_dim,
                                   cfg.rms_eps, cfg.xattn_null)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, kv, impl, need_probs):
        h, probs = self.attn(self.attn_norm(x), kv, impl, need_probs)
        x = x + self.attn_gate.tanh() * h
        return x + self.mlp_gate.tanh() * self.mlp(self.mlp_norm(x)), probs


class Projector(nn.Module):
    """MLP from vision width to d_model, plus a learned position per image token.

    The frozen tower is trained for image-level labels, which need no position; spatial
    captions and relation questions do, so the fusion gets its own, trained with it.
    """

    def __init__(self, w_in: int, d: int, n_tokens: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(w_in, d), nn.Linear(d, d)
        self.pos = nn.Parameter(torch.zeros(n_tokens, d))

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))) + self.pos


# ----------------------------------------------------------------------------- decoder
class Decoder(nn.Module):
    """Llama decoder with gated cross-attention blocks placed by an explicit loop."""

    def __init__(self, cfg: AgeVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.n_layers))
        self.xattn = nn.ModuleDict({str(i): GatedXAttnBlock(cfg) for i in cfg.cross_layers})
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)

    def forward(self, h, positions, mask, cross_kv, past, impl, need_probs, need_hidden,
                xattn_impl: str | None = None):
        """impl "fused" | "eager" | "gqa" (self-attention in GroupQueryAttention's form,
        gqa_rotary; cross-attention then runs "mha", MultiHeadAttention's form, over K/V in
        its 3-D layout, and "fused" (SDPA, native GQA) over [B,Hkv,N,hd] K/V).
        ``xattn_impl`` overrides the cross-attention's (an opset-18 export that wants the
        probabilities: "eager")."""
        default_xattn = impl
        if impl == "gqa":
            if self.cfg.arch == "concat":
                # Its left padding sits between the image and the text tokens: cache slots are
                # then not the real positions shifted alike for every key of a row.
                raise ValueError('attn_impl "gqa" is for arch "xattn" (concat pads mid-sequence)')
            cos, sin = rope_cache(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta,
                                  self.cfg.rope_scaling)
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(
                ~mask, torch.finfo(h.dtype).min)
            mha_layout = any(kv[0].dim() == 3 for kv in (cross_kv or {}).values())
            default_xattn = "mha" if mha_layout else "fused"
        else:
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta,
                                    self.cfg.rope_scaling)
        xattn_impl = xattn_impl or default_xattn
        presents, probs, hidden = [], {}, []
        for i, layer in enumerate(self.layers):
            if str(i) in self.xattn and cross_kv is not None:
                h, p = self.xattn[str(i)](h, cross_kv[str(i)], xattn_impl, need_probs)
                if need_probs:
                    probs[i] = p
            h, present = layer(h, cos, sin, mask, past[i] if past else None, impl)
            presents.append(present)
            if need_hidden:
                hidden.append(h)
        return self.norm(h), presents, probs, hidden


@dataclass
class VLMOutput:
    logits: torch.Tensor                                   # (B, T, vocab), text positions only
    past_key_values: list = field(default_factory=list)    # per layer (k, v) [B,Hkv,S,hd]
    xattn_probs: dict = field(default_factory=dict)        # layer -> [B,Hq,T,N] (eager only)
    hidden_states: list = field(default_factory=list)      # per layer [B,S,D] (incl. image for concat)


def attention_mask_4d(key_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """key_mask [B,S] (1 = real token) -> bool [B,1,T,S]: causal, padding-aware.

    The last T keys are the queries. A query may always see itself, so a padding query never
    has an all-masked row (its softmax would be NaN and leak through later layers).
    """
    S = key_mask.shape[1]
    q_pos = torch.arange(S - q_len, S, device=key_mask.device)[:, None]      # (T, 1)
    k_pos = torch.arange(S, device=key_mask.device)[None, :]                 # (1, S)
    causal = k_pos <= q_pos
    allowed = causal & key_mask.bool()[:, None, :]                           # (B, T, S)
    return (allowed | (k_pos == q_pos))[:, None]


class AgeVLM(nn.Module):
    def __init__(self, cfg: AgeVLMConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.vision_hf_config:   # pretrained HF tower; its weights: vision.load_pretrained(dir)
            from .hf_vision import HFVisionTower

            self.vision = HFVisionTower(cfg.vision_hf_config)
        else:
            self.vision = VisionTower(cfg)
        self.projector = Projector(cfg.vision_out_width, cfg.d_model, cfg.n_image_tokens)
        self.decoder = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.decoder.embed_tokens.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # -- image side: computed once per image ------------------------------------------
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] -> projected image tokens [B,N,D]."""
        return self.projector(self.vision(pixel_values))

    def cross_kv(self, image_tokens: torch.Tensor, layout: str = "bhnd"
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per cross-attention layer K/V; the decoder reuses them every step. layout "bhnd":
        [B,Hkv,N,hd]; "mha": CrossAttention.mha_kv's (what attn_impl "gqa" runs on)."""
        kv = {k: blk.attn.kv(image_tokens) for k, blk in self.decoder.xattn.items()}
        if layout == "mha":
            kv = {k: self.decoder.xattn[k].attn.mha_kv(t) for k, t in kv.items()}
        elif layout != "bhnd":
            raise ValueError(f'cross K/V layout {layout!r}: "bhnd" or "mha"')
        return kv

    # -- one forward for training, prefill and decode ---------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_tokens: torch.Tensor | None = None, cross_kv: dict | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: list | None = None,
                attn_impl: str = "fused", output_xattn: bool = False,
                output_hidden: bool = False) -> VLMOutput:
        """input_ids [B,T]; attention_mask [B, past+T] over text tokens (1 = real).

        Image input, any one of: pixel_values, image_tokens [B,N,D], cross_kv (xattn only).
        With past_key_values the image is already in the cache (concat) or in cross_kv.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        if pixel_values is not None and image_tokens is None and (cross_kv is None or cfg.arch == "concat"):
            image_tokens = self.image_tokens(pixel_values)
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        h = self.decoder.embed_tokens(input_ids)
        n_img = 0
        if cfg.arch == "concat":
            n_img = cfg.n_image_tokens if (past_key_values or image_tokens is not None) else 0
            if image_tokens is not None and not past_key_values:
                h = torch.cat([image_tokens, h], dim=1)               # (B, N+T, D)
        elif cross_kv is None and image_tokens is not None:
            cross_kv = self.cross_kv(image_tokens)
        text_past = past_len - n_img if past_key_values else 0    # concat's cache holds the image
        text_mask = attention_mask if attention_mask is not None else \
            torch.ones(B, text_past + T, dtype=torch.long, device=input_ids.device)
        key_mask = torch.cat([torch.ones(B, n_img, dtype=text_mask.dtype, device=h.device),
                              text_mask], dim=1) if n_img else text_mask
        q_len = h.shape[1]
        positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        mask = attention_mask_4d(key_mask, q_len)
        need_probs = output_xattn
        h, presents, probs, hidden = self.decoder(h, positions, mask, cross_kv, past_key_values,
                                                  attn_impl, need_probs, output_hidden)
        if cfg.arch == "concat" and not past_key_values and n_img:
            h = h[:, n_img:]
        return VLMOutput(self.lm_head(h), presents, probs, hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 16,
                 eos_id: int | None = None, attn_impl: str = "fused") -> torch.Tensor:
        """Greedy decoding with a KV cache; image K/V (or image tokens) computed once."""
        eos_id = self.cfg.eos_id if eos_id is None else eos_id
        img = self.image_tokens(pixel_values) if pixel_values is not None else None
        kv = self.cross_kv(img) if (img is not None and self.cfg.arch == "xattn") else None
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        out = self(input_ids, image_tokens=img, cross_kv=kv, attention_mask=mask, attn_impl=attn_impl)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = []
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.cfg.pad_id), nxt)
            new.append(nxt)
            done |= nxt == eos_id
            if done.all():
                break
            mask = torch.cat([mask, (~done).long()[:, None] | 1], dim=1)
            out = self(nxt[:, None], cross_kv=kv, attention_mask=mask,
                       past_key_values=out.past_key_values, attn_impl=attn_impl)
        return torch.stack(new, dim=1) if new else input_ids[:, :0]

    def parts(self) -> dict[str, list[nn.Module]]:
        """Parameter groups by role; training stages and freezing name these."""
        d = self.decoder
        return {"vision": [self.vision], "projector": [self.projector], "xattn": [d.xattn],
                "lm": [d.embed_tokens, d.layers, d.norm, self.lm_head]}

    def gates(self) -> list[nn.Parameter]:
        """The tanh gates of the cross-attention blocks (stages may train them at their own LR)."""
        return [p for blk in self.decoder.xattn.values() for p in (blk.attn_gate, blk.mlp_gate)]

    def num_parameters(self, part: str | None = None) -> int:
        mod = getattr(self, part) if part else self
        return sum(p.numel() for p in mod.parameters())


# ----------------------------------------------------------------------------- weights
def load_weights(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """load_state_dict(strict=False) -> (missing, unexpected); tensors whose shapes the model's
    config does not describe are a ValueError naming the first of them."""
    try:
        return model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"weights do not match config.json "
                         f"({str(e).strip().splitlines()[-1].strip()})") from None
