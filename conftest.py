"""Repository-wide pytest configuration."""

from __future__ import annotations

import os
from importlib.util import find_spec

# Test models are tiny: one intra-op thread per process is faster than two competing ones and
# leaves the second core to pytest-xdist's second worker. Set before torch starts its pool.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

# `python -m tokenprune` runs the CLI when imported; doctest collection must not import it.
collect_ignore = ["tokenprune/__main__.py"]
# The lmms-eval model subclasses lmms-eval's base class on import: without the optional `lmms`
# extra its module cannot be collected for doctests (tests/eval/test_lmms_eval.py then skips).
if find_spec("lmms_eval") is None:
    collect_ignore.append("tokenprune/eval/lmms_eval/model.py")
