"""The evaluation suite's backend on the device runtime (onnxruntime, no torch).

Same interface and conventions as eval.backend.TorchBackend (left padding, greedy decoding,
phrase maps averaged over heads, span tokens and cross-attention layers), so
`agevlm eval --model EXPORT_DIR` runs POPE / CHAIR / grounding / VQA on the export.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import BadInput
from ..text import encode_with_spans
from ..prompts import caption_prompt, question_prompt
from .session import GenerationConfig, Runtime, log_softmax


class OnnxBackend:
    def __init__(self, runtime: Runtime, batch_size: int = 64):
        self.rt, self.batch_size = runtime, batch_size
        self.image_size, self.grid = runtime.image_size, runtime.grid
        # itm needs decoder hidden states, which exports do not output; grounding needs the
        # cross-attention probabilities of an xattn export (a concat one skips it by itself).
        self.supported_suites = ("pope", "chair", "vqa") + \
            (("grounding",) if runtime.has_probs or runtime.arch == "concat" else ())
        self.unsupported_reason = ("an EXPORT DIR has no hidden states for itm"
                                   + ("" if "grounding" in self.supported_suites else
                                      ", and this one was exported with --no-xattn-probs"))

    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

    def _generate(self, images, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        out: list[str] = []
        cfg = GenerationConfig(max_new_tokens=max_new_tokens)
        for sl in self._chunks(len(prompts)):
            seqs = [self.rt.prompt_ids(p) for p in prompts[sl]]
            out += self.rt.generate(self.rt.encode_images(images[sl]), seqs, cfg).texts
        return out

    def answer(self, images, questions: Sequence[str], max_new_tokens: int = 4) -> list[str]:
        return self._generate(images, [question_prompt(q) for q in questions], max_new_tokens)

    def caption(self, images, max_new_tokens: int = 40) -> list[str]:
        return self._generate(images, [caption_prompt()] * len(images), max_new_tokens)

    def _prefill(self, images, seqs):
        ids, _, logits, _, probs = self.rt.prefill(self.rt.encode_images(images), seqs)
        return ids, logits, probs

    def first_token_logprobs(self, images, questions: Sequence[str]) -> np.ndarray:
        rows = []
        for sl in self._chunks(len(questions)):
            seqs = [self.rt.prompt_ids(question_prompt(q)) for q in questions[sl]]
            _, logits, _ = self._prefill(images[sl], seqs)
            rows.append(log_softmax(logits[:, -1]).astype(np.float32))
        return np.concatenate(rows) if rows else np.zeros((0, int(self.rt.cfg["vocab_size"])), np.float32)

    def phrase_maps(self, images, texts: Sequence[str], spans) -> list[list[np.ndarray]] | None:
        if self.rt.arch != "xattn":
            return None
        if not self.rt.has_probs:
            raise BadInput("the grounding suite needs cross-attention probabilities; this export "
                           "has none: re-export with --xattn-probs or leave grounding out of --suite")
        out: list[list[np.ndarray]] = []
        g = self.grid
        for sl in self._chunks(len(texts)):
            encs = [encode_with_spans(self.rt.tokenizer, caption_prompt(), t, s, self.rt.bos_id)
                    for t, s in zip(texts[sl], spans[sl])]
            ids, _, probs = self._prefill(images[sl], [e[0] for e in encs])
            mean = np.mean([p.mean(1) for p in probs.values()], axis=0)      # (B, T, N)
            for b, (seq, token_lists) in enumerate(encs):
                pad = ids.shape[1] - len(seq)
                out.append([mean[b, [pad + i for i in idx]].mean(0).reshape(g, g).astype(np.float32)
                            if idx else np.full((g, g), np.nan, np.float32) for idx in token_lists])
        return out

    def hidden_states(self, images, texts):
        raise BadInput("the itm suite needs decoder hidden states, which exports do not output; "
                       "run it on the RUN DIR, or leave itm out of --suite")
