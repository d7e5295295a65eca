"""POPE (Li et al., 2023): yes/no object probing, plus the prior-partner hallucination split.

Metrics follow the official POPE script: answers parsed with prompts.parse_yes_no, positive
class = yes. The key hallucination number is the false-yes rate on absent objects, split into
  prior_partner: the absent object is the planted partner of a present trigger
                 (dataset.json generator.config.priors, e.g. star -> moon): a model that
                 learnt the language prior instead of looking says yes here;
  other_absent:  every other absent object.
A question without ``object`` (an imported file's text that does not ask "is there a/an X in
the image?") counts in the metrics, not in the false-yes split or the errors by object.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data.datadir import POPE_VARIANTS
from ..errors import BadInput
from ..fsutil import read_jsonl
from ..prompts import parse_yes_no
from .backend import EvalBackend
from .common import ImageStore, chunks, ratio


def pope_files(data_dir: str | os.PathLike, meta: dict, split: str) -> dict[str, Path]:
    """{variant: path} of a split's POPE files, from dataset.json ``pope.files``.

    Synthetic DATA DIRs list {split: {variant: file}}; imported ones list {variant: file}
    for their one split (generator.split).
    """
    files = meta.get("pope", {}).get("files", {})
    if files and all(isinstance(v, dict) for v in files.values()):
        entry, known = files.get(split), sorted(files)
    else:
        own = meta.get("generator", {}).get("split", "test")
        entry, known = (files if split == own else None), ([own] if files else [])
    if not entry:
        raise BadInput(f"{data_dir} has no POPE files for split {split!r} (POPE splits: "
                       f"{', '.join(known) or 'none'}); choose another --split")
    paths = {v: Path(data_dir) / entry[v] for v in POPE_VARIANTS if v in entry}
    for p in paths.values():
        if not p.is_file():
            raise BadInput(f"POPE file {p} listed in dataset.json is missing; regenerate the data directory")
    return paths


def prior_partners(meta: dict) -> dict[str, str]:
    """trigger -> partner from generator.config.priors (empty for imported data)."""
    priors = meta.get("generator", {}).get("config", {}).get("priors", [])
    return {str(t): str(p) for t, p in priors}


def binary_metrics(labels: list[str], preds: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio with yes as the positive class; a model
    that never says yes scores precision and F1 0; with no questions every rate is None."""
    pairs = list(zip(labels, preds))
    if not pairs:
        return {"n": 0, **dict.fromkeys(("accuracy", "precision", "recall", "f1", "yes_ratio")),
                "tp": 0, "fp": 0, "tn": 0, "fn": 0}
    tp = sum(lab == "yes" and p == "yes" for lab, p in pairs)
    fp = sum(lab == "no" and p == "yes" for lab, p in pairs)
    tn = sum(lab == "no" and p == "no" for lab, p in pairs)
    fn = sum(lab == "yes" and p == "no" for lab, p in pairs)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else 0.0)
    return {"n": len(pairs), "accuracy": ratio(tp + tn, len(pairs)),
            "precision": precision if precision is not None else 0.0,
            "recall": recall if recall is not None else 0.0, "f1": f1,
            "yes_ratio": ratio(tp + fp, len(pairs)), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def absent_kind(obj: str, present: set[str], partners: dict[str, str]) -> str:
    """'prior_partner' if ``obj`` is the partner of a present trigger, else 'other_absent'."""
    return "prior_partner" if any(partners.get(t) == obj for t in present) else "other_absent"


def false_yes(rows: list[dict], preds: list[str], present: dict[str, set[str]],
              partners: dict[str, str]) -> dict:
    """False-yes rate on the absent-object (label no) questions, per absent kind."""
    out = {k: {"n": 0, "yes": 0} for k in ("prior_partner", "other_absent")}
    for row, pred in zip(rows, preds):
        if row["label"] == "no" and row.get("object"):
            d = out[absent_kind(row["object"], present[row["image_id"]], partners)]
            d["n"] += 1
            d["yes"] += pred == "yes"
    for d in out.values():
        d["rate"] = ratio(d["yes"], d["n"])
    return out


def per_object(rows: list[dict], preds: list[str]) -> dict:
    """Errors by asked object: false yeses on the questions where it is absent, false noes
    where it is present: which objects a model errs on, which the aggregate F1 hides."""
    out: dict[str, dict] = {}
    for row, pred in zip(rows, preds):
        if not row.get("object"):
            continue
        d = out.setdefault(row["object"], {"absent": 0, "false_yes": 0, "present": 0, "false_no": 0})
        if row["label"] == "no":
            d["absent"] += 1
            d["false_yes"] += pred == "yes"
        else:
            d["present"] += 1
            d["false_no"] += pred == "no"
    for d in out.values():
        d["false_yes_rate"], d["false_no_rate"] = ratio(d["false_yes"], d["absent"]), ratio(d["false_no"], d["present"])
    return dict(sorted(out.items()))


def score_pope_file(rows: list[dict], raw: list[str], present: dict[str, set[str]],
                    partners: dict[str, str]) -> dict:
    """Metrics, false-yes split and the answer list of one POPE file."""
    preds = [parse_yes_no(a) for a in raw]
    res = binary_metrics([r["label"] for r in rows], preds)
    res["false_yes"] = false_yes(rows, preds, present, partners)
    res["answers"] = [{"question_id": r["question_id"], "image_id": r["image_id"],
                       "object": r.get("object"), "label": r["label"], "prediction": p, "raw": a}
                      for r, p, a in zip(rows, preds, raw)]
    return res


def _ask_unique(backend: EvalBackend, store: ImageStore, file_of: dict[str, str],
                keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Answer each distinct (image_id, question) once: the variants share their yes questions."""
    answers: dict[tuple[str, str], str] = {}
    for sl in chunks(len(keys), "pope"):
        part = keys[sl]
        imgs = store.many([file_of[i] for i, _ in part])
        answers.update(zip(part, backend.answer(imgs, [q for _, q in part])))
    return answers


def run_pope(backend: EvalBackend, data_dir: str | os.PathLike, meta: dict, records: list[dict],
             split: str) -> dict:
    """POPE over the split's files, restricted to ``records``' images."""
    paths = pope_files(data_dir, meta, split)
    file_of = {r["image_id"]: r["file"] for r in records}
    present = {r["image_id"]: {o["class"] for o in r["objects"]} for r in records}
    partners = prior_partners(meta)
    rows = {}
    for v, p in paths.items():
        every = read_jsonl(p, f"POPE file {v}")
        bad = next((n for n, r in enumerate(every, 1) if not (
            isinstance(r, dict) and r.get("label") in ("yes", "no")
            and all(isinstance(r.get(k), str) for k in ("image_id", "text")))), None)
        if not every or bad:
            why = "has no questions" if not every else f"line {bad} needs image_id, text and a yes/no label"
            raise BadInput(f"POPE file {v} ({p}) {why}; regenerate or re-import the DATA DIR")
        rows[v] = [r for r in every if r["image_id"] in file_of]
    keys = sorted({(r["image_id"], r["text"]) for rs in rows.values() for r in rs})
    answers = _ask_unique(backend, ImageStore(data_dir, backend.image_size), file_of, keys)
    files = {v: score_pope_file(rs, [answers[(r["image_id"], r["text"])] for r in rs], present, partners)
             for v, rs in rows.items()}
    return {"files": files, "summary": _summary(files, rows, answers, present, partners),
            "partners": partners}


def _summary(files: dict, rows: dict, answers: dict, present: dict, partners: dict) -> dict:
    """Mean of the per-file metrics; the false-yes split and the errors by object over
    distinct questions (the files share their present-object questions)."""
    unique = list({(r["image_id"], r.get("object") or r["text"]): r
                   for rs in rows.values() for r in rs}.values())
    preds = [parse_yes_no(answers[(r["image_id"], r["text"])]) for r in unique]
    neg = [(r, p) for r, p in zip(unique, preds) if r["label"] == "no"]
    # Over the files with questions for these images (a file without any has no rates).
    asked = [f for f in files.values() if f["n"]]
    mean = lambda k: ratio(sum(f[k] for f in asked), len(asked))
    return {"mean_accuracy": mean("accuracy"), "mean_f1": mean("f1"),
            "mean_yes_ratio": mean("yes_ratio"),
            "false_yes": false_yes([r for r, _ in neg], [p for _, p in neg], present, partners),
            "by_object": per_object(unique, preds)}
