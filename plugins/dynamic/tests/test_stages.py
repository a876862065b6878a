"""The ``desap_dynamic`` selector: contract, equality with the functional core, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenprune import BudgetError, ConfigError, ShapeError
from tokenprune.testing import check_stage, make_context
from tokenprune_desap.selector import DesapJointSelector
from tokenprune_dynamic import (
    TASK_FRACTIONS,
    TEXT_CUE_STRENGTH,
    DesapDynamicSelector,
    DesapDynamicSelectorConfig,
)
from tokenprune_dynamic import functional as F


def _maps(batch: int = 4, n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    task = torch.randn(batch, n, generator=g)
    task[0, :2] += 8.0  # a strong cue
    task[1] = 1.0  # no cue at all
    return {"task": task, "saliency": torch.rand(batch, n, generator=g)}


@pytest.mark.parametrize(
    "options",
    [{}, {"min_task_fraction": 0.0, "max_task_fraction": 1.0, "cue_low": 0.1, "cue_high": 0.2}],
)
def test_stage_contract(options: dict[str, Any]) -> None:
    class Configured(DesapDynamicSelector):
        @classmethod
        def contract_config(cls) -> Any:
            return cls.Config(name=cls.name, **options)

    check_stage(Configured)


def test_selector_equals_functional_composition() -> None:
    options: dict[str, Any] = {"min_task_fraction": 0.1, "max_task_fraction": 0.9}
    selector = DesapDynamicSelector(**options, temperature=0.7)
    scores = _maps()
    ctx = make_context(4, 16, 8, keep=6)
    selection = selector.select(scores, ctx)
    strength = F.text_cue_strength(scores["task"], 0.7)
    fractions = F.task_fractions(strength, 0.1, 0.9, 0.0, 0.5)
    expected = F.dynamic_joint_select(scores["task"], scores["saliency"], 6, fractions)
    assert torch.equal(selection.keep_idx, expected)
    assert torch.equal(ctx.stash[TEXT_CUE_STRENGTH], strength)
    assert torch.equal(ctx.stash[TASK_FRACTIONS], fractions)
    # The strong cue gets more of the budget by relevance than the flat map.
    assert F.task_budgets(6, fractions)[0] > F.task_budgets(6, fractions)[1]
    assert float(fractions[1]) == pytest.approx(0.1)


def test_fixed_range_is_desap_joint() -> None:
    scores = _maps(seed=3)
    ctx = make_context(4, 16, 8, keep=7)
    for fraction in (0.0, 0.5, 0.8):
        ours = DesapDynamicSelector(min_task_fraction=fraction, max_task_fraction=fraction)
        theirs = DesapJointSelector(task_fraction=fraction)
        assert torch.equal(ours.select(scores, ctx).keep_idx, theirs.select(scores, ctx).keep_idx)


def test_custom_keys() -> None:
    scores = _maps()
    renamed = {"rel": scores["task"], "sal": scores["saliency"]}
    ctx = make_context(4, 16, 8, keep=5)
    got = DesapDynamicSelector(task_key="rel", saliency_key="sal").select(renamed, ctx)
    assert torch.equal(got.keep_idx, DesapDynamicSelector().select(scores, ctx).keep_idx)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"min_task_fraction": 0.8, "max_task_fraction": 0.2},
            r"min_task_fraction \(0.8\) is larger than max_task_fraction \(0.2\); swap them",
        ),
        ({"cue_low": 0.5, "cue_high": 0.5}, r"cue_low \(0.5\) must be smaller than cue_high"),
        ({"max_task_fraction": 1.5}, "max_task_fraction: Input should be less than or equal"),
        ({"temperature": 0.0}, "temperature: Input should be greater than 0"),
        ({"task_fraction": 0.5}, "task_fraction: Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_field(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DesapDynamicSelector(**options)


def test_config_is_frozen_and_strict() -> None:
    config = DesapDynamicSelectorConfig()
    assert config.model_config.get("frozen") is True
    assert config.model_config.get("extra") == "forbid"
    with pytest.raises(ValueError, match="frozen"):
        config.cue_high = 0.9


def test_select_errors() -> None:
    ctx = make_context(2, 16, 8, keep=4)
    scores = _maps(batch=2)
    with pytest.raises(ConfigError, match=r"needs two named score maps 'task' and 'saliency'.*"):
        DesapDynamicSelector().select(scores["task"], ctx)
    with pytest.raises(ConfigError, match=r"set `task_key`/`saliency_key`"):
        DesapDynamicSelector().select({"task": scores["task"]}, ctx)
    with pytest.raises(ShapeError, match=r"'saliency' must be a floating \(B, N\) = \(2, 16\)"):
        DesapDynamicSelector().select({**scores, "saliency": torch.zeros(2, 15)}, ctx)
    bad = scores["task"].clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ShapeError, match="'task' contains NaN or inf"):
        DesapDynamicSelector().select({**scores, "task": bad}, ctx)
    with pytest.raises(BudgetError, match="cannot keep K=17 of N=16"):
        DesapDynamicSelector().select(scores, make_context(2, 16, 8, keep=17))
