"""Naive reference implementations of the DeSAP equations, for tests only.

Written directly from the equations in ``docs/desap.md`` with explicit Python loops over samples,
heads and tokens, in float64, and deliberately sharing no code with
``tokenprune_desap.functional``. They are slow and only meant for tiny inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Projection = Callable[[Tensor], Tensor]


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _dot(a: Tensor, b: Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a.tolist(), b.tolist(), strict=True))


def _unit(a: Tensor) -> Tensor:
    a = a.double()
    norm = math.sqrt(_dot(a, a))
    return a / norm if norm > 0 else a


def decoupled_attention(
    hidden: Tensor,
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    out_proj: Projection,
    num_heads: int,
    encoding: str = "qq",
) -> Tensor:
    """Eq. 2, one sample, one head, one query row at a time."""
    outputs = []
    for b in range(hidden.shape[0]):
        x = hidden[b : b + 1]
        proj = {"q": q_proj(x)[0], "k": k_proj(x)[0], "v": v_proj(x)[0]}
        xa, xb, v = proj[encoding[0]].double(), proj[encoding[1]].double(), proj["v"].double()
        tokens = x.shape[1]
        d = xa.shape[1] // num_heads
        dv = v.shape[1] // num_heads
        context = torch.zeros(tokens, dv * num_heads, dtype=torch.float64)
        for h in range(num_heads):
            for i in range(tokens):
                logits = [
                    _dot(xa[i, h * d : (h + 1) * d], xb[j, h * d : (h + 1) * d]) / math.sqrt(d)
                    for j in range(tokens)
                ]
                weights = _softmax(logits)
                for j in range(tokens):
                    context[i, h * dv : (h + 1) * dv] += weights[j] * v[j, h * dv : (h + 1) * dv]
        outputs.append(out_proj(context[None].to(proj["v"].dtype))[0])
    return torch.stack(outputs)


def _attention_row(q: Tensor, keys: Tensor, h: int, d: int) -> list[float]:
    logits = [_dot(q[h * d : (h + 1) * d], keys[j, h * d : (h + 1) * d]) for j in range(len(keys))]
    return _softmax([value / math.sqrt(d) for value in logits])


def cls_attention(
    hidden: Tensor,
    q_proj: Projection,
    k_proj: Projection,
    num_heads: int,
    num_prefix_tokens: int = 1,
) -> Tensor:
    """Eq. 4: mean over heads of the [CLS] attention row, patch columns only."""
    rows = []
    for b in range(hidden.shape[0]):
        x = hidden[b : b + 1]
        q, k = q_proj(x)[0].double(), k_proj(x)[0].double()
        d = q.shape[1] // num_heads
        total = [0.0] * x.shape[1]
        for h in range(num_heads):
            for j, p in enumerate(_attention_row(q[0], k, h, d)):
                total[j] += p / num_heads
        rows.append(total[num_prefix_tokens:])
    return torch.tensor(rows, dtype=torch.float64)


def mean_received_attention(
    hidden: Tensor,
    q_proj: Projection,
    k_proj: Projection,
    num_heads: int,
    num_prefix_tokens: int = 0,
) -> Tensor:
    """Column mean over all queries of the head-averaged attention map."""
    rows = []
    for b in range(hidden.shape[0]):
        x = hidden[b : b + 1]
        q, k = q_proj(x)[0].double(), k_proj(x)[0].double()
        tokens = x.shape[1]
        d = q.shape[1] // num_heads
        total = [0.0] * tokens
        for h in range(num_heads):
            for i in range(tokens):
                for j, p in enumerate(_attention_row(q[i], k, h, d)):
                    total[j] += p / (num_heads * tokens)
        rows.append(total[num_prefix_tokens:])
    return torch.tensor(rows, dtype=torch.float64)


def fcma_relevance(
    visual: Tensor,
    visual_global: Tensor,
    text: Tensor,
    text_mask: Tensor,
    text_global: Tensor,
    lam: float = 0.1,
    align: bool = True,
) -> Tensor:
    """Eq. 3 (spec §3.4) per sample, dropping padded text tokens up front."""
    rows = []
    for b in range(visual.shape[0]):
        vis = [_unit(visual[b, i]) for i in range(visual.shape[1])]
        txt = [_unit(text[b, j]) for j in range(text.shape[1]) if bool(text_mask[b, j])]
        v_s, q_t = _unit(visual_global[b]), _unit(text_global[b])
        d1, d2 = len(vis), len(txt)
        m = [[_dot(vis[i], txt[j]) for j in range(d2)] for i in range(d1)]
        if not align:
            rows.append([sum(m[i]) / d2 for i in range(d1)])
            continue
        alpha = [_dot(vis[i], q_t) for i in range(d1)]
        beta = [_dot(txt[j], v_s) for j in range(d2)]
        row = []
        for i in range(d1):
            total = 0.0
            for j in range(d2):
                den_v = sum(math.exp(lam * beta[k] * m[i][k]) for k in range(d2))
                mv = alpha[i] * math.exp(lam * beta[j] * m[i][j]) / (d1 * den_v)
                den_t = sum(math.exp(lam * alpha[k] * m[k][j]) for k in range(d1))
                mt = beta[j] * math.exp(lam * alpha[i] * m[i][j]) / (d2 * den_t)
                total += (mv + mt) * m[i][j]
            row.append(total / d2)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def _ranked(scores: list[float], candidates: list[int]) -> list[int]:
    """Candidates by descending score, ties by ascending index."""
    return sorted(candidates, key=lambda i: (-scores[i], i))


def joint_rank_select(
    task_scores: Tensor, saliency_scores: Tensor, k: int, task_fraction: float = 0.5
) -> Tensor:
    """Eq. 5: k1 = round-half-up(k * fraction) by task, the rest by saliency, sorted."""
    k1 = math.floor(k * task_fraction + 0.5)
    rows = []
    for b in range(task_scores.shape[0]):
        task, saliency = task_scores[b].tolist(), saliency_scores[b].tolist()
        everything = list(range(len(task)))
        chosen = _ranked(task, everything)[:k1]
        rest = [i for i in everything if i not in chosen]
        chosen += _ranked(saliency, rest)[: k - k1]
        rows.append(sorted(chosen))
    return torch.tensor(rows, dtype=torch.long)


def merge_clusters(similarity_features: Tensor, keep_idx: Tensor) -> list[dict[int, list[int]]]:
    """Per sample: kept index -> members (itself first, then assigned dropped tokens)."""
    result = []
    for b in range(similarity_features.shape[0]):
        kept = sorted(int(i) for i in keep_idx[b])
        clusters = {c: [c] for c in kept}
        for u in range(similarity_features.shape[1]):
            if u in clusters:
                continue
            z_u = _unit(similarity_features[b, u])
            best, best_sim = kept[0], -math.inf
            for c in kept:  # ascending index: a strict ">" keeps the lowest on ties
                sim = _dot(z_u, _unit(similarity_features[b, c]))
                if sim > best_sim:
                    best, best_sim = c, sim
            clusters[best].append(u)
        result.append(clusters)
    return result


def nearest_merge(
    features: Tensor,
    keep_idx: Tensor,
    similarity_features: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Spec §3.7: (weighted) mean of each kept token and the dropped tokens nearest to it."""
    sim = features if similarity_features is None else similarity_features
    all_clusters = merge_clusters(sim, keep_idx)
    merged_rows, size_rows = [], []
    for b, clusters in enumerate(all_clusters):
        merged, sizes = [], []
        for c in (int(i) for i in keep_idx[b]):
            total = torch.zeros(features.shape[2], dtype=torch.float64)
            size = 0.0
            for u in clusters[c]:
                w = 1.0 if weights is None else float(weights[b, u])
                total += w * features[b, u].double()
                size += w
            merged.append(total / size)
            sizes.append(size)
        merged_rows.append(torch.stack(merged))
        size_rows.append(sizes)
    return torch.stack(merged_rows), torch.tensor(size_rows, dtype=torch.float64)


def text_filter_mask(
    eos_attention: Tensor, text_mask: Tensor, eos_index: Tensor, top_n: int = 30
) -> Tensor:
    """Keep [EOS] plus the top_n valid non-[EOS] tokens by [EOS] attention."""
    rows = []
    for b in range(eos_attention.shape[0]):
        eos = int(eos_index[b])
        scores = eos_attention[b].tolist()
        others = [j for j in range(len(scores)) if bool(text_mask[b, j]) and j != eos]
        keep = {eos, *_ranked(scores, others)[:top_n]}
        rows.append([j in keep for j in range(len(scores))])
    return torch.tensor(rows, dtype=torch.bool)
