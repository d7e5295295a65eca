"""Tokenizers: a byte-level BPE trained on a DATA DIR's text, or a local pretrained one.

Grounded phrases are character spans; `span_tokens` maps them to token indices through the
tokenizer's offsets, so a phrase that splits across tokens ("hexagon" -> "hex", "agon") or
shares a token with its neighbour keeps every token that overlaps it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import BadInput
from ..fsutil import require_dir, write_text_atomic

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|image|>"]


def corpus(data_dir: str | os.PathLike, split: str = "train") -> list[str]:
    """Every caption and question of a split as the model will see it (prompt + target), in
    file order, so merges like " yes" are learnt in the form training and decoding use."""
    from ..prompts import caption_prompt, question_prompt, target_text
    from .datadir import load_split

    texts = []
    for rec in load_split(data_dir, split):
        texts.extend(caption_prompt() + target_text(c["text"]) for c in rec.get("captions", []))
        texts.extend(question_prompt(q["question"]) + target_text(q["answer"])
                     for q in rec.get("questions", []))
    return texts


def train_bpe(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE (GPT-2 style) with our special tokens; deterministic for fixed input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not 300 <= vocab_size <= 1_000_000:
        raise BadInput(f"vocab size {vocab_size} is outside 300..1000000 (byte-level BPE needs "
                       "256 bytes + special tokens; the synthetic world needs about 500)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer.json file, or a local Hugging Face directory that holds one."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise BadInput(f"no tokenizer.json at {path}; train one with `agevlm data tokenizer` "
                       "or point to a local Hugging Face model directory")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise BadInput(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def build_tokenizer(data_dir: str | os.PathLike, vocab_size: int = 512,
                    pretrained: str | os.PathLike | None = None) -> str:
    """Write ``tokenizer.json`` into the DATA DIR; returns a one-line summary."""
    data_dir = require_dir(data_dir, "data directory", "create one with `agevlm data synth`")
    if pretrained is not None:
        tok = load_tokenizer(pretrained)
        src = Path(pretrained) / "tokenizer.json" if Path(pretrained).is_dir() else Path(pretrained)
        tmp = data_dir / ".tokenizer.json.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, data_dir / "tokenizer.json")
        return f"copied pretrained tokenizer ({tok.get_vocab_size()} tokens) to {data_dir}/tokenizer.json"
    texts = corpus(data_dir)
    if not texts:
        raise BadInput(f"{data_dir} has no training text (captions or questions) to train a tokenizer on")
    tok = train_bpe(texts, vocab_size)
    write_text_atomic(data_dir / "tokenizer.json", tok.to_str())
    mean = sum(len(tok.encode(t).ids) for t in texts[:2000]) / min(len(texts), 2000)
    return (f"trained byte-level BPE ({tok.get_vocab_size()} tokens) on {len(texts)} texts "
            f"-> {data_dir}/tokenizer.json ({mean:.1f} tokens per text)")


def span_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character range overlaps [start, end).

    Special tokens carry the empty offset (0, 0) and never match; an empty span matches
    nothing (not even a token that straddles its position).
    """
    if end <= start:
        return []
    return [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
