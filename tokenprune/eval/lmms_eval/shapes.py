"""The ``tokenprune_shapes`` lmms-eval task: the shipped toy model's questions, fully offline.

lmms-eval tasks load their documents with ``datasets.load_dataset``. This one reads a small
JSON-lines file shipped next to its YAML (``dataset_path: json``; lmms-eval resolves the
relative ``data_files`` path against the YAML's directory), so nothing is downloaded. Each line
holds only the key of a question (split, seed, family, per-family index) with its text and
answer; :func:`doc_to_visual` renders the image again from :mod:`tokenprune.toy.task`, exactly
as ``tokenprune eval --task shapes`` does.

The file lists the 200 ``test`` questions of seed 0 (40 per family) interleaved by family:
question ``i`` of every family, then question ``i + 1``. So ``lmms_eval --limit 5k`` evaluates
exactly the samples of ``tokenprune eval --limit k`` (``k`` per family). Scoring is
:meth:`tokenprune.eval.ShapesTask.score`: exact match after the task's normalisation.

Regenerate the file with ``python -m tokenprune.eval.lmms_eval --write-docs``; a test
checks that the shipped file equals :func:`shapes_docs`.

Examples:
    >>> docs = shapes_docs(per_family=1)
    >>> [d["family"] for d in docs]
    ['attribute', 'existence', 'counting', 'spatial', 'describe']
    >>> docs[0]["sample_id"], doc_to_text(docs[0]) == docs[0]["question"]
    ('test-s0-attribute-0000', True)
    >>> process_results(docs[0], [docs[0]["answer"].upper() + "."])
    {'exact_match': 1.0}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenprune.eval.lmms_eval import TASKS_DIR
from tokenprune.eval.tasks import ShapesTask

__all__ = [
    "DOCS_FILE",
    "METRIC",
    "PER_FAMILY",
    "doc_to_text",
    "doc_to_visual",
    "process_results",
    "shapes_docs",
    "write_docs",
]

DOCS_FILE = TASKS_DIR / "tokenprune_shapes" / "shapes_test.jsonl"
"""The shipped document list (``test`` split, seed 0, 40 questions per family)."""
PER_FAMILY = 40
METRIC = "exact_match"


def shapes_docs(
    split: str = "test", seed: int = 0, per_family: int = PER_FAMILY
) -> list[dict[str, Any]]:
    """Return the task's documents: the ``shapes`` samples of ``tokenprune eval``, interleaved.

    Args:
        split: Task split (``test``, ``validation``).
        seed: Dataset seed.
        per_family: Questions per family.

    Returns:
        One dict per question: ``sample_id`` (the id ``tokenprune eval`` gives it), ``split``,
        ``seed``, ``family``, ``example`` (index within the family), ``question``, ``answer``.

    Raises:
        EvalTaskError: If the split is unknown or ``per_family`` is below 1.
    """
    task = ShapesTask()
    samples = task.samples(split, seed, per_family)
    by_family = {f: [s for s in samples if s.family == f] for f in task.families}
    docs = []
    for example in range(per_family):
        for family in task.families:
            sample = by_family[family][example]
            docs.append(
                {
                    "sample_id": sample.id,
                    "split": split,
                    "seed": seed,
                    "family": family,
                    "example": example,
                    "question": sample.question,
                    "answer": sample.answer,
                }
            )
    return docs


def write_docs(path: Path = DOCS_FILE) -> int:
    """Write :func:`shapes_docs` as JSON lines to ``path``; return the number of documents."""
    docs = shapes_docs()
    path.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs), encoding="utf-8")
    return len(docs)


def doc_to_visual(doc: Mapping[str, Any]) -> list[Any]:
    """Render the document's scene: one RGB ``PIL.Image`` (96 x 96), as lmms-eval expects."""
    from PIL import Image

    from tokenprune.toy import task as toy_task

    example = toy_task.make_example(
        str(doc["split"]), int(doc["seed"]), str(doc["family"]), int(doc["example"])
    )
    image, _ = toy_task.render(example.scene)
    return [Image.fromarray(image)]


def doc_to_text(
    doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None
) -> str:
    """The question, with the optional ``pre_prompt`` / ``post_prompt`` of the task config."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Score the model's answer with the ``shapes`` task's own exact match (``tokenprune eval``)."""
    return {METRIC: float(ShapesTask().score(results[0], str(doc["answer"])))}
