"""The model-adapter interface and the handle that undoes an installation."""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from tokenprune.adapters._hooks import HookSet
from tokenprune.adapters._turns import (
    Turn,
    TurnMemory,
    cached_length,
    continue_with_selection,
    placeholder_ids,
    reusable_prefix,
)
from tokenprune.capabilities import Capability
from tokenprune.errors import AdapterError, CapabilityError

if TYPE_CHECKING:
    from types import TracebackType

    from tokenprune.pipeline import Pipeline

__all__ = ["CallMode", "ModelAdapter", "PruneHandle", "QUERY_KWARG"]

CallMode = Literal["forward", "generate"]
QUERY_KWARG = "tokenprune_query"
"""Extra keyword accepted by a pruned model's ``forward``/``generate``: the question per prompt."""
_MARK = "__tokenprune_handle__"


class PruneHandle:
    """An installed pipeline. Use it as a context manager or call :meth:`remove`.

    Removing restores the model exactly (no hooks, no instance attributes left), also after an
    exception inside ``forward`` or ``generate``.
    """

    def __init__(self, adapter: ModelAdapter, pipeline: Pipeline, hooks: HookSet) -> None:
        self.adapter = adapter
        self.pipeline = pipeline
        self._hooks = hooks

    @property
    def model(self) -> nn.Module:
        """The model the pipeline is installed on."""
        return self.adapter.model

    @property
    def active(self) -> bool:
        """``True`` until :meth:`remove` is called."""
        return bool(self._hooks.names)

    @property
    def hook_names(self) -> list[str]:
        """Names of the hooks this installation added."""
        return self._hooks.names

    def remove(self) -> None:
        """Uninstall; idempotent."""
        self._hooks.remove()

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PruneHandle({self.adapter.name}, {self.pipeline!r}, {state})"


class ModelAdapter(ABC):
    """Knows one model family: how to get its visual tokens and how to feed pruned ones back.

    Subclasses implement :meth:`supports` and :meth:`prepare_inputs`. The base class installs
    two per-instance hooks that call :meth:`prepare_inputs`: a forward pre-hook (for
    ``model(...)``) and a ``generate`` wrapper (so pruning runs once, before prefill, and the
    generation bookkeeping sees the shorter prompt). ``prepare_inputs`` is expected to run the
    vision encoder itself, prune, and return keyword arguments that carry precomputed features
    (no ``pixel_values``), so the hooks are no-ops on every later step.

    Class attributes:
        name: Registry key.
        model_classes: Names of the model classes handled (for messages and docs).
        capabilities: What :class:`~tokenprune.context.PruneContext` can offer with this model.
        capability_hints: Alternatives to suggest when a pipeline needs a missing capability.
    """

    name: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    capability_hints: ClassVar[Mapping[Capability, str]] = {}
    follow_up_inputs: ClassVar[tuple[str, ...] | None] = ("pixel_values", "image_sizes")
    """Raw vision inputs a follow-up turn may repeat (dropped under ``reuse``); ``None`` if the
    adapter cannot continue a pruned conversation from its cache."""

    def __init__(self, model: nn.Module) -> None:
        if not self.supports(model):
            raise AdapterError(
                f"adapter {self.name!r} does not support {type(model).__name__}; it handles "
                f"{', '.join(self.model_classes) or 'no model class'}"
            )
        self.model = model

    @classmethod
    @abstractmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this adapter can handle ``model``."""

    def vision_tower(self) -> nn.Module:
        """The model's vision encoder (for stages that check pairing with their own weights).

        Raises:
            CapabilityError: If the adapter does not expose one.
        """
        raise CapabilityError(f"adapter {self.name!r} does not expose its vision tower")

    def validate(self, pipeline: Pipeline) -> None:
        """Check model settings against the pipeline before installing (override to add checks).

        Raises:
            AdapterError: If the model is configured in a way the adapter cannot prune.
        """
        pipeline.check_compatible(self)

    @abstractmethod
    def prepare_inputs(
        self, pipeline: Pipeline, kwargs: dict[str, Any], mode: CallMode
    ) -> dict[str, Any]:
        """Prune the visual tokens of one call and return the rewritten keyword arguments.

        Must return ``kwargs`` unchanged (minus ``tokenprune_query``) when there is nothing to
        prune, e.g. on decoding steps.
        """

    def install_hooks(self, pipeline: Pipeline, hooks: HookSet) -> None:
        """Add adapter-specific hooks that live as long as the installation (default: none).

        Called by :meth:`install` after its own forward pre-hook; everything added to ``hooks``
        is removed with the handle. Adapters that prune inside the model's forward (a timm ViT,
        between two blocks) register their per-instance hooks here.
        """
        del pipeline, hooks  # nothing to add by default

    def _follow_up(
        self, pipeline: Pipeline, turn: Turn | None, kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], Turn | None]:
        """Rewrite a ``generate`` call that continues a cached conversation (multi-turn)."""
        placeholders = placeholder_ids(getattr(self.model, "config", None))
        ids = kwargs.get("input_ids")
        has_image = any(kwargs.get(name) is not None for name in self.follow_up_inputs or ())
        text_only = (
            bool(placeholders)
            and ids is not None
            and not bool(torch.isin(ids, torch.tensor(sorted(placeholders))).any())
        )
        if turn is None and not has_image and text_only:
            return kwargs, None  # a text-only conversation: nothing was pruned
        if self.follow_up_inputs is None:
            raise AdapterError(
                f"adapter {self.name!r} cannot continue a pruned conversation from a cache "
                "yet; pass the whole conversation without a cache"
            )
        if turn is None:
            raise AdapterError(
                "the cache was not filled by this pruned model's generate(), so the pruned "
                "tokens it holds are unknown; continue only from caches returned by "
                "generate(..., return_dict_in_generate=True) of the same installation (or passed "
                "to it as cache=...)"
            )
        if pipeline.follow_up == "reuse":
            kwargs.pop(QUERY_KWARG, None)
            return continue_with_selection(turn, kwargs, placeholders, drop=self.follow_up_inputs)
        if not has_image:
            raise AdapterError(
                "follow_up='rescore' prunes the image again: pass its "
                f"{' / '.join(self.follow_up_inputs)} with the follow-up turn"
            )
        key = "cache" if kwargs.get("cache") is not None else "past_key_values"
        cache = kwargs.pop(key)
        pruned = self.prepare_inputs(pipeline, kwargs, "generate")
        keep = min(reusable_prefix(turn, pruned, placeholders), cached_length(cache))
        if keep == 0:
            cache.reset()
        else:
            cache.crop(keep - cached_length(cache))
        pruned[key] = cache
        mask = kwargs.get("attention_mask")
        prompt_mask = torch.ones_like(kwargs["input_ids"]) if mask is None else mask
        return pruned, Turn(
            kwargs["input_ids"],
            prompt_mask,
            pruned["input_ids"],
            pruned["attention_mask"],
            pruned.get("position_ids"),
        )

    def install(self, pipeline: Pipeline) -> PruneHandle:
        """Install ``pipeline`` on the model; returns a handle (also a context manager).

        Models without ``generate`` (classifiers) get only the forward hooks.

        Raises:
            AdapterError: If a pipeline is already installed on this model instance.
            CapabilityError: If the pipeline needs something this adapter cannot provide.
        """
        model = self.model
        current = model.__dict__.get("generate")
        hooked = any(hasattr(h, _MARK) for h in model._forward_pre_hooks.values())
        if hooked or (current is not None and hasattr(current, _MARK)):
            raise AdapterError(
                f"{type(model).__name__} already has a tokenprune pipeline installed; call "
                "remove() on its handle (or leave its `with` block) first"
            )
        self.validate(pipeline)
        hooks = HookSet()
        handle = PruneHandle(self, pipeline, hooks)
        signature = inspect.signature(model.forward)

        def forward_pre_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            bound = signature.bind_partial(*args, **kwargs).arguments
            extra = bound.pop("kwargs", {})
            return (), self.prepare_inputs(pipeline, {**bound, **extra}, "forward")

        setattr(forward_pre_hook, _MARK, handle)
        hooks.add(
            "tokenprune.prune_visual_tokens",
            model.register_forward_pre_hook(forward_pre_hook, with_kwargs=True),
        )
        try:
            self.install_hooks(pipeline, hooks)
        except BaseException:
            hooks.remove()
            raise
        if not hasattr(model, "generate"):  # e.g. a timm classifier
            return handle
        original_generate: Callable[..., Any] = getattr(model, "generate")  # noqa: B009
        turns = TurnMemory()

        @functools.wraps(original_generate)
        def generate(*args: Any, **kwargs: Any) -> Any:
            if args:
                if len(args) > 1 or "input_ids" in kwargs or "inputs" in kwargs:
                    raise AdapterError(
                        "pass generate() arguments other than input_ids by keyword when a "
                        "tokenprune pipeline is installed"
                    )
                kwargs["input_ids"] = args[0]
            if "inputs" in kwargs:
                kwargs["input_ids"] = kwargs.pop("inputs")
            original_ids = kwargs.get("input_ids")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cached_length(cache) > 0:
                new_kwargs, turn = self._follow_up(pipeline, turns.recall(cache), kwargs)
            else:
                new_kwargs = self.prepare_inputs(pipeline, kwargs, "generate")
                turn = _first_turn(kwargs, new_kwargs)
            output = original_generate(**new_kwargs)
            filled = _cache_of(output, new_kwargs)
            if filled is not None and turn is not None:
                turns.remember(filled, turn)
            return _restore_prompt(output, original_ids, new_kwargs.get("input_ids"))

        setattr(generate, _MARK, handle)
        hooks.shadow_method("tokenprune.generate", model, "generate", generate)
        return handle


def _cache_of(output: Any, kwargs: Mapping[str, Any]) -> Any:
    """The cache a ``generate`` call filled.

    That is the one returned with ``return_dict_in_generate=True`` (``cache``, formerly
    ``past_key_values``) or else the one the caller passed in.
    """
    for name in ("cache", "past_key_values"):
        found = getattr(output, name, None)
        if found is None:
            found = kwargs.get(name)
        if found is not None:
            return found
    return None


def _first_turn(kwargs: Mapping[str, Any], pruned: Mapping[str, Any]) -> Turn | None:
    """The turn a first (uncached) ``generate`` call leaves in its cache; None if unpruned."""
    ids, pruned_ids = kwargs.get("input_ids"), pruned.get("input_ids")
    if ids is None or pruned_ids is None or ids is pruned_ids:
        return None
    mask = kwargs.get("attention_mask")
    return Turn(
        ids,
        torch.ones_like(ids) if mask is None else mask,
        pruned_ids,
        pruned.get("attention_mask", torch.ones_like(pruned_ids)),
        pruned.get("position_ids"),
    )


def _restore_prompt(
    output: Any, original_ids: torch.Tensor | None, pruned_ids: torch.Tensor | None
) -> Any:
    """Put the caller's unpruned prompt back in front of the generated tokens.

    ``generate`` ran on the shortened prompt; callers slice new tokens with the length of the
    prompt they passed, so the returned sequences start with that prompt.
    """
    if original_ids is None or pruned_ids is None or original_ids is pruned_ids:
        return output
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    new_tokens = sequences[:, pruned_ids.shape[1] :]
    restored = torch.cat([original_ids.to(new_tokens.device), new_tokens], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output
