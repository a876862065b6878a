"""Budget allocation: splitting one image's (or video's) token budget across its parts.

A LLaVA-NeXT image is several CLIP images (a base tile and grid tiles) and a Video-LLaVA video is
several frames, each pruned on its own with its own [CLS]. The budget, however, is set per image
or video (``pipeline.budget(N)`` with ``N`` the item's patch tokens), so it has to be split.

An *allocation rule* is a pure function ``allocate(counts, budget) -> shares`` where
``counts[i]`` is the number of candidate tokens of part ``i``. Every rule must return shares that
satisfy the allocation contract, which :func:`allocate` checks:

1. one share per part, ``0 <= shares[i] <= counts[i]``, and ``sum(shares) == budget``;
2. a part with no tokens gets nothing;
3. if ``budget`` is at least the number of non-empty parts, every non-empty part gets at least
   one token (no tile or frame vanishes while the budget could cover it).

Built-in rules (:data:`ALLOCATIONS`), both exact (rational arithmetic, no float rounding):

- ``proportional``: shares proportional to ``counts``, rounded by the largest-remainder
  (Hamilton) method, ties to the lower index; then the minimum-one fix-up of rule 3.
- ``uniform``: equal shares for the non-empty parts (a part never gets more than it has; the
  surplus is spread over the others), same rounding and fix-up.

Any callable with the same signature can be used instead, e.g. one that favours the base tile.

A rule that decides by *content* rather than by counts subclasses :class:`FeatureAllocation`:
the adapter then also hands it the candidate tokens of every part (``features[i]``, the
``(counts[i], D)`` rows of part ``i`` in the pruning space), and the same contract applies.
:func:`weighted` splits a budget by arbitrary positive weights with the rounding and fix-up of
the built-in rules, so such a rule only has to compute one weight per part. Both are exported
from :mod:`tokenprune.adapters` for plugins.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from types import MappingProxyType
from typing import ClassVar

import torch

from tokenprune.errors import AdapterError, BudgetError

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "AllocationRule",
    "FeatureAllocation",
    "allocate",
    "largest_remainder",
    "needs_features",
    "proportional",
    "resolve_allocation",
    "uniform",
    "weighted",
]

Allocation = Callable[[Sequence[int], int], list[int]]
"""``allocate(counts, budget) -> shares``: one share per part (see the module docstring)."""


class FeatureAllocation(ABC):
    """An allocation rule that also reads the candidate tokens of every part.

    Subclass it, set ``name`` and implement :meth:`__call__`; pass an instance wherever an
    adapter takes ``allocation=``. The adapter calls it with the parts' features (LLaVA-NeXT: the
    unpadded patch features of each tile; Video-LLaVA: the patch features of each frame, one
    call per video), and :func:`allocate` checks the result against the same contract as for
    count-based rules.

    Examples:
        >>> class MostVaried(FeatureAllocation):
        ...     name = "most_varied"
        ...
        ...     def __call__(self, counts, budget, features):
        ...         spread = [float(f.std()) + 1e-6 if len(f) > 1 else 1e-6 for f in features]
        ...         return weighted(counts, budget, spread)
        >>> flat = torch.zeros(4, 3)
        >>> busy = torch.arange(12.0).reshape(4, 3)
        >>> allocate([4, 4], 4, MostVaried(), features=[flat, busy])
        [1, 3]
    """

    name: ClassVar[str]

    @abstractmethod
    def __call__(
        self, counts: Sequence[int], budget: int, features: Sequence[torch.Tensor]
    ) -> list[int]:
        """Return the shares of ``budget`` per part.

        Args:
            counts: Candidate tokens per part.
            budget: Tokens to keep in total, ``0 <= budget <= sum(counts)``.
            features: Candidate token features of each part.

        Shape:
            - features[i]: ``(counts[i], D)``
        """


AllocationRule = Allocation | FeatureAllocation
"""What an adapter's ``allocation=`` accepts besides a name."""


def _check_request(counts: Sequence[int], budget: int) -> None:
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise BudgetError(f"token counts must be non-negative ints, got {list(counts)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= sum(counts):
        raise BudgetError(
            f"budget {budget!r} cannot be split over parts with {list(counts)} tokens; it must "
            f"be an int in [0, {sum(counts)}]"
        )


def largest_remainder(quotas: Sequence[Fraction], total: int) -> list[int]:
    """Round exact quotas that sum to ``total`` to integers with the same sum.

    Every quota is rounded down, then the missing units go to the largest fractional parts
    (ties to the lower index). Each result is ``floor(q)`` or ``floor(q) + 1``.

    Args:
        quotas: Non-negative exact quotas with ``sum(quotas) == total``.
        total: The integer total to reach.

    Returns:
        The rounded shares.

    Examples:
        >>> largest_remainder([Fraction(10, 3)] * 3, 10)
        [4, 3, 3]
        >>> largest_remainder([Fraction(5, 2), Fraction(3, 2)], 4)
        [3, 1]
    """
    floors = [int(q) for q in quotas]  # int() of a non-negative Fraction is its floor
    missing = total - sum(floors)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - floors[i]), i))
    for i in order[:missing]:
        floors[i] += 1
    return floors


def _capped_quotas(
    weights: Sequence[int | Fraction], caps: Sequence[int], total: int
) -> list[Fraction]:
    """Exact shares of ``total`` proportional to ``weights``, none above its cap (water-filling)."""
    quotas = [Fraction(0)] * len(weights)
    active = [i for i, (w, c) in enumerate(zip(weights, caps, strict=True)) if w > 0 and c > 0]
    remaining = Fraction(total)
    while active and remaining > 0:
        weight_sum = sum(weights[i] for i in active)
        capped = [i for i in active if remaining * weights[i] / weight_sum >= caps[i]]
        if not capped:
            for i in active:
                quotas[i] = remaining * weights[i] / weight_sum
            break
        for i in capped:
            quotas[i] = Fraction(caps[i])
            remaining -= caps[i]
            active.remove(i)
    return quotas


def _at_least_one(counts: Sequence[int], shares: list[int], budget: int) -> list[int]:
    """Rule 3: give one token to each empty-handed non-empty part, taken from the largest share."""
    nonempty = [i for i, c in enumerate(counts) if c > 0]
    if budget < len(nonempty):
        return shares
    for i in nonempty:
        if shares[i] == 0:
            donor = max(range(len(shares)), key=lambda j: (shares[j], -j))
            shares[donor] -= 1
            shares[i] = 1
    return shares


def proportional(counts: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` proportionally to the parts' token counts (largest remainder).

    Part ``i`` gets ``budget * counts[i] / sum(counts)`` rounded by :func:`largest_remainder`;
    then every non-empty part that got nothing takes one token from the largest share (ties to
    the lower index) when the budget allows.

    Args:
        counts: Candidate tokens per part.
        budget: Tokens to keep in total, ``0 <= budget <= sum(counts)``.

    Returns:
        Tokens to keep per part.

    Raises:
        BudgetError: If the counts or the budget are invalid.

    Examples:
        >>> proportional([16, 12, 12, 12, 12], 16)
        [4, 3, 3, 3, 3]
        >>> proportional([16, 16, 16], 10)
        [4, 3, 3]
        >>> proportional([100, 1], 2)  # the 1-token part still gets its token
        [1, 1]
        >>> proportional([4, 4], 1)  # budget below the number of parts
        [1, 0]
    """
    _check_request(counts, budget)
    shares = largest_remainder(_capped_quotas(counts, counts, budget), budget)
    return _at_least_one(counts, shares, budget)


def uniform(counts: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` equally over the non-empty parts (largest remainder, capped by counts).

    A part never gets more tokens than it has; what it cannot take is shared equally by the
    others. Earlier parts get the remainder first.

    Args:
        counts: Candidate tokens per part.
        budget: Tokens to keep in total, ``0 <= budget <= sum(counts)``.

    Returns:
        Tokens to keep per part.

    Raises:
        BudgetError: If the counts or the budget are invalid.

    Examples:
        >>> uniform([16, 16, 16, 16], 10)
        [3, 3, 2, 2]
        >>> uniform([2, 16, 16], 12)  # the 2-token part is full, the others share the rest
        [2, 5, 5]
        >>> uniform([0, 8, 8], 3)
        [0, 2, 1]
    """
    _check_request(counts, budget)
    weights = [1 if c > 0 else 0 for c in counts]
    shares = largest_remainder(_capped_quotas(weights, counts, budget), budget)
    return _at_least_one(counts, shares, budget)


def weighted(counts: Sequence[int], budget: int, weights: Sequence[float]) -> list[int]:
    """Split ``budget`` proportionally to ``weights``, never above a part's count.

    The building block of content-based rules (:class:`FeatureAllocation`): part ``i`` gets
    ``budget * weights[i] / sum(weights)``, computed exactly (each float weight is taken as the
    exact rational it stores); a part whose quota exceeds ``counts[i]`` is filled and the rest is
    split again over the others (water-filling). The quotas are rounded by
    :func:`largest_remainder`, then every non-empty part that got nothing takes one token from
    the largest share when the budget allows, as in :func:`proportional`.
    ``weighted(counts, budget, counts)`` equals ``proportional(counts, budget)``.

    Args:
        counts: Candidate tokens per part.
        budget: Tokens to keep in total, ``0 <= budget <= sum(counts)``.
        weights: One finite weight per part, ``> 0`` for every non-empty part (an empty part's
            weight is ignored).

    Returns:
        Tokens to keep per part.

    Raises:
        BudgetError: If the counts or the budget are invalid, or a weight is missing,
            non-finite, or not positive for a non-empty part.

    Examples:
        >>> weighted([16, 16, 16], 12, [1.0, 2.0, 1.0])
        [3, 6, 3]
        >>> weighted([2, 16], 10, [3.0, 1.0])  # the first part is full at 2
        [2, 8]
    """
    _check_request(counts, budget)
    if len(weights) != len(counts):
        raise BudgetError(f"expected {len(counts)} weights (one per part), got {len(weights)}")
    exact: list[Fraction | int] = []
    for i, (w, c) in enumerate(zip(weights, counts, strict=True)):
        if c == 0:
            exact.append(0)
            continue
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise BudgetError(
                f"weight {w!r} of part {i} (with {c} tokens) must be a finite number > 0; "
                "give every non-empty part a positive weight"
            )
        exact.append(Fraction(w))
    shares = largest_remainder(_capped_quotas(exact, counts, budget), budget)
    return _at_least_one(counts, shares, budget)


ALLOCATIONS: Mapping[str, Allocation] = MappingProxyType(
    {"proportional": proportional, "uniform": uniform}
)
"""Built-in allocation rules by name."""


def resolve_allocation(rule: str | AllocationRule) -> tuple[str, AllocationRule]:
    """Return ``(name, rule)`` for a rule given by name, as a callable or as a feature rule.

    Raises:
        AdapterError: If a name is not one of :data:`ALLOCATIONS`.

    Examples:
        >>> resolve_allocation("uniform")[0]
        'uniform'
    """
    if isinstance(rule, FeatureAllocation):
        return rule.name, rule
    if callable(rule):
        return getattr(rule, "__name__", repr(rule)), rule
    if rule not in ALLOCATIONS:
        raise AdapterError(
            f"unknown allocation rule {rule!r}; use one of {sorted(ALLOCATIONS)} or pass a "
            "function allocate(counts: list[int], budget: int) -> list[int] or a "
            "FeatureAllocation instance"
        )
    return rule, ALLOCATIONS[rule]


def needs_features(rule: str | AllocationRule) -> bool:
    """Whether ``rule`` reads the parts' features (so the adapter must gather them).

    Examples:
        >>> needs_features("uniform")
        False
    """
    return isinstance(rule, FeatureAllocation)


def allocate(
    counts: Sequence[int],
    budget: int,
    rule: str | AllocationRule,
    *,
    features: Sequence[torch.Tensor] | None = None,
) -> list[int]:
    """Apply an allocation rule and check its result against the allocation contract.

    Args:
        counts: Candidate tokens per part.
        budget: Tokens to keep in total.
        rule: A name from :data:`ALLOCATIONS`, an allocation function, or a
            :class:`FeatureAllocation`.
        features: Candidate token features of each part, ``(counts[i], D)``; required by a
            :class:`FeatureAllocation`, ignored by the other rules.

    Returns:
        Tokens to keep per part.

    Raises:
        BudgetError: If the counts or the budget are invalid.
        AdapterError: If the rule is unknown, a feature rule gets no or mismatched features,
            or its result breaks the contract (the message names the rule and the broken
            condition).

    Examples:
        >>> allocate([16, 12, 12], 10, "proportional")
        [4, 3, 3]
        >>> allocate([16, 16], 4, lambda counts, budget: [budget, 0])
        Traceback (most recent call last):
        ...
        tokenprune.errors.AdapterError: allocation rule '<lambda>' returned [4, 0] ... allows
    """
    _check_request(counts, budget)
    name, fn = resolve_allocation(rule)
    if isinstance(fn, FeatureAllocation):
        shapes = None if features is None else [tuple(f.shape) for f in features]
        if (
            features is None
            or len(features) != len(counts)
            or any(f.ndim != 2 or f.shape[0] != c for f, c in zip(features, counts, strict=True))
        ):
            raise AdapterError(
                f"allocation rule {name!r} reads the parts' features: it needs one "
                f"(count, D) tensor per part for counts {list(counts)}, got {shapes}"
            )
        shares = list(fn(list(counts), budget, list(features)))
    else:
        shares = list(fn(list(counts), budget))
    problem = None
    if len(shares) != len(counts):
        problem = f"expected {len(counts)} shares"
    elif any(isinstance(s, bool) or not isinstance(s, int) for s in shares):
        problem = "shares must be ints"
    elif sum(shares) != budget:
        problem = f"shares must sum to the budget {budget}"
    elif any(not 0 <= s <= c for s, c in zip(shares, counts, strict=True)):
        problem = "each share must lie in [0, count]"
    elif budget >= sum(c > 0 for c in counts) and any(
        c > 0 and s == 0 for s, c in zip(shares, counts, strict=True)
    ):
        problem = "every non-empty part must get at least one token when the budget allows"
    if problem is not None:
        raise AdapterError(
            f"allocation rule {name!r} returned {shares} for counts {list(counts)} and budget "
            f"{budget}: {problem}"
        )
    return shares
