"""The task registry and the ``shapes`` wrapper (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from tokenprune.eval.tasks import (
    TASKS,
    EvalTaskError,
    Sample,
    ShapesTask,
    Task,
    TaskRegistry,
    get_task,
    limit_per_family,
)
from tokenprune.toy import task as toy


def test_shapes_wraps_the_toy_task() -> None:
    shapes = get_task("shapes")
    assert isinstance(shapes, ShapesTask)
    assert shapes.families == toy.FAMILIES
    samples = shapes.samples("test", 0, 2)
    examples = toy.make_split("test", 0, 2)
    assert len(samples) == len(examples) == 2 * len(toy.FAMILIES)
    for i, (s, ex) in enumerate(zip(samples, examples, strict=True)):
        assert s.index == i
        assert (s.family, s.question, s.answer) == (
            ex.question.family, ex.question.text, ex.question.answer,
        )  # fmt: skip
        assert s.image.shape == (96, 96, 3)
        assert s.image.dtype == np.uint8
        np.testing.assert_array_equal(s.image, toy.render(ex.scene)[0])
    assert len({s.id for s in samples}) == len(samples)
    assert samples[0].id == "test-s0-attribute-0000"
    assert shapes.score("The Red.", "red")
    assert not shapes.score("blue", "red")
    # Ids depend on split and seed, so results of different splits never collide.
    assert shapes.samples("validation", 0, 1)[0].id != shapes.samples("test", 0, 1)[0].id
    assert shapes.samples("test", 1, 1)[0].id != samples[0].id


def test_shapes_errors() -> None:
    with pytest.raises(EvalTaskError, match="unknown split 'dev'"):
        ShapesTask().samples("dev", 0, 1)
    with pytest.raises(EvalTaskError, match="at least 1"):
        ShapesTask().samples("test", 0, 0)


class _Two(Task):
    name = "two"
    families = ("a", "b")

    def samples(self, split: str, seed: int, limit: int | None) -> list[Sample]:
        img = np.zeros((4, 4, 3), np.uint8)
        items = [Sample(f"{f}{i}", i, f, img, "Q", "A") for i, f in enumerate("abab")]
        return limit_per_family(items, limit)


def make_two() -> Task:
    return _Two()


def test_registry() -> None:
    reg = TaskRegistry()
    reg.register("two", _Two)
    assert "two" in reg
    assert reg.names() == ["two"]
    with pytest.raises(EvalTaskError, match="already registered"):
        reg.register("two", _Two)
    reg.register("two", make_two, replace=True)
    assert [s.id for s in reg.get("two").samples("test", 0, 1)] == ["a0", "b1"]
    assert not reg.get("two").score("b", "A")
    assert reg.get("two").score(" a ", "A")
    with pytest.raises(EvalTaskError, match="unknown task 'nope'; registered: two"):
        reg.get("nope")
    reg.unregister("two")
    assert reg.names() == []
    assert "shapes" in TASKS.names()


def test_factory_specs() -> None:
    with pytest.raises(EvalTaskError, match="cannot import task module"):
        get_task("no_such_module_xyz:make")
    with pytest.raises(EvalTaskError, match="has no callable"):
        get_task("tokenprune.eval.tasks:nothing_here")
    with pytest.raises(EvalTaskError, match="not a Task"):
        get_task("tokenprune.eval.tasks:TaskRegistry")
    assert isinstance(get_task("tokenprune.eval.tasks:ShapesTask"), ShapesTask)


def test_shapes_samples_carry_relevance_and_well_formedness() -> None:
    shapes = ShapesTask()
    samples = shapes.samples("test", 0, 2)
    examples = toy.make_split("test", 0, 2)
    empty: list[tuple[str, str]] = []
    for s, ex in zip(samples, examples, strict=True):
        assert s.relevance is not None
        assert s.relevance.shape == (toy.NUM_PATCHES,)
        assert (s.relevance >= 0).all()
        obj_map = toy.render(ex.scene)[1]
        np.testing.assert_array_equal(
            s.relevance, toy.relevant_patches(ex.scene, ex.question, obj_map)
        )
        if not (s.relevance > 0).any():
            empty.append((s.family, s.answer))
        assert shapes.well_formed(s.answer, s) is True
    # Only "how many ...? zero" (and an absent object sharing nothing) may have no relevant token.
    assert all(
        (family == "counting" and answer == "zero") or (family == "existence" and answer == "no")
        for family, answer in empty
    )
    assert ("counting", "zero") in empty  # the first counting sample asks for zero
    attribute = next(s for s in samples if s.family == "attribute")
    assert shapes.well_formed("The Purple.", attribute) is True
    assert shapes.well_formed("yes", attribute) is False
    counting = next(s for s in samples if s.family == "counting")
    assert shapes.well_formed("3", counting) is True
    assert shapes.well_formed("red", counting) is False


def test_tasks_without_an_answer_set_cannot_tell_well_formedness() -> None:
    task = _Two()
    sample = task.samples("test", 0, 1)[0]
    assert sample.relevance is None
    assert task.well_formed("anything", sample) is None
