"""Every registered adapter passes every adapter-contract check on its tiny case."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tokenprune.plugin.manager import Runtime
from tokenprune.testing.adapter_contract import CONTRACT_CHECKS
from tokenprune.testing.cases import ADAPTER_CASES

REGISTERED = Runtime(autoload=False).adapters.names()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads cost more in synchronisation than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("check", sorted(CONTRACT_CHECKS))
@pytest.mark.parametrize("adapter", REGISTERED)
def test_adapter_contract(adapter: str, check: str) -> None:
    case = ADAPTER_CASES.get(adapter)
    if case is None:
        pytest.fail(
            f"adapter {adapter!r} is registered but has no AdapterCase in "
            "tokenprune.testing.cases.ADAPTER_CASES; add a tiny case for it (a registered adapter "
            "cannot skip the contract suite)"
        )
    CONTRACT_CHECKS[check](case)


def test_cases_are_keyed_by_their_adapter_name() -> None:
    assert {name: case.name for name, case in ADAPTER_CASES.items()} == {
        name: name for name in ADAPTER_CASES
    }


def test_every_case_names_a_registered_adapter() -> None:
    assert set(ADAPTER_CASES) <= set(REGISTERED)


def test_the_builtin_adapters_are_registered() -> None:
    assert {"llava", "llava_next", "video_llava"} <= set(REGISTERED)
