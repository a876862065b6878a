"""The method configs in configs/ validate, build and run on a synthetic context."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenprune.plugin import Runtime
from tokenprune.testing import make_context

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METHOD_CONFIGS = [
    "visionzip_64.yaml",
    "prumerge_64.yaml",
    "prumerge_plus_64.yaml",
    "divprune_64.yaml",
    "tome_64.yaml",
    "pool_64.yaml",
    "combine_example.yaml",
]


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_method_config_runs(name: str) -> None:
    runtime = Runtime(autoload=False)
    pipeline = runtime.build_pipeline(runtime.load_config(CONFIGS / name))
    ctx = make_context(2, 144, 16, pipeline.budget(144), num_layers=3)  # a 12x12 grid
    out = pipeline(ctx)
    assert out.features.shape == (2, 64, 16)
    assert bool((out.keep_idx[:, 1:] > out.keep_idx[:, :-1]).all())


@pytest.mark.parametrize("path", sorted(CONFIGS.iterdir()), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    runtime = Runtime()  # with the installed plugins (tokenprune-desap, tokenprune-dynamic)
    config = runtime.load_config(path)
    assert config.to_dict() == runtime.parse_config(config.to_dict()).to_dict()
