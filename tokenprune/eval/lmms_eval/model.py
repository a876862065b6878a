"""The lmms-eval model ``tokenprune``: a VLM with a pruning pipeline installed.

lmms-eval finds this class through the manifest of
:func:`tokenprune.eval.lmms_eval.model_manifest` (entry-point group
``lmms_eval.models``) and builds it from ``--model_args``:

============== ==================================================================================
``pretrained`` ``shipped`` (or ``default`` or empty: the shipped toy LLaVA), a hub id or local
               directory of an image-text-to-text checkpoint, or ``package.module:factory``
               returning a :class:`tokenprune.eval.EvalModel` (the models of ``tokenprune eval``)
``pipeline``   a pipeline config file (YAML/TOML/JSON), a saved pipeline directory or a preset
               name; absent: the unpruned model
``batch_size`` questions per ``generate`` call (``--batch_size`` of lmms-eval sets it too)
``device``     model device; default: this process's GPU under a multi-process launch, else
               ``cuda`` if available, else ``cpu``
``dtype``      ``auto`` (as loaded), ``float32``, ``bfloat16`` or ``float16``
============== ==================================================================================

Generation goes through the same :class:`tokenprune.eval.EvalModel` as ``tokenprune eval``
(greedy, left-padded batches, the pipeline installed with :func:`tokenprune.apply`, the
question passed as ``tokenprune_query`` to text-guided stages), so both tools give the same
answer to the same question. Multi-process runs (``accelerate launch -m lmms_eval ...``) are
sharded by lmms-eval itself; each process loads its own copy of the model on its device.

Importing this module imports lmms-eval; without it the import fails with an
:class:`ImportError` that names ``pip install 'tokenprune[lmms]'``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenprune.adapters.base import QUERY_KWARG, PruneHandle
from tokenprune.api import apply
from tokenprune.eval.lmms_eval import INSTALL_HINT
from tokenprune.eval.models import (
    DEFAULT_MODEL,
    EvalModel,
    EvalModelError,
    chat_encoder,
    hf_eval_model,
    load_eval_model,
    toy_eval_model,
)
from tokenprune.eval.parallel import current_process, launched

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as _exc:  # pragma: no cover - only reachable without the extra
    raise ImportError(f"`lmms_eval --model tokenprune` needs lmms-eval: {INSTALL_HINT}") from _exc

__all__ = ["SHIPPED_NAMES", "TokenPruneLMM", "truncate_at"]

SHIPPED_NAMES = frozenset({"", "shipped", DEFAULT_MODEL})
"""``pretrained`` values that select the shipped toy model."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GREEDY_ONLY = {"temperature": (0, 0.0, None), "do_sample": (False, None), "num_beams": (1, None)}
_IGNORED_GEN_KWARGS = frozenset({"top_p", "top_k", "image_aspect_ratio"})

Encode = Callable[[list[np.ndarray], list[str]], Mapping[str, Any]]


def truncate_at(text: str, until: Iterable[str]) -> str:
    r"""Cut ``text`` before the first occurrence of any stop string (empty strings are ignored).

    Greedy decoding makes this equal to stopping the generation there.

    Examples:
        >>> truncate_at("red\n\nblue", ["\n\n", "."])
        'red'
        >>> truncate_at("red", [])
        'red'
    """
    cut = len(text)
    for stop in until:
        if stop and (i := text.find(stop)) != -1:
            cut = min(cut, i)
    return text[:cut]


@dataclass(frozen=True)
class _Scorer:
    """What ``loglikelihood`` needs besides the module: the prompt encoder and the tokenizer."""

    encode: Encode
    tokenizer: Any


class TokenPruneLMM(lmms):  # type: ignore[misc]  # lmms-eval ships no type information
    """lmms-eval model ``tokenprune``: any supported VLM, optionally with a pruning pipeline.

    Args:
        pretrained: ``shipped``/``default``/empty (the toy LLaVA), a hub id or local directory,
            or ``package.module:factory``.
        pipeline: Pipeline config file, saved-pipeline directory or preset name; ``None`` or
            empty: unpruned.
        batch_size: Questions per ``generate`` call.
        device: Model device (see the module docstring for the default).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        max_new_tokens: Generation limit when the task sets none.
        max_batch_size: Accepted because lmms-eval always passes it; unused.

    Raises:
        ValueError: If ``batch_size`` or ``dtype`` is invalid (the message names the field).
        ModelAssetsMissingError: If the shipped toy model's files are missing.
        EvalModelError: If the model cannot be loaded.
        ConfigError: If the pipeline is invalid or not found.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "shipped",
        pipeline: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 128,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        del max_batch_size
        try:
            self.batch_size_per_process = int(batch_size)
        except ValueError:
            raise ValueError(
                f"batch_size={batch_size!r}: give a positive integer (tokenprune does not "
                "support lmms-eval's 'auto' batch size)"
            ) from None
        if self.batch_size_per_process < 1:
            raise ValueError(f"batch_size={batch_size!r} must be at least 1")
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected auto or one of {', '.join(_DTYPES)}")
        self.max_new_tokens = int(max_new_tokens)
        process = current_process()
        self._rank, self._world_size = process.index, process.count
        if device is None or (launched() and device == "cuda"):
            device = process.device
        self._device = torch.device(device)
        self.pretrained = str(pretrained).strip()
        self.eval_model = _load_model(self.pretrained, self._device, dtype)
        self.pipeline = str(pipeline).strip() if pipeline else None
        self._handle: PruneHandle | None = (
            apply(self.eval_model.module, self.pipeline) if self.pipeline else None
        )
        self._scorer: _Scorer | None = None

    # -- what lmms-eval reads -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The model's device (lmms-eval puts its cross-process tensors there)."""
        return self._device

    @property
    def batch_size(self) -> int:
        """Questions per ``generate`` call."""
        return self.batch_size_per_process

    @property
    def model(self) -> torch.nn.Module:
        """The (pruned) model."""
        return self.eval_model.module

    # -- requests -------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer each request greedily; stop at the task's ``until`` strings.

        Requests are grouped by their generation arguments and batched in the order lmms-eval
        gives them (no re-sorting), so a batch holds the same questions as the same batch of
        ``tokenprune eval`` when the order agrees.

        Raises:
            ValueError: If a task asks for sampling or beam search, or a document has not
                exactly one image.
        """
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(_gen_key(request.args[1]), []).append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until, max_new_tokens = self._generation_settings(gen_kwargs)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                questions = [str(requests[i].args[0]) for i in chunk]
                images = [self._image(requests[i]) for i in chunk]
                answers = self.eval_model.generate(
                    images, questions, max_new_tokens=max_new_tokens, **self._query(questions)
                )
                for i, answer in zip(chunk, answers, strict=True):
                    out[i] = truncate_at(answer, until)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its prompt, and whether it is greedy.

        The prompt is built exactly as for generation (the question in the model's prompt
        format, with its image); the continuation's tokens follow it. Pruning removes only
        visual tokens, which come before the text, so the continuation's logits stay at the end
        of the (shorter) pruned sequence.

        Raises:
            NotImplementedError: For ``package.module:factory`` models (the :class:`EvalModel`
                protocol has no tokenizer).
        """
        scorer = self._get_scorer()
        out = []
        for request in requests:
            context, target, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self._doc(request))
            inputs = {
                k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in scorer.encode([self._image(request)], [str(context)]).items()
            }
            tokens = scorer.tokenizer(
                continuation, add_special_tokens=False, return_tensors="pt"
            ).input_ids.to(self.device)
            n = int(tokens.shape[1])
            if n == 0:
                raise ValueError(
                    f"task {task!r} ({split}, doc {doc_id}): the continuation {continuation!r} "
                    "has no tokens"
                )
            inputs["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
            mask = inputs.get("attention_mask")
            if mask is not None:
                inputs["attention_mask"] = torch.cat([mask, torch.ones_like(tokens)], dim=1)
            with torch.inference_mode():
                logits = self.model(**inputs, **self._query([str(context)])).logits
            logprobs = torch.log_softmax(logits[0, -n - 1 : -1].float(), dim=-1)
            target_ids = tokens[0]
            total = logprobs.gather(-1, target_ids[:, None]).sum()
            out.append((float(total), bool((logprobs.argmax(-1) == target_ids).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: tokenprune answers one question per image and request."""
        raise NotImplementedError(
            "the tokenprune model answers single-turn requests only (generate_until, "
            "loglikelihood); choose a task without multi-round generation"
        )

    # -- helpers --------------------------------------------------------------------------------

    def _query(self, questions: list[str]) -> dict[str, Any]:
        """``tokenprune_query`` for text-guided stages, only when a pipeline is installed."""
        return {QUERY_KWARG: questions} if self._handle is not None else {}

    def _doc(self, request: Instance) -> Any:
        _, _, _, doc_id, task, split = request.args
        return self.task_dict[task][split][doc_id]

    def _image(self, request: Instance) -> np.ndarray:
        """The request's one image as ``uint8`` RGB ``(H, W, 3)``."""
        doc_to_visual = request.args[2]
        visuals = doc_to_visual(self._doc(request)) if doc_to_visual is not None else []
        if len(visuals) != 1 or not hasattr(visuals[0], "convert"):
            _, _, _, doc_id, task, split = request.args
            raise ValueError(
                f"task {task!r} ({split}, doc {doc_id}) gives {len(visuals)} visuals; the "
                "tokenprune model takes exactly one image (PIL.Image) per question"
            )
        return np.asarray(visuals[0].convert("RGB"), dtype=np.uint8)

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int]:
        """``(until, max_new_tokens)`` from a task's generation arguments; greedy only."""
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_new_tokens = int(gen_kwargs.pop("max_new_tokens", None) or self.max_new_tokens)
        for key, allowed in _GREEDY_ONLY.items():
            value = gen_kwargs.pop(key, None)
            if value not in allowed:
                raise ValueError(
                    f"generation argument {key}={value!r}: the tokenprune model decodes "
                    f"greedily; set {key}={allowed[0]} (for example --gen_kwargs {key}="
                    f"{allowed[0]})"
                )
        unknown = sorted(set(gen_kwargs) - _IGNORED_GEN_KWARGS)
        if unknown:
            raise ValueError(
                f"unsupported generation arguments {', '.join(unknown)}; the tokenprune model "
                "reads until, max_new_tokens, temperature=0, do_sample=false and num_beams=1"
            )
        return list(until), max_new_tokens

    def _get_scorer(self) -> _Scorer:
        if self._scorer is None:
            self._scorer = _load_scorer(self.pretrained)
        return self._scorer


def _gen_key(gen_kwargs: Mapping[str, Any] | None) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)


def _load_model(pretrained: str, device: torch.device, dtype: str) -> EvalModel:
    """The model as ``tokenprune eval --model`` loads it, plus the dtype."""
    if pretrained in SHIPPED_NAMES:
        model: EvalModel = toy_eval_model(device)
    elif ":" in pretrained and not Path(pretrained).exists():
        model = load_eval_model(pretrained, device=device)
    else:
        return hf_eval_model(pretrained, device=device, dtype=_DTYPES.get(dtype, "auto"))
    if dtype != "auto":
        model.module.to(_DTYPES[dtype])
    return model


def _load_scorer(pretrained: str) -> _Scorer:
    """The prompt encoder and tokenizer of the model (what ``loglikelihood`` needs)."""
    if pretrained in SHIPPED_NAMES:
        from transformers import LlavaProcessor

        from tokenprune.toy.model import ASSETS, ToyProcessor

        processor = ToyProcessor(LlavaProcessor.from_pretrained(ASSETS / "processor"))
        return _Scorer(processor, processor.processor.tokenizer)
    if ":" in pretrained and not Path(pretrained).exists():
        raise NotImplementedError(
            f"pretrained={pretrained!r}: loglikelihood needs the model's tokenizer, which a "
            "package.module:factory EvalModel does not expose; use generate_until tasks"
        )
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(pretrained)
    except (OSError, ValueError) as exc:
        raise EvalModelError(f"cannot load the processor of {pretrained!r}: {exc}") from exc

    encode = chat_encoder(processor)

    return _Scorer(encode, getattr(processor, "tokenizer", processor))
