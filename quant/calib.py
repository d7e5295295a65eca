"""Calibration inputs for the quantizers and the post-quantization quality check.

    DATA DIR (val, else train, else test split) --fp32 runtime--> per graph, a list of feeds:
      vision:  {"pixel_values": [1, 3, S, S]}
      decoder: {"input_ids": [1, T], "attention_mask", empty past, the image's fp32 vision outputs}
               for "Caption: <a caption of the image>" or "Question: ... Answer: <answer>"
               (teacher-forced text, so the activations are those of real answers),
               or, with calibration texts (--calib-text FILE), those texts in turn (the
               records still give the images): for a language model whose users write
               prose, not the DATA DIR's captions
Without a DATA DIR (RTN and int8-dynamic need none) the quality check falls back to seeded
noise images and fixed prompts. Selection is seeded: the same seed, the same samples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from agevlm_edge.errors import BadInput
from agevlm_edge.eval.common import ImageStore, image_prompt_pairs
from agevlm_edge.fsutil import sha256_file
from agevlm_edge.prompts import caption_prompt, question_prompt, target_text
from agevlm_edge.runtime.manifest import load_manifest
from agevlm_edge.runtime.session import Runtime

SPLITS = ("val", "train", "test")      # calibration never prefers the split the drift gate reads


class CalibSet:
    def __init__(self, export_dir: str | os.PathLike, data_dir: str | os.PathLike | None,
                 seed: int = 0, text_file: str | os.PathLike | None = None):
        self.export_dir = Path(export_dir)
        self._rt: Runtime | None = None
        try:
            self.image_size = int(load_manifest(self.export_dir, verify=False)["model"]["image_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise BadInput(f"{self.export_dir}/manifest.json has no valid model config ({e!r}); "
                           "re-export") from None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.seed = seed
        self.text_file = Path(text_file) if text_file is not None else None
        self.texts = read_texts(self.text_file) if self.text_file is not None else None
        self.split = None
        self._records: list[dict] = []
        if self.data_dir is not None:
            from agevlm_edge.data.datadir import load_meta, load_split, split_names

            have = split_names(load_meta(self.data_dir))
            self.split = next((s for s in SPLITS if s in have), None)
            if self.split is None:
                raise BadInput(f"--calib {self.data_dir} has no val, train or test split")
            recs = load_split(self.data_dir, self.split)
            order = np.random.default_rng(seed).permutation(len(recs))
            self._records = [recs[i] for i in order[:512]]
        self._used = 0
        self._feeds: dict[tuple[str, int], list[dict]] = {}

    @property
    def rt(self) -> Runtime:
        """The fp32 reference runtime (its manifest already verified), loaded on first use:
        only calibrated schemes need it, and it holds the fp32 weights in memory."""
        if self._rt is None:
            self._rt = Runtime(self.export_dir, verify=False)
        return self._rt

    def release(self) -> None:
        """Drop the fp32 runtime (the feeds built stay): quantize calls this once every graph
        is quantized, before the quality check loads the fp32 and quantized exports."""
        self._rt = None

    def describe(self) -> dict:
        d = {"data": str(self.data_dir) if self.data_dir else None, "split": self.split,
             "seed": self.seed, "samples_used": self._used}
        if self.texts is not None:
            d["texts"] = {"file": str(self.text_file), "n": len(self.texts),
                          "sha256": sha256_file(self.text_file)}
        return d

    def _texts(self, rec: dict, i: int) -> str:
        """The i-th calibration text, or a prompt with its teacher-forced answer from the
        record (captions and questions alternate)."""
        if self.texts is not None:
            return self.texts[i % len(self.texts)]
        qs, caps = rec.get("questions", []), rec.get("captions", [])
        if (i % 2 and qs) or not caps:
            q = qs[i // 2 % len(qs)] if qs else None
            return question_prompt(q["question"]) + target_text(str(q["answer"])) if q \
                else caption_prompt()
        return caption_prompt() + target_text(caps[i // 2 % len(caps)]["text"])

    def feeds(self, graph: str, n: int) -> list[dict]:
        """n feed dicts for ``graph`` (batch 1 each: no padding rows in the statistics),
        built once per (graph, n): SmoothQuant and the quantizer after it read the same ones."""
        if (graph, n) not in self._feeds:
            self._feeds[(graph, n)] = self._build_feeds(graph, n)
        return self._feeds[(graph, n)]

    def _build_feeds(self, graph: str, n: int) -> list[dict]:
        if self.data_dir is None:
            raise BadInput("calibration needs a DATA DIR: pass --calib DATA_DIR")
        if not self._records:
            raise BadInput(f"--calib {self.data_dir}: its {self.split} split has no records")
        store = ImageStore(self.data_dir, self.image_size)
        recs = [self._records[i % len(self._records)] for i in range(n)]
        self._used = max(self._used, n)
        out = []
        for i, rec in enumerate(recs):
            img = store.get(rec["file"])
            if graph == "vision":
                out.append({"pixel_values": self.rt.pre.normalize(img[None]).astype(np.float32)})
                continue
            state = self.rt.encode_images([img])
            prompt = [self.rt.prompt_ids(self._texts(rec, i))[: self.rt.max_seq_len]]
            ids, keys = self.rt.prefill_inputs(state, prompt)
            out.append(self.rt.decoder_feeds(ids, keys, self.rt._empty_past(1), state, prefill=True))
        return out

    def quality_pairs(self, n: int) -> tuple[list[np.ndarray], list[str]]:
        """(images, full texts) for the top-1 / KL check: calibration records or noise."""
        if not self._records:
            return image_prompt_pairs(None, self.image_size, n)
        store = ImageStore(self.data_dir, self.image_size)
        recs = [self._records[-1 - i % len(self._records)] for i in range(n)]   # not the first ones
        if self.texts is not None:      # from the end too, so they differ from the first ones used
            return ([store.get(r["file"]) for r in recs],
                    [self.texts[-1 - i % len(self.texts)] for i in range(n)])
        return [store.get(r["file"]) for r in recs], [self._texts(r, i) for i, r in enumerate(recs)]


def read_texts(path: Path) -> list[str]:
    """One calibration text per non-blank line of a UTF-8 file."""
    if not path.is_file():
        raise BadInput(f"--calib-text {path}: no such file; give a UTF-8 text file, one text per line")
    try:
        texts = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    except UnicodeDecodeError as e:
        raise BadInput(f"--calib-text {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                       "save it as UTF-8, one text per line") from None
    if not texts:
        raise BadInput(f"--calib-text {path} holds no text; give one text per line")
    return texts
