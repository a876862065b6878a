"""Model adapters: the only code that knows model internals."""

from __future__ import annotations

from tokenprune.adapters._allocation import FeatureAllocation, allocate, weighted
from tokenprune.adapters.base import ModelAdapter, PruneHandle

__all__ = ["FeatureAllocation", "ModelAdapter", "PruneHandle", "allocate", "weighted"]
