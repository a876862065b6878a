"""``python -m tokenprune.eval.lmms_eval``: print the task directory for ``--include_path``.

``python -m tokenprune.eval.lmms_eval --write-docs`` regenerates the
``tokenprune_shapes`` sample list from :mod:`tokenprune.toy.task` instead.
"""

from __future__ import annotations

import sys

from tokenprune.eval.lmms_eval import TASKS_DIR


def main(argv: list[str]) -> int:
    """Print :data:`TASKS_DIR`, or rewrite the shapes docs file with ``--write-docs``."""
    if argv == ["--write-docs"]:
        from tokenprune.eval.lmms_eval.shapes import DOCS_FILE, write_docs

        print(f"wrote {write_docs(DOCS_FILE)} docs to {DOCS_FILE}")
        return 0
    if argv:
        print("usage: python -m tokenprune.eval.lmms_eval [--write-docs]", file=sys.stderr)
        return 2
    print(TASKS_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
