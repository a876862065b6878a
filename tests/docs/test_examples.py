"""Execute the Python examples of the documentation: docs/**/*.md and README.md.

Conventions for writing examples (documented for contributors here and in the docs' own pages):

- Every fenced ``python`` block runs. The blocks of one page run in order, in one namespace (a
  fresh module per page), with a fresh temporary directory as the working directory, so a later
  block may use names defined by an earlier one.
- A block whose first line starts with ``# docs: skip`` does not run. Use it for examples that
  download checkpoints or need a GPU, and say why after the marker:
  ``# docs: skip  (downloads llava-hf/llava-1.5-7b-hf)``.
- A block in another language with a file-name title, such as ``yaml title="pipeline.yaml"``, is
  written to that path in the temporary directory before the blocks after it run, so an example
  can load the configuration file shown just above it.
- ``--8<-- "path"`` snippet lines are expanded from the repository root, as pymdownx.snippets does
  when the site is built, so quoted files are executed as they are.

Examples must be fast (tiny models from ``tokenprune.testing`` only) and warning-free: the test
suite turns warnings into errors.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_MARKER = "# docs: skip"
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)(?P<attrs>.*)$"
)
_TITLE = re.compile(r"""title=(?P<q>["'])(?P<title>.*?)(?P=q)""")
_FILE_TITLE = re.compile(r"^[\w.-]+(/[\w.-]+)*\.\w+$")
_SNIPPET = re.compile(
    r"""^(?P<indent>[ \t]*)-{1,}8<-{1,}[ \t]+(?P<q>["'])(?P<path>[^"']+)(?P=q)[ \t]*$"""
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    path: Path
    line: int  # 1-based line of the first content line
    lang: str
    title: str | None
    code: str

    @property
    def skipped(self) -> bool:
        first = self.code.lstrip("\n").splitlines()[:1]
        return bool(first) and first[0].strip().startswith(SKIP_MARKER)


def _expand_snippets(code: str) -> str:
    lines = []
    for line in code.splitlines():
        match = _SNIPPET.match(line)
        if not match:
            lines.append(line)
            continue
        target, _, spec = match["path"].partition(":")
        text = (ROOT / target).read_text(encoding="utf-8").splitlines()
        if spec:
            start, _, end = spec.partition(":")
            text = text[int(start or 1) - 1 : int(end) if end else None]
        lines.extend(match["indent"] + t if t else t for t in text)
    return "\n".join(lines) + "\n"


def extract_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` (nested fences are not supported)."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        title = _TITLE.search(opening["attrs"])
        body: list[str] = []
        i += 1
        start = i + 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and not lines[i].strip().strip(fence[0])
        ):
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        blocks.append(
            Block(
                path=path,
                line=start,
                lang=opening["lang"].lower(),
                title=title["title"] if title else None,
                code=_expand_snippets("\n".join(body)),
            )
        )
    return blocks


def pages() -> list[Path]:
    return [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


def runnable_pages() -> list[Path]:
    return [
        p for p in pages() if any(b.lang == "python" and not b.skipped for b in extract_blocks(p))
    ]


def _page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# -- the parser itself ----------------------------------------------------------------------------


def test_extract_blocks_conventions(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        "```python\n"
        "x = 1\n"
        "```\n"
        "1. a list item\n"
        "\n"
        '    ```yaml title="conf.yaml"\n'
        "    keep: 4\n"
        "    ```\n"
        "````python\n"
        "# docs: skip  (needs a GPU)\n"
        "```\n"
        "````\n",
        encoding="utf-8",
    )
    first, second, third = extract_blocks(page)
    assert (first.lang, first.line, first.code, first.skipped) == ("python", 3, "x = 1\n", False)
    assert (second.lang, second.title, second.code) == ("yaml", "conf.yaml", "keep: 4\n")
    assert third.skipped


def test_the_docs_have_runnable_examples() -> None:
    assert len(runnable_pages()) >= 5


# -- the examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", runnable_pages(), ids=_page_id)
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = "docs_example_" + re.sub(r"\W", "_", _page_id(page))
    module = types.ModuleType(name)
    module.__file__ = str(page)
    monkeypatch.setitem(sys.modules, name, module)
    for block in extract_blocks(page):
        if block.lang == "python":
            if block.skipped:
                continue
            # Pad with blank lines so that tracebacks point at the line in the Markdown file.
            code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
            exec(code, module.__dict__)
        elif block.title and _FILE_TITLE.match(block.title):
            target = tmp_path / block.title
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code, encoding="utf-8")
