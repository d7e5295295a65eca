"""Quantization schemes: one frozen, versioned dataclass each, and recipes that assign them to
the parts of a model.

    "int4:block_size=128,algo=gptq"  --parse_scheme-->  WeightOnly(bits=4, block_size=128, algo="gptq")
    --scheme int4 --part vision=int8-dynamic  --make_recipe-->  Recipe({vision: Int8Dynamic(),
                                                                       xattn: WeightOnly(), ...})

A scheme is data: ``as_dict`` goes into manifest.json and reports, ``parse_scheme`` reads
the short spec users type. Unknown names or keys are errors (no silent defaults).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from agevlm_edge.errors import BadInput

# The parts a recipe can set one by one, by the module path of each node (export.onnx_export
# names nodes "<module path>/<Op>_<k>"). The cross-attention K/V projections run in
# vision.onnx but belong to the xattn part; gates are scalar Muls and are never quantized.
PARTS = {
    "vision": "vision tower and projector (vision.onnx)",
    "xattn": "cross-attention blocks: q/k/v/o projections and their gated MLP",
    "self_attn": "self-attention q/k/v/o projections",
    "mlp": "the decoder layers' MLPs",
    "embed": "token embedding lookup (Gather)",
    "lm_head": "output projection (a tied embedding gets its own copy once quantized)",
}


def part_of(node_name: str, graph: str) -> str | None:
    """The part a node belongs to, from its name "<module path>/<Op>_<k>"; None: not a weight node."""
    path = node_name.split("/", 1)[0]
    if path.startswith("decoder.xattn."):
        return "xattn"
    if graph == "vision":
        return "vision" if path.startswith(("vision", "projector")) else None
    if path.startswith("decoder.layers."):
        return "self_attn" if ".self_attn" in path else "mlp" if ".mlp" in path else None
    if path == "decoder.embed_tokens":
        return "embed"
    if path == "lm_head":
        return "lm_head"
    return None


def layer_of(node_name: str) -> int | None:
    """The decoder layer a node belongs to: "decoder.layers.<i>...." and the cross-attention
    block placed before that layer, "decoder.xattn.<i>...." (its K/V projections run in
    vision.onnx), are layer i; anything else None."""
    path = node_name.split("/", 1)[0]
    for prefix in ("decoder.layers.", "decoder.xattn."):
        if path.startswith(prefix):
            idx = path[len(prefix):].split(".", 1)[0]
            return int(idx) if idx.isdigit() else None
    return None


@dataclass(frozen=True)
class Fp32:
    """Leave the part as exported."""
    name: str = field(default="fp32", init=False)
    version: int = field(default=1, init=False)


@dataclass(frozen=True)
class Fp16:
    """onnxruntime's OnnxModel.convert_float_to_float16, whole graphs only; inputs and
    outputs stay fp32 except the decoder's KV cache, which is fp16 (no Cast of the whole cache
    per step). For GPU targets: on a CPU the inserted Casts make it slower than fp32."""
    name: str = field(default="fp16", init=False)
    version: int = field(default=1, init=False)


@dataclass(frozen=True)
class Int8Dynamic:
    """MatMulInteger with activations quantized at run time, through optimum's ORTQuantizer and
    its target presets. Weights per channel; no calibration unless ``smooth`` > 0
    (SmoothQuant with that alpha first, quant.smooth: scales calibrated on ``calib_samples``)."""
    preset: str = "avx2"             # avx2 | avx512_vnni | arm64
    per_channel: bool = True
    smooth: float = 0.0              # SmoothQuant alpha; 0: off
    calib_samples: int = 32
    name: str = field(default="int8-dynamic", init=False)
    version: int = field(default=2, init=False)      # 2: smooth, calib_samples


@dataclass(frozen=True)
class Int8QDQ:
    """Static QDQ (QuantizeLinear/DequantizeLinear pairs), activation ranges calibrated on DATA DIR
    samples; MatMul and Gather only by default (``ops="all"`` quantizes every op: a known bad
    variant, kept to prove the drift gate catches it). The format NPUs / NNAPI take.
    ``activations="uint16"`` keeps the weights int8 and quantizes activations to 16 bits
    (A16W8, the form NPU toolchains such as QNN use for language models, whose activations
    have outliers one 8-bit range cannot hold); ``calibration`` picks onnxruntime's range
    estimator (minmax, or percentile / entropy, which clip outliers)."""
    ops: str = "matmul"              # matmul (MatMul + Gather) | all
    per_channel: bool = True
    calib_samples: int = 32
    smooth: float = 0.0              # SmoothQuant alpha before calibrating; 0: off
    activations: str = "uint8"       # uint8 | uint16
    calibration: str = "minmax"      # minmax | percentile | entropy
    name: str = field(default="int8-qdq", init=False)
    version: int = field(default=3, init=False)      # 2: smooth; 3: activations, calibration


@dataclass(frozen=True)
class WeightOnly:
    """com.microsoft MatMulNBits (and GatherBlockQuantized for the embedding): weights in
    ``bits``-bit blocks of ``block_size`` along K, one scale (and zero point unless
    ``symmetric``) per block. accuracy_level 4 computes in int8 (w4a8, the fastest decode on
    CPUs); 0 keeps fp32 compute. ``algo``: rtn (round to nearest), gptq (calibrated) or hqq
    (onnxruntime's HQQ; it writes float zero points, which hit a slow kernel: warned)."""
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    algo: str = "rtn"                # rtn | gptq | hqq
    accuracy_level: int = 4
    calib_samples: int = 32
    name: str = field(default="int4", init=False)
    version: int = field(default=1, init=False)

    def __post_init__(self):
        object.__setattr__(self, "name", f"int{self.bits}")


Scheme = Fp32 | Fp16 | Int8Dynamic | Int8QDQ | WeightOnly

# spec name -> (class, fixed arguments)
NAMES: dict[str, tuple[type, dict]] = {
    "fp32": (Fp32, {}), "fp16": (Fp16, {}), "int8-dynamic": (Int8Dynamic, {}),
    "int8-qdq": (Int8QDQ, {}), "int4": (WeightOnly, {"bits": 4}),
    "w4a8": (WeightOnly, {"bits": 4, "accuracy_level": 4}),
    "w4a32": (WeightOnly, {"bits": 4, "accuracy_level": 0}),
    "int2": (WeightOnly, {"bits": 2}),
}
CHOICES = {"preset": ("avx2", "avx512_vnni", "arm64"), "ops": ("matmul", "all"),
           "algo": ("rtn", "gptq", "hqq"), "activations": ("uint8", "uint16"),
           "calibration": ("minmax", "percentile", "entropy"),
           "block_size": (16, 32, 64, 128, 256), "accuracy_level": (0, 4)}


def _value(text: str, kind: type):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("true", "1", "yes")
    return kind(text)


def parse_scheme(spec: str) -> Scheme:
    """'int4:block_size=128,algo=gptq' -> WeightOnly(block_size=128, algo='gptq')."""
    name, _, rest = spec.strip().partition(":")
    if name not in NAMES:
        raise BadInput(f"unknown quantization scheme {name!r}; choose one of {', '.join(NAMES)} "
                       "(options as NAME:key=value,...)")
    cls, fixed = NAMES[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = dict(fixed)
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, text = item.partition("=")
        if not eq and key in fields and key not in fixed:
            raise BadInput(f"scheme {name!r}: option {key!r} needs a value ({name}:{key}=VALUE)")
        if not eq or key not in fields or key in fixed:
            raise BadInput(f"scheme {name!r} has no option {key!r} (options: "
                           f"{', '.join(k for k in fields if k not in fixed) or 'none'})")
        kind = type(fields[key].default)
        try:
            kwargs[key] = _value(text, kind)
        except ValueError:
            raise BadInput(f"scheme option {key}={text!r} is not a {kind.__name__}") from None
        if key in CHOICES and kwargs[key] not in CHOICES[key]:
            raise BadInput(f"scheme option {key}={text!r}: choose one of "
                           f"{', '.join(map(str, CHOICES[key]))}")
    if not 0.0 <= kwargs.get("smooth", 0.0) <= 1.0:
        raise BadInput(f"scheme option smooth={kwargs['smooth']} is the SmoothQuant alpha: "
                       "give a value in (0, 1] (0.5 is the paper's default), or 0 for off")
    if not 1 <= kwargs.get("calib_samples", 1) <= 100_000:
        raise BadInput(f"scheme option calib_samples must be in 1..100000, got {kwargs['calib_samples']}")
    return cls(**kwargs)


def as_dict(scheme: Scheme) -> dict:
    return dataclasses.asdict(scheme)


def label(scheme: Scheme) -> str:
    """A short human label: 'int4 b32 gptq a4', 'int8-dynamic avx2', 'fp32'."""
    if isinstance(scheme, WeightOnly):
        return (f"{scheme.name} b{scheme.block_size}{' sym' if scheme.symmetric else ''} "
                f"{scheme.algo} a{scheme.accuracy_level}")
    sq = f" sq{scheme.smooth:g}" if getattr(scheme, "smooth", 0) else ""
    if isinstance(scheme, Int8Dynamic):
        return f"int8-dynamic {scheme.preset}{sq}"
    if isinstance(scheme, Int8QDQ):
        return ("int8-qdq" + (" all-ops" if scheme.ops == "all" else "")
                + (" a16" if scheme.activations == "uint16" else "")
                + (f" {scheme.calibration}" if scheme.calibration != "minmax" else "") + sq)
    return scheme.name


@dataclass(frozen=True)
class Recipe:
    """One scheme per part (every part of PARTS appears), and optionally per decoder layer:
    a layer's scheme (``layers``) overrides its parts' schemes for that layer's
    self-attention, MLP and the cross-attention block before it (schemes.layer_of)."""
    parts: tuple                     # ((part, Scheme), ...) in PARTS order
    version: int = 1
    layers: tuple = ()               # ((layer index, Scheme), ...) ascending

    def scheme(self, part: str) -> Scheme:
        return dict(self.parts)[part]

    def scheme_for(self, part: str, layer: int | None) -> Scheme:
        """The scheme of a node of ``part`` in decoder layer ``layer`` (None: not in a layer)."""
        if layer is not None and part in LAYER_PARTS:
            override = dict(self.layers).get(layer)
            if override is not None:
                return override
        return self.scheme(part)

    def schemes(self) -> set:
        return {s for _, s in self.parts} | {s for _, s in self.layers}

    def as_dict(self) -> dict:
        d = {"version": self.version, "parts": {p: as_dict(s) for p, s in self.parts},
             "labels": {p: label(s) for p, s in self.parts}}
        if self.layers:
            d["layers"] = {str(i): as_dict(s) for i, s in self.layers}
            d["layer_labels"] = {str(i): label(s) for i, s in self.layers}
        return d

    def label(self) -> str:
        labels = [label(s) for _, s in self.parts]
        text = labels[0] if len(set(labels)) == 1 else \
            ", ".join(f"{p} {lab}" for (p, _), lab in zip(self.parts, labels))
        for lab in dict.fromkeys(label(s) for _, s in self.layers):
            idx = [i for i, s in self.layers if label(s) == lab]
            text += f", layer{'s' if len(idx) > 1 else ''} {format_layers(idx)} {lab}"
        return text


# The parts that live inside decoder layers, which a per-layer scheme overrides.
LAYER_PARTS = ("xattn", "self_attn", "mlp")


def format_layers(idx) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    idx, runs = sorted(idx), []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def make_recipe(scheme: str | Scheme = "fp32", parts: dict | None = None,
                layers: dict | None = None) -> Recipe:
    """``scheme`` for every part, except the parts named in ``parts`` ({part: spec or Scheme});
    ``layers`` ({layer index: spec or Scheme}) overrides the in-layer parts of those layers."""
    base = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    parts = dict(parts or {})
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise BadInput(f"unknown model part {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    chosen = {p: parse_scheme(s) if isinstance(s, str) else s for p, s in parts.items()}
    by_layer = {int(i): parse_scheme(s) if isinstance(s, str) else s for i, s in (layers or {}).items()}
    if any(i < 0 for i in by_layer):
        raise BadInput(f"layer indices start at 0, got {min(by_layer)}")
    recipe = Recipe(tuple((p, chosen.get(p, base)) for p in PARTS),
                    layers=tuple(sorted(by_layer.items())))
    whole = [p for p, s in recipe.parts if not part_scheme_ok(s)]
    if whole and len(whole) != len(PARTS):
        raise BadInput(f"{label(recipe.scheme(whole[0]))} converts whole graphs: use it as --scheme "
                       "without --part, or pick int8/int4 schemes for single parts")
    bad = [i for i, s in recipe.layers if not part_scheme_ok(s)] + (
        [i for i, _ in recipe.layers] if whole else [])
    if bad:
        raise BadInput(f"layer {bad[0]}: per-layer schemes must be int8/int4 schemes on a recipe "
                       "that does not convert whole graphs (fp16, int8-qdq:ops=all)")
    return recipe


def part_scheme_ok(scheme: Scheme) -> bool:
    """fp16 and every-op QDQ rewrite whole graphs, so they cannot be given to single parts."""
    return not (isinstance(scheme, Fp16) or (isinstance(scheme, Int8QDQ) and scheme.ops == "all"))


def parse_layer_options(items) -> dict[int, str]:
    """('3=int4', '0-1=int8-dynamic') -> {layer: spec} (CLI --layer)."""
    out = {}
    for item in items:
        layers, eq, spec = item.partition("=")
        lo, dash, hi = layers.strip().partition("-")
        if not eq or not spec or not lo.isdigit() or (dash and not hi.isdigit()):
            raise BadInput(f"--layer {item!r}: expected LAYER=SCHEME or FIRST-LAST=SCHEME, "
                           "e.g. 3=int8-dynamic or 0-1=fp32 (decoder layer indices from 0)")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise BadInput(f"--layer {item!r}: the range {first}-{last} is empty")
        if last >= 10_000:   # checked against the model's layer count later; this keeps the range small
            raise BadInput(f"--layer {item!r}: layer {last} is beyond any decoder's layers")
        out.update({i: spec.strip() for i in range(first, last + 1)})
    return out


def parse_part_options(items) -> dict[str, str]:
    """('vision=int8-dynamic', 'embed=fp32') -> {part: spec} (CLI --part)."""
    out = {}
    for item in items:
        part, eq, spec = item.partition("=")
        if not eq or not spec:
            raise BadInput(f"--part {item!r}: expected PART=SCHEME, e.g. vision=int8-dynamic")
        out[part.strip()] = spec.strip()
    return out
