"""`agevlm data masks`: tiny SAM with box prompts, safe checkpoint loading, noise, exact masks.

The DATA DIR is built here by hand (a few 64x64 images with drawn shapes and exact masks), so
these tests depend on the DATA DIR contract only, not on the synthetic world generator.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agevlm_edge.data import datadir
from agevlm_edge.data.masks import (SAM_SPECS, SamSpec, build_sam_model, degrade_mask, load_sam,
                                    make_masks, parse_noise, shift_mask)
from agevlm_edge.errors import BadInput

SIZE = 64
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60)}


# ----------------------------------------------------------------------------- fixture
def _shape_mask(kind: str, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if kind == "disc":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    return (abs(xx - cx) <= r) & (abs(yy - cy) <= r)  # square


def _record(split: str, i: int, rng: np.random.Generator, root: Path) -> dict:
    """One image with 1-3 shapes; later shapes occlude earlier ones, masks stay exact."""
    image = np.full((SIZE, SIZE, 3), 235, dtype=np.uint8)
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        kind, colour = str(rng.choice(["disc", "square"])), str(rng.choice(list(COLOURS)))
        mask = _shape_mask(kind, *(int(v) for v in rng.integers(14, 50, size=2)),
                           int(rng.integers(6, 12)))
        for prev in shapes:
            prev[2] &= ~mask
        image[mask] = COLOURS[colour]
        shapes.append([kind, colour, mask])
    image_id = f"{split}-{i:06d}"
    file = f"images/{split}/{image_id}.png"
    (root / file).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / file)
    objects = [{"id": k, "class": kind, "colour": colour, "box": datadir.mask_box(mask),
                "area": int(mask.sum()), "mask": datadir.encode_mask(mask),
                "mask_source": "rendered"} for k, (kind, colour, mask) in enumerate(shapes)]
    text = f"a {objects[0]['colour']} {objects[0]['class']}."
    return {"image_id": image_id, "file": file, "width": SIZE, "height": SIZE, "split": split,
            "objects": objects,
            "captions": [{"text": text, "phrases": [{"start": 2, "end": len(text) - 1,
                                                     "objects": [0]}]}],
            "questions": [{"question": datadir.pope_question(objects[0]["class"]),
                           "answer": "yes", "type": "existence", "object": objects[0]["class"]}]}


def build_data_dir(root: Path, n: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A small DATA DIR per docs/datadir.md: PNG images, records with exact masks, dataset.json."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits = {s: [_record(s, i, rng, root) for i in range(k)]
              for s, k in (n or {"train": 3, "test": 5}).items()}
    meta = {"name": "handmade", "generator": {"seed": seed, "image_size": SIZE},
            "vocabulary": {"classes": {"disc": {"plural": "discs", "synonyms": []},
                                       "square": {"plural": "squares", "synonyms": []}},
                           "colours": list(COLOURS)}}
    datadir.write_records_and_meta(root, splits, meta)
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return build_data_dir(tmp_path / "data")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _objects(data: Path, split: str) -> dict[tuple[str, int], dict]:
    return {(r["image_id"], o["id"]): o for r in datadir.load_split(data, split)
            for o in r["objects"]}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} | \
        {str(p.relative_to(root)) + "/": "" for p in root.rglob("*") if p.is_dir()}


# ----------------------------------------------------------------------------- SAM
def test_tiny_sam_one_mask_per_grounded_object(data_dir: Path) -> None:
    text = make_masks(data_dir, sam_type="tiny", splits=["test"])
    rows = _rows(data_dir / "masks/sam_tiny/test.jsonl")
    objects = _objects(data_dir, "test")
    assert sorted((r["image_id"], r["object"]) for r in rows) == sorted(objects)
    for r in rows:
        assert datadir.decode_mask(r["mask"]).shape == (SIZE, SIZE)
        assert r["source"] == "sam:tiny" and 0 <= len(str(r["score"]))
    summary = json.loads((data_dir / "masks/sam_tiny/summary.json").read_text())
    assert summary["source"] == "sam:tiny" and summary["checkpoint"] == "random-init tiny"
    assert summary["splits"]["test"]["masks"] == len(objects)
    assert summary["quality"].startswith(
        f"mask quality sam:tiny vs rendered: mean IoU ") and f"over {len(objects)} objects (test)" \
        in summary["quality"]
    assert summary["quality"] in text
    assert not (data_dir / "masks/sam_tiny/train.jsonl").exists()

    # Same type, weights and splits: the cache answers and nothing is rewritten.
    before = _snapshot(data_dir)
    again = make_masks(data_dir, sam_type="tiny", splits=["test"])
    assert "skipped recomputation" in again and summary["quality"] in again
    assert _snapshot(data_dir) == before

    # Another split is added beside the first, which is kept.
    make_masks(data_dir, sam_type="tiny", splits=["train"])
    summary = json.loads((data_dir / "masks/sam_tiny/summary.json").read_text())
    assert set(summary["splits"]) == {"train", "test"}
    assert _rows(data_dir / "masks/sam_tiny/test.jsonl") == rows


def test_checkpoint_pth_and_safetensors_give_identical_masks(data_dir: Path,
                                                             tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    model, _ = load_sam("tiny", None, seed=3)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "tiny.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "tiny.safetensors"))

    make_masks(data_dir, sam_type="tiny", seed=3, splits=["test"])
    reference = _rows(data_dir / "masks/sam_tiny/test.jsonl")
    for ckpt in ("tiny.pth", "tiny.safetensors"):
        make_masks(data_dir, sam_type="tiny", checkpoint=tmp_path / ckpt, splits=["test"])
        summary = json.loads((data_dir / "masks/sam_tiny/summary.json").read_text())
        assert summary["checkpoint"] == str((tmp_path / ckpt).resolve())
        assert len(summary["sha256"]) == 64
        assert _rows(data_dir / "masks/sam_tiny/test.jsonl") == reference


def test_wrong_checkpoint_fails_cleanly_via_cli(data_dir: Path, tmp_path: Path) -> None:
    import torch

    other = SamSpec(32, 2, 4, (1,), image_size=256, window_size=8, prompt_embed_dim=64,
                    decoder_mlp_dim=256, decoder_num_heads=4, iou_head_hidden_dim=64)
    torch.save(build_sam_model(other).state_dict(), tmp_path / "wrong.pth")
    before = _snapshot(data_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "agevlm_edge.cli", "data", "masks", "--data", str(data_dir),
         "--sam-type", "tiny", "--sam-checkpoint", str(tmp_path / "wrong.pth")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("agevlm: error: SAM checkpoint") and "does not match" in lines[0]
    assert "image_encoder.patch_embed.proj.weight is [32, 3, 16, 16]" in lines[0]
    assert _snapshot(data_dir) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"sam_type": "vit_b"}, "needs --sam-checkpoint"),
    ({"sam_type": "vit_b", "checkpoint": "nowhere.pth"}, "SAM checkpoint not found"),
    ({"sam_type": "tiny", "checkpoint": "GARBAGE"}, "cannot read SAM checkpoint"),
    ({"checkpoint": "GARBAGE"}, "needs --sam-type"),
    ({"splits": ["nope"]}, "split 'nope' is not in"),
    ({"splits": []}, "--splits names no split"),   # `--splits ''` was every split, exit 0
    ({"noise": "dilate:2,blur:1"}, "bad token 'blur:1'"),
    ({"limit": 0}, "--limit"),
])
def test_bad_inputs_raise_one_line_and_write_nothing(data_dir: Path, tmp_path: Path,
                                                     kwargs: dict, message: str) -> None:
    if kwargs.get("checkpoint") == "GARBAGE":
        (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
        kwargs = {**kwargs, "checkpoint": tmp_path / "garbage.pth"}
    before = _snapshot(data_dir)
    with pytest.raises(BadInput, match=message) as err:
        make_masks(data_dir, **kwargs)
    assert "\n" not in str(err.value)
    assert _snapshot(data_dir) == before


def test_failure_mid_run_leaves_data_dir_as_it_was(data_dir: Path) -> None:
    make_masks(data_dir, sam_type="tiny", splits=["train"])
    (data_dir / "images/test/test-000003.png").unlink()  # fails after two test images
    before = _snapshot(data_dir)
    with pytest.raises(BadInput, match="test-000003.png .* cannot be read"):
        make_masks(data_dir, sam_type="tiny", noise="drop:0.5")
    assert _snapshot(data_dir) == before


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="data directory not found"):
        make_masks(tmp_path / "absent")


# ----------------------------------------------------------------------------- exact masks
def test_exact_masks_path_reports_counts(data_dir: Path) -> None:
    text = make_masks(data_dir)
    n_test, n_train = len(_objects(data_dir, "test")), len(_objects(data_dir, "train"))
    assert f"{n_test + n_train} rendered" in text
    assert f"test: {n_test} objects in 5 images" in text
    assert not (data_dir / "masks").exists()


def test_objects_without_masks_ask_for_sam(tmp_path: Path) -> None:
    data = build_data_dir(tmp_path / "d", {"test": 2})
    records = datadir.load_split(data, "test")
    del records[1]["objects"][0]["mask"]
    datadir.write_records_and_meta(data, {"test": records}, datadir.load_meta(data))
    with pytest.raises(BadInput, match="--sam-type"):
        make_masks(data)


# ----------------------------------------------------------------------------- noise
def _areas(path: Path) -> dict[tuple[str, int], int]:
    return {(r["image_id"], r["object"]): int(datadir.decode_mask(r["mask"]).sum())
            for r in _rows(path)}


def test_noise_ops_change_masks_as_expected(data_dir: Path) -> None:
    exact = {k: o["area"] for k, o in _objects(data_dir, "test").items()}
    out = data_dir / "masks/rendered+noise/test.jsonl"

    text = make_masks(data_dir, splits=["test"], noise="dilate:2")
    grown = _areas(out)
    assert all(grown[k] > exact[k] for k in exact if exact[k])
    assert {r["source"] for r in _rows(out)} == {"rendered+noise:dilate2"}
    assert "mask quality rendered+noise:dilate2 vs rendered: mean IoU" in text

    make_masks(data_dir, splits=["test"], noise="erode:1")
    assert all(v < exact[k] for k, v in _areas(out).items() if exact[k])

    make_masks(data_dir, splits=["test"], noise="shift:3", seed=1)
    shifted = _rows(out)
    assert all(_areas(out)[k] <= exact[k] for k in exact)  # moved, parts may leave the image
    make_masks(data_dir, splits=["test"], noise="shift:3", seed=1)
    assert _rows(out) == shifted  # deterministic for a seed
    make_masks(data_dir, splits=["test"], noise="shift:3", seed=2)
    assert _rows(out) != shifted

    text = make_masks(data_dir, splits=["test"], noise="drop:0.5")
    kept = _rows(out)
    assert len(kept) == len(exact) - round(0.5 * len(exact))
    assert f"({len(exact) - len(kept)} dropped)" in text
    summary = json.loads((data_dir / "masks/rendered+noise/summary.json").read_text())
    assert summary["splits"]["test"]["mean_iou"] == 1.0  # kept masks are untouched


def test_noise_on_sam_masks(data_dir: Path) -> None:
    text = make_masks(data_dir, sam_type="tiny", splits=["test"], noise="erode:1")
    rows = _rows(data_dir / "masks/sam_tiny+noise/test.jsonl")
    assert {r["source"] for r in rows} == {"sam:tiny+noise:erode1"}
    assert "mask quality sam:tiny+noise:erode1 vs rendered" in text
    base = {(r["image_id"], r["object"]): datadir.decode_mask(r["mask"])
            for r in _rows(data_dir / "masks/sam_tiny/test.jsonl")}
    for r in rows:  # erosion only removes pixels from the SAM mask
        m = datadir.decode_mask(r["mask"])
        assert not (m & ~base[(r["image_id"], r["object"])]).any()


def test_parse_noise() -> None:
    assert parse_noise("dilate:2, erode:1,shift:3,drop:0.1") == [
        ("dilate", 2), ("erode", 1), ("shift", 3), ("drop", 0.1)]
    for bad in ("dilate", "dilate:x", "drop:1.5", "erode:-1", "shift:2.5", "dilate:2,", "drop:nan",
                "shift:1000000000"):
        with pytest.raises(BadInput, match="bad token"):
            parse_noise(bad)


def test_shift_mask() -> None:
    m = np.zeros((5, 5), dtype=bool)
    m[0, 0] = m[2, 2] = True
    out = shift_mask(m, 1, -1)
    assert out[1, 3] and out.sum() == 1  # (2, 2) moved right and up; (0, 0) left the image
    for dx, dy in ((5, 0), (-70, 0), (0, 9), (100, -100)):   # wholly out: empty, no error
        assert not shift_mask(m, dx, dy).any()
    big = np.zeros((64, 64), dtype=bool)
    big[10:20, 10:20] = True
    rng = np.random.default_rng(0)
    assert all(degrade_mask(big, [("shift", 100)], rng).shape == big.shape for _ in range(20))


def test_erode_keeps_an_edge_the_frame_cuts() -> None:
    m = np.zeros((8, 8), dtype=bool)
    m[2:6, 0:4] = True                                     # 4x4, cut by the left edge
    out = degrade_mask(m, [("erode", 1)], np.random.default_rng(0))
    assert out[3:5, 0:3].all() and out.sum() == 6          # only the three inner sides move


def test_tiny_spec_is_small() -> None:
    spec = SAM_SPECS["tiny"]
    assert spec.image_size == 256 and spec.encoder_depth == 2
