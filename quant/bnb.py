"""bitsandbytes int8 (LLM.int8) and nf4 torch variants of a trained model.

Reference points for GPU users: every nn.Linear of the language model, the cross-attention
blocks and the projector is swapped for its bitsandbytes counterpart (the vision tower keeps
fp32: it runs once per image). On this CPU they save weight memory, not time.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from agevlm_edge.errors import BadInput

KINDS = ("int8", "nf4")


def _swap(linear: nn.Linear, kind: str) -> nn.Module:
    import bitsandbytes as bnb

    w = linear.weight.data.clone()
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(w.device)  # moving the module is what quantizes the weights


def quantize_bnb(model: nn.Module, kind: str) -> nn.Module:
    """Swap Linear layers outside the vision tower in place; returns the model.

    A tied lm_head shares the embedding matrix: it is left in fp32 with the embedding, as
    bitsandbytes users do (the embedding is a lookup, not a matmul).
    """
    if kind not in KINDS:
        raise BadInput(f"unknown bitsandbytes variant {kind!r}; choose {' or '.join(KINDS)}")
    tied = getattr(model.cfg, "tie_embeddings", False)
    kept: list[str] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full.startswith("vision."):
                continue
            if tied and full == "lm_head":
                continue
            if kind == "nf4" and (child.out_features % 32 or child.in_features % 64):
                kept.append(full)  # bitsandbytes' CPU nf4 kernel: rows in 32s, blocks of 64
                continue
            setattr(module, child_name, _swap(child, kind))
    model.bnb_kept_fp32 = kept
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized weights count at their storage size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        scb = getattr(t, "SCB", None)               # int8 row scales
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
        qs = getattr(t, "quant_state", None)        # nf4 block scales
        if qs is not None and getattr(qs, "absmax", None) is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
    return total


def evaluate_bnb(model_dir, data_dir, kind: str, **kwargs) -> dict:
    """The evaluation suite on a bitsandbytes variant of a RUN DIR (see eval.suite.evaluate)."""
    from agevlm_edge.eval.suite import evaluate

    sizes = {}

    def transform(model):
        sizes["fp32_weight_bytes"] = weight_bytes(model)
        quantize_bnb(model, kind)
        sizes["weight_bytes"] = weight_bytes(model)
        return model

    if kind not in KINDS:
        raise BadInput(f"unknown bitsandbytes variant {kind!r}; choose {' or '.join(KINDS)}")
    out_json = kwargs.pop("out_json", None)
    results = evaluate(model_dir, data_dir, model_transform=transform, **kwargs)
    results["model"].update(bnb=kind, **sizes)
    if out_json is not None:
        from agevlm_edge.fsutil import write_json_atomic

        write_json_atomic(out_json, results)
    return results


def bnb_report_rows(run_dir, data_dir, limit: int | None = None, kinds=KINDS) -> list[dict]:
    """agevlm report rows for the bitsandbytes variants of a RUN DIR: the evaluation suite,
    weight bytes in memory and PyTorch decode speed (to set beside the fp32 torch row)."""
    from pathlib import Path

    from agevlm_edge.checkpoint import load_model_files
    from agevlm_edge.report import metrics_row, torch_decode_speed

    rows = []
    for kind in kinds:
        with warnings.catch_warnings():    # int8 warns on every matmul that it casts to fp16
            warnings.simplefilter("ignore")
            res = evaluate_bnb(run_dir, data_dir, kind, suites=("pope", "chair", "grounding"),
                               limit=limit)
            model, tok, pre, _ = load_model_files(run_dir)
            speed = torch_decode_speed(quantize_bnb(model, kind), tok, pre)
        rows.append(metrics_row(f"{Path(run_dir).name} bnb-{kind}", "run (PyTorch bitsandbytes)",
                                res, res["model"]["weight_bytes"], scheme=f"bnb-{kind}",
                                label=f"bnb-{kind}", arch=model.cfg.arch, dir=str(run_dir), **speed))
    return rows
