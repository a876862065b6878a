"""Repository-wide pytest configuration."""

from __future__ import annotations

# `python -m tokenprune` runs the CLI when imported; doctest collection must not import it.
collect_ignore = ["tokenprune/__main__.py"]
