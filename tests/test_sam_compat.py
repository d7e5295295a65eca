"""The torchvision stand-ins that let segment_anything import without torchvision."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from agevlm_edge.data.sam_compat import (batched_nms, box_area, import_segment_anything, nms,
                                         resize, to_pil_image)

_ISOLATED = """
import importlib.util, json, sys
from agevlm_edge.data.sam_compat import import_segment_anything
sam = import_segment_anything()
left = sorted(n for n in sys.modules if n.split(".")[0] == "torchvision")
spec = importlib.util.find_spec("torchvision")
import transformers
print(json.dumps({"sam": sam.__name__, "left": left, "spec": spec is not None,
                  "tv": transformers.utils.is_torchvision_available(),
                  "predictor": sam.SamPredictor.__name__}))
"""


def test_stand_ins_are_gone_after_the_import() -> None:
    """A fresh interpreter: transformers must not be led to believe torchvision exists."""
    if importlib_finds_torchvision():
        pytest.skip("a real torchvision is installed; the stand-ins are not used")
    proc = subprocess.run([sys.executable, "-c", _ISOLATED], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"sam": "segment_anything", "left": [], "spec": False, "tv": False,
                   "predictor": "SamPredictor"}


def importlib_finds_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def test_predictor_runs_on_a_tiny_sam() -> None:
    from agevlm_edge.data.masks import SAM_SPECS, build_sam_model

    torch.manual_seed(0)
    sam = import_segment_anything()
    predictor = sam.SamPredictor(build_sam_model(SAM_SPECS["tiny"]))
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    predictor.set_image(image)
    assert predictor.input_size == (192, 256)  # longest side 256, (h, w) order kept
    masks, scores, low_res = predictor.predict(box=np.array([4, 4, 40, 30]),
                                               multimask_output=True)
    assert masks.shape == (3, 48, 64) and masks.dtype == bool
    assert scores.shape == (3,) and low_res.shape == (3, 64, 64)


def test_resize_matches_pillow_bilinear() -> None:
    arr = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    img = to_pil_image(arr)
    assert np.array_equal(np.asarray(img), arr)
    out = np.asarray(resize(img, (50, 40)))  # size is (h, w), as in torchvision
    assert out.shape == (50, 40, 3)
    assert np.array_equal(out, np.asarray(Image.fromarray(arr).resize((40, 50), Image.BILINEAR)))
    assert np.asarray(resize(img, 10)).shape == (15, 10, 3)  # int: the shorter edge
    assert resize(img, (30, 20)) is img

    sam = import_segment_anything()
    resized = sam.utils.transforms.ResizeLongestSide(256).apply_image(arr)
    assert resized.shape == (256, 171, 3)


def test_to_pil_image_from_float_tensor() -> None:
    t = torch.tensor([[[0.0, 1.0]], [[0.5, 0.5]], [[1.0, 0.0]]])  # (3, 1, 2)
    assert np.asarray(to_pil_image(t)).tolist() == [[[0, 127, 255], [255, 127, 0]]]


def test_batched_nms_is_class_aware() -> None:
    boxes = torch.tensor([[0, 0, 10, 10],     # 0: class 0
                          [1, 1, 11, 11],     # 1: class 0, IoU 0.68 with 0 -> suppressed
                          [1, 1, 11, 11],     # 2: class 1, overlaps 0 but another class
                          [20, 20, 30, 30],   # 3: class 1, alone
                          [22, 20, 32, 30]],  # 4: class 1, IoU 0.67 with 3 -> suppressed
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.6])
    classes = torch.tensor([0, 0, 1, 1, 1])
    keep = batched_nms(boxes, scores, classes, 0.5)
    assert keep.dtype == torch.int64 and keep.tolist() == [3, 0, 2]  # by score, descending
    assert batched_nms(boxes, scores, classes, 0.7).tolist() == [3, 0, 1, 2, 4]
    assert nms(boxes, scores, 0.5).tolist() == [3, 0]  # one class: 2 now overlaps 0 too
    assert batched_nms(boxes[:0], scores[:0], classes[:0], 0.5).numel() == 0
    assert box_area(boxes).tolist() == [100, 100, 100, 100, 100]
