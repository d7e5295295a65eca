"""`agevlm pipeline --short`: every existing stage runs and records itself."""

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
                      "export mobile-gpu", "infer"]
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
    # An existing run is never clobbered without --overwrite.
    assert_one_line_error(run_cli("pipeline", "--out", out, "--short"), "--overwrite")
    assert (out / "pipeline.json").is_file()
