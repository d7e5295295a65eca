"""`agevlm train`: staged training with exact resume and optional data parallelism.

Determinism: every step's batch comes from a generator seeded by (seed, stage, step), and
nothing else draws random numbers during training, so a run stopped at step k and resumed
reaches bit-identical weights. Data parallelism (torchrun, gloo) splits each global batch
across ranks and normalises losses by global counts; the lm and vlm stages give the
single-process loss, the vision stage does not (its BatchNorm stem sees each rank's part of
the batch: torch's SyncBatchNorm runs on GPUs only).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from agevlm_edge.checkpoint import save_model_files
from agevlm_edge.data.datadir import load_meta
from agevlm_edge.data.tokenizer import load_tokenizer
from agevlm_edge.errors import BadInput
from agevlm_edge.fsutil import check_out, read_json, staged_dir, write_json_atomic
from agevlm_edge.model import AgeVLM, build_config
from agevlm_edge.preprocess import Preprocessor

from .batches import (SplitData, check_pools, collate, context_questions, count_labels,
                      length_buckets, load_split_data, question_weights, token_labels)
from .devices import (all_sum, environment, maybe_init_distributed, resolve_device,
                      world_info)
from .losses import lm_loss_sum
from .metrics import f1, truncate_metrics, weakest
from .recipe import Recipe, Stage, lr_at, resume_note
from .steps import LMStep, VisionHead, VisionStep, VLMStep

VAL_LIMIT = 300


# ---------------------------------------------------------- sampling, parameter groups
def _absent(s) -> bool:
    """A question sample about an absent object (its one phrase has an empty mask)."""
    return len(s.phrases) == 1 and not s.phrases[0][1].any()


def _generator(seed: int, stage_idx: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage_idx * 100_003 + step)


def set_trainable(model: AgeVLM, groups: tuple) -> list[torch.nn.Parameter]:
    """Only the listed parameter groups (AgeVLM.parts) train; returns their parameters."""
    parts = model.parts()
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        for mod in parts[g]:
            mod.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- the run
def _build(data_dir: Path, recipe: Recipe, image_size: int):
    """(tokenizer, model): from scratch with the DATA DIR's tokenizer, or around a local
    pretrained Llama (recipe.lm_dir) with its own tokenizer and weights."""
    if recipe.lm_dir:
        from agevlm_edge.hf_llama import hf_llama_state_dict, load_llama_weights
        from agevlm_edge.smol import smol_config

        cfg = smol_config(recipe.lm_dir, image_size=image_size, **recipe.model)
        model = AgeVLM(cfg)
        try:
            load_llama_weights(model, hf_llama_state_dict(recipe.lm_dir))
        except (ValueError, FileNotFoundError) as e:
            raise BadInput(f"--lm-dir {recipe.lm_dir}: {e}") from None
        return load_tokenizer(recipe.lm_dir), model
    tok_path = data_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise BadInput(f"{data_dir} has no tokenizer.json; run `agevlm data tokenizer --data {data_dir}`")
    tok = load_tokenizer(tok_path)
    ids = {k: tok.token_to_id(f"<|{k}|>") for k in ("pad", "bos", "eos")}
    overrides = {"vocab_size": tok.get_vocab_size(), "image_size": image_size,
                 "pad_id": ids["pad"], "bos_id": ids["bos"], "eos_id": ids["eos"], **recipe.model}
    v = overrides["vocab_size"]
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadInput(f"model.vocab_size must be an integer, got {v!r}")
    if v < tok.get_vocab_size():
        raise BadInput(f"model.vocab_size {overrides['vocab_size']} is smaller than the "
                       f"tokenizer's {tok.get_vocab_size()} tokens; leave it out (it follows "
                       "the tokenizer) or make it larger")
    try:
        return tok, AgeVLM(build_config(recipe.model_preset, **overrides))
    except (TypeError, ValueError) as e:
        raise BadInput(f"model settings: {e}") from None


class Run:
    """Holds the model, data and state of one training run; each stage kind has a `_step_*`.

    Data stays on the CPU; each step's batch moves to ``device`` (the cached vision features
    live there). On CUDA the steps are not bit-reproducible (atomic adds in some backward
    kernels), so exact resume is a CPU guarantee.
    """

    def __init__(self, data_dir: Path, out: Path, recipe: Recipe, limit: int | None,
                 device: torch.device = torch.device("cpu")):
        meta = load_meta(data_dir)
        self.data_dir, self.out, self.recipe, self.device = data_dir, out, recipe, device
        size = int(meta["generator"].get("config", {}).get("image_size", 64)) if meta.get("name") == "synth" else 64
        torch.manual_seed(recipe.seed)
        self.tok, self.model = _build(data_dir, recipe, size)
        self.cfg = self.model.cfg
        for st in recipe.stages:
            if st.dice_weight > 0 and not set(st.dice_layers) <= set(self.cfg.cross_layers):
                raise BadInput(f"stage {st.name}: dice_layers {list(st.dice_layers)} are not all "
                               f"cross-attention layers (this model's: {list(self.cfg.cross_layers)})")
        if any(st.null_dice and st.dice_weight > 0 for st in recipe.stages) and not self.cfg.xattn_null:
            raise BadInput("null_dice needs the null token: add --set model.xattn_null=true "
                           "(or turn null_dice off)")
        self.pre = Preprocessor(self.cfg.image_size)
        if self.cfg.vision_hf_dir:   # pretrained HF tower: its weights and its normalisation
            try:
                self.model.vision.load_pretrained(self.cfg.vision_hf_dir)
            except ValueError as e:
                raise BadInput(f"vision tower: {e}") from None
            self.pre = Preprocessor.from_hf_dir(self.cfg.vision_hf_dir, self.cfg.image_size)
        self.classes = list(meta["vocabulary"]["classes"])
        self.colours = list(meta["vocabulary"].get("colours", []))
        # count columns only when a vision stage asks for them: other recipes keep their head
        # (and with it every later random draw) as it was
        counts = any(st.kind == "vision" and st.count_labels for st in recipe.stages)
        self.n_labels = len(self.classes) * (2 if counts else 1) + len(self.colours)
        self.head = VisionHead(self.cfg.vision_out_width, self.n_labels)
        self.model.to(device)
        self.head.to(device)
        args = (self.tok, self.cfg.image_size, self.cfg.patch_size, recipe.mask_source)
        ids = dict(bos=self.cfg.bos_id, eos=self.cfg.eos_id)
        self.train_data = load_split_data(data_dir, "train", *args, limit=limit, **ids)
        self.val_data = load_split_data(data_dir, "val", *args, limit=VAL_LIMIT, **ids) \
            if "val" in meta["splits"] else self.train_data
        for st in recipe.stages:   # checked before any step, so that a typo fails at once
            if st.kind == "vlm" and st.question_weights:
                self.question_weights(st)
        check_pools([st for st in recipe.stages if not self.pretrained(st)], self.train_data,
                    lambda: len(self.context_questions()), data_dir)
        self.feats: dict[str, torch.Tensor] = {}
        self.state = {"stage": 0, "step": 0, "global_step": 0}
        self.optimizer: torch.optim.Optimizer | None = None

    # -- data --------------------------------------------------------------------------
    def pretrained(self, stage: Stage) -> bool:
        """Whether ``stage`` is skipped: it pretrains a part loaded pretrained (--lm-dir,
        --vision-dir)."""
        return (stage.kind == "lm" and bool(self.recipe.lm_dir)) or \
            (stage.kind == "vision" and bool(self.cfg.vision_hf_dir))

    def context_questions(self, split: str = "train") -> list:
        """Reading-comprehension LM samples (batches.context_questions), built on first use."""
        cache = self.__dict__.setdefault("_context", {})
        if split not in cache:
            data = self.train_data if split == "train" else self.val_data
            cache[split] = context_questions(data.records, self.tok, self.cfg.bos_id, self.cfg.eos_id)
        return cache[split]

    def question_weights(self, stage: Stage) -> torch.Tensor:
        """The stage's sampling weight per train question (batches.question_weights), cached."""
        cache = self.__dict__.setdefault("_q_weights", {})
        key = tuple(sorted(stage.question_weights.items()))
        if key not in cache:
            cache[key] = question_weights(self.train_data.records, stage.question_weights)
        return cache[key]

    def token_labels(self) -> torch.Tensor:
        """Per-token train labels for the mask-supervised ablation, built on first use."""
        if getattr(self, "_token_labels", None) is None:
            grid = self.cfg.image_size // self.cfg.patch_size
            self._token_labels = token_labels(self.train_data.records, self.classes,
                                              self.colours, grid)
        return self._token_labels

    def train_labels(self, stage: Stage) -> torch.Tensor:
        """A vision stage's train labels [n, C+K] (+ C count columns under Stage.count_labels,
        built on first use)."""
        if not stage.count_labels:
            return self.train_data.labels
        if getattr(self, "_count_labels", None) is None:
            d = self.train_data
            self._count_labels = torch.cat([d.labels, count_labels(d.records, self.classes)], 1)
        return self._count_labels

    def pixels(self, data: SplitData, rows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.pre.normalize(data.images[rows].numpy())).to(self.device)

    def to_device(self, batch: dict) -> dict:
        """A collated batch with its tensors on the run's device."""
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @torch.no_grad()
    def vision_features(self, data: SplitData) -> torch.Tensor:
        """Vision tower tokens [n, N, Wv] of every image of a split, in chunks of 256."""
        n = len(data.images)
        return torch.cat([self.model.vision(self.pixels(data, torch.arange(i, min(i + 256, n))))
                          for i in range(0, n, 256)])

    def cache_features(self) -> None:
        """Frozen vision tower features of every train/val image, computed once."""
        self.model.vision.eval()
        self.feats = {"train": self.vision_features(self.train_data),
                      "val": self.vision_features(self.val_data)}

    def _shard(self, idx: torch.Tensor) -> torch.Tensor:
        rank, world = world_info()
        return idx[rank::world]

    # -- one step per stage kind -------------------------------------------------------
    def lm_samples(self, stage: Stage, g: torch.Generator) -> list:
        """This rank's samples of one LM step: corpus text plus reading-comprehension texts."""
        pool = self.train_data.captions + self.train_data.questions
        n_ctx = stage.n_context
        samples = [pool[i] for i in torch.randint(len(pool), (stage.batch_size - n_ctx,), generator=g)]
        if n_ctx:
            ctx = self.context_questions()
            samples += [ctx[i] for i in torch.randint(len(ctx), (n_ctx,), generator=g)]
        return [samples[i] for i in self._shard(torch.arange(len(samples)))]

    def step_lm(self, ddp, stage: Stage, g: torch.Generator) -> dict:
        samples = self.lm_samples(stage, g)
        out = ddp([self.to_device(collate(b, self.cfg.pad_id, self.cfg.n_image_tokens, lm_only=True))
                   for b in length_buckets(samples, stage.length_buckets)])
        n = all_sum(out["lm_count"])
        loss = out["lm_sum"] / n * world_info()[1]
        return {"loss": loss, "lm_loss": all_sum(out["lm_sum"]) / n}

    def step_vision(self, ddp, stage: Stage, g: torch.Generator) -> dict:
        idx = self._shard(torch.randint(len(self.train_data.images), (stage.batch_size,), generator=g))
        tok = self.token_labels()[idx].to(self.device) if stage.vision_labels == "mask" else None
        labels = self.train_labels(stage)[idx].to(self.device)
        out = ddp(self.pixels(self.train_data, idx), labels, tok)
        n = all_sum(out["count"])
        return {"loss": out["loss_sum"] / n * world_info()[1], "bce": all_sum(out["loss_sum"]) / n}

    def vlm_samples(self, stage: Stage, g: torch.Generator) -> list:
        """This rank's samples of one VLM step: captions (a dice_fraction of them with their
        phrases, when the stage has a dice loss) and questions (a question_dice fraction of
        them with theirs), in the stage's mix; questions drawn by the stage's question_weights."""
        d = self.train_data
        n_cap = stage.n_captions
        caps = torch.randint(max(len(d.captions), 1), (n_cap,), generator=g) if n_cap else torch.zeros(0, dtype=torch.long)
        n_q = stage.batch_size - n_cap
        if stage.question_weights and n_q:   # without them the draw stays as it was (same batches)
            qs = torch.multinomial(self.question_weights(stage), n_q, replacement=True, generator=g)
        else:
            qs = torch.randint(max(len(d.questions), 1), (n_q,), generator=g)
        dice_pick = torch.rand(n_cap, generator=g) < stage.dice_fraction
        # drawn only when used, so that recipes without question dice keep their batches
        q_pick = (torch.rand(len(qs), generator=g) < stage.question_dice).tolist() \
            if stage.question_dice > 0 and stage.dice_weight > 0 else [False] * len(qs)
        samples = []
        for pool, rows, picks in ((d.captions, caps, dice_pick.tolist()), (d.questions, qs, q_pick)):
            for i, pick in zip(rows.tolist(), picks):
                s = pool[i]
                keep = pick and stage.dice_weight > 0 and (stage.null_dice or not _absent(s))
                samples.append(s if keep else type(s)(s.image, s.ids, s.prompt_len))
        return [samples[i] for i in self._shard(torch.arange(len(samples)))]

    def step_vlm(self, ddp, stage: Stage, g: torch.Generator) -> dict:
        samples = self.vlm_samples(stage, g)
        with_dice = stage.dice_weight > 0 and self.cfg.arch == "xattn"
        buckets = [self.to_device(collate(b, self.cfg.pad_id, self.cfg.n_image_tokens))
                   for b in length_buckets(samples, stage.length_buckets)]
        out = ddp([(self.feats["train"][b["image"]], b) for b in buckets], with_dice)
        n = all_sum(out["lm_count"])
        loss = out["lm_sum"] / n * world_info()[1]
        logs = {"lm_loss": all_sum(out["lm_sum"]) / n}
        if with_dice:
            nd = all_sum(out["dice_count"])
            if nd > 0:
                loss = loss + stage.dice_weight * out["dice_sum"] / nd * world_info()[1]
                logs["dice_loss"] = all_sum(out["dice_sum"]) / nd
        return {"loss": loss, **logs}

    # -- validation --------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, stage: Stage) -> dict:
        self.model.eval()
        v = self.val_data
        if stage.kind == "vision":
            logits = self.head(self.vision_features(v)).cpu()
            C, K = len(self.classes), len(self.colours)
            res = {"class_f1": f1(logits[:, :C] > 0, v.labels[:, :C] > 0),
                   "colour_f1": f1(logits[:, C:C + K] > 0, v.labels[:, C:C + K] > 0),
                   "weakest_classes": weakest(logits[:, :C] > 0, v.labels[:, :C] > 0, self.classes)}
            if stage.count_labels:   # "two or more of the class": rare, so F1 over all classes
                res["count_f1"] = f1(logits[:, C + K:] > 0, count_labels(v.records, self.classes) > 0)
            return res
        res = {}
        feats = self.feats.get("val") if stage.kind == "vlm" else None
        for name, pool in (("caption", v.captions), ("question", v.questions)):
            pool = pool[:VAL_LIMIT]
            if not pool:
                continue
            batch = self.to_device(collate(pool, self.cfg.pad_id, self.cfg.n_image_tokens,
                                          lm_only=stage.kind == "lm"))
            img = self.model.projector(feats[batch["image"]]) if feats is not None else None
            out = self.model(batch["input_ids"], image_tokens=img, attention_mask=batch["attention_mask"])
            s, n = lm_loss_sum(out.logits, batch["labels"])
            res[f"val_{name}_loss"] = round(float(s / n), 4)
            if name == "question" and stage.kind == "vlm":
                res["val_yesno_acc"] = self._yes_no_accuracy(out.logits, batch, pool)
        if stage.kind == "lm" and stage.context_qa > 0:   # reading comprehension, text only
            pool = self.context_questions("val")[:VAL_LIMIT]
            batch = self.to_device(collate(pool, self.cfg.pad_id, self.cfg.n_image_tokens, lm_only=True))
            out = self.model(batch["input_ids"], attention_mask=batch["attention_mask"])
            res["val_context_yesno_acc"] = self._yes_no_accuracy(out.logits, batch, pool)
        return res

    def _yes_no_accuracy(self, logits, batch, pool) -> float:
        """Existence questions: does the first answer token prefer the right one of yes/no?"""
        yes, no = self.tok.encode(" yes").ids[0], self.tok.encode(" no").ids[0]
        if yes == no:
            raise BadInput("the tokenizer does not tell ' yes' from ' no' by their first token; "
                           "retrain it with `agevlm data tokenizer`")
        hits = []
        for b, s in enumerate(pool):
            if s.ids[s.prompt_len] in (yes, no):
                pred = logits[b, s.prompt_len - 1]
                hits.append(int((pred[yes] > pred[no]) == (s.ids[s.prompt_len] == yes)))
        return round(float(np.mean(hits)), 4) if hits else float("nan")

    # -- checkpoints -------------------------------------------------------------------
    def note_environment(self) -> None:
        """Append this process's environment() to the state unless the stretch before ran
        in the same one (a resume on another host or torch build shows up as a new entry)."""
        env = environment(self.device)
        envs = self.state.setdefault("environments", [])
        if not envs or {k: v for k, v in envs[-1].items() if k != "from_step"} != env:
            envs.append({**env, "from_step": self.state["global_step"]})

    def save(self, final: bool = False) -> None:
        """The RUN DIR's model files, then training_state/ (what --resume reads) last: a kill
        in between leaves the older state, and resuming from it rewrites the model files
        (the other order could leave a run marked final over the weights before)."""
        if world_info()[0] != 0:
            return
        from safetensors.torch import save_file

        save_model_files(self.out, self.model, self.tok, self.pre,
                         {"recipe": self.recipe.to_dict(), "state": self.state, "final": final,
                          "data": str(self.data_dir)})
        with staged_dir(self.out / "training_state", overwrite=True) as tmp:
            sd = {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()
                  if not (self.cfg.tie_embeddings and k == "lm_head.weight")}
            save_file(sd, str(tmp / "model.safetensors"))
            save_file({k: v.cpu().contiguous() for k, v in self.head.state_dict().items()},
                      str(tmp / "head.safetensors"))
            if self.optimizer is not None:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            write_json_atomic(tmp / "state.json", self.state)

    def load(self) -> None:
        from agevlm_edge.checkpoint import read_safetensors

        ts = self.out / "training_state"
        if not (ts / "state.json").is_file():
            raise BadInput(f"--resume: {self.out} has no training_state/ to resume from")
        try:
            self.model.load_state_dict(read_safetensors(ts / "model.safetensors"), strict=False)
            self.state = read_json(ts / "state.json", "training state")
            if not all(isinstance(self.state.get(k), int) for k in ("stage", "step", "global_step")):
                raise ValueError("state.json needs integer stage, step and global_step")
            self.load_head(read_safetensors(ts / "head.safetensors"))
            self._resume_opt = torch.load(ts / "optimizer.pt", weights_only=True, map_location="cpu") \
                if (ts / "optimizer.pt").is_file() else None
        except (OSError, RuntimeError, ValueError, AttributeError, EOFError,
                pickle.UnpicklingError) as e:   # the last two: a torn or foreign optimizer.pt
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInput(f"--resume: the checkpoint in {ts} cannot be loaded ({msg}); start "
                           "again with --overwrite") from None
        truncate_metrics(self.out / "metrics.jsonl", self.state["global_step"])

    def load_head(self, sd: dict) -> None:
        """The saved vision head; one without the count columns this recipe adds is taken into
        the first columns while no vision stage has begun (a paired study resuming a shared
        checkpoint with count_labels on: the class and colour columns start as in the reference)."""
        have, want = sd["fc.weight"].shape[0] if "fc.weight" in sd else 0, self.head.fc.weight.shape[0]
        if have == want or not have:   # (no fc.weight: load_state_dict names what is missing)
            self.head.load_state_dict(sd)
            return
        first = next((i for i, st in enumerate(self.recipe.stages) if st.kind == "vision"), -1)
        if have > want or (self.state["stage"], self.state["step"]) > (first, 0):
            raise ValueError(f"its vision head has {have} labels where this recipe's has {want} "
                             "(count_labels changed after the vision stage began)")
        with torch.no_grad():
            self.head.fc.weight[:have] = sd["fc.weight"]
            self.head.fc.bias[:have] = sd["fc.bias"]

    def log(self, row: dict) -> None:
        if world_info()[0] == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")

    # -- stages ------------------------------------------------------------------------
    def run_stage(self, si: int, stage: Stage, stop_at: int | None, bar) -> bool:
        """Train one stage from self.state['step']; False if stopped early at ``stop_at``."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        params = set_trainable(self.model, stage.train)
        if stage.kind == "vision":
            for p in self.head.parameters():
                p.requires_grad_(True)
            params += list(self.head.parameters())
            freq = self.train_labels(stage).mean(0)
            module = VisionStep(self.model, self.head,
                                ((1 - freq) / freq.clamp(min=1e-3)).clamp(1, 10)).to(self.device)
        elif stage.kind == "lm":
            module = LMStep(self.model, stage.loss_norm == "sample")
        else:
            if not self.feats:
                self.cache_features()
            module = VLMStep(self.model, tuple(stage.dice_layers), stage.loss_norm == "sample")
        gates = {id(p) for p in self.model.gates()}
        groups = [{"params": [p for p in params if id(p) not in gates], "lr_mult": 1.0},
                  {"params": [p for p in params if id(p) in gates], "lr_mult": stage.gate_lr_mult}]
        self.optimizer = torch.optim.AdamW([gr for gr in groups if gr["params"]], lr=stage.lr,
                                           weight_decay=stage.weight_decay, betas=(0.9, 0.95))
        if getattr(self, "_resume_opt", None) is not None:
            try:
                self.optimizer.load_state_dict(self._resume_opt)
            except ValueError:
                raise BadInput(f"--resume: the optimizer state in {self.out}/training_state does "
                               f"not fit stage {stage.name}'s trained groups {list(stage.train)}; "
                               "resume with the recipe the run started with, or start again "
                               "with --overwrite") from None
            self._resume_opt = None
        ddp = DDP(module) if world_info()[1] > 1 else module
        step_fn = {"lm": self.step_lm, "vision": self.step_vision, "vlm": self.step_vlm}[stage.kind]
        t0, seen = time.perf_counter(), 0
        while self.state["step"] < stage.steps:
            step = self.state["step"]
            self.model.train()
            if stage.kind != "vision":
                self.model.vision.eval()  # frozen BatchNorm statistics
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(stage, step) * group["lr_mult"]
            out = step_fn(ddp, stage, _generator(self.recipe.seed, si, step))
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.optimizer.step()
            self.state["step"] += 1
            self.state["global_step"] += 1
            seen += stage.batch_size
            bar.update(1)
            if self.state["step"] % self.recipe.log_every == 0 or self.state["step"] == stage.steps:
                row = {k: round(float(v.detach()), 5) for k, v in out.items()}
                row.update(stage=stage.name, step=self.state["step"], global_step=self.state["global_step"],
                           lr=lr_at(stage, step), samples_per_s=round(seen / (time.perf_counter() - t0), 1))
                self.log(row)
                bar.set_postfix(stage=stage.name, loss=f"{row['loss']:.3f}")
            if stage.val_every and self.state["step"] % stage.val_every == 0 and self.state["step"] < stage.steps:
                self.log({"stage": stage.name, "step": self.state["step"],
                          "global_step": self.state["global_step"], "val": self.validate(stage)})
            if stop_at is not None and self.state["global_step"] >= stop_at:
                self.save()
                return False
            if self.state["step"] % self.recipe.checkpoint_every == 0 and self.state["step"] < stage.steps:
                self.save()
        val = self.validate(stage)
        self.log({"stage": stage.name, "global_step": self.state["global_step"], "val": val})
        bar.write(f"[train] stage {stage.name} done: {val}")
        self.state.update(stage=si + 1, step=0)
        self.optimizer = None
        self.save(final=si + 1 == len(self.recipe.stages))
        return True


def train(data_dir: str | os.PathLike, out: str | os.PathLike, recipe: Recipe, resume: bool = False,
          overwrite: bool = False, stop_at_step: int | None = None, limit: int | None = None,
          device: str | None = "cpu", inputs: tuple = ()) -> str:
    """Run (or resume) every stage of ``recipe`` on ``device`` (resolve_device); returns a
    one-line summary. ``inputs``: more (what, path) pairs --out must not hold or replace
    (the --config file)."""
    from tqdm import tqdm

    maybe_init_distributed()
    dev = resolve_device(device)
    data_dir, out = Path(data_dir), Path(out)
    rank, world = world_info()
    if any(st.batch_size % world for st in recipe.stages):
        raise BadInput(f"every stage's batch_size must be divisible by the {world} processes")
    # never replace an input, and check everything else (data, model, checkpoint) before an
    # old run is deleted or an empty --out is left behind
    vision_dir = recipe.model.get("vision_hf_dir")
    check_out(out, [("DATA DIR", data_dir)] + [("--lm-dir", recipe.lm_dir)] * bool(recipe.lm_dir)
              + [("--vision-dir", vision_dir)] * (isinstance(vision_dir, str) and bool(vision_dir))
              + list(inputs), overwrite=True)
    replace = not resume and out.is_dir() and any(out.iterdir())
    if replace and not overwrite:
        raise BadInput(f"run directory {out} already exists; pass --resume to continue it, "
                       "--overwrite to start again, or choose another --out")
    run = Run(data_dir, out, recipe, limit, dev)
    if resume:
        run.load()
        note = resume_note(out, recipe)
        if note and rank == 0:
            print(note, file=sys.stderr)
    run.note_environment()
    if replace and rank == 0:
        shutil.rmtree(out)
    if world > 1:
        dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    total = sum(st.steps for st in recipe.stages)
    t0 = time.perf_counter()
    with tqdm(total=total, initial=run.state["global_step"], desc="train", unit="step",
              disable=None if rank == 0 else True) as bar:
        for si, stage in enumerate(recipe.stages):
            if si < run.state["stage"]:
                continue
            if run.pretrained(stage):
                part = "language model" if stage.kind == "lm" else "vision tower"
                bar.write(f"[train] stage {stage.name} skipped: the {part} is pretrained")
                bar.update(stage.steps)
                run.state.update(stage=si + 1, step=0)
                continue
            if not run.run_stage(si, stage, stop_at_step, bar):
                return f"stopped at global step {run.state['global_step']} (checkpoint in {out}/training_state)"
    return (f"trained {recipe.variant} ({run.model.num_parameters() / 1e6:.2f}M params) for "
            f"{run.state['global_step']} steps in {time.perf_counter() - t0:.0f}s on {dev} -> {out}")
