"""Import real-format data into a DATA DIR (docs/datadir.md).

Sources, all optional but at least one, naming images in one ``--images`` directory:

  COCO instances_*.json  -> objects: class, box [x0, y0, x1, y1), area, mask (COCO RLE)
  COCO captions_*.json   -> captions with phrases grounded by category names/synonyms/plurals
  official POPE files    -> pope_<variant>.jsonl (image paths rewritten to the DATA DIR)
  LLaVA conversations    -> questions of type "open"

Records are merged by image file name; each image is re-encoded as RGB PNG. Malformed input
raises ``BadInput`` with one line naming the file and the record, or with ``skip_bad`` the
record is skipped and counted by reason. The whole DATA DIR is built in a staged directory.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..errors import BadInput
from ..fsutil import check_out, read_json, sha256_file, staged_dir
from ..preprocess import DECODE_ERRORS, to_rgb
from . import datadir
from .pope import build_pope
from .vocab import coco_vocabulary, grounded_phrases, term_matcher

SKIP_HINT = "fix it or pass --skip-bad"
# Annotators' clicks on the image border sometimes land a fraction of a pixel outside it.
POLYGON_TOLERANCE = 1.0
POPE_SEED = 0


class _Bad(Exception):
    """One malformed record; ``reason`` is the short key counted under --skip-bad."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        # The CLI prints one line: no newline may come from a value or a library message.
        self.detail = " ".join(str(detail).split())


@dataclass
class _Import:
    """Everything read so far: records keyed by image file name, POPE rows, skip counts."""

    images: Path
    split: str
    skip_bad: bool
    records: dict[str, dict] = field(default_factory=dict)
    refs: dict[str, tuple[Path, str]] = field(default_factory=dict)  # name -> first referrer
    image_ids: set[str] = field(default_factory=set)
    pope: dict[str, list[tuple[str, dict]]] = field(default_factory=dict)  # variant -> rows
    skipped: Counter = field(default_factory=Counter)

    def reject(self, source: Path, where: str, err: _Bad) -> None:
        """Raise the one-line error, or count the record as skipped under --skip-bad."""
        if not self.skip_bad:
            raise BadInput(f"{source} {where}: {err.detail}; {SKIP_HINT}")
        self.skipped[err.reason] += 1

    def record(self, name: Any, source: Path, where: str, coco_id: int | None = None) -> dict:
        """The record of image file ``name``, created on first reference."""
        name = _image_name(name)
        if name in self.records:
            return self.records[name]
        stem = str(coco_id) if coco_id is not None else re.sub(
            r"[^\w.-]", "_", str(PurePosixPath(name).with_suffix("")))
        image_id = f"{self.split}-{stem}"
        if image_id in self.image_ids:
            raise _Bad("duplicate image id", f"image {name!r} would get image_id {image_id!r}, "
                       "which another image already has")
        self.records[name] = {
            "image_id": image_id, "file": f"images/{self.split}/{image_id}.png",
            "width": None, "height": None, "split": self.split,
            "objects": [], "captions": [], "questions": []}
        self.refs[name] = (source, where)
        self.image_ids.add(image_id)
        return self.records[name]


# ----------------------------------------------------------------------------- public entry
def import_dataset(out: str | os.PathLike, images: str | os.PathLike, *,
                   coco_instances: str | os.PathLike | None = None,
                   coco_captions: str | os.PathLike | None = None,
                   pope_files: Sequence[str | os.PathLike] = (),
                   llava_json: str | os.PathLike | None = None, split: str = "test",
                   skip_bad: bool = False, overwrite: bool = False) -> str:
    """Build the DATA DIR ``out`` from COCO / POPE / LLaVA files; return a one-line summary."""
    sources = _check_inputs(images, split, coco_instances, coco_captions, pope_files, llava_json)
    named = [("--images folder", images)] + [(f"--{k.replace('_', '-')} file", v) for k, v in (
        ("coco_instances", coco_instances), ("coco_captions", coco_captions),
        ("llava", llava_json)) if v] + [("--pope file", p) for p in pope_files]
    check_out(out, named, overwrite)
    imp = _Import(Path(images), split, skip_bad)
    with staged_dir(out, overwrite) as root:
        classes = _load_instances(imp, Path(coco_instances)) if coco_instances else []
        vocab = coco_vocabulary(classes)
        if coco_captions:
            _load_captions(imp, Path(coco_captions), term_matcher(vocab))
        for path in map(Path, pope_files):
            _load_pope(imp, path)
        if llava_json:
            _load_llava(imp, Path(llava_json))
        _write_images(imp, root)
        records = list(imp.records.values())
        pope_meta = _write_pope(imp, root, records, classes)
        meta = _meta(imp, sources, vocab, classes, records, pope_meta)
        meta = datadir.write_records_and_meta(root, {split: records}, meta)
    return _summary(out, meta, imp)


def _check_inputs(images: Any, split: str, instances: Any, captions: Any,
                  pope_files: Sequence[Any], llava: Any) -> list[dict]:
    """Fail early on usage errors; return the generator's list of sources with sha256."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise BadInput(f"--split {split!r} must be letters, digits, '-' or '_'")
    if not Path(images).is_dir():
        raise BadInput(f"--images {images} is not a directory; pass the folder holding the images")
    given = [("coco_instances", instances), ("coco_captions", captions),
             *(("pope", p) for p in pope_files), ("llava", llava)]
    given = [(kind, Path(p)) for kind, p in given if p]
    if not given:
        raise BadInput("no input file given; pass --coco-instances, --coco-captions, --pope "
                       "or --llava")
    for kind, path in given:
        if not path.is_file():
            raise BadInput(f"{kind.replace('_', '-')} file not found: {path}")
    return [{"kind": kind, "file": str(path), "sha256": sha256_file(path)} for kind, path in given]


# ----------------------------------------------------------------------------- field checks
def _get(obj: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """obj[key] of the expected type; a missing key or wrong type is one bad record."""
    if not isinstance(obj, dict):
        raise _Bad("not an object", f"is {_short(obj)}, not a JSON object")
    if key not in obj:
        raise _Bad("missing key", f"has no {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool is not kind):
        raise _Bad("wrong type", f"{key!r} is {_short(value)}, expected {what}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value)  # values come from JSON, so they always serialise
    return text if len(text) <= 40 else text[:37] + "..."


def _where(kind: str, obj: Any, index: int) -> str:
    """'annotation id 17' when the record has an id, else 'annotation #3' (0-based index)."""
    if isinstance(obj, dict) and isinstance(obj.get("id"), (int, str)):
        return f"{kind} id {obj['id']}"
    return f"{kind} #{index}"


def _image_name(name: Any) -> str:
    """A relative path inside --images; absolute paths and '..' would escape it."""
    if not isinstance(name, str) or not name.strip():
        raise _Bad("bad image name", f"image name {_short(name)} is not a file name")
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise _Bad("bad image name", f"image name {name!r} must be relative to --images")
    return path.as_posix()


def _top_level(path: Path, what: str, data: Any, lists: Sequence[str]) -> None:
    """Wrong top-level shape is a file-level error: no record could be read."""
    if not isinstance(data, dict):
        raise BadInput(f"{path}: top level is a JSON {type(data).__name__}, expected an object "
                       f"with {', '.join(map(repr, lists))} lists; pass a COCO {what} file")
    for key in lists:
        if not isinstance(data.get(key), list):
            raise BadInput(f"{path}: has no {key!r} list; pass a COCO {what} file")


# ----------------------------------------------------------------------------- COCO
def _coco_images(imp: _Import, path: Path, data: dict) -> dict[int, dict]:
    """COCO image id -> record, for the images of one COCO file."""
    by_id: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        where = _where("image", img, i)
        try:
            coco_id = _get(img, "id", int, "an integer")
            name = _get(img, "file_name", str, "a file name")
            w, h = (_get(img, k, int, "a positive integer") for k in ("width", "height"))
            if coco_id in by_id or w <= 0 or h <= 0:
                raise _Bad("bad image entry", "is listed twice" if coco_id in by_id
                           else f"has size {w}x{h}")
            rec = imp.record(name, path, where, coco_id)
            if rec["width"] is not None and (rec["width"], rec["height"]) != (w, h):
                raise _Bad("bad image entry", f"says {w}x{h}, another file says "
                           f"{rec['width']}x{rec['height']}")
            rec["width"], rec["height"] = w, h
            by_id[coco_id] = rec
        except _Bad as err:
            imp.reject(path, where, err)
    return by_id


def _categories(imp: _Import, path: Path, data: dict) -> dict[int, str]:
    """COCO category id -> name, in the file's order."""
    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        try:
            cat_id = _get(cat, "id", int, "an integer")
            name = _get(cat, "name", str, "a name").strip()
            if cat_id in cats or not name or name in cats.values():
                raise _Bad("bad category", "is listed twice" if cat_id in cats
                           else f"name {name!r} is empty or used twice")
            cats[cat_id] = name
        except _Bad as err:
            imp.reject(path, _where("category", cat, i), err)
    return cats


def _load_instances(imp: _Import, path: Path) -> list[str]:
    """Read a COCO instances file into records; return the class names (category order)."""
    data = read_json(path, "COCO instances file")
    _top_level(path, "instances", data, ("images", "annotations", "categories"))
    cats = _categories(imp, path, data)
    by_id = _coco_images(imp, path, data)
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id = _get(ann, "image_id", int, "an integer")
            cat_id = _get(ann, "category_id", int, "an integer")
            if image_id not in by_id:
                raise _Bad("unknown image", f"names image id {image_id}, which is not in 'images'")
            if cat_id not in cats:
                raise _Bad("unknown category", f"names category id {cat_id}, "
                           "which is not in 'categories'")
            rec = by_id[image_id]
            obj = _coco_object(ann, cats[cat_id], rec["height"], rec["width"])
            rec["objects"].append({"id": len(rec["objects"]), **obj})
        except _Bad as err:
            imp.reject(path, _where("annotation", ann, i), err)
    return list(cats.values())


def _coco_object(ann: dict, name: str, h: int, w: int) -> dict:
    """One COCO annotation -> a DATA DIR object (without its per-image ``id``)."""
    seg = _get(ann, "segmentation", (list, dict), "a polygon list or an RLE object")
    rle = _rle_mask(seg, h, w) if isinstance(seg, dict) else _polygon_mask(seg, h, w)
    bbox = _get(ann, "bbox", list, "[x, y, width, height]")
    if len(bbox) != 4 or not all(_is_number(v) for v in bbox) or min(bbox[2:]) < 0:
        raise _Bad("bad box", f"bbox {_short(bbox)} is not [x, y, width, height]")
    x, y, bw, bh = (float(v) for v in bbox)
    obj = {"class": name, "box": [x, y, x + bw, y + bh],
           # Pixel count of the stored mask (COCO's polygon area differs slightly), so area
           # means the same as in synthetic records.
           "area": int(mask_utils.area(rle)),
           "mask": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
           "mask_source": "annotation"}
    if "id" in ann:
        obj["coco_id"] = ann["id"]
    if ann.get("iscrowd") in (1, True):
        obj["crowd"] = True  # one region over many instances: not one object's outline
    return obj


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _polygon_mask(polygons: list, h: int, w: int) -> dict:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] -> one compressed RLE (pycocotools)."""
    if not polygons:
        raise _Bad("bad polygon", "segmentation is an empty polygon list")
    for k, poly in enumerate(polygons):
        if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
            raise _Bad("bad polygon", f"polygon {k} is not a list of numbers")
        if len(poly) % 2:
            raise _Bad("bad polygon", f"polygon {k} has an odd number of coordinates "
                       f"({len(poly)})")
        if len(poly) < 6:
            raise _Bad("bad polygon", f"polygon {k} has {len(poly) // 2} points, fewer than 3")
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        t = POLYGON_TOLERANCE
        if (xy < -t).any() or (xy[:, 0] > w + t).any() or (xy[:, 1] > h + t).any():
            raise _Bad("bad polygon", f"polygon {k} has points outside the {w}x{h} image")
    # Every polygon has >= 6 numbers, so pycocotools never mistakes one for a 4-number bbox.
    return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))


def _rle_mask(rle: dict, h: int, w: int) -> dict:
    """COCO RLE (compressed string or uncompressed list counts) -> compressed RLE."""
    size = _get(rle, "size", list, "[height, width]")
    if size != [h, w]:
        raise _Bad("bad RLE", f"RLE size {_short(size)} does not match the image [{h}, {w}]")
    counts = _get(rle, "counts", (list, str), "a list of run lengths or an RLE string")
    if isinstance(counts, str):
        counts = _rle_string_counts(counts)
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise _Bad("bad RLE", "RLE counts are not all non-negative integers")
    # pycocotools only checks for too many pixels; too few would leave pixels undefined.
    if sum(counts) != h * w:
        raise _Bad("bad RLE", f"RLE counts cover {sum(counts)} pixels, the image has {h * w}")
    return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)


def _rle_string_counts(text: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the inverse of pycocotools' rleToString).

    pycocotools decodes any string without checking its total, so the runs are read here
    to be checked before the library sees them.
    """
    counts: list[int] = []
    x = k = 0
    for ch in text:
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise _Bad("bad RLE", f"RLE string has the invalid character {ch!r}")
        x |= (c & 0x1F) << (5 * k)  # 5 value bits per char, bit 0x20 = "more chars follow"
        k += 1
        if c & 0x20:
            continue
        if c & 0x10:
            x -= 1 << (5 * k)  # sign bit of the last 5-bit group
        counts.append(x + (counts[-2] if len(counts) > 2 else 0))  # runs after the 3rd are deltas
        x = k = 0
    if k:
        raise _Bad("bad RLE", "RLE string ends in the middle of a number")
    return counts


# ----------------------------------------------------------------------------- captions
def _load_captions(imp: _Import, path: Path,
                   matcher: tuple[re.Pattern, dict[str, str]] | None) -> None:
    """Read a COCO captions file; ground each caption's class words in the image's objects."""
    data = read_json(path, "COCO captions file")
    _top_level(path, "captions", data, ("images", "annotations"))
    by_id = _coco_images(imp, path, data)
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id = _get(ann, "image_id", int, "an integer")
            text = _get(ann, "caption", str, "a string").strip()
            if image_id not in by_id:
                raise _Bad("unknown image", f"names image id {image_id}, which is not in 'images'")
            rec = by_id[image_id]
            rec["captions"].append({"text": text,
                                    "phrases": grounded_phrases(text, matcher, rec["objects"])})
        except _Bad as err:
            imp.reject(path, _where("caption", ann, i), err)


# ----------------------------------------------------------------------------- POPE, LLaVA
def _pope_variant(path: Path) -> str:
    found = [v for v in datadir.POPE_VARIANTS if v in path.name.lower()]
    if len(found) != 1:
        raise BadInput(f"cannot tell the POPE variant of {path}: its file name must contain "
                       "exactly one of random, popular, adversarial (e.g. coco_pope_random.json)")
    return found[0]


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value or _Bad) per non-empty line: one bad line is one record."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield n, _Bad("bad JSON line", f"is not valid JSON ({e})")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text ({e}); pass a POPE JSONL file") from None


def _load_pope(imp: _Import, path: Path) -> None:
    """Read an official POPE file (JSONL even when named .json) into ``imp.pope``."""
    variant = _pope_variant(path)
    if variant in imp.pope:
        raise BadInput(f"two POPE files for the {variant} variant ({path}); pass one per variant")
    if not any(True for _ in _json_lines(path)):
        raise BadInput(f"POPE file {path} holds no questions; pass a non-empty file")
    rows = imp.pope[variant] = []
    pattern = re.compile(r"is there (?:a|an) (.+?) in the ima?ge\?", re.IGNORECASE)
    for n, row in _json_lines(path):
        try:
            if isinstance(row, _Bad):
                raise row
            qid = _get(row, "question_id", (int, str), "an id")
            text = _get(row, "text", str, "a question")
            label = _get(row, "label", str, "'yes' or 'no'").strip().lower()
            if label not in ("yes", "no"):
                raise _Bad("bad label", f"label {row['label']!r} is not 'yes' or 'no'")
            name = _image_name(_get(row, "image", str, "an image file name"))
            imp.record(name, path, f"line {n}")
            out = {"question_id": qid, "text": text, "label": label}
            if m := pattern.search(text):
                out["object"] = m.group(1).strip().lower()
            rows.append((name, out))
        except _Bad as err:
            imp.reject(path, f"line {n}", err)


def _conversation_pairs(turns: Any) -> list[dict]:
    """[{from: human|gpt, value}] -> open questions; each human turn needs a gpt answer."""
    if not isinstance(turns, list) or not turns:
        raise _Bad("bad conversation", "'conversations' is not a non-empty list")
    questions = []
    for t in range(0, len(turns), 2):
        pair = turns[t:t + 2]
        roles = [turn.get("from") if isinstance(turn, dict) else None for turn in pair]
        if roles != ["human", "gpt"]:
            raise _Bad("bad conversation", f"turns {t}-{t + 1} are {roles}, expected a 'human' "
                       "turn followed by a 'gpt' answer")
        q, a = (_get(turn, "value", str, "a string") for turn in pair)
        # The <image> token only marks where LLaVA splices in image features.
        q = re.sub(r"\s*<image>\s*", " ", q).strip()
        questions.append({"question": q, "answer": a.strip(), "type": "open"})
    return questions


def _load_llava(imp: _Import, path: Path) -> None:
    """Read a LLaVA conversation list; each entry adds open questions to its image."""
    data = read_json(path, "LLaVA file")
    if not isinstance(data, list):
        raise BadInput(f"{path}: top level is a JSON {type(data).__name__}, expected a list of "
                       "{id, image, conversations}; pass a LLaVA conversation file")
    for i, entry in enumerate(data):
        where = _where("entry", entry, i)
        try:
            _get(entry, "id", (str, int), "an id")
            name = _get(entry, "image", str, "an image file name (text-only entries have none)")
            questions = _conversation_pairs(_get(entry, "conversations", list, "a list"))
            imp.record(name, path, where)["questions"].extend(questions)
        except _Bad as err:
            imp.reject(path, where, err)


# ----------------------------------------------------------------------------- writing
def _load_image(path: Path, rec: dict) -> Image.Image:
    """Open as RGB; a missing, unreadable or truncated file, or a wrong size, is _Bad."""
    try:
        with Image.open(path) as img:
            # No EXIF transpose: COCO coordinates refer to the stored pixel grid.
            rgb = to_rgb(img)  # as training and the runtime convert; decodes every pixel,
            #                    so truncation shows here
    except FileNotFoundError:
        raise _Bad("missing image", f"image {path} does not exist") from None
    except DECODE_ERRORS as e:
        raise _Bad("unreadable image", f"cannot read image {path} ({e})") from None
    if rec["width"] is not None and rgb.size != (rec["width"], rec["height"]):
        raise _Bad("image size mismatch", f"image {path} is {rgb.size[0]}x{rgb.size[1]}, "
                   f"the annotations say {rec['width']}x{rec['height']}")
    return rgb


def _write_images(imp: _Import, root: Path) -> None:
    """Re-encode every referenced image as PNG; drop records whose image fails."""
    (root / "images" / imp.split).mkdir(parents=True, exist_ok=True)
    for name, rec in list(imp.records.items()):
        try:
            rgb = _load_image(imp.images / name, rec)
        except _Bad as err:
            imp.reject(*imp.refs[name], err)
            del imp.records[name]
            continue
        rec["width"], rec["height"] = rgb.size
        rgb.save(root / rec["file"], format="PNG")
    for variant, rows in imp.pope.items():
        kept = [(n, r) for n, r in rows if n in imp.records]
        imp.skipped["POPE question on a skipped image"] += len(rows) - len(kept)
        imp.pope[variant] = kept
    imp.skipped = +imp.skipped  # drop zero counts


def _write_pope(imp: _Import, root: Path, records: list[dict], classes: list[str]) -> dict:
    """Write the imported POPE files, or build them from the objects when none was given."""
    # docs/datadir.md: top-level pope_*.jsonl are the test split's; other splits go in pope/.
    prefix = "pope" if imp.split == "test" else f"pope/{imp.split}"
    if imp.pope:
        files = {variant: [{**r, "image": imp.records[n]["file"],
                            "image_id": imp.records[n]["image_id"]} for n, r in rows]
                 for variant, rows in imp.pope.items()}
        return {"files": datadir.write_pope_files(root, files, prefix), "origin": "imported",
                "questions": {v: len(rows) for v, rows in files.items()}}
    if not classes:
        return {"files": {}, "questions": {}}
    co = datadir.class_cooccurrence(records, classes)
    built = build_pope(records, classes, co, seed=POPE_SEED)
    return {"files": datadir.write_pope_files(root, built, prefix), "origin": "built",
            "questions": {v: len(rows) for v, rows in built.items()},
            "reference_split": imp.split, "seed": POPE_SEED}


def _meta(imp: _Import, sources: list[dict], vocab: dict, classes: list[str],
          records: list[dict], pope_meta: dict) -> dict:
    """dataset.json content (write_records_and_meta adds splits and schema_version)."""
    freq = np.diag(datadir.class_cooccurrence(records, classes)) if classes else []
    return datadir.as_jsonable({
        "name": "coco" if any(s["kind"].startswith("coco") for s in sources) else "import",
        "generator": {"command": "agevlm data import", "split": imp.split,
                      "skip_bad": imp.skip_bad, "sources": sources},
        "import": {"images_dir": str(imp.images), "skipped": dict(sorted(imp.skipped.items()))},
        "vocabulary": {"classes": vocab, "colours": []},
        "pope": pope_meta,
        "stats": {"class_frequency": {imp.split: dict(zip(classes, freq))}},
    })


def _summary(out: Any, meta: dict, imp: _Import) -> str:
    s = meta["splits"][imp.split]
    pope = ", ".join(f"{v} {n}" for v, n in meta["pope"]["questions"].items()) or "none"
    line = (f"imported {s['images']} images into {out} (split {imp.split}): {s['objects']} "
            f"objects, {s['captions']} captions, {s['questions']} questions; POPE: {pope}")
    if imp.skipped:
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(imp.skipped.items()))
        line += f"; skipped {sum(imp.skipped.values())} ({counts})"
    return line


__all__ = ["import_dataset"]
