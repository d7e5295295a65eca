"""The device runtime: two onnxruntime sessions (vision, decoder), a tokenizer and numpy.

An image goes through vision.onnx once: its cross-attention K/V (or, for concat, its image
embeddings) are kept as an ``ImageState`` and fed to every decoder step of every question
asked about it. The self-attention cache lives in OrtValues bound from step to step (no copy
back to numpy). Exports whose self-attention is GroupQueryAttention (manifest "kv_cache":
"inplace") get, on the CPU and WebGPU providers, a preallocated cache that each step's op
appends to in place: past and present are bound to one buffer [B, Hkv, capacity, hd], where
other exports copy the whole cache into a grown tensor every step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..data.tokenizer import load_tokenizer
from ..errors import BadInput
from ..text import left_pad
from ..preprocess import Preprocessor
from .images import load_image
from .manifest import load_manifest

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "webgpu": "WebGpuExecutionProvider", "coreml": "CoreMLExecutionProvider",
             "nnapi": "NnapiExecutionProvider", "xnnpack": "XnnpackExecutionProvider"}
# Providers with device memory that onnxruntime's python binding can bind outputs to: the KV
# cache stays there between decode steps instead of a round trip through host memory.
DEVICE_MEMORY = {"cuda": "cuda", "webgpu": "webgpu"}
# Providers with an in-place cache: onnxruntime's CPU and WebGPU GroupQueryAttention append in
# place when past and present share a buffer (checked against the grown cache in tests; on
# WebGPU only with the cache in device memory). Not tried on the others (no CUDA device here,
# this machine's onnxruntime has no XNNPACK), which keep the grown cache.
INPLACE_KV = ("cpu", "webgpu")
# Providers that take static shapes only: a mobile-gpu export's vision_fixed.onnx (one image a
# call, unfused) is their vision graph.
FIXED_SHAPES = ("coreml", "nnapi")
FIXED_VISION = "vision_fixed.onnx"


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0        # 0: greedy
    top_k: int = 0                  # 0: no top-k cut
    top_p: float = 1.0              # 1: no nucleus cut
    seed: int | None = None
    stop_ids: tuple = ()            # stop tokens besides the model's eos

    def validate(self) -> "GenerationConfig":
        if self.max_new_tokens < 1:
            raise BadInput("max_new_tokens must be at least 1")
        if not 0 <= self.temperature < math.inf or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise BadInput("need a finite temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        if self.seed is not None and self.seed < 0:
            raise BadInput(f"the seed must be a non-negative integer, not {self.seed}")
        return self


@dataclass
class ImageState:
    """vision.onnx outputs for a batch of images, by decoder input name."""
    feeds: dict
    batch: int


@dataclass
class Generation:
    ids: list                                   # generated ids per row (eos excluded)
    texts: list
    maps: list = field(default_factory=list)    # per row, per generated token: [g, g] or None
    # (self-attention cache, key mask) after the last step: what a Conversation continues
    cache: tuple | None = field(default=None, repr=False)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (stable: the max is subtracted first)."""
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sample_next(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> next ids [B]: argmax at temperature 0, else temperature/top-k/top-p."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    # the max subtracted first: x <= 0, so a tiny temperature gives -inf, never inf - inf
    # (an overflowed logit, +inf in fp16, counts as the largest finite one; NaN as none)
    x = np.minimum(np.nan_to_num(logits.astype(np.float64), nan=-np.inf), np.finfo(np.float64).max)
    if not np.isfinite(x.max(-1)).all():
        raise BadInput("the model gave no finite logit for a token (NaN or -inf everywhere); "
                       "use a less quantized variant or re-export the model")
    with np.errstate(over="ignore"):
        x = (x - x.max(-1, keepdims=True)) / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = np.partition(x, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p < 1:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < cfg.top_p   # always keeps the top one
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


class TextStreamer:
    """Token ids in, new text out: decodes the whole answer so far and writes what is new,
    holding back an incomplete UTF-8 character (byte-level BPE splits them)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.said = ""

    def put(self, tok: int) -> None:
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if len(text) > len(self.said) and not text.endswith("\ufffd"):
            self.write(text[len(self.said):])
            self.said = text


GRAPH_FORMATS = ("onnx", "ort")


class Runtime:
    """An EXPORT DIR loaded for inference (hashes verified first)."""

    def __init__(self, export_dir: str | os.PathLike, provider: str = "cpu",
                 threads: int | None = None, verify: bool = True, graph_format: str = "onnx",
                 kv_on_device: bool = True, kv_inplace: bool = True,
                 fixed_vision: bool | None = None):
        """``graph_format``: "onnx" (vision.onnx, decoder.onnx) or "ort" (the ORT-format
        copies a mobile-gpu export ships for onnxruntime's mobile builds). ``kv_on_device``:
        on cuda / webgpu, keep the KV cache in device memory between steps (False: bind it
        to host memory, the baseline benchmarks/bench_kv_binding.py compares with).
        ``kv_inplace``: on cpu, and on webgpu with ``kv_on_device``, for an export with
        "kv_cache": "inplace", keep the cache in a preallocated buffer the decoder appends to
        (False: a grown copy per step, the baseline benchmarks/bench_decode.py and
        bench_kv_binding.py compare with). ``fixed_vision``: run the export's
        vision_fixed.onnx (static shapes, one image a call); None: on the providers that need
        it (FIXED_SHAPES) where the export has one."""
        import onnxruntime as ort

        self.dir = Path(export_dir)
        self.manifest = load_manifest(self.dir, verify=verify)
        try:
            self.cfg = self.manifest["model"]
            self.arch = self.cfg["arch"]
            self.image_size = int(self.cfg["image_size"])
            self.grid = self.image_size // int(self.cfg["patch_size"])
            self.max_seq_len = int(self.cfg["max_seq_len"])
            self.eos_id, self.bos_id, self.pad_id = (int(self.cfg[k]) for k in ("eos_id", "bos_id", "pad_id"))
            self.n_layers = int(self.cfg["n_layers"])
            self.kv_heads, self.head_dim = int(self.cfg["n_kv_heads"]), int(self.cfg["head_dim"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise BadInput(f"{self.dir}/manifest.json has no valid model config ({e!r}); re-export") from None
        self.pre = Preprocessor.load(self.dir / "preprocessor.json")
        self.tokenizer = load_tokenizer(self.dir / "tokenizer.json")
        if graph_format not in GRAPH_FORMATS:
            raise BadInput(f"unknown graph format {graph_format!r}; choose one of {', '.join(GRAPH_FORMATS)}")
        files = [self.dir / f"{g}.{graph_format}" for g in ("vision", "decoder")]
        has_fixed = graph_format == "onnx" and FIXED_VISION in self.manifest.get("files", {})
        if fixed_vision and not has_fixed:
            raise BadInput(f"{self.dir} has no {FIXED_VISION} (static-shape vision graph); "
                           "`agevlm export --target mobile-gpu` writes it")
        self.fixed_vision = has_fixed if fixed_vision is None and provider in FIXED_SHAPES \
            else bool(fixed_vision)
        if self.fixed_vision:
            files[0] = self.dir / FIXED_VISION
        ort_info = (self.manifest.get("rewrites") or {}).get("ort_format") or {}
        if graph_format == "ort":
            if not all(f.name in self.manifest.get("files", {}) for f in files):
                raise BadInput(f"{self.dir} has no ORT-format graphs (vision.ort, decoder.ort); only "
                               "`agevlm export --target mobile-gpu` writes them: use the .onnx graphs "
                               "or re-export for mobile-gpu")
            if provider == "webgpu":   # measured: its session refuses the CPU-internal NHWC Conv
                raise BadInput("the .ort graphs carry onnxruntime's CPU-provider rewrites (Fixed "
                               "optimisation), which WebGPU sessions refuse: use --graph-format onnx "
                               "on webgpu, or --provider cpu")
        if provider not in PROVIDERS:
            raise BadInput(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        name = PROVIDERS[provider]
        if name not in ort.get_available_providers():
            raise BadInput(f"this onnxruntime build has no {name} (available: "
                           f"{', '.join(ort.get_available_providers())}); install the onnxruntime "
                           f"package built for {provider} or use --provider cpu")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        providers = [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
        self.provider = provider
        self.kv_device = DEVICE_MEMORY.get(provider) if kv_on_device else None
        self.kv_inplace = (kv_inplace and provider in INPLACE_KV
                           and (provider == "cpu" or self.kv_device is not None)
                           and self.manifest.get("kv_cache") == "inplace")
        self.graph_format = graph_format
        try:
            self.vision = ort.InferenceSession(str(files[0]), opts, providers=providers)
            self.decoder = ort.InferenceSession(str(files[1]), opts, providers=providers)
        except Exception as e:   # onnxruntime raises its own pybind error types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if graph_format == "ort":
                raise BadInput(f"onnxruntime {ort.__version__} cannot load {self.dir}'s .ort graphs "
                               f"({first}); ORT-format files load on the onnxruntime that wrote "
                               f"them ({ort_info.get('onnxruntime', 'see the manifest')}) or a newer "
                               "one: upgrade onnxruntime or use --graph-format onnx") from None
            raise BadInput(f"onnxruntime {ort.__version__} cannot load {self.dir}'s graphs ({first}); "
                           "the cpu target needs opset 23 (onnxruntime >= 1.22), or re-export "
                           "with --target mobile-gpu (opset 18)") from None
        outs = [o.name for o in self.decoder.get_outputs()]
        self.present_names = [n for n in outs if n.startswith("present_")]
        # the cache's element type: fp16 in an fp16 variant (`agevlm quantize --scheme fp16`)
        self.kv_dtype = np.float16 if any(i.type == "tensor(float16)" for i in self.decoder.get_inputs()
                                          if i.name.startswith("past_")) else np.float32
        self.prob_names = [n for n in outs if n.startswith("xattn_probs_")]
        self.has_probs = bool(self.prob_names)
        # On a GPU provider, check once that a multi-token step agrees with one-token steps;
        # where it does not, prefill goes one token per call (see multi_token_fault).
        self.prefill_fault = None if provider in ("cpu", "xnnpack") else self.multi_token_fault()
        if self.prefill_fault and self.arch == "concat":
            raise BadInput(f"{provider} computes multi-token attention wrongly on this adapter "
                           f"({self.prefill_fault}); a concat export feeds its image rows in "
                           "one multi-token step and cannot avoid that: use --provider cpu")

    # -- images ------------------------------------------------------------------------
    def load_image(self, path: str | os.PathLike) -> np.ndarray:
        return load_image(path, self.pre)

    def encode_images(self, images: Sequence[np.ndarray]) -> ImageState:
        """uint8 [3, S, S] images -> their cross K/V (or embeddings): once per image."""
        x = self.pre.normalize(np.stack([np.asarray(im, np.uint8) for im in images])).astype(np.float32)
        names = [o.name for o in self.vision.get_outputs()]
        if self.fixed_vision:          # static shapes: one image a call
            runs = [self.vision.run(names, {"pixel_values": x[i:i + 1]}) for i in range(len(x))]
            outs = [np.concatenate(parts) for parts in zip(*runs)]
        else:
            outs = self.vision.run(names, {"pixel_values": x})
        return ImageState(dict(zip(names, outs)), len(images))

    # -- one decoder call --------------------------------------------------------------
    def _empty_past(self, batch: int, capacity: int = 0) -> dict:
        """An empty cache: zero-length arrays, or with an in-place cache and ``capacity``,
        buffers with room for that many positions."""
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        past = {f"past_{kv}_{l}": z for l in range(self.n_layers) for kv in ("key", "value")}
        return self._reserve(past, capacity) if self.kv_inplace and capacity else past

    def _reserve(self, past: dict, keys: int) -> dict:
        """In-place cache buffers that hold at least ``keys`` positions: ``past`` itself
        when they do, else new ones holding past's positions, of twice the old capacity
        (no more than the max context) or ``keys`` if that is more.

        On cpu the buffers are OrtValues, appended to from the first step on. On a device
        (webgpu) they are numpy arrays: onnxruntime's python binding cannot allocate device
        memory, so the first step takes the host buffer as past and writes its presents,
        at the same capacity, to device memory the provider allocates (one upload); from then
        on those device buffers are past and present (``step``)."""
        import onnxruntime as ort

        first = next(iter(past.values()))
        on_ort = isinstance(first, ort.OrtValue)
        cap = first.shape()[2] if on_ort else first.shape[2]
        if keys <= cap and (on_ort or self.kv_device):
            return past
        new_cap = max(keys, min(2 * cap, self.max_seq_len))
        out = {}
        for name, v in past.items():
            old = v.numpy() if isinstance(v, ort.OrtValue) else v   # device -> host on webgpu
            buf = np.zeros(old.shape[:2] + (new_cap,) + old.shape[3:], self.kv_dtype)
            buf[:, :, :cap] = old
            if self.kv_device:
                out[name] = buf
                continue
            # memory onnxruntime owns: an OrtValue made from a numpy array only borrows it,
            # and the OrtValues io_binding.get_outputs() returns for it do not keep it alive
            # (measured: logits 36 off once the array was freed and reused)
            out[name] = ort.OrtValue.ortvalue_from_shape_and_type(buf.shape, self.kv_dtype, "cpu")
            out[name].update_inplace(buf)
        return out

    def prefill(self, image: ImageState, prompts: Sequence[Sequence[int]], want_probs: bool = True,
                reserve: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, dict]:
        """B prompts (token ids, left-padded here) after their images, from an empty cache.

        Returns (ids [B,T], key mask [B, image rows + T] with 1 = real (what decode steps
        extend), logits, presents, probs). One decoder call, or one per token where this
        provider's multi-token attention was found faulty (``prefill_fault``). ``reserve``:
        positions an in-place cache is allocated for (the prompt's and the tokens to come),
        so that decode steps do not have to grow it.
        """
        ids, keys = self.prefill_inputs(image, prompts)
        capacity = max(reserve, keys.shape[1])
        if self.prefill_fault:
            return (ids, keys) + self._one_token_steps(ids, keys, image, want_probs, capacity)
        past = self._empty_past(len(prompts), capacity)
        logits, past, probs = self.step(ids, keys, past, image, prefill=True, want_probs=want_probs)
        return ids, keys, logits, past, probs

    def extend(self, image: ImageState, history: tuple, ids: Sequence[int], reserve: int = 0
               ) -> tuple[np.ndarray, dict, np.ndarray]:
        """Feed one row's ``ids`` after the tokens a cache already holds (``history``: the
        (cache, key mask) a Generation ends with): (logits [1,T,V], cache, key mask). The
        positions and keys are those of one prefill over the whole transcript; only the new
        tokens are computed. One decoder call, or one per token where ``prefill_fault``.
        ``reserve``: positions an in-place cache should have room for."""
        past, mask = history
        if mask.shape[0] != 1 or not len(ids):
            raise BadInput("a cache is extended one row at a time, by at least one token")
        new = np.array([list(ids)], np.int64)
        mask = np.concatenate([mask, np.ones_like(new)], 1)
        if self.kv_inplace:
            past = self._reserve(past, min(max(reserve, mask.shape[1]), self.max_seq_len))
        if not self.prefill_fault:
            logits, past, _ = self.step(new, mask, past, image, prefill=False, want_probs=False)
            return logits, past, mask
        start, steps = mask.shape[1] - new.shape[1], []
        for t in range(new.shape[1]):
            logits, past, _ = self.step(new[:, t:t + 1], mask[:, :start + t + 1], past, image,
                                        prefill=False, want_probs=False)
            steps.append(logits)
        return np.concatenate(steps, 1), past, mask

    def _one_token_steps(self, ids: np.ndarray, keys: np.ndarray, image: ImageState,
                         want_probs: bool, capacity: int = 0) -> tuple[np.ndarray, dict, dict]:
        """A prefill as one decoder call per token (a concat export's image rows go with the
        first): (logits [B,T,V], presents, probs with T concatenated), as one call gives them.
        An in-place cache gets the capacity one call would have allocated (``capacity``, at
        least the prompt's keys)."""
        n_img = keys.shape[1] - ids.shape[1]
        past, steps = self._empty_past(len(ids), max(capacity, keys.shape[1])), []
        for t in range(ids.shape[1]):
            logits, past, probs = self.step(ids[:, t:t + 1], keys[:, :n_img + t + 1], past, image,
                                            prefill=t == 0, want_probs=want_probs)
            steps.append((logits, probs))
        logits = np.concatenate([lg for lg, _ in steps], 1)
        probs = {k: np.concatenate([p[k] for _, p in steps], 2) for k in steps[0][1]}
        return logits, past, probs

    def multi_token_fault(self, n_tokens: int = 24) -> str | None:
        """None when one decoder call over ``n_tokens`` tokens gives the last token the logits
        that ``n_tokens`` one-token calls give it (within 1e-3 of the logits' scale for fp32
        exports, 1e-2 for fp16 and quantized ones), else what was measured.

        Why: on the WebGPU adapter we can test (Mesa's software Vulkan, subgroup size 8)
        onnxruntime's flash-attention prefill kernel, which GroupQueryAttention and
        MultiHeadAttention with equal head sizes run for every multi-token query, is wrong
        beyond 8 keys (scripts/probe_webgpu_mha.py), while one-token steps take its decode
        kernels and are right. 24 tokens reach past the key tiles of subgroup sizes 8 and 16.
        """
        n = min(n_tokens, self.max_seq_len - (self.grid ** 2 if self.arch == "concat" else 0))
        if n < 2:                  # no room for a multi-token prompt: nothing to check
            return None
        image = self.encode_images([np.full((3, self.image_size, self.image_size), 128, np.uint8)])
        ids = 3 + np.arange(n, dtype=np.int64)[None] % (int(self.cfg["vocab_size"]) - 3)
        keys = self.prefill_inputs(image, [ids[0].tolist()])[1]
        once = self.step(ids, keys, self._empty_past(1), image, prefill=True, want_probs=False)[0]
        ref = self._one_token_steps(ids, keys, image, want_probs=False)[0][0, -1]
        diff, scale = float(np.abs(once[0, -1] - ref).max()), float(np.abs(ref).max())
        # quantized and fp16 exports round differently for different step lengths (dynamic
        # activation scales, accumulation order): a coarser bound there
        tol = (1e-3 if self.manifest.get("precision") == "fp32" else 1e-2) * scale
        if diff <= tol:
            return None
        return (f"the last logits of one {n}-token step are {diff:.2g} from those of {n} "
                f"one-token steps, at logits up to {scale:.2g}")

    def prefill_inputs(self, image: ImageState, prompts: Sequence[Sequence[int]]
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(left-padded ids [B,T], key mask [B, image rows + T]) of a prefill."""
        ids, mask = (np.array(a, np.int64) for a in left_pad(prompts, self.pad_id))
        n_img = image.feeds["image_embeds"].shape[1] if self.arch == "concat" else 0
        keys = np.concatenate([np.ones((len(prompts), n_img), np.int64), mask], 1) if n_img else mask
        return ids, keys

    def decoder_feeds(self, ids: np.ndarray, mask: np.ndarray, past: dict, image: ImageState,
                      prefill: bool) -> dict:
        """decoder.onnx inputs by name (concat: the image embeddings at prefill only)."""
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **past}
        if self.arch == "concat":
            emb = image.feeds["image_embeds"]
            feeds["image_embeds"] = emb if prefill else emb[:, :0]
        else:
            feeds.update(image.feeds)
        return feeds

    def step(self, ids: np.ndarray, mask: np.ndarray, past: dict, image: ImageState,
             prefill: bool, want_probs: bool = True) -> tuple[np.ndarray, dict, dict]:
        """(logits [B,T,V], presents as OrtValues by past name, probs by layer) for one call.

        The presents stay onnxruntime values bound to the next call: no copy through numpy,
        and on cuda / webgpu they stay in device memory (``kv_on_device``). With an in-place
        cache (``kv_inplace``) the presents are past's buffers, written in place (grown
        first if ``mask`` outgrows them; a host buffer, on webgpu, is written once to device
        buffers of its capacity, see ``_reserve``): a past is used up by the step that
        extends it.
        Logits and probabilities come back to host memory; probabilities only when
        ``want_probs``.
        """
        if self.kv_inplace:
            past = self._reserve(past, mask.shape[1])
        feeds = self.decoder_feeds(ids, mask, past, image, prefill)
        binding = self.decoder.io_binding()
        for k, v in feeds.items():
            if isinstance(v, np.ndarray):
                binding.bind_cpu_input(k, np.ascontiguousarray(v))
            else:
                binding.bind_ortvalue_input(k, v)
        shared = set()   # the presents written in place into their past's buffer
        for o in self.decoder.get_outputs():
            own = past[o.name.replace("present_", "past_")] if o.name in self.present_names else None
            if own is not None and self.kv_inplace and not isinstance(own, np.ndarray):
                binding.bind_ortvalue_output(o.name, own)
                shared.add(o.name)
            elif own is not None and self.kv_device:
                binding.bind_output(o.name, self.kv_device)
            else:
                binding.bind_output(o.name)
        self.decoder.run_with_iobinding(binding)
        outs = dict(zip([o.name for o in self.decoder.get_outputs()], binding.get_outputs()))
        logits = outs["logits"].numpy()
        # the OrtValues we bound, not the ones io_binding hands back for the same memory
        presents = {n.replace("present_", "past_"): past[n.replace("present_", "past_")]
                    if n in shared else outs[n] for n in self.present_names}
        probs = {int(n.rsplit("_", 1)[1]): outs[n].numpy() for n in self.prob_names} if want_probs else {}
        return logits, presents, probs

    # -- prompts -----------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        if not prompt or not prompt.strip():
            raise BadInput("the prompt is empty; give a question or 'Caption:'")
        return [self.bos_id] + self.tokenizer.encode(prompt, add_special_tokens=False).ids

    @property
    def context_image_tokens(self) -> int:
        """Positions of the context the image takes (concat models prepend it), else 0."""
        return self.grid ** 2 if self.arch == "concat" else 0

    def check_length(self, n_prompt: int, max_new: int, held: int = 0) -> None:
        """``held``: tokens a conversation's cache already holds before the prompt."""
        n_img = self.context_image_tokens
        if n_img + held + n_prompt + max_new <= self.max_seq_len:
            return
        if held:
            raise BadInput(f"this conversation holds {held} tokens; the next turn's {n_prompt} + "
                           f"{max_new} new ones exceed the model's maximum context of "
                           f"{self.max_seq_len}: start a new conversation or lower --max-new-tokens")
        raise BadInput(f"prompt of {n_prompt} tokens + {max_new} new tokens"
                       + (f" + {n_img} image tokens" if n_img else "")
                       + f" exceeds the model's maximum context of {self.max_seq_len}; "
                       "shorten the prompt or lower --max-new-tokens")

    # -- generation --------------------------------------------------------------------
    def generate(self, image: ImageState, prompts: Sequence[Sequence[int]],
                 cfg: GenerationConfig = GenerationConfig(), with_maps: bool = False,
                 on_token: Callable[[int, int], None] | None = None,
                 history: tuple | None = None) -> Generation:
        """Generate for B prompts (token ids) about B images (left padding).

        ``with_maps``: per generated token, its cross-attention map [g, g] (mean over heads
        and cross-attention layers), as the eval suite's phrase maps. ``on_token(row, id)``
        is called as each token is chosen. ``history``: a previous Generation's ``cache``
        (one row) the prompt follows, instead of an empty cache (see Conversation).
        """
        it = self._tokens(image, prompts, cfg, with_maps, history)
        while True:
            try:
                row, tok = next(it)
            except StopIteration as stop:
                return stop.value
            if on_token:
                on_token(row, tok)

    def stream(self, image: ImageState, prompt: str, cfg: GenerationConfig = GenerationConfig()
               ) -> Iterator[str]:
        """Yield one answer's text piece by piece as its tokens are generated."""
        pieces: list[str] = []
        streamer = TextStreamer(self.tokenizer, pieces.append)
        for _, tok in self._tokens(image, [self.prompt_ids(prompt)], cfg, False):
            streamer.put(tok)
            yield from pieces
            pieces.clear()

    def chat(self, image: ImageState) -> "Conversation":
        """A conversation about one encoded image: each ``ask`` follows the turns before."""
        return Conversation(self, image)

    def _tokens(self, image: ImageState, prompts: Sequence[Sequence[int]],
                cfg: GenerationConfig, with_maps: bool, history: tuple | None = None):
        """Yields (row, token) as chosen; returns the Generation."""
        cfg = cfg.validate()
        if with_maps and not self.has_probs:
            raise BadInput("this export has no cross-attention probabilities (exported without "
                           "--xattn-probs, or a concat model); re-export to get heatmaps")
        B = len(prompts)
        if image.batch != B:
            raise BadInput(f"{image.batch} images for {B} prompts")
        held = 0 if history is None else history[1].shape[1] - self.context_image_tokens
        self.check_length(max(len(p) for p in prompts), cfg.max_new_tokens, held)
        rng = np.random.default_rng(cfg.seed)
        stops = {self.eos_id, *cfg.stop_ids}
        # room for the prompt, the new tokens and the extra step that maps may take
        reserve = min(self.context_image_tokens + held + max(len(p) for p in prompts)
                      + cfg.max_new_tokens + 1, self.max_seq_len)
        if history is None:
            _, full_mask, logits, past, _ = self.prefill(image, prompts, want_probs=False,
                                                         reserve=reserve)
        else:
            if B != 1:
                raise BadInput("a conversation continues one row at a time")
            logits, past, full_mask = self.extend(image, history, prompts[0], reserve)
        done = np.zeros(B, bool)
        out: list[list[int]] = [[] for _ in range(B)]
        maps: list[list] = [[] for _ in range(B)]
        for t in range(cfg.max_new_tokens):
            nxt = sample_next(logits[:, -1], cfg, rng)
            nxt = np.where(done, self.pad_id, nxt)
            for b in range(B):
                if not done[b]:
                    if int(nxt[b]) in stops:
                        done[b] = True
                    else:
                        out[b].append(int(nxt[b]))
                        yield b, int(nxt[b])
            last = done.all() or t == cfg.max_new_tokens - 1
            # A generated token's map comes from the step that feeds it: one more step at
            # the end when maps are wanted and the last tokens were not fed yet.
            if last and not (with_maps and any(len(m) < len(o) for m, o in zip(maps, out))):
                break
            full_mask = np.concatenate([full_mask, np.ones((B, 1), np.int64)], 1)
            logits, past, probs = self.step(nxt[:, None], full_mask, past, image, prefill=False,
                                            want_probs=with_maps)
            if with_maps:
                m = np.mean([p[:, :, -1].mean(1) for p in probs.values()], axis=0)   # (B, N)
                for b in range(B):
                    if len(maps[b]) < len(out[b]):
                        maps[b].append(m[b].reshape(self.grid, self.grid))
            if last:
                break
        texts = [self.tokenizer.decode(o).strip() for o in out]
        return Generation(out, texts, maps, cache=(past, full_mask))


class Conversation:
    """Turns about one image. The transcript is each turn's prompt (with its bos), its
    answer and the end token, one after another; a turn's prompt follows the transcript so
    far, whose self-attention cache is kept, so a turn feeds the decoder only its own tokens
    (and the end of the previous answer not fed yet). The image's cross K/V (a concat
    model's image rows: in the cache) come from one ``encode_images``. Answers are those of
    one generation over the whole transcript (a test compares them)."""

    def __init__(self, rt: Runtime, image: ImageState):
        if image.batch != 1:
            raise BadInput(f"a conversation is about one image, not {image.batch}")
        self.rt, self.image = rt, image
        self.ids: list[int] = []         # the transcript so far
        self.fed = 0                     # how much of it the cache holds
        self._cache: tuple | None = None

    def turn_ids(self, prompt: str) -> list[int]:
        """The transcript a prompt asked now is answered after, the prompt included."""
        return self.ids + self.rt.prompt_ids(prompt)

    def ask(self, prompt: str, cfg: GenerationConfig = GenerationConfig(), with_maps: bool = False,
            on_token: Callable[[int, int], None] | None = None) -> Generation:
        turn = self.rt.prompt_ids(prompt)
        res = self.rt.generate(self.image, [self.ids[self.fed:] + turn], cfg, with_maps, on_token,
                               history=self._cache)
        self._cache = res.cache
        self.fed = res.cache[1].shape[1] - self.rt.context_image_tokens
        self.ids = self.ids + turn + res.ids[0] + [self.rt.eos_id]
        return res
