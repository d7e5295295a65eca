"""Training recipes: stages as data (presets or YAML; unknown keys are an error).

A stage says which parameter groups train, on what data, with which losses, for how long.
The default from-scratch `tiny` recipe emulates the paper's setting of pretrained, frozen
parts:

    0a lm:      language-model pretraining on the corpus text   (the language prior lives here),
                half the batches questions after their caption  (reading comprehension)
    0b vision:  vision-tower pretraining, image-level labels    (frozen afterwards, features cached)
    1  align:   projector + cross-attention on captions
    2  guided:  + dice loss pulling phrase attention to SAM/exact masks on ~10% of samples
    3  instruct: questions (and some captions); the LM is tuned too, as LLaVA does

Variants are one switch each: `guided` (the paper), `ca` (dice weight 0), `concat`
(LLaVA-style model, no cross-attention). With a pretrained LM (`smol`) the LM stays frozen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from agevlm_edge.errors import BadInput
from agevlm_edge.fsutil import read_json, read_yaml

GROUPS = ("vision", "projector", "xattn", "lm")
MODEL_PRESETS = ("tiny", "small")   # model.py's presets a recipe can train from scratch
KINDS = ("lm", "vision", "vlm")
# what each kind's forward reaches: text only, the tower, or cached tower features onwards
KIND_GROUPS = {"lm": ("lm",), "vision": ("vision",), "vlm": ("projector", "xattn", "lm")}


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str                       # lm (text only) | vision (image labels) | vlm (image + text)
    train: tuple = ()               # parameter groups that train: vision, projector, xattn, lm
    steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 20                # linear warmup steps, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    captions: float = 1.0           # data mix (vlm): relative weight of caption samples
    questions: float = 0.0          #                  relative weight of question samples
    question_weights: dict = field(default_factory=dict)
                                    # within the questions: relative weight by TYPE or
                                    # TYPE:ANSWER (e.g. {"count:two": 5}); others weigh 1
                                    # (batches.question_weights); {}: uniform, as before
    dice_weight: float = 0.0        # SAM-guided loss weight (0: off)
    dice_fraction: float = 0.1      # fraction of caption samples that get the dice loss
    dice_layers: tuple = ()         # cross-attention layers the loss reads (): all
    question_dice: float = 0.0      # fraction of question samples that also get the dice loss:
                                    # the asked object's word and the answer position toward
                                    # its mask, when it is in the image (batches.question_object_tokens)
    null_dice: bool = False         # and a picked question about an absent object too: the answer
                                    # position's attention on the image's patches is its loss, so
                                    # "no" is read from the null token (needs model.xattn_null)
    gate_lr_mult: float = 1.0       # LR multiplier for the tanh gates of cross-attention blocks
    context_qa: float = 0.0         # lm stage: fraction of each batch that is a question after
                                    # its image's caption, as text (reading comprehension)
    length_buckets: int = 1         # lm/vlm: run each batch as this many length-sorted parts
                                    # (3: 1.3-1.7x faster steps, same loss up to float order;
                                    # batches.length_buckets)
    loss_norm: str = "token"        # lm/vlm: next-token loss averaged over the batch's target
                                    # tokens (token) or per sample, then over samples (sample)
    val_every: int = 0              # also validate every this many steps (0: at the stage's end only)
    vision_labels: str = "image"    # vision stage: image (default) | mask (ablation: + per-token
                                    # labels from the object masks, which teach grounding to all)
    count_labels: bool = False      # vision stage: also one image-level label per class, "two
                                    # or more of it" (from the object list, no masks), for counting

    @property
    def n_captions(self) -> int:
        """vlm: caption samples in a batch (the rest are questions)."""
        return round(self.batch_size * self.captions / (self.captions + self.questions))

    @property
    def n_context(self) -> int:
        """lm: reading-comprehension samples in a batch (the rest are corpus text)."""
        return round(self.batch_size * self.context_qa)

    def validate(self) -> "Stage":
        if self.kind not in KINDS:
            raise BadInput(f"stage {self.name}: kind must be one of {', '.join(KINDS)}")
        bad = [g for g in self.train if g not in GROUPS]
        if bad or not self.train:
            raise BadInput(f"stage {self.name}: train must list groups from {', '.join(GROUPS)}")
        # a group the stage's forward never reaches would get no gradient (and stop DDP)
        idle = [g for g in self.train if g not in KIND_GROUPS.get(self.kind, GROUPS)]
        if idle:
            raise BadInput(f"stage {self.name}: kind {self.kind} cannot train {', '.join(idle)} "
                           f"(its steps reach only {', '.join(KIND_GROUPS[self.kind])})")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise BadInput(f"stage {self.name}: steps >= 0, batch_size >= 1 and lr > 0 required")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise BadInput(f"stage {self.name}: warmup >= 0, min_lr_ratio in 0..1 and "
                           "weight_decay >= 0 required")
        if self.captions < 0 or self.questions < 0:
            raise BadInput(f"stage {self.name}: captions and questions are mix weights >= 0")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.dice_layers):
            raise BadInput(f"stage {self.name}: dice_layers lists decoder layer indices, got "
                           f"{list(self.dice_layers)}")
        if not 0 <= self.dice_fraction <= 1 or not 0 <= self.question_dice <= 1 or self.dice_weight < 0:
            raise BadInput(f"stage {self.name}: dice_fraction and question_dice in 0..1 and "
                           "dice_weight >= 0 required")
        if not 0 <= self.context_qa <= 1:
            raise BadInput(f"stage {self.name}: context_qa must be in 0..1")
        if self.vision_labels not in ("image", "mask"):
            raise BadInput(f"stage {self.name}: vision_labels must be image or mask")
        if self.count_labels and self.kind != "vision":   # its type: recipe_from_dict
            raise BadInput(f"stage {self.name}: count_labels is true or false, and true only in a "
                           "vision stage")
        if self.loss_norm not in ("token", "sample"):
            raise BadInput(f"stage {self.name}: loss_norm must be token or sample")
        if self.val_every < 0:
            raise BadInput(f"stage {self.name}: val_every must be >= 0")
        if self.length_buckets < 1:
            raise BadInput(f"stage {self.name}: length_buckets must be >= 1")
        if self.gate_lr_mult <= 0:
            raise BadInput(f"stage {self.name}: gate_lr_mult must be > 0")
        bad_w = [k for k, v in self.question_weights.items() if not isinstance(k, str) or not k
                 or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")]
        if bad_w:
            raise BadInput(f"stage {self.name}: question_weights maps TYPE or TYPE:ANSWER to a "
                           f"number >= 0; bad entries: {', '.join(map(repr, bad_w))}")
        if self.kind == "vlm" and self.captions + self.questions <= 0:
            raise BadInput(f"stage {self.name}: a vlm stage needs captions or questions > 0")
        return self


@dataclass(frozen=True)
class Recipe:
    variant: str = "guided"          # guided | ca | concat
    stages: tuple = ()
    seed: int = 0
    model: dict = field(default_factory=dict)   # model config overrides
    log_every: int = 20
    checkpoint_every: int = 200
    mask_source: str = "rendered"    # which masks the dice loss uses: rendered or sam:<type>
    lm_dir: str = ""                 # local HF Llama dir (smol): LM pretraining is skipped
    model_preset: str = "tiny"       # the from-scratch model's preset (model.py): tiny | small

    def validate(self) -> "Recipe":
        if self.variant not in ("guided", "ca", "concat"):
            raise BadInput(f"recipe variant must be guided, ca or concat, got {self.variant!r}")
        if self.model_preset not in MODEL_PRESETS:
            raise BadInput(f"recipe model_preset must be one of {', '.join(MODEL_PRESETS)}, "
                           f"got {self.model_preset!r}")
        if not 0 <= self.seed < 2 ** 32:   # the per-step generators' seeds stay in 64 bits
            raise BadInput(f"recipe seed must be in 0..{2 ** 32 - 1}, got {self.seed}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise BadInput("recipe log_every and checkpoint_every must be >= 1")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        return d


def lr_at(stage: Stage, step: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (a pure function of the step)."""
    if stage.warmup and step < stage.warmup:
        return stage.lr * (step + 1) / stage.warmup
    t = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return stage.lr * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _tiny_stages(scale: float) -> list[Stage]:
    # Sized for the 15-minute budget on 2 CPU cores (measured alone, one bucket: an LM step of
    # 64 samples ~0.53 s, an instruct step ~0.57 s, a CNN vision step of 128 images ~0.2 s;
    # the whole recipe 15m54s). The text stages run each batch as 3 length-sorted buckets
    # (the same samples and loss, less padding): 1.4-1.6x the LM stage's samples/s inside
    # `agevlm train`, POPE F1 within the seeds' spread over three seeds (docs/tiny-recipe.md,
    # which also says why an earlier comparison of whole runs saw only ~1.05x).
    # The CNN tower reaches class F1 0.95
    # in 800 steps (0.98 in 1000). Once yes/no answers break away from chance, more instruct
    # steps keep paying (continuing a trained run: 0.74 -> 0.86 after 300 more steps, 0.90
    # after 700), but whether they break is chance: docs/tiny-recipe.md.
    # Cross-attention gates start at 0 (the LM starts unchanged), which makes every other
    # cross-attention weight's gradient 0: at the base LR the gates random-walk around 0 and
    # the fusion barely starts (measured: matched-vs-shuffled-image caption loss gap 0.035
    # after 150 align steps); 30x LR on the gates alone gave a gap of 0.14 in the same steps.
    # Existence questions need the asked object at the answer position, where the LM of a
    # plain LM stage barely keeps it (~1% of that hidden state's norm: nothing in captions or
    # balanced yes/no answers asks it to). Reading-comprehension text (`context_qa`) teaches
    # it, as a real pretrained LM has learnt it, and instruct tunes the LM with the fusion.
    # What breaks the chance plateau is guidance on the questions (`question_dice`): the dice
    # loss pulls the asked object's word and the answer position toward that object's mask,
    # so the query that decides the answer must carry the object (seed 1, stuck at val yes/no
    # 0.544 after instruct: 0.820 with it, from the same checkpoint; docs/tiny-recipe.md).
    # Every question about a present object gets it (question_dice 1.0), not half: from the
    # same pre-instruct checkpoints of seeds 0-2, val yes/no +0.03-0.05 on each seed, mean
    # POPE F1 +0.015-0.022 per split (docs/tiny-recipe.md).
    # Half of instruct's captions get the dice loss (0.1, the paper's fraction for its guided
    # stage, before): from the same pre-instruct checkpoints of seeds 0-3, mask IoU 0.533 ->
    # 0.630 on the mean (higher on every seed), CHAIR_i 0.302 -> 0.272 (lower on three of
    # four), POPE F1 flat; 1.0 did as well on CHAIR_i over seeds 0-2 but doubled one seed's
    # false yeses to absent prior partners (docs/tiny-recipe.md).
    # The budget is what holds the recipe short of F1 0.95 / CHAIR_i 0.05: twice these steps
    # (--scale 2, ~5 minutes on a GPU) reached F1 0.91-0.98 and CHAIR_i 0.05-0.10 over three
    # seeds, and instruct alone at 1200 steps took seeds 0 and 1 from 0.85-0.91 to 0.91-0.95
    # (CHAIR_i 0.232 -> 0.126 on their mean).
    # So instruct takes 200 steps from the LM stage (500 -> 250), time-neutral (the steps took
    # 491 / 491 / 491 s against 500 / 485 / 492 s, three seeds): from scratch, three paired
    # seeds, POPE F1 +0.03..+0.06 on the mean (0.870 / 0.886 / 0.842 -> 0.904 / 0.922 / 0.900),
    # CHAIR_i 0.297 -> 0.171, VQA colour 0.17 -> 0.75 (read on every seed), mask IoU +0.10,
    # false yeses to absent prior partners 0.25 -> 0.09 (docs/tiny-recipe.md: "Where the 15
    # minutes go"). The same extra instruct samples in batches of 32 (1400 steps): F1 lower on
    # seed 0, higher on seed 1 (two seeds), not taken.
    # And most of the rest (250 -> 50, instruct 800 -> 970; the steps took 490-503 s against
    # 481-484 s, +1-5%): from scratch, four paired seeds, POPE F1 higher and CHAIR_i lower on
    # every one (means 0.899 / 0.914 / 0.897 -> 0.940 / 0.953 / 0.935, CHAIR_i 0.161 -> 0.047;
    # seed 0 meets both targets: 0.961-0.977, 0.040), VQA colour 0.74 -> 0.92, mask IoU
    # 0.73 -> 0.82 (docs/tiny-recipe.md, "Where the 15 minutes go"). A shorter LM stage leaves
    # less of the captions' co-occurrence prior for the image to override (100 steps: between
    # the two; none at all, instruct 1010: yes/no near 50's, but colour left at chance on one
    # seed of three and CHAIR_i 0.12); the stage stays, short, as the place where the language
    # prior of a pretrained LM comes from in this emulation.
    # Then the tower (800 -> 1000 steps) paid for by align (200 -> 100) and 17 instruct steps
    # (970 -> 953; per-step costs from the same runs: vision ~0.15 s, align ~0.26 s, instruct
    # ~0.31 s): the towers underfit at 800 (train and val class F1 alike, 0.92 / 0.91 on seed 2;
    # scripts/tower_fit.py) and reach 0.97-0.98 on every seed. Four paired seeds from the
    # LM-stage checkpoint: POPE F1 +0.011 / +0.006 / +0.007 and CHAIR_i 0.047 -> 0.038 on the
    # mean; seeds 0 and 3 meet both targets (seed 0 alone before); seed 2's CHAIR_i,
    # colour, relation and partner false yeses worse on some seeds
    # (docs/tiny-recipe.md, "The tower, then").
    # Not taken, measured on the same four seeds: a learned null key/value in every
    # cross-attention (model.xattn_null, for the fusion's false yeses on objects the tower
    # reads at F1 0.98-1.00) and instruct LR 2e-3; each moved single seeds by up to 0.03
    # either way and mean POPE F1 by 0.005 at most (docs/tiny-recipe.md, "Whose false yeses").
    # Then instruct 953 -> 1500 steps, the first change here that costs time: every move above
    # was time-neutral against hosts that took 13m42s-15m46s for the recipe, while the hosts of
    # the last sessions run its steps in 519-557 s, six minutes under the budget. From the same
    # pre-instruct checkpoints, four paired seeds: POPE F1 0.951 / 0.960 / 0.943 -> 0.969 /
    # 0.972 / 0.964 on the mean, up on every seed and split, CHAIR_i 0.038 -> 0.024; every
    # seed meets both targets (worst 0.955 adversarial, CHAIR_i 0.042; seeds 1 and 2 did not
    # before; of two fresh seeds from scratch, seed 4 does too, seed 5 falls short: F1
    # 0.941-0.947, CHAIR_i 0.050); relation 0.82 -> 0.94, colour, IoU and partner false yeses
    # better too. Instruct took 475-525 s of steps (0.32-0.35 s each), the recipe's steps
    # ~700-780 s here; hosts as slow as those earlier ones would go over 15 minutes
    # (docs/tiny-recipe.md, "More instruct steps").
    # Then the tower's batches halved at twice the steps (128 x 1000 -> 64 x 2000: the same
    # images, so the same time; the vision stage ran at 637-775 images/s either way): twice
    # the updates for a tower that underfits (scripts/tower_fit.py). Seed 5, the fresh seed
    # that fell short (its tower's val class F1 0.950; scripts/tower_fit.py, mean per-class F1:
    # train 0.973, val 0.951; weakest hexagon, heart, trapezoid), gets 0.968 and POPE F1
    # 0.939 / 0.941 / 0.929 -> 0.967 / 0.961 / 0.960, CHAIR_i 0.045 -> 0.035, relation 0.61 ->
    # 0.96 (its false yeses, 0.131 to prior partners and 0.069 to other absent objects, fall
    # to 0.039 / 0.035); seed 0 stays (0.975 / 0.977 / 0.969 -> 0.974 / 0.978 / 0.973,
    # CHAIR_i 0.021 -> 0.029, colour 0.86 -> 0.94). Tower only, seed 5:
    # LR 2e-2, 5e-3 or a floor of 0.01 x LR in 1000 steps of 128 left it at 0.940-0.950
    # (mean per-class val F1; 0.951 -> 0.967 with this), seeds 1 / 2 0.971 -> 0.981 / 0.973
    # -> 0.972 (docs/tiny-recipe.md, "Smaller tower batches"). The smol recipe shares this stage.
    # Seeds 1-4 from scratch with it: POPE F1 0.958-0.980, CHAIR_i 0.023-0.028, so all six
    # seeds meet both targets (mean 0.972 / 0.974 / 0.967, CHAIR_i 0.027; 593-622 s of
    # training on one host; docs/tiny-recipe.md, "Six seeds with today's recipe").
    s = lambda n: max(1, int(n * scale))  # noqa: E731
    g = 30.0
    b = 3   # length_buckets of the text stages
    return [
        Stage("lm", "lm", ("lm",), steps=s(50), batch_size=64, lr=3e-3, warmup=s(20),
              context_qa=0.5, length_buckets=b),
        Stage("vision", "vision", ("vision",), steps=s(2000), batch_size=64, lr=1e-2,
              warmup=s(20)),
        Stage("align", "vlm", ("projector", "xattn"), steps=s(100), batch_size=64, lr=2e-3,
              warmup=s(20), captions=1.0, questions=0.0, gate_lr_mult=g, length_buckets=b),
        Stage("guided", "vlm", ("projector", "xattn"), steps=s(150), batch_size=64, lr=2e-3,
              warmup=s(10), captions=1.0, questions=0.5, dice_weight=1.0, dice_fraction=0.1,
              gate_lr_mult=g, length_buckets=b),
        Stage("instruct", "vlm", ("projector", "xattn", "lm"), steps=s(1500), batch_size=64,
              lr=1e-3, warmup=s(20), captions=0.5, questions=1.0, dice_weight=1.0,
              dice_fraction=0.5, question_dice=1.0, gate_lr_mult=g, length_buckets=b),
    ]


def _apply_variant(stages: list[Stage], variant: str) -> list[Stage]:
    if variant == "guided":
        return stages
    if variant == "ca":
        return [dataclasses.replace(st, dice_weight=0.0, question_dice=0.0) for st in stages]
    if variant == "concat":
        out = []
        for st in stages:
            train = tuple(g for g in st.train if g != "xattn")
            if st.name == "instruct" and "lm" not in train:
                train = train + ("lm",)  # LLaVA tunes the LM on instructions
            out.append(dataclasses.replace(st, train=train, dice_weight=0.0, question_dice=0.0))
        return out
    raise BadInput(f"unknown variant {variant!r}; choose guided, ca or concat")


def _smol_stages(scale: float) -> list[Stage]:
    # SmolLM2-135M frozen throughout (the paper's setting): no LM pretraining, no LM tuning in
    # instruct (a pretrained LM already carries the question); smaller batches (a step of 16 costs
    # 2.5-3 s on 2 CPU cores, so these 5000 fusion steps are sized for GPU users; CI runs a few
    # steps). Measured on the easy world with align / guided / instruct cut to 250 / 150 / 600
    # steps (53 min on this CPU): val yes/no 0.86, POPE F1 0.87-0.90 (docs/smol.md).
    s = lambda n: max(1, int(n * scale))  # noqa: E731
    tiny = {st.name: st for st in _tiny_stages(scale)}
    # question_dice 0.5 and dice_fraction 0.1 here: what the smol runs above were measured
    # with (tiny's 1.0 and 0.5 were measured on tiny only)
    tiny["instruct"] = dataclasses.replace(tiny["instruct"], question_dice=0.5, dice_fraction=0.1)
    return [tiny["vision"]] + [
        dataclasses.replace(tiny[name], batch_size=16, steps=s(steps), lr=lr,
                            train=tuple(g for g in tiny[name].train if g != "lm"))
        for name, steps, lr in (("align", 2000, 1e-3), ("guided", 1000, 5e-4), ("instruct", 2000, 5e-4))]


def preset_recipe(preset: str = "tiny", variant: str = "guided", seed: int = 0,
                  scale: float = 1.0, lm_dir: str | os.PathLike | None = None) -> Recipe:
    """The named recipe; `scale` multiplies every stage's steps (a short schedule for tests).

    `smol` needs ``lm_dir``: a local HF directory made by `agevlm lm import-gguf`. `small`
    is the `small` model (SmolLM2-135M-shaped, 16 px patches) from scratch on tiny's stages:
    the GPU user's from-scratch model, not trained to the end here (one step costs seconds on
    this CPU); its image size follows the DATA DIR (synthesize the world at 224 px for 14 x 14
    patches: `agevlm data synth --set image_size=224`).
    """
    if not 0 < scale < math.inf:
        raise BadInput(f"--scale must be a finite number > 0, got {scale}")
    if preset not in ("tiny", "small", "smol"):
        raise BadInput(f"unknown training preset {preset!r}; available: tiny, small, smol (or pass --config)")
    if preset == "smol" and not lm_dir:
        raise BadInput("the smol preset needs --lm-dir DIR (make it with `agevlm lm import-gguf --out DIR`)")
    model = {"arch": "concat"} if variant == "concat" else {}
    base = _smol_stages(scale) if preset == "smol" else _tiny_stages(scale)
    stages = [st.validate() for st in _apply_variant(base, variant)]
    if preset == "smol" and variant == "concat":
        stages = [dataclasses.replace(st, train=tuple(g for g in st.train if g != "lm")) for st in stages]
    return Recipe(variant=variant, stages=tuple(stages), seed=seed, model=model,
                  lm_dir=str(lm_dir) if lm_dir else "",
                  model_preset="small" if preset == "small" else "tiny").validate()


def _check_types(cls, d: dict, where: str) -> dict:
    """``d`` with each field's value checked against the field's annotated type (ints for
    ints, numbers for floats, lists for tuples, mappings for dicts); lists become tuples."""
    out = dict(d)
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        kind = {"int": int, "float": float, "str": str, "tuple": tuple, "dict": dict,
                "bool": bool}.get(str(f.type))
        if kind is float and isinstance(v, str):      # YAML 1.1 reads 1e-3 as a string
            with contextlib.suppress(ValueError):
                v = float(v)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            try:                                        # an integer past float's range
                v = float(v)
            except OverflowError:
                raise BadInput(f"{where}{f.name} must be a finite number, got an integer "
                               "past the float range") from None
        if kind is float and isinstance(v, float) and not math.isfinite(v):
            raise BadInput(f"{where}{f.name} must be a finite number, got {v!r}")
        ok = {bool: lambda: isinstance(v, bool),
              int: lambda: isinstance(v, int) and not isinstance(v, bool),
              float: lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda: isinstance(v, str),
              tuple: lambda: isinstance(v, (list, tuple)),
              dict: lambda: isinstance(v, dict)}.get(kind, lambda: True)()
        if not ok:
            want = {int: "an integer", float: "a number", str: "a string", tuple: "a list",
                    dict: "a mapping", bool: "true or false"}[kind]
            raise BadInput(f"{where}{f.name} must be {want}, got {v!r}")
        if kind is tuple:
            out[f.name] = tuple(v)
        elif kind is float:
            out[f.name] = float(v)
        else:
            out[f.name] = v
    return out


def recipe_from_dict(d: dict) -> Recipe:
    """A recipe from parsed YAML/JSON; unknown keys anywhere are an error."""
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(map(str, set(d) - known))
    if unknown:
        raise BadInput(f"unknown recipe keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    stage_keys = {f.name for f in dataclasses.fields(Stage)}
    stages = []
    if not isinstance(d.get("stages", []), list):
        raise BadInput(f"recipe stages must be a list of stage mappings, got {d['stages']!r}")
    for i, sd in enumerate(d.get("stages", [])):
        if not isinstance(sd, dict):
            raise BadInput(f"recipe stage {i} must be a mapping")
        bad = sorted(map(str, set(sd) - stage_keys))
        if bad:
            raise BadInput(f"recipe stage {sd.get('name', i)}: unknown keys {', '.join(bad)}")
        sd = _check_types(Stage, sd, f"recipe stage {sd.get('name', i)}: ")
        try:
            stages.append(Stage(**sd).validate())
        except TypeError as e:
            raise BadInput(f"recipe stage {i}: {e}") from None
    if not stages:
        raise BadInput("a recipe needs at least one stage")
    d = _check_types(Recipe, {k: v for k, v in d.items() if k != "stages"}, "recipe ")
    return Recipe(**{**d, "stages": tuple(stages)}).validate()


def _with_defaults(d, cls) -> dict:
    """A saved recipe or stage mapping with the fields it lacks (saved before they existed)
    at their defaults; anything but a mapping counts as empty."""
    filled = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(cls)
              if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {**filled, **d} if isinstance(d, dict) else filled


def recipe_changes(old, new: Recipe) -> list[str]:
    """What ``new`` changes against a saved recipe (config.json's ``recipe``), as ``key: old ->
    new`` strings, stage fields as ``stage.key``: a resumed run continues with ``new``, which
    may be meant (a paired study) or a slip (another --scale or preset) the user should see.
    Stages pair by position, as resuming does; a saved recipe of any shape gives a list."""
    # through JSON, as config.json holds it: tuples become lists, odd values strings
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731
    od, nd = _with_defaults(old, Recipe), norm(new.to_dict())
    saved = od["stages"] if isinstance(od["stages"], list) else []
    old_stages = [_with_defaults(st, Stage) for st in saved]
    flat = [(k, od.get(k), v) for k, v in nd.items() if k != "stages"]
    flat.append(("stages", [st.get("name") for st in old_stages], [st["name"] for st in nd["stages"]]))
    for was, st in zip(old_stages, nd["stages"]):
        if was.get("name") == st["name"]:
            flat += [(f"{st['name']}.{k}", was.get(k), v) for k, v in st.items()]
    return [f"{k}: {norm(a)} -> {b}" for k, a, b in flat if norm(a) != b]


def resume_note(run_dir: str | Path, new: Recipe) -> str:
    """The line `train --resume` prints when ``new`` differs from the recipe in the RUN DIR's
    config.json ("" when it does not). The file is read for this note only (the next
    checkpoint rewrites it), so a damaged one never stands in the way of a resume."""
    try:
        cfg = read_json(Path(run_dir) / "config.json", "RUN DIR config")
    except BadInput:
        return ""
    saved = cfg.get("recipe") if isinstance(cfg, dict) else None
    changes = recipe_changes(saved, new) if saved else []
    return (f"[train] --resume continues with a recipe that differs from the run's: "
            f"{'; '.join(changes[:6])}{' ...' if len(changes) > 6 else ''}") if changes else ""


def load_recipe(path: str | Path) -> Recipe:
    d = read_yaml(path, "--config recipe")
    if not isinstance(d, dict):
        raise BadInput(f"recipe {path} must be a mapping with a `stages` list")
    return recipe_from_dict(d)


def apply_sets(recipe: Recipe, sets: dict[str, str]) -> Recipe:
    """--set overrides: `seed=3`, `log_every=5`, `model.d_model=128`, `<stage>.steps=50`."""
    import yaml

    d = recipe.to_dict()
    names = [s["name"] for s in d["stages"]]
    for key, raw in sets.items():
        try:
            value = yaml.safe_load(raw)
        except (yaml.YAMLError, ValueError, TypeError, RecursionError) as e:  # 2020-13-45
            shown = raw if len(raw) <= 60 else raw[:57] + "..."
            raise BadInput(f"--set {key}={shown}: the value is not valid YAML "
                           f"({(str(e).splitlines() or [type(e).__name__])[0]}); quote strings, "
                           "e.g. '[1, 3]'") from None
        head, _, rest = key.partition(".")
        if not head or (not rest and "." in key):
            raise BadInput(f"--set {key}={raw}: the key is empty; write KEY=VALUE, e.g. seed=3 "
                           "or instruct.steps=100")
        if not rest:
            d[head] = value
        elif head == "model":
            d["model"] = {**d["model"], rest: value}
        elif head in names:
            d["stages"][names.index(head)][rest] = value
        else:
            raise BadInput(f"--set {key}: no recipe field or stage named {head!r} (stages: {', '.join(names)})")
    return recipe_from_dict(d)
