"""Tests of the toy LLaVA assembly: configs, processor, image-token expansion, shipped assets."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from tokenprune.toy import lm as toy_lm
from tokenprune.toy import model as toy_model
from tokenprune.toy import task

TINY = toy_model.TowerSize(
    hidden=32, layers=2, heads=2, text_hidden=32, text_layers=1, projection=16
)


def _tiny_lm_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level stand-in for the SmolLM2 tokenizer."""
    words = [
        "USER",
        "ASSISTANT",
        ":",
        "?",
        ".",
        "\n",
        *task.vocabulary(),
        "What",
        "Is",
        "How",
        "Describe",
    ]
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|im_end|>",
    )


def _tiny_llava(vocab_size: int, image_token_id: int) -> LlavaForConditionalGeneration:
    clip_cfg = toy_model.build_clip_config(TINY, 16)
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = cast(CLIPVisionConfig, clip_cfg.vision_config)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(
        toy_model.build_llava_config(vision, text, image_token_id)
    )
    model.eval()
    return model


def test_tiny_llava_from_toy_configs() -> None:
    """A random-weight LLaVA built from the toy configs runs forward and generate on toy scenes."""
    tok = _tiny_lm_tokenizer()
    proc = toy_model.build_processor(tok)
    image_id = cast(int, tok.convert_tokens_to_ids(toy_model.IMAGE_TOKEN))
    model = _tiny_llava(len(tok), image_id)
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    images = [task.render(task.make_example("test", 0, "attribute", i).scene)[0] for i in range(2)]
    prompts = [
        toy_model.PROMPT.format(question=q)
        for q in ("What colour is the star?", "Describe the image.")
    ]
    enc = proc(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
        feats = model.model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output
        gen = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert out.logits.shape[:2] == enc["input_ids"].shape
    assert [tuple(f.shape) for f in feats] == [(task.NUM_PATCHES, 32)] * 2
    assert gen.shape[1] == enc["input_ids"].shape[1] + 2


def test_prompt_expands_to_144_image_tokens() -> None:
    """One ``<image>`` in the prompt becomes 144 placeholders (12x12 patches, [CLS] dropped)."""
    tok = _tiny_lm_tokenizer()
    proc = toy_model.build_processor(tok)
    image_id = tok.convert_tokens_to_ids(toy_model.IMAGE_TOKEN)
    image = task.render(task.train_scene(0, 0)[0])[0]
    enc = proc(
        images=[image],
        text=[toy_model.PROMPT.format(question="Is there a red star?")],
        return_tensors="pt",
    )
    ids = enc["input_ids"][0]
    assert int((ids == image_id).sum()) == task.NUM_PATCHES
    pos = (ids == image_id).nonzero().flatten()
    assert int(pos[-1] - pos[0]) == task.NUM_PATCHES - 1, "placeholders must be contiguous"
    torch.testing.assert_close(enc["pixel_values"], toy_model.pixel_values(image[None]))


def test_prompt_puts_bos_and_the_system_prompt_before_the_image() -> None:
    """The training prompt is LLaVA-1.5's: BOS, system prompt, then the legacy turn."""
    assert toy_model.PROMPT == toy_model.BOS + toy_model.SYSTEM_PROMPT + toy_model.LEGACY_PROMPT
    assert toy_model.PROMPT.count(toy_model.IMAGE_TOKEN) == 1
    assert (
        toy_model.LEGACY_PROMPT.split(toy_model.IMAGE_TOKEN)[1]
        == (toy_model.PROMPT.split(toy_model.IMAGE_TOKEN)[1])
    ), "the text after the image (question, answer) must not change"
    tok = AutoTokenizer.from_pretrained(toy_model.ASSETS / "processor")
    text = toy_model.PROMPT.format(question="What colour is the star?")
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1, "the tokenizer must not add a second BOS"
    assert tok.decode(ids[1:]).startswith(toy_model.SYSTEM_PROMPT + "USER:")


def test_clip_tokenizer_covers_question_words() -> None:
    """The paired CLIP text tokenizer knows every word of every question family."""
    tok = toy_model.build_clip_tokenizer()
    unk = tok.unk_token_id
    for family in task.FAMILIES:
        for i in range(8):
            ids = tok(task.make_example("validation", 0, family, i).question.text)["input_ids"]
            assert unk not in ids
            assert ids[0] == tok.bos_token_id
            assert ids[-1] == tok.eos_token_id
    clip = CLIPModel(toy_model.build_clip_config(TINY, len(tok))).eval()
    enc = tok(
        ["what colour is the star ?", "is there a blue ring ?"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        emb = clip.get_text_features(**enc)
    assert emb.pooler_output.shape == (2, TINY.projection)


def test_merge_lora_adds_scaled_product() -> None:
    """``merge_lora`` adds ``scaling * B @ A`` to the named linear layer."""
    linear = torch.nn.Linear(4, 3, bias=False)
    net = torch.nn.Sequential(linear)
    before = linear.weight.detach().clone()
    a, b = torch.randn(2, 4), torch.randn(3, 2)
    assert toy_model.merge_lora(net, {"0.lora_A": a, "0.lora_B": b}, 0.5) == 1
    torch.testing.assert_close(linear.weight.detach(), before + 0.5 * b @ a)
    with pytest.raises(KeyError, match="no such module"):
        toy_model.merge_lora(net, {"1.lora_A": a, "1.lora_B": b}, 1.0)


def test_missing_lm_file_names_fetch_command(tmp_path: Path) -> None:
    """A missing LM file raises an error that gives the one fetch command."""
    with pytest.raises(toy_lm.LMFileMissingError, match=re.escape(toy_lm.FETCH_COMMAND)):
        toy_lm.gguf_path(tmp_path)


def test_shipped_assets_load(shipped_toy_model: None) -> None:
    """The shipped model assembles offline and answers; its tower equals the shipped CLIP's."""
    assets = toy_model.ASSETS
    model, proc = toy_model.load_default_model()
    clip, _ = toy_model.load_default_clip()
    for k, v in model.model.vision_tower.state_dict().items():
        torch.testing.assert_close(v, clip.vision_model.state_dict()[k], msg=k)
    ex = task.make_example("test", 0, "attribute", 0)
    enc = proc([task.render(ex.scene)[0]], [ex.question.text])
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
    answer = proc.decode(gen[:, enc["input_ids"].shape[1] :])[0]
    assert isinstance(answer, str)
    meta = json.loads((assets / "vlm" / "lora.json").read_text())
    # the prompt the checkpoint was trained with; checkpoints that name none used the legacy one
    assert proc.prompt == meta.get("prompt", toy_model.LEGACY_PROMPT)
    assert cast(LlamaConfig, model.config.text_config).num_hidden_layers == meta["lm_layers"]
    sizes = sum(p.stat().st_size for p in assets.rglob("*.safetensors"))
    assert sizes <= 50 * 2**20
    assert np.isfinite(sizes)
