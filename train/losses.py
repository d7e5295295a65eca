"""Losses: next-token cross-entropy on targets, and the SAM-guided dice loss.

Dice loss, the exact choice. For a grounded phrase p:
    a_p = mean over the chosen cross-attention layers, the heads and the phrase's tokens of the
          attention probabilities over the N image patches: a_p >= 0, sum(a_p) = 1;
    m_p = the object's mask area-downsampled to the patch grid (covered fraction per patch).
Attention is a distribution while the mask is (almost) binary with mass sum(m_p) = K patches,
so we match masses before comparing: a'_p = a_p * sum(m_p). Then the squared soft dice
(Milletari et al., V-Net)
    L_p = 1 - 2 <a'_p, m_p> / (|a'_p|^2 + |m_p|^2)
is 0 exactly when a'_p = m_p, i.e. when the phrase spreads its attention over the object's
patches in proportion to coverage and puts none elsewhere (|a'-m|^2 = |a'|^2+|m|^2-2<a',m>).
Normalising by max(a) instead would reward a single peak inside the mask and ignore the rest of
the object; comparing raw a with m would make the optimum unreachable for K > 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, per_sample: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token CE over labelled positions, and their count.

    logits [B,T,V] predict labels [B,T] shifted by one; label -100 is ignored. Sums (not means)
    so that data-parallel ranks can normalise by the global token count.

    per_sample: instead, the sum over samples of each sample's mean CE, and the number of
    samples with a label (Stage.loss_norm = "sample"): every sample weighs the same, however
    many target tokens it has. With the token mean, a one-word answer among captions is a tiny
    share of the loss: in the tiny instruct mix a colour answer is ~1% of a batch's target
    tokens although colour questions are ~10% of its samples.
    """
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    lb = labels[:, 1:]
    if not per_sample:
        loss = F.cross_entropy(lg, lb.reshape(-1), ignore_index=-100, reduction="sum")
        return loss, (lb != -100).sum()
    ce = F.cross_entropy(lg, lb.reshape(-1), ignore_index=-100, reduction="none").view(lb.shape)
    n = (lb != -100).sum(1)
    has = n > 0
    return (ce.sum(1)[has] / n[has]).sum(), has.sum()


def phrase_maps(xattn_probs: dict[int, torch.Tensor], layers: tuple, token_weights: torch.Tensor) -> torch.Tensor:
    """Attention maps of phrases: [B,P,N].

    xattn_probs: layer -> [B,H,T,N]; token_weights [B,P,T] rows sum to 1 over each phrase's
    tokens (all zero for padding phrases).
    """
    chosen = [xattn_probs[i] for i in (layers or sorted(xattn_probs))]
    a = torch.stack([p.mean(1) for p in chosen]).mean(0)                  # (B, T, N)
    return token_weights @ a                                              # (B, P, N)


def dice_loss_sum(maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor,
                  eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass-matched squared soft dice summed over valid phrases, and their count.

    maps [B,P,N] (attention, rows sum to 1), masks [B,P,N] in [0,1], valid [B,P] bool.
    A phrase whose mask is empty (an absent object, Stage.null_dice) scores its map's mass on
    the patches instead: 0 when all of its attention is on the null token (model xattn_null).
    """
    mass = masks.sum(-1, keepdim=True)
    scaled = maps * mass
    inter = (scaled * masks).sum(-1)
    denom = scaled.pow(2).sum(-1) + masks.pow(2).sum(-1)
    dice = 1 - 2 * inter / (denom + eps)
    dice = torch.where(mass.squeeze(-1) > 0, dice, maps.sum(-1))
    return (dice * valid).sum(), valid.sum()
