"""The mobile-gpu export on onnxruntime's WebGPU execution provider (Dawn on Mesa's software
Vulkan), in the separate venv that scripts/setup_webgpu.sh makes (`make test` runs it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from test_export import _run_dir

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv-webgpu" / "bin" / "python"


@pytest.fixture(scope="module")
def mobile_export(tmp_path_factory, small_world):
    from agevlm_edge.data.tokenizer import corpus, train_bpe
    from agevlm_edge.export.onnx_export import export_run

    if not VENV_PY.is_file():
        pytest.skip("no .venv-webgpu: run scripts/setup_webgpu.sh (make test does) to install "
                    "onnxruntime-webgpu and Mesa's software Vulkan")
    root = tmp_path_factory.mktemp("webgpu")
    run = _run_dir(root / "run", train_bpe(corpus(small_world), 400), "xattn")
    export_run(run, root / "export", target="mobile-gpu", xattn_probs=False, n_pairs=2)
    return root / "export"


def test_mobile_gpu_graphs_run_on_webgpu_and_match_cpu(mobile_export):
    proc = subprocess.run([str(VENV_PY), str(ROOT / "tests" / "webgpu_probe.py"), str(mobile_export)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    for name, g in res["graphs"].items():
        for out, d in g["outputs"].items():
            assert d["max_abs_diff"] <= 1e-4 * max(1.0, d["ref_abs_max"]), (name, out, d)
        assert g.get("top1_agreement", 1.0) == 1.0
        heavy = {node: ep for node, (op, ep) in g["placement"].items()
                 if op in ("MatMul", "MultiHeadAttention", "Conv")}
        assert heavy and all(ep == "WebGpuExecutionProvider" for ep in heavy.values()), \
            {n: ep for n, ep in heavy.items() if ep != "WebGpuExecutionProvider"}
    ops = {op for op, _ in res["graphs"]["decoder"]["placement"].values()}
    assert "MultiHeadAttention" in ops
