"""Naive reference implementations of dynamic ratio allocation, for tests only.

Written from the formulas on ``docs/methods/dynamic.md`` with explicit Python loops over samples,
tokens and pairs, in float64 Python arithmetic, sharing no code with
``tokenprune_dynamic.functional`` or DeSAP's functional core. Slow; tiny inputs only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def text_cue_strength(relevance: Tensor, temperature: float) -> list[float]:
    out = []
    for row in relevance.double().tolist():
        n = len(row)
        mean = sum(row) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / n)
        if n == 1 or std == 0:
            out.append(0.0)
            continue
        logits = [(r - mean) / std / temperature for r in row]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        total = sum(exps)
        entropy = -sum((e / total) * math.log(e / total) for e in exps if e > 0)
        out.append(min(max(1.0 - entropy / math.log(n), 0.0), 1.0))
    return out


def task_fraction(s: float, a_min: float, a_max: float, lo: float, hi: float) -> float:
    if s <= lo:
        return a_min
    if s >= hi:
        return a_max
    return a_min + (a_max - a_min) * (s - lo) / (hi - lo)


def joint_select(task: Sequence[float], saliency: Sequence[float], k: int, k1: int) -> list[int]:
    """Eq. 5 for one sample: top-k1 by task, then top-(k - k1) by saliency among the rest."""
    n = len(task)
    by_task = sorted(range(n), key=lambda i: (-task[i], i))
    chosen = by_task[:k1]
    rest = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-saliency[i], i))
    return sorted(chosen + rest[: k - k1])


def dynamic_select(
    task: Tensor,
    saliency: Tensor,
    k: int,
    a_min: float,
    a_max: float,
    lo: float,
    hi: float,
    temperature: float,
) -> tuple[list[list[int]], list[float], list[int]]:
    """The whole selector, one sample at a time: kept indices, task shares, task budgets."""
    strengths = text_cue_strength(task, temperature)
    kept, shares, budgets = [], [], []
    for b, s in enumerate(strengths):
        alpha = task_fraction(s, a_min, a_max, lo, hi)
        k1 = min(max(math.floor(k * alpha + 0.5), 0), k)
        kept.append(joint_select(task[b].tolist(), saliency[b].tolist(), k, k1))
        shares.append(alpha)
        budgets.append(k1)
    return kept, shares, budgets


def feature_diversity(features: Tensor) -> float:
    """Mean of 1 - cos(x_i, x_j) over all n^2 ordered pairs (a zero row: cosine 0)."""
    rows = features.double().tolist()
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    n = len(rows)
    total = 0.0
    for i in range(n):
        for j in range(n):
            if norms[i] == 0 or norms[j] == 0:
                cos = 0.0
            else:
                cos = sum(a * b for a, b in zip(rows[i], rows[j], strict=True)) / (
                    norms[i] * norms[j]
                )
            total += 1.0 - cos
    return total / (n * n)


def information_shares(counts: Sequence[int], budget: int, weights: Sequence[float]) -> list[int]:
    """Hamilton apportionment of ``budget`` by ``weights`` with caps and the minimum-one rule."""
    from fractions import Fraction

    quotas = [Fraction(0)] * len(counts)
    active = [i for i, c in enumerate(counts) if c > 0]
    remaining = Fraction(budget)
    while active and remaining > 0:
        total = sum(Fraction(weights[i]) for i in active)
        over = [i for i in active if remaining * Fraction(weights[i]) / total >= counts[i]]
        if not over:
            for i in active:
                quotas[i] = remaining * Fraction(weights[i]) / total
            break
        for i in over:
            quotas[i] = Fraction(counts[i])
            remaining -= counts[i]
            active.remove(i)
    shares = [math.floor(q) for q in quotas]
    for i in sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - shares[i]), i))[
        : budget - sum(shares)
    ]:
        shares[i] += 1
    nonempty = [i for i, c in enumerate(counts) if c > 0]
    if budget >= len(nonempty):
        for i in nonempty:
            if shares[i] == 0:
                donor = max(range(len(shares)), key=lambda j: (shares[j], -j))
                shares[donor] -= 1
                shares[i] = 1
    return shares


def random_scores(batch: int, n: int, seed: int, *, ties: bool = False) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(0, 3, (batch, n), generator=g).double()
    return torch.randn(batch, n, generator=g, dtype=torch.float64)
