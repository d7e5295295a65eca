"""One nn.Module per stage kind that returns loss *sums* and counts for a batch.

Wrapping the whole step in a module lets DistributedDataParallel see every trainable
parameter inside one forward, and returning sums lets ranks normalise by global counts, so a
2-process run computes exactly the single-process loss of the same global batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from agevlm_edge.model import AgeVLM

from .losses import dice_loss_sum, lm_loss_sum, phrase_maps


class VisionHead(nn.Module):
    """Image-level labels from token logits pooled by log-sum-exp (a smooth max).

    Only image-level labels are used (no masks), so grounding is not taught to any variant
    here; the smooth max still lets each label be carried by the tokens where it is visible.
    """

    def __init__(self, width: int, n_labels: int):
        super().__init__()
        self.fc = nn.Linear(width, n_labels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:          # (B, N, W) -> (B, L)
        logits = self.fc(tokens)                                        # (B, N, L)
        return torch.logsumexp(logits, dim=1) - torch.log(torch.tensor(float(tokens.shape[1])))


class VisionStep(nn.Module):
    """Multi-label BCE with positives up-weighted by their rarity (capped at 10x).

    Labels are sparse (about 2.5 of the 14 classes and of the 8 colours per image):
    unweighted, the tower sat at the all-negative solution for hundreds of steps (val F1 0.0
    after 400 steps); weighted, it learns from the start (F1 0.6 after 600 steps).
    """

    def __init__(self, model: AgeVLM, head: VisionHead, pos_weight: torch.Tensor):
        super().__init__()
        self.vision, self.head = model.vision, head
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor,
                token_labels: torch.Tensor | None = None) -> dict:
        """labels [B,L] image-level; token_labels [B,N,L] (mask-supervised ablation only) add a
        per-token BCE on the head's token logits, weighted like the image-level one."""
        tokens = self.vision(pixels)
        # a head with count columns (Stage.count_labels) trained by a stage without them: the
        # stage's labels are the first columns
        logits = self.head(tokens)[:, :labels.shape[1]]
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum",
                                                  pos_weight=self.pos_weight) / labels.shape[1]
        if token_labels is not None:   # per class and colour; no per-token count labels
            L = token_labels.shape[-1]
            per_token = F.binary_cross_entropy_with_logits(
                self.head.fc(tokens)[..., :L], token_labels.float(), reduction="sum",
                pos_weight=self.pos_weight[:L])
            loss = loss + per_token / (labels.shape[1] * tokens.shape[1])
        return {"loss_sum": loss, "count": torch.tensor(labels.shape[0]), "logits": logits.detach()}


def _sum_parts(parts: list[dict]) -> dict:
    """Loss sums and counts of the length buckets of one batch, added up (exact: every loss
    here is a per-sample sum, so splitting a batch changes no value, only the padding)."""
    return {k: sum(p[k] for p in parts) for k in parts[0]}


class LMStep(nn.Module):
    """Next-token loss sums over the length buckets of one batch (batches.length_buckets)."""

    def __init__(self, model: AgeVLM, per_sample: bool = False):
        super().__init__()
        self.model, self.per_sample = model, per_sample

    def forward(self, batches: list[dict]) -> dict:
        parts = []
        for batch in batches:
            out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"])
            s, n = lm_loss_sum(out.logits, batch["labels"], self.per_sample)
            parts.append({"lm_sum": s, "lm_count": n})
        return _sum_parts(parts)


class VLMStep(nn.Module):
    """Projector (+ cross-attention or concatenation) on cached frozen vision features."""

    def __init__(self, model: AgeVLM, dice_layers: tuple = (), per_sample: bool = False):
        super().__init__()
        self.model, self.dice_layers, self.per_sample = model, dice_layers, per_sample

    def forward(self, buckets: list[tuple[torch.Tensor, dict]], with_dice: bool) -> dict:
        """buckets: (vision features [b,N,Wv], collated batch) per length bucket."""
        parts = []
        for feats, batch in buckets:
            img = self.model.projector(feats)
            out = self.model(batch["input_ids"], image_tokens=img, attention_mask=batch["attention_mask"],
                             attn_impl="eager" if with_dice else "fused", output_xattn=with_dice)
            s, n = lm_loss_sum(out.logits, batch["labels"], self.per_sample)
            res = {"lm_sum": s, "lm_count": n}
            if with_dice:
                maps = phrase_maps(out.xattn_probs, self.dice_layers, batch["phrase_weights"])
                res["dice_sum"], res["dice_count"] = dice_loss_sum(maps, batch["phrase_masks"],
                                                                   batch["phrase_valid"])
            parts.append(res)
        return _sum_parts(parts)
