"""ONNX export (graphs, fusion, parity, manifest) and the torch-free device runtime, on tiny
random models with open gates (the image must matter)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from agevlm_edge.errors import BadInput, CheckFailed
from conftest import assert_one_line_error, run_cli

S = 64


@pytest.fixture(scope="module")
def tokenizer(small_world):
    from agevlm_edge.data.tokenizer import corpus, train_bpe

    return train_bpe(corpus(small_world), 400)


def _run_dir(path, tokenizer, arch: str, **cfg):
    import torch

    from agevlm_edge.checkpoint import save_model_files
    from agevlm_edge.model import AgeVLM, AgeVLMConfig
    from agevlm_edge.preprocess import Preprocessor

    torch.manual_seed(1)
    cfg = AgeVLMConfig(image_size=S, patch_size=8, vision_width=32, vision_heads=2,
                       vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=2, n_heads=4,
                       n_kv_heads=2, ffn_hidden=64, arch=arch, max_seq_len=128, **cfg)
    model = AgeVLM(cfg).eval()
    with torch.no_grad():
        for blk in model.decoder.xattn.values():
            blk.attn_gate.fill_(0.7)
            blk.mlp_gate.fill_(0.7)
    save_model_files(path, model, tokenizer, Preprocessor(S))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("runs")
    runs = {a: _run_dir(root / a, tokenizer, a) for a in ("xattn", "concat")}
    # GroupQueryAttention (mobile-gpu) takes head sizes divisible by 16 only
    runs["xattn16"] = _run_dir(root / "xattn16", tokenizer, "xattn", head_dim=16)
    return runs


@pytest.fixture(scope="module")
def exported(tmp_path_factory, runs, small_world):
    from agevlm_edge.export.onnx_export import export_run

    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, run, kw in (("xattn", runs["xattn"], {}), ("concat", runs["concat"], {}),
                          ("unfused", runs["xattn"], {"fused": False, "xattn_probs": False}),
                          ("inplace", runs["xattn16"], {"xattn_probs": False}),
                          ("mobile", runs["xattn16"], {"target": "mobile-gpu", "xattn_probs": False}),
                          ("mobile8", runs["xattn"], {"target": "mobile-gpu", "xattn_probs": False})):
        export_run(run, root / name, data_dir=small_world, **kw)
        out[name] = root / name
    return out


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


# ----------------------------------------------------------------------------- export
def test_export_manifest_parity_and_fused_ops(exported, runs):
    from agevlm_edge.fsutil import sha256_file

    man = _manifest(exported["xattn"])
    assert man["format_version"] == 1 and man["target"] == "cpu" and man["fused"] is True
    for name, digest in man["files"].items():
        assert sha256_file(exported["xattn"] / name) == digest
    assert man["source"]["model_sha256"] == sha256_file(runs["xattn"] / "model.safetensors")
    p = man["parity"]
    assert p["passed"] and p["logits_max_abs_diff"] <= 1e-4 and p["xattn_probs_max_abs_diff"] <= 1e-4
    assert p["pairs"] >= 20 and p["generations_identical"] == p["pairs"]
    assert p["vision_shapes"]["cross_key_1"] == [2, 2, 64, 8]          # [B, Hkv, N, hd]
    ops = man["graphs"]["decoder"]["ops"]
    # 2 self-attention layers: Attention ops with GQA; norms and rotary fused as well. The
    # cross-attention is one Attention op too, its softmax output the exported probabilities.
    assert ops["Attention"] == 2 + 1 and "Softmax" not in ops
    assert man["cross_attention"].startswith("Attention (its softmax output")
    assert ops["RotaryEmbedding"] == 4 and ops["RMSNormalization"] >= 5
    names = [i["name"] for i in man["graphs"]["decoder"]["inputs"]]
    assert names[:4] == ["input_ids", "attention_mask", "past_key_0", "past_value_0"]
    assert names[-2:] == ["cross_key_1", "cross_value_1"]
    assert "xattn_probs_1" in [o["name"] for o in man["graphs"]["decoder"]["outputs"]]
    assert "circle" in man["object_words"]


def test_node_names_follow_module_paths(exported):
    import onnx

    names = [n.name for n in onnx.load(str(exported["xattn"] / "decoder.onnx")).graph.node]
    assert len(set(names)) == len(names)
    assert "decoder.layers.0.self_attn.q_proj/MatMul_0" in names
    assert any(n.startswith("decoder.xattn.1.attn/") for n in names)
    vision = [n.name for n in onnx.load(str(exported["xattn"] / "vision.onnx")).graph.node]
    assert any(n.startswith("decoder.xattn.1.attn.k_proj/") for n in vision)   # K/V in the vision graph


def test_graph_weights_sit_in_data_files_the_manifest_hashes(exported, tmp_path):
    """export.graphio: each graph's weights in <graph>.onnx.data (a lower load peak, no 2 GB
    protobuf cap), on both targets; a changed or missing data file is refused on load."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from agevlm_edge.runtime import Runtime

    for name in ("xattn", "mobile"):
        d = exported[name]
        files = _manifest(d)["files"]
        for g in ("vision", "decoder"):
            assert f"{g}.onnx.data" in files
            m = onnx.load(str(d / f"{g}.onnx"), load_external_data=False)
            outside = [t.name for t in m.graph.initializer if uses_external_data(t)]
            inline = [t.name for t in m.graph.initializer
                      if not uses_external_data(t) and len(t.raw_data) >= 1024]
            assert outside and not inline, (name, g, inline)
            assert {e.value for t in m.graph.initializer if uses_external_data(t)
                    for e in t.external_data if e.key == "location"} == {f"{g}.onnx.data"}
    bad = tmp_path / "bad"
    shutil.copytree(exported["xattn"], bad)
    with open(bad / "decoder.onnx.data", "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 1]))                 # one weight bit flipped
    with pytest.raises(BadInput, match="decoder.onnx.data does not match its sha256"):
        Runtime(bad)
    (bad / "decoder.onnx.data").unlink()
    with pytest.raises(BadInput, match="decoder.onnx.data is missing"):
        Runtime(bad)
    # an export written before (weights inside the graphs, no .data files) still loads, and
    # answers alike
    from agevlm_edge.export.graphio import weights_inside_copy
    from agevlm_edge.runtime.session import GenerationConfig

    old = weights_inside_copy(exported["xattn"], tmp_path / "old")
    assert not any(f.endswith(".data") for f in _manifest(old)["files"])
    m = onnx.load(str(old / "decoder.onnx"), load_external_data=False)
    assert not any(uses_external_data(t) for t in m.graph.initializer)
    img = np.random.default_rng(0).integers(0, 256, (3, S, S), dtype=np.uint8)
    ids = [rt.generate(rt.encode_images([img]), [rt.prompt_ids("a photo of")],
                       GenerationConfig(max_new_tokens=6)).ids[0]
           for rt in (Runtime(old), Runtime(exported["xattn"]))]
    assert ids[0] == ids[1]


def test_unfused_and_concat_exports_pass_parity(exported):
    unfused = _manifest(exported["unfused"])
    assert unfused["opset"] == 18 and "Attention" not in unfused["graphs"]["decoder"]["ops"]
    assert unfused["parity"]["passed"] and not unfused["xattn_probs"]
    concat = _manifest(exported["concat"])
    assert concat["parity"]["passed"] and concat["parity"]["generations_identical"] >= 20
    assert [o["name"] for o in concat["graphs"]["vision"]["outputs"]] == ["image_embeds"]


def test_null_token_exports_in_the_cross_kv_and_passes_parity(tokenizer, small_world, tmp_path):
    """model xattn_null: the vision graph's cross K/V carry the learned null entry (N+1), the
    decoder needs nothing new, and the exported probabilities stay over the N patches."""
    import torch
    from safetensors.torch import load_file, save_file

    from agevlm_edge.export.onnx_export import export_run

    run = _run_dir(tmp_path / "null", tokenizer, "xattn", xattn_null=True)
    sd = load_file(run / "model.safetensors")
    torch.manual_seed(3)
    for k in sd:
        if ".null_" in k:   # away from their zero start, so the parity sees them
            sd[k] = torch.randn_like(sd[k])
    save_file(sd, run / "model.safetensors")
    for target in ("cpu", "mobile-gpu"):
        export_run(run, tmp_path / target, data_dir=small_world, target=target,
                   xattn_probs=target == "cpu")
        man = _manifest(tmp_path / target)
        assert man["parity"]["passed"] and man["parity"]["generations_identical"] >= 20
    assert man["model"]["xattn_null"] is True
    p = _manifest(tmp_path / "cpu")["parity"]
    assert p["vision_shapes"]["cross_key_1"] == [2, 2, 65, 8] and p["xattn_probs_max_abs_diff"] <= 1e-4


def test_mobile_gpu_export_uses_contrib_attention_and_ships_ort_files(exported):
    import onnx

    from agevlm_edge.ops import XATTN_QK_PAD
    from agevlm_edge.runtime import Runtime

    man = _manifest(exported["mobile"])
    ops = man["graphs"]["decoder"]["ops"]
    assert man["opset"] == 18 and "Attention" not in ops
    # Each self-attention one GroupQueryAttention (rotary inside, K/V not expanded), each
    # cross-attention one MultiHeadAttention (query and key padded: ops.XATTN_QK_PAD)
    n_layers = man["model"]["n_layers"]
    n_cross = sum(i["name"].startswith("cross_key_") for i in man["graphs"]["decoder"]["inputs"])
    assert man["self_attention"] == "GroupQueryAttention"
    assert man["cross_attention"].startswith("MultiHeadAttention") and n_cross
    assert ops["com.microsoft.GroupQueryAttention"] == n_layers
    assert ops["com.microsoft.MultiHeadAttention"] == n_cross and "Softmax" not in ops
    # ... whose K/V come from vision.onnx already expanded and padded (once per image): each
    # MultiHeadAttention reads its key and value straight from the decoder's inputs.
    cfg = man["model"]
    key = next(o for o in man["graphs"]["vision"]["outputs"] if o["name"].startswith("cross_key_"))
    assert man["cross_kv_layout"] == "mha"
    assert key["shape"][1:] == [(cfg["image_size"] // cfg["patch_size"]) ** 2,
                                cfg["xattn_heads"] * (cfg["head_dim"] + XATTN_QK_PAD)]
    dec = onnx.load(str(exported["mobile"] / "decoder.onnx"))
    inputs = {i.name for i in dec.graph.input}
    assert all(n.input[1] in inputs and n.input[2] in inputs
               for n in dec.graph.node if n.op_type == "MultiHeadAttention")
    # A head size GroupQueryAttention refuses: SDPA rewritten into MultiHeadAttention, and why
    man8 = _manifest(exported["mobile8"])
    assert man8["parity"]["passed"] and "divisible by 16, not 8" in man8["self_attention"]
    assert man8["cross_kv_layout"] == "bhnd"
    assert man8["graphs"]["decoder"]["ops"]["com.microsoft.MultiHeadAttention"] == n_layers
    assert ops["com.microsoft.SkipSimplifiedLayerNormalization"] >= 2
    assert man["parity"]["passed"] and {"vision.ort", "decoder.ort"} <= set(man["files"])
    import onnxruntime

    assert man["rewrites"]["ort_format"] == {"files": ["vision.ort", "decoder.ort"],
                                             "optimization_style": "Fixed", "provider": "cpu",
                                             "onnxruntime": onnxruntime.__version__}
    assert set(man["rewrites"]["usability"]["decoder"]["verdicts"]) >= {"NNAPI", "CoreML MLProgram"}
    Runtime(exported["mobile"])                                   # hashes of .ort files hold
    # vision_fixed.onnx: unfused, one image, every shape static; onnxruntime's checker gives it
    # to CoreML MLProgram whole (the fused dynamic vision.onnx: NO), and it matches vision.onnx
    fixed = man["rewrites"]["fixed_shapes"]
    assert fixed["file"] == "vision_fixed.onnx" and fixed["input_shape"] == [1, 3, S, S]
    assert "static cache" in fixed["decoder"]
    g = onnx.load(str(exported["mobile"] / "vision_fixed.onnx"), load_external_data=False).graph
    dims = [d for v in list(g.input) + list(g.output) for d in v.type.tensor_type.shape.dim]
    assert dims and all(d.HasField("dim_value") for d in dims)
    assert not any(n.domain == "com.microsoft" for n in g.node)
    use = man["rewrites"]["usability"]
    assert use["vision_fixed"]["verdicts"]["CoreML MLProgram"] == "YES"
    assert use["vision"]["verdicts"]["CoreML MLProgram"] == "NO"
    vf = man["parity"]["vision_fixed"]
    assert vf["passed"] and vf["max_abs_diff"] <= 1e-5 and vf["images"] >= 2
    ort = man["parity"]["ort_format"]                             # .ort vs .onnx, run
    assert ort["passed"] and ort["logits_max_abs_diff"] <= 1e-4
    assert ort["generations_identical"] == ort["pairs"] >= 20


def test_static_shape_providers_run_the_fixed_vision_graph(exported, small_world, monkeypatch):
    """On --provider coreml|nnapi the runtime loads vision_fixed.onnx and encodes one image a
    call: a batch of three gets the dynamic graph's K/V and the same generations. The
    provider is a CPU session under the name "coreml" (no Apple device here)."""
    from agevlm_edge.runtime import GenerationConfig, Runtime, session

    monkeypatch.setitem(session.PROVIDERS, "coreml", "CPUExecutionProvider")
    rt, ref = Runtime(exported["mobile"], provider="coreml"), Runtime(exported["mobile"])
    assert rt.fixed_vision and not ref.fixed_vision
    assert rt.vision.get_inputs()[0].shape == [1, 3, S, S]
    imgs = [rt.load_image(p) for p in sorted((small_world / "images" / "test").iterdir())[:3]]
    a, b = rt.encode_images(imgs), ref.encode_images(imgs)
    assert a.feeds.keys() == b.feeds.keys()
    assert all(np.abs(a.feeds[k] - b.feeds[k]).max() <= 1e-5 for k in a.feeds)
    seqs = [rt.prompt_ids("Caption:")] * 3
    cfg = GenerationConfig(max_new_tokens=6)
    assert rt.generate(a, seqs, cfg).ids == ref.generate(b, seqs, cfg).ids
    assert not Runtime(exported["xattn"], provider="coreml").fixed_vision     # cpu target: none
    with pytest.raises(BadInput, match="has no vision_fixed.onnx"):
        Runtime(exported["xattn"], fixed_vision=True)


def test_infer_runs_the_ort_copies_and_says_where_there_are_none(exported, small_world):
    img = next((small_world / "images" / "test").iterdir())
    args = ["--image", img, "--prompt", "Caption:", "--max-new-tokens", "6"]
    onnx_out = run_cli("infer", "--model", exported["mobile"], *args, check_rc=0).stdout
    ort_out = run_cli("infer", "--model", exported["mobile"], *args, "--graph-format", "ort",
                      check_rc=0).stdout
    assert ort_out == onnx_out and ort_out.startswith("Caption:")
    assert_one_line_error(run_cli("infer", "--model", exported["xattn"], *args,
                                  "--graph-format", "ort"), "no ORT-format graphs")
    assert_one_line_error(run_cli("infer", "--model", exported["mobile"], *args, "--graph-format",
                                  "ort", "--provider", "webgpu"), "WebGPU sessions refuse")


def test_ort_copies_an_older_onnxruntime_cannot_read_get_one_clear_error(exported, monkeypatch):
    import onnxruntime

    from agevlm_edge.errors import BadInput
    from agevlm_edge.runtime.session import Runtime

    def refuse(path, *a, **k):   # what onnxruntime-webgpu 1.27 said of our decoder.ort
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : This is an invalid model.")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    with pytest.raises(BadInput, match=f"wrote them \\({onnxruntime.__version__}\\) or a newer one"):
        Runtime(exported["mobile"], graph_format="ort")


def _tiny_graph(tmp_path, norm: str):
    import torch

    from agevlm_edge.model import RMSNorm

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(16, 1e-5) if norm == "rms" else torch.nn.LayerNorm(16)
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.lin(self.norm(x))

    path = tmp_path / f"{norm}.onnx"
    torch.onnx.export(M().eval(), (torch.randn(2, 3, 16),), dynamo=True, opset_version=18).save(str(path))
    return path


def test_ort_fusion_changes_rmsnorm_and_leaves_layernorm_alone(tmp_path):
    from agevlm_edge.export.fusion import op_counts, ort_fuse

    rms, ln = _tiny_graph(tmp_path, "rms"), _tiny_graph(tmp_path, "ln")
    assert ort_fuse(rms).get("rms_normalization") == 1
    assert op_counts(rms)["SimplifiedLayerNormalization"] == 1
    assert "rms_normalization" not in ort_fuse(ln)
    assert "SimplifiedLayerNormalization" not in op_counts(ln) and op_counts(ln)["LayerNormalization"] == 1


def _attention_graph(tmp_path, kind: str):
    """Projections, 4 heads of 8, then SDPA ("sdpa") or a look-alike that is no attention: the
    softmax over the heads axis instead of the keys ("heads")."""
    import torch
    import torch.nn.functional as F

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32, bias=False) for _ in range(4))

        def forward(self, x, y):
            B, T, N = x.shape[0], x.shape[1], y.shape[1]
            q = self.q(x).view(B, T, 4, 8).transpose(1, 2)
            k, v = (f(y).view(B, N, 4, 8).transpose(1, 2) for f in (self.k, self.v))
            if kind == "sdpa":
                a = F.scaled_dot_product_attention(q, k, v)
            else:
                a = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=1) @ v
            return self.o(a.transpose(1, 2).reshape(B, T, 32))

    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(M().eval(), (torch.randn(2, 3, 32), torch.randn(2, 5, 32)), dynamo=True,
                      opset_version=18).save(str(path))
    return path


def test_ort_attention_fusion_changes_sdpa_and_leaves_a_look_alike_alone(tmp_path):
    """The mobile-gpu decoder's attention rewrite (fusion.ort_fuse) makes one MultiHeadAttention
    of an SDPA chain, leaves a softmax over the wrong axis alone, and with attention=False (the
    vision graph) leaves the chain too."""
    from agevlm_edge.export.fusion import op_counts, ort_fuse

    sdpa = _attention_graph(tmp_path, "sdpa")
    kept = tmp_path / "kept.onnx"
    shutil.copy(sdpa, kept)
    assert ort_fuse(sdpa) == {"mha2": 1, "sdpa": 1}
    assert op_counts(sdpa)["com.microsoft.MultiHeadAttention"] == 1 and "Softmax" not in op_counts(sdpa)
    assert ort_fuse(kept, attention=False) == {}
    assert op_counts(kept)["Softmax"] == 1 and "com.microsoft.MultiHeadAttention" not in op_counts(kept)
    heads = _attention_graph(tmp_path, "heads")
    before = op_counts(heads)
    assert ort_fuse(heads) == {} and op_counts(heads) == before


def test_failed_parity_exits_1_and_leaves_nothing(runs, tmp_path, monkeypatch):
    from agevlm_edge.export import onnx_export, parity

    out = tmp_path / "exp"
    monkeypatch.setattr(parity, "LOGITS_TOL", -1.0)        # no export can pass this
    with pytest.raises(CheckFailed, match="parity with PyTorch failed"):
        onnx_export.export_run(runs["xattn"], out, n_pairs=2)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    # An existing export survives a failed --overwrite.
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CheckFailed):
        onnx_export.export_run(runs["xattn"], out, n_pairs=2, overwrite=True)
    assert (out / "keep.txt").read_text() == "old"


def test_exporting_again_gives_the_same_node_names_and_failed_parity_exits_1_in_the_cli(
        exported, runs, tmp_path):
    """Node names are a function of the model (module paths): a second export of the same run
    dir names every node as the first did. A failed parity, through the real `agevlm export`
    entry point, exits 1 with one line on stderr and leaves nothing behind."""
    import onnx

    from agevlm_edge.export.onnx_export import export_run

    again = tmp_path / "again"
    export_run(runs["xattn"], again, n_pairs=2)
    for g in ("vision", "decoder"):
        first, second = (onnx.load(str(d / f"{g}.onnx"), load_external_data=False).graph.node
                         for d in (exported["xattn"], again))
        assert [n.name for n in second] == [n.name for n in first] and len(first) > 10
    out = tmp_path / "failed"
    code = ("import sys; from agevlm_edge.export import parity; parity.LOGITS_TOL = -1.0; "
            "from agevlm_edge.cli import main; sys.argv[0] = 'agevlm'; main()")
    proc = subprocess.run([sys.executable, "-c", code, "export", "--model", str(runs["xattn"]),
                           "--out", str(out), "--pairs", "2"], capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "parity with PyTorch failed" in lines[0], proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_export_refuses_to_replace_its_run_dir_and_bad_flags(runs, tmp_path):
    from agevlm_edge.export.onnx_export import export_run

    with pytest.raises(BadInput, match="would replace the RUN DIR"):
        export_run(runs["xattn"], runs["xattn"], overwrite=True)
    with pytest.raises(BadInput, match="would replace the RUN DIR"):
        export_run(runs["xattn"], runs["xattn"].parent, overwrite=True)
    with pytest.raises(BadInput, match="not a DATA DIR"):
        export_run(runs["xattn"], tmp_path / "e", data_dir=tmp_path)
    with pytest.raises(BadInput, match="mobile-gpu always fuses"):
        export_run(runs["xattn"], tmp_path / "e", target="mobile-gpu", fused=False)
    with pytest.raises(BadInput, match="unknown --kv-cache"):
        export_run(runs["xattn"], tmp_path / "e", kv_cache="ring")
    assert (runs["xattn"] / "model.safetensors").is_file()


def test_export_cli_bad_inputs(tmp_path, runs, small_world):
    assert_one_line_error(run_cli("export", "--model", tmp_path / "nope", "--out", tmp_path / "e"),
                          "run directory not found")
    assert_one_line_error(run_cli("export", "--model", tmp_path, "--out", tmp_path / "e"),
                          "not a RUN DIR")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert_one_line_error(run_cli("export", "--model", runs["xattn"], "--out", tmp_path / "busy"),
                          "already exists")
    assert_one_line_error(run_cli("export", "--model", runs["xattn16"], "--out", tmp_path / "m",
                                  "--target", "mobile-gpu", "--kv-cache", "concat"),
                          "always runs self-attention as GroupQueryAttention")
    assert not (tmp_path / "m").exists()
    data = tmp_path / "data"                        # a copy: a failed check would delete it
    shutil.copytree(small_world, data)
    assert_one_line_error(run_cli("export", "--model", runs["xattn"], "--data", data, "--out", data,
                                  "--overwrite"), "would replace the DATA DIR")
    assert (data / "dataset.json").is_file()
    images = sorted((data / "images").rglob("*.png"))
    assert_one_line_error(run_cli("export", "--model", runs["xattn"], "--data", data, "--out",
                                  data / "images", "--overwrite"), "inside the DATA DIR")
    assert sorted((data / "images").rglob("*.png")) == images
    proc = run_cli("export", "--model", runs["xattn"], "--out", tmp_path / "p", "--pairs", "100000000")
    assert proc.returncode == 2 and "--pairs" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- runtime
def test_runtime_imports_and_runs_without_torch(exported, small_world):
    img = next((small_world / "images" / "test").iterdir())
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'optimum', 'onnxscript'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
from agevlm_edge.runtime import Runtime, GenerationConfig
from agevlm_edge.runtime.backend import OnnxBackend
rt = Runtime({str(exported['xattn'])!r})
state = rt.encode_images([rt.load_image({str(img)!r})])
g = rt.generate(state, [rt.prompt_ids('Caption:')], GenerationConfig(max_new_tokens=5), with_maps=True)
assert len(g.maps[0]) == len(g.ids[0]) and g.maps[0][0].shape == (8, 8)
print('ok', sorted(m for m in ('torch', 'transformers', 'agevlm_edge.train', 'agevlm_edge.export', 'agevlm_edge.eval') if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"


def test_runtime_refuses_tampered_missing_and_foreign_dirs(exported, tmp_path):
    from agevlm_edge.runtime import Runtime

    bad = tmp_path / "bad"
    shutil.copytree(exported["xattn"], bad)
    with open(bad / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BadInput, match="does not match its sha256"):
        Runtime(bad)
    (bad / "decoder.onnx").unlink()
    with pytest.raises(BadInput, match="decoder.onnx is missing"):
        Runtime(bad)
    man = _manifest(exported["xattn"])
    (bad / "manifest.json").write_text(json.dumps({**man, "format_version": 99}))
    with pytest.raises(BadInput, match="format version 99"):
        Runtime(bad)
    shutil.rmtree(bad)
    shutil.copytree(exported["xattn"], bad)
    (bad / "manifest.json").write_text(json.dumps({**man, "rewrites": None}))
    Runtime(bad)                                              # a null entry reads as none
    (bad / "manifest.json").write_text(json.dumps({**man, "model": {**man["model"], "patch_size": 0}}))
    with pytest.raises(BadInput, match="no valid model config"):
        Runtime(bad)
    with pytest.raises(BadInput, match="manifest.json is missing"):
        Runtime(tmp_path)
    with pytest.raises(BadInput, match="no XnnpackExecutionProvider|no NnapiExecutionProvider"):
        Runtime(exported["xattn"], provider="nnapi")


def _save(path, im, **kw):
    im.save(path, **kw)
    return path


def test_runtime_image_inputs(exported, tmp_path):
    from PIL import Image

    from agevlm_edge.runtime import Runtime

    rt = Runtime(exported["xattn"])
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    ok = {
        "palette": _save(tmp_path / "p.png", rgb.convert("P")),
        "rgba": _save(tmp_path / "a.png", rgb.convert("RGBA")),
        "16bit": _save(tmp_path / "i16.png", Image.fromarray(
            (np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16))),
        "cmyk": _save(tmp_path / "c.jpg", rgb.convert("CMYK")),
        "grey": _save(tmp_path / "l.png", rgb.convert("L")),
    }
    for name, path in ok.items():
        x = rt.load_image(path)
        assert x.shape == (3, S, S) and x.dtype == np.uint8, name
    assert rt.load_image(ok["16bit"]).max() > 100                    # scaled, not clipped to 0/255
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(ok["palette"].read_bytes()[:60])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    huge = _save(tmp_path / "huge.png", Image.new("1", (9000, 9000)))
    for path, msg in ((empty, "empty"), (truncated, "truncated|decode"), (text, "not an image"),
                      (huge, "pixel limit"), (tmp_path / "none.png", "not found"),
                      (tmp_path, "is a directory")):
        with pytest.raises(BadInput, match=msg):
            rt.load_image(path)


def test_sampling_takes_an_overflowed_logit_and_refuses_a_row_without_a_finite_one():
    from agevlm_edge.runtime.session import GenerationConfig, sample_next

    cfg, rng = GenerationConfig(temperature=0.7, top_k=2, top_p=0.9), np.random.default_rng(0)
    logits = np.array([[0.0, np.inf, 1.0, np.nan]], np.float16)      # fp16 overflow, a NaN
    assert sample_next(logits, cfg, rng).tolist() == [1]
    with pytest.raises(BadInput, match="no finite logit"):
        sample_next(np.full((1, 4), np.nan, np.float32), cfg, rng)


def test_top_k_and_top_p_keep_the_tokens_they_should_at_the_right_rates():
    from agevlm_edge.runtime.session import GenerationConfig, sample_next

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))     # 4000 draws in one call

    def freq(**kw):
        ids = sample_next(logits, GenerationConfig(temperature=1.0, **kw), np.random.default_rng(0))
        return np.bincount(ids, minlength=4) / len(ids)
    full = freq()
    assert (full > 0).all() and np.allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top-p 0.7: the smallest set whose mass reaches 0.7 is {0, 1}, renormalised to 5/8, 3/8
    for kept in (freq(top_p=0.7), freq(top_k=2)):
        assert kept[2:].sum() == 0 and np.allclose(kept[:2], [0.625, 0.375], atol=0.03)
    assert freq(top_p=0.4)[0] == 1.0 and freq(top_p=0.85)[3] == 0 and freq(top_p=0.85)[2] > 0


def test_heatmap_words_start_where_the_decoded_text_has_a_space():
    """SentencePiece-style tokens (Metaspace) decode alone without their leading space; the
    words still split, so "a red cubes" gives panels for red and cubes (not one 'aredcubes')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from agevlm_edge.runtime.heatmap import word_maps

    tok = Tokenizer(models.WordLevel({"\u2581a": 0, "\u2581red": 1, "\u2581cube": 2, "s": 3,
                                      "[UNK]": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    assert tok.decode([1]) == "red"                        # the space is gone when alone
    maps = [np.full((2, 2), float(i)) for i in range(4)]
    got = word_maps(tok, [0, 1, 2, 3], maps, ["red", "cubes"])
    assert [(w, m[0, 0]) for w, m in got] == [("red", 1.0), ("cubes", 2.5)]


def test_runtime_preprocessing_matches_training(exported, small_world, tmp_path):
    """The runtime's pixels (Pillow + numpy from the file) equal the trainer's (train/loop.py:
    its image cache, then Preprocessor.normalize), bit for bit, in every image mode: a
    transparent area is white in both (not the colour it hid), 16-bit grey scaled in both
    (not clipped white), float grey by its 0..1 range."""
    from PIL import Image

    from agevlm_edge.data.datadir import load_split
    from agevlm_edge.runtime import Runtime
    from agevlm_edge.train.batches import _load_images

    rt = Runtime(exported["xattn"])
    recs = load_split(small_world, "test")[:3]
    ours = np.stack([rt.pre.normalize(rt.load_image(small_world / r["file"])) for r in recs])
    theirs = rt.pre.normalize(_load_images(small_world, recs, S).numpy())
    assert np.array_equal(ours, theirs)
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[..., 0], rgba[:, : S // 2, 3] = 200, 255          # red, transparent on the right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((S, S), 30000, np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(np.full((S, S), 0.5, np.float32), "F").save(tmp_path / "grey.tif")
    files = [{"file": f} for f in ("rgba.png", "grey16.png", "grey.tif")]
    theirs = _load_images(tmp_path, files, S).numpy()
    for f, t in zip(files, theirs):
        assert np.array_equal(rt.load_image(tmp_path / f["file"]), t), f
    assert (theirs[0][:, :, -1] == 255).all() and (theirs[0][0, :, 0] == 200).all()
    assert (theirs[1] == round(30000 / 65535 * 255)).all() and (theirs[2] == 128).all()


def test_generation_options(exported, small_world):
    from agevlm_edge.runtime import GenerationConfig, Runtime

    rt = Runtime(exported["xattn"])
    img = rt.load_image(next((small_world / "images" / "test").iterdir()))
    state = rt.encode_images([img])
    seq = [rt.prompt_ids("Caption:")]
    greedy = rt.generate(state, seq, GenerationConfig(max_new_tokens=8)).ids[0]
    assert rt.generate(state, seq, GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=1,
                                                    seed=5)).ids[0] == greedy
    a = rt.generate(state, seq, GenerationConfig(max_new_tokens=8, temperature=2.0, seed=3)).ids[0]
    b = rt.generate(state, seq, GenerationConfig(max_new_tokens=8, temperature=2.0, seed=3)).ids[0]
    c = rt.generate(state, seq, GenerationConfig(max_new_tokens=8, temperature=2.0, top_p=0.9,
                                                 seed=4)).ids[0]
    assert a == b and len(a) >= 1 and a != greedy or c != greedy
    stop = rt.generate(state, seq, GenerationConfig(max_new_tokens=8, stop_ids=(greedy[2],))).ids[0]
    assert stop == greedy[:greedy.index(greedy[2])]
    assert "".join(rt.stream(state, "Caption:", GenerationConfig(max_new_tokens=8))).strip() == \
        rt.tokenizer.decode(greedy).strip()
    with pytest.raises(BadInput, match="prompt is empty"):
        rt.prompt_ids("  ")
    with pytest.raises(BadInput, match="maximum context of 128"):
        rt.generate(state, [rt.prompt_ids("Caption: " + "red " * 130)], GenerationConfig(max_new_tokens=8))
    # a temperature so small that logits / T overflow samples the argmax, not NaN
    assert rt.generate(state, seq, GenerationConfig(max_new_tokens=8, temperature=1e-320,
                                                    seed=0)).ids[0] == greedy
    for bad, why in ((dict(temperature=float("nan")), "finite temperature"),
                     (dict(temperature=float("inf")), "finite temperature"),
                     (dict(seed=-1), "non-negative")):
        with pytest.raises(BadInput, match=why):
            rt.generate(state, seq, GenerationConfig(max_new_tokens=8, **bad))
    concat = Runtime(exported["concat"])
    with pytest.raises(BadInput, match="no cross-attention probabilities"):
        concat.generate(concat.encode_images([img]), seq, with_maps=True)


@pytest.mark.parametrize("export", ["xattn", "mobile"])
def test_prefill_one_token_per_call_matches_one_call(exported, small_world, export):
    """The prefill a runtime falls back to where a provider's multi-token attention is faulty
    (Runtime.multi_token_fault): one decoder call per token, left padding included, gives the
    logits, probabilities, cache and generations of one call. On CPU the check itself passes."""
    from agevlm_edge.runtime import GenerationConfig, Runtime

    rt = Runtime(exported[export])
    assert rt.prefill_fault is None and rt.multi_token_fault() is None
    imgs = [rt.load_image(p) for p in sorted((small_world / "images" / "test").iterdir())[:2]]
    state = rt.encode_images(imgs)
    seqs = [rt.prompt_ids("Caption:"), rt.prompt_ids("Is there a red cube left of a blue ball?")]
    ids, keys, logits, past, probs = rt.prefill(state, seqs)
    gen = rt.generate(state, seqs, GenerationConfig(max_new_tokens=8)).ids
    rt.prefill_fault = "forced by the test"
    ids2, keys2, logits2, past2, probs2 = rt.prefill(state, seqs)
    assert (ids == ids2).all() and (keys == keys2).all()
    real = keys.astype(bool)                           # xattn: the keys are the text tokens
    assert np.abs(logits2 - logits)[real].max() <= 1e-4 * max(1.0, np.abs(logits[real]).max())
    assert sorted(probs2) == sorted(probs) and all(probs2[k].shape == probs[k].shape for k in probs)
    assert all(np.abs(probs2[k] - probs[k]).transpose(0, 2, 1, 3)[real].max() <= 1e-5 for k in probs)
    for name in past:     # padded slots hold different values; real ones the same keys
        a, b = past[name].numpy(), past2[name].numpy()
        assert np.abs(a - b).transpose(0, 2, 1, 3)[real].max() <= 1e-4 * max(1.0, np.abs(a).max())
    assert rt.generate(state, seqs, GenerationConfig(max_new_tokens=8)).ids == gen


TURNS = ("Caption:", "Question: Is there a circle in the image? Answer:",
         "Question: What colour is the cube? Answer:")


@pytest.mark.parametrize("export", ["xattn", "concat", "inplace", "mobile", "one-token"])
def test_a_conversation_keeps_its_cache_and_answers_as_the_whole_transcript(exported, small_world,
                                                                            export):
    """Each turn feeds the decoder only the tokens its cache lacks (the end of the answer
    before, the end token, the new prompt), yet answers as one generation over the whole
    transcript does, and a last extension gives that prefill's logits. For every cache kind:
    grown (xattn, concat: image rows in the cache), in place (inplace, mobile), and the
    one-token-per-call prefill of a faulty provider (one-token)."""
    from agevlm_edge.runtime import GenerationConfig, Runtime

    rt = Runtime(exported["xattn" if export == "one-token" else export])
    if export == "one-token":
        rt.prefill_fault = "forced by the test"
    img = sorted((small_world / "images" / "test").iterdir())[1]
    state = rt.encode_images([rt.load_image(img)])
    cfg = GenerationConfig(max_new_tokens=5)
    widths = []
    step = rt.step
    rt.step = lambda ids, *a, **k: widths.append(ids.shape[1]) or step(ids, *a, **k)
    conv = rt.chat(state)
    for k, prompt in enumerate(TURNS):
        whole, held = conv.turn_ids(prompt), conv.fed
        assert whole[:len(conv.ids)] == conv.ids
        widths.clear()
        res = conv.ask(prompt, cfg, with_maps=k == 0 and rt.has_probs)
        assert sum(widths) == conv.fed - held          # no token of the transcript fed twice
        assert widths[0] == (1 if export == "one-token" else len(whole) - held)
        assert res.ids == rt.generate(state, [whole], cfg).ids
        assert conv.ids == whole + res.ids[0] + [rt.eos_id]
    assert 0 < conv.fed < len(conv.ids)            # the last answer's end not fed yet
    turn = rt.prompt_ids(TURNS[1])
    logits, _, mask = rt.extend(state, conv._cache, conv.ids[conv.fed:] + turn)
    ref = rt.prefill(state, [conv.ids + turn], want_probs=False)[2]
    n = logits.shape[1]
    assert n == len(conv.ids) - conv.fed + len(turn) and mask.shape[1] == ref.shape[1] + rt.context_image_tokens
    assert np.abs(logits - ref[:, -n:]).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_a_conversation_refuses_a_turn_beyond_the_context(exported, small_world):
    from agevlm_edge.runtime import GenerationConfig, Runtime

    rt = Runtime(exported["xattn"])
    img = next((small_world / "images" / "test").iterdir())
    conv = rt.chat(rt.encode_images([rt.load_image(img)]))
    long = "Caption: " + "red " * 40
    cfg = GenerationConfig(max_new_tokens=30)
    conv.ask(long, cfg)
    held = list(conv.ids)
    with pytest.raises(BadInput, match="this conversation holds .* start a new conversation"):
        conv.ask(long, cfg)
    assert conv.ids == held                         # the conversation goes on after a refusal
    assert conv.ask("Caption:", GenerationConfig(max_new_tokens=4)).ids
    with pytest.raises(BadInput, match="about one image, not 2"):
        rt.chat(rt.encode_images([rt.load_image(img)] * 2))


def test_infer_chat_cli_takes_turns_from_flags_or_standard_input(exported, small_world):
    from agevlm_edge.runtime import GenerationConfig, Runtime

    img = sorted((small_world / "images" / "test").iterdir())[1]
    rt = Runtime(exported["xattn"])
    conv = rt.chat(rt.encode_images([rt.load_image(img)]))
    want = [p + rt.tokenizer.decode(conv.ask(p, GenerationConfig(max_new_tokens=5)).ids[0])
            for p in TURNS]
    flags = [a for p in TURNS for a in ("--prompt", p)]
    base = ("infer", "--model", exported["xattn"], "--image", img, "--max-new-tokens", "5")
    for proc in (run_cli(*base, "--chat", *flags, check_rc=0),
                 run_cli(*base, "--chat", stdin="\n".join(TURNS) + "\n\n", check_rc=0)):
        assert proc.stdout.splitlines() == want
    assert_one_line_error(run_cli(*base), "give at least one --prompt")
    assert_one_line_error(run_cli(*base, "--chat", stdin=""), "standard input was empty")
    proc = run_cli(*base, "--chat", *flags, "--prompt", "Caption: " + "red " * 70)
    assert_one_line_error(proc, "maximum context of 128")
    assert proc.stdout == ""                        # the turns are checked before any work


def test_inplace_cache_export_and_its_ops(exported):
    """cpu, head size 16: self-attention as GroupQueryAttention (rotary inside) over a cache the
    runtime updates in place, cross-attention opset-23 Attention (native GQA, K/V [B,Hkv,N,hd]);
    head size 8 falls back to Attention with a grown cache, and the manifest says why."""
    man = _manifest(exported["inplace"])
    ops, n_layers = man["graphs"]["decoder"]["ops"], man["model"]["n_layers"]
    n_cross = sum(i["name"].startswith("cross_key_") for i in man["graphs"]["decoder"]["inputs"])
    assert man["kv_cache"] == "inplace" and man["self_attention"] == "GroupQueryAttention"
    assert man["opset"] == 23 and man["cross_kv_layout"] == "bhnd" and man["parity"]["passed"]
    assert ops["com.microsoft.GroupQueryAttention"] == n_layers and ops["Attention"] == n_cross
    assert "RotaryEmbedding" not in ops and "Softmax" not in ops
    assert _manifest(exported["mobile"])["kv_cache"] == "inplace"
    fallback = _manifest(exported["xattn"])
    assert fallback["kv_cache"] == "concat" and "divisible by 16, not 8" in fallback["self_attention"]
    assert _manifest(exported["unfused"])["kv_cache"] == "concat"


@pytest.mark.parametrize("export", ["inplace", "mobile"])
def test_inplace_cache_matches_the_grown_copy(exported, export):
    """The preallocated cache the decoder appends to in place gives the logits and generations
    of the cache copied into a grown tensor every step, on a left-padded batch, when it has to
    grow mid-decode too; where it has room, a step returns the very buffers it was given. The
    steps are the WebGPU probe's own (``webgpu_probe.inplace_steps``), here on the CPU."""
    from webgpu_probe import inplace_steps, noise_images, prompts_of

    from agevlm_edge.runtime import GenerationConfig, Runtime

    rt, ref = Runtime(exported[export]), Runtime(exported[export], kv_inplace=False)
    assert rt.kv_inplace and not ref.kv_inplace
    res = inplace_steps(rt, ref)
    room = res["prompt_keys"] + 3                       # it grows (doubles) at the 4th step
    assert res["capacity"] == [room] * 3 + [2 * room] * 3
    assert res["kept"] == [True] * 3 + [False] + [True] * 2
    assert res["max_abs_diff"] <= 1e-4 * max(1.0, res["ref_abs_max"])
    state, seqs = rt.encode_images(noise_images(rt)), prompts_of(rt)
    cfg = GenerationConfig(max_new_tokens=10)
    assert rt.generate(state, seqs, cfg).ids == ref.generate(state, seqs, cfg).ids


def test_eval_on_the_export_matches_torch(exported, runs, small_world):
    from agevlm_edge.eval import evaluate

    for arch in ("xattn", "concat"):
        t = evaluate(runs[arch], small_world, "pope,grounding", limit=6)
        o = evaluate(exported[arch], small_world, "pope,grounding", limit=6)
        for split, f in t["suites"]["pope"]["files"].items():
            assert [a["raw"] for a in o["suites"]["pope"]["files"][split]["answers"]] == \
                [a["raw"] for a in f["answers"]]
        if arch == "xattn":
            assert o["suites"]["grounding"]["iou"] == pytest.approx(t["suites"]["grounding"]["iou"], abs=1e-6)
    with pytest.raises(BadInput, match="cannot run the itm suite"):
        evaluate(exported["xattn"], small_world, "pope,itm", limit=2)
    with pytest.raises(BadInput, match="cannot run the grounding, itm suite .*--no-xattn-probs"):
        evaluate(exported["unfused"], small_world, "grounding,itm", limit=2)
    assert list(evaluate(exported["unfused"], small_world, limit=2)["suites"]) == ["pope", "chair", "vqa"]


def test_infer_cli_streams_answers_and_writes_a_heatmap(exported, small_world, tmp_path):
    from PIL import Image

    img = next((small_world / "images" / "test").iterdir())
    heat = tmp_path / "heat.png"
    proc = run_cli("infer", "--model", exported["xattn"], "--image", img, "--prompt", "Caption:",
                   "--prompt", "Question: Is there a circle in the image? Answer:",
                   "--max-new-tokens", "6", "--heatmap", heat, check_rc=0)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Caption:") and lines[1].startswith("heatmap (")
    assert lines[2].startswith("Question: Is there a circle")
    with Image.open(heat) as im:
        assert im.height > S and im.width >= 192
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    assert_one_line_error(run_cli("infer", "--model", exported["xattn"], "--image", bad,
                                  "--prompt", "Caption:"), "empty")
    assert_one_line_error(run_cli("infer", "--model", exported["xattn"], "--image", img,
                                  "--prompt", " "), "prompt is empty")
    assert_one_line_error(run_cli("infer", "--model", tmp_path, "--image", img,
                                  "--prompt", "Caption:"), "manifest.json is missing")
    image_bytes = img.read_bytes()
    assert_one_line_error(run_cli("infer", "--model", exported["xattn"], "--image", img,
                                  "--prompt", "Caption:", "--heatmap", img), "would replace the image")
    assert img.read_bytes() == image_bytes
    proc = run_cli("infer", "--model", exported["concat"], "--image", img, "--prompt", "Caption:",
                   "--heatmap", heat)
    assert_one_line_error(proc, "no cross-attention probabilities")
    assert proc.stdout == ""                                     # refused before any output
    proc = run_cli("infer", "--model", exported["xattn"], "--image", img, "--prompt", "Caption:",
                   "--prompt", "Caption: " + "red " * 130)
    assert_one_line_error(proc, "maximum context of 128")
    assert proc.stdout == ""                                     # every prompt checked first
    assert_one_line_error(run_cli("infer", "--model", exported["xattn"], "--image", img,
                                  "--prompt", "Caption:", "--temperature", "nan"),
                          "finite temperature")
    for flag, value in (("--seed", "-1"), ("--threads", "100000")):
        proc = run_cli("infer", "--model", exported["xattn"], "--image", img, "--prompt",
                       "Caption:", flag, value)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and flag in proc.stderr


def test_bench_refuses_lengths_beyond_the_context(exported):
    proc = run_cli("bench", exported["xattn"], "--prompt-len", "100", "--new-tokens", "64",
                   "--rounds", "1")
    assert_one_line_error(proc, "--prompt-len 100 and --new-tokens 64", "at most 127")
    proc = run_cli("bench", exported["xattn"], "--new-tokens", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--new-tokens" in proc.stderr


def test_infer_says_on_stderr_when_it_prefills_token_by_token(exported, small_world, monkeypatch,
                                                               capsys):
    """Where a GPU provider's multi-token attention was found faulty, infer notes on stderr
    (once) that prompts go one token per call, and answers as without the fallback. The
    provider is a CPU session under the name "webgpu" with a fault forced by the test."""
    from agevlm_edge.runtime import GenerationConfig, session
    from agevlm_edge.runtime.infer import run_infer

    img = next((small_world / "images" / "test").iterdir())
    prompts = ["Caption:", "Question: Is there a circle in the image? Answer:"]
    gen = GenerationConfig(max_new_tokens=6)
    plain = run_infer(exported["xattn"], img, prompts, gen, write=lambda s: None)
    assert "note:" not in capsys.readouterr().err
    monkeypatch.setitem(session.PROVIDERS, "webgpu", "CPUExecutionProvider")
    monkeypatch.setitem(session.DEVICE_MEMORY, "webgpu", None)
    monkeypatch.setattr(session.Runtime, "multi_token_fault", lambda self: "forced by the test")
    assert run_infer(exported["xattn"], img, prompts, gen, provider="webgpu",
                     write=lambda s: None) == plain
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: webgpu's multi-token attention is off")
    assert "forced by the test" in err[0] and "one token per call" in err[0]
