"""`agevlm infer`: one image, one or more prompts, answers streamed; an optional heatmap."""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Sequence

from ..errors import BadInput
from .heatmap import save_heatmap, word_maps
from .session import GenerationConfig, Runtime, TextStreamer


def run_infer(export_dir: str | os.PathLike, image: str | os.PathLike, prompts: Iterable[str],
              gen: GenerationConfig = GenerationConfig(), heatmap: str | os.PathLike | None = None,
              provider: str = "cpu", threads: int | None = None,
              write: Callable[[str], None] = print, graph_format: str = "onnx",
              chat: bool = False) -> list[str]:
    """Answer every prompt about ``image`` (its K/V computed once); returns the answers.

    Answers stream through ``write`` piece by piece. ``heatmap``: a PNG of the first
    answer's object words and where each looked. ``chat``: the prompts are turns of one
    conversation, each asked after the ones before and their answers (the self-attention
    cache is kept from turn to turn); else each prompt is a question on its own. A list of
    prompts is checked whole before any work; in a chat ``prompts`` may be an iterator
    (typed turns), each checked as it comes.
    """
    gen = gen.validate()
    if heatmap is not None and os.path.isdir(heatmap):
        raise BadInput(f"--heatmap {heatmap} is a directory; give a .png file path")
    rt = Runtime(export_dir, provider=provider, threads=threads, graph_format=graph_format)
    if rt.prefill_fault:
        print(f"note: {provider}'s multi-token attention is off on this adapter "
              f"({rt.prefill_fault}); prompts are prefilled one token per call", file=sys.stderr)
    if heatmap is not None and not rt.has_probs:
        raise BadInput(f"{export_dir} has no cross-attention probabilities (a concat model, or "
                       "exported with --no-xattn-probs); re-export without it for --heatmap")
    pixels = rt.load_image(image)
    if isinstance(prompts, Sequence):                   # every prompt checked before any work
        if not prompts:
            raise BadInput("give at least one --prompt")
        seqs = [rt.prompt_ids(p) for p in prompts]
        if chat:   # the turns and their answers (each closed by the end token) in one context
            rt.check_length(sum(map(len, seqs)) + (len(seqs) - 1) * (gen.max_new_tokens + 1),
                            gen.max_new_tokens)
        else:
            rt.check_length(max(map(len, seqs)), gen.max_new_tokens)
    elif not chat:
        raise BadInput("prompts read as they come are the turns of a chat; use --chat")
    state = rt.encode_images([pixels])                  # once, reused by every prompt
    conv = rt.chat(state) if chat else None
    answers = []
    for k, prompt in enumerate(prompts):
        write(prompt)
        streamer = TextStreamer(rt.tokenizer, write)
        maps = bool(heatmap) and k == 0
        on_token = lambda _row, tok: streamer.put(tok)   # noqa: E731
        if conv is not None:
            res = conv.ask(prompt, gen, with_maps=maps, on_token=on_token)
        else:
            res = rt.generate(state, [rt.prompt_ids(prompt)], gen, with_maps=maps, on_token=on_token)
        write("\n")
        answers.append(res.texts[0])
        if maps:
            panels = word_maps(rt.tokenizer, res.ids[0], res.maps[0], rt.manifest.get("object_words", []))
            save_heatmap(heatmap, pixels, panels)
            write(f"heatmap ({', '.join(w for w, _ in panels) or 'no object words'}) -> {heatmap}\n")
    if not answers:
        raise BadInput("no prompt was given (standard input was empty); type a turn per line")
    return answers
