"""Evaluation of pruning pipelines: tasks, models, the resumable data-parallel runner, reports.

The command line is ``tokenprune eval`` (see the how-to page "Evaluate pipelines"); the same
grid runs from Python::

    from tokenprune.eval import Budget, EvalSpec, PipelineSpec, get_task, run_eval, toy_eval_model

    spec = EvalSpec(
        task=get_task("shapes"),
        pipelines=[PipelineSpec("random", {"scorer": {"name": "random"},
                                           "selector": {"name": "topk"}, "keep": 16})],
        budgets=[Budget.parse("0.111")],
    )
    summary = run_eval(toy_eval_model(), spec, "eval-out")
    print(summary.to_markdown())
"""

from __future__ import annotations

from tokenprune.eval.models import (
    EvalModel,
    EvalModelError,
    ModelAssetsMissingError,
    ProcessorEvalModel,
    hf_eval_model,
    load_eval_model,
    toy_eval_model,
)
from tokenprune.eval.parallel import ProcessInfo, current_process
from tokenprune.eval.report import Summary, SummaryRow, plot_accuracy, summarize, write_report
from tokenprune.eval.runner import (
    Budget,
    EvalSpec,
    PipelineSpec,
    PruneRecord,
    PruneRecorder,
    capture_pruning,
    load_pipeline_spec,
    parse_budgets,
    run_eval,
)
from tokenprune.eval.tasks import TASKS, EvalTaskError, Sample, ShapesTask, Task, get_task

__all__ = [
    "TASKS",
    "Budget",
    "EvalModel",
    "EvalModelError",
    "EvalSpec",
    "EvalTaskError",
    "ModelAssetsMissingError",
    "PipelineSpec",
    "ProcessInfo",
    "ProcessorEvalModel",
    "PruneRecord",
    "PruneRecorder",
    "Sample",
    "ShapesTask",
    "Summary",
    "SummaryRow",
    "Task",
    "capture_pruning",
    "current_process",
    "get_task",
    "hf_eval_model",
    "load_eval_model",
    "load_pipeline_spec",
    "parse_budgets",
    "plot_accuracy",
    "run_eval",
    "summarize",
    "toy_eval_model",
    "write_report",
]
