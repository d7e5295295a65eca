"""Cross-attention heatmaps as one PNG (Pillow only): the image, then one panel per object word.

Each panel overlays the word's cross-attention map (upsampled bilinearly from the patch
grid, scaled to its own maximum) on the image in a blue-to-red colour ramp.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from ..fsutil import write_bytes_atomic

PANEL = 192


def _ramp(x: np.ndarray) -> np.ndarray:
    """[0,1] -> RGB uint8 (blue, cyan, yellow, red)."""
    stops = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [230, 0, 0]], np.float64)
    pos = np.clip(x, 0, 1) * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def render(image_chw: np.ndarray, panels: list[tuple[str, np.ndarray]], alpha: float = 0.55) -> Image.Image:
    base = Image.fromarray(np.asarray(image_chw).transpose(1, 2, 0)).resize((PANEL, PANEL), Image.Resampling.NEAREST)
    sheet = Image.new("RGB", (PANEL * (1 + len(panels)), PANEL + 18), "white")
    draw = ImageDraw.Draw(sheet)
    sheet.paste(base, (0, 18))
    draw.text((4, 3), "image", fill="black")
    for k, (word, m) in enumerate(panels, start=1):
        m = np.nan_to_num(np.asarray(m, np.float64))
        m = m / m.max() if m.max() > 0 else m
        up = Image.fromarray((m * 255).astype(np.uint8)).resize((PANEL, PANEL), Image.Resampling.BILINEAR)
        heat = Image.fromarray(_ramp(np.asarray(up, np.float64) / 255.0))
        sheet.paste(Image.blend(base, heat, alpha), (PANEL * k, 18))
        draw.text((PANEL * k + 4, 3), word, fill="black")
    return sheet


def word_maps(tokenizer, ids: list[int], maps: list[np.ndarray], object_words: list[str]
              ) -> list[tuple[str, np.ndarray]]:
    """Group generated tokens into words; keep object words (all words if none are known),
    each with the mean map of its tokens. A token's text is what it adds to the decoded
    prefix: decoded alone, a SentencePiece-style token (Metaspace: Llama-2, TinyLlama) loses
    the space that starts its word."""
    words: list[tuple[str, list[int]]] = []
    prev = ""
    for i, tok in enumerate(ids):
        cur = tokenizer.decode(ids[:i + 1])
        piece = cur[len(prev):] if cur.startswith(prev) else tokenizer.decode([tok])
        prev = cur
        if not words or piece.startswith(" ") or not piece.strip():
            words.append((piece.strip(), [i]))
        else:
            words[-1] = (words[-1][0] + piece, words[-1][1] + [i])
    vocab = {w.lower() for w in object_words}
    out = []
    for w, idx in words:
        clean = w.strip(".,;:!?").lower()
        if clean and (clean in vocab if vocab else clean.isalpha() and len(clean) > 2):
            out.append((clean, np.mean([maps[i] for i in idx if i < len(maps)], axis=0)))
    return out


def save_heatmap(path: str | os.PathLike, image_chw: np.ndarray, panels: list[tuple[str, np.ndarray]]) -> None:
    import io

    buf = io.BytesIO()
    render(image_chw, panels).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
