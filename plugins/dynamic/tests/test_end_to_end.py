"""``desap_dynamic`` on a tiny LLaVA-1.5-shaped model (576 tokens) through tokenprune.apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tokenprune
from tokenprune import CapabilityError, ConfigError, Pipeline, PruneContext, Runtime, Selection
from tokenprune.testing import llava_prompts
from tokenprune_desap.merger import NearestMerger
from tokenprune_desap.scorer import DesapScorer
from tokenprune_dynamic import TASK_FRACTIONS, DesapDynamicSelector, presets

N, KEEP = 576, 64
QUERIES = ["what colour is the star ?", "describe the image"]


def _config(**scorer: Any) -> dict[str, Any]:
    return {
        "scorer": {"name": "desap", **scorer},
        "selector": {"name": "desap_dynamic", "min_task_fraction": 0.0, "max_task_fraction": 1.0},
        "merger": {"name": "nearest_merge"},
        "keep": KEEP,
    }


class Recording(DesapDynamicSelector):
    """The dynamic selector, keeping every selection and the task shares it used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def select(self, scores: Any, ctx: PruneContext) -> Selection:
        out = super().select(scores, ctx)
        self.calls.append((out.keep_idx.clone(), ctx.stash[TASK_FRACTIONS].clone()))
        return out


def test_forward_and_generate_at_batch_two(llava: Any, clip_dir: Path) -> None:
    batch = llava_prompts(llava, [(2, 3), (1, 5)])
    length = batch["input_ids"].shape[1]
    with tokenprune.apply(llava, _config(text_encoder=str(clip_dir))):
        with torch.no_grad():
            out = llava(**batch, tokenprune_query=QUERIES)
        assert out.logits.shape[:2] == (2, length - (N - KEEP))
        assert torch.isfinite(out.logits).all()
        generated = llava.generate(**batch, tokenprune_query=QUERIES, max_new_tokens=3)
    assert generated.shape[0] == 2
    assert length < generated.shape[1] <= length + 3
    assert torch.equal(generated[:, :length], batch["input_ids"])
    assert "generate" not in llava.__dict__  # restored


def test_preset_runs(llava: Any, clip_dir: Path) -> None:
    config = presets.load("llava-1.5-64")
    config["scorer"]["text_encoder"] = str(clip_dir)
    batch = llava_prompts(llava, [(2, 3), (1, 5)])
    with tokenprune.apply(llava, config), torch.no_grad():
        out = llava(**batch, tokenprune_query=QUERIES)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - (N - KEEP)


def test_batch_equals_each_sample_alone(llava: Any, clip_dir: Path) -> None:
    selector = Recording(min_task_fraction=0.0, max_task_fraction=1.0, cue_high=0.05)
    scorer = DesapScorer(text_source="llm_embeddings")
    pipeline = Pipeline(scorer, selector, NearestMerger(), keep=KEEP)
    batch = llava_prompts(llava, [(2, 3), (4, 1)], seed=1)
    with tokenprune.apply(llava, pipeline), torch.no_grad():
        llava(**batch)
        for i in range(2):
            row = batch["input_ids"][i][batch["attention_mask"][i].bool()][None]
            llava(
                input_ids=row,
                attention_mask=torch.ones_like(row),
                pixel_values=batch["pixel_values"][i : i + 1],
            )
    (kept, shares), *alone = selector.calls
    assert len(alone) == 2
    for i, (kept_i, shares_i) in enumerate(alone):
        torch.testing.assert_close(shares[i : i + 1], shares_i, rtol=0, atol=1e-6)
        assert torch.equal(kept[i : i + 1], kept_i)
    assert kept.shape == (2, KEEP)


def test_missing_query_is_a_capability_error(llava: Any, clip_dir: Path) -> None:
    batch = llava_prompts(llava, [(2, 3)])
    with (
        tokenprune.apply(llava, _config(text_encoder=str(clip_dir))),
        pytest.raises(CapabilityError, match="tokenprune_query"),
    ):
        llava(**batch)


def test_single_map_scorer_is_a_config_error(llava: Any) -> None:
    config = {
        "scorer": {"name": "cls_attention"},
        "selector": {"name": "desap_dynamic"},
        "keep": KEEP,
    }
    batch = llava_prompts(llava, [(2, 3)])
    with tokenprune.apply(llava, config), pytest.raises(ConfigError, match="task_key"):
        llava(**batch)


def test_bad_options_fail_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError, match="min_task_fraction"):
        Runtime().parse_config(
            {
                "scorer": {"name": "desap", "text_source": "llm_embeddings"},
                "selector": {
                    "name": "desap_dynamic",
                    "min_task_fraction": 0.9,
                    "max_task_fraction": 0.1,
                },
                "keep": 8,
            }
        )
