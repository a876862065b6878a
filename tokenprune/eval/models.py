"""Models under evaluation: the :class:`EvalModel` protocol and its adapters.

The runner needs two things from a model: the ``nn.Module`` that :func:`tokenprune.apply`
installs a pipeline on, and a way to answer a batch of (image, question) pairs greedily. Any
model + processor pair can be evaluated by implementing :class:`EvalModel`, usually through
:class:`ProcessorEvalModel` (an ``encode`` function that builds the ``generate`` inputs and a
``decode`` function for the new tokens).

Adapters shipped here:

* :func:`toy_eval_model`: the shipped toy LLaVA (``--model default``);
* :func:`hf_eval_model`: any Hugging Face image-text-to-text checkpoint, from the hub or a local
  directory, through ``AutoProcessor`` and ``AutoModelForImageTextToText`` with the processor's
  chat template (loaded lazily; needs the checkpoint, so it is not exercised by the tests);
* ``package.module:factory`` on the command line: a function returning an :class:`EvalModel`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from tokenprune.errors import TokenPruneError

__all__ = [
    "DEFAULT_MODEL",
    "EvalModel",
    "EvalModelError",
    "ModelAssetsMissingError",
    "ProcessorEvalModel",
    "hf_eval_model",
    "load_eval_model",
    "toy_eval_model",
]

DEFAULT_MODEL = "default"
"""``--model`` value that selects the shipped toy model."""
_FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

Encode = Callable[[list[np.ndarray], list[str]], Mapping[str, Any]]
Decode = Callable[[torch.Tensor], list[str]]


class EvalModelError(TokenPruneError):
    """A model cannot be loaded for evaluation or does not implement :class:`EvalModel`."""


class ModelAssetsMissingError(EvalModelError, FileNotFoundError):
    """The shipped toy model's files are not there (not trained yet, or the LM was not fetched)."""


@runtime_checkable
class EvalModel(Protocol):
    """What the evaluation runner needs from a model.

    Attributes:
        module: The model that :func:`tokenprune.apply` installs pipelines on.
        name: Short description recorded in ``runs.jsonl``.
    """

    @property
    def module(self) -> nn.Module:
        """The model that :func:`tokenprune.apply` installs pipelines on."""
        ...

    @property
    def name(self) -> str:
        """Short description recorded in ``runs.jsonl``."""
        ...

    def generate(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str],
        *,
        max_new_tokens: int,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Answer each question about its image with greedy decoding.

        Args:
            images: One ``uint8`` RGB image ``(H, W, 3)`` per question.
            questions: The questions.
            max_new_tokens: Generation length limit.
            **generate_kwargs: Extra ``generate`` arguments, passed through to the module
                (the runner passes ``tokenprune_query`` when a pipeline is installed).

        Returns:
            One decoded answer per question.
        """
        ...


class ProcessorEvalModel:
    """An :class:`EvalModel` from a ``generate``-capable module, an encoder and a decoder.

    ``encode(images, questions)`` returns the keyword arguments of ``module.generate`` with
    left-padded ``input_ids``; the new tokens (everything after the prompt) are passed to
    ``decode``. Decoding is greedy (``do_sample=False, num_beams=1``).

    Args:
        module: The model.
        encode: Builds the inputs of one batch.
        decode: Turns generated tokens ``(B, T)`` into strings.
        name: Description for ``runs.jsonl``.
        device: Device the inputs are moved to; the module's device when omitted.
    """

    def __init__(
        self,
        module: nn.Module,
        encode: Encode,
        decode: Decode,
        *,
        name: str = "model",
        device: torch.device | str | None = None,
    ) -> None:
        self._module = module
        self._encode = encode
        self._decode = decode
        self._name = name
        if device is None:
            param = next(module.parameters(), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def name(self) -> str:
        return self._name

    def generate(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str],
        *,
        max_new_tokens: int,
        **generate_kwargs: Any,
    ) -> list[str]:
        if len(images) != len(questions):
            raise EvalModelError(f"{len(images)} images for {len(questions)} questions")
        inputs = {
            k: v.to(self.device) if isinstance(v, torch.Tensor) else v
            for k, v in self._encode(list(images), list(questions)).items()
        }
        if "input_ids" not in inputs:
            raise EvalModelError("the encoder must return `input_ids` (left padded)")
        prompt_length = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            out = self._module.generate(  # type: ignore[operator]
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                **generate_kwargs,
            )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        return self._decode(sequences[:, prompt_length:].cpu())

    def __repr__(self) -> str:
        return f"ProcessorEvalModel({self._name!r}, device={str(self.device)!r})"


def chat_encoder(processor: Any) -> Encode:
    """Batch encoder for a hub/local VLM: one image and one question per prompt, chat template.

    Args:
        processor: The model's ``AutoProcessor`` (with a chat template).

    Returns:
        ``encode(images, questions)`` -> the processor's padded tensors.
    """
    from PIL import Image

    def encode(images: list[np.ndarray], questions: list[str]) -> Mapping[str, Any]:
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for q in questions
        ]
        pil = [Image.fromarray(image) for image in images]
        return dict(processor(images=pil, text=texts, padding=True, return_tensors="pt"))

    return encode


def _to_device(module: nn.Module, device: torch.device | str) -> nn.Module:
    return module.to(device).eval()


def toy_eval_model(
    device: torch.device | str = "cpu", assets: str | Path | None = None
) -> ProcessorEvalModel:
    """The shipped toy LLaVA with its processor (``--model default``).

    Args:
        device: Model device.
        assets: Assets directory of another checkpoint of the toy model (a training run's
            ``--assets``); the shipped one when ``None``.

    Raises:
        ModelAssetsMissingError: If the trained assets or the language-model file are missing;
            the message says how to get them.
    """
    from tokenprune.toy.model import ASSETS, load_default_model

    assets = Path(assets) if assets is not None else ASSETS
    try:
        model, processor = load_default_model(assets)
    except FileNotFoundError as exc:
        raise ModelAssetsMissingError(
            f"the shipped toy model cannot be loaded: {exc}\n(the model is assembled from "
            f"{assets} and the SmolLM2 language-model file; both must be present)"
        ) from exc
    module = _to_device(model, device)
    return ProcessorEvalModel(
        module, processor, processor.decode, name=DEFAULT_MODEL, device=torch.device(device)
    )


def hf_eval_model(
    name_or_path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = "auto",
) -> ProcessorEvalModel:
    """A Hugging Face image-text-to-text model with its processor (hub id or local directory).

    Each question becomes one user turn ``[image, question]`` rendered with the processor's
    chat template (with the generation prompt); the tokenizer pads on the left. Only this
    loading path touches the checkpoint; the rest is :class:`ProcessorEvalModel`.

    Args:
        name_or_path: Hub id (for example ``llava-hf/llava-1.5-7b-hf``) or local directory.
        device: Device to load the model on.
        dtype: Weights dtype (``"auto"``: the checkpoint's).

    Raises:
        EvalModelError: If the checkpoint cannot be loaded.
    """
    try:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(str(name_or_path))
        model = AutoModelForImageTextToText.from_pretrained(
            str(name_or_path), dtype=dtype, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        raise EvalModelError(f"cannot load {str(name_or_path)!r} as a VLM: {exc}") from exc
    module = _to_device(model, device)
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"

    encode = chat_encoder(processor)

    def decode(tokens: torch.Tensor) -> list[str]:
        return [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]

    return ProcessorEvalModel(module, encode, decode, name=str(name_or_path), device=device)


def load_eval_model(spec: str, *, device: torch.device | str = "cpu") -> EvalModel:
    """Load the model named on the command line.

    Args:
        spec: ``default`` (the shipped toy model), ``package.module:factory`` (a function
            called with ``device=`` that returns an :class:`EvalModel`), or a hub id / local
            directory of a Hugging Face image-text-to-text checkpoint.
        device: Device for the model.

    Raises:
        ModelAssetsMissingError: For ``default`` when the toy model's files are missing.
        EvalModelError: If the model cannot be loaded.
    """
    if spec == DEFAULT_MODEL:
        return toy_eval_model(device)
    if _FACTORY_SPEC.match(spec) and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise EvalModelError(f"cannot import model factory {spec!r}: {exc}") from exc
        model = factory(device=device)
        if not isinstance(model, EvalModel):
            raise EvalModelError(
                f"model factory {spec!r} returned {type(model).__name__}, which does not "
                "implement EvalModel (module, name, generate)"
            )
        return model
    return hf_eval_model(spec, device=device)
