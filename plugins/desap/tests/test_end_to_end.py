"""DeSAP on a tiny LLaVA-1.5-shaped model (576 visual tokens) through tokenprune.apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tokenprune
from tokenprune import CapabilityError, ConfigError, Pipeline, PruneContext
from tokenprune.testing import llava_prompts
from tokenprune_desap.merger import NearestMerger
from tokenprune_desap.scorer import DesapScorer
from tokenprune_desap.selector import DesapJointSelector
from tokenprune_desap.text_encoder import PairedTextEncoder

N, KEEP = 576, 64
QUERIES = ["what colour is the star ?", "how many objects are there left of the red circle ?"]


def _config(**scorer: Any) -> dict[str, Any]:
    return {
        "scorer": {"name": "desap", **scorer},
        "selector": {"name": "desap_joint"},
        "merger": {"name": "nearest_merge"},
        "keep": KEEP,
    }


class RecordingScorer(DesapScorer):
    """The desap scorer, keeping a copy of every score map it returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[dict[str, torch.Tensor]] = []

    def score(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        out = super().score(ctx)
        self.calls.append({k: v.detach().clone() for k, v in out.items()})
        return out


def _recording_pipeline(encoder: PairedTextEncoder) -> tuple[Pipeline, RecordingScorer]:
    scorer = RecordingScorer(text_encoder=encoder)
    return Pipeline(scorer, DesapJointSelector(), NearestMerger(), keep=KEEP), scorer


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
    assert torch.equal(generated[:, :length], batch["input_ids"])  # the caller's prompt
    assert "generate" not in llava.__dict__  # restored


def test_llm_embeddings_source(llava: Any) -> None:
    batch = llava_prompts(llava, [(2, 3), (1, 5)])
    length = batch["input_ids"].shape[1]
    with tokenprune.apply(llava, _config(text_source="llm_embeddings")), torch.no_grad():
        out = llava(**batch)  # no tokenprune_query needed: the prompt's embeddings are used
    assert out.logits.shape[:2] == (2, length - (N - KEEP))
    assert torch.isfinite(out.logits).all()


def test_missing_query_is_a_capability_error(llava: Any, clip_dir: Path) -> None:
    batch = llava_prompts(llava, [(2, 3)])
    with tokenprune.apply(llava, _config(text_encoder=str(clip_dir))):
        with pytest.raises(CapabilityError, match="tokenprune_query"):
            llava(**batch)
        with pytest.raises(CapabilityError, match="tokenprune_query"):
            llava.generate(**batch, max_new_tokens=1)


def test_unpaired_text_encoder_is_refused_at_apply(llava: Any, unpaired_clip_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        tokenprune.apply(llava, _config(text_encoder=str(unpaired_clip_dir)))
    message = str(info.value)
    assert "not paired with this model's vision tower" in message
    assert "openai/clip-vit-large-patch14-336" in message
    assert "allow_unpaired_text_encoder: true" in message
    assert "generate" not in llava.__dict__  # nothing was installed


def test_batch_equals_each_sample_alone(llava: Any, encoder: PairedTextEncoder) -> None:
    # Questions of different lengths (padded in the batch) and prompts of different lengths.
    batch = llava_prompts(llava, [(2, 3), (4, 1)], seed=1)
    pipeline, scorer = _recording_pipeline(encoder)
    with tokenprune.apply(llava, pipeline), torch.no_grad():
        llava(**batch, tokenprune_query=QUERIES)
        for i in range(2):
            row = batch["input_ids"][i][batch["attention_mask"][i].bool()][None]
            llava(
                input_ids=row,
                attention_mask=torch.ones_like(row),
                pixel_values=batch["pixel_values"][i : i + 1],
                tokenprune_query=[QUERIES[i]],
            )
    together, *alone = scorer.calls
    assert len(alone) == 2
    for i, single in enumerate(alone):
        for key in ("task", "saliency"):
            # A_t is of order 1 / (d1 * d2) (~1e-6 here): compare relative to the map's scale.
            scale = float(single[key].abs().max())
            torch.testing.assert_close(
                together[key][i : i + 1], single[key], rtol=1e-5, atol=1e-5 * scale
            )
    # The two questions give different task maps; the tokens kept follow from the scores.
    assert not torch.allclose(together["task"][0], together["task"][1])
