"""The functional core against the naive references in ``_reference.py`` (to 1e-6)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from tokenprune_desap import functional as desap
from tokenprune_dynamic import functional as F

ref = importlib.import_module("tokenprune_dynamic_tests_reference")  # loaded by conftest

SIZES = [1, 2, 7, 16, 144]


# -- text-cue strength ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strength_equals_reference(n: int, temperature: float, dtype: torch.dtype) -> None:
    scores = ref.random_scores(5, n, seed=n)
    scores[1] = scores[1] * 1e-6  # DeSAP's A_t is of order 1 / (d1 d2)
    scores[2, : min(3, n)] += 20.0  # a peaked map
    scores[3] = 0.7  # a constant map
    out = F.text_cue_strength(scores.to(dtype), temperature)
    assert out.dtype == dtype
    assert out.shape == (5,)
    expected = torch.tensor(ref.text_cue_strength(scores.to(dtype), temperature), dtype=dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_strength_bounds_and_invariance() -> None:
    scores = ref.random_scores(8, 50, seed=3, ties=False)
    s = F.text_cue_strength(scores)
    assert bool(((s >= 0) & (s <= 1)).all())
    torch.testing.assert_close(F.text_cue_strength(3.5 * scores - 2.0), s, rtol=0, atol=1e-6)
    assert torch.equal(F.text_cue_strength(torch.full((2, 9), 4.0)), torch.zeros(2))
    one_hot = torch.zeros(1, 50)
    one_hot[0, 7] = 1.0
    assert float(F.text_cue_strength(one_hot)) > float(s.max())  # a single spike is the peak
    # Sharper spikes are stronger cues; lower temperatures read every map as more peaked.
    spiky = torch.zeros(3, 50)
    spiky[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    spiky[:, 1:] = torch.randn(50 - 1, generator=torch.Generator().manual_seed(0)) * 0.1
    assert F.text_cue_strength(spiky).diff().gt(0).all()
    assert bool((F.text_cue_strength(scores, 0.5) >= F.text_cue_strength(scores, 1.0)).all())


@pytest.mark.parametrize(
    ("relevance", "temperature", "match"),
    [
        (torch.zeros(3), 1.0, r"\(B, N\) with N >= 1"),
        (torch.zeros(2, 0), 1.0, r"\(B, N\) with N >= 1"),
        (torch.zeros(2, 3, dtype=torch.long), 1.0, "floating-point"),
        (torch.tensor([[0.0, float("nan")]]), 1.0, "finite"),
        (torch.zeros(1, 3), 0.0, "temperature must be a finite number > 0"),
        (torch.zeros(1, 3), float("inf"), "temperature"),
    ],
)
def test_strength_errors(relevance: torch.Tensor, temperature: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        F.text_cue_strength(relevance, temperature)


# -- task share ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a_min", "a_max", "lo", "hi"),
    [(0.25, 0.75, 0.0, 0.5), (0.0, 1.0, 0.1, 0.3), (0.5, 0.5, 0.0, 1.0)],
)
def test_task_fractions_equal_reference(a_min: float, a_max: float, lo: float, hi: float) -> None:
    strength = torch.linspace(0, 1, 41, dtype=torch.float64)
    out = F.task_fractions(strength, a_min, a_max, lo, hi)
    expected = [ref.task_fraction(float(s), a_min, a_max, lo, hi) for s in strength]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((out.diff() >= 0).all())  # monotone


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.8, 0.2, 0.0, 1.0), r"min_fraction \(0.8\) is larger than max_fraction \(0.2\); swap"),
        ((-0.1, 0.5, 0.0, 1.0), r"min_fraction must be in \[0, 1\]"),
        ((0.1, 1.5, 0.0, 1.0), r"max_fraction must be in \[0, 1\]"),
        ((0.1, 0.5, 0.5, 0.5), "cue_low < cue_high"),
    ],
)
def test_task_fraction_errors(args: tuple[float, float, float, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        F.task_fractions(torch.zeros(2), *args)


def test_task_budgets_round_trip_through_desap_split() -> None:
    # dynamic_joint_select hands k1 / k to DeSAP's split_budget; it must give back k1 exactly.
    for k in range(1, 400):
        for k1 in range(k + 1):
            assert desap.split_budget(k, k1 / k)[0] == k1
    assert F.task_budgets(16, torch.tensor([0.25, 0.5, 0.53, 1.0, 0.0])) == [4, 8, 8, 16, 0]


# -- selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 16, 144])
@pytest.mark.parametrize("ties", [False, True])
def test_dynamic_select_equals_reference(n: int, ties: bool) -> None:
    batch = 6
    task = ref.random_scores(batch, n, seed=10 + n, ties=ties)
    task[0, : min(2, n)] += 10.0  # one strong cue in the batch
    saliency = ref.random_scores(batch, n, seed=20 + n, ties=ties)
    for k in sorted({1, max(1, n // 3), n}):
        strength = F.text_cue_strength(task)
        fractions = F.task_fractions(strength, 0.1, 0.9, 0.05, 0.4)
        out = F.dynamic_joint_select(task, saliency, k, fractions)
        kept, shares, budgets = ref.dynamic_select(task, saliency, k, 0.1, 0.9, 0.05, 0.4, 1.0)
        assert out.dtype == torch.long
        assert out.tolist() == kept
        assert F.task_budgets(k, fractions) == budgets
        torch.testing.assert_close(
            fractions, torch.tensor(shares, dtype=torch.float64), rtol=0, atol=1e-6
        )


def test_per_sample_splits_differ_within_a_batch() -> None:
    task = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    saliency = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]] * 3)
    out = F.dynamic_joint_select(task, saliency, 4, torch.tensor([1.0, 0.5, 0.0]))
    assert out.tolist() == [[0, 1, 2, 3], [0, 1, 4, 5], [2, 3, 4, 5]]


def test_equal_fractions_are_desap_joint_rank_select() -> None:
    task, saliency = ref.random_scores(5, 30, seed=1), ref.random_scores(5, 30, seed=2)
    for fraction in (0.0, 0.3, 0.5, 1.0):
        out = F.dynamic_joint_select(task, saliency, 11, torch.full((5,), fraction))
        assert torch.equal(out, desap.joint_rank_select(task, saliency, 11, fraction))


def test_dynamic_select_errors() -> None:
    task = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"saliency_scores must be \(B, N\) = \(2, 5\)"):
        F.dynamic_joint_select(task, torch.zeros(2, 4), 2, torch.zeros(2))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N\] = \[1, 5\], got 6"):
        F.dynamic_joint_select(task, task, 6, torch.zeros(2))
    with pytest.raises(ValueError, match=r"fractions must be \(B,\) = \(2,\)"):
        F.dynamic_joint_select(task, task, 2, torch.zeros(3))
    with pytest.raises(ValueError, match=r"task_fraction must be in \[0, 1\]"):
        F.dynamic_joint_select(task, task, 2, torch.tensor([0.5, 1.5]))


# -- feature diversity ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_diversity_equals_pairwise_reference(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    features = torch.randn(3, n, 5, generator=g)
    features[1] = features[1].abs()  # non-negative cosines
    features[2, 0] = 0.0  # a zero row
    out = F.feature_diversity(features)
    assert out.shape == (3,)
    expected = torch.tensor([ref.feature_diversity(f) for f in features])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for i in range(3):  # one part at a time gives the same
        torch.testing.assert_close(F.feature_diversity(features[i]), out[i], rtol=0, atol=1e-7)


def test_diversity_bounds_and_errors() -> None:
    assert float(F.feature_diversity(torch.ones(6, 4) * 3)) == pytest.approx(0.0, abs=1e-6)
    assert float(F.feature_diversity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(\*, n, D\) with n >= 1"):
        F.feature_diversity(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"\(\*, n, D\)"):
        F.feature_diversity(torch.zeros(4))
    assert not math.isnan(float(F.feature_diversity(torch.zeros(3, 4))))
