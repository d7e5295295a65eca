"""`agevlm infer`: one image, one or more prompts, answers streamed; an optional heatmap."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from ..errors import BadInput
from .heatmap import save_heatmap, word_maps
from .session import GenerationConfig, Runtime, TextStreamer


def run_infer(export_dir: str | os.PathLike, image: str | os.PathLike, prompts: Sequence[str],
              gen: GenerationConfig = GenerationConfig(), heatmap: str | os.PathLike | None = None,
              provider: str = "cpu", threads: int | None = None,
              write: Callable[[str], None] = print, graph_format: str = "onnx") -> list[str]:
    """Answer every prompt about ``image`` (its K/V computed once); returns the answers.

    Answers stream through ``write`` piece by piece. ``heatmap``: a PNG of the first
    answer's object words and where each looked.
    """
    if not prompts:
        raise BadInput("give at least one --prompt")
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
    seqs = [rt.prompt_ids(p) for p in prompts]          # every prompt checked before any work
    rt.check_length(max(map(len, seqs)), gen.max_new_tokens)
    state = rt.encode_images([pixels])                  # once, reused by every prompt
    answers = []
    for k, (prompt, seq) in enumerate(zip(prompts, seqs)):
        write(prompt)
        streamer = TextStreamer(rt.tokenizer, write)
        res = rt.generate(state, [seq], gen, with_maps=bool(heatmap) and k == 0,
                          on_token=lambda _row, tok: streamer.put(tok))
        write("\n")
        answers.append(res.texts[0])
        if heatmap and k == 0:
            panels = word_maps(rt.tokenizer, res.ids[0], res.maps[0], rt.manifest.get("object_words", []))
            save_heatmap(heatmap, pixels, panels)
            write(f"heatmap ({', '.join(w for w, _ in panels) or 'no object words'}) -> {heatmap}\n")
    return answers
