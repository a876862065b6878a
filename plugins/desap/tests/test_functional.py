"""Tests for tokenprune_desap.functional: hand-computed cases, naive references, properties."""

from __future__ import annotations

import doctest
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

from tokenprune_desap import functional as F
from tokenprune_desap.functional import (
    cls_attention,
    decoupled_attention,
    fcma_relevance,
    joint_rank_branches,
    joint_rank_select,
    l2_normalize,
    mean_received_attention,
    nearest_merge,
    split_budget,
    text_filter_mask,
)


def _load_reference() -> ModuleType:
    """Import the sibling ``_reference.py`` (works with pytest's importlib and prepend modes)."""
    name = "tokenprune_desap_tests_reference"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("_reference.py")
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ref = _load_reference()

ENCODINGS = ("qq", "qk", "vv", "kk")
BATCH_SIZES = (1, 2, 3, 4)
TEXT_LENGTHS = (5, 2, 4, 1)  # valid text tokens of samples 0..3 (padded to 6)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def scale(factor: float) -> F.Projection:
    return lambda x: factor * x


def identity(x: Tensor) -> Tensor:
    return x


def close(actual: Tensor, expected: Tensor, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected|, compared in float64.

    (``torch.testing.assert_close`` would import ``torch.distributed`` on first use: seconds.)
    """
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    if not bool(torch.isclose(a, e, rtol=rtol, atol=atol).all()):
        worst = float((a - e).abs().max())
        pytest.fail(f"not close (max abs diff {worst:.3g}):\n{actual}\nexpected:\n{expected}")


def tensor(values: object, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.tensor(values, dtype=dtype)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def block(width: int = 8, seed: int = 0) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    q, k, v, o = (nn.Linear(width, width) for _ in range(4))
    return q, k, v, o


def text_batch(
    batch: int, tokens: int = 6, width: int = 5, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """visual (B, 7, E), v_s, text (B, 6, E) with NaN padding, mask, q_t."""
    g = generator(seed)
    visual = torch.randn(batch, 7, width, generator=g)
    v_s = torch.randn(batch, width, generator=g)
    text = torch.randn(batch, tokens, width, generator=g)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    for b in range(batch):
        mask[b, : TEXT_LENGTHS[b]] = True
    text = text.masked_fill(~mask[..., None], float("nan"))  # padding must never leak in
    q_t = torch.randn(batch, width, generator=g)
    return visual, v_s, text, mask, q_t


# --------------------------------------------------------------------------------------------
# Eq. 2: decoupled attention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [
        # Tokens x = (0.5, 1), width 1, one head; q = 2x = (1, 2), k = 3x = (1.5, 3), v = x.
        # Logits l_ij = a_i b_j, so out_i = 0.5 + 0.5 * sigmoid(l_i1 - l_i0).
        ("qq", [0.5 + 0.5 * sigmoid(1.0), 0.5 + 0.5 * sigmoid(2.0)]),  # a = b = (1, 2)
        ("qk", [0.5 + 0.5 * sigmoid(1.5), 0.5 + 0.5 * sigmoid(3.0)]),  # a = (1, 2), b = (1.5, 3)
        ("kk", [0.5 + 0.5 * sigmoid(2.25), 0.5 + 0.5 * sigmoid(4.5)]),  # a = b = (1.5, 3)
        ("vv", [0.5 + 0.5 * sigmoid(0.25), 0.5 + 0.5 * sigmoid(0.5)]),  # a = b = (0.5, 1)
    ],
)
def test_decoupled_attention_by_hand(encoding: F.AttentionEncoding, expected: list[float]) -> None:
    hidden = tensor([[[0.5], [1.0]]])
    out = decoupled_attention(hidden, scale(2.0), scale(3.0), identity, identity, 1, encoding)
    close(out, tensor([[[expected[0]], [expected[1]]]]))


def test_decoupled_attention_by_hand_scaled_two_heads() -> None:
    # Orthogonal unit tokens, width 2, one head: logits I / sqrt(2), out_0 = p e0 + (1 - p) e1.
    hidden = tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = sigmoid(1 / math.sqrt(2))
    out = decoupled_attention(hidden, identity, identity, identity, identity, num_heads=1)
    close(out, tensor([[[p, 1 - p], [1 - p, p]]]))
    # Two heads of width 1 (d = 1, unscaled): head 0 sees channel values (1, 0), head 1 (0, 1).
    # Head 0: row 0 logits (1, 0) -> weight s on token 0; row 1 logits (0, 0) -> uniform.
    # Head 1 mirrors it. Each head's output channel is its weighted value.
    out = decoupled_attention(hidden, identity, identity, identity, identity, num_heads=2)
    s = sigmoid(1.0)
    close(out, tensor([[[s, 0.5], [0.5, s]]]))


def test_decoupled_attention_out_proj_applied_without_residual() -> None:
    hidden = tensor([[[1.0], [2.0]]])
    out = decoupled_attention(hidden, identity, identity, identity, scale(3.0), num_heads=1)
    close(out, tensor([[[3 * (1 + sigmoid(1.0))], [3 * (1 + sigmoid(2.0))]]]))


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decoupled_attention_matches_reference(batch: int, encoding: F.AttentionEncoding) -> None:
    q, k, v, o = block(seed=batch)
    hidden = torch.randn(batch, 5, 8, generator=generator(batch))
    with torch.no_grad():
        expected = ref.decoupled_attention(hidden, q, k, v, o, num_heads=2, encoding=encoding)
        for chunk_size in (None, 1, 2, 5):
            actual = decoupled_attention(hidden, q, k, v, o, 2, encoding, chunk_size=chunk_size)
            close(actual, expected)


def test_decoupled_attention_qk_is_standard_attention() -> None:
    q, k, v, o = block()
    hidden = torch.randn(2, 5, 8, generator=generator())
    with torch.no_grad():
        actual = decoupled_attention(hidden, q, k, v, o, num_heads=2, encoding="qk")
        heads = [p(hidden).view(2, 5, 2, 4).transpose(1, 2) for p in (q, k, v)]
        sdpa = nn.functional.scaled_dot_product_attention(*heads)
        expected = o(sdpa.transpose(1, 2).reshape(2, 5, 8))
    close(actual, expected, atol=1e-5, rtol=1e-5)


def test_decoupled_attention_low_precision_keeps_dtype() -> None:
    q, k, v, o = block()
    hidden = torch.randn(2, 5, 8, generator=generator())
    with torch.no_grad():
        expected = decoupled_attention(hidden, q, k, v, o, num_heads=2)
        for p in (q, k, v, o):
            p.to(torch.bfloat16)
        actual = decoupled_attention(hidden.bfloat16(), q, k, v, o, num_heads=2)
    assert actual.dtype == torch.bfloat16
    close(actual.float(), expected, atol=5e-2, rtol=5e-2)


def test_decoupled_attention_skips_unused_projection() -> None:
    def broken(x: Tensor) -> Tensor:
        raise AssertionError

    hidden = torch.randn(1, 3, 4, generator=generator())
    out = decoupled_attention(hidden, identity, broken, identity, identity, 2, "qq")
    assert out.shape == (1, 3, 4)


# --------------------------------------------------------------------------------------------
# Eq. 4: [CLS] attention and its substitute
# --------------------------------------------------------------------------------------------


def test_cls_attention_by_hand() -> None:
    # [CLS] = 1, patches 0 and 2 (width 1, 1 head): softmax(1 * (1, 0, 2)) restricted to patches.
    z = math.e + 1 + math.e**2
    out = cls_attention(tensor([[[1.0], [0.0], [2.0]]]), identity, identity, num_heads=1)
    close(out, tensor([[1 / z, math.e**2 / z]]))


def test_cls_attention_by_hand_head_average() -> None:
    # Width 2, 2 heads of dim 1. Head 0: q = 1, keys (1, 0, 2); head 1: q = 0 -> uniform 1/3.
    hidden = tensor([[[1.0, 0.0], [0.0, 5.0], [2.0, -3.0]]])
    z = math.e + 1 + math.e**2
    expected = [(1 / z + 1 / 3) / 2, (math.e**2 / z + 1 / 3) / 2]
    close(cls_attention(hidden, identity, identity, num_heads=2), tensor([expected]))


def test_cls_attention_prefix_tokens() -> None:
    hidden = tensor([[[1.0], [0.0], [2.0], [1.0]]])
    full = cls_attention(hidden, identity, identity, num_heads=1, num_prefix_tokens=1)
    registers = cls_attention(hidden, identity, identity, num_heads=1, num_prefix_tokens=2)
    close(registers, full[:, 1:])


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("prefix", [1, 2])
def test_cls_attention_matches_reference(batch: int, prefix: int) -> None:
    q, k, _, _ = block(seed=batch)
    hidden = torch.randn(batch, 6, 8, generator=generator(batch))
    with torch.no_grad():
        actual = cls_attention(hidden, q, k, num_heads=4, num_prefix_tokens=prefix)
        expected = ref.cls_attention(hidden, q, k, num_heads=4, num_prefix_tokens=prefix)
    assert actual.shape == (batch, 6 - prefix)
    close(actual, expected)


def test_cls_attention_low_precision_returns_float32() -> None:
    q, k, _, _ = block()
    hidden = torch.randn(2, 6, 8, generator=generator())
    with torch.no_grad():
        expected = cls_attention(hidden, q, k, num_heads=2)
        q.to(torch.bfloat16)
        k.to(torch.bfloat16)
        actual = cls_attention(hidden.bfloat16(), q, k, num_heads=2)
    assert actual.dtype == torch.float32
    close(actual, expected, atol=1e-2, rtol=5e-2)


def test_mean_received_attention_by_hand() -> None:
    # Tokens (0, 1), width 1: row 0 uniform (1/2, 1/2); row 1 (1 - s, s), s = sigmoid(1).
    s = sigmoid(1.0)
    out = mean_received_attention(tensor([[[0.0], [1.0]]]), identity, identity, num_heads=1)
    close(out, tensor([[(0.5 + 1 - s) / 2, (0.5 + s) / 2]]))


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("chunk_size", [1, 3, 256])
def test_mean_received_attention_matches_reference(batch: int, chunk_size: int) -> None:
    q, k, _, _ = block(seed=batch)
    hidden = torch.randn(batch, 7, 8, generator=generator(batch))
    with torch.no_grad():
        actual = mean_received_attention(hidden, q, k, num_heads=2, chunk_size=chunk_size)
        expected = ref.mean_received_attention(hidden, q, k, num_heads=2)
        prefixed = mean_received_attention(hidden, q, k, 2, chunk_size, num_prefix_tokens=2)
    close(actual, expected)
    close(actual.sum(dim=-1), torch.ones(batch))  # every attention row sums to 1
    close(prefixed, actual[:, 2:])


# --------------------------------------------------------------------------------------------
# Eq. 3: FCMA task relevance
# --------------------------------------------------------------------------------------------


def test_fcma_by_hand() -> None:
    # d1 = 2 visual tokens e0, e1; d2 = 1 valid text token e0 (+1 padding); v_s = (0.6, 0.8),
    # q_t = e0. m = (1, 0), alpha = (1, 0), beta = (0.6). M^V = alpha / d1 = (0.5, 0) (softmax
    # over a single text token is 1). M^T = 0.6 * softmax_i(0.1 * alpha_i * m_i1).
    visual = tensor([[[1.0, 0.0], [0.0, 1.0]]])
    text = tensor([[[1.0, 0.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, False]])
    v_s, q_t = tensor([[0.6, 0.8]]), tensor([[1.0, 0.0]])
    mt0 = 0.6 * math.exp(0.1) / (math.exp(0.1) + 1)
    close(fcma_relevance(visual, v_s, text, mask, q_t, lam=0.1), tensor([[0.5 + mt0, 0.0]]))
    close(fcma_relevance(visual, v_s, text, mask, q_t, align=False), tensor([[1.0, 0.0]]))


def test_fcma_by_hand_without_alignment_two_text_tokens() -> None:
    # m = [[1, 1/sqrt2], [0, 1/sqrt2]], mean over text; inputs are normalised by the function.
    visual = tensor([[[2.0, 0.0], [0.0, 3.0]]])
    text = tensor([[[5.0, 0.0], [1.0, 1.0]]])
    r = 1 / math.sqrt(2)
    expected = tensor([[(1 + r) / 2, r / 2]])
    close(fcma_relevance(visual, visual[:, 0], text, None, text[:, 0], align=False), expected)


def test_fcma_lambda_zero_is_the_uniform_softmax_formula() -> None:
    # With lambda = 0 both softmaxes are uniform: A_t[i] = sum_j (alpha_i + beta_j) m_ij / (d1 d2^2)
    visual, v_s, text, mask, q_t = text_batch(1)
    v, s = l2_normalize(visual[0]), l2_normalize(text[0, : TEXT_LENGTHS[0]])
    m = v @ s.T
    alpha, beta = v @ l2_normalize(q_t[0]), s @ l2_normalize(v_s[0])
    d1, d2 = m.shape
    expected = ((alpha[:, None] + beta[None, :]) * m).sum(dim=1) / (d1 * d2**2)
    close(fcma_relevance(visual, v_s, text, mask, q_t, lam=0.0)[0], expected)


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize(
    ("align", "lam"), [(False, 0.1), (True, 0.0), (True, 0.1), (True, 1.0), (True, 5.0)]
)
def test_fcma_matches_reference(batch: int, align: bool, lam: float) -> None:
    visual, v_s, text, mask, q_t = text_batch(batch, seed=batch)
    actual = fcma_relevance(visual, v_s, text, mask, q_t, lam=lam, align=align)
    expected = ref.fcma_relevance(visual, v_s, text, mask, q_t, lam=lam, align=align)
    assert actual.dtype == torch.float32
    assert torch.isfinite(actual).all()
    close(actual, expected)


def test_fcma_padding_is_invisible() -> None:
    visual, v_s, text, mask, q_t = text_batch(4)
    batched = fcma_relevance(visual, v_s, text, mask, q_t)
    for b, length in enumerate(TEXT_LENGTHS):
        one = slice(b, b + 1)
        alone = fcma_relevance(visual[one], v_s[one], text[one, :length], None, q_t[one])
        close(batched[one], alone)


def test_fcma_is_scale_invariant_and_low_precision_safe() -> None:
    visual, v_s, text, mask, q_t = text_batch(2)
    text = text.nan_to_num(0.0)
    expected = fcma_relevance(visual, v_s, text, mask, q_t)
    close(fcma_relevance(3 * visual, 2 * v_s, 5 * text, mask, 7 * q_t), expected)
    bf16 = torch.bfloat16
    low = fcma_relevance(visual.to(bf16), v_s.to(bf16), text.to(bf16), mask, q_t.to(bf16))
    assert low.dtype == torch.float32
    close(low, expected, atol=5e-3, rtol=5e-2)


# --------------------------------------------------------------------------------------------
# Eq. 5: joint rank selection
# --------------------------------------------------------------------------------------------

TASK = tensor([[0.9, 0.1, 0.8, 0.2, 0.3]])
SALIENCY = tensor([[0.9, 0.5, 0.1, 0.7, 0.2]])


@pytest.mark.parametrize(
    ("k", "fraction", "expected"),
    [
        (3, 0.5, [0, 2, 3]),  # k1 = 2: task {0, 2}; saliency on {1, 3, 4}: {3}
        (4, 0.5, [0, 1, 2, 3]),  # task {0, 2}; saliency {3, 1}
        (2, 0.0, [0, 3]),  # saliency only
        (2, 1.0, [0, 2]),  # task only
        (1, 0.5, [0]),  # k1 = round-half-up(0.5) = 1
        (5, 0.5, [0, 1, 2, 3, 4]),
    ],
)
def test_joint_rank_select_by_hand(k: int, fraction: float, expected: list[int]) -> None:
    assert joint_rank_select(TASK, SALIENCY, k, fraction).tolist() == [expected]


@pytest.mark.parametrize(
    ("k", "fraction", "expected"),
    [(64, 0.5, (32, 32)), (7, 0.5, (4, 3)), (1, 0.5, (1, 0)), (10, 0.25, (3, 7)),
     (8, 0.25, (2, 6)), (9, 0.75, (7, 2)), (5, 0.0, (0, 5)), (5, 1.0, (5, 0)), (0, 0.5, (0, 0))],
)  # fmt: skip
def test_split_budget(k: int, fraction: float, expected: tuple[int, int]) -> None:
    assert split_budget(k, fraction) == expected


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("ties", [False, True])
def test_joint_rank_select_matches_reference(batch: int, ties: bool) -> None:
    g = generator(batch)
    for k in (1, 3, 6, 11):
        for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
            task, saliency = torch.rand(2, batch, 11, generator=g)
            if ties:  # few distinct values -> many ties resolved by index
                task, saliency = (task * 3).floor(), (saliency * 2).floor()
            actual = joint_rank_select(task, saliency, k, fraction)
            assert actual.dtype == torch.long
            expected = ref.joint_rank_select(task, saliency, k, fraction)
            assert torch.equal(actual, expected), (k, fraction)


@pytest.mark.parametrize("k", [1, 5, 8, 20])
def test_joint_rank_properties(k: int) -> None:
    task, saliency = torch.randn(2, 3, 20, generator=generator(k))
    task_idx, saliency_idx = joint_rank_branches(task, saliency, k)
    keep = joint_rank_select(task, saliency, k)
    k1, k2 = split_budget(k)
    assert task_idx.shape == (3, k1)
    assert saliency_idx.shape == (3, k2)
    assert keep.shape == (3, k)
    for b in range(3):
        t, s = set(task_idx[b].tolist()), set(saliency_idx[b].tolist())
        assert not t & s
        assert t | s == set(keep[b].tolist())
        assert len(set(keep[b].tolist())) == k
        assert task_idx[b].tolist() == task[b].argsort(descending=True)[:k1].tolist()
    assert bool((keep[:, 1:] > keep[:, :-1]).all())
    assert bool(((keep >= 0) & (keep < 20)).all())


def test_joint_rank_constant_scores_tie_break_to_lower_index() -> None:
    const = torch.zeros(2, 8)
    task_idx, saliency_idx = joint_rank_branches(const, const, 5)
    assert task_idx.tolist() == [[0, 1, 2]] * 2
    assert saliency_idx.tolist() == [[3, 4]] * 2
    assert joint_rank_select(const, const, 5).tolist() == [[0, 1, 2, 3, 4]] * 2


def test_joint_rank_saliency_never_reselects_task_tokens_even_at_minus_inf() -> None:
    task = tensor([[5.0, 4.0, 0.0, 0.0]])
    saliency = tensor([[9.0, 9.0, -math.inf, -math.inf]])
    _, saliency_idx = joint_rank_branches(task, saliency, 4)
    assert saliency_idx.tolist() == [[2, 3]]


# --------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------


def test_nearest_merge_by_hand() -> None:
    # Token 2 is nearest to 0; token 3 = (2, 2) is equally close to 0 and 1 -> lowest kept (0).
    x = tensor([[[1.0, 0.0], [0.0, 1.0], [0.8, 0.2], [2.0, 2.0]]])
    merged, sizes = nearest_merge(x, torch.tensor([[0, 1]]))
    close(merged, tensor([[[3.8 / 3, 2.2 / 3], [0.0, 1.0]]]))
    close(sizes, tensor([[3.0, 1.0]]))
    # Caller order of keep_idx is kept in the output; the tie still goes to index 0.
    merged, sizes = nearest_merge(x, torch.tensor([[1, 0]]))
    close(merged, tensor([[[0.0, 1.0], [3.8 / 3, 2.2 / 3]]]))
    close(sizes, tensor([[1.0, 3.0]]))


def test_nearest_merge_by_hand_weighted_and_similarity_space() -> None:
    x = tensor([[[1.0], [10.0], [4.0]]])
    z = tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]])  # token 2 is close to token 1 in z
    merged, sizes = nearest_merge(x, torch.tensor([[0, 1]]), similarity_features=z)
    close(merged, tensor([[[1.0], [7.0]]]))
    merged, sizes = nearest_merge(x, torch.tensor([[0, 1]]), z, weights=tensor([[1.0, 1.0, 3.0]]))
    close(merged, tensor([[[1.0], [(10 + 12) / 4]]]))
    close(sizes, tensor([[1.0, 4.0]]))


def test_nearest_merge_zero_weight_cluster_keeps_centre() -> None:
    x = tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]])
    merged, sizes = nearest_merge(x, torch.tensor([[0, 1]]), weights=tensor([[1.0, 0.0, 1.0]]))
    close(merged, tensor([[[1.0, 0.05], [0.0, 1.0]]]))
    close(sizes, tensor([[2.0, 0.0]]))


def merge_inputs(batch: int, ties: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = generator(batch)
    features = torch.randn(batch, 10, 6, generator=g)
    if ties:  # scaled one-hot features: cosines are exactly 0 or 1, so ties are exact
        category = torch.randint(0, 3, (batch, 10), generator=g)
        size = 2.0 ** torch.randint(0, 3, (batch, 10, 1), generator=g)
        features = nn.functional.one_hot(category, 6).float() * size
    keep = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(batch)])
    similarity = torch.randn(batch, 10, 3, generator=g)
    weights = torch.rand(batch, 10, generator=g) + 0.5
    return features, keep, similarity, weights


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("variant", ["plain", "ties", "similarity", "weights"])
def test_nearest_merge_matches_reference(batch: int, variant: str) -> None:
    features, keep, similarity, weights = merge_inputs(batch, ties=variant == "ties")
    sim = similarity if variant == "similarity" else None
    w = weights if variant == "weights" else None
    merged, sizes = nearest_merge(features, keep, similarity_features=sim, weights=w)
    expected_merged, expected_sizes = ref.nearest_merge(features, keep, sim, w)
    close(merged, expected_merged)
    close(sizes, expected_sizes)


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_nearest_merge_preserves_cluster_sums_and_counts(batch: int) -> None:
    features, keep, _, weights = merge_inputs(batch, ties=False)
    merged, sizes = nearest_merge(features, keep)
    assert merged.shape == (batch, 4, 6)
    assert sizes.shape == (batch, 4)
    close(sizes.sum(dim=1), torch.full((batch,), 10.0))
    for b, clusters in enumerate(ref.merge_clusters(features, keep)):
        for slot, centre in enumerate(keep[b].tolist()):
            assert sizes[b, slot] == len(clusters[centre])
            members = features[b, clusters[centre]].sum(dim=0)
            close(merged[b, slot] * sizes[b, slot], members, atol=1e-5, rtol=1e-5)
    merged, sizes = nearest_merge(features, keep, weights=weights)
    close((merged * sizes[..., None]).sum(dim=1), (features * weights[..., None]).sum(dim=1),
          atol=1e-5, rtol=1e-5)  # fmt: skip


def test_nearest_merge_keep_all_is_identity_and_low_precision() -> None:
    features = torch.randn(2, 5, 3, generator=generator())
    keep = torch.tensor([[4, 3, 2, 1, 0], [0, 1, 2, 3, 4]])
    merged, sizes = nearest_merge(features, keep)
    close(merged, features.gather(1, keep[..., None].expand(2, 5, 3)))
    close(sizes, torch.ones(2, 5))
    merged, sizes = nearest_merge(features.bfloat16(), keep[:, :2])
    assert merged.dtype == torch.bfloat16
    assert sizes.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# text filter
# --------------------------------------------------------------------------------------------


def test_text_filter_mask_by_hand() -> None:
    attention = tensor([[0.1, 0.5, 0.2, 0.05, 0.15, 0.0], [0.3, 0.3, 0.3, 0.9, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    eos = torch.tensor([4, 3])
    keep = text_filter_mask(attention, mask, eos, top_n=2)
    # Sample 0: EOS 4 + {1, 2}. Sample 1: EOS 3 + two of the tied {0, 1, 2} -> {0, 1}.
    assert keep.tolist() == [[False, True, True, False, True, False],
                             [True, True, False, True, False, False]]  # fmt: skip
    everything = text_filter_mask(attention, mask, eos, top_n=30)
    assert torch.equal(everything, mask)
    assert text_filter_mask(attention, mask, eos, top_n=0).tolist() == [
        [False] * 4 + [True, False],
        [False] * 3 + [True, False, False],
    ]


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("top_n", [0, 1, 3, 10])
def test_text_filter_mask_matches_reference(batch: int, top_n: int) -> None:
    _, _, _, mask, _ = text_batch(batch)
    attention = torch.rand(batch, 6, generator=generator(top_n)).round(decimals=1)
    eos = mask.sum(dim=1) - 1  # EOS is the last valid token
    actual = text_filter_mask(attention, mask, eos, top_n)
    assert actual.dtype == torch.bool
    assert torch.equal(actual, ref.text_filter_mask(attention, mask, eos, top_n))
    assert not bool((actual & ~mask).any())


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

H = torch.zeros(2, 5, 4)
S = torch.zeros(2, 6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: decoupled_attention(H[0], identity, identity, identity, identity, 2),
         r"hidden must be a 3-D tensor \(B, T, C\), got shape \(5, 4\)"),
        (lambda: decoupled_attention(H, identity, identity, identity, identity, 0),
         "num_heads must be a positive int"),
        (lambda: decoupled_attention(H, identity, identity, identity, identity, 3),
         "_proj output width 4 is not divisible by num_heads = 3"),
        (lambda: decoupled_attention(H, identity, identity, identity, identity, 2, "qv"),  # type: ignore[arg-type]
         "encoding must be one of"),
        (lambda: decoupled_attention(H[:, :0], identity, identity, identity, identity, 2),
         "hidden must hold at least one token"),
        (lambda: decoupled_attention(H, identity, identity, identity, identity, 2, chunk_size=0),
         "chunk_size must be a positive int"),
        (lambda: decoupled_attention(H, lambda x: x[:, :2], identity, identity, identity, 2),
         r"q_proj must map \(B, T, C\) to \(B, T, W\) = \(2, 5, W\), got \(2, 2, 4\)"),
        (lambda: decoupled_attention(H, identity, identity, identity, lambda x: x[0], 2),
         r"out_proj must return"),
        (lambda: cls_attention(H, identity, identity, 2, num_prefix_tokens=0),
         "num_prefix_tokens must be >= 1"),
        (lambda: cls_attention(H, identity, identity, 2, num_prefix_tokens=5),
         "need more than num_prefix_tokens = 5"),
        (lambda: mean_received_attention(H, identity, identity, 2, chunk_size=0),
         "chunk_size must be a positive int"),
        (lambda: mean_received_attention(H, identity, identity, 2, num_prefix_tokens=-1),
         "num_prefix_tokens must be a non-negative int"),
        (lambda: fcma_relevance(H, H[:, 0], torch.zeros(2, 7, 4), torch.ones(2, 5), H[:, 0]),
         r"text_mask must be \(B, T\) = \(2, 7\) to match text, got \(2, 5\)"),
        (lambda: fcma_relevance(H, H[:, 0], torch.zeros(2, 7, 3), None, H[:, 0]),
         r"text must be \(B, T, E\) = \(2, 7, 4\) to match visual \(B, N, E\), got \(2, 7, 3\)"),
        (lambda: fcma_relevance(H, H[:, 0], H, torch.zeros(2, 5), H[:, 0]),
         "at least one valid text token in every sample"),
        (lambda: fcma_relevance(H, H, H, None, H[:, 0]),
         r"visual_global must be a 2-D tensor \(B, E\), got shape \(2, 5, 4\)"),
        (lambda: fcma_relevance(H, H[:, 0], H, None, H[:1, 0]),
         r"text_global must be \(B, E\) = \(2, 4\) to match visual, got \(1, 4\)"),
        (lambda: fcma_relevance(H, H[:, 0], H, None, H[:, 0], lam=math.inf),
         "lam must be a finite float"),
        (lambda: joint_rank_select(S, S, 0), r"k must be an int in \[1, N\] = \[1, 6\], got 0"),
        (lambda: joint_rank_select(S, S, 7), r"k must be an int in \[1, N\] = \[1, 6\], got 7"),
        (lambda: joint_rank_select(S, S, 3, -0.1), r"task_fraction must be in \[0, 1\]"),
        (lambda: joint_rank_select(S, S, 3, 1.5), r"task_fraction must be in \[0, 1\]"),
        (lambda: joint_rank_select(S, S, 3, math.nan), r"task_fraction must be in \[0, 1\]"),
        (lambda: joint_rank_select(S, S[:, :5], 3),
         r"saliency_scores must be \(B, N\) = \(2, 6\) to match task_scores, got \(2, 5\)"),
        (lambda: split_budget(-1), "k must be a non-negative int"),
        (lambda: nearest_merge(H, torch.tensor([[0, 0], [1, 2]])), "duplicate"),
        (lambda: nearest_merge(H, torch.tensor([[0, 5], [1, 2]])),
         r"keep_idx values must be in \[0, N\) = \[0, 5\)"),
        (lambda: nearest_merge(H, torch.tensor([[0.0], [1.0]])), "integer indices"),
        (lambda: nearest_merge(H, torch.zeros(2, 0, dtype=torch.long)), "K = 0"),
        (lambda: nearest_merge(H, torch.tensor([[0], [1], [2]])),
         r"keep_idx must be \(B, K\) = \(2, 1\) to match features"),
        (lambda: nearest_merge(H, torch.tensor([[0], [1]]), weights=-torch.ones(2, 5)),
         "weights must be finite and non-negative"),
        (lambda: nearest_merge(H, torch.tensor([[0], [1]]), torch.zeros(2, 4, 3)),
         r"similarity_features must be \(B, N, D'\) = \(2, 5, 3\) to match features"),
        (lambda: text_filter_mask(S, S.bool(), torch.tensor([0, 1])),
         r"eos_index must point at a valid token"),
        (lambda: text_filter_mask(S, S.bool(), torch.tensor([0, 6])),
         r"eos_index values must be in \[0, T\) = \[0, 6\)"),
        (lambda: text_filter_mask(S, S.bool(), torch.tensor([[0, 1]])),
         r"eos_index must be a 1-D tensor \(B,\), got shape \(1, 2\)"),
        (lambda: text_filter_mask(S, S.bool(), torch.tensor([0, 1]), top_n=-1),
         "top_n must be a non-negative int"),
    ],
)  # fmt: skip
def test_errors(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------------
# docstring examples
# --------------------------------------------------------------------------------------------

DOCTESTS = [t for t in doctest.DocTestFinder().find(F) if t.examples]


def test_every_public_function_has_an_example() -> None:
    documented = {t.name.rsplit(".", 1)[-1] for t in DOCTESTS}
    public = {name for name in F.__all__ if callable(getattr(F, name)) and name.islower()}
    assert public <= documented


@pytest.mark.parametrize("test", DOCTESTS, ids=lambda t: t.name.rsplit(".", 1)[-1])
def test_docstring_examples(test: doctest.DocTest) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=lambda _: None)
    assert result.failed == 0, f"{test.name}: {result.failed} example(s) failed"
