"""Naive per-sample reference implementations of the pruning methods.

Written as directly as the papers and official code describe them: one image at a time, Python
loops over tokens, plain lists and sets. The vectorised functional core is tested against these
on random float64 inputs. Each function takes one image (2-D tensors) unless noted.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na = max(float(a.norm()), 1e-12)
    nb = max(float(b.norm()), 1e-12)
    return float(a @ b) / (na * nb)


def argmax_first(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def ranked(scores: torch.Tensor) -> list[int]:
    """Indices by descending score, ties to the lower index."""
    s = scores.tolist()
    return sorted(range(len(s)), key=lambda i: (-s[i], i))


# -- cluster mean / nearest ----------------------------------------------------------------------


def cluster_mean(
    x: torch.Tensor, assignment: list[int], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(k, x.shape[1], dtype=x.dtype)
    size = torch.zeros(k, dtype=x.dtype)
    for c in range(k):
        members = [j for j, a in enumerate(assignment) if a == c]
        if members:
            out[c] = sum(x[j] for j in members) / len(members)
            size[c] = len(members)
    return out, size


def nearest_assignment(metric: torch.Tensor, keep: list[int]) -> list[int]:
    result = []
    for j in range(metric.shape[0]):
        if j in keep:
            result.append(keep.index(j))
        else:
            result.append(argmax_first([cos(metric[j], metric[i]) for i in keep]))
    return result


# -- VisionZip -----------------------------------------------------------------------------------


def visionzip_select(scores: torch.Tensor, k: int, contextual: int) -> tuple[list[int], set[int]]:
    order = ranked(scores)
    dominant = order[: k - contextual]
    rest = sorted(order[k - contextual :])
    targets: list[int] = []
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = [rest[p] for p in range(0, len(rest), step)][:contextual]
    return sorted(dominant + targets), set(dominant)


def visionzip_merge(
    x: torch.Tensor, metric: torch.Tensor, keep: list[int], dominant: set[int], mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    targets = [i for i in keep if i not in dominant]
    members: dict[int, list[int]] = {t: [] for t in targets}
    if targets:
        for j in range(x.shape[0]):
            if j in keep:
                continue
            best = targets[argmax_first([cos(metric[j], metric[t]) for t in targets])]
            members[best].append(j)
    out, weight = [], []
    for i in keep:
        if i in dominant:
            out.append(x[i])
            weight.append(1.0)
            continue
        group = members[i]
        total = sum((x[j] for j in group), torch.zeros_like(x[i]))
        if mode == "add":
            out.append(x[i] + (total / len(group) if group else 0.0))
        else:
            out.append((x[i] + total) / (1 + len(group)))
        weight.append(1.0 + len(group))
    return torch.stack(out), torch.tensor(weight, dtype=x.dtype)


# -- PruMerge ------------------------------------------------------------------------------------


def iqr_outliers(scores: torch.Tensor) -> set[int]:
    a = scores.double().numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return {i for i, v in enumerate(a) if v > q3 + 1.5 * (q3 - q1)}


def prumerge_adaptive(scores: torch.Tensor, plus: bool) -> int:
    outliers = iqr_outliers(scores)
    if not plus:
        return len(outliers)
    n = scores.shape[0]
    step_length = n // max(len(outliers), 1)
    step = max(1, step_length // 3)
    uniform = [u for u in range(0, n - 1, step) if u not in outliers]
    return len(outliers) + len(uniform)


def prumerge_select(scores: torch.Tensor, k: int, plus: bool) -> list[int]:
    order = ranked(scores)
    if not plus:
        return sorted(order[:k])
    outliers = iqr_outliers(scores)
    taken = [i for i in order if i in outliers][:k]
    others = [i for i in range(scores.shape[0]) if i not in taken]
    spare = k - len(taken)
    fill = [others[math.floor(i * len(others) / spare)] for i in range(spare)]
    return sorted(taken + fill)


def prumerge_merge(
    x: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, keep: list[int], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    out, weight = [], []
    for i in keep:
        others = [j for j in range(n) if j != i]
        sims = {j: cos(keys[i], keys[j]) for j in others}
        near = sorted(others, key=lambda j: (-sims[j], j))[: min(k, n - 1)]
        out.append(x[i] + sum((attention[j] * x[j] for j in near), torch.zeros_like(x[i])))
        weight.append(1.0 + sum(float(attention[j]) for j in near))
    return torch.stack(out), torch.tensor(weight, dtype=x.dtype)


# -- DivPrune ------------------------------------------------------------------------------------


def divprune_select(f: torch.Tensor, k: int) -> list[int]:
    n = f.shape[0]
    dist = [[1.0 - cos(f[i], f[j]) for j in range(n)] for i in range(n)]
    isolation = [min((dist[i][j] for j in range(n) if j != i), default=0.0) for i in range(n)]
    chosen = [argmax_first(isolation)]
    while len(chosen) < k:
        best, best_value = -1, -math.inf
        for i in range(n):
            if i in chosen:
                continue
            value = min(dist[s][i] for s in chosen)
            if value > best_value:
                best, best_value = i, value
        chosen.append(best)
    return sorted(chosen)


# -- ToMe ----------------------------------------------------------------------------------------


def tome_partition(metric: torch.Tensor, k: int, r: int | None) -> tuple[list[int], list[int]]:
    # Each current token: [representative, metric, size, members].
    tokens = [[i, metric[i].clone(), 1.0, [i]] for i in range(metric.shape[0])]
    while len(tokens) > k:
        n = len(tokens)
        merged = min(n - k, n // 2, r if r is not None else n)
        a_side, b_side = tokens[0::2], tokens[1::2]
        matches = []
        for a in a_side:
            sims = [cos(a[1], b[1]) for b in b_side]
            best = argmax_first(sims)
            matches.append((best, sims[best]))
        edges = sorted(range(len(a_side)), key=lambda i: (-matches[i][1], i))[:merged]
        for b_index, b in enumerate(b_side):
            srcs = [a_side[i] for i in edges if matches[i][0] == b_index]
            if not srcs:
                continue
            total = b[2] + sum(a[2] for a in srcs)
            b[1] = (b[2] * b[1] + sum(a[2] * a[1] for a in srcs)) / total
            b[2] = total
            b[3] = b[3] + [m for a in srcs for m in a[3]]
        removed = {id(a_side[i]) for i in edges}
        tokens = [t for t in tokens if id(t) not in removed]
    keep = [t[0] for t in tokens]
    assignment = [0] * metric.shape[0]
    for g, t in enumerate(tokens):
        for m in t[3]:
            assignment[m] = g
    return keep, assignment


# -- pooling -------------------------------------------------------------------------------------


def pool_shape(h: int, w: int, k: int) -> tuple[int, int]:
    options = []
    for p in range(1, k + 1):
        q = k // p
        if p * q == k and p <= h and q <= w:
            ratio = Fraction(p * w, q * h)
            options.append(((max(ratio, 1 / ratio), h % p != 0 or w % q != 0, -p), (p, q)))
    if not options:
        raise ValueError("no shape")
    return min(options)[1]


def _windows(size: int, parts: int) -> list[range]:
    starts = [math.ceil(i * size / parts) for i in range(parts)] + [size]
    return [range(starts[i], starts[i + 1]) for i in range(parts)]


def pool_windows(h: int, w: int, k: int) -> tuple[list[int], list[int]]:
    p, q = pool_shape(h, w, k)
    rows, cols = _windows(h, p), _windows(w, q)
    keep, assignment = [], [0] * (h * w)
    for i, rr in enumerate(rows):
        for j, cc in enumerate(cols):
            keep.append(rr[(len(rr) - 1) // 2] * w + cc[(len(cc) - 1) // 2])
            for r in rr:
                for c in cc:
                    assignment[r * w + c] = i * q + j
    return keep, assignment


def spatial_nearest(h: int, w: int, keep: list[int]) -> list[int]:
    result = []
    for cell in range(h * w):
        r, c = divmod(cell, w)
        dists = [(r - kk // w) ** 2 + (c - kk % w) ** 2 for kk in keep]
        result.append(dists.index(min(dists)))
    return result


# -- score fusion --------------------------------------------------------------------------------


def normalize(scores: list[float], method: str) -> list[float]:
    n = len(scores)
    if method == "rank":
        if n < 2:
            return [0.5] * n
        out = []
        for s in scores:
            below = sum(1 for t in scores if t < s)
            equal = sum(1 for t in scores if t == s)
            out.append((below + (equal - 1) / 2) / (n - 1))
        return out
    if method == "zscore":
        mean = sum(scores) / n
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / n)
        return [(s - mean) / std if std > 0 else 0.0 for s in scores]
    low, high = min(scores), max(scores)
    return [(s - low) / (high - low) if high > low else 0.0 for s in scores]
