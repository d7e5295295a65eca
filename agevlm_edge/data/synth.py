"""The grounded synthetic world: `agevlm data synth`.

Deterministic from a seed (every image has its own RNG keyed by (seed, split, index), so the
result does not depend on the number of worker processes). Language priors are planted on
purpose: a trigger class (star) brings its partner (moon) with probability `prior_strength`
in train/val, while every class keeps the same overall image frequency (class weights are
fitted by simulation), so POPE's popular and adversarial splits test different things.
Test splits break the prior: there classes are drawn independently.

Splits: train, val (prior planted), test (prior broken, the preset's difficulty) and
test_easy / test_medium / test_hard (prior broken, graded difficulty).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import BadInput
from ..fsutil import staged_dir
from . import text
from .datadir import as_jsonable, class_cooccurrence, encode_mask, mask_box, write_pope_files
from .datadir import write_records_and_meta
from .pope import build_pope
from .world import COLOURS, CONFUSABLE, Placed, background, composite, vocabulary, CLASSES

SPLIT_IDS = {"train": 1, "val": 2, "test": 3, "test_easy": 4, "test_medium": 5, "test_hard": 6}
FIT_SCENES = 20000  # simulated scenes per fitting round
FIT_ROUNDS = 14  # half fit strengths and weights, half the weights alone


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64            # square images, pixels
    min_objects: int = 1
    max_objects: int = 4            # up to 8
    min_size: float = 12.0          # shape diameter in px (an 8 px patch: below 8 is sub-patch)
    max_size: float = 28.0
    max_occlusion: float = 0.0      # fraction of an object later objects may cover
    low_contrast_p: float = 0.0     # chance an object is drawn at reduced contrast
    contrast: float = 0.4           # contrast of low-contrast objects vs the background
    noise: float = 0.03             # pixel noise std, fraction of 255
    texture: float = 0.1            # background texture amplitude
    shape_jitter: float = 0.0       # polygon vertex jitter, fraction of the radius
    confusable_p: float = 0.0       # chance a new object is the look-alike of a present one
    repeat_p: float = 0.15          # chance a new object repeats a present class (counting)
    prior_strength: float = 0.8     # P(partner | trigger) planted in train/val (<= 0.95)
    priors: tuple = (("star", "moon"), ("heart", "arrow"), ("cross", "bar"))
    captions_per_image: int = 2
    n_train: int = 20000
    n_val: int = 500
    n_test: int = 500

    def validate(self) -> "WorldConfig":
        checks = [
            (16 <= self.image_size <= 512, "image_size must be in 16..512"),
            (1 <= self.min_objects <= self.max_objects <= 8, "need 1 <= min_objects <= max_objects <= 8"),
            (3 <= self.min_size <= self.max_size <= self.image_size * 0.8,
             "need 3 <= min_size <= max_size <= 0.8 * image_size"),
            (0 <= self.max_occlusion <= 0.6, "max_occlusion must be in 0..0.6"),
            (0 <= self.prior_strength <= 0.95, "prior_strength must be in 0..0.95"),
            (all(0 <= p <= 1 for p in (self.low_contrast_p, self.contrast, self.confusable_p,
                                       self.repeat_p, self.noise, self.texture, self.shape_jitter)),
             "probabilities, contrast, noise, texture and shape_jitter must be in 0..1"),
            (all(len(p) == 2 and p[0] in CLASSES and p[1] in CLASSES and p[0] != p[1]
                 for p in self.priors),
             f"priors must be TRIGGER:PARTNER pairs of distinct classes from: {', '.join(CLASSES)}"),
            (len({p[0] for p in self.priors}) == len(self.priors), "each trigger may have one partner"),
            # one object per scene leaves no room for a partner; fitting the planting rate
            # towards the target would then redraw every trigger forever
            (self.max_objects >= 2 or not self.priors or self.prior_strength == 0,
             "a planted prior needs two objects in a scene: with max_objects=1 also set "
             "priors= (none) or prior_strength=0"),
            (self.captions_per_image >= 1, "captions_per_image must be >= 1"),
            (min(self.n_train, self.n_val, self.n_test) >= 0, "split sizes must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BadInput(f"invalid world setting: {msg}")
        return self


PRESETS: dict[str, dict] = {
    "easy": {},
    "medium": dict(max_objects=6, min_size=8, max_size=22, max_occlusion=0.2, low_contrast_p=0.2,
                   noise=0.06, texture=0.2, shape_jitter=0.05, confusable_p=0.15,
                   prior_strength=0.85),
    # Sub-patch objects, clutter, occlusion, low contrast, look-alikes and a strong prior:
    # vision is uncertain, which is where a language prior turns into hallucination.
    "hard": dict(min_objects=2, max_objects=8, min_size=5, max_size=16, max_occlusion=0.35,
                 low_contrast_p=0.35, contrast=0.35, noise=0.10, texture=0.3, shape_jitter=0.1,
                 confusable_p=0.3, prior_strength=0.9),
}


def world_config(preset: str = "easy", overrides: dict[str, str] | None = None) -> WorldConfig:
    """A preset plus KEY=VALUE overrides (strings, parsed by the field's type)."""
    if preset not in PRESETS:
        raise BadInput(f"unknown world preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = dataclasses.replace(WorldConfig(), **PRESETS[preset])
    fields = {f.name: f for f in dataclasses.fields(WorldConfig)}
    parsed = {}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise BadInput(f"unknown world setting {key!r}; known: {', '.join(fields)}")
        parsed[key] = _parse_value(key, value, getattr(cfg, key))
    return dataclasses.replace(cfg, **parsed).validate()


def _parse_value(key: str, value, current):
    if not isinstance(value, str):
        return value
    try:
        if key == "priors":  # "star:moon,heart:arrow" or "" for none
            return tuple(tuple(p.split(":")) for p in value.split(",") if p) if value else ()
        return type(current)(float(value)) if isinstance(current, int) else type(current)(value)
    except (ValueError, OverflowError):
        raise BadInput(f"world setting {key}={value!r} is not a valid {type(current).__name__}") from None


# --------------------------------------------------------------------------- class sampling
@dataclass(frozen=True)
class Sampler:
    """How a scene's classes are drawn: fitted weights plus the planted prior."""

    weights: np.ndarray
    partner: dict = field(default_factory=dict)    # trigger -> partner (empty: prior broken)
    strength: dict = field(default_factory=dict)   # trigger -> P(bring partner), calibrated
    confusable_p: float = 0.0
    repeat_p: float = 0.0

    @functools.cached_property
    def cumulative(self) -> list[float]:
        return np.cumsum(self.weights).tolist()


def sample_classes(rng: np.random.Generator, s: Sampler, n: int, classes: list[str]) -> list[tuple[str, str | None]]:
    """n classes for one scene, each with the trigger that planted it (or None)."""
    out: list[tuple[str, str | None]] = []
    while len(out) < n:
        names = [c for c, _ in out]
        if names and rng.random() < s.repeat_p:
            out.append((names[int(rng.integers(len(names)))], None))
            continue
        if names and rng.random() < s.confusable_p:
            twin = CONFUSABLE.get(names[int(rng.integers(len(names)))])
            if twin:
                out.append((twin, None))
                continue
        c = classes[min(bisect.bisect(s.cumulative, rng.random()), len(classes) - 1)]
        partner = s.partner.get(c)
        if partner and partner not in names and rng.random() < s.strength[c]:
            if len(out) + 2 > n:
                continue  # no room for the partner: redraw, so the trigger rarely comes alone
            out.extend([(c, None), (partner, c)])
            continue
        out.append((c, None))
    return out


@functools.lru_cache(maxsize=16)
def fit_sampler(cfg: WorldConfig, prior: bool, seed: int) -> Sampler:
    """Fit class weights so every class appears in the same fraction of images, and each
    trigger's planting probability so that the measured P(partner | trigger) hits the target
    (repeats, look-alikes and lone triggers in one-object scenes would otherwise dilute it)."""
    classes = list(CLASSES)
    partner = dict(cfg.priors) if prior else {}
    s = Sampler(np.full(len(classes), 1 / len(classes)), partner,
                {t: cfg.prior_strength for t in partner}, cfg.confusable_p, cfg.repeat_p)
    rng = np.random.default_rng([seed, 99])
    counts_n = rng.integers(cfg.min_objects, cfg.max_objects + 1, size=FIT_SCENES)
    for round_ in range(FIT_ROUNDS):
        scenes = [{c for c, _ in sample_classes(rng, s, int(n), classes)} for n in counts_n]
        freq = np.array([sum(c in sc for sc in scenes) for c in classes], np.float64)
        w = s.weights * (freq.mean() / np.maximum(freq, 1)) ** 0.8
        strength = dict(s.strength)
        # The second half fits the weights alone, so they see the final strengths (with too
        # few such rounds the partners stayed ~8% more frequent and topped POPE's popular set).
        for t, p in partner.items() if round_ < FIT_ROUNDS // 2 else ():
            with_t = [p in sc for sc in scenes if t in sc]
            measured = float(np.mean(with_t)) if with_t else cfg.prior_strength
            strength[t] = float(np.clip(s.strength[t] + (cfg.prior_strength - measured), 0, 1))
        s = dataclasses.replace(s, weights=w / w.sum(), strength=strength)
    return s


# --------------------------------------------------------------------------- rendering
def _place(rng: np.random.Generator, cfg: WorldConfig, classes: list[tuple[str, str | None]]
           ) -> tuple[list[Placed], list[str | None]]:
    """Sizes, colours and positions; returns the placed objects and their prior triggers."""
    size = cfg.image_size
    placed: list[Placed] = []
    triggers: list[str | None] = []
    for cls, trigger in classes:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        d = float(rng.uniform(cfg.min_size, cfg.max_size))
        if cls == "bar":
            d = min(d * 1.2, cfg.image_size * 0.8)
        jitter = rng.normal(0, cfg.shape_jitter, size=(40, 2)) if cfg.shape_jitter else None
        for attempt in range(80):
            if attempt and attempt % 20 == 0:  # crowded: shrink rather than drop the object
                d = max(d * 0.85, cfg.min_size)
            cx, cy = rng.uniform(d / 2, size - d / 2, size=2)
            if all(_overlap(cx, cy, d, p) <= cfg.max_occlusion for p in placed):
                break
        else:
            continue  # still no room: drop the object rather than hide it
        rgb = np.array(COLOURS[colour], np.float32) + rng.uniform(-15, 15, size=3)
        placed.append(Placed(cls, colour, rgb, float(cx), float(cy), d,
                             float(rng.uniform(0, 2 * math.pi)), jitter))
        triggers.append(trigger)
    return placed, triggers


def _overlap(cx: float, cy: float, d: float, p: Placed) -> float:
    """Rough fraction of the smaller bounding circle covered by the other (0: disjoint)."""
    dist = math.hypot(cx - p.cx, cy - p.cy)
    r1, r2 = d / 2, p.diameter / 2
    if dist >= r1 + r2:
        return 0.0
    return min(1.0, (r1 + r2 - dist) / (2 * min(r1, r2)))


def render_scene(cfg: WorldConfig, sampler: Sampler, seed: int, split: str, index: int,
                 root: Path) -> dict:
    """Render one image to ``root`` and return its record."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    classes = list(CLASSES)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    drawn = sample_classes(rng, sampler, n, classes)
    placed, triggers = _place(rng, cfg, drawn)
    size = cfg.image_size
    bg = background(rng, size, cfg.texture)
    for ob in placed:  # low contrast: pull the colour toward the local background
        if rng.random() < cfg.low_contrast_p:
            local = bg[int(ob.cy), int(ob.cx)]
            ob.rgb = local + cfg.contrast * (ob.rgb - local)
    noise = rng.normal(0, cfg.noise * 255.0, size=(size, size, 3)).astype(np.float32)
    image, masks, occluded = composite(bg, placed, noise)
    image_id = f"{split}-{index:06d}"
    rel = f"images/{split}/{image_id}.png"
    Image.fromarray(image).save(root / rel, optimize=False, compress_level=1)
    objects = []
    for ob, trigger, m, occ in zip(placed, triggers, masks, occluded):
        if m.sum() < 2:  # fully hidden: not in the annotations, so not in the questions
            continue
        rec = {"id": len(objects), "class": ob.shape, "colour": ob.colour, "box": mask_box(m),
               "area": int(m.sum()), "mask": encode_mask(m), "mask_source": "rendered",
               "shape_size": round(ob.diameter, 2), "occluded": round(float(occ), 3)}
        if trigger:
            rec["partner_of"] = trigger
        objects.append(rec)
    record = {"image_id": image_id, "file": rel, "width": size, "height": size, "split": split,
              "objects": objects}
    record["captions"] = text.captions(rng, objects, size, cfg.captions_per_image) if objects else []
    record["questions"] = text.questions(rng, objects, classes) if objects else []
    return record


def _render_chunk(args) -> list[dict]:
    cfg, sampler, seed, split, start, stop, root = args
    return [render_scene(cfg, sampler, seed, split, i, Path(root)) for i in range(start, stop)]


def _render_split(cfg: WorldConfig, sampler: Sampler, seed: int, split: str, n: int, root: Path,
                  pool, progress) -> list[dict]:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    step = 250
    jobs = [(cfg, sampler, seed, split, i, min(i + step, n), str(root)) for i in range(0, n, step)]
    records: list[dict] = []
    chunks = pool.imap(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
    for chunk in chunks:  # imap keeps order: records come out as if rendered serially
        records.extend(chunk)
        progress.update(len(chunk))
    return records


# What the graded test splits take from each preset (the rest is the world's: image size,
# priors, captions, split sizes). prior_strength is moot there: their prior is broken.
DIFFICULTY = tuple(sorted(set().union(*PRESETS.values()) - {"prior_strength"}))


def graded_config(cfg: WorldConfig, preset: str) -> WorldConfig:
    """The world ``cfg`` at ``preset``'s difficulty: every DIFFICULTY key at the preset's value
    (the easy preset's are WorldConfig's defaults), object sizes scaled from 64 px images to
    this world's image size (3 px at least, validate's floor)."""
    ref = dataclasses.replace(WorldConfig(), **PRESETS[preset])
    scale = cfg.image_size / WorldConfig.image_size
    values = {k: max(3.0, getattr(ref, k) * scale) if k in ("min_size", "max_size")
              else getattr(ref, k) for k in DIFFICULTY}
    return dataclasses.replace(cfg, **values).validate()


def split_plan(cfg: WorldConfig) -> dict[str, tuple[WorldConfig, bool, int]]:
    """split -> (world config, prior planted?, size)."""
    graded = {name: graded_config(cfg, name) for name in ("easy", "medium", "hard")}
    plan = {"train": (cfg, True, cfg.n_train), "val": (cfg, True, cfg.n_val),
            "test": (cfg, False, cfg.n_test)}
    for name, gcfg in graded.items():
        plan[f"test_{name}"] = (gcfg, False, cfg.n_test)
    return {k: v for k, v in plan.items() if v[2] > 0}


def prior_stats(records: list[dict], priors) -> dict:
    """Measured P(partner | trigger) vs P(partner | no trigger), per planted pair."""
    out = {}
    for trig, partner in priors:
        with_t = [r for r in records if any(o["class"] == trig for o in r["objects"])]
        without = [r for r in records if not any(o["class"] == trig for o in r["objects"])]
        has_p = lambda rs: float(np.mean([any(o["class"] == partner for o in r["objects"])
                                          for r in rs])) if rs else 0.0
        out[f"{trig}->{partner}"] = {"p_partner_given_trigger": round(has_p(with_t), 4),
                                     "p_partner_without_trigger": round(has_p(without), 4)}
    return out


def synthesize(out: str | os.PathLike, preset: str = "easy", seed: int = 0,
               n_train: int | None = None, n_val: int | None = None, n_test: int | None = None,
               overrides: dict[str, str] | None = None, workers: int | None = None,
               overwrite: bool = False) -> str:
    """Write a DATA DIR with the synthetic world; returns a one-line summary."""
    from tqdm import tqdm

    overrides = dict(overrides or {})
    for key, val in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if val is not None:
            overrides[key] = val
    cfg = world_config(preset, overrides)
    plan = split_plan(cfg)
    if "train" not in plan:
        raise BadInput("n_train must be > 0: the POPE sets take their co-occurrence from train")
    classes = list(CLASSES)
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    with staged_dir(out, overwrite) as root:
        splits: dict[str, list[dict]] = {}
        total = sum(n for _, _, n in plan.values())
        ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
        with (ctx.Pool(workers) if workers > 1 else contextlib.nullcontext()) as pool, \
                tqdm(total=total, desc="synth", unit="img", disable=None) as bar:
            for split, (scfg, prior, n) in plan.items():
                sampler = fit_sampler(scfg, prior, seed)
                splits[split] = _render_split(scfg, sampler, seed, split, n, root,
                                              pool, bar)
        co = class_cooccurrence(splits["train"], classes)
        pope_meta = _write_pope(root, splits, classes, co, seed)
        meta = {
            "name": "synth",
            "generator": {"preset": preset, "seed": seed, "config": as_jsonable(dataclasses.asdict(cfg)),
                          "split_configs": {s: {"prior": p, "config": as_jsonable(dataclasses.asdict(c))}
                                            for s, (c, p, _) in plan.items()}},
            "vocabulary": vocabulary(),
            "pope": pope_meta,
            "stats": _stats(splits, classes, cfg.priors),
        }
        write_records_and_meta(root, splits, meta)
    secs = time.perf_counter() - t0
    n_img = sum(len(v) for v in splits.values())
    return (f"wrote {out}: {n_img} images in {secs:.1f}s "
            f"({', '.join(f'{k} {len(v)}' for k, v in splits.items())}), "
            f"POPE {sum(sum(c.values()) for c in pope_meta['counts'].values())} questions")


def _write_pope(root: Path, splits: dict[str, list[dict]], classes: list[str], co: np.ndarray,
                seed: int) -> dict:
    files, counts = {}, {}
    for split, records in splits.items():
        if not split.startswith("test"):
            continue
        sets = build_pope(records, classes, co, seed=seed + SPLIT_IDS[split])
        prefix = "pope" if split == "test" else f"pope/{split}"
        (root / "pope").mkdir(exist_ok=True)
        files[split] = write_pope_files(root, sets, prefix)
        counts[split] = {v: len(rows) for v, rows in sets.items()}
    return {"files": files, "counts": counts, "cooccurrence_split": "train",
            "per_image": 3}


def _stats(splits: dict[str, list[dict]], classes: list[str], priors) -> dict:
    out = {}
    for split, records in splits.items():
        co = class_cooccurrence(records, classes)
        n = max(len(records), 1)
        out[split] = {
            "class_image_frequency": {c: round(float(co[i, i]) / n, 4) for i, c in enumerate(classes)},
            "objects_per_image": round(sum(len(r["objects"]) for r in records) / n, 3),
            "priors": prior_stats(records, priors),
        }
    return out
