"""A tiny ``CLIPModel`` paired with a tiny LLaVA (same vision weights) and an offline tokenizer."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_WORDS", "tiny_paired_clip", "word_tokenizer"]

_WORDS = (
    "what is the colour color of star circle square triangle cross diamond red green blue yellow "
    "purple orange white black how many objects are there left right above below a an in image "
    "describe this shape ? , ."
)
DEFAULT_WORDS: tuple[str, ...] = tuple(_WORDS.split())


def word_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Any:
    """A CLIP-like word-level tokenizer built offline: ``<bos> words <eos>``, right padding.

    Examples:
        >>> tok = word_tokenizer()
        >>> tok(["what is the star ?"])["input_ids"][0][:2]
        [1, 4]
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<unk>": 3}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def tiny_paired_clip(
    llava: Any,
    *,
    paired: bool = True,
    save_to: str | Path | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, Any]:
    """A ``CLIPModel`` whose vision tower is ``llava``'s (``paired=False``: fresh random weights).

    Args:
        llava: A model from :func:`tokenprune.testing.tiny_llava`.
        paired: Copy the LLaVA vision weights (``True``) or leave them random.
        save_to: Also ``save_pretrained`` model and tokenizer into this directory.
        seed: Seed of the text tower initialisation.

    Returns:
        ``(clip_model, tokenizer)``.
    """
    from transformers import CLIPConfig, CLIPModel

    tokenizer = word_tokenizer()
    vision = copy.deepcopy(llava.config.vision_config).to_dict()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": vision["hidden_size"],
        "intermediate_size": 2 * vision["hidden_size"],
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config = CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=vision["hidden_size"]
    )
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    if paired:
        state = llava.model.vision_tower.state_dict()
        clip.vision_model.load_state_dict(
            {k.removeprefix("vision_model."): v for k, v in state.items()}
        )
    if save_to is not None:
        clip.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
    return clip, tokenizer
