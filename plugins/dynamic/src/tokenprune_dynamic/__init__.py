"""Dynamic ratio allocation for DeSAP, as a tokenprune plugin.

DeSAP (``tokenprune-desap``) fills a fixed share of the token budget by task relevance and the
rest by visual saliency, and lets the adapter split an image's budget over its tiles (or a
video's over its frames) by token counts. This package makes both decisions per sample:

- the ``desap_dynamic`` selector (:class:`DesapDynamicSelector`) sets the task share from the
  strength of the text cue, the peakedness of DeSAP's task-relevance map;
- the ``information`` allocation rule (:class:`InformationAllocation`) splits the budget over
  tiles or frames by their number of tokens times their feature diversity.

The pure-tensor core is :mod:`tokenprune_dynamic.functional`. The package is the worked example
of the how-to page "Add a new strategy as a plugin".
"""

from __future__ import annotations

from tokenprune_dynamic.allocation import InformationAllocation
from tokenprune_dynamic.selector import (
    TASK_FRACTIONS,
    TEXT_CUE_STRENGTH,
    DesapDynamicSelector,
    DesapDynamicSelectorConfig,
)

__all__ = [
    "TASK_FRACTIONS",
    "TEXT_CUE_STRENGTH",
    "DesapDynamicSelector",
    "DesapDynamicSelectorConfig",
    "InformationAllocation",
]
