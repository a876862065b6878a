"""Evaluation tasks: a small typed registry of (image, question, answer) datasets.

A task turns ``(split, seed, limit per family)`` into a deterministic list of
:class:`Sample` objects and scores a prediction against a reference answer. The built-in
``shapes`` task wraps the procedurally generated task of the shipped toy model
(:mod:`tokenprune.toy.task`); more tasks are added with :meth:`TaskRegistry.register` or named on
the command line as ``package.module:factory``.

Examples:
    >>> task = get_task("shapes")
    >>> samples = task.samples("test", seed=0, limit=1)
    >>> [s.family for s in samples]
    ['attribute', 'existence', 'counting', 'spatial', 'describe']
    >>> samples[0].image.shape, samples[0].image.dtype
    ((96, 96, 3), dtype('uint8'))
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from tokenprune.errors import TokenPruneError

__all__ = [
    "TASKS",
    "EvalTaskError",
    "Sample",
    "ShapesTask",
    "Task",
    "TaskFactory",
    "TaskRegistry",
    "get_task",
    "limit_per_family",
]

_FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class EvalTaskError(TokenPruneError, ValueError):
    """A task name is unknown, a task factory cannot be imported, or a split is invalid."""


@dataclass(frozen=True, eq=False)
class Sample:
    """One evaluation item: an image and a question about it.

    Attributes:
        id: Unique, stable identifier within the task (part of the results key, so it must not
            change between runs; include the split and seed when they change the content).
        index: Position in the task's canonical order (used to sort results).
        family: Question family (accuracy is reported per family).
        image: RGB image, ``uint8``.
        question: The question text given to the model.
        answer: The reference answer.
        relevance: Where the answer is, for tasks that know it: one non-negative weight per
            visual token of the image in the model's raster order (``> 0``: the token is
            *relevant*, it overlaps what the question is about; larger: more of it). ``None``
            when the task does not know. This is the one path by which ground truth reaches the
            selection metrics and the ``oracle`` pipeline (:mod:`tokenprune.eval.fidelity`).

    Shape:
        - image: :math:`(H, W, 3)`
        - relevance: :math:`(N,)`
    """

    id: str
    index: int
    family: str
    image: np.ndarray
    question: str
    answer: str
    relevance: np.ndarray | None = None


class Task(ABC):
    """An evaluation task: deterministic samples and a scoring rule.

    :meth:`samples` must return the same samples in the same order every time it is called with
    the same arguments (in every process of a data-parallel run), with ids that are unique and
    stable across runs: the runner resumes and shards by them.

    Class attributes:
        name: Registry name, also recorded in ``runs.jsonl``.
        families: Question families in report order.
        default_limit: Samples per family when no limit is given (``None``: all).
    """

    name: str = "task"
    families: tuple[str, ...] = ()
    default_limit: int | None = None

    @abstractmethod
    def samples(self, split: str, seed: int, limit: int | None) -> list[Sample]:
        """Return the samples of ``split``, at most ``limit`` per family, in canonical order.

        Args:
            split: Split name (``test``, ``validation``, ...).
            seed: Dataset seed (for generated tasks).
            limit: Maximum samples per family; :attr:`default_limit` when ``None``.

        Raises:
            EvalTaskError: If the split is unknown.
        """

    def score(self, prediction: str, answer: str) -> bool:
        """Whether ``prediction`` answers correctly (default: case- and space-insensitive match)."""
        return " ".join(prediction.lower().split()) == " ".join(answer.lower().split())

    def well_formed(self, prediction: str, sample: Sample) -> bool | None:
        """Whether ``prediction`` is an answer the sample's family can have, right or wrong.

        ``None`` (the default) when the task has no closed answer set.
        """
        del prediction, sample
        return None


TaskFactory = Callable[[], Task]
"""Anything that builds a task: a :class:`Task` subclass or a function returning one."""


def limit_per_family(samples: Iterable[Sample], limit: int | None) -> list[Sample]:
    """Keep the first ``limit`` samples of every family (all of them when ``limit`` is None).

    Examples:
        >>> img = np.zeros((2, 2, 3), np.uint8)
        >>> items = [Sample(f"{f}{i}", i, f, img, "q", "a") for i, f in enumerate("aabab")]
        >>> [s.id for s in limit_per_family(items, 1)]
        ['a0', 'b2']
    """
    if limit is None:
        return list(samples)
    if limit < 1:
        raise EvalTaskError(f"the limit per family must be at least 1, got {limit}")
    seen: dict[str, int] = {}
    out = []
    for sample in samples:
        if seen.get(sample.family, 0) < limit:
            seen[sample.family] = seen.get(sample.family, 0) + 1
            out.append(sample)
    return out


class TaskRegistry:
    """Task factories by name.

    Examples:
        >>> reg = TaskRegistry()
        >>> reg.register("shapes", ShapesTask)
        >>> reg.names(), type(reg.get("shapes")).__name__
        (['shapes'], 'ShapesTask')
    """

    def __init__(self) -> None:
        self._factories: dict[str, TaskFactory] = {}

    def register(self, name: str, factory: TaskFactory, *, replace: bool = False) -> None:
        """Register ``factory`` under ``name``.

        Raises:
            EvalTaskError: If the name is taken and ``replace`` is false.
        """
        if name in self._factories and not replace:
            raise EvalTaskError(f"task {name!r} is already registered; pass replace=True")
        self._factories[name] = factory

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error if absent)."""
        self._factories.pop(name, None)

    def names(self) -> list[str]:
        """Registered task names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, spec: str) -> Task:
        """Build the task named ``spec``, or import ``package.module:factory`` and call it.

        Raises:
            EvalTaskError: If the name is unknown or the factory cannot be imported, or does not
                return a :class:`Task`.
        """
        if spec in self._factories:
            factory = self._factories[spec]
        elif _FACTORY_SPEC.match(spec):
            factory = _import_factory(spec)
        else:
            raise EvalTaskError(
                f"unknown task {spec!r}; registered: {', '.join(self.names()) or 'none'} "
                "(or give an importable factory as package.module:function)"
            )
        task = factory()
        if not isinstance(task, Task):
            raise EvalTaskError(f"task factory {spec!r} returned {type(task).__name__}, not a Task")
        return task


def _import_factory(spec: str) -> TaskFactory:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EvalTaskError(f"cannot import task module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise EvalTaskError(f"{module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


class ShapesTask(Task):
    """The ``shapes`` task of the shipped toy model (:mod:`tokenprune.toy.task`).

    Five families (attribute, existence, counting, spatial, describe) with balanced answers,
    96x96 scenes, exact match after the task's own normalisation. Sample ids are
    ``<split>-s<seed>-<family>-<index>``; the default limit is 40 per family (200 questions).
    Every sample carries its :attr:`Sample.relevance`: the pixels of the objects the question
    is about (:func:`tokenprune.toy.task.named_objects`) under each of the 144 patches.
    """

    name = "shapes"
    default_limit: int | None = 40

    def __init__(self) -> None:
        from tokenprune.toy import task as toy_task

        self._toy = toy_task
        self.families = toy_task.FAMILIES

    def samples(self, split: str, seed: int, limit: int | None) -> list[Sample]:
        if split not in self._toy.SPLITS:
            raise EvalTaskError(
                f"unknown split {split!r} for task 'shapes'; expected one of "
                f"{', '.join(self._toy.SPLITS)}"
            )
        per_family = limit if limit is not None else self.default_limit
        assert per_family is not None
        if per_family < 1:
            raise EvalTaskError(f"the limit per family must be at least 1, got {per_family}")
        out = []
        for index, example in enumerate(self._toy.make_split(split, seed, per_family)):
            family = example.question.family
            image, obj_map = self._toy.render(example.scene)
            out.append(
                Sample(
                    id=f"{split}-s{seed}-{family}-{example.seed_key[2]:04d}",
                    index=index,
                    family=family,
                    image=image,
                    question=example.question.text,
                    answer=example.question.answer,
                    relevance=self._toy.relevant_patches(example.scene, example.question, obj_map),
                )
            )
        return out

    def score(self, prediction: str, answer: str) -> bool:
        return bool(self._toy.is_correct(prediction, answer))

    def well_formed(self, prediction: str, sample: Sample) -> bool | None:
        return bool(self._toy.is_well_formed(prediction, sample.family))


TASKS = TaskRegistry()
"""The global task registry (``tokenprune eval --task NAME``)."""
TASKS.register("shapes", ShapesTask)


def get_task(spec: str) -> Task:
    """Build a task from :data:`TASKS` by name, or from a ``package.module:factory`` spec."""
    return TASKS.get(spec)
