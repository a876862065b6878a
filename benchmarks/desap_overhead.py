"""Overhead of DeSAP pruning relative to the vision tower, at LLaVA-1.5 shapes, on CPU.

Usage::

    .venv/bin/python benchmarks/desap_overhead.py [--repeats 5] [--threads 2] [--profile]

Models (random weights, float32, nothing is downloaded):

- the VLM: a ``LlavaForConditionalGeneration`` whose vision tower has the shape of CLIP
  ViT-L/14-336 (24 blocks, width 1024, MLP 4096, 16 heads, 336 px, patch 14 -> 576 patches + [CLS],
  SDPA) and whose language model is tiny (1 layer, vocabulary 1024, MLP 256) except for its
  hidden size 4096, so the projector maps to LLaVA-1.5's 4096-d space;
- the paired text encoder: a ``CLIPModel`` with ViT-L/14-336's text tower shape (12 layers, width
  768, 12 heads, projection 768, 77 positions; a small word-level vocabulary) whose vision weights
  are copied from the VLM's tower, so the pairing check passes.

One image, one question of exactly 64 CLIP tokens (``<|startoftext|>``, 62 words,
``<|endoftext|>``). Timed, interleaved over the repeats, reported as medians:

- (a) the vision tower forward, ``model.model.vision_tower(pixel_values)``: what the model runs
  anyway (LLaVA's ``get_image_features`` runs the whole tower, then the projector);
- (b) the pruning pipeline (desap scorer + desap_joint selector + nearest_merge merger, K = 64)
  exactly as the LLaVA adapter runs it inside ``prepare_inputs`` (timed by a ``Pipeline`` subclass
  around ``Pipeline.__call__``), with the text-encoder forward excluded: the scorer's text encoder
  is a caching wrapper that encodes the question once, outside the timed region;
- (c) the text-encoder forward alone (``PairedTextEncoder.encode`` of the question, uncached).

``--profile`` adds a per-part breakdown of (b) (decoupled attention, joint-space projection, FCMA,
[CLS] attention, selector, merge), timed by wrapping the functions the stages call.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

import tokenprune
from tokenprune import Pipeline, PruneContext, PrunedTokens
from tokenprune.testing.clip import DEFAULT_WORDS, word_tokenizer
from tokenprune_desap import functional as F
from tokenprune_desap.merger import NearestMerger
from tokenprune_desap.scorer import DesapScorer
from tokenprune_desap.selector import DesapJointSelector
from tokenprune_desap.text_encoder import EncodedText, PairedTextEncoder

KEEP = 64
TEXT_TOKENS = 64
IMAGE_TOKEN_ID = 1023


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): the CPU time is robust to a busy machine."""
    return time.perf_counter(), time.process_time()


def elapsed(start: tuple[float, float]) -> tuple[float, float]:
    """Wall and CPU seconds since ``start``."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


class TimedPipeline(Pipeline):
    """A pipeline that records the time of every call (scorer + selector + merger)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[tuple[float, float]] = []

    def __call__(self, ctx: PruneContext) -> PrunedTokens:
        start = clock()
        out = super().__call__(ctx)
        self.times.append(elapsed(start))
        return out


class CachedTextEncoder(PairedTextEncoder):
    """Benchmark-only: encodes each question once, so (b) excludes the text-encoder forward."""

    def __init__(self, base: PairedTextEncoder) -> None:
        super().__init__(base.clip, base.tokenizer, base.max_length)
        self._cache: dict[tuple[str, ...], EncodedText] = {}

    def encode(self, texts: list[str] | tuple[str, ...]) -> EncodedText:
        key = tuple(texts)
        if key not in self._cache:
            self._cache[key] = super().encode(texts)
        return self._cache[key]


def build_models() -> tuple[Any, PairedTextEncoder]:
    """The LLaVA-1.5-shaped VLM (random weights) and its paired CLIP text encoder."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=1024,
        hidden_size=4096,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()

    tokenizer = word_tokenizer()
    clip_config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config=vision.to_dict(),
        projection_dim=768,
    )
    clip = CLIPModel._from_config(clip_config, attn_implementation="sdpa").eval()
    tower = model.model.vision_tower.state_dict()
    clip.vision_model.load_state_dict(
        {k.removeprefix("vision_model."): v for k, v in tower.items()}
    )
    return model, PairedTextEncoder(clip, tokenizer)


def question() -> str:
    """A question of exactly 64 CLIP tokens: <|startoftext|>, 62 words, <|endoftext|>."""
    words = [w for w in DEFAULT_WORDS if w.isalpha()]
    return " ".join(words[i % len(words)] for i in range(TEXT_TOKENS - 2))


def inputs(model: Any, query: str) -> dict[str, Any]:
    """One prompt: [BOS], 8 text tokens, 576 image placeholders, 8 text tokens."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, 900, (16,), generator=g).tolist()
    ids = torch.tensor([[1, *text[:8], *([IMAGE_TOKEN_ID] * 576), *text[8:]]])
    size = model.config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(1, 3, size, size, generator=g),
        "tokenprune_query": [query],
    }


@contextlib.contextmanager
def profiled(parts: dict[str, list[float]]) -> Iterator[None]:
    """Time the functions the stages call (patched on their modules while the context is open)."""
    import tokenprune_desap.merger as merger_module
    import tokenprune_desap.scorer as scorer_module
    import tokenprune_desap.selector as selector_module

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            parts[name].append(time.perf_counter() - start)
            return out

        return wrapper

    class PatchedF:
        """``tokenprune_desap.functional`` with the heavy functions timed."""

        def __getattr__(self, name: str) -> Any:
            return getattr(F, name)

    patched = PatchedF()
    for name in ("decoupled_attention", "fcma_relevance", "joint_rank_select", "nearest_merge"):
        setattr(patched, name, timed(name, getattr(F, name)))
    saved = [(m, m.F) for m in (scorer_module, selector_module, merger_module)]
    original_project = PairedTextEncoder.project_visual
    original_cls = PruneContext.cls_attention
    for module, _ in saved:
        module.F = patched  # type: ignore[assignment]
    PairedTextEncoder.project_visual = timed("project_visual", original_project)  # type: ignore[method-assign]
    PruneContext.cls_attention = timed("cls_attention", original_cls)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module, original in saved:
            module.F = original  # type: ignore[assignment]
        PairedTextEncoder.project_visual = original_project  # type: ignore[method-assign]
        PruneContext.cls_attention = original_cls  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--profile", action="store_true", help="break (b) down by part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    build_start = clock()
    model, encoder = build_models()
    query = question()
    encoded = encoder.encode([query])
    assert int(encoded.mask.sum()) == TEXT_TOKENS, "the question must be 64 CLIP tokens"
    cached = CachedTextEncoder(encoder)
    pipeline = TimedPipeline(
        DesapScorer(text_encoder=cached), DesapJointSelector(), NearestMerger(), keep=KEEP
    )
    handle = tokenprune.apply(model, pipeline)  # also runs the pairing check
    adapter = handle.adapter
    batch = inputs(model, query)
    pixels = batch["pixel_values"]
    built = elapsed(build_start)

    times: dict[str, list[tuple[float, float]]] = defaultdict(list)
    parts: dict[str, list[float]] = defaultdict(list)
    load_before = os.getloadavg()[0]
    with torch.no_grad():
        cached.encode([query])  # fill the cache outside every timed region
        for repeat in range(args.repeats + 1):  # the first round warms up and is discarded
            start = clock()
            model.model.vision_tower(pixels)
            tower = elapsed(start)
            start = clock()
            with profiled(parts) if args.profile and repeat else contextlib.nullcontext():
                out = adapter.prepare_inputs(pipeline, dict(batch), "forward")
            prepare = elapsed(start)
            start = clock()
            encoder.encode([query])
            text = elapsed(start)
            if repeat:
                times["a"].append(tower)
                times["p"].append(prepare)
                times["c"].append(text)
    handle.remove()
    assert out["input_ids"].shape[1] == batch["input_ids"].shape[1] - (576 - KEEP)
    times["b"] = pipeline.times[1:]

    wall = {key: statistics.median(t[0] for t in values) for key, values in times.items()}
    cpu = {key: statistics.median(t[1] for t in values) for key, values in times.items()}
    print(
        f"DeSAP overhead, LLaVA-1.5 shapes (ViT-L/14-336 tower, 576 -> {KEEP} tokens, "
        f"{TEXT_TOKENS} text tokens), CPU float32, batch 1, {torch.get_num_threads()} thread(s), "
        f"medians of {args.repeats} repeats; models built in {built[0]:.0f} s "
        f"({built[1]:.0f} s CPU); load average {load_before:.1f} -> "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'part':<55} {'wall':>10} {'vs (a)':>8} {'CPU':>10} {'vs (a)':>8}")
    rows = [
        ("(a) vision tower forward (24 blocks, 577 tokens)", "a"),
        ("(b) pruning pipeline, text encoder excluded", "b"),
        ("(c) text-encoder forward (12 layers, 64 tokens)", "c"),
        ("(b) + (c)", "b+c"),
        ("adapter prepare_inputs: tower + (b) + projector(64)", "p"),
    ]
    wall["b+c"], cpu["b+c"] = wall["b"] + wall["c"], cpu["b"] + cpu["c"]
    for label, key in rows:
        print(
            f"{label:<55} {wall[key] * 1e3:>7.1f} ms {wall[key] / wall['a']:>8.2%} "
            f"{cpu[key] * 1e3:>7.1f} ms {cpu[key] / cpu['a']:>8.2%}"
        )
    if args.profile:
        print("\n(b) by part, wall time (median per call):")
        for name, values in sorted(parts.items(), key=lambda kv: -statistics.median(kv[1])):
            value = statistics.median(values)
            print(f"  {name:<53} {value * 1e3:>7.1f} ms {value / wall['a']:>8.2%}")


if __name__ == "__main__":
    main()
