"""The Scorer -> Selector -> Merger pipeline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenprune import functional as F
from tokenprune.capabilities import ENCODER_ONLY, LLM_POSITION, Capability
from tokenprune.config import FollowUpPolicy, LlmStageConfig, PipelineConfig, PositionPolicy
from tokenprune.context import PruneContext
from tokenprune.errors import BudgetError, CapabilityError, ConfigError, ShapeError
from tokenprune.stages.base import Merger, Role, Scorer, Selector, Stage, StageConfig
from tokenprune.stages.mergers.drop import DropMerger
from tokenprune.stages.scorers.uniform import UniformScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.types import PrunedTokens

if TYPE_CHECKING:
    from tokenprune.adapters.base import ModelAdapter
    from tokenprune.plugin.manager import Runtime

__all__ = ["LlmStage", "Pipeline"]


@dataclass(frozen=True)
class LlmStage:
    """A pruning position inside the language model: a decoder layer and the pipeline run there.

    Visual tokens are dropped before decoder layer ``layer`` (layers ``0 .. layer - 1`` see the
    longer sequence; FastV's ``K``). ``pipeline`` is an ordinary single-position
    :class:`Pipeline` whose budget is relative to the visual tokens of each image arriving at the
    layer. Its stages may require only what exists inside the language model
    (:data:`~tokenprune.capabilities.LLM_POSITION`: the ``llm_attention`` capability).

    Attributes:
        layer: Decoder layer the tokens are dropped before, ``>= 1``.
        pipeline: Scorer, selector, merger and budget of this position.

    Raises:
        ConfigError: If ``layer < 1``, the pipeline has LLM stages of its own or no encoder
            stage, or a stage needs a capability that exists only at the vision encoder.

    Examples:
        >>> from tokenprune.stages.scorers.fastv import FastVScorer
        >>> from tokenprune.stages.selectors.topk import TopKSelector
        >>> LlmStage(2, Pipeline(FastVScorer(), TopKSelector(), keep_ratio=0.5)).layer
        2
    """

    layer: int
    pipeline: Pipeline

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ConfigError(
                f"an LLM stage's layer must be an int >= 1 (tokens are dropped before that "
                f"decoder layer), got {self.layer!r}"
            )
        if not isinstance(self.pipeline, Pipeline):
            raise TypeError(f"expected a Pipeline, got {type(self.pipeline).__name__}")
        if self.pipeline.llm or not self.pipeline.has_encoder_stage:
            raise ConfigError(
                "an LLM stage's pipeline is a single position: give it a scorer, a selector and "
                "a budget, and no LLM stages of its own"
            )
        for stage in self.pipeline.stages:
            wrong = stage.required_capabilities() & ENCODER_ONLY
            for capability in sorted(wrong, key=lambda c: c.value):
                raise ConfigError(
                    f"{stage.role} {stage.name!r} at LLM layer {self.layer} requires capability "
                    f"{capability.value!r}, which exists only at the vision encoder; use it in "
                    "the encoder stage (top-level scorer/selector/merger) instead"
                )


class Pipeline:
    """Scorer, selector and merger with a token budget.

    Stages are stateless; a pipeline can be applied to several models at once.

    Args:
        scorer: Scores every token.
        selector: Picks ``K`` tokens per image.
        merger: Builds the output tokens; :class:`DropMerger` by default.
        keep: Tokens to keep per image. Exactly one of ``keep``/``keep_ratio``.
        keep_ratio: Fraction of tokens to keep, in (0, 1], rounded half up.
        positions: Position-id policy applied by the adapter (``contiguous`` or ``original``).
        follow_up: Multi-turn policy (``reuse`` the first turn's selection or ``rescore`` with
            the new question) when ``generate`` continues from an earlier turn's cache.
        runtime: Runtime whose ``tokenprune_after_prune`` observers are called; none if omitted.

    Examples:
        >>> from tokenprune.stages.scorers.random import RandomScorer
        >>> from tokenprune.stages.selectors.topk import TopKSelector
        >>> from tokenprune.context import PruneContext
        >>> from tokenprune.types import VisualTokens
        >>> p = Pipeline(RandomScorer(seed=0), TopKSelector(), keep_ratio=0.25)
        >>> x = torch.randn(2, 16, 8)
        >>> out = p(PruneContext(visual=VisualTokens(x), keep=p.budget(16)))
        >>> tuple(out.features.shape)
        (2, 4, 8)
    """

    def __init__(
        self,
        scorer: Scorer[Any],
        selector: Selector[Any],
        merger: Merger[Any] | None = None,
        *,
        keep: int | None = None,
        keep_ratio: float | None = None,
        positions: PositionPolicy = "contiguous",
        follow_up: FollowUpPolicy = "reuse",
        runtime: Runtime | None = None,
        llm: Sequence[LlmStage] = (),
    ) -> None:
        for stage, base in ((scorer, Scorer), (selector, Selector), (merger, Merger)):
            if stage is not None and not isinstance(stage, base):
                raise TypeError(f"expected a {base.__name__}, got {type(stage).__name__}")
        self.scorer = scorer
        self.selector = selector
        self.merger: Merger[Any] = merger if merger is not None else DropMerger()
        F.resolve_budget(10**9, keep=keep, keep_ratio=keep_ratio)  # validates the budget form
        self.keep = keep
        self.keep_ratio = keep_ratio
        if positions not in ("contiguous", "original"):
            raise ValueError(f"positions must be 'contiguous' or 'original', got {positions!r}")
        self.positions: PositionPolicy = positions
        if follow_up not in ("reuse", "rescore"):
            raise ValueError(f"follow_up must be 'reuse' or 'rescore', got {follow_up!r}")
        self.follow_up: FollowUpPolicy = follow_up
        self.runtime = runtime
        self.config: PipelineConfig | None = None
        """The configuration the pipeline was built from (set by :meth:`from_config`)."""
        self.has_encoder_stage = True
        """``False`` for a pipeline that prunes only inside the LLM (:meth:`llm_only`)."""
        self.llm: tuple[LlmStage, ...] = tuple(llm)
        for item in self.llm:
            if not isinstance(item, LlmStage):
                raise TypeError(f"llm stages must be LlmStage objects, got {type(item).__name__}")
        self._check_positions()

    @classmethod
    def llm_only(cls, llm: Sequence[LlmStage], *, runtime: Runtime | None = None) -> Pipeline:
        """A pipeline that prunes only inside the language model (plain FastV).

        Its encoder position is the identity: :attr:`has_encoder_stage` is ``False``, adapters
        skip the encoder stage, and :attr:`stages` is empty. (``scorer``/``selector`` hold a
        uniform scorer and top-k at ``keep_ratio=1.0``, which keep every token, for code that
        reads them.)

        Args:
            llm: The LLM stages, at least one.
            runtime: Runtime whose observers are called.

        Raises:
            ConfigError: If ``llm`` is empty.

        Examples:
            >>> from tokenprune.stages.scorers.fastv import FastVScorer
            >>> from tokenprune.stages.selectors.topk import TopKSelector
            >>> fastv = Pipeline(FastVScorer(), TopKSelector(), keep_ratio=0.5)
            >>> p = Pipeline.llm_only([LlmStage(2, fastv)])
            >>> p.has_encoder_stage, p.stages, p.requires == {Capability.LLM_ATTENTION}
            (False, (), True)
        """
        if not llm:
            raise ConfigError("a pipeline without an encoder stage needs at least one LLM stage")
        pipeline = cls(UniformScorer(), TopKSelector(), keep_ratio=1.0, runtime=runtime, llm=llm)
        pipeline.has_encoder_stage = False
        return pipeline

    def _check_encoder_position(self) -> None:
        """Refuse encoder stages that need what exists only inside the language model."""
        for stage in self.stages:
            wrong = stage.required_capabilities() & LLM_POSITION
            for capability in sorted(wrong, key=lambda c: c.value):
                raise ConfigError(
                    f"{stage.role} {stage.name!r} requires capability {capability.value!r}, which "
                    "exists only inside the language model; list it under `llm:` (an LLM stage "
                    "with a `layer`) instead of at the encoder position"
                )

    def _check_positions(self) -> None:
        before: tuple[str, int] | None = ("keep", self.keep) if self.keep is not None else None
        previous = 0
        for i, item in enumerate(self.llm):
            if item.layer <= previous:
                raise ConfigError(
                    f"llm.{i}.layer={item.layer} does not come after layer {previous}: LLM stages "
                    "must be in strictly increasing layer order"
                )
            previous = item.layer
            keep = item.pipeline.keep
            if keep is None:
                continue
            if before is not None and keep > before[1]:
                raise BudgetError(
                    f"llm.{i}.keep={keep} keeps more tokens than arrive from the position before "
                    f"it ({before[0]}={before[1]}); budgets never increase from one position to "
                    f"the next: lower llm.{i}.keep or give a keep_ratio"
                )
            before = (f"llm.{i}.keep", keep)

    @classmethod
    def from_config(
        cls, config: PipelineConfig | Mapping[str, Any], *, runtime: Runtime
    ) -> Pipeline:
        """Build a pipeline from a validated config (or a mapping, validated first).

        ``runtime.build_pipeline(config)`` and :func:`tokenprune.apply` call this for you.

        Args:
            config: The configuration.
            runtime: Runtime supplying the stage registry and the observers.
        """
        if not isinstance(config, PipelineConfig):
            config = runtime.parse_config(config)
        llm = [
            LlmStage(
                stage.layer,
                cls._single(stage, keep=stage.keep, keep_ratio=stage.keep_ratio, runtime=runtime),
            )
            for stage in config.llm
        ]
        if config.has_encoder_stage:
            pipeline = cls._single(
                config,
                keep=config.keep,
                keep_ratio=config.keep_ratio,
                positions=config.positions,
                follow_up=config.follow_up,
                runtime=runtime,
                llm=llm,
            )
        else:
            pipeline = cls.llm_only(llm, runtime=runtime)
            pipeline.positions = config.positions
            pipeline.follow_up = config.follow_up
        pipeline._check_encoder_position()
        pipeline.config = config
        return pipeline

    @classmethod
    def _single(
        cls, config: PipelineConfig | LlmStageConfig, *, runtime: Runtime, **options: Any
    ) -> Pipeline:
        stages: dict[str, Stage[Any]] = {}
        roles: tuple[Role, ...] = ("scorer", "selector", "merger")
        for role in roles:
            stage_config: StageConfig = getattr(config, role)
            stage_cls = runtime.stages.get(role, stage_config.name)
            stages[role] = stage_cls.from_config(stage_config, stages=runtime.stages)
        return cls(
            stages["scorer"],  # type: ignore[arg-type]
            stages["selector"],  # type: ignore[arg-type]
            stages["merger"],  # type: ignore[arg-type]
            runtime=runtime,
            **options,
        )

    @property
    def stages(self) -> tuple[Stage[Any], ...]:
        """The three stages of the encoder position in execution order (none without one)."""
        if not self.has_encoder_stage:
            return ()
        return (self.scorer, self.selector, self.merger)

    @property
    def requires(self) -> frozenset[Capability]:
        """Union of the capabilities the stages of every position require.

        A pipeline with LLM stages also requires ``llm_attention``: the adapter must be able to
        drop tokens inside the language model.
        """
        needed = frozenset().union(*(s.required_capabilities() for s in self.stages))
        for item in self.llm:
            needed |= item.pipeline.requires | {Capability.LLM_ATTENTION}
        return needed

    @property
    def llm_layers(self) -> tuple[int, ...]:
        """Decoder layers of the LLM stages, increasing."""
        return tuple(item.layer for item in self.llm)

    def vision_layers(self) -> frozenset[int]:
        """Vision blocks whose inputs the stages read."""
        return frozenset().union(*(s.vision_layers() for s in self.stages))

    def budget(self, num_tokens: int) -> int:
        """Tokens to keep for an image of ``num_tokens`` tokens (see :func:`resolve_budget`)."""
        return F.resolve_budget(num_tokens, keep=self.keep, keep_ratio=self.keep_ratio)

    def check_compatible(self, adapter: ModelAdapter | type[ModelAdapter]) -> None:
        """Fail now, not mid-forward, if the adapter lacks a capability a stage requires.

        Raises:
            CapabilityError: Naming the stage, the missing capability and, when the adapter
                knows one, an alternative.
            ConfigError: If an encoder stage needs what exists only inside the language model.
        """
        self._check_encoder_position()
        if self.llm and Capability.LLM_ATTENTION not in adapter.capabilities:
            hint = adapter.capability_hints.get(
                Capability.LLM_ATTENTION,
                "prune at the encoder position instead (top-level scorer, selector and budget)",
            )
            raise CapabilityError(
                f"the pipeline prunes inside the language model (LLM layers {self.llm_layers}), "
                f"which needs capability 'llm_attention'; adapter {adapter.name!r} does not "
                "provide it" + (f"; {hint}" if hint else "")
            )
        positioned = [(s, "") for s in self.stages]
        for item in self.llm:
            positioned += [(s, f" at LLM layer {item.layer}") for s in item.pipeline.stages]
        for stage, where in positioned:
            missing = stage.required_capabilities() - adapter.capabilities
            for capability in sorted(missing, key=lambda c: c.value):
                known = adapter.capability_hints.get(capability)
                raise CapabilityError(
                    f"{stage.role} {stage.name!r}{where} requires capability "
                    f"{capability.value!r}, which adapter {adapter.name!r} does not provide"
                    + (f"; {known}" if known else "")
                )
        if not isinstance(adapter, type):
            for stage, _ in positioned:
                stage.check_model(adapter)

    def __call__(self, ctx: PruneContext) -> PrunedTokens:
        """Run scorer, selector and merger on one context, checking every intermediate result.

        Raises:
            ShapeError: If a stage returns a result of the wrong shape or with NaN/Inf values.
        """
        b, n = ctx.visual.batch_size, ctx.visual.num_tokens
        F.check_features(ctx.visual.features, name="visual features")
        scores = self.scorer.score(ctx)
        maps = {"scores": scores} if isinstance(scores, torch.Tensor) else dict(scores)
        for key, value in maps.items():
            F.check_scores(value, batch=b, num_tokens=n, name=f"{self.scorer.name} {key}")
        selection = self.selector.select(scores, ctx)
        idx = selection.keep_idx
        if tuple(idx.shape) != (b, ctx.keep):
            raise ShapeError(
                f"selector {self.selector.name!r} kept {tuple(idx.shape)} tokens, expected "
                f"(B, K) = {(b, ctx.keep)}"
            )
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ShapeError(f"selector {self.selector.name!r} returned indices outside [0, {n})")
        pruned = self.merger.merge(ctx, selection)
        if pruned.num_kept != ctx.keep or pruned.features.shape[0] != b:
            raise ShapeError(
                f"merger {self.merger.name!r} returned {tuple(pruned.features.shape[:2])} tokens, "
                f"expected (B, K) = {(b, ctx.keep)}"
            )
        F.check_features(pruned.features, name=f"{self.merger.name} output")
        if self.runtime is not None:
            self.runtime.hook.tokenprune_after_prune(ctx=ctx, pruned=pruned, pipeline=self)
        return pruned

    def __repr__(self) -> str:
        llm = "".join(f", llm[{i.layer}]={i.pipeline!r}" for i in self.llm)
        if not self.has_encoder_stage:
            return f"Pipeline(encoder=None, positions={self.positions!r}{llm})"
        budget = f"keep={self.keep}" if self.keep is not None else f"keep_ratio={self.keep_ratio}"
        return (
            f"Pipeline({self.scorer!r}, {self.selector!r}, {self.merger!r}, {budget}, "
            f"positions={self.positions!r}{llm})"
        )
