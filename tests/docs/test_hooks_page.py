"""The hook reference (docs/reference/hooks.md) must match tokenprune.plugin.spec exactly.

Every hook specification has a ``## tokenprune_<name>`` section, in the order of the module, with
its call type (``**Call type:** historic.``, ``firstresult.`` or ``broadcast.``), its signature in a
``text`` block, and an example; there is no section for a hook that does not exist.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from tokenprune.plugin import spec

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "hooks.md"
SPEC_MARKER = f"{spec.PROJECT_NAME}_spec"  # the attribute pluggy's HookspecMarker sets
PREFIX = f"{spec.PROJECT_NAME}_"


def hookspecs() -> dict[str, Any]:
    """Hook specifications of the spec module, in definition order."""
    return {
        name: obj
        for name, obj in vars(spec).items()
        if name.startswith(PREFIX) and callable(obj) and hasattr(obj, SPEC_MARKER)
    }


def sections() -> dict[str, str]:
    """``## tokenprune_...`` headings of the page and the text under each, in page order."""
    found: dict[str, str] = {}
    current: str | None = None
    body: list[str] = []
    in_fence = False
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            if current is not None:
                found[current] = "\n".join(body)
            title = line[3:].strip()
            current = title if title.startswith(PREFIX) else None
            assert current not in found, f"hooks.md: duplicate section {title!r}"
            body = []
        elif current is not None:
            body.append(line)
    if current is not None:
        found[current] = "\n".join(body)
    return found


def expected_call_type(hook: Any) -> str:
    options = getattr(hook, SPEC_MARKER)
    if options.get("historic"):
        return "historic"
    if options.get("firstresult"):
        return "firstresult"
    return "broadcast"


def signature_text(name: str, hook: Any) -> str:
    """``name(arg: Annotation, ...) -> Return``, from the spec's (string) annotations."""
    sig = inspect.signature(hook)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({params}) -> {sig.return_annotation}"


def test_the_spec_module_has_hooks() -> None:
    assert len(hookspecs()) >= 4


def test_every_hook_has_a_section_and_no_section_is_extra() -> None:
    documented, specified = set(sections()), set(hookspecs())
    assert not specified - documented, f"hooks missing from hooks.md: {specified - documented}"
    assert not documented - specified, f"hooks.md documents unknown hooks: {documented - specified}"


def test_sections_follow_the_module_order() -> None:
    assert list(sections()) == list(hookspecs())


@pytest.mark.parametrize("name", list(hookspecs()))
def test_call_type_is_documented(name: str) -> None:
    body = sections().get(name, "")
    match = re.search(r"^\*\*Call type:\*\* (\w+)\.", body, re.MULTILINE)
    assert match, f"hooks.md: section {name} has no '**Call type:** ...' line"
    assert match.group(1) == expected_call_type(hookspecs()[name]), (
        f"hooks.md: {name} is documented as {match.group(1)}, the spec says "
        f"{expected_call_type(hookspecs()[name])}"
    )


@pytest.mark.parametrize("name", list(hookspecs()))
def test_signature_is_documented(name: str) -> None:
    body = sections().get(name, "")
    blocks = re.findall(r"^```text\n(.*?)\n```", body, re.MULTILINE | re.DOTALL)
    assert blocks, f"hooks.md: section {name} has no ```text signature block"
    assert blocks[0].strip() == signature_text(name, hookspecs()[name])


@pytest.mark.parametrize("name", list(hookspecs()))
def test_hook_has_an_example_and_a_docstring(name: str) -> None:
    assert "```python" in sections().get(name, ""), f"hooks.md: section {name} has no example"
    assert inspect.getdoc(hookspecs()[name]), f"hookspec {name} has no docstring"
