"""Pipeline stages: the Scorer, Selector and Merger base classes and the built-in baselines."""

from __future__ import annotations

from tokenprune.stages.base import Merger, Scorer, Scores, Selector, Stage, StageConfig

__all__ = ["Merger", "Scorer", "Scores", "Selector", "Stage", "StageConfig"]
