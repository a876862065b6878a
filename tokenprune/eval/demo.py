"""The demo on the shipped toy model: every installed method at 11.1% of the visual tokens.

:func:`run_demo` evaluates the unpruned model, the ``oracle``, ``random``, ``cls_attention`` and
each installed reference method (DeSAP, when the ``tokenprune-desap`` plugin is installed, with
the toy model's paired CLIP as its text encoder) on 200 ``shapes`` test questions (40 per
family), prints the table and writes the report, the accuracy plot and one overlay PNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tokenprune.eval.fidelity import ORACLE, oracle_spec
from tokenprune.eval.models import ModelAssetsMissingError, toy_eval_model
from tokenprune.eval.report import Summary
from tokenprune.eval.runner import Budget, EvalSpec, PipelineSpec, capture_pruning, run_eval
from tokenprune.eval.tasks import ShapesTask
from tokenprune.plugin import Runtime

__all__ = ["DEMO_BUDGET", "DEMO_LIMIT", "demo_pipelines", "run_demo"]

DEMO_BUDGET = "0.111"
"""Fraction of visual tokens kept (16 of the toy model's 144)."""
DEMO_LIMIT = 40
"""Test questions per family (5 families: 200 questions)."""

_BASELINES: dict[str, dict[str, Any]] = {
    "random": {"scorer": {"name": "random", "seed": 0}, "selector": {"name": "topk"}},
    "cls_attention": {"scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}},
}


def _desap(clip_dir: Path) -> dict[str, Any]:
    return {
        "scorer": {
            "name": "desap",
            "layer": -1,
            "saliency_layer": -1,
            "encoding": "qq",
            "align": True,
            "lam": 0.1,
            "text_source": "clip",
            "text_encoder": str(clip_dir),
        },
        "selector": {"name": "desap_joint", "task_fraction": 0.5},
        "merger": {"name": "nearest_merge"},
    }


def _desap_dynamic(clip_dir: Path) -> dict[str, Any]:
    return {
        **_desap(clip_dir),
        "selector": {"name": "desap_dynamic", "min_task_fraction": 0.25, "max_task_fraction": 0.75},
    }


# Reference methods shipped as plugins: pipeline name -> config builder (given the CLIP
# directory). A method runs when every stage it names is installed.
REFERENCE_METHODS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "desap": _desap,
    "desap_dynamic": _desap_dynamic,
}


def _installed(config: dict[str, Any], runtime: Runtime) -> bool:
    return all(
        config[role]["name"] in runtime.stages.names(role)
        for role in ("scorer", "selector", "merger")
        if role in config
    )


def demo_pipelines(clip_dir: Path, runtime: Runtime | None = None) -> list[PipelineSpec]:
    """The demo's pipelines whose stages are installed (budget set later by the runner).

    The ``oracle`` (relevant tokens first, :func:`tokenprune.eval.fidelity.oracle_spec`) comes
    first: the upper bound of what a selection at this budget can keep.

    Args:
        clip_dir: Directory of the toy model's paired CLIP (text encoder of DeSAP).
        runtime: Runtime whose stages decide what is installed; a fresh one if omitted.
    """
    runtime = runtime or Runtime()
    configs = {**_BASELINES, **{name: build(clip_dir) for name, build in REFERENCE_METHODS.items()}}
    return [
        oracle_spec(float(DEMO_BUDGET)),
        *(
            PipelineSpec(name, {**cfg, "keep_ratio": float(DEMO_BUDGET)})
            for name, cfg in configs.items()
            if _installed(cfg, runtime)
        ),
    ]


def run_demo(
    out_dir: str | Path,
    *,
    limit: int = DEMO_LIMIT,
    batch_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
    plugins: Iterable[str | object] = (),
    echo: Callable[[str], object] = print,
) -> Summary:
    """Run the demo and write ``summary.md``, ``summary.csv``, ``accuracy.png``, ``overlay.png``.

    Args:
        out_dir: Output directory (existing results there are reused).
        limit: Test questions per family.
        batch_size: Questions per ``generate`` call.
        device: Device for the model.
        progress: Show a progress bar.
        plugins: Extra plugins for the runtime.
        echo: Where the table is printed.

    Returns:
        The summary.

    Raises:
        ModelAssetsMissingError: If the shipped model's files are missing (the message says
            which and how to get them).
    """
    from tokenprune.toy.model import ASSETS
    from tokenprune.viz.overlay import Panel, save_panels

    clip_dir = ASSETS / "clip"
    model = toy_eval_model(device)  # raises ModelAssetsMissingError with the reason
    if not clip_dir.is_dir():
        raise ModelAssetsMissingError(f"the paired CLIP of the toy model is missing: {clip_dir}")
    plugins = list(plugins)
    task = ShapesTask()
    pipelines = demo_pipelines(clip_dir, Runtime(plugins=plugins))
    if task.samples("test", 0, 1)[0].relevance is None:  # the oracle needs to know where
        pipelines = [p for p in pipelines if p.name != ORACLE]
    budget = Budget.parse(DEMO_BUDGET)
    spec = EvalSpec(
        task=task,
        pipelines=pipelines,
        budgets=[budget],
        split="test",
        seed=0,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=8,
    )
    out = Path(out_dir)
    summary = run_eval(model, spec, out, plugins=plugins, progress=progress)
    assert summary is not None  # single process: this is the main process
    echo(summary.to_markdown())

    sample = task.samples("test", 0, 1)[-1]  # a "describe the image" question
    captured = capture_pruning(
        model, sample, pipelines, budget, plugins=plugins, with_assignment=True
    )
    grid = next((r.grid for r in captured.values() if r.grid is not None), None)
    if grid is not None:
        panels = [Panel(sample.question)]
        for spec_ in pipelines:
            rec = captured[spec_.name]
            merged = spec_.config is not None and spec_.config.get("merger", {}).get(
                "name"
            ) not in (
                None,
                "drop",
            )
            panels.append(
                Panel(
                    f"{spec_.name} ({rec.keep_idx.shape[1]}/{rec.num_tokens})",
                    rec.keep_idx[0],
                    rec.assignment[0] if merged and rec.assignment is not None else None,
                )
            )
        path = save_panels(out / "overlay.png", sample.image, grid, panels, scale=4)
        echo(f"wrote {out / 'summary.md'}, {out / 'accuracy.png'} and {path}")
    return summary
