"""The divprune selector."""

from __future__ import annotations

import pytest
import torch

from tokenprune.capabilities import Capability
from tokenprune.errors import CapabilityError, ShapeError
from tokenprune.functional.divprune import divprune_keep_indices
from tokenprune.stages.selectors.divprune import DivPruneSelector, DivPruneSelectorConfig
from tokenprune.testing import check_stage, make_context


def test_selects_on_projected_features_by_default_and_ignores_the_scores() -> None:
    ctx = make_context(2, 16, 16, 5, seed=4)
    selector = DivPruneSelector()
    first = selector.select(torch.rand(2, 16), ctx)
    second = selector.select(torch.zeros(2, 16), ctx)
    assert torch.equal(first.keep_idx, second.keep_idx)
    assert ctx.projector is not None
    want = divprune_keep_indices(ctx.projector(ctx.visual.features), 5)
    assert torch.equal(first.keep_idx, want)


def test_feature_space_needs_no_projector() -> None:
    ctx = make_context(2, 16, 16, 5, seed=4)
    selector = DivPruneSelector(space="features")
    assert selector.required_capabilities() == frozenset()
    assert DivPruneSelector().required_capabilities() == {Capability.PROJECTOR}
    got = selector.select(torch.zeros(2, 16), ctx)
    assert torch.equal(got.keep_idx, divprune_keep_indices(ctx.visual.features, 5))


def test_errors() -> None:
    ctx = make_context(1, 8, 16, 3)
    with pytest.raises(ShapeError):
        DivPruneSelector().select(torch.tensor([[float("nan")] * 8]), ctx)
    bare = make_context(1, 8, 16, 3)
    bare.capabilities = bare.capabilities - {Capability.PROJECTOR}
    with pytest.raises(CapabilityError):
        DivPruneSelector().select(torch.zeros(1, 8), bare)


class _FeatureSelector(DivPruneSelector):
    @classmethod
    def contract_config(cls) -> DivPruneSelectorConfig:
        return DivPruneSelectorConfig(space="features")


def test_contract_in_feature_space() -> None:
    check_stage(_FeatureSelector)
