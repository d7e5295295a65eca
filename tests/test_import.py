"""`agevlm data import`: COCO instances/captions, official POPE and LLaVA files -> DATA DIR.

Fixtures are built here: 40x32 images with drawn rectangles and the COCO/POPE/LLaVA files
that describe them, so every expected mask, box, span and answer is known exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from agevlm_edge.data import datadir
from agevlm_edge.data.importers import _rle_string_counts, import_dataset
from agevlm_edge.errors import BadInput

W, H = 40, 32
# [x0, y0, x1, y1) rectangles drawn into the images and annotated below.
DOG_A, PERSON, DOG_B = (5, 4, 15, 12), (20, 14, 26, 28), (30, 20, 38, 30)
CROWD, DOG_C = (2, 2, 30, 10), (10, 15, 20, 25)


def _rect_mask(box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _polygon(box: tuple[int, int, int, int]) -> list[list[float]]:
    x0, y0, x1, y1 = box
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (as iscrowd annotations store it): column-major run lengths."""
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": [H, W], "counts": ([0] if flat[0] else []) + counts}


def _coco_bbox(box: tuple[int, int, int, int]) -> list[int]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def _person_mask() -> np.ndarray:
    """An L shape, so a compressed RLE that decodes to a rectangle would be caught."""
    m = _rect_mask(PERSON)
    m[14:20, 23:26] = False
    return m


def _instances() -> dict:
    anns = [
        (10, 1, 18, _polygon(DOG_A), DOG_A, 0),
        (11, 1, 1, datadir.encode_mask(_person_mask()), PERSON, 0),
        (12, 1, 18, _polygon(DOG_B), DOG_B, 0),
        (13, 2, 1, _uncompressed_rle(_rect_mask(CROWD)), CROWD, 1),
        (14, 2, 18, _polygon(DOG_C), DOG_C, 0),
    ]
    return {
        "images": [{"id": i, "file_name": n, "width": W, "height": H}
                   for i, n in ((1, "000000000001.jpg"), (2, "000000000002.png"))],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 3, "name": "car", "supercategory": "vehicle"},
                       {"id": 18, "name": "dog", "supercategory": "animal"},
                       {"id": 58, "name": "hot dog", "supercategory": "food"},
                       {"id": 62, "name": "chair", "supercategory": "furniture"}],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "segmentation": s,
                         "bbox": _coco_bbox(b), "area": 1.0, "iscrowd": crowd}
                        for a, i, c, s, b, crowd in anns],
    }


def _captions() -> dict:
    return {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "width": W, "height": H},
                   {"id": 2, "file_name": "000000000002.png", "width": W, "height": H}],
        "annotations": [
            {"id": 100, "image_id": 1, "caption": "Two dogs and a man near a chair.\n"},
            {"id": 101, "image_id": 1, "caption": "A DOG beside a dogsled and a hot-dog stand."},
            {"id": 102, "image_id": 2, "caption": "People gather while a dog sleeps."},
        ],
    }


POPE_ROWS = [
    {"question_id": 1, "image": "000000000001.jpg", "text": "Is there a dog in the image?",
     "label": "yes"},
    {"question_id": 2, "image": "000000000001.jpg", "text": "Is there a chair in the image?",
     "label": "no"},
    {"question_id": 3, "image": "000000000003.jpg", "text": "Is there a car in the image?",
     "label": "no"},
    {"question_id": 4, "image": "000000000003.jpg", "text": "Is there a person in the image?",
     "label": "yes"},
]

LLAVA = [
    {"id": "000000000002", "image": "000000000002.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat animal is lying here?"},
        {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "Is it awake?"},
        {"from": "gpt", "value": "No, it is sleeping."}]},
    {"id": "x3", "image": "000000000003.jpg", "conversations": [
        {"from": "human", "value": "Describe the image.\n<image>"},
        {"from": "gpt", "value": "An empty scene."}]},
]


def _draw_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (W, H), (30, 30, 30))
    draw = ImageDraw.Draw(img)
    for box, colour in ((DOG_A, (200, 120, 40)), (DOG_B, (190, 110, 50)), (PERSON, (40, 80, 220))):
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
    img.save(folder / "000000000001.jpg", quality=95)
    gray = Image.new("L", (W, H), 10)  # not RGB: the importer must convert it
    ImageDraw.Draw(gray).rectangle([CROWD[0], CROWD[1], CROWD[2] - 1, CROWD[3] - 1], fill=200)
    ImageDraw.Draw(gray).rectangle([DOG_C[0], DOG_C[1], DOG_C[2] - 1, DOG_C[3] - 1], fill=120)
    gray.save(folder / "000000000002.png")
    Image.new("RGB", (W, H), (0, 90, 0)).save(folder / "000000000003.jpg")


def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _inputs(tmp: Path, instances=None, captions=None, pope=None, llava=None) -> dict[str, Path]:
    """Write images and every input file (the defaults above unless overridden)."""
    _draw_images(tmp / "imgs")
    pope_path = tmp / "coco_pope_random.json"  # official POPE files are JSONL named .json
    rows = POPE_ROWS if pope is None else pope
    pope_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"images": tmp / "imgs",
            "instances": _write_json(tmp / "instances_val.json",
                                     _instances() if instances is None else instances),
            "captions": _write_json(tmp / "captions_val.json",
                                    _captions() if captions is None else captions),
            "pope": pope_path,
            "llava": _write_json(tmp / "llava.json", LLAVA if llava is None else llava)}


def _read_split(out: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in datadir.load_split(out, "test")}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ----------------------------------------------------------------------------- good inputs
def test_instances_masks_boxes_images_and_built_pope(tmp_path):
    p = _inputs(tmp_path)
    out = tmp_path / "data"
    summary = import_dataset(out, p["images"], coco_instances=p["instances"])
    assert summary.startswith("imported 2 images") and "5 objects" in summary
    recs = _read_split(out)
    one, two = recs["test-1"], recs["test-2"]
    assert [o["class"] for o in one["objects"]] == ["dog", "person", "dog"]
    assert [o["id"] for o in one["objects"]] == [0, 1, 2]
    assert one["objects"][0]["box"] == [5.0, 4.0, 15.0, 12.0]  # [x, y, w, h] -> [x0, y0, x1, y1]
    assert two["objects"][0]["box"] == [2.0, 2.0, 30.0, 10.0]
    # Polygon of a rectangle: pycocotools rasterises exactly the drawn pixels.
    for obj, box in ((one["objects"][0], DOG_A), (one["objects"][2], DOG_B),
                     (two["objects"][1], DOG_C)):
        assert _iou(datadir.decode_mask(obj["mask"]), _rect_mask(box)) == pytest.approx(1.0)
    # Compressed RLE and uncompressed (iscrowd) RLE decode to exactly the annotated pixels.
    assert np.array_equal(datadir.decode_mask(one["objects"][1]["mask"]), _person_mask())
    assert np.array_equal(datadir.decode_mask(two["objects"][0]["mask"]), _rect_mask(CROWD))
    assert two["objects"][0]["crowd"] is True and "crowd" not in one["objects"][0]
    assert one["objects"][1]["area"] == int(_person_mask().sum())
    assert {o["mask_source"] for o in one["objects"]} == {"annotation"}

    assert one["file"] == "images/test/test-1.png"
    png = Image.open(out / two["file"])
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (W, H)
    gray = np.asarray(Image.open(p["images"] / "000000000002.png"))
    assert np.array_equal(np.asarray(png), np.repeat(gray[..., None], 3, axis=2))

    meta = datadir.load_meta(out)
    assert meta["name"] == "coco" and meta["pope"]["origin"] == "built"
    assert meta["generator"]["sources"][0]["sha256"] == hashlib.sha256(
        p["instances"].read_bytes()).hexdigest()
    classes = meta["vocabulary"]["classes"]
    assert sorted(classes) == ["car", "chair", "dog", "hot dog", "person"]
    assert classes["person"]["plural"] == "people" and "men" in classes["person"]["synonyms"]
    assert classes["hot dog"] == {"plural": "hot dogs", "synonyms": []}
    assert meta["stats"]["class_frequency"]["test"] == {
        "person": 2, "car": 0, "dog": 2, "hot dog": 0, "chair": 0}
    for variant in datadir.POPE_VARIANTS:
        rows = datadir.read_jsonl(out / f"pope_{variant}.jsonl")
        assert len(rows) == 8 and sum(r["label"] == "yes" for r in rows) == 4
        for r in rows:
            present = {o["class"] for o in recs[r["image_id"]]["objects"]}
            assert (r["object"] in present) == (r["label"] == "yes")
            assert (out / r["image"]).is_file()


def test_caption_phrases_point_at_words_and_instances(tmp_path):
    p = _inputs(tmp_path)
    out = tmp_path / "data"
    import_dataset(out, p["images"], coco_instances=p["instances"], coco_captions=p["captions"])
    recs = _read_split(out)
    caps = recs["test-1"]["captions"]
    assert caps[0]["text"] == "Two dogs and a man near a chair."  # trailing newline stripped
    spans = [(caps[0]["text"][ph["start"]:ph["end"]], ph["objects"]) for ph in caps[0]["phrases"]]
    # "chair" is a class but not in this image: nothing to ground it in.
    assert spans == [("dogs", [0, 2]), ("man", [1])]
    spans = [(caps[1]["text"][ph["start"]:ph["end"]], ph["objects"]) for ph in caps[1]["phrases"]]
    # Case-insensitive, whole words: "dogsled" is no dog and "hot-dog" is the class hot dog.
    assert spans == [("DOG", [0, 2])]
    cap = recs["test-2"]["captions"][0]
    spans = [(cap["text"][ph["start"]:ph["end"]], ph["objects"]) for ph in cap["phrases"]]
    assert spans == [("People", [0]), ("dog", [1])]


def test_pope_llava_and_coco_merge_by_file_name(tmp_path):
    p = _inputs(tmp_path)
    out = tmp_path / "data"
    summary = import_dataset(out, p["images"], coco_instances=p["instances"],
                             coco_captions=p["captions"], pope_files=[p["pope"]],
                             llava_json=p["llava"])
    assert "3 images" in summary and "POPE: random 4" in summary
    recs = _read_split(out)
    assert sorted(recs) == ["test-000000000003", "test-1", "test-2"]
    three = recs["test-000000000003"]
    assert three["objects"] == [] and (out / three["file"]).is_file()
    assert three["questions"] == [{"question": "Describe the image.", "answer": "An empty scene.",
                                   "type": "open"}]
    assert [(q["question"], q["answer"]) for q in recs["test-2"]["questions"]] == [
        ("What animal is lying here?", "A dog."), ("Is it awake?", "No, it is sleeping.")]
    assert len(recs["test-1"]["captions"]) == 2  # COCO records merged with their captions

    # Imported POPE is kept as given (no sets built from objects), paths point into the DATA DIR.
    assert sorted(os.listdir(out)) == ["dataset.json", "images", "pope_random.jsonl", "test.jsonl"]
    rows = datadir.read_jsonl(out / "pope_random.jsonl")
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4]
    assert sum(r["label"] == "yes" for r in rows) / len(rows) == 0.5
    assert rows[2]["image"] == three["file"] and rows[2]["image_id"] == "test-000000000003"
    assert rows[2]["object"] == "car"
    meta = datadir.load_meta(out)
    assert meta["pope"]["origin"] == "imported"
    assert [s["kind"] for s in meta["generator"]["sources"]] == [
        "coco_instances", "coco_captions", "pope", "llava"]


def test_other_split_names_ids_and_pope_folder(tmp_path):
    p = _inputs(tmp_path)
    out = tmp_path / "data"
    import_dataset(out, p["images"], pope_files=[p["pope"]], llava_json=p["llava"], split="val")
    recs = {r["image_id"]: r for r in datadir.load_split(out, "val")}
    assert sorted(recs) == ["val-000000000001", "val-000000000002", "val-000000000003"]
    meta = datadir.load_meta(out)
    assert meta["name"] == "import" and meta["pope"]["files"] == {"random": "pope/val_random.jsonl"}
    rows = datadir.read_jsonl(out / "pope" / "val_random.jsonl")
    assert rows[0]["image"] == "images/val/val-000000000001.png"


def test_same_inputs_give_identical_files(tmp_path):
    p = _inputs(tmp_path)
    for name in ("a", "b"):
        import_dataset(tmp_path / name, p["images"], coco_instances=p["instances"],
                       coco_captions=p["captions"], llava_json=p["llava"])
    first = tmp_path / "a"
    files = sorted(f.relative_to(first) for f in first.rglob("*") if f.is_file())
    assert len(files) == 8
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_compressed_rle_reader_matches_pycocotools():
    rng = np.random.default_rng(0)
    for shape in ((64, 64), (7, 300)):
        for density in (0.02, 0.5, 0.98):
            mask = rng.random(shape) < density
            rle = datadir.encode_mask(mask)
            flat = mask.flatten(order="F").astype(np.int8)
            bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
            expected = ([0] if flat[0] else []) + np.diff(bounds).tolist()
            assert _rle_string_counts(rle["counts"]) == expected


def test_usage_errors(tmp_path):
    p = _inputs(tmp_path)
    with pytest.raises(BadInput, match="no input file"):
        import_dataset(tmp_path / "o", p["images"])
    bad_name = tmp_path / "pope_answers.json"
    bad_name.write_text(p["pope"].read_text())
    with pytest.raises(BadInput, match="random, popular, adversarial"):
        import_dataset(tmp_path / "o", p["images"], pope_files=[bad_name])
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- bad inputs, CLI
def _with_annotation(**fields) -> dict:
    data = _instances()
    data["annotations"].append({"id": 17, "image_id": 1, "category_id": 18, "iscrowd": 0,
                                "bbox": [1, 1, 4, 4], **fields})
    return data


def _drop_key(key: str) -> dict:
    data = _with_annotation(segmentation=_polygon((1, 1, 5, 5)))
    del data["annotations"][-1][key]
    return data


def _truncate(p: dict[str, Path], name: str) -> None:
    path = p["images"] / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


SMALL_RLE = datadir.encode_mask(np.ones((16, 16), bool))["counts"]
BAD_CASES = {
    "odd polygon": (dict(instances=_with_annotation(segmentation=[[1, 1, 5, 1, 5, 5, 1]])),
                    None, ["annotation id 17", "odd number of coordinates"]),
    "two points": (dict(instances=_with_annotation(segmentation=[[1, 1, 5, 5]])),
                   None, ["annotation id 17", "fewer than 3"]),
    "out of range": (dict(instances=_with_annotation(segmentation=[[1, 1, 50, 1, 50, 5, 1, 5]])),
                     None, ["annotation id 17", "outside the 40x32 image"]),
    "RLE sum": (dict(instances=_with_annotation(segmentation={"size": [H, W], "counts": [10, 5]})),
                None, ["annotation id 17", "cover 15 pixels"]),
    "RLE string": (dict(instances=_with_annotation(segmentation={"size": [H, W],
                                                                 "counts": SMALL_RLE})),
                   None, ["annotation id 17", "cover 256 pixels"]),
    "RLE size": (dict(instances=_with_annotation(segmentation={"size": [3, 3], "counts": [9]})),
                 None, ["annotation id 17", "does not match"]),
    "unknown image": (dict(instances=_with_annotation(segmentation=_polygon((1, 1, 5, 5)),
                                                      image_id=999)),
                      None, ["annotation id 17", "image id 999"]),
    "missing key": (dict(instances=_drop_key("category_id")),
                    None, ["annotation id 17", "'category_id'"]),
    "caption image": (dict(captions={**_captions(), "annotations": [
        {"id": 55, "image_id": 999, "caption": "A dog."}]}), None, ["caption id 55", "999"]),
    "wrong top level": (dict(instances=[]), None, ["instances_val.json", "top level"]),
    "not JSON": (dict(), "not json", ["instances_val.json", "not valid JSON"]),
    "missing image": (dict(pope=POPE_ROWS + [{**POPE_ROWS[0], "image": "nothere.jpg"}]),
                      None, ["line 5", "nothere.jpg", "does not exist"]),
    "truncated image": (dict(), "truncate", ["image id 1", "cannot read image"]),
    "empty POPE file": (dict(pope=[]), None, ["coco_pope_random.json", "holds no questions"]),
    "llava turns": (dict(llava=[{"id": "q9", "image": "000000000003.jpg",
                                 "conversations": [{"from": "gpt", "value": "hi"}]}]),
                    None, ["entry id q9", "'human' turn"]),
}


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agevlm_edge.cli", "data", "import", *args],
                          capture_output=True, text=True, timeout=60)


def _cli_args(p: dict[str, Path], out: Path) -> list[str]:
    return ["--out", str(out), "--images", str(p["images"]), "--coco-instances",
            str(p["instances"]), "--coco-captions", str(p["captions"]), "--pope", str(p["pope"]),
            "--llava", str(p["llava"])]


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, case):
    overrides, action, expected = BAD_CASES[case]
    p = _inputs(tmp_path, **copy.deepcopy(overrides))
    if action == "not json":
        p["instances"].write_text('{"images": [', encoding="utf-8")
    elif action == "truncate":
        _truncate(p, "000000000001.jpg")
    out = tmp_path / "outs" / "data"
    res = _cli(*_cli_args(p, out))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not out.exists() and os.listdir(out.parent) == []


def test_failed_overwrite_keeps_the_old_data_dir(tmp_path):
    p = _inputs(tmp_path)
    _truncate(p, "000000000002.png")  # fails after image 1 was already written
    out = tmp_path / "outs" / "data"
    out.mkdir(parents=True)
    (out / "marker.txt").write_text("old data")
    res = _cli(*_cli_args(p, out), "--overwrite")
    assert res.returncode == 2 and "image id 2" in res.stderr
    assert os.listdir(out.parent) == ["data"] and os.listdir(out) == ["marker.txt"]
    assert (out / "marker.txt").read_text() == "old data"


def test_out_never_replaces_the_images_it_reads(tmp_path):
    p = _inputs(tmp_path)
    before = sorted(os.listdir(p["images"]))
    res = _cli(*_cli_args(p, p["images"]), "--overwrite")
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "would replace the --images folder" in lines[0]
    assert sorted(os.listdir(p["images"])) == before


def test_skip_bad_counts_by_reason(tmp_path):
    data = _instances()
    data["images"] += [{"id": 4, "file_name": "000000000004.jpg", "width": W, "height": H},
                       {"id": 5, "file_name": "missing.jpg", "width": W, "height": H}]
    data["annotations"] += [
        {"id": 17, "image_id": 1, "category_id": 18, "segmentation": [[1, 1, 5, 1, 5]],
         "bbox": [1, 1, 4, 4]},
        {"id": 18, "image_id": 999, "category_id": 18, "segmentation": _polygon((1, 1, 5, 5)),
         "bbox": [1, 1, 4, 4]},
        {"id": 19, "image_id": 2, "category_id": 1, "segmentation": {"size": [H, W],
                                                                     "counts": "zz"},
         "bbox": [1, 1, 4, 4]},
        {"id": 20, "image_id": 4, "category_id": 62, "segmentation": [[1, 1, 9, 9]],
         "bbox": [1, 1, 8, 8]},
        {"id": 21, "image_id": 5, "category_id": 62, "segmentation": _polygon((1, 1, 5, 5)),
         "bbox": [1, 1, 4, 4]},
    ]
    p = _inputs(tmp_path, instances=data,
                pope=POPE_ROWS + [{**POPE_ROWS[0], "question_id": 5, "image": "missing.jpg"}])
    Image.new("RGB", (W, H)).save(p["images"] / "000000000004.jpg")
    out = tmp_path / "data"
    summary = import_dataset(out, p["images"], coco_instances=p["instances"],
                             pope_files=[p["pope"]], skip_bad=True)
    expected = {"bad polygon": 2, "unknown image": 1, "bad RLE": 1, "missing image": 1,
                "POPE question on a skipped image": 1}
    assert datadir.load_meta(out)["import"]["skipped"] == expected
    assert "skipped 6 (POPE question on a skipped image 1, bad RLE 1, bad polygon 2" in summary
    recs = _read_split(out)
    # Every annotation of image 4 failed, but the image loads: kept, with no objects.
    assert sorted(recs) == ["test-000000000003", "test-1", "test-2", "test-4"]
    assert recs["test-4"]["objects"] == [] and len(recs["test-1"]["objects"]) == 3
    assert len(datadir.read_jsonl(out / "pope_random.jsonl")) == 4

    res = _cli(*_cli_args(p, tmp_path / "cli"), "--skip-bad")
    assert res.returncode == 0 and "skipped 6" in res.stdout, res.stderr
