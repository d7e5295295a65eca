"""The built-in vision tower, trained from scratch: pixels [B,3,H,W] -> tokens [B,N,Wv].

    pixels --stem (BatchNorm CNN | light conv | linear patch)--> [B,Wv,H/p,W/p] -> [B,N,Wv]
           + position -> vision_layers x ViTBlock -> LayerNorm  (-> + first-layer skip)

model.py builds it from AgeVLMConfig's vision fields (or hf_vision.HFVisionTower when the
config names a pretrained tower, with the same contract). Its module names are the RUN DIR's
state-dict keys under `vision.` and the exported vision graph's node names.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model import AgeVLMConfig


class ViTBlock(nn.Module):
    def __init__(self, w: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(w), nn.LayerNorm(w)
        self.qkv = nn.Linear(w, 3 * w)
        self.proj = nn.Linear(w, w)
        self.mlp = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w))

    def forward(self, x):
        B, N, W = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)                 # (B, h, N, W/h)
        x = x + self.proj(out.transpose(1, 2).reshape(B, N, W))
        return x + self.mlp(self.norm2(x))


def _conv_bn(plan: list[tuple[int, int]], act: type[nn.Module]) -> list[nn.Module]:
    """3x3 conv (no bias) + BatchNorm + activation per (channels, stride) in `plan`, from RGB."""
    layers, ch = [], 3
    for out, stride in plan:
        layers += [nn.Conv2d(ch, out, 3, stride=stride, padding=1, bias=False),
                   nn.BatchNorm2d(out), act()]
        ch = out
    return layers


def _cnn_stem(w: int, patch: int) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU layers down to one w-channel cell per patch.

    For 8 px patches and w=128: 24 (/2), 48 (/2), 96, 128 (/2), 128 channels, ~30M MACs per
    64 px image. Measured on the easy world with image-level labels (batches of 128, one run
    each): class F1 0.86-0.94 after 600 steps (~100 s) and 0.978 after 1000 in the full
    recipe, where the 4-block ViT on the light conv stem reached 0.72 after 900 steps (600 s);
    a ViT block on top of this CNN did not help.
    """
    return nn.Sequential(*_conv_bn(cnn_plan(w, patch), nn.ReLU))


def cnn_plan(w: int, patch: int) -> list[tuple[int, int]]:
    """(channels, stride) of each conv layer of `_cnn_stem`."""
    n = int(math.log2(patch))
    plan = [(max(3 * w // 2 ** (n + 1), 8), 2)]
    for s in range(1, n - 1):
        c = max(3 * w // 2 ** (n + 1 - s), 8)
        plan += [(c, 2), (2 * c, 1)]
    return plan + [(w, 2), (w, 1)]


def _light_conv_stem(w: int, patch: int) -> nn.Sequential:
    """Stride-2 conv + BatchNorm + GELU stages and a 1x1 conv: the stem for ViT towers."""
    n = int(math.log2(patch))
    plan = [(w if s == n - 1 else max(w // 2 ** (n - 1 - s), 16), 2) for s in range(n)]
    return nn.Sequential(*_conv_bn(plan, nn.GELU), nn.Conv2d(w, w, 1))


class VisionTower(nn.Module):
    """Pixels [B,3,H,W] -> tokens [B,N,Wv], N = (H/patch)^2: a stem to one cell per patch,
    then `vision_layers` ViT blocks and a LayerNorm.

    Stems: "cnn" (the default, `_cnn_stem`), "conv" (`_light_conv_stem`, for ViT towers),
    "patch" (a linear patch embedding).

    `vision_skip` (cnn stem; off by default) appends to every token its patch's mean of the
    first conv layer's activations, layer-normalised. Colour can survive the deep layers of a
    tower trained for image-level labels poorly: `scripts/probe_image_path.py` reads an
    object's colour from its patch's RGB mean at 0.99 and from the first layer at 1.00, but
    from the tower's tokens at 0.48 (easy world, seed 0; 0.96 for seed 1). The skip restores
    it in the tokens (1.00) and the projected tokens (0.89), yet the cross-attention values,
    which the text reads, kept 0.30 and that run's answers stayed at chance (one run;
    docs/tiny-recipe.md), so it stays an option.
    """

    def __init__(self, cfg: AgeVLMConfig):
        super().__init__()
        w = cfg.vision_width
        if cfg.vision_stem == "cnn":
            self.stem = _cnn_stem(w, cfg.patch_size)
        elif cfg.vision_stem == "conv":
            self.stem = _light_conv_stem(w, cfg.patch_size)
        else:
            self.stem = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, cfg.n_image_tokens, w) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(w, cfg.vision_heads) for _ in range(cfg.vision_layers))
        self.norm = nn.LayerNorm(w)
        self.skip_pool = cfg.patch_size // 2 if cfg.vision_skip else 0   # the first layer has stride 2
        if cfg.vision_skip:
            self.skip_norm = nn.LayerNorm(cfg.vision_out_width - w)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.skip_pool:
            first = self.stem[:3](pixels)                              # conv, BatchNorm, ReLU
            x = self.stem[3:](first)
        else:
            x = self.stem(pixels)
        x = x.flatten(2).transpose(1, 2) + self.pos                   # (B, N, Wv)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.skip_pool:
            skip = F.avg_pool2d(first, self.skip_pool).flatten(2).transpose(1, 2)
            x = torch.cat([x, self.skip_norm(skip)], dim=-1)          # (B, N, Wv + skip)
        return x

