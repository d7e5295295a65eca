"""Import ``segment_anything`` where torchvision cannot be installed.

torchvision has no working CPU build for the pinned torch, yet ``segment_anything`` imports
four functions from it at import time (``utils/transforms.py``: resize, to_pil_image;
``automatic_mask_generator.py``: batched_nms, box_area). This module holds the whole
workaround: minimal stand-ins with torchvision's semantics, placed in ``sys.modules`` only
while ``segment_anything`` is being imported and removed right after, so that other
libraries (transformers checks ``importlib.util.find_spec("torchvision")``) never believe
torchvision is installed. segment_anything keeps its own references to the functions.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# The stand-in module names, parents first: the import system resolves
# ``from torchvision.ops.boxes import ...`` through each of them in sys.modules.
_STAND_IN_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                   "torchvision.ops", "torchvision.ops.boxes")


# ----------------------------------------------------------------------------- image functions
def to_pil_image(pic: np.ndarray | torch.Tensor) -> Image.Image:
    """HWC uint8 array (or CHW tensor, float in [0, 1] or uint8) -> PIL image, like torchvision."""
    if isinstance(pic, torch.Tensor):
        t = pic.detach().cpu()
        if t.is_floating_point():
            t = (t * 255).to(torch.uint8)  # torchvision's float -> byte conversion (no rounding)
        pic = t.permute(1, 2, 0).numpy() if t.ndim == 3 else t.numpy()
    arr = np.asarray(pic)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def resize(img: Image.Image, size: int | Sequence[int],
           interpolation: int = Image.BILINEAR) -> Image.Image:
    """torchvision's ``resize`` for PIL input: ``size`` is (h, w), bilinear by default.

    An int ``size`` matches the shorter edge and keeps the aspect ratio, as torchvision does.
    """
    if not isinstance(img, Image.Image):
        raise TypeError("this torchvision stand-in resizes PIL images only")
    w, h = img.size
    if isinstance(size, int) or len(size) == 1:
        short = size if isinstance(size, int) else size[0]
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
    else:
        new_h, new_w = int(size[0]), int(size[1])
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), interpolation)


# ----------------------------------------------------------------------------- box functions
def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of [N, 4] xyxy boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, 4] x [M, 4] xyxy boxes -> [N, M] IoU (torchvision's formula, no +1)."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # (N, M)
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of kept boxes, highest score first; IoU > threshold suppresses."""
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])  # rows and columns in score order
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold  # also marks i itself, which is already kept
    return order[torch.tensor(keep, dtype=torch.long)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Class-aware NMS: boxes only suppress boxes with the same ``idxs`` value.

    Same trick as torchvision: offset each class's boxes by a distinct amount larger than
    every coordinate, so boxes of different classes never overlap, then run one plain NMS.
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    boxes = boxes.to(torch.float64)  # the offsets must not swallow coordinate precision
    offsets = idxs.to(boxes) * (boxes.max() - boxes.min() + 1)
    shifted = boxes + offsets[:, None]
    return nms(shifted, scores, iou_threshold)


# ----------------------------------------------------------------------------- the import
def _stand_in_modules() -> dict[str, types.ModuleType]:
    mods = {}
    for name in _STAND_IN_NAMES:
        mod = types.ModuleType(name, "agevlm stand-in for torchvision (import-time only)")
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        mods[name] = mod
    fn, boxes = mods["torchvision.transforms.functional"], mods["torchvision.ops.boxes"]
    fn.resize, fn.to_pil_image = resize, to_pil_image
    boxes.batched_nms, boxes.box_area = batched_nms, box_area
    # Attribute access (torchvision.ops.boxes) must work as well as sys.modules lookups.
    mods["torchvision"].transforms, mods["torchvision"].ops = (mods["torchvision.transforms"],
                                                               mods["torchvision.ops"])
    mods["torchvision.transforms"].functional = fn
    mods["torchvision.ops"].boxes = boxes
    return mods


def _torchvision_works() -> bool:
    try:
        importlib.import_module("torchvision.transforms.functional")
        importlib.import_module("torchvision.ops.boxes")
        return True
    except Exception:  # not installed, or a build that fails to load its operators
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # drop whatever a failed import left half-initialised
        return False


def import_segment_anything() -> types.ModuleType:
    """Import and return ``segment_anything``, with torchvision stand-ins if it is missing."""
    if "segment_anything" in sys.modules or _torchvision_works():
        return importlib.import_module("segment_anything")
    mods = _stand_in_modules()
    sys.modules.update(mods)
    try:
        return importlib.import_module("segment_anything")
    finally:
        for name in mods:
            if sys.modules.get(name) is mods[name]:
                del sys.modules[name]
        importlib.invalidate_caches()


__all__ = ["import_segment_anything", "resize", "to_pil_image", "box_area", "box_iou", "nms",
           "batched_nms"]
