"""Every registered stage passes the stage contract (tokenprune.testing.check_stage)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from tokenprune.plugin import PluginWarning, Runtime
from tokenprune.stages.base import Stage
from tokenprune.testing import check_stage, registered_stages


def stage_id(stage_cls: type[Stage[Any]]) -> str:
    return f"{stage_cls.role}:{stage_cls.name}"


BUILTIN_STAGES = registered_stages(Runtime(autoload=False))

# Installed plugins (DeSAP) add their stages through entry points. Whether every plugin loads is
# the plugin-discovery tests' business; a plugin that fails to load only warns, and that warning
# must not stop this module from being collected, so it is ignored here, for this one call.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PluginWarning)
    _BUILTIN_KEYS = {stage_id(s) for s in BUILTIN_STAGES}
    PLUGIN_STAGES = [s for s in registered_stages(Runtime()) if stage_id(s) not in _BUILTIN_KEYS]


def test_the_builtin_stages_are_all_checked() -> None:
    ids = [stage_id(s) for s in BUILTIN_STAGES]
    assert {"scorer:cls_attention", "scorer:random", "selector:topk", "merger:drop"} <= set(ids)
    assert ids == sorted(ids, key=lambda i: (i.split(":")[0], i.split(":")[1]))


@pytest.mark.parametrize("stage_cls", BUILTIN_STAGES, ids=stage_id)
def test_builtin_stage_contract(stage_cls: type[Stage[Any]]) -> None:
    check_stage(stage_cls)


@pytest.mark.parametrize("stage_cls", PLUGIN_STAGES, ids=stage_id)
def test_plugin_stage_contract(stage_cls: type[Stage[Any]]) -> None:
    check_stage(stage_cls)
