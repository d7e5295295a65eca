"""Pretrained Hugging Face vision towers from a local directory: CLIP, SigLIP, ConvNeXt.

    pixels [B,3,H,W] --CLIPVisionModel---> last_hidden_state [B,1+N,W] -- drop CLS --> [B,N,W]
                     --SiglipVisionModel-> last_hidden_state [B,N,W]   (no CLS)    --> [B,N,W]
                     --ConvNextModel-----> last_hidden_state [B,C,h,w] -- flatten --> [B,h*w,C]

`HFVisionTower` keeps the built-in `VisionTower`'s contract (pixels -> one token per patch or
feature-map cell), so the projector and the decoder do not know which tower they read.

How a RUN DIR stays loadable without the original directory: the tower is always *built* from
a config dict, `AgeVLMConfig.vision_hf_config`, never from files. The first time a config
names `vision_hf_dir`, that dir's vision config is read once (`vision_config_from_dir`) into
`vision_hf_config`, which is saved with every other model field in the RUN DIR's
config.json; the pretrained weights are loaded separately (`HFVisionTower.load_pretrained`,
at the start of training) and end up in model.safetensors like every other weight. Loading
a RUN DIR rebuilds the tower from the stored dict and loads model.safetensors: the HF dir is
never read again. The stored dict holds every model-specific field (not only those that
differ from transformers' defaults), so it does not depend on those defaults.

No network: configs and weights are read with ``local_files_only=True``, weights from
safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

# config.json model_type -> tower family. Full CLIP / SigLIP dirs (text + vision) also work:
# transformers takes their `vision_config` and the `vision_model.*` weights.
FAMILIES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip",
            "siglip_vision_model": "siglip", "convnext": "convnext"}


def _family(model_type: str | None) -> str:
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported vision model_type {model_type!r}; supported: "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def _classes(family: str):
    """(config class, model class) of a tower family."""
    import transformers as tf

    return {"clip": (tf.CLIPVisionConfig, tf.CLIPVisionModel),
            "siglip": (tf.SiglipVisionConfig, tf.SiglipVisionModel),
            "convnext": (tf.ConvNextConfig, tf.ConvNextModel)}[family]


def _stored_dict(config) -> dict:
    """The model-specific fields of a transformers config (JSON-safe), plus its model_type.

    The generic PretrainedConfig fields (generation settings, label maps, dtype) say nothing
    about the architecture and would fill config.json with ~50 irrelevant keys.
    """
    from transformers import PretrainedConfig

    generic = set(PretrainedConfig().to_dict())
    return {"model_type": config.model_type,
            **{k: v for k, v in config.to_dict().items() if k not in generic}}


def _processor_size(proc: dict) -> int | None:
    """Side of the square an HF image processor feeds the model (after resize and crop)."""
    size = proc.get("crop_size") if proc.get("do_center_crop") else proc.get("size")
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    return int(size) if isinstance(size, (int, float)) else None


def vision_config_from_dir(path: str | os.PathLike) -> dict:
    """The vision config of a local HF directory as the dict `AgeVLMConfig` stores.

    CLIP/SigLIP: the position table fixes the image size to the config's. ConvNeXt has no
    such table; its config's nominal image_size is replaced by the size its image processor
    (preprocessor_config.json) feeds it, when that file exists.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face vision model directory (no config.json)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}/config.json is not valid JSON ({e})") from None
    family = _family(model_type)
    config_cls, _ = _classes(family)
    d = _stored_dict(config_cls.from_pretrained(path, local_files_only=True))
    proc_file = path / "preprocessor_config.json"
    if family == "convnext" and proc_file.is_file():
        size = _processor_size(json.loads(proc_file.read_text()))
        d["image_size"] = size or d["image_size"]
    return d


def tower_geometry(hf: dict) -> dict:
    """AgeVLMConfig fields fixed by a stored vision config: width, image size and the pixel
    stride of one token (`patch_size`, so that N = (image_size / patch_size)^2)."""
    family = _family(hf.get("model_type"))
    if family == "convnext":
        # stem: patch_size x patch_size, stride patch_size; every later stage halves the map
        stride = hf["patch_size"] * 2 ** (hf["num_stages"] - 1)
        return {"vision_width": hf["hidden_sizes"][-1], "patch_size": stride,
                "image_size": hf["image_size"]}
    return {"vision_width": hf["hidden_size"], "patch_size": hf["patch_size"],
            "image_size": hf["image_size"]}


def normalize_vision_config(hf: dict) -> dict:
    """A vision config dict completed with the defaults of its transformers config class."""
    config_cls, _ = _classes(_family(hf.get("model_type")))
    return _stored_dict(config_cls.from_dict(dict(hf)))


class HFVisionTower(nn.Module):
    """A transformers vision model as a tower: pixels [B,3,H,W] -> tokens [B,N,W].

    Built from a stored config dict with random weights (`load_pretrained` reads a local dir's
    safetensors); frozen (requires_grad False) as built, as the paper's backbone is.
    Parameters sit under `model.`, with transformers' own names below that.
    """

    def __init__(self, hf_config: dict):
        super().__init__()
        self.family = _family(hf_config.get("model_type"))
        config_cls, model_cls = _classes(self.family)
        self.model = model_cls(config_cls.from_dict(dict(hf_config)))
        geo = tower_geometry(hf_config)
        self.width = geo["vision_width"]
        self.n_tokens = (geo["image_size"] // geo["patch_size"]) ** 2
        self.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.model(pixel_values=pixels).last_hidden_state
        if self.family == "convnext":
            return h.flatten(2).transpose(1, 2)          # (B, C, h, w) -> (B, h*w, C)
        return h[:, 1:] if self.family == "clip" else h  # CLIP's token 0 is its CLS token

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Copy the weights of a local HF dir (safetensors only, no network) into the tower.

        Raises ValueError when the dir has no safetensors weights or they do not fit.
        """
        _, model_cls = _classes(self.family)
        try:
            hf = model_cls.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except OSError as e:
            raise ValueError(f"{path}: no loadable safetensors vision weights "
                             f"({str(e).splitlines()[0]})") from None
        try:
            self.model.load_state_dict(hf.state_dict())
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not fit the stored vision config "
                             f"({str(e).splitlines()[0]})") from None
