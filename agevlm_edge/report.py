"""`agevlm report`: accuracy vs size of model variants, as report.md, a self-contained
report.html (plots embedded), report.json and PNG plots.

    EXPORT DIRs --eval suite (onnxruntime) + bench (one process each)--> rows
    RUN DIRs    --eval suite (PyTorch)------------------------------> rows (guided / ca / concat)
    extra rows  (bitsandbytes variants, measured by the caller)-----> rows
    search OUT  --search.json (recorded by `agevlm search`)----------> sensitivity table
    rows --> tables, size-vs-POPE-adversarial-F1 and size-vs-CHAIR_i with the Pareto front,
             decode tokens/s and time to first token per export

Every number is measured by this command on the given DATA DIR, except the top-1 / KL
columns (read from each manifest's quality check, measured by `agevlm quantize`) and the
search tables (read from search.json, measured by `agevlm search`); report.json keeps the
command line and each row's source directory.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from .errors import BadInput
from .fsutil import check_out, read_json, staged_dir, write_json_atomic, write_text_atomic

POPE_SPLITS = ("random", "popular", "adversarial")


def classify(d: Path) -> str:
    if (d / "search.json").is_file():
        return "search"
    if (d / "manifest.json").is_file():
        return "export"
    if (d / "model.safetensors").is_file():
        return "run"
    raise BadInput(f"{d} is not an EXPORT DIR, RUN DIR or search output (no manifest.json, "
                   "model.safetensors or search.json)")


def metrics_row(name: str, kind: str, results: dict, nbytes: int, **extra) -> dict:
    """One table row from an eval results dict (eval.suite.evaluate)."""
    s = results["suites"]
    pope = s.get("pope", {}).get("files", {})
    g = s.get("grounding", {})
    return {"name": name, "kind": kind, "bytes": nbytes,
            "pope_f1": {v: pope[v]["f1"] for v in POPE_SPLITS if v in pope},
            "chair_i": s.get("chair", {}).get("chair_i"), "chair_s": s.get("chair", {}).get("chair_s"),
            "grounding_iou": g.get("iou") if isinstance(g.get("iou"), float) else None,
            "images": results["images"], **extra}


def _export_row(d: Path, data_dir: Path, limit: int | None, drift_profile: dict | None = None) -> dict:
    """``drift_profile``: quant.drift.profile of ``d`` on the same images, if already measured
    (the same POPE / CHAIR / grounding runs the evaluation would repeat)."""
    from .eval.suite import evaluate
    from .runtime.manifest import export_bytes, load_manifest

    man = load_manifest(d)
    grounding = man.get("xattn_probs") or man["model"]["arch"] == "concat"   # what the export can run
    if drift_profile is not None:
        res = {"images": drift_profile["images"],
               "suites": {k: drift_profile[k] for k in ("pope", "chair", "grounding")}}
    else:
        res = evaluate(d, data_dir, limit=limit,
                       suites=("pope", "chair") + ("grounding",) * bool(grounding))
    nbytes = export_bytes(d, man)
    q = man.get("quality") or {}
    name = f"{d.parent.name}/{d.name}" if d.parent.name else d.name    # search/variant, not variant
    return metrics_row(name, "export", res, nbytes, scheme=man.get("precision"),
                       arch=man["model"]["arch"], target=man.get("target"),
                       top1_agreement=q.get("top1_agreement"), kl=q.get("kl_mean"), dir=str(d))


def torch_decode_speed(model, tokenizer, pre, prompt_len: int = 32, new_tokens: int = 32,
                       repeats: int = 2, attn_impl: str = "fused") -> dict:
    """The runtime's bench protocol (runtime.bench.measure) on a PyTorch model: one seeded
    image, a fixed prompt, median per-token latency of greedy steps after a warm-up."""
    import statistics
    import time

    import numpy as np
    import torch

    from .runtime.bench import decode_loop, prompt_of

    cfg = model.cfg
    image = np.random.default_rng(0).integers(0, 256, (1, 3, cfg.image_size, cfg.image_size), dtype=np.uint8)
    ids = torch.tensor([prompt_of(tokenizer, prompt_len, cfg.bos_id)])
    ttft, per_token = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            img = model.image_tokens(torch.from_numpy(pre.normalize(image)))
            kv = model.cross_kv(img) if cfg.arch == "xattn" else None
            out = model(ids, image_tokens=img if kv is None else None, cross_kv=kv,
                        attn_impl=attn_impl)
            ttft.append(time.perf_counter() - t0)
            box = {"past": out.past_key_values}

            def step(t):
                o = model(torch.as_tensor(t), cross_kv=kv, past_key_values=box["past"],
                          attn_impl=attn_impl)
                box["past"] = o.past_key_values
                return o.logits.numpy()

            per_token.append(statistics.median(decode_loop(step, out.logits.numpy(), new_tokens)))
    return {"ttft_ms": 1e3 * statistics.median(ttft[1:]),
            "decode_ms_per_token": 1e3 * statistics.median(per_token[1:]),
            "decode_tokens_per_s": 1 / statistics.median(per_token[1:])}


def _run_row(d: Path, data_dir: Path, limit: int | None) -> dict:
    from .checkpoint import load_model_files
    from .eval.suite import evaluate

    res = evaluate(d, data_dir, limit=limit, suites=("pope", "chair", "grounding"))
    cfg = read_json(d / "config.json", "config.json")
    variant = cfg.get("recipe", {}).get("variant") or cfg.get("variant") or cfg["model"]["arch"]
    speed = torch_decode_speed(*load_model_files(d)[:3])
    return metrics_row(d.name, "run (PyTorch fp32)", res, (d / "model.safetensors").stat().st_size,
                       scheme="fp32 torch", arch=cfg["model"]["arch"], variant=variant, dir=str(d),
                       **speed)


def pareto(points: list[tuple[float, float]], lower_y_better: bool) -> list[int]:
    """Indices on the Pareto front: no other point is at most as big and at least as good."""
    better = (lambda a, b: a <= b) if lower_y_better else (lambda a, b: a >= b)
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(j != i and xj <= x and better(yj, y) and (xj, yj) != (x, y)
                        for j, (xj, yj) in enumerate(points))
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _scatter(rows: list[dict], key, ylabel: str, lower_better: bool, path: Path, title: str) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["bytes"] / 1e6, key(r), r) for r in rows if key(r) is not None]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
    for x, y, r in pts:
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto([(x, y) for x, y, _ in pts], lower_better)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:red",
            linestyle="--", marker="o", mfc="none", ms=11, label="Pareto front", zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("size (MB, log scale)")
    ax.set_ylabel(ylabel + (" (lower is better)" if lower_better else " (higher is better)"))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _speed_plot(rows: list[dict], path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("decode_tokens_per_s")]
    if not rows:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.6), dpi=110)
    labels = [r["label"] for r in rows]
    a.barh(labels, [r["decode_tokens_per_s"] for r in rows], color="tab:green")
    a.set_xlabel("decode tokens/s (higher is better)")
    b.barh(labels, [r["ttft_ms"] for r in rows], color="tab:orange")
    b.set_xlabel("time to first token, ms (image + prompt; lower is better)")
    b.set_yticklabels([])
    for ax in (a, b):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _f(x, d: int = 3) -> str:
    return "-" if x is None else f"{x:.{d}f}" if isinstance(x, float) else str(x)


def markdown(rep: dict) -> str:
    from .quant.search import assignment_text

    rows = rep["rows"]
    ref = rep.get("fp32_bytes")
    out = ["# agevlm accuracy vs size report", "",
           f"Data: `{rep['data']}` ({rep['split']} split, {rows[0]['images'] if rows else 0} images). "
           f"Command: `{rep['command']}`", "",
           "| variant | kind | size MB | x fp32 | POPE F1 rand | pop | adv | CHAIR_i | CHAIR_s | "
           "grounding IoU | top-1 vs fp32 | KL | tok/s | TTFT ms |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["pope_f1"]
        out.append(f"| {r['label']} | {r['kind']} | {r['bytes'] / 1e6:.2f} | "
                   f"{_f(r['bytes'] / ref if ref and r['kind'] == 'export' else None, 3)} | "
                   + " | ".join(_f(p.get(v)) for v in POPE_SPLITS)
                   + f" | {_f(r['chair_i'])} | {_f(r['chair_s'])} | {_f(r['grounding_iou'])} | "
                   f"{_f(r.get('top1_agreement'))} | {_f(r.get('kl'), 4)} | "
                   f"{_f(r.get('decode_tokens_per_s'), 1)} | {_f(r.get('ttft_ms'), 1)} |")
    out += ["", "Size and speed of PyTorch rows are weights in memory and eager decoding "
            "(bitsandbytes on this CPU saves memory, not time); export rows are file bytes "
            "and onnxruntime decoding, one process per export, median of rounds.", ""]
    archs = [r for r in rows if r["kind"] == "run (PyTorch fp32)"]
    if len({r.get("variant") for r in archs}) > 1:
        out += ["## Architectures (same data, same evaluation)", "",
                "| run | variant | POPE F1 adv | CHAIR_i | grounding IoU |", "|---|---|---:|---:|---:|"]
        out += [f"| {r['name']} | {r.get('variant')} | {_f(r['pope_f1'].get('adversarial'))} | "
                f"{_f(r['chair_i'])} | {_f(r['grounding_iou'])} |" for r in archs] + [""]
    for s in rep.get("searches", []):
        out += [f"## Precision search ({s['file']})", "", s["method"], "",
                "| candidate | assignment | x fp32 | severity | inside budget |",
                "|---|---|---:|---:|---|"]
        out += [f"| {r['candidate']} ({r['why']}) | "
                + (f"layers {r['layers'][0]}-{r['layers'][1]}={r['scheme']}, the rest fp32"
                   if "layers" in r else assignment_text(r))
                + f" | {r['size_ratio']:.3f} | {r['severity']:.2f} | {'yes' if r['passed'] else 'no'} |"
                for r in s["sensitivity"] + s.get("layer_sensitivity", []) + s["path"]]
        if s.get("confirmations"):
            out += ["", f"Confirmation on {s['confirm_limit']} images (candidates that passed on "
                    f"{s['limit']}, smallest first, until one passes):", "",
                    "| candidate | x fp32 | severity | inside budget |", "|---|---:|---:|---|"]
            out += [f"| {r['candidate']} | {r['size_ratio']:.3f} | {r['severity']:.2f} | "
                    f"{'yes' if r['passed'] else 'no'} |" for r in s["confirmations"]]
        out += ["", f"Chosen: {s['chosen']['candidate']} at {s['chosen']['size_ratio']:.3f} x fp32.", ""]
    out += [f"![{p}]({p})" for p in rep["plots"]]
    return "\n".join(out) + "\n"


def html(md_text: str, out_dir: Path) -> str:
    """report.md as HTML with its PNGs embedded (no external files, no network)."""
    import html as _h

    body = []
    in_table = False
    for line in md_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-:"):
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" +
                        "".join(f"<{tag}>{_h.escape(c)}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            data = base64.b64encode((out_dir / name).read_bytes()).decode()
            body.append(f'<p><img alt="{_h.escape(name)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_h.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_h.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:"
             "collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>agevlm report</title>" \
           f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def check_report_args(dirs: list, out: str | os.PathLike, data_dir: str | os.PathLike,
                      overwrite: bool) -> list[tuple[Path, str, dict | None]]:
    """Every input classified (with its search.json read, for a search OUT) and --out checked
    before anything is measured."""
    data_dir, out = Path(data_dir), Path(out)
    if not (data_dir / "dataset.json").is_file():
        raise BadInput(f"--data {data_dir} is not a DATA DIR (no dataset.json)")
    kinds = [(Path(d), classify(Path(d))) for d in dirs]
    seen: dict[str, Path] = {}
    for d, _ in kinds:
        real = os.path.realpath(d)
        if real in seen:   # it would be measured twice and shown as two rows
            raise BadInput(f"{d} is given twice (also as {seen[real]}); give each directory once")
        seen[real] = d
    check_out(out, [("input", d) for d, _ in kinds] + [("DATA DIR", data_dir)], overwrite)
    return [(d, kind, read_search(d) if kind == "search" else None) for d, kind in kinds]


def read_search(d: Path) -> dict:
    """search.json of a search OUT, with the keys the report reads."""
    s = read_json(d / "search.json", "search.json")
    shape = {"method": str, "sensitivity": list, "path": list, "chosen": dict}
    if not isinstance(s, dict) or any(not isinstance(s.get(k), t) for k, t in shape.items()):
        raise BadInput(f"{d}/search.json lacks {', '.join(shape)} in the form `agevlm search` "
                       "writes; run the search again")
    return {**s, "file": str(d / "search.json")}


def build_report(dirs: list[str | os.PathLike], out: str | os.PathLike, data_dir: str | os.PathLike,
                 limit: int | None = None, bench_rounds: int = 1, extra_rows: list[dict] = (),
                 overwrite: bool = False, command: str = "", profiles: dict | None = None,
                 checked: list | None = None) -> dict:
    """Measure every dir, then write report.{md,html,json} and the plots into ``out``.
    ``profiles``: {export dir: quant.drift.profile on this data's test split with ``limit``},
    used instead of evaluating those exports again. ``checked``: check_report_args' answer
    for these very arguments, when the caller has it already."""
    from .runtime.bench import bench_dirs

    kinds = checked or check_report_args(dirs, out, data_dir, overwrite)
    data_dir, out = Path(data_dir), Path(out)
    rows, searches = [], []
    for d, kind, search in kinds:
        if search is not None:
            searches.append(search)
        else:
            rows.append(_export_row(d, data_dir, limit, (profiles or {}).get(str(d)))
                        if kind == "export" else _run_row(d, data_dir, limit))
    exports = [r for r in rows if r["kind"] == "export"]
    if exports and bench_rounds > 0:
        speed = {s["dir"]: s for s in bench_dirs([r["dir"] for r in exports], rounds=bench_rounds,
                                                 repeats=2, new_tokens=32)}
        for r in exports:
            r.update({k: speed[r["dir"]][k] for k in ("decode_tokens_per_s", "ttft_ms", "peak_rss_mb")})
    rows += list(extra_rows)
    for r in rows:      # mixed recipes are long: their directory name is the label
        scheme = r.get("scheme") or ""
        r["label"] = r.get("label") or (scheme if r["kind"] == "export" and "," not in scheme
                                        else r["name"])
    labels = [r["label"] for r in rows]
    for r in rows:
        if labels.count(r["label"]) > 1:
            r["label"] = f"{r['label']} ({r['name']})"
    fp32 = [r["bytes"] for r in exports if r.get("scheme") == "fp32"]
    rep = {"command": command or "agevlm_edge.report.build_report", "data": str(data_dir),
           "split": "test", "limit": limit, "rows": rows, "searches": searches,
           "fp32_bytes": fp32[0] if fp32 else None, "plots": []}
    with staged_dir(out, overwrite=overwrite) as tmp:
        if _scatter(rows, lambda r: r["pope_f1"].get("adversarial"), "POPE adversarial F1", False,
                    tmp / "size_vs_pope_adversarial.png", "Size vs POPE adversarial F1"):
            rep["plots"].append("size_vs_pope_adversarial.png")
        if _scatter(rows, lambda r: r["chair_i"], "CHAIR_i", True, tmp / "size_vs_chair_i.png",
                    "Size vs CHAIR_i (object hallucination in captions)"):
            rep["plots"].append("size_vs_chair_i.png")
        if _speed_plot(exports, tmp / "speed.png"):
            rep["plots"].append("speed.png")
        md = markdown(rep)
        write_text_atomic(tmp / "report.md", md)
        write_text_atomic(tmp / "report.html", html(md, tmp))
        write_json_atomic(tmp / "report.json", rep)
    return rep
