"""`agevlm pipeline --short`: every stage runs and records itself."""

from __future__ import annotations

import json

from agevlm_edge.data.datadir import load_meta
from conftest import assert_one_line_error, run_cli


def test_short_pipeline_runs_every_stage(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("pipeline", "--out", out, "--short", check_rc=0)
    assert "pipeline finished" in proc.stdout
    stages = [s["stage"] for s in json.loads((out / "pipeline.json").read_text())["stages"]]
    assert stages == ["data synth", "data masks", "data tokenizer", "train", "eval", "export cpu",
                      "export mobile-gpu", "infer", "quantize", "drift", "search", "report"]
    manifest = json.loads((out / "export-cpu" / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["target"] == "cpu"
    assert json.loads((out / "export-mobile-gpu" / "manifest.json").read_text())["parity"]["passed"]
    assert (out / "heatmap.png").stat().st_size > 0
    assert (out / "run" / "model.safetensors").is_file()
    results = json.loads((out / "eval.json").read_text())
    assert {"pope", "chair", "grounding", "itm", "vqa"} <= set(results["suites"])
    meta = load_meta(out / "data")
    assert meta["splits"]["train"]["images"] == 400
    assert (out / "data" / "tokenizer.json").is_file()
    int4 = json.loads((out / "quant-int4-b32-gptq" / "manifest.json").read_text())
    assert int4["scheme"]["recipe"]["parts"]["mlp"]["algo"] == "gptq" and int4["quality"]["positions"] > 0
    assert {"passed", "checks", "pope"} <= set(json.loads((out / "drift-int8-qdq.json").read_text()))
    search = json.loads((out / "search" / "search.json").read_text())
    assert search["chosen"]["passed"] and len(search["sensitivity"]) == 6
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["rows"]) >= 7 and "size_vs_pope_adversarial.png" in report["plots"]
    assert "speed.png" in report["plots"] and (out / "report" / "report.html").stat().st_size > 10000
    # An existing run is never clobbered without --overwrite.
    assert_one_line_error(run_cli("pipeline", "--out", out, "--short"), "--overwrite")
    assert (out / "pipeline.json").is_file()


def test_pipeline_settings_are_checked_before_anything_is_written(tmp_path):
    import torch

    out = tmp_path / "p"
    assert_one_line_error(run_cli("pipeline", "--out", out, "--short", "--scale", "2"),
                          "--short or --scale")
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli("pipeline", "--out", out, "--device", "cuda"), "no CUDA GPU")
    for scale in ("nan", "inf"):
        assert_one_line_error(run_cli("pipeline", "--out", out, "--scale", scale),
                              "--scale must be a finite number")
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert_one_line_error(run_cli("pipeline", "--out", afile, "--short"), "is a file")
    assert afile.read_text() == "keep"
