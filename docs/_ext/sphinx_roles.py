"""Griffe extension: render the Sphinx roles used in tokenprune's docstrings as Markdown.

The docstrings are Google style with a few reStructuredText roles (``:class:`Pipeline```,
``:math:`(B, N)```) and ``.. math::`` blocks, as in torchmetrics and kornia. mkdocstrings renders
Markdown, so before a docstring is parsed this extension rewrites

- ``:class:``, ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:exc:``, ``:mod:``, ``:obj:``
  into optional cross-references (a link when the target is documented, plain code otherwise;
  never a build warning). A leading ``~`` shows only the last component, as in Sphinx.
- ``:math:`...``` into inline code, and ``.. math::`` blocks into fenced ``text`` blocks.

Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, NameResolutionError, Object

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|exc|mod|obj):`(?P<target>[^`]+)`")
_MATH = re.compile(r":math:`(?P<body>[^`]+)`")
_MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n", re.MULTILINE)


def _resolve(obj: Object, target: str) -> str:
    """Full path of ``target`` as seen from ``obj`` (unchanged when it cannot be resolved)."""
    if "." in target and target.split(".")[0] in ("tokenprune", "tokenprune_desap"):
        return target
    head, _, rest = target.partition(".")
    try:
        base = obj.resolve(head)
    except (NameResolutionError, AttributeError, KeyError, ValueError):
        return target
    return f"{base}.{rest}" if rest else base


def _math_blocks(text: str) -> str:
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_BLOCK.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body: list[str] = []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        width = min(len(b) - len(b.lstrip()) for b in body if b.strip()) if body else 0
        out.append(f"{indent}```text\n")
        out.extend(f"{indent}{b[width:].rstrip()}\n" if b.strip() else "\n" for b in body)
        out.append(f"{indent}```\n\n")
    return "".join(out)


class SphinxRoles(Extension):
    """Rewrite Sphinx roles in every docstring of the loaded packages."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None or (":" not in docstring.value and ".." not in docstring.value):
            return

        def role(match: re.Match[str]) -> str:
            target = match["target"].strip()
            short = target.startswith("~")
            target = target.lstrip("~")
            shown = target.rsplit(".", 1)[-1] if short else target
            if match.group(1) in ("func", "meth"):
                shown += "()"
            path = _resolve(obj, target)
            return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

        value = _math_blocks(docstring.value)
        value = _MATH.sub(lambda m: f"`{m['body']}`", value)
        docstring.value = _ROLE.sub(role, value)
