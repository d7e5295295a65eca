"""Hugging Face Llama-family checkpoints (LlamaForCausalLM shapes: SmolLM2, TinyLlama,
Llama-3.2) from a local directory into AgeVLM's decoder.

Our decoder's state-dict keys are Hugging Face Llama's with `model.` -> `decoder.`, so the
weights load by name; the cross-attention blocks (`decoder.xattn.<i>`), the projector and the
vision tower keep their initialisation. Safetensors only, sharded or not; no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .model import AgeVLM, AgeVLMConfig, load_weights

_HF_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model",
              "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
              "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden",
              "rope_theta": "rope_theta", "rms_norm_eps": "rms_eps",
              "tie_word_embeddings": "tie_embeddings", "head_dim": "head_dim"}


def lm_config_from_hf(hf: dict) -> dict:
    """Our decoder fields from a Hugging Face Llama config.json (LlamaForCausalLM shapes)."""
    if hf.get("model_type") not in ("llama", None) and "LlamaForCausalLM" not in hf.get("architectures", []):
        raise ValueError(f"not a Llama-family config (model_type={hf.get('model_type')!r})")
    scaling = dict(hf.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope_scaling of type {kind!r} is not supported (default and llama3 are)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("attention/MLP biases are not supported (Llama has none)")
    out = {ours: hf[theirs] for theirs, ours in _HF_FIELDS.items() if hf.get(theirs) is not None}
    if kind == "llama3":
        out["rope_scaling"] = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings")
                               if k in scaling}
    out["max_seq_len"] = min(int(hf.get("max_position_embeddings", 2048)), 8192)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(hf.get(name), int):
            out[name.replace("_token_id", "_id")] = hf[name]
    return out


def hf_llama_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a local HF Llama directory (safetensors only, sharded or not)."""
    from .checkpoint import read_safetensors

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    sd = {}
    for f in files:
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} not found (only safetensors weights are loaded)")
        sd.update(read_safetensors(path / f))
    return sd


def load_llama_weights(model: AgeVLM, sd: dict[str, torch.Tensor]) -> list[str]:
    """Load HF LlamaForCausalLM weights into the decoder; returns the keys left at init."""
    ours = {}
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        ours[k.replace("model.", "decoder.", 1) if k.startswith("model.") else k] = v
    if model.cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)
    missing, unexpected = load_weights(model, ours)
    if unexpected:
        raise ValueError(f"checkpoint keys the model does not have: {unexpected[:5]}")
    lm_missing = [k for k in missing if k.startswith("decoder.") and not k.startswith("decoder.xattn.")]
    if lm_missing or (not model.cfg.tie_embeddings and "lm_head.weight" in missing):
        raise ValueError(f"checkpoint lacks language-model weights: {(lm_missing or ['lm_head.weight'])[:5]}")
    return missing


def from_pretrained_lm(path: str | Path, **vision_and_fusion) -> AgeVLM:
    """An AgeVLM whose decoder is a local HF Llama checkpoint; the rest is freshly initialised."""
    hf = json.loads((Path(path) / "config.json").read_text())
    cfg = AgeVLMConfig(**{**lm_config_from_hf(hf), **vision_and_fusion})
    model = AgeVLM(cfg)
    load_llama_weights(model, hf_llama_state_dict(path))
    return model
