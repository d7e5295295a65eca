"""The DATA DIR contract (docs/datadir.md): reading, writing and mask encoding.

Masks are COCO RLE (pycocotools) everywhere, so synthetic, COCO and SAM masks share one
code path. A record is one image with its objects, grounded captions and questions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import BadInput
from ..fsutil import read_json, read_jsonl, require_dir, write_json_atomic, write_jsonl_atomic

SCHEMA_VERSION = 1
POPE_VARIANTS = ("random", "popular", "adversarial")


def encode_mask(mask: np.ndarray) -> dict:
    """Binary [H, W] mask -> COCO RLE with ``counts`` as a str (JSON-safe)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str counts or uncompressed list counts) -> bool [H, W]."""
    from pycocotools import mask as mask_utils

    if isinstance(rle.get("counts"), list):
        h, w = rle["size"]
        rle = mask_utils.frPyObjects(rle, h, w)
    else:
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight [x0, y0, x1, y1] box (exclusive end) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def pope_question(name: str) -> str:
    """The POPE template, with the right article."""
    article = "an" if name[0] in "aeiou" else "a"
    return f"Is there {article} {name} in the image?"


def load_meta(data_dir: str | os.PathLike) -> dict:
    data_dir = require_dir(data_dir, "data directory", "create one with `agevlm data synth`")
    meta = read_json(data_dir / "dataset.json", "dataset.json")
    version = meta.get("schema_version") if isinstance(meta, dict) else None
    if version != SCHEMA_VERSION:
        raise BadInput(f"{data_dir}/dataset.json has schema_version {version!r}, this agevlm "
                       f"reads {SCHEMA_VERSION}; regenerate the data directory")
    splits, vocab = meta.get("splits", {}), meta.get("vocabulary") or {}
    if not (isinstance(splits, dict) and all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                             for e in splits.values())
            and isinstance(vocab, dict) and isinstance(vocab.get("classes", {}), dict)):
        raise BadInput(f"{data_dir}/dataset.json is malformed (splits need a file each, "
                       "vocabulary.classes is a mapping); regenerate or re-import the DATA DIR")
    return meta


def load_split(data_dir: str | os.PathLike, split: str) -> list[dict]:
    meta = load_meta(data_dir)
    if split not in meta.get("splits", {}):
        known = ", ".join(sorted(meta.get("splits", {}))) or "none"
        raise BadInput(f"split {split!r} is not in {data_dir} (splits: {known})")
    path = Path(data_dir) / meta["splits"][split]["file"]
    records = read_jsonl(path, f"split {split}")
    for n, r in enumerate(records, 1):
        if not (isinstance(r, dict) and isinstance(r.get("objects"), list)
                and all(isinstance(r.get(k), str) for k in ("image_id", "file"))
                and all(isinstance(o, dict) and isinstance(o.get("class"), str) for o in r["objects"])
                and isinstance(r.get("questions", []), list)
                and all(isinstance(q, dict) and isinstance(q.get("question"), str)
                        and isinstance(q.get("answer"), str) for q in r.get("questions", []))):
            raise BadInput(f"split {split}: record {n} of {path} needs image_id, file, objects "
                           "(each with a class) and questions (each with a question and an answer); "
                           "regenerate or re-import the DATA DIR")
    return records


def write_split(root: Path, split: str, records: list[dict]) -> dict:
    """Write ``<split>.jsonl`` and return its entry for dataset.json."""
    write_jsonl_atomic(root / f"{split}.jsonl", records)
    return {
        "file": f"{split}.jsonl",
        "images": len(records),
        "objects": sum(len(r["objects"]) for r in records),
        "captions": sum(len(r.get("captions", [])) for r in records),
        "questions": sum(len(r.get("questions", [])) for r in records),
    }


def write_meta(root: Path, meta: dict) -> None:
    meta = {"schema_version": SCHEMA_VERSION, **meta}
    write_json_atomic(root / "dataset.json", meta)


def class_cooccurrence(records: Iterable[dict], classes: list[str]) -> np.ndarray:
    """[C, C] counts of images in which both classes appear (diagonal: images with the class)."""
    index = {c: i for i, c in enumerate(classes)}
    co = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for r in records:
        present = sorted({index[o["class"]] for o in r["objects"] if o["class"] in index})
        for i in present:
            for j in present:
                co[i, j] += 1
    return co


def write_pope_files(root: Path, files: dict[str, list[dict]], prefix: str = "pope") -> dict[str, str]:
    names = {}
    for variant, rows in files.items():
        name = f"{prefix}_{variant}.jsonl"
        write_jsonl_atomic(root / name, rows)
        names[variant] = name
    return names


def split_names(meta: dict) -> list[str]:
    return list(meta.get("splits", {}))


def as_jsonable(x: Any) -> Any:
    """numpy scalars/arrays -> plain Python for json.dumps."""
    if isinstance(x, dict):
        return {k: as_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [as_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def write_records_and_meta(root: Path, splits: dict[str, list[dict]], meta: dict) -> dict:
    entries = {name: write_split(root, name, recs) for name, recs in splits.items()}
    meta = {**meta, "splits": entries}
    write_meta(root, meta)
    return meta


__all__ = [
    "SCHEMA_VERSION", "POPE_VARIANTS", "encode_mask", "decode_mask", "mask_box", "pope_question",
    "load_meta", "load_split", "write_split", "write_meta", "class_cooccurrence",
    "write_pope_files", "write_records_and_meta", "as_jsonable", "read_jsonl", "write_json_atomic",
]
