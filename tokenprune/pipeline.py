"""The Scorer -> Selector -> Merger pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from tokenprune import functional as F
from tokenprune.capabilities import Capability
from tokenprune.config import FollowUpPolicy, PipelineConfig, PositionPolicy
from tokenprune.context import PruneContext
from tokenprune.errors import CapabilityError, ShapeError
from tokenprune.stages.base import Merger, Scorer, Selector, Stage
from tokenprune.stages.mergers.drop import DropMerger
from tokenprune.types import PrunedTokens

if TYPE_CHECKING:
    from tokenprune.adapters.base import ModelAdapter
    from tokenprune.plugin.manager import Runtime

__all__ = ["Pipeline"]


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
        stages: dict[str, Stage[Any]] = {}
        for role in ("scorer", "selector", "merger"):
            stage_config = getattr(config, role)
            stage_cls = runtime.stages.get(role, stage_config.name)
            stages[role] = stage_cls.from_config(stage_config, stages=runtime.stages)
        pipeline = cls(
            stages["scorer"],  # type: ignore[arg-type]
            stages["selector"],  # type: ignore[arg-type]
            stages["merger"],  # type: ignore[arg-type]
            keep=config.keep,
            keep_ratio=config.keep_ratio,
            positions=config.positions,
            follow_up=config.follow_up,
            runtime=runtime,
        )
        pipeline.config = config
        return pipeline

    @property
    def stages(self) -> tuple[Stage[Any], ...]:
        """The three stages in execution order."""
        return (self.scorer, self.selector, self.merger)

    @property
    def requires(self) -> frozenset[Capability]:
        """Union of the capabilities the stages require."""
        return frozenset().union(*(s.required_capabilities() for s in self.stages))

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
        """
        for stage in self.stages:
            missing = stage.required_capabilities() - adapter.capabilities
            for capability in sorted(missing, key=lambda c: c.value):
                hint = adapter.capability_hints.get(capability)
                raise CapabilityError(
                    f"{stage.role} {stage.name!r} requires capability {capability.value!r}, "
                    f"which adapter {adapter.name!r} does not provide"
                    + (f"; {hint}" if hint else "")
                )
        if not isinstance(adapter, type):
            for stage in self.stages:
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
        budget = f"keep={self.keep}" if self.keep is not None else f"keep_ratio={self.keep_ratio}"
        return (
            f"Pipeline({self.scorer!r}, {self.selector!r}, {self.merger!r}, {budget}, "
            f"positions={self.positions!r})"
        )
