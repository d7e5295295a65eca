"""The interface the evaluation suite runs on, and its PyTorch implementation.

Suites only call the five methods of ``EvalBackend`` with uint8 images and plain strings, so
an ONNX runtime backend can run the same suites. Torch is imported inside ``TorchBackend``
only: importing this module (for the Protocol) needs numpy alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from ..errors import BadInput
from ..prompts import caption_prompt, question_prompt
from ..text import decode_generated, encode_with_spans, left_pad, prompt_ids

if TYPE_CHECKING:
    import torch

Images = Sequence[np.ndarray]          # each uint8 [3, S, S], S = backend.image_size
Spans = Sequence[Sequence[tuple[int, int]]]


class EvalBackend(Protocol):
    """What a model must answer for the suites. Inputs are lists of equal length B."""

    image_size: int                    # S: images are given as uint8 [3, S, S]
    grid: int                          # g: phrase maps are [g, g] (S / patch size)

    def answer(self, images: Images, questions: Sequence[str], max_new_tokens: int = 4) -> list[str]:
        """Greedy answers to prompts.question_prompt(q), decoded up to eos and stripped."""
        ...

    def caption(self, images: Images, max_new_tokens: int = 40) -> list[str]:
        """Greedy captions after prompts.caption_prompt()."""
        ...

    def phrase_maps(self, images: Images, texts: Sequence[str], spans: Spans
                    ) -> list[list[np.ndarray]] | None:
        """Per text, per span: cross-attention over patches [g, g] (sums to 1).

        The text follows the caption prompt (agevlm_edge.text.encode_with_spans); each map is the
        attention probability averaged over heads, the span's tokens and every
        cross-attention layer. None when the model has no cross-attention (concat).
        """
        ...

    def first_token_logprobs(self, images: Images, questions: Sequence[str]) -> np.ndarray:
        """log-softmax of the first answer token after the question prompt: [B, vocab]."""
        ...

    def hidden_states(self, images: Images, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(image_states, text_states), each [B, L, D] for the L decoder layers.

        image_states: mean over image tokens (concat: the image positions of each layer's
        hidden states; xattn: the projected image tokens, the same for every layer).
        text_states: mean over the text's tokens (after the caption prompt) of each layer.
        """
        ...


class TorchBackend:
    """EvalBackend for an AgeVLM in PyTorch: no_grad, batches of ``batch_size``, left padding."""

    def __init__(self, model, tokenizer, preprocessor, batch_size: int = 64):
        cfg = model.cfg
        if preprocessor.image_size != cfg.image_size:
            raise BadInput(f"preprocessor image size {preprocessor.image_size} != model image "
                           f"size {cfg.image_size}; the RUN DIR is inconsistent")
        self.model, self.tokenizer, self.pre = model.eval(), tokenizer, preprocessor
        self.batch_size = batch_size
        self.image_size = cfg.image_size
        self.grid = cfg.image_size // cfg.patch_size
        self.device = next(model.parameters()).device

    # -- helpers -----------------------------------------------------------------------
    def _chunks(self, n: int) -> list[slice]:
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

    def _pixels(self, images: Images) -> "torch.Tensor":
        import torch

        x = self.pre.normalize(np.stack([np.asarray(im, np.uint8) for im in images]))
        return torch.from_numpy(x).to(self.device)                      # (B, 3, S, S)

    def _ids(self, seqs: Sequence[Sequence[int]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        ids, mask = left_pad(seqs, self.model.cfg.pad_id)
        return (torch.tensor(ids, device=self.device),
                torch.tensor(mask, device=self.device))

    def _prompt(self, text: str) -> list[int]:
        return prompt_ids(self.tokenizer, text, self.model.cfg.bos_id)

    def _generate(self, images: Images, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        import torch

        out: list[str] = []
        eos = self.model.cfg.eos_id
        with torch.no_grad():
            for sl in self._chunks(len(prompts)):
                ids, mask = self._ids([self._prompt(p) for p in prompts[sl]])
                gen = self.model.generate(ids, self._pixels(images[sl]), mask,
                                          max_new_tokens=max_new_tokens, eos_id=eos)
                out += [decode_generated(self.tokenizer, row, eos) for row in gen.tolist()]
        return out

    # -- EvalBackend -------------------------------------------------------------------
    def answer(self, images: Images, questions: Sequence[str], max_new_tokens: int = 4) -> list[str]:
        return self._generate(images, [question_prompt(q) for q in questions], max_new_tokens)

    def caption(self, images: Images, max_new_tokens: int = 40) -> list[str]:
        return self._generate(images, [caption_prompt()] * len(images), max_new_tokens)

    def first_token_logprobs(self, images: Images, questions: Sequence[str]) -> np.ndarray:
        import torch

        rows = []
        with torch.no_grad():
            for sl in self._chunks(len(questions)):
                ids, mask = self._ids([self._prompt(question_prompt(q)) for q in questions[sl]])
                logits = self.model(ids, pixel_values=self._pixels(images[sl]),
                                    attention_mask=mask).logits[:, -1]   # left padding: last is real
                rows.append(torch.log_softmax(logits.float(), dim=-1).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.model.cfg.vocab_size), np.float32)

    def phrase_maps(self, images: Images, texts: Sequence[str], spans: Spans
                    ) -> list[list[np.ndarray]] | None:
        import torch

        if self.model.cfg.arch != "xattn":
            return None
        out: list[list[np.ndarray]] = []
        with torch.no_grad():
            for sl in self._chunks(len(texts)):
                encs = [self._encode(t, s) for t, s in zip(texts[sl], spans[sl])]
                ids, mask = self._ids([e[0] for e in encs])
                res = self.model(ids, pixel_values=self._pixels(images[sl]), attention_mask=mask,
                                 attn_impl="eager", output_xattn=True)
                # mean over heads, then over cross-attention layers: (B, T, N)
                probs = torch.stack([p.float().mean(1) for p in res.xattn_probs.values()]).mean(0)
                out += [self._span_maps(probs[b], ids.shape[1] - len(e[0]), e[1])
                        for b, e in enumerate(encs)]
        return out

    def _encode(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[list[int]]]:
        return encode_with_spans(self.tokenizer, caption_prompt(), text, spans, self.model.cfg.bos_id)

    def _span_maps(self, probs: "torch.Tensor", pad: int, token_lists: list[list[int]]) -> list[np.ndarray]:
        """probs (T, N) of one padded row -> one [g, g] map per span (NaN if it has no token)."""
        g = self.grid
        maps = []
        for idx in token_lists:
            if not idx:
                maps.append(np.full((g, g), np.nan, np.float32))
                continue
            m = probs[[pad + i for i in idx]].mean(0)                       # (N,)
            maps.append(m.reshape(g, g).cpu().numpy().astype(np.float32))
        return maps

    def hidden_states(self, images: Images, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        img_out, txt_out = [], []
        concat = self.model.cfg.arch == "concat"
        n_img = self.model.cfg.n_image_tokens if concat else 0
        with torch.no_grad():
            for sl in self._chunks(len(texts)):
                # One span over the whole text: its tokens, without bos and prompt.
                encs = [self._encode(t, [(0, len(t))]) for t in texts[sl]]
                ids, mask = self._ids([e[0] for e in encs])
                img = self.model.image_tokens(self._pixels(images[sl]))      # (B, N, D)
                hidden = self.model(ids, image_tokens=img, attention_mask=mask,
                                    output_hidden=True).hidden_states     # L x (B, S, D)
                H = torch.stack(hidden, dim=1).float()                     # (B, L, S, D)
                if concat:
                    img_states = H[:, :, :n_img].mean(2)
                else:
                    img_states = img.float().mean(1)[:, None].expand(-1, H.shape[1], -1)
                # Text positions: after the image (concat) and the row's left padding.
                starts = [n_img + ids.shape[1] - len(e[0]) for e in encs]
                txt_states = torch.stack([H[b, :, [s + i for i in e[1][0]]].mean(1)
                                          for b, (s, e) in enumerate(zip(starts, encs))])
                img_out.append(img_states.cpu().numpy())
                txt_out.append(txt_states.cpu().numpy())
        return np.concatenate(img_out), np.concatenate(txt_out)
