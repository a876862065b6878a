"""Train the shipped toy LLaVA from a seed (recipe mirroring LLaVA-1.5).

Stages:

a. CLIP-style contrastive pretraining of a ``CLIPModel`` on scene captions, plus a dense local
   auxiliary loss (per-patch colour / shape / largest-object heads on the layer the VLM reads;
   the heads are training-only and not shipped).
b. Projector alignment: tower and LM frozen, caption target ("red star , blue circle , ...").
c. Instruction tuning on the question families: tower frozen, LM frozen with LoRA adapters on
   every linear layer, projector trained; a caption target on every image as extra supervision.

Stages b and c read cached layer -2 tower features of a fixed pool of training scenes. Every
stage is resumable from ``<run>/stage_<x>/ckpt.pt``; validation (per-family accuracy and answer
histograms) is logged to ``<run>/log.txt`` and ``<run>/metrics.jsonl``. ``--export`` copies the
trained parts into ``tokenprune/toy/assets/`` after stage a and at every improved stage-c
validation.

Usage::

    python -m tokenprune.toy.train --run-dir /root/tokenprune-toy-runs/seed0 --seed 0 --export
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import CLIPModel, DynamicCache, LlavaForConditionalGeneration
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tokenprune.toy import task
from tokenprune.toy.lm import load_lm
from tokenprune.toy.model import (
    ASSETS,
    LORA_A,
    LORA_B,
    PROMPT,
    TRAINED_FILE,
    TowerSize,
    assemble_llava,
    build_clip_config,
    build_clip_tokenizer,
    build_llava_config,
    build_processor,
    pixel_values,
    truncated_lm_config,
)


@dataclass
class Recipe:
    """All hyper-parameters of a run (saved to ``<run>/recipe.json``).

    Args:
        seed: Master seed (data, initialisation).
        tower: Tower sizes.
        a_steps: Stage-a steps.
        a_batch: Stage-a batch (images).
        a_lr: Stage-a peak learning rate.
        pool: Training scenes whose tower features are cached for stages b and c.
        lm_layers: SmolLM2 layers kept.
        b_steps: Stage-b steps.
        b_lr: Stage-b learning rate (projector).
        c_steps: Stage-c steps.
        c_lr: Stage-c learning rate (projector and LoRA).
        images_per_step: Images per step in stages b and c.
        questions_per_image: Questions per image in stage c (plus one caption).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        val_per_family: Validation questions per family.
        test_per_family: Test questions per family (final report).
        eval_every: Validation interval (steps) in stage c.
        bf16: Frozen LM weights in bfloat16 with autocast (stages b and c).
    """

    seed: int = 0
    tower: TowerSize = TowerSize()
    a_steps: int = 1500
    a_batch: int = 64
    a_lr: float = 1e-3
    pool: int = 16000
    lm_layers: int = 12
    b_steps: int = 250
    b_lr: float = 2e-3
    c_steps: int = 1800
    c_lr: float = 1e-3
    images_per_step: int = 8
    questions_per_image: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    val_per_family: int = 100
    test_per_family: int = 300
    eval_every: int = 200
    bf16: bool = True


class Logger:
    """Append-only text log plus JSON-lines metrics in the run directory."""

    def __init__(self, run_dir: Path) -> None:
        """Open ``log.txt`` and ``metrics.jsonl`` under ``run_dir``."""
        self.log_path = run_dir / "log.txt"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.start = time.time()

    def __call__(self, msg: str) -> None:
        """Write one timestamped line to the log and through tqdm."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}Z | {msg}"
        tqdm.write(line)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def metrics(self, record: dict[str, object]) -> None:
        """Append one metrics record (with wall time) to ``metrics.jsonl``."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- data


@dataclass
class SceneBatch:
    """Rendered scenes with dense labels.

    Args:
        scenes: The scenes.
        images: uint8 images ``(B, 96, 96, 3)``.
        colour: Per-patch colour id (0 background, else 1 + colour index) ``(B, 144)``.
        shape: Per-patch shape id (0 background, else 1 + shape index) ``(B, 144)``.
        largest: Per-patch flag, 1 on the largest object ``(B, 144)``.
    """

    scenes: list[task.Scene]
    images: np.ndarray
    colour: torch.Tensor
    shape: torch.Tensor
    largest: torch.Tensor


def render_batch(scenes: list[task.Scene]) -> SceneBatch:
    """Render scenes and their per-patch labels.

    Args:
        scenes: The scenes.

    Returns:
        The batch.
    """
    images, colour, shape, largest = [], [], [], []
    for s in scenes:
        img, obj_map = task.render(s)
        idx = task.patch_object_index(obj_map)
        col = np.array([0] + [1 + task.COLOUR_NAMES.index(o.colour) for o in s.objects])
        shp = np.array([0] + [1 + task.SHAPES.index(o.shape) for o in s.objects])
        big = np.array([0] + [int(o is s.largest) for o in s.objects])
        images.append(img)
        colour.append(col[idx + 1])
        shape.append(shp[idx + 1])
        largest.append(big[idx + 1])
    return SceneBatch(
        scenes,
        np.stack(images),
        torch.from_numpy(np.stack(colour)).long(),
        torch.from_numpy(np.stack(shape)).long(),
        torch.from_numpy(np.stack(largest)).long(),
    )


def tower_scenes(seed: int, split: str, start: int, n: int) -> list[task.Scene]:
    """Return ``n`` tower-training/validation scenes (own seed namespace)."""
    return [task.sample_scene(task.rng_for(task.SPLITS[split], seed, "tower", i)) for i in range(start, start + n)]


# ----------------------------------------------------------------------------- stage a


class DenseHeads(nn.Module):
    """Per-patch linear heads (colour, shape, largest) on the layer the VLM reads (training only)."""

    def __init__(self, hidden: int) -> None:
        """Create the heads for a tower of width ``hidden``."""
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.colour = nn.Linear(hidden, len(task.COLOUR_NAMES) + 1)
        self.shape = nn.Linear(hidden, len(task.SHAPES) + 1)
        self.largest = nn.Linear(hidden, 2)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (colour, shape, largest) logits.

        Shape:
            feats ``(B, 144, H)`` -> ``(B, 144, 9)``, ``(B, 144, 7)``, ``(B, 144, 2)``.
        """
        h = self.norm(feats)
        return self.colour(h), self.shape(h), self.largest(h)


def clip_step(
    clip: CLIPModel, heads: DenseHeads, tok: PreTrainedTokenizerBase, batch: SceneBatch, captions: list[str]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the stage-a loss (contrastive + dense heads) and per-patch accuracies.

    Args:
        clip: The CLIP model.
        heads: Dense heads.
        tok: CLIP tokenizer.
        batch: Rendered scenes.
        captions: One caption per scene.

    Returns:
        ``(loss, stats)``.
    """
    enc = tok(captions, padding=True, truncation=True, return_tensors="pt")
    out = clip(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        pixel_values=pixel_values(batch.images),
        return_loss=True,
        output_hidden_states=True,
    )
    feats = out.vision_model_output.hidden_states[-2][:, 1:]
    lc, ls, ll = heads(feats)
    obj = batch.colour > 0
    dense = (
        F.cross_entropy(lc.flatten(0, 1), batch.colour.flatten())
        + F.cross_entropy(ls.flatten(0, 1), batch.shape.flatten())
        + F.cross_entropy(ll.flatten(0, 1), batch.largest.flatten())
    )
    stats = {
        "clip": float(out.loss),
        "dense": float(dense),
        "colour_acc": float((lc.argmax(-1) == batch.colour)[obj].float().mean()),
        "shape_acc": float((ls.argmax(-1) == batch.shape)[obj].float().mean()),
        "largest_acc": float((ll.argmax(-1) == batch.largest)[obj].float().mean()),
        "i2t": float((out.logits_per_image.argmax(-1) == torch.arange(len(captions))).float().mean()),
    }
    return out.loss + dense, stats


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Return the learning rate: linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def validate_tower(
    clip: CLIPModel, heads: DenseHeads, tok: PreTrainedTokenizerBase, seed: int, n: int = 256
) -> dict[str, float]:
    """Return mean per-patch accuracies and in-batch retrieval on validation scenes."""
    clip.eval()
    heads.eval()
    sums: Counter[str] = Counter()
    chunks = 0
    with torch.no_grad():
        for start in range(0, n, 64):
            scenes = tower_scenes(seed, "validation", start, 64)
            rng = task.rng_for(task.SPLITS["validation"], seed, "captions", start)
            _, stats = clip_step(
                clip, heads, tok, render_batch(scenes), [task.caption_variants(s, rng) for s in scenes]
            )
            sums.update(stats)
            chunks += 1
    clip.train()
    heads.train()
    return {k: v / chunks for k, v in sums.items()}


def stage_a(recipe: Recipe, run_dir: Path, log: Logger) -> CLIPModel:
    """Train (or resume, or load) the CLIP model; returns it in eval mode.

    Args:
        recipe: The recipe.
        run_dir: Run directory.
        log: Logger.

    Returns:
        The trained CLIP model (also saved to ``<run>/clip``).
    """
    out_dir = run_dir / "clip"
    if (out_dir / "model.safetensors").is_file():
        log("stage a: done before, loading clip/")
        return CLIPModel.from_pretrained(out_dir).eval()
    tok = build_clip_tokenizer()
    torch.manual_seed(recipe.seed)
    clip = CLIPModel(build_clip_config(recipe.tower, len(tok)))
    heads = DenseHeads(recipe.tower.hidden)
    params = list(clip.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.a_lr, weight_decay=0.05)
    ckpt_path = run_dir / "stage_a" / "ckpt.pt"
    ckpt_path.parent.mkdir(exist_ok=True)
    step = 0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=True)
        clip.load_state_dict(ck["clip"])
        heads.load_state_dict(ck["heads"])
        opt.load_state_dict(ck["opt"])
        step = int(ck["step"])
        log(f"stage a: resumed at step {step}")
    n_params = sum(p.numel() for p in clip.parameters())
    log(f"stage a: CLIPModel {n_params / 1e6:.2f} M params, tower {asdict(recipe.tower)}")
    clip.train()
    bar = tqdm(range(step, recipe.a_steps), desc="stage a (CLIP + dense)", initial=step, total=recipe.a_steps)
    running: Counter[str] = Counter()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, recipe.a_steps, recipe.a_lr, 100)
        scenes = tower_scenes(recipe.seed, "train", step * recipe.a_batch, recipe.a_batch)
        rng = task.rng_for(task.SPLITS["train"], recipe.seed, "captions", step)
        loss, stats = clip_step(
            clip, heads, tok, render_batch(scenes), [task.caption_variants(s, rng) for s in scenes]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.update(stats)
        bar.set_postfix(loss=f"{float(loss):.3f}", shape=f"{stats['shape_acc']:.3f}")
        done = step + 1
        if done % 100 == 0 or done == recipe.a_steps:
            avg = {k: round(v / 100, 4) for k, v in running.items()}
            running.clear()
            val = {k: round(v, 4) for k, v in validate_tower(clip, heads, tok, recipe.seed).items()}
            log(f"stage a step {done}: train {avg} | val {val}")
            log.metrics({"stage": "a", "step": done, "train": avg, "val": val})
            torch.save(
                {"clip": clip.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(), "step": done},
                ckpt_path,
            )
    clip.eval()
    clip.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    log(f"stage a: saved {out_dir}")
    return clip
