"""The paired CLIP text encoder: tokens, [EOS], attention row, pairing check, text filter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import tokenprune
from tokenprune import CapabilityError, ConfigError
from tokenprune.testing import make_context
from tokenprune_desap import functional as F
from tokenprune_desap.scorer import DesapScorer
from tokenprune_desap.text_encoder import PairedTextEncoder, query_row_attention

QUESTIONS = ["what is the colour of the star ?", "red", "how many objects are there ?"]
LONG = "what is the colour of the red star left of the blue circle above the green square ?"


def test_eos_index_is_the_last_valid_token(encoder: PairedTextEncoder) -> None:
    encoded = encoder.encode(QUESTIONS)
    lengths = [len(q.split()) + 2 for q in QUESTIONS]  # <|startoftext|> words <|endoftext|>
    assert encoded.mask.sum(-1).tolist() == lengths
    assert encoded.eos_index.tolist() == [n - 1 for n in lengths]
    ids = encoder.tokenizer(QUESTIONS, padding=True, return_tensors="pt")["input_ids"]
    eos_id = encoder.tokenizer.eos_token_id
    assert ids.gather(1, encoded.eos_index[:, None]).squeeze(1).tolist() == [eos_id] * 3
    torch.testing.assert_close(encoded.eos, encoded.tokens[torch.arange(3), encoded.eos_index])
    # Every token is in the joint space, L2-normalised; [EOS] differs per question.
    width = encoder.clip.config.projection_dim
    assert encoded.tokens.shape == (3, max(lengths), width)
    norms = encoded.tokens.norm(dim=-1)[encoded.mask]
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert encoded.start_mask.tolist() == [[i == 0 for i in range(max(lengths))]] * 3


def test_eos_attention_equals_eager_attention_row(
    clip_dir: Path, encoder: PairedTextEncoder
) -> None:
    from transformers import CLIPModel

    eager: Any = CLIPModel.from_pretrained(str(clip_dir), attn_implementation="eager").eval()
    batch = encoder.tokenizer(QUESTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = eager.text_model(**batch, output_attentions=True)
    last = out.attentions[-1]  # (B, H, T, T)
    encoded = encoder.encode(QUESTIONS)
    for b, eos in enumerate(encoded.eos_index.tolist()):
        expected = last[b, :, eos, :].mean(0)
        torch.testing.assert_close(encoded.eos_attention[b], expected, rtol=0, atol=1e-6)
        assert float(encoded.eos_attention[b, eos + 1 :].abs().sum()) == 0.0  # padding
    torch.testing.assert_close(encoded.eos_attention.sum(-1), torch.ones(3))


def test_query_row_attention_masks_padding_and_future_keys() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=g)
    proj = torch.nn.Linear(8, 8)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    rows = query_row_attention(x, proj, proj, 2, torch.tensor([2, 3]), mask)
    assert rows[0, 3:].abs().sum() == 0
    assert rows[1, 4:].abs().sum() == 0
    torch.testing.assert_close(rows.sum(-1), torch.ones(2))


def test_pairing_check(llava: Any, encoder: PairedTextEncoder, unpaired_clip_dir: Path) -> None:
    tower = llava.model.vision_tower
    encoder.check_paired(tower)  # the same weights: no error
    unpaired = PairedTextEncoder.from_pretrained(str(unpaired_clip_dir))
    with pytest.raises(ConfigError) as info:
        unpaired.check_paired(tower)
    message = str(info.value)
    assert "not paired" in message
    assert "openai/clip-vit-large-patch14-336" in message  # the fix
    assert "allow_unpaired_text_encoder" in message  # the escape hatch


def test_allow_unpaired_text_encoder_accepts(llava: Any, unpaired_clip_dir: Path) -> None:
    cfg: dict[str, Any] = {
        "scorer": {"name": "desap", "text_encoder": str(unpaired_clip_dir)},
        "selector": {"name": "desap_joint"},
        "merger": {"name": "nearest_merge"},
        "keep": 64,
    }
    with pytest.raises(ConfigError, match="allow_unpaired_text_encoder"):
        tokenprune.apply(llava, cfg)
    cfg["scorer"]["allow_unpaired_text_encoder"] = True
    with tokenprune.apply(llava, cfg) as handle:
        assert handle.active


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="text_encoder"):
        PairedTextEncoder.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="CLIPModel"):
        PairedTextEncoder(torch.nn.Linear(2, 2), tokenizer=None)


@pytest.mark.parametrize("questions", [[""], ["what is the star ?", "   "]])
def test_empty_question_is_an_error(encoder: PairedTextEncoder, questions: list[str]) -> None:
    with pytest.raises(CapabilityError, match=r"empty question.*tokenprune_query"):
        encoder.encode(questions)


def test_project_visual(encoder: PairedTextEncoder) -> None:
    clip: Any = encoder.clip
    hidden = torch.randn(2, 5, clip.config.vision_config.hidden_size)
    out = encoder.project_visual(hidden)
    assert out.shape == (2, 5, clip.config.projection_dim)
    with torch.no_grad():
        expected = clip.visual_projection(clip.vision_model.post_layernorm(hidden))
    torch.testing.assert_close(out, F.l2_normalize(expected))


# -- text filter (spec O8) -----------------------------------------------------------------------


def test_text_filter_mask_keeps_eos_and_the_most_attended_tokens(
    encoder: PairedTextEncoder,
) -> None:
    encoded = encoder.encode([LONG, "red"])
    mask = F.text_filter_mask(encoded.eos_attention, encoded.mask, encoded.eos_index, top_n=4)
    # Long question: [EOS] plus the 4 valid non-[EOS] tokens [EOS] attends to most.
    eos = int(encoded.eos_index[0])
    attention = encoded.eos_attention[0, :eos]  # valid tokens before [EOS]
    top = torch.sort(attention, descending=True, stable=True).indices[:4].tolist()
    assert sorted(torch.nonzero(mask[0]).squeeze(1).tolist()) == sorted([*top, eos])
    # Short question (3 tokens <= top_n + 1): every valid token is kept.
    assert torch.equal(mask[1], encoded.mask[1])


def _small_ctx(questions: list[str]) -> Any:
    return make_context(len(questions), 16, 16, 4, seed=3, text=questions)


def test_text_filter_changes_the_task_map_as_documented(small_encoder: PairedTextEncoder) -> None:
    questions = [LONG, "red ?"]
    ctx = _small_ctx(questions)
    plain = DesapScorer(text_encoder=small_encoder).score(ctx)
    filtered = DesapScorer(text_encoder=small_encoder, text_filter=True, text_filter_top_n=3)
    out = filtered.score(ctx)
    encoded = small_encoder.encode(questions)
    mask = F.text_filter_mask(encoded.eos_attention, encoded.mask, encoded.eos_index, top_n=3)
    assert mask.sum(-1).tolist() == [4, 4]  # [EOS] + 3; "red ?" has only 3 besides [EOS]
    # The scorer's task map is Eq. 3 over the filtered tokens only ...
    block = ctx.blocks[1]
    normed = block.layer_norm(block.hidden)
    decoupled = F.decoupled_attention(
        normed, block.q_proj, block.k_proj, block.v_proj, block.out_proj, block.num_heads
    )
    joint = small_encoder.project_visual(decoupled)
    expected = F.fcma_relevance(joint[:, 1:], joint[:, 0], encoded.tokens, mask, encoded.eos)
    torch.testing.assert_close(out["task"], expected, rtol=1e-5, atol=1e-7)
    # ... so it changes the long question's map but not the short one's (nothing dropped) ...
    assert not torch.allclose(out["task"][0], plain["task"][0])
    torch.testing.assert_close(out["task"][1], plain["task"][1])
    # ... and never the saliency map.
    assert torch.equal(out["saliency"], plain["saliency"])


def test_text_filter_with_a_large_top_n_is_a_no_op(small_encoder: PairedTextEncoder) -> None:
    ctx = _small_ctx([LONG])
    plain = DesapScorer(text_encoder=small_encoder).score(ctx)
    wide = DesapScorer(text_encoder=small_encoder, text_filter=True, text_filter_top_n=76)
    assert torch.equal(wide.score(ctx)["task"], plain["task"])
