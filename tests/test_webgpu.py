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


def _need_venv() -> None:
    if not VENV_PY.is_file():
        pytest.skip("no .venv-webgpu: run scripts/setup_webgpu.sh (make test does) to install "
                    "onnxruntime-webgpu and Mesa's software Vulkan")


def _close(d: dict, tol: float) -> bool:
    """A probe comparison {max_abs_diff, ref_abs_max} within tol of the outputs' scale."""
    return d["max_abs_diff"] <= tol * max(1.0, d["ref_abs_max"])


@pytest.fixture(scope="module")
def mobile_export(tmp_path_factory, small_world):
    from agevlm_edge.data.tokenizer import corpus, train_bpe
    from agevlm_edge.export.onnx_export import export_run

    _need_venv()
    root = tmp_path_factory.mktemp("webgpu")
    run = _run_dir(root / "run", train_bpe(corpus(small_world), 400), "xattn", head_dim=16)
    export_run(run, root / "export", target="mobile-gpu", xattn_probs=False, n_pairs=2)
    return root / "export"


def test_a_hf_vit_tower_runs_on_webgpu_as_on_cpu(tmp_path, small_world):
    """A SigLIP tower's attention stays a MatMul/Softmax chain in the mobile-gpu vision graph
    (export.fusion.ort_fuse): fused into com.microsoft Attention it was 14% off on WebGPU."""
    from agevlm_edge.export.onnx_export import export_run
    from test_hf_vision import hf_run_dir

    _need_venv()
    export_run(hf_run_dir(tmp_path, "siglip", small_world), tmp_path / "export",
               target="mobile-gpu", xattn_probs=False, n_pairs=2)
    g = _probe(tmp_path / "export")["graphs"]["vision"]
    for out, d in g["outputs"].items():
        assert _close(d, 1e-4), (out, d)
    placed = list(g["placement"].values())
    assert {ep for op, ep in placed if op in ("Softmax", "MatMul")} == {"WebGpuExecutionProvider"}
    assert {"Softmax", "MatMul"} <= {op for op, _ in placed} and "Attention" not in {op for op, _ in placed}


@pytest.fixture(scope="module")
def mobile_fp16(mobile_export):
    from agevlm_edge.quant.quantize import quantize_export
    from agevlm_edge.quant.schemes import make_recipe

    out = mobile_export.parent / "export-fp16"
    quantize_export(mobile_export, out, make_recipe("fp16"), n_quality=2)
    return out


def _probe(export_dir) -> dict:
    proc = subprocess.run([str(VENV_PY), str(ROOT / "tests" / "webgpu_probe.py"), str(export_dir)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    return res


# fp32: WebGPU as exact as the CPU provider; fp16 (both providers run the fp16 graph, with
# different kernels and accumulation orders): within 1% of the outputs' scale.
@pytest.mark.parametrize("variant,tol", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_mobile_gpu_graphs_run_on_webgpu_and_match_cpu(request, mobile_export, variant, tol):
    res = _probe(mobile_export if variant == "fp32" else request.getfixturevalue("mobile_fp16"))
    for name, g in res["graphs"].items():
        for out, d in g["outputs"].items():
            assert _close(d, tol), (name, out, d)
        heavy = {node: ep for node, (op, ep) in g["placement"].items()
                 if op in ("MatMul", "GroupQueryAttention", "MultiHeadAttention", "Conv")}
        assert heavy and all(ep == "WebGpuExecutionProvider" for ep in heavy.values()), \
            {n: ep for n, ep in heavy.items() if ep != "WebGpuExecutionProvider"}
    assert res["graphs"]["decoder"]["top1_agreement"] == 1.0
    # A multi-token step beyond 8 keys: where the graph is off on this adapter (onnxruntime's
    # flash prefill kernel, see agevlm_edge.runtime.session.Runtime.multi_token_fault), the
    # runtime must have noticed it and prefilled one token per call.
    prefill = res["graphs"]["decoder"]["prefill"]["outputs"]["logits"]
    if not _close(prefill, tol):
        assert res["prefill_fault"], prefill
    # The runtime on WebGPU: the KV cache kept in device memory between steps, appended to in
    # place, decodes exactly as a grown copy per step and the host-memory round trip do, and
    # (fp32) as the CPU provider does.
    gens = res["generations"]
    assert gens["webgpu_kv_device"] == gens["webgpu_kv_grown"] == gens["webgpu_kv_host"]
    assert len(gens["cpu"]) == 2
    if variant == "fp32":
        assert gens["webgpu_kv_device"] == gens["cpu"]
    # In place: six decode steps give the grown copy's logits; the cache, reserved for 3 steps
    # past the prompt, is the very same device buffers from step to step except where it grows
    # (once, to twice its capacity).
    steps = res["inplace_steps"]
    assert res["kv_inplace"] and _close(steps, tol), steps
    cap = steps["prompt_keys"] + 3
    assert steps["capacity"] == [cap] * 3 + [2 * cap] * 3, steps
    assert steps["kept"] == [True, True, True, False, True, True], steps
    ops = {op for op, _ in res["graphs"]["decoder"]["placement"].values()}
    # every attention one fused op: the cross-attention's MultiHeadAttention too (its query
    # and key padded: onnxruntime's flash path was wrong for multi-token queries here)
    assert {"GroupQueryAttention", "MultiHeadAttention"} <= ops and "Softmax" not in ops


def test_concat_mobile_gpu_export_runs_on_webgpu_and_matches_cpu(tmp_path, small_world):
    """The LLaVA-style baseline's mobile-gpu export: its self-attention (image rows, left
    padding, text in one cache) as MultiHeadAttention, placed on WebGPU, a decode step as on
    CPU. Its prefill feeds the image rows in one multi-token step: where this adapter gets
    those wrong, the runtime refuses the provider with a clear error instead of answering."""
    from agevlm_edge.data.tokenizer import corpus, train_bpe
    from agevlm_edge.export.onnx_export import export_run

    _need_venv()
    run = _run_dir(tmp_path / "run", train_bpe(corpus(small_world), 400), "concat", head_dim=16)
    export_run(run, tmp_path / "export", target="mobile-gpu", n_pairs=2)
    res = _probe(tmp_path / "export")
    for name, g in res["graphs"].items():
        for out, d in g["outputs"].items():
            assert _close(d, 1e-4), (name, out, d)
    placed = res["graphs"]["decoder"]["placement"].values()
    assert {ep for op, ep in placed if op in ("MatMul", "MultiHeadAttention")} == {"WebGpuExecutionProvider"}
    assert "MultiHeadAttention" in {op for op, _ in placed}
    assert res["graphs"]["decoder"]["top1_agreement"] == 1.0
    prefill = res["graphs"]["decoder"]["prefill"]["outputs"]["logits"]
    if not _close(prefill, 1e-4):
        assert "use --provider cpu" in res["runtime_error"], res.get("runtime_error")
    else:
        gens = res["generations"]
        assert gens["webgpu_kv_device"] == gens["webgpu_kv_host"] == gens["cpu"]
