"""RUN DIR model files (Hugging Face style): config.json, model.safetensors, tokenizer.json,
preprocessor.json. Training state for exact resume lives in train/ (training_state/).

Weights are safetensors only; every file is written to a temp path and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import BadInput
from .fsutil import require_dir, write_bytes_atomic, write_json_atomic, write_text_atomic


def save_model_files(run_dir: str | os.PathLike, model, tokenizer, preprocessor, extra: dict | None = None) -> None:
    """Write the model part of a RUN DIR (weights last, so a partial dir has no weights)."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", {"model": model.cfg.to_dict(), **(extra or {})})
    write_text_atomic(run_dir / "tokenizer.json", tokenizer.to_str())
    write_json_atomic(run_dir / "preprocessor.json", preprocessor.to_dict())
    # Tied lm_head shares the embedding tensor; safetensors stores each tensor once.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    write_bytes_atomic(run_dir / "model.safetensors", save(state))


def read_safetensors(path: str | os.PathLike) -> dict:
    """The tensors of a safetensors file; a damaged or foreign file is one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise BadInput(f"{path} is not a readable safetensors file ({e}); write it again "
                       "(or restore it)") from None


def load_model_files(run_dir: str | os.PathLike):
    """(model, tokenizer, preprocessor, config dict) from a RUN DIR, model in eval mode."""
    from .data.tokenizer import load_tokenizer
    from .model import AgeVLM, AgeVLMConfig, load_weights
    from .preprocess import Preprocessor

    run_dir = require_dir(run_dir, "run directory", "train one with `agevlm train`")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor.json"):
        if not (run_dir / name).is_file():
            raise BadInput(f"{run_dir} is not a RUN DIR: {name} is missing "
                           "(train one with `agevlm train`)")
    try:
        config = json.loads((run_dir / "config.json").read_text())
        cfg = AgeVLMConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise BadInput(f"{run_dir}/config.json is not a valid model config ({e})") from None
    model = AgeVLM(cfg)
    state = read_safetensors(run_dir / "model.safetensors")
    try:
        missing, unexpected = load_weights(model, state)
    except ValueError as e:
        raise BadInput(f"{run_dir}/model.safetensors: {e}") from None
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise BadInput(f"{run_dir}/model.safetensors does not match config.json "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), load_tokenizer(run_dir / "tokenizer.json"), \
        Preprocessor.load(run_dir / "preprocessor.json"), config
