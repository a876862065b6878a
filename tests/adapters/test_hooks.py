"""``HookSet``: named, per-instance, removable hooks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenprune.adapters._hooks import HookSet


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    def describe(self) -> str:
        return "class method"


def _add_one(module: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor]:
    return (args[0] + 1,)


def test_torch_hooks_are_recorded_and_removed() -> None:
    module = Doubler()
    hooks = HookSet()
    hooks.add("add_one", module.register_forward_pre_hook(_add_one))
    assert hooks.names == ["add_one"]
    assert module(torch.tensor(1.0)).item() == 4.0
    hooks.remove()
    assert hooks.names == []
    assert module(torch.tensor(1.0)).item() == 2.0
    assert not module._forward_pre_hooks


def test_remove_is_idempotent() -> None:
    module = Doubler()
    hooks = HookSet()
    hooks.add("add_one", module.register_forward_pre_hook(_add_one))
    hooks.shadow_method("describe", module, "describe", lambda: "shadow")
    hooks.remove()
    hooks.remove()
    assert module(torch.tensor(1.0)).item() == 2.0
    assert module.describe() == "class method"
    assert "describe" not in module.__dict__


def test_shadow_is_per_instance_and_leaves_the_class_alone() -> None:
    module, other = Doubler(), Doubler()
    hooks = HookSet()
    hooks.shadow_method("describe", module, "describe", lambda: "shadow")
    assert module.describe() == "shadow"
    assert other.describe() == "class method"
    assert Doubler.describe is Doubler.__dict__["describe"]
    assert hooks.names == ["describe"]
    hooks.remove()
    assert module.describe() == "class method"
    assert "describe" not in module.__dict__


def test_shadow_restores_an_attribute_that_existed_before() -> None:
    module = Doubler()

    def earlier() -> str:
        return "set by someone else"

    object.__setattr__(module, "describe", earlier)
    hooks = HookSet()
    hooks.shadow_method("describe", module, "describe", lambda: "shadow")
    assert module.describe() == "shadow"
    hooks.remove()
    assert module.__dict__["describe"] is earlier
    hooks.remove()
    assert module.__dict__["describe"] is earlier


def test_nested_shadows_are_undone_newest_first() -> None:
    module = Doubler()
    hooks = HookSet()
    hooks.shadow_method("first", module, "describe", lambda: "first")
    hooks.shadow_method("second", module, "describe", lambda: "second")
    assert module.describe() == "second"
    hooks.remove()
    assert "describe" not in module.__dict__


def test_names_list_hooks_in_installation_order() -> None:
    module = Doubler()
    hooks = HookSet()
    hooks.add("pre", module.register_forward_pre_hook(_add_one))
    hooks.add("post", module.register_forward_hook(lambda m, a, out: out))
    hooks.shadow_method("describe", module, "describe", lambda: "shadow")
    assert hooks.names == ["pre", "post", "describe"]
    hooks.remove()
    assert not module._forward_pre_hooks
    assert not module._forward_hooks
