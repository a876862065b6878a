"""Named, removable, per-instance hooks.

Only two kinds of change are ever made to a model: torch hooks (``register_forward_pre_hook``
and friends) and an instance attribute that shadows a method of the class for that one
instance. Both are recorded here under a name and undone by :meth:`HookSet.remove`, which is
idempotent; the class itself is never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet"]

_MISSING = object()


class HookSet:
    """A group of hooks installed on one model, removed together."""

    def __init__(self) -> None:
        self._handles: list[tuple[str, RemovableHandle]] = []
        self._shadows: list[tuple[str, object, str, object]] = []

    @property
    def names(self) -> list[str]:
        """Names of the active hooks, in installation order."""
        return [n for n, _ in self._handles] + [n for n, *_ in self._shadows]

    def add(self, name: str, handle: RemovableHandle) -> None:
        """Record a torch hook handle under ``name``."""
        self._handles.append((name, handle))

    def shadow_method(
        self, name: str, obj: nn.Module, attr: str, wrapper: Callable[..., Any]
    ) -> None:
        """Shadow ``obj.attr`` with ``wrapper`` on this instance only."""
        previous = obj.__dict__.get(attr, _MISSING)
        object.__setattr__(obj, attr, wrapper)
        self._shadows.append((name, obj, attr, previous))

    def remove(self) -> None:
        """Undo everything, newest first. Safe to call twice."""
        while self._shadows:
            _, obj, attr, previous = self._shadows.pop()
            if previous is _MISSING:
                obj.__dict__.pop(attr, None)
            else:
                object.__setattr__(obj, attr, previous)
        while self._handles:
            _, handle = self._handles.pop()
            handle.remove()
