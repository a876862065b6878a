r"""The ``information`` allocation rule: tile and frame budgets by information content.

LLaVA-NeXT prunes each tile of an image, and Video-LLaVA each frame of a video, on its own; the
adapter splits the item's budget over its parts with an allocation rule
(:mod:`tokenprune.adapters`). The built-in rules look only at the token counts.
:class:`InformationAllocation` also looks at the tokens: part :math:`i` with :math:`n_i`
candidate tokens of diversity :math:`D_i` (:func:`~tokenprune_dynamic.functional.feature_diversity`)
gets a share of the budget proportional to

.. math:: w_i = n_i \cdot \max(D_i, \varepsilon)

(the ``floor`` :math:`\varepsilon > 0` keeps a blank part from weighing nothing), rounded with
:func:`tokenprune.adapters.weighted`: exact quotas, none above :math:`n_i`, largest remainder,
and at least one token per non-empty part when the budget allows. Equal diversities give the
built-in ``proportional`` split.

A rule is not part of a pipeline configuration: pass it to the adapter when you build it::

    from tokenprune.adapters.llava_next import LlavaNextAdapter
    from tokenprune_dynamic import InformationAllocation

    with LlavaNextAdapter(model, allocation=InformationAllocation()).install(pipeline):
        out = model.generate(**inputs, tokenprune_query=questions)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenprune import ConfigError
from tokenprune.adapters import FeatureAllocation, weighted
from tokenprune_dynamic import functional as F

__all__ = ["InformationAllocation"]


@dataclass(frozen=True)
class InformationAllocation(FeatureAllocation):
    """Split an item's budget over its tiles or frames by ``count * diversity``.

    Args:
        floor: Smallest diversity a non-empty part counts with, in ``(0, 1]``.

    Raises:
        ConfigError: If ``floor`` is outside ``(0, 1]``.

    Examples:
        >>> import torch
        >>> from tokenprune.adapters import allocate
        >>> blank = torch.ones(16, 8)  # one direction: diversity 0, counts as the floor 0.05
        >>> busy = torch.eye(16, 8)  # eight orthogonal directions (and eight zero rows)
        >>> allocate([16, 16], 8, InformationAllocation(), features=[blank, busy])
        [1, 7]
        >>> allocate([16, 16], 8, InformationAllocation(), features=[busy, busy])
        [4, 4]
    """

    name: ClassVar[str] = "information"
    floor: float = 0.05

    def __post_init__(self) -> None:
        if not (isinstance(self.floor, int | float) and math.isfinite(self.floor)) or not (
            0.0 < self.floor <= 1.0
        ):
            raise ConfigError(
                f"InformationAllocation: floor must be in (0, 1], got {self.floor!r}; it is the "
                "smallest diversity a tile or frame counts with (default 0.05)"
            )

    def weights(self, features: Sequence[torch.Tensor]) -> list[float]:
        r"""The weight :math:`n_i \max(D_i, \varepsilon)` of every part (0 for an empty part)."""
        return [
            len(f) * max(float(F.feature_diversity(f)), self.floor) if len(f) else 0.0
            for f in features
        ]

    def __call__(
        self, counts: Sequence[int], budget: int, features: Sequence[torch.Tensor]
    ) -> list[int]:
        return weighted(counts, budget, self.weights(features))
