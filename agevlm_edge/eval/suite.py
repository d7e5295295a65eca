"""Run the evaluation suites on one backend and one DATA DIR split; format the results.

    evaluate(RUN DIR, DATA DIR) -> TorchBackend -> run_suite -> results dict (-> JSON)
    evaluate(EXPORT DIR, DATA DIR) -> runtime.backend.OnnxBackend -> the same

``run_suite`` only talks to the EvalBackend interface, so an ONNX backend runs the same
suites. Results are plain JSON types (None where a rate has no denominator).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

from ..data.datadir import as_jsonable, load_meta, load_split
from ..errors import BadInput
from ..fsutil import write_json_atomic
from .backend import EvalBackend
from .chair import run_chair, word_map
from .common import select_records
from .grounding import run_grounding
from .itm import run_itm
from .pope import run_pope
from .vqa import run_vqa

# name -> runner(backend, data_dir, meta, records, split)
RUNNERS: dict[str, Callable[..., dict]] = {
    "pope": lambda b, d, m, r, s: run_pope(b, d, m, r, s),
    "chair": lambda b, d, m, r, s: run_chair(b, d, m, r),
    "grounding": lambda b, d, m, r, s: run_grounding(b, d, r),
    "itm": lambda b, d, m, r, s: run_itm(b, d, r),
    "vqa": lambda b, d, m, r, s: run_vqa(b, d, r),
}
DEFAULT_SUITES = tuple(RUNNERS)


def parse_suites(suites: str | Sequence[str]) -> list[str]:
    """'pope,chair' or a sequence -> validated, de-duplicated names in the given order."""
    names = [s.strip() for s in (suites.split(",") if isinstance(suites, str) else suites)]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in RUNNERS]
    if unknown or not names:
        raise BadInput(f"unknown eval suite {', '.join(unknown) or '(none given)'}; "
                       f"choose from {', '.join(RUNNERS)}")
    return names


def run_suite(backend: EvalBackend, data_dir: str | os.PathLike,
              suites: str | Sequence[str] = DEFAULT_SUITES, split: str = "test",
              limit: int | None = None) -> dict:
    """Run ``suites`` on the first ``limit`` images of ``split``; returns the results dict."""
    names = parse_suites(suites)
    meta = load_meta(data_dir)
    if "chair" in names:                  # its data need, checked before any suite runs
        word_map(meta.get("vocabulary") or {})
    records = select_records(load_split(data_dir, split), limit)
    if not records:
        raise BadInput(f"split {split!r} of {data_dir} has no records to evaluate")
    out: dict = {"data_dir": str(data_dir), "split": split, "limit": limit,
                 "images": len(records), "suites": {}, "seconds": {}}
    for name in names:
        t0 = time.perf_counter()
        out["suites"][name] = RUNNERS[name](backend, data_dir, meta, records, split)
        out["seconds"][name] = round(time.perf_counter() - t0, 3)
    return as_jsonable(out)


def load_backend(model_dir: str | os.PathLike, batch_size: int = 64,
                 model_transform: Callable | None = None,
                 device: str | None = None) -> tuple[EvalBackend, dict]:
    """(backend, model info) for a RUN DIR or an EXPORT DIR; ``model_transform`` may rewrite the loaded torch
    model first (e.g. bitsandbytes int8/nf4 variants from agevlm_edge.quant.bnb); ``device``
    (auto, cpu, cuda[:N]) places a RUN DIR's model (an EXPORT DIR runs on onnxruntime)."""
    from ..checkpoint import load_model_files
    from .backend import TorchBackend

    model_dir = Path(model_dir)
    if (model_dir / "manifest.json").is_file():     # an EXPORT DIR: the device runtime
        from ..runtime.backend import OnnxBackend
        from ..runtime.session import Runtime

        if model_transform is not None:
            raise BadInput(f"{model_dir} is an EXPORT DIR; bitsandbytes variants need the RUN DIR")
        if (device or "auto").strip().lower() not in ("auto", "cpu"):
            raise BadInput(f"--device {device}: {model_dir} is an EXPORT DIR, which runs on "
                           "onnxruntime; --device places a RUN DIR's torch model")
        rt = Runtime(model_dir)
        info = {"dir": str(model_dir), "arch": rt.arch, "export": {
            k: rt.manifest.get(k) for k in ("target", "precision", "scheme", "fused")}}
        return OnnxBackend(rt, batch_size=batch_size), info
    model, tokenizer, pre, _ = load_model_files(model_dir)
    info = {"dir": str(model_dir), "arch": model.cfg.arch, "parameters": model.num_parameters()}
    if model_transform is not None:
        model = model_transform(model)
    elif device is not None:
        from ..train.devices import resolve_device

        model = model.to(resolve_device(device))
    return TorchBackend(model, tokenizer, pre, batch_size=batch_size), info


def evaluate(model_dir: str | os.PathLike, data_dir: str | os.PathLike,
             suites: str | Sequence[str] | None = None, out_json: str | os.PathLike | None = None,
             limit: int | None = None, split: str = "test", batch_size: int = 64,
             model_transform: Callable | None = None, device: str | None = None) -> dict:
    """Evaluate a RUN DIR on a DATA DIR split (its model on ``device``, load_backend); write
    ``out_json`` atomically when given."""
    if suites is not None:
        parse_suites(suites)              # fail on a typo before loading the model
    if device not in (None, "auto", "cpu"):
        from ..train.devices import resolve_device

        resolve_device(device)            # and on a GPU this machine lacks
    load_split(data_dir, split)
    backend, info = load_backend(model_dir, batch_size, model_transform, device)
    # Some backends cannot run every suite (an export has no hidden states): the default is
    # what the backend supports, and asking for more fails before anything runs.
    supported = getattr(backend, "supported_suites", DEFAULT_SUITES)
    if suites is None:
        suites = supported
    missing = [n for n in parse_suites(suites) if n not in supported]
    if missing:
        raise BadInput(f"{model_dir} cannot run the {', '.join(missing)} suite "
                       f"({backend.unsupported_reason}); choose from {', '.join(supported)}")
    results = {"model": info, **run_suite(backend, data_dir, suites, split, limit)}
    if out_json is not None:
        write_json_atomic(out_json, results)
    return results


# ----------------------------------------------------------------------------- report
def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [header] + [[_f(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in cells]


def _fy(d: dict) -> str:
    return f"{_f(d['rate'])} ({d['n']})"


def _pope_lines(r: dict) -> list[str]:
    rows = [[v, f["n"], f["accuracy"], f["precision"], f["recall"], f["f1"], f["yes_ratio"],
             _fy(f["false_yes"]["prior_partner"]), _fy(f["false_yes"]["other_absent"])]
            for v, f in r["files"].items()]
    s, fy = r["summary"], r["summary"]["false_yes"]
    rows.append(["mean / distinct", "", s["mean_accuracy"], "", "", s["mean_f1"], s["mean_yes_ratio"],
                 _fy(fy["prior_partner"]), _fy(fy["other_absent"])])
    return ["POPE (FY: false-yes rate on absent objects (count): prior partner vs other)"] + _table(
        ["file", "n", "acc", "prec", "recall", "f1", "yes", "FY partner", "FY other"], rows) + \
        _worst_objects(s.get("by_object", {}))


def _worst_objects(by: dict, k: int = 3) -> list[str]:
    """The objects with the most wrong answers (distinct questions), where the errors are."""
    worst = sorted((o for o in by if by[o]["false_yes"] + by[o]["false_no"]),
                   key=lambda o: -(by[o]["false_yes"] + by[o]["false_no"]))[:k]
    if not worst:
        return []
    return ["  most wrong answers: " + ", ".join(
        f"{o} (FY {by[o]['false_yes']}/{by[o]['absent']}, FN {by[o]['false_no']}/{by[o]['present']})"
        for o in worst)]


def _chair_lines(r: dict) -> list[str]:
    return ["CHAIR", f"  CHAIR_s {_f(r['chair_s'])}  CHAIR_i {_f(r['chair_i'])}  "
            f"object recall {_f(r['object_recall'])}  ({r['n']} captions, {r['mentions']} mentions, "
            f"{_f(r['mean_words'], 1)} words each)"]


def _grounding_lines(r: dict) -> list[str]:
    if "skipped" in r and isinstance(r["skipped"], str):
        return ["Grounding", f"  skipped: {r['skipped']}"]
    return ["Grounding", f"  IoU@k {_f(r['iou'])} (random {_f(r['random_iou'])})  pointing "
            f"{_f(r['pointing'])} (random {_f(r['random_pointing'])})  ({r['n']} phrases, "
            f"{r['grid']}x{r['grid']} patches)"]


def _itm_lines(r: dict) -> list[str]:
    if "layers" not in r:
        return ["ITM", f"  skipped: {r.get('skipped')}"]
    rows = [[d["layer"], d["matched"], d["mismatched"], d["auroc"]] for d in r["layers"]]
    return [f"ITM (cosine of mean image vs text state; {r['n_pairs']} pairs)"] + _table(
        ["layer", "matched", "mismatched", "AUROC"], rows)


def _vqa_lines(r: dict) -> list[str]:
    rows = [[t, d["n"], d["accuracy"], d.get("balanced_accuracy")] for t, d in r["types"].items()] \
        + [["all", r["n"], r["accuracy"], None]]
    lines = ["VQA (exact match; balanced: the mean of the accuracies per reference answer)"] + \
        _table(["type", "n", "acc", "balanced"], rows)
    for t, d in r["types"].items():
        parts = [f"{a} {_f(v['accuracy'])} ({v['n']})" for a, v in d.get("by_answer", {}).items()]
        if 1 < len(parts) <= 10:  # the synthetic world's closed sets; a longer one stays in the JSON
            lines.append(f"  {t} by answer: " + ", ".join(parts))
    return lines


FORMATTERS = {"pope": _pope_lines, "chair": _chair_lines, "grounding": _grounding_lines,
              "itm": _itm_lines, "vqa": _vqa_lines}


def format_report(results: dict) -> str:
    """A readable plain-text report of a results dict."""
    model = results.get("model", {})
    head = (f"model {model.get('dir', '?')} ({model.get('arch', '?')})  " if model else "") + \
        f"data {results['data_dir']} split {results['split']}, {results['images']} images"
    lines = [head]
    for name, r in results["suites"].items():
        lines += [""] + FORMATTERS[name](r)
    return "\n".join(lines) + "\n"
