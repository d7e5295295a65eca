"""Token conventions shared by training, evaluation and the device runtime (no torch here).

    caption sample:  [bos] + enc("Caption:") + enc(" " + caption.strip()) [+ eos]
    question sample: [bos] + enc("Question: <q> Answer:") + enc(" " + answer.strip()) [+ eos]

Prompt and target are encoded separately (no special tokens added by the tokenizer), so the
prompt/target boundary is a token boundary and the loss mask is a plain prefix length. With
byte-level BPE this gives the same ids as encoding the joined string, because the
pre-tokenizer splits before the space that starts the target.
"""

from __future__ import annotations

from typing import Sequence

from .data.tokenizer import SPECIAL_TOKENS, span_tokens
from .prompts import target_text

PAD_ID = SPECIAL_TOKENS.index("<|pad|>")
BOS_ID = SPECIAL_TOKENS.index("<|bos|>")
EOS_ID = SPECIAL_TOKENS.index("<|eos|>")


def prompt_ids(tokenizer, prompt: str, bos_id: int = BOS_ID) -> list[int]:
    """[bos] + the prompt's tokens: what the model sees before it generates."""
    return [bos_id] + tokenizer.encode(prompt, add_special_tokens=False).ids


def encode_with_spans(tokenizer, prompt: str, text: str, spans: Sequence[tuple[int, int]],
                      bos_id: int = BOS_ID, eos_id: int | None = None
                      ) -> tuple[list[int], list[list[int]]]:
    """Encode prompt + target and map character spans of ``text`` to token positions.

    ids = [bos] + enc(prompt) + enc(prompts.target_text(text)) (+ [eos] when ``eos_id`` is
    given). ``spans`` are [start, end) character offsets into ``text`` as stored in the DATA
    DIR; the returned lists index into ``ids`` (every token overlapping the span, through
    data.tokenizer.span_tokens). A span that covers no token gives an empty list.
    """
    head = prompt_ids(tokenizer, prompt, bos_id)
    target = target_text(text)
    # target_text strips the text and adds one space: shift offsets to match.
    shift = 1 - (len(text) - len(text.lstrip()))
    enc = tokenizer.encode(target, add_special_tokens=False)
    ids = head + enc.ids + ([eos_id] if eos_id is not None else [])
    token_lists = [[len(head) + i for i in span_tokens(enc.offsets, s + shift, e + shift)]
                   for s, e in spans]
    return ids, token_lists


def decode_generated(tokenizer, ids: Sequence[int], eos_id: int = EOS_ID) -> str:
    """Generated ids -> text: cut at the first eos, decode, strip."""
    ids = list(ids)
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids).strip()


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad to a common length: (ids, attention mask with 1 = real token)."""
    width = max(len(s) for s in seqs)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in seqs]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
    return ids, mask
