"""`agevlm drift`: does a quantized export hallucinate more than its fp32 reference?

    reference EXPORT --profile--> POPE answers (3 splits), CHAIR, grounding maps, first-token
    candidate EXPORT --profile-->   log-probs on the POPE questions       (same DATA DIR images)
                     --compare(budget)--> drift.json, a table, passed: exit 0 / exit 1

Checked against the budget (points = percentage points):
    POPE F1 drop per split <= 1.0, CHAIR_i rise <= 1.0, yes-ratio shift per split <= 2.0
Reported beside them: CHAIR_s, grounding IoU, attention-map drift (top-k IoU and Pearson
correlation of each phrase's reference and candidate cross-attention maps), answer flips
(yes->no and no->yes, listed) and the first-token KL on the POPE questions. Greedy decoding
on onnxruntime's CPU provider: the same inputs give the same drift.json.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agevlm_edge.data.datadir import load_meta, load_split
from agevlm_edge.errors import BadInput
from agevlm_edge.eval.chair import run_chair
from agevlm_edge.eval.common import ImageStore, chunks, select_records
from agevlm_edge.eval.grounding import run_grounding
from agevlm_edge.eval.pope import pope_files, run_pope
from agevlm_edge.fsutil import read_json, read_jsonl, read_yaml, write_json_atomic
from agevlm_edge.runtime.backend import OnnxBackend
from agevlm_edge.runtime.session import Runtime

from .quality import compare_logits


@dataclass(frozen=True)
class Budget:
    """Largest allowed degradation, in percentage points."""
    pope_f1_drop: float = 1.0          # on each POPE split
    chair_i_rise: float = 1.0
    yes_ratio_shift: float = 2.0       # |candidate - reference|, each split
    version: int = 1


def load_budget(path: str | os.PathLike | None = None, **overrides) -> Budget:
    """Defaults, then a JSON/YAML file's keys, then flags (None = not given)."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        values = (read_yaml(p, "budget file") or {}) if p.suffix in (".yaml", ".yml") \
            else read_json(p, "budget file")
        if not isinstance(values, dict):
            raise BadInput(f"budget file {p} must hold a mapping of limits")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(Budget)} - {"version"}
    bad = sorted(map(str, set(values) - known))
    if bad:
        raise BadInput(f"unknown budget key {', '.join(bad)}; known: {', '.join(sorted(known))}")
    try:
        budget = Budget(**{k: float(v) for k, v in values.items()})
    except (TypeError, ValueError, OverflowError):
        raise BadInput(f"budget limits must be numbers, got {str(values)[:200]}") from None
    if any(not 0 <= getattr(budget, k) < math.inf for k in known):   # NaN fails too
        raise BadInput(f"budget limits must be finite numbers >= 0 (percentage points), got "
                       f"{ {k: getattr(budget, k) for k in sorted(known)} }")
    return budget


def _pope_keys(data_dir, meta: dict, records: list[dict], split: str) -> list[tuple[str, str]]:
    """Distinct (image_id, question) pairs of the split's POPE files, sorted (as run_pope asks)."""
    ids = {r["image_id"] for r in records}
    return sorted({(r["image_id"], r["text"]) for p in pope_files(data_dir, meta, split).values()
                   for r in read_jsonl(p, "POPE file") if r.get("image_id") in ids})


def profile(export_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "test",
            limit: int | None = None, verify: bool = True) -> dict:
    """What the gate compares, measured on one export: suite results, maps, POPE log-probs.
    ``verify``: check the files' hashes (False where the caller just did)."""
    rt = Runtime(export_dir, verify=verify)
    backend = OnnxBackend(rt)
    meta = load_meta(data_dir)
    records = select_records(load_split(data_dir, split), limit)
    if not records:
        raise BadInput(f"split {split!r} of {data_dir} has no records")
    out = {"dir": str(export_dir), "scheme": rt.manifest.get("precision"), "images": len(records),
           "pope": run_pope(backend, data_dir, meta, records, split),
           "chair": run_chair(backend, data_dir, meta, records), "maps": []}
    out["grounding"] = run_grounding(backend, data_dir, records, maps_out=out["maps"]) \
        if "grounding" in backend.supported_suites else {"skipped": backend.unsupported_reason}
    keys = _pope_keys(data_dir, meta, records, split)
    store, file_of = ImageStore(data_dir, rt.image_size), {r["image_id"]: r["file"] for r in records}
    rows = []
    for sl in chunks(len(keys), "first-token"):
        part = keys[sl]
        rows.append(backend.first_token_logprobs(store.many([file_of[i] for i, _ in part]),
                                                 [q for _, q in part]))
    out["pope_logprobs"] = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
    return out


def map_drift(ref: list[np.ndarray], cand: list[np.ndarray], top: float = 0.1) -> dict:
    """Mean top-k IoU (k = top x patches) and Pearson correlation of paired phrase maps."""
    ious, cors = [], []
    for a, b in zip(ref, cand):
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            continue
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        k = max(1, int(round(top * a.size)))
        ta, tb = set(np.argsort(-a, kind="stable")[:k]), set(np.argsort(-b, kind="stable")[:k])
        ious.append(len(ta & tb) / len(ta | tb))
        if a.std() > 0 and b.std() > 0:
            cors.append(float(np.corrcoef(a, b)[0, 1]))
    mean = lambda xs: float(np.mean(xs)) if xs else None
    return {"phrases": len(ious), "topk_iou": mean(ious), "correlation": mean(cors), "top": top}


def flips(ref_answers: list[dict], cand_answers: list[dict]) -> dict:
    """Answers that changed, yes->no and no->yes, with the question they belong to."""
    out: dict = {"yes_to_no": [], "no_to_yes": []}
    for r, c in zip(ref_answers, cand_answers):
        if r["prediction"] != c["prediction"]:
            key = "yes_to_no" if r["prediction"] == "yes" else "no_to_yes"
            out[key].append({k: r[k] for k in ("question_id", "image_id", "object", "label")})
    return out


def first_token_drift(ref: np.ndarray, cand: np.ndarray, rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """compare_logits in chunks: [n, V] log-probs of a 49k vocabulary do not fit twice in float64."""
    parts = [compare_logits(ref[i:i + rows], cand[i:i + rows]) for i in range(0, len(ref), rows)]
    if not parts:
        return np.zeros(0, bool), np.zeros(0)
    return np.concatenate([a for a, _ in parts]), np.concatenate([k for _, k in parts])


def _check(name: str, value: float, limit: float) -> dict:
    return {"check": name, "value": round(value, 3) if np.isfinite(value) else "not measurable",
            "limit": limit, "passed": bool(value <= limit + 1e-9)}


def compare(ref: dict, cand: dict, budget: Budget) -> dict:
    """The drift of ``cand`` from ``ref`` and the budget checks (values in points)."""
    pts = lambda x: 100.0 * (x or 0.0)
    pope, checks = {}, []
    for split, r in ref["pope"]["files"].items():
        c = cand["pope"]["files"][split]
        f = flips(r["answers"], c["answers"])
        pope[split] = {"f1_ref": r["f1"], "f1_cand": c["f1"], "f1_drop": pts(r["f1"]) - pts(c["f1"]),
                       "yes_ref": r["yes_ratio"], "yes_cand": c["yes_ratio"],
                       "yes_shift": abs(pts(c["yes_ratio"]) - pts(r["yes_ratio"])),
                       "flips": {k: len(v) for k, v in f.items()}, "flipped": f}
        checks += [_check(f"POPE {split} F1 drop", pope[split]["f1_drop"], budget.pope_f1_drop),
                   _check(f"POPE {split} yes-ratio shift", pope[split]["yes_shift"],
                          budget.yes_ratio_shift)]
    rc, cc = ref["chair"], cand["chair"]
    chair = {k: {"ref": rc[k], "cand": cc[k]} for k in ("chair_s", "chair_i", "object_recall")}
    # A candidate whose captions name no object at all has no CHAIR_i: that is a failure,
    # not a rise of 0 (garbage captions must not pass).
    lost = cc["chair_i"] is None and rc["chair_i"] is not None
    chair["chair_i_rise"] = float("inf") if lost else pts(cc["chair_i"]) - pts(rc["chair_i"])
    checks.append(_check("CHAIR_i rise", chair["chair_i_rise"], budget.chair_i_rise))
    agree, kl = first_token_drift(ref["pope_logprobs"], cand["pope_logprobs"])
    g = {"iou_ref": ref["grounding"].get("iou"), "iou_cand": cand["grounding"].get("iou"),
         "maps": map_drift(ref["maps"], cand["maps"])}
    return {"reference": ref["dir"], "candidate": cand["dir"], "scheme": cand["scheme"],
            "images": ref["images"], "budget": dataclasses.asdict(budget), "pope": pope,
            "chair": chair, "grounding": g,
            "first_token": {"questions": int(agree.size), "kl_mean": float(kl.mean()) if kl.size else None,
                            "top1_agreement": float(agree.mean()) if agree.size else None},
            "checks": checks, "passed": all(c["passed"] for c in checks)}


def same_model(reference: str | os.PathLike, candidate: str | os.PathLike,
               verify: tuple[bool, bool] = (False, False)) -> None:
    """Both exports must be the same network (quantized from it): same model config.
    ``verify``: check the files' hashes of (reference, candidate) too."""
    from agevlm_edge.runtime.manifest import load_manifest

    a, b = (load_manifest(d, verify=v) for d, v in zip((reference, candidate), verify))
    if a.get("model") != b.get("model"):
        raise BadInput(f"{candidate} is not a variant of {reference} (their model configs differ); "
                       "compare a quantized export with the fp32 export it came from")


def run_drift(reference: str | os.PathLike, candidate: str | os.PathLike,
              data_dir: str | os.PathLike, budget: Budget = Budget(), split: str = "test",
              limit: int | None = None, out_json: str | os.PathLike | None = None,
              ref_profile: dict | None = None, cand_profile: dict | None = None) -> dict:
    """Profile both exports on the same images and compare; writes ``out_json`` when given.
    ``ref_profile`` / ``cand_profile``: profiles already measured on these images."""
    if not (Path(data_dir) / "dataset.json").is_file():
        raise BadInput(f"--data {data_dir} is not a DATA DIR (no dataset.json)")
    # a damaged export (either) fails here, not after the reference's whole evaluation
    same_model(reference, candidate, verify=(ref_profile is None, cand_profile is None))
    ref = ref_profile or profile(reference, data_dir, split, limit, verify=False)
    res = compare(ref, cand_profile or profile(candidate, data_dir, split, limit, verify=False),
                  budget)
    if out_json is not None:
        write_json_atomic(out_json, res)
    return res


def format_drift(res: dict) -> str:
    """A readable table of a drift result."""
    f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"
    lines = [f"drift of {res['candidate']} ({res['scheme']}) vs {res['reference']}, "
             f"{res['images']} images",
             f"{'POPE split':<12} {'F1 ref':>7} {'F1 cand':>8} {'drop':>6} {'yes ref':>8} "
             f"{'yes cand':>9} {'yes->no':>8} {'no->yes':>8}"]
    for split, p in res["pope"].items():
        lines.append(f"{split:<12} {f(p['f1_ref']):>7} {f(p['f1_cand']):>8} {p['f1_drop']:>6.2f} "
                     f"{f(p['yes_ref']):>8} {f(p['yes_cand']):>9} {p['flips']['yes_to_no']:>8} "
                     f"{p['flips']['no_to_yes']:>8}")
    c, g, t = res["chair"], res["grounding"], res["first_token"]
    lines += [f"CHAIR_i {f(c['chair_i']['ref'])} -> {f(c['chair_i']['cand'])}  CHAIR_s "
              f"{f(c['chair_s']['ref'])} -> {f(c['chair_s']['cand'])}",
              f"grounding IoU {f(g['iou_ref'])} -> {f(g['iou_cand'])}; attention maps vs reference: "
              f"top-10% IoU {f(g['maps']['topk_iou'])}, correlation {f(g['maps']['correlation'])} "
              f"({g['maps']['phrases']} phrases)",
              f"first token on {t['questions']} POPE questions: KL {f(t['kl_mean'], 4)}, top-1 "
              f"agreement {f(t['top1_agreement'])}", "budget checks (points):"]
    lines += [f"  {'ok  ' if c['passed'] else 'OVER'} {c['check']}: "
              f"{c['value'] if isinstance(c['value'], str) else format(c['value'], '.2f')} "
              f"(limit {c['limit']:.2f})" for c in res["checks"]]
    lines.append("PASSED: inside the drift budget" if res["passed"] else
                 "FAILED: over the drift budget")
    return "\n".join(lines) + "\n"
