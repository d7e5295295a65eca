"""Masks for grounded objects: the records' exact ones, SAM (box prompts), or degraded copies.

```
records (box, exact mask) --SAM box prompt--> masks/sam_<type>/<split>.jsonl + summary.json
records' masks or SAM masks --noise ops-----> masks/<base>+noise/<split>.jsonl + summary.json
```

A grounded object is an object with a ``box``. SAM is built from segment_anything's own
modules (as ``build_sam._build_sam`` does) but its weights are loaded here, safely:
``.safetensors`` or ``torch.load(weights_only=True)``, never unpickling arbitrary objects.
Every ``masks/<source>/`` folder is built in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BadInput
from ..fsutil import (read_json, read_jsonl, sha256_file, staged_dir, write_json_atomic,
                      write_jsonl_atomic)
from ..preprocess import to_rgb
from .datadir import decode_mask, encode_mask, load_meta, load_split

EXACT_SOURCES = ("rendered", "annotation")  # mask_source values that count as ground truth
NOISE_OPS = {"dilate": int, "erode": int, "shift": int, "drop": float}
MAX_NOISE_PX = 1024
_NOISE_HELP = ("expected OP:AMOUNT[,OP:AMOUNT] with dilate:PX, erode:PX, shift:PX (whole "
               f"pixels, 0 to {MAX_NOISE_PX}) or drop:FRACTION (0 to 1), e.g. dilate:2,drop:0.1")


# ----------------------------------------------------------------------------- SAM models
@dataclass(frozen=True)
class SamSpec:
    """Flat constructor arguments of one SAM size (segment_anything's _build_sam, plus tiny)."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256


SAM_SPECS = {
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31)),
    # 256 px input -> 16x16 embedding; windowed attention then one global layer, like the
    # big ones, so every code path of the real model runs (and tests stay fast).
    "tiny": SamSpec(64, 2, 4, (1,), image_size=256, window_size=8, prompt_embed_dim=64,
                    decoder_mlp_dim=256, decoder_num_heads=4, iou_head_hidden_dim=64),
}


def build_sam_model(spec: SamSpec):
    """A randomly initialised ``segment_anything.modeling.Sam`` of the given size (eval mode)."""
    import torch

    from .sam_compat import import_segment_anything

    sam_lib = import_segment_anything()
    m = sam_lib.modeling
    embed = spec.image_size // 16  # patch 16 -> (embed, embed) image embedding
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=spec.encoder_depth, embed_dim=spec.encoder_embed_dim, img_size=spec.image_size,
            mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads, patch_size=16, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=spec.global_attn_indexes, window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim),
        prompt_encoder=m.PromptEncoder(
            embed_dim=spec.prompt_embed_dim, image_embedding_size=(embed, embed),
            input_image_size=(spec.image_size, spec.image_size), mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=spec.prompt_embed_dim,
                                            mlp_dim=spec.decoder_mlp_dim,
                                            num_heads=spec.decoder_num_heads),
            transformer_dim=spec.prompt_embed_dim, iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Tensors of a local checkpoint, without running pickled code (BadInput if unreadable)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"SAM checkpoint not found: {path}; pass a local .pth or .safetensors "
                       "file to --sam-checkpoint (nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for corrupt or unsafe files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if len(reason) > 160:            # torch's unpickling advice runs long: its first sentence
            reason = reason[:160].rsplit(". ", 1)[0].rstrip(".") + " ..."
        raise BadInput(f"cannot read SAM checkpoint {path} ({reason}); expected a state dict "
                       "saved with torch.save or a .safetensors file") from None
    for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f"SAM checkpoint {path} does not hold a state dict of tensors")
    return sd


def check_state_dict(sd: dict, model, sam_type: str, path: str | os.PathLike) -> None:
    """BadInput naming the first mismatch if ``sd`` cannot load into ``model`` (a ``sam_type``)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or wrong):
        return
    if wrong:  # the patch embedding first: its width tells which SAM size the file is
        k = min(wrong, key=lambda key: key != "image_encoder.patch_embed.proj.weight")
        first = f"{k} is {list(sd[k].shape)} there but {list(expected[k])} in {sam_type}"
    else:
        first = f"key {(missing or unexpected)[0]} is {'missing' if missing else 'unexpected'}"
    guess = _guess_type(sd)
    hint = f"; it looks like {guess}" if guess and guess != sam_type else ""
    raise BadInput(f"SAM checkpoint {path} does not match --sam-type {sam_type}: {first} "
                   f"({len(wrong)} shape mismatches, {len(missing)} missing, {len(unexpected)} "
                   f"unexpected keys){hint}; pass the --sam-type the checkpoint was made for")


def _guess_type(sd: dict) -> str | None:
    w = sd.get("image_encoder.patch_embed.proj.weight")
    width = int(w.shape[0]) if w is not None and w.ndim == 4 else None
    return next((t for t, s in SAM_SPECS.items() if s.encoder_embed_dim == width), None)


def load_sam(sam_type: str, checkpoint: str | os.PathLike | None, seed: int = 0,
             sha256: str | None = None) -> tuple:
    """(Sam model, provenance dict). ``tiny`` without a checkpoint is random init from ``seed``.

    ``sha256`` of the checkpoint, if the caller has it already (hashing vit_h takes seconds).
    """
    import torch

    _check_sam_args(sam_type, checkpoint)
    sd = load_state_dict_file(checkpoint) if checkpoint is not None else None
    torch.manual_seed(seed)  # tiny's random init is part of its provenance
    model = build_sam_model(SAM_SPECS[sam_type])
    if sd is None:
        return model, {"sam_type": sam_type, "checkpoint": "random-init tiny", "seed": seed}
    check_state_dict(sd, model, sam_type, checkpoint)
    model.load_state_dict(sd, strict=True)
    return model, {"sam_type": sam_type, "checkpoint": str(Path(checkpoint).resolve()),
                   "sha256": sha256 or sha256_file(checkpoint)}


# ----------------------------------------------------------------------------- SAM inference
def predict_box_masks(predictor, image: np.ndarray,
                      boxes: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """One box prompt per object -> (bool [N, H, W] masks at image size, [N] predicted IoU).

    Three candidate masks per box (multimask_output); the one SAM rates best is kept.
    """
    import torch

    predictor.set_image(image)
    # [x0, y0, x1, y1) pixel boxes are continuous xyxy edges already, as SAM expects.
    scaled = predictor.transform.apply_boxes(np.asarray(boxes, dtype=np.float64), image.shape[:2])
    masks, iou_pred, _ = predictor.predict_torch(
        None, None, boxes=torch.as_tensor(scaled, dtype=torch.float32), multimask_output=True)
    best = iou_pred.argmax(dim=1)  # (N,)
    rows = torch.arange(len(best))
    return masks[rows, best].numpy(), iou_pred[rows, best].numpy()


def _load_image(data_dir: Path, rec: dict) -> np.ndarray:
    from PIL import Image

    path = data_dir / rec["file"]
    try:
        with Image.open(path) as im:
            return np.asarray(to_rgb(im))
    except (FileNotFoundError, OSError) as e:
        raise BadInput(f"image {path} of record {rec.get('image_id')} cannot be read ({e}); "
                       "regenerate the data directory") from None


def _sam_split(predictor, data_dir: Path, split: str, records: list[dict], source: str,
               exact: dict) -> tuple[list[dict], dict]:
    """SAM masks of every grounded object of one split: (jsonl rows, summary entry)."""
    from tqdm import tqdm

    rows, ious, seconds = [], [], []
    for rec in tqdm(records, desc=f"{source} {split}", unit="img", file=sys.stderr, leave=False):
        objs = [o for o in rec["objects"] if o.get("box") is not None]
        if not objs:
            continue
        image = _load_image(data_dir, rec)
        t0 = time.perf_counter()
        masks, scores = predict_box_masks(predictor, image, [o["box"] for o in objs])
        seconds.append(time.perf_counter() - t0)
        for o, mask, score in zip(objs, masks, scores):
            rows.append({"image_id": rec["image_id"], "object": o["id"], "mask": encode_mask(mask),
                         "source": source, "score": round(float(score), 4)})
            ref = exact.get((rec["image_id"], o["id"]))
            if ref is not None:
                ious.append(mask_iou(mask, decode_mask(ref)))
    entry = _split_entry(records, rows, ious)
    # The median: the first image pays one-off kernel set-up, a busy machine adds outliers.
    entry["seconds_per_image"] = round(float(np.median(seconds)), 4) if seconds else None
    entry["seconds_total"] = round(float(np.sum(seconds)), 2)
    return rows, entry


# ----------------------------------------------------------------------------- noise
def parse_noise(spec: str) -> list[tuple[str, float]]:
    """'dilate:2,drop:0.1' -> [('dilate', 2), ('drop', 0.1)]; BadInput names a bad token."""
    ops = []
    for token in spec.split(","):
        name, sep, amount = token.strip().partition(":")
        kind = NOISE_OPS.get(name.strip().lower())
        try:
            value = kind(amount.strip()) if kind and sep else None
        except ValueError:
            value = None
        if value is None or not 0 <= value <= (1 if kind is float else MAX_NOISE_PX):
            raise BadInput(f"--mask-noise: bad token {token.strip()!r}; {_NOISE_HELP}")
        ops.append((name.strip().lower(), value))
    return ops


def noise_label(ops: list[tuple[str, float]]) -> str:
    """[('dilate', 2), ('drop', 0.1)] -> 'dilate2,drop0.1' (the suffix of the mask source)."""
    return ",".join(f"{name}{amount:g}" for name, amount in ops)


def shift_mask(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Move a mask by (dx, dy) pixels; what leaves the image is lost, what enters is empty."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dx) >= w or abs(dy) >= h:       # moved wholly out of the image
        return out
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _shift_offset(px: int, rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly chosen integer offset with 0 < length <= px: a random direction."""
    r = np.arange(-px, px + 1)
    dx, dy = np.meshgrid(r, r)
    ok = (dx ** 2 + dy ** 2 <= px ** 2) & ((dx != 0) | (dy != 0))
    i = rng.integers(ok.sum())
    return int(dx[ok][i]), int(dy[ok][i])


def degrade_mask(mask: np.ndarray, ops: list[tuple[str, float]],
                 rng: np.random.Generator) -> np.ndarray:
    """Apply dilate/erode/shift in the given order (drop acts on objects, not here)."""
    from scipy import ndimage

    for name, amount in ops:
        # iterations=0 would mean "until nothing changes" in scipy, hence the guards.
        if name == "dilate" and amount > 0:
            mask = ndimage.binary_dilation(mask, iterations=int(amount))
        elif name == "erode" and amount > 0:
            # The frame is not an outline: an object cut off by it keeps its edge there.
            mask = ndimage.binary_erosion(mask, iterations=int(amount), border_value=1)
        elif name == "shift" and amount > 0:
            mask = shift_mask(mask, *_shift_offset(int(amount), rng))
    return mask


def _noise_split(rows: list[dict], split: str, ops: list[tuple[str, float]], source: str,
                 seed: int, records: list[dict], exact: dict) -> tuple[list[dict], dict]:
    """Degraded copies of one split's base rows: (jsonl rows, summary entry)."""
    keep = np.ones(len(rows), dtype=bool)
    drop_rng = np.random.default_rng([seed, zlib.crc32(split.encode()), 1])
    for name, fraction in ops:
        if name == "drop":  # exactly round(fraction * n) of the remaining objects
            alive = np.flatnonzero(keep)
            keep[drop_rng.choice(alive, int(round(fraction * len(alive))), replace=False)] = False
    out, ious = [], []
    for row, kept in zip(rows, keep):
        if not kept:
            continue  # a dropped object has no line: it simply has no mask
        # One generator per object, so a subset (--limit, --splits) gets the same noise.
        key = zlib.crc32(f"{split}/{row['image_id']}/{row['object']}".encode())
        mask = degrade_mask(decode_mask(row["mask"]), ops, np.random.default_rng([seed, key]))
        out.append({**row, "mask": encode_mask(mask), "source": source})
        ref = exact.get((row["image_id"], row["object"]))
        if ref is not None:
            ious.append(mask_iou(mask, decode_mask(ref)))
    entry = _split_entry(records, out, ious)
    entry["dropped"] = int((~keep).sum())
    return out, entry


# ----------------------------------------------------------------------------- quality
def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; two empty masks agree perfectly."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _exact_masks(records: list[dict]) -> dict:
    """(image_id, object id) -> RLE, for objects whose own mask is exact.

    RLEs, not decoded masks: a COCO-sized split decoded at once would not fit in memory.
    """
    return {(r["image_id"], o["id"]): o["mask"] for r in records
            for o in r["objects"] if o.get("mask") and o.get("mask_source") in EXACT_SOURCES}


def _reference_label(records: dict[str, list[dict]]) -> str:
    found = {o.get("mask_source") for recs in records.values() for r in recs
             for o in r["objects"] if o.get("mask")}
    return "+".join(s for s in EXACT_SOURCES if s in found) or "exact masks"


def _split_entry(records: list[dict], rows: list[dict], ious: list[float]) -> dict:
    return {"images": len(records), "objects": sum(len(r["objects"]) for r in records),
            "masks": len(rows), "iou_objects": len(ious),
            "mean_iou": round(float(np.mean(ious)), 4) if ious else None}


def quality_line(source: str, reference: str, entries: dict[str, dict]) -> str:
    """'mask quality sam:tiny vs rendered: mean IoU 0.12 over 734 objects (test)'."""
    n = sum(e["iou_objects"] for e in entries.values())
    names = ", ".join(entries)
    if not n:
        return f"mask quality {source}: no exact masks to compare against ({names})"
    mean = sum(e["mean_iou"] * e["iou_objects"] for e in entries.values() if e["iou_objects"]) / n
    return f"mask quality {source} vs {reference}: mean IoU {mean:.2f} over {n} objects ({names})"


# ----------------------------------------------------------------------------- folders
def _cached(folder: Path, settings: dict, splits: list[str]) -> dict | None:
    """The folder's summary if it was made with ``settings`` and holds every split."""
    if not (folder / "summary.json").is_file():
        return None
    summary = read_json(folder / "summary.json", "mask summary")
    if summary.get("settings") == settings and set(splits) <= set(summary.get("splits", {})):
        return summary
    return None


def _write_folder(folder: Path, rows: dict[str, list[dict]], summary: dict) -> dict:
    """Stage ``folder`` whole; keep other splits of an old folder made with the same settings."""
    old_path = folder / "summary.json"
    old = read_json(old_path, "mask summary") if old_path.is_file() else {}
    carried = {s: e for s, e in old.get("splits", {}).items()
               if s not in rows and old.get("settings") == summary["settings"]}
    summary = {**summary, "splits": {**carried, **summary["splits"]}}
    summary["quality"] = quality_line(summary["source"], summary["reference"], summary["splits"])
    made_root = not folder.parent.exists()
    try:
        with staged_dir(folder, overwrite=True) as tmp:
            for split in carried:
                write_jsonl_atomic(tmp / f"{split}.jsonl", read_jsonl(folder / f"{split}.jsonl"))
            for split, split_rows in rows.items():
                write_jsonl_atomic(tmp / f"{split}.jsonl", split_rows)
            write_json_atomic(tmp / "summary.json", summary)
    except BaseException:
        if made_root:  # leave the DATA DIR as it was: no stray empty masks/
            with contextlib.suppress(OSError):
                folder.parent.rmdir()
        raise
    return summary


def _read_rows(folder: Path, splits: list[str]) -> dict[str, list[dict]]:
    return {s: read_jsonl(folder / f"{s}.jsonl", f"masks of split {s}") for s in splits}


# ----------------------------------------------------------------------------- the verbs
def _check_sam_args(sam_type: str, checkpoint: str | os.PathLike | None) -> None:
    """Cheap checks first, so a typo fails before minutes of hashing or inference."""
    if sam_type not in SAM_SPECS:
        raise BadInput(f"unknown SAM type {sam_type!r}; use one of {', '.join(SAM_SPECS)}")
    if checkpoint is None and sam_type != "tiny":
        raise BadInput(f"--sam-type {sam_type} needs --sam-checkpoint PATH (a local SAM "
                       "checkpoint, .pth or .safetensors; nothing is downloaded)")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise BadInput(f"SAM checkpoint not found: {checkpoint}; pass a local .pth or "
                       ".safetensors file to --sam-checkpoint (nothing is downloaded)")


def _sam_masks(data_dir: Path, records: dict[str, list[dict]], sam_type: str,
               checkpoint: str | os.PathLike | None, seed: int, limit: int | None,
               reference: str) -> tuple[dict[str, list[dict]], dict, str]:
    """SAM masks for every requested split, cached when nothing changed: (rows, settings, text)."""
    _check_sam_args(sam_type, checkpoint)
    source, folder = f"sam:{sam_type}", data_dir / "masks" / f"sam_{sam_type}"
    settings = {"source": source, "sam_type": sam_type, "limit": limit,
                "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
                "seed": None if checkpoint else seed}  # the seed only matters for random init
    hit = _cached(folder, settings, list(records))
    if hit is not None:
        entries = {s: hit["splits"][s] for s in records}
        text = (f"{folder} already holds {source} masks for {', '.join(records)} made with "
                "the same type, weights and limit; skipped recomputation (delete the folder "
                f"to redo it). {quality_line(source, reference, entries)}.")
        return _read_rows(folder, list(records)), settings, text
    model, provenance = load_sam(sam_type, checkpoint, seed, settings["checkpoint_sha256"])
    predictor = import_predictor()(model)
    rows, entries = {}, {}
    for split, recs in records.items():
        rows[split], entries[split] = _sam_split(predictor, data_dir, split, recs, source,
                                                 _exact_masks(recs))
    _write_folder(folder, rows, {"source": source, "reference": reference, "settings": settings,
                                 **provenance, "splits": entries})
    spi = float(np.median([e["seconds_per_image"] or 0.0 for e in entries.values()]))
    weights = provenance["checkpoint"] if checkpoint is None else \
        f"{provenance['checkpoint']} (sha256 {provenance['sha256'][:12]})"
    text = (f"wrote {folder}: {source} masks for {_counts(rows, records)}; {spi:.3f} s/image "
            f"(median); weights: {weights}. {quality_line(source, reference, entries)}.")
    return rows, settings, text


def import_predictor() -> type:
    """segment_anything's SamPredictor class (through the torchvision stand-ins if needed)."""
    from .sam_compat import import_segment_anything

    return import_segment_anything().SamPredictor


def _record_masks(records: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], str, str]:
    """The records' own masks as rows: (rows, their source label, text).

    BadInput if any object lacks a mask: only SAM can make one then.
    """
    rows, by_source = {}, Counter()
    for split, recs in records.items():
        missing = [(r["image_id"], o["id"]) for r in recs for o in r["objects"]
                   if not o.get("mask")]
        if missing:
            raise BadInput(f"{len(missing)} objects in split {split} have no mask (first: image "
                           f"{missing[0][0]} object {missing[0][1]}); compute SAM masks with "
                           "--sam-type vit_b|vit_l|vit_h --sam-checkpoint PATH")
        rows[split] = [{"image_id": r["image_id"], "object": o["id"], "mask": o["mask"],
                        "source": o.get("mask_source", "unknown"), "score": 1.0}
                       for r in recs for o in r["objects"]]
        by_source.update(row["source"] for row in rows[split])
    label = "+".join(sorted(by_source)) or "records"
    kinds = ", ".join(f"{n} {s}" for s, n in sorted(by_source.items())) or "no objects"
    text = (f"using the records' own masks ({kinds}) for {_counts(rows, records)}; no SAM "
            "masks computed (pass --sam-type and --sam-checkpoint for SAM masks).")
    return rows, label, text


def _noise_masks(data_dir: Path, records: dict[str, list[dict]], base: dict[str, list[dict]],
                 base_settings: dict, ops: list[tuple[str, float]], seed: int,
                 reference: str) -> str:
    """Degrade the base masks into ``masks/<base>+noise/``; returns the summary text."""
    base_source = base_settings["source"]
    source = f"{base_source}+noise:{noise_label(ops)}"
    folder = data_dir / "masks" / f"{base_source.replace(':', '_')}+noise"
    settings = {"source": source, "base": base_settings, "noise": noise_label(ops), "seed": seed}
    rows, entries = {}, {}
    for split, recs in records.items():
        rows[split], entries[split] = _noise_split(base[split], split, ops, source, seed, recs,
                                                   _exact_masks(recs))
    _write_folder(folder, rows, {"source": source, "reference": reference, "settings": settings,
                                 "splits": entries})
    dropped = sum(e["dropped"] for e in entries.values())
    return (f"wrote {folder}: {source} masks for {_counts(rows, records)} ({dropped} dropped). "
            f"{quality_line(source, reference, entries)}.")


def _counts(rows: dict[str, list[dict]], records: dict[str, list[dict]]) -> str:
    return "; ".join(f"{s}: {len(rows[s])} objects in {len(records[s])} images" for s in records)


def make_masks(data_dir: str | os.PathLike, *, sam_type: str | None = None,
               checkpoint: str | os.PathLike | None = None, splits: Sequence[str] | None = None,
               noise: str | None = None, limit: int | None = None, seed: int = 0) -> str:
    """Attach masks to the grounded objects of a DATA DIR; returns a one-paragraph summary.

    ``sam_type`` runs SAM with one box prompt per object into ``masks/sam_<type>/``; without
    it the records' own (exact) masks are used. ``noise`` degrades whichever base was chosen
    into ``masks/<base>+noise/``. Bad input raises BadInput before anything is written.
    """
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    if splits is not None and not splits:
        raise BadInput("--splits names no split: give e.g. train,test, or leave it out for all")
    names = list(dict.fromkeys(splits)) if splits else list(meta.get("splits", {}))
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1 (got {limit})")
    records = {s: load_split(data_dir, s)[:limit] for s in names}  # BadInput on unknown split
    ops = parse_noise(noise) if noise else None
    if checkpoint is not None and sam_type is None:
        raise BadInput("--sam-checkpoint needs --sam-type (vit_b, vit_l, vit_h or tiny)")
    reference = _reference_label(records)
    if sam_type:
        base, base_settings, text = _sam_masks(data_dir, records, sam_type, checkpoint, seed,
                                               limit, reference)
    else:
        base, label, text = _record_masks(records)
        base_settings = {"source": label, "limit": limit}
    if ops:
        text += " " + _noise_masks(data_dir, records, base, base_settings, ops, seed, reference)
    return text


__all__ = ["make_masks", "SamSpec", "SAM_SPECS", "build_sam_model", "load_sam",
           "load_state_dict_file", "check_state_dict", "predict_box_masks", "parse_noise",
           "degrade_mask", "shift_mask", "mask_iou", "quality_line"]
