"""The hand-written reference tables must list what the code registers and offers.

- every built-in stage has a row in the built-in table of docs/concepts/stages.md and in the
  methods table of README.md;
- every ``tokenprune`` subcommand has a section in docs/reference/cli.md, and every section
  names a real subcommand.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tokenprune.cli import build_parser
from tokenprune.plugin import Runtime

ROOT = Path(__file__).resolve().parents[2]


def builtin_stages() -> list[tuple[str, str]]:
    runtime = Runtime(autoload=False)
    return [(r.role, r.name) for r in runtime.stages if r.plugin == "builtin"]


def subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name for action in actions for name in action.choices}


@pytest.mark.parametrize("page", ["docs/concepts/stages.md", "README.md"])
def test_every_builtin_stage_has_a_row(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    missing = [
        f"{role} {name}"
        for role, name in builtin_stages()
        if not re.search(rf"^\| {role} \| `{name}` \|", text, re.MULTILINE)
    ]
    assert not missing, f"{page}: no table row for the built-in stage(s) {missing}"


def test_every_subcommand_has_a_section() -> None:
    text = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^## `tokenprune (\w[\w-]*)", text, re.MULTILINE))
    assert subcommands() <= documented, f"cli.md lacks {subcommands() - documented}"
    assert documented <= subcommands(), f"cli.md documents unknown {documented - subcommands()}"
