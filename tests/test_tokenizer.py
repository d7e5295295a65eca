"""Tokenizer training, loading, and grounded span -> token mapping."""

from __future__ import annotations

import json

from agevlm_edge.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, span_tokens, train_bpe
from conftest import assert_one_line_error, run_cli

TEXTS = ["A red hexagon and a blue star.", "Is there a moon in the image?", "two cyan rings",
         "A green star above a red moon.", "How many stars are there?"] * 20


def test_bpe_is_deterministic_and_keeps_special_tokens():
    a, b = train_bpe(TEXTS, 300), train_bpe(TEXTS, 300)
    assert a.to_str() == b.to_str()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert a.token_to_id(t) == i
    enc = a.encode("A red hexagon")
    assert a.decode(enc.ids) == "A red hexagon"


def test_spans_that_split_across_tokens_map_to_every_overlapping_token():
    tok = train_bpe(TEXTS, 300)
    text = "two cyan rhombi next to a hexagon"   # "rhombi" is unseen: split into pieces
    enc = tok.encode(text)
    start = text.index("rhombi")
    idx = span_tokens(enc.offsets, start, start + len("rhombi"))
    assert len(idx) >= 2, enc.tokens
    assert "".join(enc.tokens[i] for i in idx).lstrip("Ġ") == "rhombi"
    assert idx == list(range(idx[0], idx[-1] + 1))
    # A span that starts inside a token still selects that token.
    mid = span_tokens(enc.offsets, start + 1, start + 2)
    assert len(mid) == 1 and mid[0] in idx
    # Special tokens (empty offsets) never match.
    assert span_tokens([(0, 0), (0, 3)], 0, 3) == [1]
    assert span_tokens([(0, 3)], 1, 1) == []  # an empty span, inside a token


def test_cli_trains_on_a_data_dir_and_copies_a_pretrained_one(small_world, tmp_path):
    proc = run_cli("data", "tokenizer", "--data", small_world, "--vocab-size", "400", check_rc=0)
    assert "trained byte-level BPE" in proc.stdout
    tok = load_tokenizer(small_world)
    assert tok.get_vocab_size() <= 400 and tok.token_to_id("<|image|>") == 3
    assert len(tok.encode(" yes").ids) == len(tok.encode(" no").ids) == 1  # answers are one token
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text(train_bpe(TEXTS, 300).to_str())
    data = tmp_path / "copy"
    data.mkdir()
    run_cli("data", "tokenizer", "--data", data, "--pretrained", hf_dir, check_rc=0)
    assert json.loads((data / "tokenizer.json").read_text()) == json.loads(
        (hf_dir / "tokenizer.json").read_text())


def test_bad_tokenizer_inputs(tmp_path, small_world):
    assert_one_line_error(run_cli("data", "tokenizer", "--data", tmp_path / "nope"),
                          "data directory not found")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    assert_one_line_error(run_cli("data", "tokenizer", "--data", small_world, "--pretrained", bad),
                          "not a valid tokenizer.json")
    for size in ("50", "100000000000000000000000"):
        assert_one_line_error(run_cli("data", "tokenizer", "--data", small_world, "--vocab-size",
                                      size), "is outside 300..1000000")
    assert_one_line_error(run_cli("data", "tokenizer", "--data", tmp_path / "nope", "--pretrained",
                                  small_world), "data directory not found")
