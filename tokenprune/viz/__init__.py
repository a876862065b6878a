"""Visualisations of token selections (pure drawing; no model code).

:mod:`tokenprune.viz.overlay` draws kept / dropped / merged patches on an image from a patch
grid and kept indices. The ``tokenprune viz`` command captures those indices with an observer
plugin (:class:`tokenprune.eval.runner.PruneRecorder`) and draws them with these functions.
"""

from __future__ import annotations

from tokenprune.viz.overlay import (
    Panel,
    keep_mask,
    overlay_selection,
    panel_grid_size,
    render_panels,
    save_panels,
)

__all__ = [
    "Panel",
    "keep_mask",
    "overlay_selection",
    "panel_grid_size",
    "render_panels",
    "save_panels",
]
