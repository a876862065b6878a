"""The evaluation runner: a task x pipeline x budget grid, resumable, data-parallel.

For every pipeline and budget the runner installs the re-budgeted pipeline with
:func:`tokenprune.apply`, answers the task's questions in batches with greedy ``generate``
(text-guided pipelines receive the questions as ``tokenprune_query``), and appends one JSON line
per (pipeline, budget, sample) to its shard file. The main process then merges the shards into
``OUT/results.jsonl``, appends the run's metadata to ``OUT/runs.jsonl`` and writes
``summary.md``, ``summary.csv`` and ``accuracy.png``. Keys already in ``OUT`` are skipped, so an
interrupted run resumes where it stopped.

How many tokens each image kept is observed, not recomputed: a :class:`PruneRecorder` is
registered on the plugin runtime and implements the ``tokenprune_after_prune`` hook.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from tokenprune.api import apply
from tokenprune.errors import BudgetError, ConfigError
from tokenprune.eval.models import EvalModel
from tokenprune.eval.parallel import (
    ProcessInfo,
    assign_batches,
    dump_record,
    has_records,
    merge_results,
    read_records,
    shard_path,
)
from tokenprune.eval.report import BASELINE, FULL_BUDGET, Summary, summarize, write_report
from tokenprune.eval.tasks import Sample, Task
from tokenprune.plugin import Runtime, hookimpl

if TYPE_CHECKING:
    from tokenprune.context import PruneContext
    from tokenprune.pipeline import Pipeline
    from tokenprune.types import PrunedTokens

__all__ = [
    "DEFAULT_BUDGETS",
    "RECORDER_NAME",
    "RUNS_FILE",
    "SETUP_FILE",
    "Budget",
    "EvalSpec",
    "Job",
    "PipelineSpec",
    "PruneRecord",
    "PruneRecorder",
    "capture_pruning",
    "check_setup",
    "finalize",
    "load_pipeline_spec",
    "model_fingerprint",
    "parse_budgets",
    "plan_jobs",
    "rebudget",
    "run_eval",
    "run_shard",
]

DEFAULT_BUDGETS = "1.0,0.333,0.222,0.111,0.056"
RUNS_FILE = "runs.jsonl"
SETUP_FILE = "setup.json"
"""What the records of an output directory were produced with; a resume must match it."""
RECORDER_NAME = "tokenprune.eval.recorder"


# -- budgets and pipelines ----------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A token budget: a count (``keep``) or a fraction (``keep_ratio``).

    Attributes:
        label: The budget as written (results key and table column).
        keep: Tokens to keep per image, or ``None``.
        keep_ratio: Fraction of tokens to keep, or ``None``.

    Examples:
        >>> Budget.parse("0.111")
        Budget(label='0.111', keep=None, keep_ratio=0.111)
        >>> Budget.parse("64")
        Budget(label='64', keep=64, keep_ratio=None)
    """

    label: str
    keep: int | None = None
    keep_ratio: float | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``"0.111"`` (a ratio in (0, 1], written with a point) or ``"64"`` (a count).

        Raises:
            BudgetError: If the text is neither, or out of range.
        """
        label = text.strip()
        try:
            if label.isdigit():
                keep = int(label)
                if keep < 1:
                    raise ValueError
                return cls(label, keep=keep)
            ratio = float(label)
        except ValueError:
            raise BudgetError(
                f"budget {text!r} is neither a ratio in (0, 1] (like 0.111) nor a positive token "
                "count (like 64)"
            ) from None
        if not 0.0 < ratio <= 1.0:
            raise BudgetError(f"budget ratio {text!r} must be in (0, 1]")
        return cls(label, keep_ratio=ratio)


def parse_budgets(text: str | Iterable[str]) -> list[Budget]:
    """Parse comma-separated budgets (``"1.0,0.333,64"``); duplicates are an error.

    Examples:
        >>> [b.label for b in parse_budgets("1.0, 0.111,64")]
        ['1.0', '0.111', '64']
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    budgets = [Budget.parse(t) for t in items if t.strip()]
    if not budgets:
        raise BudgetError("give at least one budget")
    labels = [b.label for b in budgets]
    if len(set(labels)) != len(labels):
        raise BudgetError(f"duplicate budgets in {', '.join(labels)}")
    return budgets


class PipelineFactory(Protocol):
    """Builds the pipeline of one batch, for pipelines that depend on the samples.

    The ``oracle`` reads each sample's :attr:`~tokenprune.eval.tasks.Sample.relevance`; the
    length control wraps a configured pipeline (:mod:`tokenprune.eval.fidelity`).
    """

    def __call__(
        self, config: Mapping[str, Any], samples: Sequence[Sample], runtime: Runtime
    ) -> Pipeline:
        """Return the pipeline for ``samples`` (``config`` already carries the grid budget)."""
        ...


@dataclass(frozen=True)
class PipelineSpec:
    """A named pipeline of the grid.

    Attributes:
        name: Name in the results and the table (a config file's stem).
        config: The pipeline config as a mapping; its budget is replaced by each budget of the
            grid. ``None`` is the unpruned baseline.
        factory: Builds the pipeline per batch from the re-budgeted config and the batch's
            samples; ``None``: built once per budget from the config.
    """

    name: str
    config: Mapping[str, Any] | None = None
    factory: PipelineFactory | None = None

    @property
    def is_baseline(self) -> bool:
        """Whether this is the unpruned model."""
        return self.config is None


def load_pipeline_spec(path: str | Path, runtime: Runtime) -> PipelineSpec:
    """Read and validate a config file; the pipeline is named after the file stem.

    ``unpruned`` names the baseline and ``oracle`` the oracle of tasks that know where the answer
    is (:func:`tokenprune.eval.fidelity.oracle_spec`); neither needs a file.

    Raises:
        ConfigError: If the file is invalid, or its stem is ``unpruned`` or ``oracle``.
    """
    from tokenprune.eval.fidelity import ORACLE, oracle_spec

    if str(path) == BASELINE:
        return PipelineSpec(BASELINE)
    if str(path) == ORACLE:
        return oracle_spec()
    p = Path(path)
    if p.stem in (BASELINE, ORACLE):
        raise ConfigError(f"{p}: the name {p.stem!r} is reserved; rename the file")
    return PipelineSpec(p.stem, runtime.load_config(p).to_dict())


def rebudget(config: Mapping[str, Any], budget: Budget, runtime: Runtime) -> dict[str, Any]:
    """Return ``config`` with its budget replaced by ``budget`` (validated by ``runtime``).

    Examples:
        >>> rt = Runtime(autoload=False)
        >>> cfg = {"scorer": {"name": "random"}, "selector": {"name": "topk"}, "keep": 64}
        >>> rebudget(cfg, Budget.parse("0.5"), rt)["keep_ratio"]
        0.5
    """
    llm = list(config.get("llm") or ())
    if not llm:
        data = {k: v for k, v in config.items() if k not in ("keep", "keep_ratio")}
        data.update(_budget_fields(budget))
        return runtime.parse_config(data).to_dict()
    # Pruning inside the LLM: the budget is what the last position keeps (what the deeper
    # layers see); an encoder stage before it keeps its own budget.
    data = dict(config)
    last = {k: v for k, v in llm[-1].items() if k not in ("keep", "keep_ratio")}
    if budget.keep_ratio is None:
        last.update(_budget_fields(budget))
    else:
        earlier = [s.get("keep_ratio") for s in llm[:-1]]
        if config.get("scorer") is not None:
            earlier.insert(0, config.get("keep_ratio"))
        if any(r is None for r in earlier):
            raise ConfigError(
                "a ratio budget needs every earlier pruning position to use keep_ratio (the "
                "last position's ratio is taken relative to what arrives there); give budgets "
                "as token counts for this pipeline"
            )
        arriving = float(np.prod(earlier)) if earlier else 1.0
        if budget.keep_ratio > arriving:
            raise ConfigError(
                f"budget {budget.label} keeps more than the {arriving:g} of the tokens that "
                f"earlier pruning positions let through; use budgets <= {arriving:g}"
            )
        last["keep_ratio"] = budget.keep_ratio / arriving
    data["llm"] = [*llm[:-1], last]
    return runtime.parse_config(data).to_dict()


def _budget_fields(budget: Budget) -> dict[str, Any]:
    if budget.keep is not None:
        return {"keep": budget.keep}
    return {"keep_ratio": budget.keep_ratio}


@dataclass(frozen=True)
class Job:
    """One (pipeline, budget) of the grid; ``config`` is ``None`` for the baseline."""

    pipeline: str
    budget: str
    config: Mapping[str, Any] | None
    factory: PipelineFactory | None = None


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate.

    Attributes:
        task: The task.
        pipelines: Pipelines to compare; the unpruned baseline is added first if missing.
        budgets: Budgets applied to every pipeline.
        split: Task split.
        seed: Task seed.
        limit: Samples per family (``None``: the task's default).
        batch_size: Samples per ``generate`` call.
        max_new_tokens: Generation length limit.
    """

    task: Task
    pipelines: Sequence[PipelineSpec]
    budgets: Sequence[Budget]
    split: str = "test"
    seed: int = 0
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        names = [p.name for p in self.pipelines]
        if len(set(names)) != len(names):
            raise ConfigError(f"pipeline names must be unique, got {', '.join(names)}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be at least 1")

    def all_pipelines(self) -> list[PipelineSpec]:
        """The pipelines with the baseline first."""
        rest = [p for p in self.pipelines if not p.is_baseline]
        return [PipelineSpec(BASELINE), *rest]


def plan_jobs(spec: EvalSpec, runtime: Runtime) -> list[Job]:
    """The grid in table order: the baseline, then every pipeline at every budget."""
    jobs = []
    for p in spec.all_pipelines():
        if p.config is None:
            jobs.append(Job(BASELINE, FULL_BUDGET, None))
            continue
        for b in spec.budgets:
            jobs.append(Job(p.name, b.label, rebudget(p.config, b, runtime), p.factory))
    return jobs


# -- observing the pruning ----------------------------------------------------------------------


@dataclass(frozen=True)
class PruneRecord:
    """What one pruning call produced (copied to the CPU as numpy arrays).

    Attributes:
        keep_idx: Original index of each output token, per image.
        weights: Tokens each output token stands for (all ones when nothing was merged).
        num_tokens: Tokens per image before pruning ``N``.
        grid: ``(height, width)`` of the patch grid, if the tokens form one.
        assignment: Original index of the output token every input token is closest to (cosine
            similarity of the pruning-space features; kept tokens map to themselves), if asked.

    Shape:
        - keep_idx, weights: :math:`(B, K)`
        - assignment: :math:`(B, N)`
    """

    keep_idx: np.ndarray
    weights: np.ndarray
    num_tokens: int
    grid: tuple[int, int] | None
    assignment: np.ndarray | None = None


class PruneRecorder:
    """An observer plugin: records every pruning call through ``tokenprune_after_prune``.

    Register it on the runtime the pipelines are built with
    (``Runtime(plugins=[recorder])``); it never touches the model.

    Args:
        with_assignment: Also compute :attr:`PruneRecord.assignment` (for merge overlays).
    """

    def __init__(self, *, with_assignment: bool = False) -> None:
        self.__name__ = RECORDER_NAME  # the plugin name the runtime registers it under
        self.with_assignment = with_assignment
        self.records: list[PruneRecord] = []

    @hookimpl
    def tokenprune_after_prune(
        self, ctx: PruneContext, pruned: PrunedTokens, pipeline: Pipeline
    ) -> None:
        """Record the kept indices of one pruning call."""
        del pipeline
        keep_idx = pruned.keep_idx.detach()
        assignment = None
        if self.with_assignment:
            feats = torch.nn.functional.normalize(ctx.visual.features.detach().float(), dim=-1)
            kept = torch.gather(feats, 1, keep_idx[..., None].expand(-1, -1, feats.shape[-1]))
            nearest = torch.einsum("bnd,bkd->bnk", feats, kept).argmax(-1)
            owner = torch.gather(keep_idx, 1, nearest)
            owner.scatter_(1, keep_idx, keep_idx)  # kept tokens represent themselves
            assignment = owner.cpu().numpy()
        self.records.append(
            PruneRecord(
                keep_idx=keep_idx.cpu().numpy(),
                weights=pruned.weights.detach().float().cpu().numpy(),
                num_tokens=ctx.visual.num_tokens,
                grid=ctx.visual.grid,
                assignment=assignment,
            )
        )

    def clear(self) -> None:
        """Forget the recorded calls."""
        self.records.clear()

    def counts_per_image(self) -> list[tuple[int, int]]:
        """``(kept, total)`` per image, over all recorded calls in call order."""
        return [(int(r.keep_idx.shape[1]), r.num_tokens) for r in self.records for _ in r.keep_idx]

    def kept_per_sample(self, batch_size: int) -> list[np.ndarray] | None:
        """Original indices of the tokens each sample kept, through every pruning position.

        Assumes one image per sample: the recorded rows are the batch's samples, position after
        position. An LLM position's indices refer to the tokens arriving there, so they are
        composed with the positions before it. For a merging method the kept indices are the
        tokens its outputs are anchored at (:attr:`PrunedTokens.keep_idx`); tokens merged into
        an output are not counted as kept.

        Args:
            batch_size: Samples in the batch.

        Returns:
            One sorted index array per sample, or ``None`` when the calls do not form whole
            positions of the batch (several images per sample, say).
        """
        rows = [(row, r.num_tokens) for r in self.records for row in r.keep_idx]
        if not rows or len(rows) % batch_size:
            return None
        out = []
        for i in range(batch_size):
            current = np.arange(rows[i][1])
            for row, total in rows[i::batch_size]:
                if total != len(current):
                    return None
                current = current[row]
            out.append(np.sort(current))
        return out


# -- running ------------------------------------------------------------------------------------


def _versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("tokenprune", "torch", "transformers", "accelerate", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _generate_kwargs(job: Job, questions: list[str]) -> dict[str, Any]:
    return {} if job.config is None else {"tokenprune_query": questions}


def _records_for_batch(
    job: Job,
    batch: Sequence[Sample],
    answers: Sequence[str],
    counts: list[tuple[int, int]],
    task: Task,
    kept: Sequence[np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    if len(answers) != len(batch):
        raise RuntimeError(f"the model returned {len(answers)} answers for {len(batch)} questions")
    # One image per sample: the recorder saw one row per sample and pruning position, in batch
    # order, positions in order. Kept = at the last position; total = before the first.
    per_sample = None
    if counts and len(counts) % len(batch) == 0:
        first, last = counts[: len(batch)], counts[-len(batch) :]
        per_sample = [(last[i][0], first[i][1]) for i in range(len(batch))]
    out = []
    for i, (sample, answer) in enumerate(zip(batch, answers, strict=True)):
        out.append(
            {
                "pipeline": job.pipeline,
                "budget": job.budget,
                "sample_id": sample.id,
                "index": sample.index,
                "family": sample.family,
                "question": sample.question,
                "answer": sample.answer,
                "prediction": answer,
                "correct": bool(task.score(answer, sample.answer)),
                "kept_tokens": [per_sample[i][0]] if per_sample else None,
                "total_tokens": [per_sample[i][1]] if per_sample else None,
                "well_formed": task.well_formed(answer, sample),
                **_selection_fields(
                    sample,
                    kept[i] if kept is not None else None,
                    per_sample[i][1] if per_sample else None,
                ),
            }
        )
    return out


def _selection_fields(
    sample: Sample, kept: np.ndarray | None, num_tokens: int | None
) -> dict[str, Any]:
    """``kept_idx``, ``relevant_total`` and ``relevant_kept`` of one sample's record.

    The relevant counts are ``None`` unless the task gives the sample a relevance map with one
    entry per visual token of the image (``num_tokens``) and the kept indices are known.
    """
    fields: dict[str, Any] = {
        "kept_idx": kept.tolist() if kept is not None else None,
        "relevant_total": None,
        "relevant_kept": None,
    }
    rel = sample.relevance
    if rel is not None and kept is not None and num_tokens == len(rel):
        relevant = np.asarray(rel) > 0
        fields["relevant_total"] = int(relevant.sum())
        fields["relevant_kept"] = int(relevant[kept].sum())
    return fields


def _answer(
    model: EvalModel, job: Job, batch: Sequence[Sample], runtime: Runtime, max_new_tokens: int
) -> list[str]:
    """Answer one batch; a job with a factory installs its per-batch pipeline around it."""
    questions = [s.question for s in batch]
    handle = None
    if job.factory is not None and job.config is not None:
        pipeline = job.factory(job.config, batch, runtime)
        handle = apply(model.module, pipeline, runtime=runtime)
    try:
        return model.generate(
            [s.image for s in batch],
            questions,
            max_new_tokens=max_new_tokens,
            **_generate_kwargs(job, questions),
        )
    finally:
        if handle is not None:
            handle.remove()


def _runtime(plugins: Iterable[str | object], recorder: PruneRecorder) -> Runtime:
    return Runtime(plugins=[*plugins, recorder])


def run_shard(
    model: EvalModel,
    spec: EvalSpec,
    out_dir: Path,
    *,
    process: ProcessInfo | None = None,
    plugins: Iterable[str | object] = (),
    progress: bool = True,
    finished: Collection[tuple[str, str, str]] | None = None,
) -> int:
    """Evaluate this process's share of the unfinished grid; append it to its shard file.

    The finished keys are read before a first barrier, so no process sees another's new
    records; batches are dealt with :func:`~tokenprune.eval.parallel.assign_batches`.

    Args:
        model: The model.
        spec: The grid.
        out_dir: Output directory.
        process: This process's rank (single process if omitted).
        plugins: Plugins for the runtime the pipelines are built with.
        progress: Show a progress bar (main process only).
        finished: Keys ``(pipeline, budget, sample_id)`` to treat as done, instead of reading
            them from ``out_dir`` (every process must use the same set).

    Returns:
        The number of records this process wrote.
    """
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    process = process or ProcessInfo()
    out_dir.mkdir(parents=True, exist_ok=True)
    recorder = PruneRecorder()
    runtime = _runtime(plugins, recorder)
    jobs = plan_jobs(spec, runtime)
    samples = spec.task.samples(spec.split, spec.seed, spec.limit)
    done = set(read_records(out_dir)) if finished is None else set(finished)
    process.barrier()
    work = []
    for job in jobs:
        pending = [s for s in samples if (job.pipeline, job.budget, s.id) not in done]
        batches = assign_batches(pending, spec.batch_size, process.index, process.count)
        if batches:
            work.append((job, batches))
    total = sum(len(b) for _, batches in work for b in batches)
    written = 0
    path = shard_path(out_dir, process.index, process.count)
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=total, unit="q", desc="eval", disable=not (progress and process.is_main) or None
    )
    try:
        with path.open("a", encoding="utf-8") as shard:
            for job, batches in work:
                bar.set_description(f"{job.pipeline} @ {job.budget}")
                handle = (
                    None
                    if job.config is None or job.factory is not None
                    else apply(model.module, runtime.build_pipeline(job.config), runtime=runtime)
                )
                try:
                    for batch in batches:
                        recorder.clear()
                        answers = _answer(model, job, batch, runtime, spec.max_new_tokens)
                        counts = recorder.counts_per_image() if job.config is not None else []
                        kept = recorder.kept_per_sample(len(batch)) if counts else None
                        for rec in _records_for_batch(job, batch, answers, counts, spec.task, kept):
                            shard.write(dump_record(rec) + "\n")
                            written += 1
                        shard.flush()
                        bar.update(len(batch))
                finally:
                    if handle is not None:
                        handle.remove()
    finally:
        bar.close()
    return written


def finalize(
    spec: EvalSpec,
    out_dir: Path,
    *,
    run_info: Mapping[str, Any] | None = None,
    plugins: Iterable[str | object] = (),
) -> Summary:
    """Merge the shards, write the report and append the run to ``runs.jsonl`` (main process).

    Args:
        spec: The grid (the report covers exactly its keys).
        out_dir: Output directory.
        run_info: Extra fields for the ``runs.jsonl`` entry (model, timing, processes, ...).
        plugins: Plugins of the run's runtime (recorded with their versions).

    Returns:
        The summary.
    """
    records = merge_results(out_dir)
    runtime = _runtime(plugins, PruneRecorder())
    jobs = plan_jobs(spec, runtime)
    wanted = {s.id for s in spec.task.samples(spec.split, spec.seed, spec.limit)}
    grid = [(j.pipeline, j.budget) for j in jobs]
    summary = summarize(
        (r for r in records if r["sample_id"] in wanted), grid, families=spec.task.families
    )
    title = f"{spec.task.name} ({spec.split}, seed {spec.seed}, {len(wanted)} questions)"
    write_report(summary, out_dir, title=title)
    configs: dict[str, Any] = {}
    for job in jobs:
        configs.setdefault(job.pipeline, {})[job.budget] = (
            dict(job.config) if job.config is not None else None
        )
    entry = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        **(run_info or {}),
        "task": spec.task.name,
        "split": spec.split,
        "seed": spec.seed,
        "limit": spec.limit,
        "samples": len(wanted),
        "batch_size": spec.batch_size,
        "max_new_tokens": spec.max_new_tokens,
        "budgets": [b.label for b in spec.budgets],
        "pipelines": configs,
        "versions": _versions(),
        "plugins": [
            {"name": p.name, "provider": p.provider, "source": p.source}
            for p in runtime.plugins
            if p.name != RECORDER_NAME
        ],
        "argv": sys.argv,
    }
    with (out_dir / RUNS_FILE).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")
    return summary


def run_eval(
    model: EvalModel,
    spec: EvalSpec,
    out_dir: str | Path,
    *,
    process: ProcessInfo | None = None,
    plugins: Iterable[str | object] = (),
    progress: bool = True,
    model_name: str | None = None,
) -> Summary | None:
    """Run the grid (this process's share), then merge and report on the main process.

    Args:
        model: The model.
        spec: The grid.
        out_dir: Output directory (created; existing results are resumed when its
            ``setup.json`` matches this run's model fingerprint, task and generation length).
        process: This process's rank (single process if omitted).
        plugins: Plugins for the runtime the pipelines are built with.
        progress: Show a progress bar.
        model_name: Model description for ``runs.jsonl`` (``model.name`` by default).

    Returns:
        The summary on the main process, ``None`` on the others.
    """
    process = process or ProcessInfo()
    out = Path(out_dir)
    plugins = list(plugins)
    start = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    setup = {
        "model_fingerprint": model_fingerprint(model.module),
        "task": spec.task.name,
        "max_new_tokens": spec.max_new_tokens,
    }
    check_setup(out, setup, write=process.is_main)
    before = len(read_records(out)) if process.is_main else 0
    run_shard(model, spec, out, process=process, plugins=plugins, progress=progress)
    process.barrier()
    if not process.is_main:
        return None
    summary = finalize(
        spec,
        out,
        plugins=plugins,
        run_info={
            "started": started,
            "duration_s": round(time.perf_counter() - start, 3),
            "model": model_name or model.name,
            "model_fingerprint": setup["model_fingerprint"],
            "num_processes": process.count,
            "new_records": len(read_records(out)) - before,
        },
    )
    return summary


def model_fingerprint(module: torch.nn.Module) -> str:
    """Return a short hash of a model's weights, to tell checkpoints apart.

    It covers every parameter's and buffer's name, shape and dtype, and up to 1,024 evenly
    strided values of each (tensors on the ``meta`` device contribute their name, shape and
    dtype only), so it is cheap even for billion-parameter models and changes with any retrained
    or differently loaded checkpoint.

    Args:
        module: The model.

    Returns:
        16 hexadecimal digits.

    Examples:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> fa, fb = model_fingerprint(a), model_fingerprint(b)
        >>> len(fa), fa == model_fingerprint(a), fa == fb
        (16, True, False)
    """
    digest = hashlib.sha256()
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if tensor.is_meta or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024]
        digest.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_setup(out_dir: Path, setup: Mapping[str, Any], *, write: bool) -> None:
    """Refuse to add records to an output directory made with another model or settings.

    ``out_dir/setup.json`` records the model fingerprint, task and generation length of the
    records in ``out_dir``; a resume that differs in any of them would mix two evaluations in
    one table.

    Args:
        out_dir: Output directory.
        setup: This run's setup (JSON-serialisable).
        write: Write ``setup.json`` when it is missing (the main process).

    Raises:
        ConfigError: ``setup.json`` exists and differs from ``setup``, or it is missing but
            ``out_dir`` already holds records.
    """
    path = out_dir / SETUP_FILE
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = [key for key in setup if recorded.get(key) != setup[key]]
        if changed:
            diff = "; ".join(f"{k}: {recorded.get(k)!r} there, {setup[k]!r} now" for k in changed)
            raise ConfigError(
                f"{out_dir} holds results of another evaluation ({diff}); resuming would mix "
                "them in one table. Use a new --out, or delete that directory's results.jsonl, "
                f"shards and {SETUP_FILE} to start over"
            )
    elif has_records(out_dir):
        raise ConfigError(
            f"{out_dir} holds results but no {SETUP_FILE} (written by an older tokenprune), so "
            "which model produced them cannot be checked. Use a new --out, or delete that "
            "directory's results.jsonl and shards to start over"
        )
    elif write:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dict(setup), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


# -- one sample, for overlays -------------------------------------------------------------------


def capture_pruning(
    model: EvalModel,
    sample: Sample,
    pipelines: Sequence[PipelineSpec],
    budget: Budget | None = None,
    *,
    plugins: Iterable[str | object] = (),
    with_assignment: bool = False,
) -> dict[str, PruneRecord]:
    """Run each pipeline's prefill on one sample and return what it kept.

    Args:
        model: The model.
        sample: The sample.
        pipelines: Pipelines (the baseline is skipped).
        budget: Budget override; each config's own budget when omitted.
        plugins: Plugins for the runtime.
        with_assignment: Also compute the nearest kept token of every token.

    Returns:
        The first pruning call of each pipeline, by pipeline name.

    Raises:
        RuntimeError: If a pipeline never pruned (the model did not call it).
    """
    recorder = PruneRecorder(with_assignment=with_assignment)
    runtime = _runtime(plugins, recorder)
    out: dict[str, PruneRecord] = {}
    for spec in pipelines:
        if spec.config is None:
            continue
        config = rebudget(spec.config, budget, runtime) if budget else dict(spec.config)
        recorder.clear()
        pipeline = (
            spec.factory(config, [sample], runtime)
            if spec.factory is not None
            else runtime.build_pipeline(config)
        )
        with apply(model.module, pipeline, runtime=runtime):
            model.generate(
                [sample.image],
                [sample.question],
                max_new_tokens=1,
                tokenprune_query=[sample.question],
            )
        if not recorder.records:
            raise RuntimeError(f"pipeline {spec.name!r} did not prune anything on this model")
        out[spec.name] = recorder.records[0]
    return out
