"""The training script's pure parts: command line, recipe, model-card status."""

from __future__ import annotations

from tokenprune.toy.train import Recipe, _status, parse_args


def test_command_line_sets_the_recipe() -> None:
    args, recipe = parse_args(
        ["--run-dir", "RUN", "--a-lr", "0.003", "--a-target", "0.9", "--c-steps", "10", "--finish"]
    )
    assert args.finish
    assert (recipe.a_lr, recipe.a_target, recipe.c_steps) == (0.003, 0.9, 10)
    assert parse_args(["--run-dir", "RUN"])[1] == Recipe()


def test_status_says_where_training_stopped_and_which_targets_are_missed() -> None:
    recipe = Recipe(c_steps=2000)
    test = {"accuracy": {"attribute": 0.5, "existence": 0.95, "overall": 0.71}}
    text = _status(recipe, {"stopped_at": 700, "test": test})
    assert "step 700 of the 2000-step" in text
    assert "**not met** (attribute 0.500 < 0.9)." in text
    met = {"accuracy": {"attribute": 0.91, "existence": 0.95, "overall": 0.71}}
    assert "Targets" in _status(recipe, {"stopped_at": 2000, "test": met})
    assert "stopped" not in _status(recipe, {"stopped_at": 2000, "test": met})
    assert _status(recipe, {}) == ""
