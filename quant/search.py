"""`agevlm search`: the smallest per-part precision assignment that stays inside the drift budget.

    ladder: int4 (GPTQ, w4a8), int8-dynamic, fp32; per part ordered by that part's measured
            bytes under each scheme, smallest first (fp32 always last)
    1. reference profile (fp32 export), once; the bytes of every part under every scheme
    2. sensitivity: one part at a time on its smallest rung, the rest fp32 -> drift checks;
       severity = max over the checks of value / limit (> 1: that part alone breaks the budget);
       and one group of consecutive decoder layers at a time on the ladder's first scheme
    3. all parts on their smallest rung; while over budget, raise one part by one rung: the
       most sensitive of the parts on the lowest rung left (greedy up, round-robin: every part
       goes up one rung before any goes up two, so one sensitive part is not sent to fp32
       while a rung on the others would have done; on the second smol VLM raising embeddings
       and MLP to fp32 first hid the 0.328x assignment)
    4. greedy down: try each raised part one rung lower again, least sensitive first; keep
       every lowering that stays inside the budget; repeat until a pass lowers nothing (the
       gate is not additive: on a smol VLM self-attention at A16W8 failed by 4% beside an fp32
       MLP and embedding and passed beside A16W8 ones)
    5. layer groups: where a part inside the decoder layers (xattn, self_attn, mlp) stayed
       above the ladder's first scheme, put one layer group at a time on that scheme (least
       sensitive group first, by step 2); keep every group that stays inside the budget
    6. the chosen variant: the smallest (bytes) evaluated assignment inside the budget
    7. with a confirmation limit: the passing candidates, smallest first, gated again on more
       test images (a reference profile on those); the first that passes there is chosen
       (fp32 itself when none does). On the second smol VLM the search's 0.260x pick passed
       on 100 images and failed by one answer on 300, while its 0.270x step passed on both:
       a pick at the edge of the budget is a pick the gate's sample size can flip
Every candidate is really quantized and really evaluated; the path records each one with
its bytes and checks. The result is a local minimum along that path (6 parts x 3 rungs is
729 assignments before any layer split; each evaluation costs a full POPE/CHAIR pass), which
search.json says.
Deterministic for a seed: the seed picks the calibration samples, decoding is greedy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from agevlm_edge.data.datadir import load_meta
from agevlm_edge.errors import BadInput
from agevlm_edge.fsutil import check_out, read_json, staged_dir, write_json_atomic
from agevlm_edge.runtime.manifest import export_bytes

from .calib import read_texts
from .drift import Budget, compare, profile
from .quantize import quantize_export
from .schemes import LAYER_PARTS, PARTS, format_layers, make_recipe, parse_scheme, part_scheme_ok

LADDER = ("int4:algo=gptq", "int8-dynamic", "fp32")
PARTS_INDEX = {p: i for i, p in enumerate(PARTS)}


def severity(res: dict) -> float:
    """How much of the budget the worst check uses (> 1: over budget)."""
    def share(c: dict) -> float:
        v = float("inf") if isinstance(c["value"], str) else max(c["value"], 0.0)
        return v / c["limit"] if c["limit"] > 0 else (float("inf") if v > 1e-9 else 0.0)

    return max(share(c) for c in res["checks"]) if res["checks"] else 0.0


def rounded_severity(res: dict) -> float:
    """severity() as search.json records it (capped, 3 decimals)."""
    return round(min(severity(res), 999.0), 3)


class Search:
    def __init__(self, model_dir: Path, data_dir: Path, budget: Budget, work: Path,
                 ladder: tuple[str, ...], limit: int | None, seed: int, ref_profile: dict | None,
                 calib_text: Path | None = None):
        self.model_dir, self.data_dir, self.budget, self.work = model_dir, data_dir, budget, work
        self.ladder, self.limit, self.seed, self.calib_text = ladder, limit, seed, calib_text
        self.ref = ref_profile or profile(model_dir, data_dir, limit=limit)
        self.fp32_bytes = export_bytes(model_dir)
        self.evaluated: dict[tuple, dict] = {}
        self.ladders = self.part_ladders()
        self.confirm_ref: dict | None = None

    def confirm(self, row: dict, limit: int) -> dict:
        """Gate a candidate that passed again, on the first ``limit`` test images."""
        click.echo(f"[search] confirm {row['candidate']} ({row['size_ratio']:.3f} x fp32) on "
                   f"{limit} images", err=True)
        if self.confirm_ref is None:
            self.confirm_ref = profile(self.model_dir, self.data_dir, limit=limit)
        res = compare(self.confirm_ref, profile(Path(row["dir"]), self.data_dir, limit=limit),
                      self.budget)
        sev = rounded_severity(res)
        click.echo(f"[search]   {'inside' if res['passed'] else 'OVER'} the budget on {limit} "
                   f"images (severity {sev:.2f})", err=True)
        return {"candidate": row["candidate"], "size_ratio": row["size_ratio"], "limit": limit,
                "passed": res["passed"], "severity": sev, "checks": res["checks"]}

    def part_ladders(self) -> dict[str, tuple[str, ...]]:
        """Each part's rungs, smallest first by its measured bytes under each scheme (int4
        leaves the vision stem's Convs fp32, so for the vision part int8 is smaller); fp32
        stays the top rung."""
        size: dict[str, dict[str, int]] = {}
        for spec in self.ladder[:-1]:
            out = self.work / "sizes"
            self.quantize(out, make_recipe(spec), n_quality=1)
            pb = read_json(out / "manifest.json")["part_bytes"]
            size[spec] = {p: sum(g.get(p, 0) for g in pb.values()) for p in PARTS}
            shutil.rmtree(out)
        return {p: tuple(sorted(self.ladder[:-1], key=lambda s: (size[s][p], self.ladder.index(s))))
                + self.ladder[-1:] for p in PARTS}

    def evaluate(self, levels: tuple[int, ...], why: str, layers: dict[int, str] | None = None
                 ) -> dict:
        """Quantize and gate one assignment (part -> rung index, plus decoder layers whose
        in-layer parts take another scheme); cached by assignment."""
        layers = dict(sorted((layers or {}).items()))
        key = (levels, tuple(layers.items()))
        if key in self.evaluated:
            return self.evaluated[key]
        assign = {p: self.ladders[p][i] for p, i in zip(PARTS, levels)}
        reference = all(i == len(self.ladder) - 1 for i in levels) and self.ladder[-1] == "fp32" \
            and not layers
        name = "c" + "".join(str(i) for i in levels)
        if layers:
            name += "-L" + format_layers(layers).replace(",", "_")
        row = self._gate(name, why, assign, layers, reference)
        if layers:
            row["layer_schemes"] = {str(i): sch for i, sch in layers.items()}
        self.evaluated[key] = row
        return row

    def quantize(self, out: Path, recipe, n_quality: int = 16) -> dict:
        """One candidate export, calibrated on the DATA DIR (or --calib-text's texts)."""
        return quantize_export(self.model_dir, out, recipe, calib_dir=self.data_dir,
                               n_quality=n_quality, seed=self.seed, overwrite=True,
                               calib_text=self.calib_text)

    def lowers_layers(self, levels: tuple[int, ...], scheme: str) -> bool:
        """Whether putting decoder layers on ``scheme`` makes some in-layer part smaller."""
        return any(self.ladders[p].index(scheme) < levels[PARTS_INDEX[p]] for p in LAYER_PARTS)

    def evaluate_layers(self, layers: range, scheme: str) -> dict:
        """One group of decoder layers alone on ``scheme``, everything else fp32 (not a
        candidate for the choice: it only says where in depth quantization hurts)."""
        why = f"sensitivity of layers {layers[0]}-{layers[-1]}"
        return {"layers": [layers[0], layers[-1]], "scheme": scheme,
                **self._gate(f"L{layers[0]}-{layers[-1]}", why, {p: "fp32" for p in PARTS},
                             {i: scheme for i in layers}, False)}

    def _gate(self, name: str, why: str, assign: dict, layers: dict, reference: bool) -> dict:
        out = self.work / name
        click.echo(f"[search] {why}: {', '.join(f'{p}={s}' for p, s in assign.items())}"
                   + (f"; layers {format_layers(layers)}={next(iter(layers.values()))}" if layers else ""),
                   err=True)
        if reference:
            q = {"bytes": self.fp32_bytes, "quality": None}
            res = {"checks": [], "passed": True, "reference_itself": True}
        else:
            q = self.quantize(out, make_recipe("fp32", assign, layers))
            res = compare(self.ref, profile(out, self.data_dir, limit=self.limit), self.budget)
        row = {"candidate": name, "dir": str(out), "why": why, "assignment": assign,
               "reference_itself": bool(res.get("reference_itself")),
               "bytes": q["bytes"], "size_ratio": round(q["bytes"] / self.fp32_bytes, 4),
               "quality": q["quality"], "passed": res["passed"],
               "severity": rounded_severity(res),
               "checks": res["checks"], "drift": {k: res.get(k) for k in ("pope", "chair",
                                                                           "grounding", "first_token")}}
        for split in (row["drift"]["pope"] or {}).values():
            split.pop("flipped", None)
        click.echo(f"[search]   {q['bytes'] / 1e6:.2f} MB ({row['size_ratio']:.3f} x fp32), "
                   f"{'inside' if res['passed'] else 'OVER'} the budget "
                   f"(severity {row['severity']:.2f})", err=True)
        return row


def run_search(model_dir: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike,
               budget: Budget = Budget(), ladder: tuple[str, ...] = LADDER,
               limit: int | None = None, seed: int = 0, overwrite: bool = False,
               keep_candidates: bool = False, ref_profile: dict | None = None,
               layer_groups: int = 4, calib_text: str | os.PathLike | None = None,
               confirm_limit: int | None = None) -> dict:
    """Search, then write OUT/variant (the chosen EXPORT DIR) and OUT/search.json.
    ``ref_profile``: the fp32 export's drift.profile on the same images, if already measured.
    ``layer_groups``: also gate each of this many groups of consecutive decoder layers alone
    on the ladder's first scheme (0: not). ``calib_text``: a UTF-8 file, one text per line,
    that every candidate's decoder calibrates on instead of the DATA DIR's prompts.
    ``confirm_limit``: gate the passing candidates again on this many test images (more than
    ``limit``), smallest first, and choose the first that passes there too."""
    model_dir, data_dir, out = Path(model_dir), Path(data_dir), Path(out)
    if not (data_dir / "dataset.json").is_file():
        raise BadInput(f"--data {data_dir} is not a DATA DIR (no dataset.json)")
    if confirm_limit is not None:
        n_test = load_meta(data_dir).get("splits", {}).get("test", {}).get("images", 0)
        if limit is None or limit >= min(confirm_limit, n_test):
            raise BadInput(f"--confirm-limit {confirm_limit} confirms on more images than the "
                           f"search gates on: give --limit below it and below the test split's "
                           f"{n_test} images")
        confirm_limit = min(confirm_limit, n_test)   # what the confirmation really sees
    if calib_text is not None:
        calib_text = Path(calib_text)
        read_texts(calib_text)                       # a bad file fails before any work
    for spec in ladder:
        if not part_scheme_ok(parse_scheme(spec)):
            raise BadInput(f"--ladder: {spec} converts whole graphs and cannot be tried part by "
                           "part; use int8/int4 schemes")
    if len(ladder) < 2 or ladder[-1] != "fp32":
        raise BadInput("the ladder needs at least two schemes and must end with fp32")
    check_out(out, [("EXPORT DIR", model_dir), ("DATA DIR", data_dir)]
              + [("--calib-text file", calib_text)] * (calib_text is not None), overwrite)
    top = len(ladder) - 1
    with staged_dir(out, overwrite=overwrite) as tmp:
        s = Search(model_dir, data_dir, budget, tmp / "candidates", ladder, limit, seed, ref_profile,
                   calib_text)
        sens = {}
        for k, part in enumerate(PARTS):
            levels = tuple(0 if j == k else top for j in range(len(PARTS)))
            sens[part] = s.evaluate(levels, f"sensitivity of {part}")
        n_layers = int(read_json(model_dir / "manifest.json")["model"]["n_layers"])
        layer_sens = [s.evaluate_layers(g, ladder[0]) for g in layer_groups_of(n_layers, layer_groups)]
        order = sorted(PARTS, key=lambda p: (-sens[p]["severity"], p))   # most sensitive first
        levels = [0] * len(PARTS)
        path = [s.evaluate(tuple(levels), "every part on its smallest rung")]
        while not path[-1]["passed"]:
            part = min((p for p in order if levels[PARTS_INDEX[p]] < top),
                       key=lambda p: levels[PARTS_INDEX[p]])      # the first (most sensitive) on
            levels[PARTS_INDEX[part]] += 1                        # the lowest rung left
            path.append(s.evaluate(tuple(levels), f"up: {part} (most sensitive on the lowest rung)"))
        lowered, first = True, True
        while lowered:                  # passes until one lowers nothing: a part that failed to
            lowered = False             # go down may pass once the others have come down
            for part in reversed(order):                                     # least sensitive first
                i = PARTS_INDEX[part]
                while levels[i] > 0:
                    trial = list(levels)
                    trial[i] -= 1
                    n = len(s.evaluated)
                    row = s.evaluate(tuple(trial), f"down: {part}")
                    if first or len(s.evaluated) > n:    # later passes add only new candidates
                        path.append(row)
                    if not row["passed"]:
                        break
                    levels, lowered = trial, True
            first = False
        layers: dict[int, str] = {}
        if s.lowers_layers(tuple(levels), ladder[0]):
            for g in sorted(layer_sens, key=lambda r: (r["severity"], r["layers"][0])):
                trial_layers = {**layers, **{i: ladder[0] for i in range(g["layers"][0], g["layers"][1] + 1)}}
                row = s.evaluate(tuple(levels), f"down: layers {g['layers'][0]}-{g['layers'][1]} "
                                 f"to {ladder[0]}", trial_layers)
                path.append(row)
                if row["passed"]:
                    layers = trial_layers
        passing = sorted((r for r in s.evaluated.values() if r["passed"]),
                         key=lambda r: (r["bytes"], r["candidate"]))
        best, confirmations = passing[0], []
        if confirm_limit is not None:
            for row in passing:
                if row["reference_itself"]:
                    best = row
                    break
                confirmations.append(s.confirm(row, confirm_limit))
                row["confirmed"] = confirmations[-1]["passed"]
                if row["confirmed"]:
                    best = row
                    break
            else:                                    # nothing held on more images: fp32 itself
                best = s.evaluate((top,) * len(PARTS), "fp32 itself: no candidate passed the "
                                  "confirmation")
        result = {"reference": str(model_dir), "data": str(data_dir), "budget": budget.__dict__,
                  "ladder": list(ladder), "part_ladders": s.ladders, "seed": seed, "limit": limit,
                  "calib_text": str(calib_text) if calib_text is not None else None,
                  "confirm_limit": confirm_limit, "confirmations": confirmations,
                  "fp32_bytes": s.fp32_bytes, "sensitivity": [sens[p] for p in PARTS],
                  "layer_sensitivity": layer_sens,
                  "path": path, "chosen": best,
                  "method": "greedy up (round-robin by sensitivity), then greedy down (until a "
                            "pass lowers nothing), then layer groups down; "
                            f"a local minimum over {len(s.evaluated)} evaluated assignments of "
                            f"{len(ladder) ** len(PARTS)} whole-part ones"}
        if best["reference_itself"]:
            result["variant"] = str(model_dir)       # nothing smaller passed: fp32 itself
        else:
            shutil.move(best["dir"], tmp / "variant")
            result["variant"] = str(out / "variant")
        for row in layer_sens:
            row["dir"] = str(out / "candidates" / row["candidate"]) if keep_candidates else None
        for row in s.evaluated.values():             # where each candidate is once OUT is in place
            row["dir"] = (str(out / "variant") if row is best and not row["reference_itself"] else
                          str(model_dir) if row["reference_itself"] else
                          str(out / "candidates" / row["candidate"]) if keep_candidates else None)
        result["explanation"] = explain(result)
        if not keep_candidates:
            shutil.rmtree(tmp / "candidates", ignore_errors=True)
        write_json_atomic(tmp / "search.json", result)
    return result



def layer_groups_of(n_layers: int, groups: int) -> list[range]:
    """``n_layers`` decoder layers in ``groups`` runs of consecutive layers, sizes within one."""
    groups = min(groups, n_layers)
    bounds = [round(k * n_layers / groups) for k in range(groups + 1)] if groups else [0]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def assignment_text(row: dict) -> str:
    """"embed=int4, ..., mlp=int8-dynamic; layers 0-1=int4" for a search row."""
    text = ", ".join(f"{p}={v}" for p, v in row["assignment"].items())
    by_scheme: dict[str, list[int]] = {}
    for i, sch in row.get("layer_schemes", {}).items():
        by_scheme.setdefault(sch, []).append(int(i))
    return text + "".join(f"; layers {format_layers(idx)}={sch}" for sch, idx in by_scheme.items())


def format_search(res: dict) -> str:
    """The sensitivity table, the path and the choice."""
    head = f"{'candidate':<10} {'size':>6} {'sev':>6}  {'':<6} assignment"
    rows = lambda rs: [f"{r['candidate']:<10} {r['size_ratio']:>6.3f} {r['severity']:>6.2f}  "
                       f"{'ok' if r['passed'] else 'OVER':<6} " + assignment_text(r) for r in rs]
    lines = ["sensitivity (one part on its smallest rung, the rest fp32; size x fp32; severity = "
             "worst check / its limit)", head] + rows(res["sensitivity"])
    if res.get("layer_sensitivity"):
        lines += ["", "layer sensitivity (one group of decoder layers - self-attention, MLP and "
                  "the cross-attention before them - alone on "
                  f"{res['layer_sensitivity'][0]['scheme']}, the rest fp32)",
                  f"{'layers':<10} {'size':>6} {'sev':>6}"]
        lines += [f"{'{}-{}'.format(*r['layers']):<10} {r['size_ratio']:>6.3f} {r['severity']:>6.2f}  "
                  f"{'ok' if r['passed'] else 'OVER'}" for r in res["layer_sensitivity"]]
    lines += ["", "path", head] + rows(res["path"])
    if res.get("confirm_limit"):
        lines += ["", f"confirmation on {res['confirm_limit']} images (candidates that passed on "
                  f"{res['limit']}, smallest first, until one passes)", head[:24]]
        lines += [f"{r['candidate']:<10} {r['size_ratio']:>6.3f} {r['severity']:>6.2f}  "
                  f"{'ok' if r['passed'] else 'OVER'}" for r in res["confirmations"]]
    c = res["chosen"]
    lines += ["", f"chosen: {c['candidate']} = {c['size_ratio']:.3f} x fp32 "
              f"({c['bytes'] / 1e6:.2f} MB) -> {res['variant']}", f"({res['method']})",
              res["explanation"]]
    return "\n".join(lines) + "\n"


def explain(res: dict) -> str:
    """Why the choice is what it is, with figures (also when nothing reaches 0.3 x fp32)."""
    c = res["chosen"]
    smallest = min(res["path"], key=lambda r: r["bytes"])
    held = ""
    if res.get("confirm_limit"):
        conf, failed = res["confirmations"], [r for r in res["confirmations"] if not r["passed"]]
        if conf and len(failed) == len(conf):
            return (f"{len(conf)} candidates passed on {res['limit']} images and none of them on "
                    f"{res['confirm_limit']}: the chosen variant is fp32 itself")
        if not c["reference_itself"]:
            held = (f"; it holds on {res['limit']} images and on {res['confirm_limit']}"
                    + (f" ({len(failed)} smaller candidate{'s' * (len(failed) > 1)} passed on "
                       f"{res['limit']} and failed on {res['confirm_limit']})" if failed else ""))
    if c["size_ratio"] <= 0.3:
        return f"the chosen variant is {c['size_ratio']:.3f} x fp32, inside the budget{held}"
    if smallest["passed"]:
        return (f"nothing on this ladder is smaller than {smallest['size_ratio']:.3f} x fp32 "
                f"(every part on its smallest scheme), and that passes: no variant <= 0.3 x exists here{held}")
    fails = "; ".join(f"{ch['check']} {ch['value']} > {ch['limit']}" for ch in smallest["checks"]
                      if not ch["passed"])
    return (f"no variant <= 0.3 x fp32 stayed inside the budget: every part on its smallest "
            f"scheme ({smallest['size_ratio']:.3f} x) failed {fails}{held}")
