"""Parity of an export against the PyTorch model it came from, run through the device runtime.

    fixed inputs: vision K/V (or embeddings): shapes, values within 1e-4 x max(1, max |v|); prefill and one decode step's
                  logits at real (non-padding) positions: fp32 max abs diff <= 1e-4 x
                  max(1, max |logit|); cross-attention probabilities (<= 1e-4) if exported

The logits tolerance scales with the logits because real weights make 1e-4 absolute
unreachable even inside PyTorch: on SmolLM2-135M (logits up to ~32) torch's eager and SDPA
paths differ by up to 1.2e-3 at one position of the parity prompts, and onnxruntime by
5.7e-4 from eager; the manifest records that noise floor (torch_eager_vs_sdpa_max_abs_diff)
beside the diff. Tiny models' logits stay below 1, where the bound is 1e-4 absolute.
    generations:  greedy answers on ``n_pairs`` image/prompt pairs (test images and their
                  questions and caption prompts from a DATA DIR, or seeded noise images and
                  fixed prompts without one) must be token-identical
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agevlm_edge.eval.common import image_prompt_pairs
from agevlm_edge.text import left_pad
from agevlm_edge.runtime.session import GenerationConfig, Runtime

LOGITS_TOL = 1e-4            # x max(1, max |logit|)
PROBS_TOL = 1e-4
def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def check_parity(model, export_dir: Path, data_dir: Path | None, n_pairs: int = 20,
                 batch_size: int = 10) -> dict:
    model = model.eval()
    cfg = model.cfg
    rt = Runtime(export_dir, verify=False)
    images, prompts = image_prompt_pairs(data_dir, cfg.image_size, max(n_pairs, 2))
    failures: list[str] = []
    res: dict = {"pairs": len(images)}

    # -- fixed inputs: two images, two prompts of different lengths (left padding) --------
    seqs = [rt.prompt_ids(p) for p in prompts[:2]]
    state = rt.encode_images(images[:2])
    ids, full, logits, past, probs = rt.prefill(state, seqs)
    mask = full[:, full.shape[1] - ids.shape[1]:]                 # the text part
    pixels = torch.from_numpy(rt.pre.normalize(np.stack(images[:2])))
    with torch.no_grad():
        img = model.image_tokens(pixels)
        kv = model.cross_kv(img) if cfg.arch == "xattn" else None
        if cfg.arch == "concat" or rt.manifest.get("naive_kv"):
            ref_vis = {"image_embeds" if cfg.arch == "concat" else "image_tokens": img.numpy()}
        else:
            layout = rt.manifest.get("cross_kv_layout") or "bhnd"
            kv_out = kv if layout == "bhnd" else model.cross_kv(img, layout)
            ref_vis = {f"cross_{n}_{i}": kv_out[str(i)][j].numpy()
                       for i in cfg.cross_layers for j, n in enumerate(("key", "value"))}
        ref = model(torch.from_numpy(ids), image_tokens=img, attention_mask=torch.from_numpy(mask),
                    attn_impl="eager", output_xattn=rt.has_probs)
        nxt = ref.logits[:, -1].argmax(-1)[:, None]
        mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        ref2 = model(nxt, cross_kv=kv, attention_mask=torch.from_numpy(mask2),
                     past_key_values=ref.past_key_values)
    res["vision_shapes"] = {k: list(v.shape) for k, v in state.feeds.items()}
    bad_shapes = [k for k, v in ref_vis.items() if state.feeds.get(k) is None
                  or state.feeds[k].shape != v.shape]
    if bad_shapes:
        failures.append(f"vision outputs {bad_shapes} missing or of the wrong shape")
        res["vision_max_abs_diff"] = None
    else:
        res["vision_max_abs_diff"] = max(_max_diff(state.feeds[k], v) for k, v in ref_vis.items())
        vis_tol = LOGITS_TOL * max(1.0, max(float(np.abs(v).max()) for v in ref_vis.values()))
        if not res["vision_max_abs_diff"] <= vis_tol:
            failures.append(f"vision outputs differ by {res['vision_max_abs_diff']:.2e} > {vis_tol:.2e}")
    full2 = np.concatenate([full, np.ones((2, 1), np.int64)], 1)
    logits2, _, _ = rt.step(nxt.numpy(), full2, past, state, prefill=False)
    real = mask.astype(bool)                # padding positions' logits are never used
    res["logits_max_abs_diff"] = max(_max_diff(logits[real], ref.logits.numpy()[real]),
                                     _max_diff(logits2, ref2.logits.numpy()))
    # The noise floor: PyTorch's own two attention paths on the same inputs.
    with torch.no_grad():
        sdpa = model(torch.from_numpy(ids), image_tokens=img, attention_mask=torch.from_numpy(mask),
                     attn_impl="fused").logits.numpy()
    res["torch_eager_vs_sdpa_max_abs_diff"] = _max_diff(sdpa[real], ref.logits.numpy()[real])
    scale = float(np.abs(ref.logits.numpy()[real]).max())
    res["logits_abs_max"] = scale
    tol = LOGITS_TOL * max(1.0, scale)
    res["logits_tolerance"] = tol
    if not res["logits_max_abs_diff"] <= tol:
        failures.append(f"logits differ by {res['logits_max_abs_diff']:.2e} > {tol:.2e}")
    if rt.has_probs:
        res["xattn_probs_max_abs_diff"] = max(
            _max_diff(probs[i].transpose(0, 2, 1, 3)[real], ref.xattn_probs[i].numpy().transpose(0, 2, 1, 3)[real])
            for i in cfg.cross_layers)
        if not res["xattn_probs_max_abs_diff"] <= PROBS_TOL:
            failures.append(f"cross-attention probabilities differ by "
                            f"{res['xattn_probs_max_abs_diff']:.2e}")

    # -- greedy generations ---------------------------------------------------------------
    same = 0
    examples = []
    gen_cfg = GenerationConfig(max_new_tokens=24)
    for s in range(0, len(images), batch_size):
        ims, ps = images[s:s + batch_size], prompts[s:s + batch_size]
        seqs = [rt.prompt_ids(p) for p in ps]
        got = rt.generate(rt.encode_images(ims), seqs, gen_cfg)
        ids_b, mask_b = (torch.tensor(a) for a in left_pad(seqs, cfg.pad_id))
        pix = torch.from_numpy(rt.pre.normalize(np.stack(ims)))
        want = model.generate(ids_b, pix, mask_b, max_new_tokens=gen_cfg.max_new_tokens).tolist()
        for g, w, p in zip(got.ids, want, ps):
            w = w[:w.index(cfg.eos_id)] if cfg.eos_id in w else w
            same += g == w
            if len(examples) < 3:
                examples.append({"prompt": p, "onnx": rt.tokenizer.decode(g),
                                 "torch": rt.tokenizer.decode(w)})
    res["generations_identical"] = same
    res["examples"] = examples
    if same < len(images):
        failures.append(f"greedy generations differ on {len(images) - same} of {len(images)} pairs")
    res["failures"] = failures
    res["passed"] = not failures
    return res


def check_ort_parity(export_dir: Path, data_dir: Path | None, n_pairs: int = 20,
                     batch_size: int = 10) -> dict:
    """The ORT-format copies (vision.ort, decoder.ort) against the .onnx graphs they came from.

    Both run on onnxruntime's CPU provider; the .ort files carry the CPU-provider rewrites
    baked in at conversion (Fixed optimisation style), so they differ from the .onnx graphs
    only by those rewrites: the same LOGITS_TOL bound on vision outputs and on a prefill and
    a decode step's logits, and token-identical greedy generations on ``n_pairs`` pairs.
    """
    onnx_rt = Runtime(export_dir, verify=False)
    ort_rt = Runtime(export_dir, verify=False, graph_format="ort")
    images, prompts = image_prompt_pairs(data_dir, int(onnx_rt.image_size), max(n_pairs, 2))
    failures: list[str] = []
    res: dict = {"pairs": len(images)}
    seqs = [onnx_rt.prompt_ids(p) for p in prompts[:2]]
    states = [rt.encode_images(images[:2]) for rt in (onnx_rt, ort_rt)]
    res["vision_max_abs_diff"] = max(_max_diff(states[0].feeds[k], states[1].feeds[k])
                                     for k in states[0].feeds)
    scale = max(float(np.abs(v).max()) for v in states[0].feeds.values())
    if not res["vision_max_abs_diff"] <= LOGITS_TOL * max(1.0, scale):
        failures.append(f".ort vision outputs differ from the .onnx graph's by "
                        f"{res['vision_max_abs_diff']:.2e}")
    # Both decoders on the .onnx graph's image features, so the decoder diff is its own.
    logits = []
    for rt in (onnx_rt, ort_rt):
        ids, full, lg, past, _ = rt.prefill(states[0], seqs, want_probs=False)
        nxt = lg[:, -1].argmax(-1)[:, None]
        full2 = np.concatenate([full, np.ones((len(seqs), 1), np.int64)], 1)
        lg2, _, _ = rt.step(nxt, full2, past, states[0], prefill=False, want_probs=False)
        real = full[:, full.shape[1] - ids.shape[1]:].astype(bool)
        logits.append((lg[real], lg2))
    res["logits_max_abs_diff"] = max(_max_diff(a, b) for a, b in zip(*logits))
    tol = LOGITS_TOL * max(1.0, float(np.abs(logits[0][0]).max()))
    res["logits_tolerance"] = tol
    if not res["logits_max_abs_diff"] <= tol:
        failures.append(f".ort logits differ from the .onnx graph's by "
                        f"{res['logits_max_abs_diff']:.2e} > {tol:.2e}")
    same = 0
    gen_cfg = GenerationConfig(max_new_tokens=24)
    for s in range(0, len(images), batch_size):
        ims = images[s:s + batch_size]
        seqs = [onnx_rt.prompt_ids(p) for p in prompts[s:s + batch_size]]
        got = [rt.generate(rt.encode_images(ims), seqs, gen_cfg).ids for rt in (onnx_rt, ort_rt)]
        same += sum(a == b for a, b in zip(*got))
    res["generations_identical"] = same
    if same < len(images):
        failures.append(f".ort greedy generations differ from the .onnx graphs' on "
                        f"{len(images) - same} of {len(images)} pairs")
    res["failures"] = failures
    res["passed"] = not failures
    return res


def check_fixed_vision_parity(export_dir: Path, data_dir: Path | None, n_images: int = 4) -> dict:
    """vision_fixed.onnx (static shapes, one image a call) against vision.onnx on a batch of
    ``n_images``, both on the CPU provider: every cross K/V (or embedding) within LOGITS_TOL of
    their scale."""
    dyn = Runtime(export_dir, verify=False, fixed_vision=False)
    fixed = Runtime(export_dir, verify=False, fixed_vision=True)
    images, _ = image_prompt_pairs(data_dir, int(dyn.image_size), n_images)
    a, b = dyn.encode_images(images).feeds, fixed.encode_images(images).feeds
    diff = max(_max_diff(a[k], b[k]) for k in a)
    tol = LOGITS_TOL * max(1.0, max(float(np.abs(v).max()) for v in a.values()))
    failures = [] if diff <= tol and a.keys() == b.keys() else [
        f"vision_fixed.onnx outputs differ from vision.onnx's by {diff:.2e} > {tol:.2e}"]
    return {"images": len(images), "max_abs_diff": diff, "tolerance": tol,
            "failures": failures, "passed": not failures}
