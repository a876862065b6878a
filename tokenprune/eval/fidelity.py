"""Is the measuring instrument faithful? Oracle, length control and the fidelity gates.

A pruning comparison on a small model says something only if the model reads what pruning keeps:
given the right tokens it must answer, and a shorter visual sequence must not by itself break
it. Three tools test that on tasks whose samples know where the answer is
(:attr:`tokenprune.eval.tasks.Sample.relevance`, e.g. ``shapes``):

* the **oracle** (:func:`oracle_spec`): keeps the relevant tokens first (most covered first),
  then fills the budget with its configured seeded random scorer: the upper-bound row;
* the **length control** (:func:`length_control_spec`): a method's own selection, but instead of
  dropping the other tokens it replaces their features by one constant background feature, so
  the sequence keeps its length. Real pruning scoring far below it means the model breaks on
  short sequences, not on missing information. It applies to pruning at the vision encoder (the
  filler is a vision-feature vector); LLM-side pipelines have no such control;
* :func:`run_fidelity` (``tokenprune toy fidelity``): unpruned accuracy, the oracle and every
  method at several budgets with both position policies and the length control, the
  well-formed share of every row, unpruned accuracy on a held-out seed, and the gates of
  :data:`GATES` with their measured values.

The ground truth reaches the oracle only through ``Sample.relevance`` of the samples of the
batch being answered: the runner builds the oracle's pipeline per batch
(:class:`tokenprune.eval.runner.PipelineFactory`). Nothing here is a registered stage.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from tokenprune.context import PruneContext
from tokenprune.errors import ConfigError, ShapeError
from tokenprune.eval.report import BASELINE, FULL_BUDGET, Summary, SummaryRow
from tokenprune.eval.runner import Budget, EvalSpec, PipelineSpec, parse_budgets, run_eval
from tokenprune.eval.tasks import EvalTaskError, Sample, Task
from tokenprune.pipeline import Pipeline
from tokenprune.plugin import Runtime
from tokenprune.stages.base import Scorer, StageConfig
from tokenprune.types import PrunedTokens

__all__ = [
    "FIDELITY_BUDGETS",
    "GATES",
    "LENGTH_SUFFIX",
    "ORACLE",
    "ORIGINAL_SUFFIX",
    "FidelityReport",
    "Gate",
    "LengthControl",
    "OracleScorer",
    "check_gates",
    "fidelity_pipelines",
    "length_control_spec",
    "oracle_spec",
    "run_fidelity",
]

ORACLE = "oracle"
"""Name of the oracle pipeline in results and tables."""
ORIGINAL_SUFFIX = "@original"
"""Suffix of a pipeline run with ``positions: original`` (kept tokens keep their position ids)."""
LENGTH_SUFFIX = "@length"
"""Suffix of a pipeline's length control."""
FIDELITY_BUDGETS = "0.333,0.111,0.056"
"""Budgets of the fidelity grid (48, 16 and 8 of the toy model's 144 tokens)."""


# -- the oracle ---------------------------------------------------------------------------------


class OracleScorerConfig(StageConfig):
    """Configuration of :class:`OracleScorer` (its relevance comes with each batch, not here)."""

    name: Literal["oracle"] = "oracle"


class OracleScorer(Scorer[OracleScorerConfig]):
    """Relevant tokens first (the most covered first), then the ``fill`` scorer's order.

    Scores are ``1 + w / (max w + 1)`` for relevant tokens (weight ``w > 0``) and the fill
    scorer's scores, squashed into ``[0, 1)``, for the rest; a top-k selector then keeps every
    relevant token the budget allows.

    Args:
        relevance: Per-token relevance weights of the batch (``> 0``: relevant).
        fill: Scorer that orders the other tokens (the configured seeded random scorer).

    Shape:
        - relevance: :math:`(B, N)`
        - output: :math:`(B, N)`

    Examples:
        >>> from tokenprune.stages.scorers.random import RandomScorer
        >>> from tokenprune.types import VisualTokens
        >>> rel = torch.tensor([[0.0, 3.0, 0.0, 1.0]])
        >>> ctx = PruneContext(visual=VisualTokens(torch.zeros(1, 4, 2)), keep=2)
        >>> OracleScorer(rel, RandomScorer(seed=0)).score(ctx).topk(2).indices.tolist()
        [[1, 3]]
    """

    name: ClassVar[str] = "oracle"
    Config: ClassVar[type[StageConfig]] = OracleScorerConfig

    def __init__(self, relevance: torch.Tensor, fill: Scorer[Any]) -> None:
        super().__init__()
        self.relevance = relevance
        self.fill = fill

    def score(self, ctx: PruneContext) -> torch.Tensor:
        """Return the oracle's scores for the batch (see the class docstring)."""
        b, n = ctx.visual.batch_size, ctx.visual.num_tokens
        if tuple(self.relevance.shape) != (b, n):
            raise ShapeError(
                f"oracle: the samples' relevance is {tuple(self.relevance.shape)} but the model "
                f"prunes (B, N) = {(b, n)} tokens; the task's relevance must have one entry per "
                "visual token of the model"
            )
        rel = self.relevance.to(ctx.visual.features.device, torch.float32)
        fill = self.fill.score(ctx)
        if not isinstance(fill, torch.Tensor):
            raise ConfigError("oracle: the fill scorer must return one score map")
        fill = fill.float()
        low, high = fill.amin(1, keepdim=True), fill.amax(1, keepdim=True)
        squashed = 0.999 * (fill - low) / (high - low).clamp_min(1e-12)
        top = 1.0 + rel / (rel.amax(1, keepdim=True) + 1.0)
        return torch.where(rel > 0, top, squashed)


def _relevance(samples: Sequence[Sample]) -> torch.Tensor:
    missing = [s.id for s in samples if s.relevance is None]
    if missing:
        raise EvalTaskError(
            f"the oracle needs samples that know where the answer is (Sample.relevance); "
            f"{missing[0]} has none. Use a task that provides it, such as 'shapes'"
        )
    return torch.as_tensor(np.stack([np.asarray(s.relevance) for s in samples]))


def _oracle_pipeline(
    config: Mapping[str, Any], samples: Sequence[Sample], runtime: Runtime
) -> Pipeline:
    base = runtime.build_pipeline(config)
    return Pipeline(
        OracleScorer(_relevance(samples), base.scorer),
        base.selector,
        base.merger,
        keep=base.keep,
        keep_ratio=base.keep_ratio,
        positions=base.positions,
        runtime=runtime,
    )


def oracle_spec(
    keep_ratio: float = 0.111,
    *,
    positions: Literal["contiguous", "original"] = "contiguous",
    seed: int = 0,
    name: str = ORACLE,
) -> PipelineSpec:
    """The oracle as a grid pipeline: relevant tokens first, seeded random fill, no merging.

    Its config (recorded in ``runs.jsonl``) is the random top-k pipeline of the fill; the
    runner replaces the scorer per batch with an :class:`OracleScorer` over the batch's
    :attr:`~tokenprune.eval.tasks.Sample.relevance`.

    Args:
        keep_ratio: Budget (replaced by each budget of the grid).
        positions: Position policy of the kept tokens.
        seed: Seed of the random fill.
        name: Pipeline name.
    """
    config = {
        "scorer": {"name": "random", "seed": seed},
        "selector": {"name": "topk"},
        "merger": {"name": "drop"},
        "keep_ratio": keep_ratio,
        "positions": positions,
    }
    return PipelineSpec(name, config, factory=_oracle_pipeline)


# -- the length control -------------------------------------------------------------------------


class LengthControl(Pipeline):
    """A pipeline's selection with the sequence length kept: dropped tokens become ``filler``.

    The wrapped pipeline runs at its own budget (its observers see its real selection); its
    output tokens are put back at their original indices and every other position gets the
    constant ``filler`` feature, so the language model receives all ``N`` positions with their
    original position ids. Only pruning at the vision encoder can be wrapped.

    Args:
        inner: The pipeline whose selection is kept.
        filler: The feature of every dropped token (pruning space, e.g. a background patch's
            tower feature), :math:`(D,)`.

    Raises:
        ConfigError: If ``inner`` prunes inside the language model.

    Examples:
        >>> from tokenprune.stages.scorers.random import RandomScorer
        >>> from tokenprune.stages.selectors.topk import TopKSelector
        >>> from tokenprune.types import VisualTokens
        >>> inner = Pipeline(RandomScorer(seed=0), TopKSelector(), keep=2)
        >>> lc = LengthControl(inner, torch.full((3,), -1.0))
        >>> x = torch.arange(12.0).reshape(1, 4, 3)
        >>> out = lc(PruneContext(visual=VisualTokens(x), keep=lc.budget(4)))
        >>> out.features.shape[1], int((out.features == -1).all(-1).sum())
        (4, 2)
    """

    def __init__(self, inner: Pipeline, filler: torch.Tensor) -> None:
        if inner.llm or not inner.has_encoder_stage:
            raise ConfigError(
                "the length control replaces dropped vision tokens by a constant feature; it "
                "applies to pruning at the vision encoder, not inside the language model"
            )
        super().__init__(
            inner.scorer, inner.selector, inner.merger, keep_ratio=1.0, positions="original"
        )
        self.inner = inner
        self.filler = filler

    def __call__(self, ctx: PruneContext) -> PrunedTokens:
        """Run the inner pipeline, then restore all ``N`` positions (see the class docstring)."""
        b, n = ctx.visual.batch_size, ctx.visual.num_tokens
        feats = ctx.visual.features
        if self.filler.shape != (feats.shape[-1],):
            raise ShapeError(
                f"length control: the filler has shape {tuple(self.filler.shape)}, the tokens "
                f"have D={feats.shape[-1]} features"
            )
        pruned = self.inner(dataclasses.replace(ctx, keep=self.inner.budget(n)))
        out = self.filler.to(feats).expand(b, n, -1).clone()
        index = pruned.keep_idx[..., None].expand(-1, -1, out.shape[-1])
        out.scatter_(1, index, pruned.features.to(out.dtype))
        every = torch.arange(n, device=feats.device).expand(b, n)
        return PrunedTokens(out, every, torch.ones(b, n, device=feats.device))


def length_control_spec(spec: PipelineSpec, filler: torch.Tensor) -> PipelineSpec:
    """``spec``'s selection with the sequence length kept, named ``<name>@length``.

    Args:
        spec: A pipeline pruning at the vision encoder (an oracle spec included).
        filler: The constant feature of the dropped tokens, :math:`(D,)`.
    """
    if spec.config is None:
        raise ConfigError("the unpruned baseline has no length control")
    inner_factory = spec.factory
    built: dict[str, tuple[Runtime, LengthControl]] = {}  # per budget (config): built once

    def build(config: Mapping[str, Any], samples: Sequence[Sample], runtime: Runtime) -> Pipeline:
        if inner_factory is not None:  # depends on the batch (the oracle)
            return LengthControl(inner_factory(config, samples, runtime), filler)
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in built or built[key][0] is not runtime:
            # stages may load weights (DeSAP's text encoder): build once, not per batch
            built[key] = (runtime, LengthControl(runtime.build_pipeline(config), filler))
        return built[key][1]

    return PipelineSpec(spec.name + LENGTH_SUFFIX, spec.config, factory=build)


def _with_positions(spec: PipelineSpec, positions: str, suffix: str) -> PipelineSpec:
    assert spec.config is not None
    return PipelineSpec(
        spec.name + suffix, {**spec.config, "positions": positions}, factory=spec.factory
    )


def _prunes_in_llm(spec: PipelineSpec) -> bool:
    return bool(spec.config and spec.config.get("llm"))


def fidelity_pipelines(methods: Iterable[PipelineSpec], filler: torch.Tensor) -> list[PipelineSpec]:
    """The oracle and each method, each as contiguous, ``@original`` and ``@length`` rows.

    LLM-side methods get no length control (see :class:`LengthControl`).
    """
    out = []
    for spec in [oracle_spec(), *methods]:
        if spec.config is None:
            continue
        out.append(_with_positions(spec, "contiguous", ""))
        out.append(_with_positions(spec, "original", ORIGINAL_SUFFIX))
        if not _prunes_in_llm(spec):
            out.append(length_control_spec(_with_positions(spec, "contiguous", ""), filler))
    return out


# -- gates --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """One fidelity requirement and what was measured.

    Attributes:
        name: What is required, in words.
        passed: Whether the measurement meets it (``None``: not measured).
        measured: The measured value(s), in words.
    """

    name: str
    passed: bool | None
    measured: str


UNPRUNED_TARGETS: dict[str, float] = {
    "attribute": 0.97,
    "existence": 0.95,
    "counting": 0.85,
    "spatial": 0.85,
    "describe": 0.95,
    "overall": 0.90,
}
"""Unpruned accuracy the instrument must reach per family."""
GATES = (
    "unpruned accuracy: attribute >= 97, existence >= 95, counting >= 85, spatial >= 85, "
    "describe >= 95, overall >= 90 (%)",
    "oracle (real pruning, contiguous) >= 95 % of unpruned on attribute and existence at 0.111, "
    ">= 90 % at 0.056",
    "every method at 0.333 and 0.111: real pruning within 5 points overall of its length control",
    "oracle >= random at every budget (real pruning, contiguous)",
    ">= 99 % well-formed answers for every method at every budget (real pruning)",
    "unpruned accuracy on a held-out seed within 3 points of the evaluated split",
)
"""The gates :func:`check_gates` evaluates, in order."""


def _acc(row: SummaryRow, family: str) -> float | None:
    return row.accuracy if family == "overall" else row.family_accuracy.get(family)


def check_gates(
    summary: Summary,
    heldout: SummaryRow | None,
    *,
    methods: Sequence[str],
    budgets: Sequence[str],
    random_name: str = "random",
) -> list[Gate]:
    """Evaluate :data:`GATES` on a fidelity summary.

    Args:
        summary: The fidelity grid's summary (rows named as :func:`fidelity_pipelines` does).
        heldout: The unpruned row on the held-out seed, if measured.
        methods: Method names (without suffixes), the oracle excluded.
        budgets: Budget labels of the grid.
        random_name: The method the oracle must beat.

    Returns:
        One :class:`Gate` per entry of :data:`GATES`.
    """
    rows = {(r.pipeline, r.budget): r for r in summary.rows}
    base = rows.get((BASELINE, FULL_BUDGET))
    gates = []
    if base is None:
        return [Gate(g, None, "no unpruned row") for g in GATES]
    # 1. unpruned targets
    parts, ok = [], True
    for fam, target in UNPRUNED_TARGETS.items():
        value = _acc(base, fam)
        ok &= value is not None and value >= target
        parts.append(f"{fam} {_p(value)} (>= {100 * target:.0f})")
    gates.append(Gate(GATES[0], ok, ", ".join(parts)))
    # 2. oracle retention on attribute and existence
    parts, ok, seen = [], True, False
    for budget, need in (("0.111", 0.95), ("0.056", 0.90)):
        row = rows.get((ORACLE, budget))
        if row is None:
            continue
        for fam in ("attribute", "existence"):
            value, ref = _acc(row, fam), _acc(base, fam)
            share = value / ref if value is not None and ref else None
            seen = True
            ok &= share is not None and share >= need
            parts.append(f"{fam} @ {budget}: {_p(share)} % of unpruned (>= {100 * need:.0f})")
    gates.append(Gate(GATES[1], ok if seen else None, "; ".join(parts) or "not measured"))
    # 3. real pruning vs length control
    parts, ok, seen = [], True, False
    for name in (ORACLE, *methods):
        for budget in ("0.333", "0.111"):
            real, ctrl = rows.get((name, budget)), rows.get((name + LENGTH_SUFFIX, budget))
            if real is None or ctrl is None:
                continue
            seen = True
            gap = 100 * (real.accuracy - ctrl.accuracy)
            ok &= abs(gap) <= 5.0
            parts.append(f"{name} @ {budget}: {gap:+.1f}")
    gates.append(Gate(GATES[2], ok if seen else None, "; ".join(parts) or "not measured"))
    # 4. oracle >= random
    parts, ok, seen = [], True, False
    for budget in budgets:
        oracle, rand = rows.get((ORACLE, budget)), rows.get((random_name, budget))
        if oracle is None or rand is None:
            continue
        seen = True
        ok &= oracle.accuracy >= rand.accuracy
        parts.append(f"{budget}: {_p(oracle.accuracy)} vs {_p(rand.accuracy)}")
    gates.append(Gate(GATES[3], ok if seen else None, "; ".join(parts) or "not measured"))
    # 5. well-formed answers under real pruning
    real_rows = [
        r for r in summary.rows if not r.pipeline.endswith(LENGTH_SUFFIX) and r.pipeline != BASELINE
    ]
    known = [r for r in real_rows if r.well_formed is not None]
    worst = min(known, key=lambda r: r.well_formed or 0.0, default=None)
    gates.append(
        Gate(
            GATES[4],
            None if worst is None else all((r.well_formed or 0.0) >= 0.99 for r in known),
            "not measured"
            if worst is None
            else f"lowest: {worst.pipeline} @ {worst.budget} {_p(worst.well_formed)} %; "
            f"{sum((r.well_formed or 0.0) < 0.99 for r in known)} of {len(known)} rows below 99",
        )
    )
    # 6. held-out seed
    if heldout is None:
        gates.append(Gate(GATES[5], None, "not measured"))
    else:
        gap = 100 * (heldout.accuracy - base.accuracy)
        gates.append(
            Gate(
                GATES[5],
                abs(gap) <= 3.0,
                f"held-out {_p(heldout.accuracy)} vs {_p(base.accuracy)} ({gap:+.1f})",
            )
        )
    return gates


def _p(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


# -- the command ----------------------------------------------------------------------------------


@dataclass
class FidelityReport:
    """What :func:`run_fidelity` measured.

    Attributes:
        summary: The grid's summary (unpruned, oracle and every method, three variants each).
        heldout: The unpruned row on the held-out seed (``None`` when skipped).
        gates: The gates with their measured values.
        methods: Method names of the grid (oracle excluded).
    """

    summary: Summary
    heldout: SummaryRow | None
    gates: list[Gate]
    methods: list[str]

    def table(self) -> str:
        """Markdown: per method and budget, accuracy / well-formed (%) of every variant."""
        rows = {(r.pipeline, r.budget): r for r in self.summary.rows}
        budgets = [b for b in dict.fromkeys(r.budget for r in self.summary.rows) if b != "full"]
        head = (
            "| method | budget | contiguous | original | length control | real - control "
            "| recall | hit rate |"
        )
        lines = [head, "|---" * 8 + "|"]
        for name in (ORACLE, *self.methods):
            for budget in budgets:
                real = rows.get((name, budget))
                if real is None:
                    continue
                orig = rows.get((name + ORIGINAL_SUFFIX, budget))
                ctrl = rows.get((name + LENGTH_SUFFIX, budget))
                gap = f"{100 * (real.accuracy - ctrl.accuracy):+.1f}" if ctrl is not None else "n/a"
                lines.append(
                    f"| {name} | {budget} | {_cell(real)} | {_cell(orig)} | {_cell(ctrl)} "
                    f"| {gap} | {_p(real.recall)} | {_p(real.hit_rate)} |"
                )
        return "\n".join(lines) + "\n"

    def unpruned_table(self) -> str:
        """Markdown: unpruned accuracy per family (and on the held-out seed)."""
        rows = [r for r in self.summary.rows if r.pipeline == BASELINE]
        labels = ["evaluated split"] * len(rows)
        if self.heldout is not None:
            rows.append(self.heldout)
            labels.append("held-out seed")
        fams = self.summary.families
        lines = [
            "| unpruned | " + " | ".join(fams) + " | overall | 95% CI | well-formed |",
            "|---" * (len(fams) + 4) + "|",
        ]
        for label, r in zip(labels, rows, strict=True):
            cells = " | ".join(_p(r.family_accuracy.get(f)) for f in fams)
            ci = f"{_p(r.accuracy_ci[0])}-{_p(r.accuracy_ci[1])}"
            lines.append(f"| {label} | {cells} | {_p(r.accuracy)} | {ci} | {_p(r.well_formed)} |")
        return "\n".join(lines) + "\n"

    def gates_table(self) -> str:
        """Markdown: each gate, pass/fail and the measured values."""
        lines = ["| gate | result | measured |", "|---|---|---|"]
        for g in self.gates:
            verdict = {True: "pass", False: "**FAIL**", None: "not measured"}[g.passed]
            lines.append(f"| {g.name} | {verdict} | {g.measured} |")
        return "\n".join(lines) + "\n"

    def to_markdown(self, title: str) -> str:
        """The whole report."""
        return (
            f"# {title}\n\nCells: accuracy / well-formed answers, in % (overall). "
            "contiguous / original: real pruning, kept tokens renumbered / keeping their "
            "position ids; length control: the same selection, dropped tokens replaced by a "
            "constant background feature, sequence length unchanged.\n\n"
            + self.unpruned_table()
            + "\n"
            + self.table()
            + "\n## Gates\n\n"
            + self.gates_table()
        )

    def card_section(self, command: str) -> str:
        """The model card's ``## Fidelity gates`` section: the command, unpruned rows, gates."""
        return (
            f"{CARD_HEADING}\nMeasured by `{command}`.\n\n"
            + self.unpruned_table()
            + "\n"
            + self.gates_table()
        )

    def to_json(self) -> dict[str, Any]:
        """The gates and the rows as plain data."""
        return {
            "gates": [dataclasses.asdict(g) for g in self.gates],
            "rows": [dataclasses.asdict(r) for r in self.summary.rows],
            "heldout": dataclasses.asdict(self.heldout) if self.heldout else None,
        }


CARD_HEADING = "## Fidelity gates"


def write_card_section(card: Path, section: str) -> None:
    """Put ``section`` into a model card, replacing an earlier ``## Fidelity gates`` section.

    A new section goes before ``## How this toy differs``, or at the end.

    Args:
        card: The ``MODEL_CARD.md`` path.
        section: The section, starting with its heading (:meth:`FidelityReport.card_section`).

    Raises:
        FileNotFoundError: If the card does not exist.
    """
    text = card.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == CARD_HEADING), None)
    if start is not None:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines[start:end] = [section.rstrip("\n") + "\n\n"]
    else:
        at = next(
            (i for i, ln in enumerate(lines) if ln.startswith("## How this toy differs")),
            len(lines),
        )
        lines[at:at] = [section.rstrip("\n") + "\n\n"]
    card.write_text("".join(lines), encoding="utf-8")


def _cell(row: SummaryRow | None) -> str:
    if row is None:
        return "-"
    return f"{_p(row.accuracy)} / {_p(row.well_formed)}"


def run_fidelity(
    model: Any,
    task: Task,
    methods: Sequence[PipelineSpec],
    filler: torch.Tensor,
    out_dir: str | Path,
    *,
    budgets: str = FIDELITY_BUDGETS,
    split: str = "test",
    seed: int = 0,
    heldout_seed: int | None = 1,
    limit: int | None = 40,
    batch_size: int = 16,
    plugins: Iterable[str | object] = (),
    progress: bool = True,
    echo: Callable[[str], object] = print,
) -> FidelityReport:
    """Run the fidelity grid and the held-out check; write ``fidelity.md`` and ``.json``.

    Args:
        model: The evaluation model (:class:`tokenprune.eval.models.EvalModel`).
        task: A task whose samples carry :attr:`~tokenprune.eval.tasks.Sample.relevance`.
        methods: The methods to check (one config each; budgets are replaced).
        filler: Constant feature of the length control's dropped tokens, :math:`(D,)`.
        out_dir: Output directory: ``grid/`` and ``heldout/`` hold resumable runs.
        budgets: Budgets of the grid.
        split: Split of the grid.
        seed: Task seed of the grid.
        heldout_seed: Task seed never used in training (``None``: skip that check).
        limit: Samples per family.
        batch_size: Questions per ``generate`` call.
        plugins: Extra plugins for the runtime.
        progress: Show progress bars.
        echo: Where the report is printed.

    Returns:
        The report.
    """
    out = Path(out_dir)
    names = [m.name for m in methods]
    if ORACLE in names or len(set(names)) != len(names):
        raise ConfigError(f"method names must be unique and not {ORACLE!r}: {names}")
    grid: list[Budget] = parse_budgets(budgets)
    spec = EvalSpec(
        task=task,
        pipelines=fidelity_pipelines(methods, filler),
        budgets=grid,
        split=split,
        seed=seed,
        limit=limit,
        batch_size=batch_size,
    )
    summary = run_eval(model, spec, out / "grid", plugins=plugins, progress=progress)
    assert summary is not None
    heldout = None
    if heldout_seed is not None:
        base = dataclasses.replace(spec, pipelines=[], seed=heldout_seed)
        held = run_eval(model, base, out / "heldout", plugins=plugins, progress=progress)
        assert held is not None
        heldout = next(r for r in held.rows if r.pipeline == BASELINE)
    random_name = next(
        (
            m.name
            for m in methods
            if m.config is not None and (m.config.get("scorer") or {}).get("name") == "random"
        ),
        "random",
    )
    gates = check_gates(
        summary, heldout, methods=names, budgets=[b.label for b in grid], random_name=random_name
    )
    report = FidelityReport(summary, heldout, gates, names)
    title = f"Fidelity of the model on {task.name} ({split}, seed {seed}, {limit} per family)"
    (out / "fidelity.md").write_text(report.to_markdown(title), encoding="utf-8")
    (out / "fidelity.json").write_text(
        json.dumps(report.to_json(), indent=2, default=str) + "\n", encoding="utf-8"
    )
    echo(report.to_markdown(title))
    return report


# -- the shipped toy model ------------------------------------------------------------------------


FASTV: dict[str, Any] = {
    "llm": [
        {
            "layer": 2,
            "scorer": {"name": "fastv"},
            "selector": {"name": "topk"},
            "merger": {"name": "drop"},
            "keep_ratio": 0.5,
        }
    ]
}
"""FastV with the paper's layer (K = 2); its budget is set by the grid."""


def installed_methods(clip_dir: Path, runtime: Runtime) -> list[PipelineSpec]:
    """Every installed method: tokenprune's own presets, FastV and the reference methods.

    Preset ``<method>-<budget>`` becomes method ``<method>`` (presets that plugins register
    for other models are left out); DeSAP and its dynamic split (when their plugins are
    installed) use ``clip_dir`` as their text encoder, as in the demo.

    Args:
        clip_dir: The toy model's paired CLIP directory.
        runtime: Runtime whose presets and stages decide what is installed.
    """
    from tokenprune.eval.demo import demo_pipelines

    own = Path(__file__).resolve().parents[1] / "presets"
    out: dict[str, dict[str, Any]] = {}
    for preset in runtime.presets.names():
        value = runtime.presets.get(preset)
        if isinstance(value, Path) and value.resolve().parent == own:
            out.setdefault(preset.rsplit("-", 1)[0], runtime.load_config(value).to_dict())
    out["fastv"] = FASTV
    for spec in demo_pipelines(clip_dir, runtime):  # the installed reference methods
        if spec.name != ORACLE and spec.name not in out and spec.config is not None:
            out[spec.name] = dict(spec.config)
    return [PipelineSpec(name, config) for name, config in out.items()]


def background_feature(module: torch.nn.Module, *, scenes: int = 64, seed: int = 0) -> torch.Tensor:
    """The toy model's constant background feature, for the length control.

    The mean pruning-space feature of the patches that cover no object pixel, over ``scenes``
    validation scenes. It carries nothing from any particular image; the length control fills
    dropped positions with it.

    Args:
        module: The toy ``LlavaForConditionalGeneration``.
        scenes: Validation scenes averaged over.
        seed: Task seed of the scenes.

    Returns:
        The feature, :math:`(D,)`, in the dtype of the vision tower.
    """
    from tokenprune.toy import task as toy_task
    from tokenprune.toy.model import pixel_values

    images, empty = [], []
    for i in range(scenes):
        scene = toy_task.sample_scene(
            toy_task.rng_for(toy_task.SPLITS["validation"], seed, "bg", i)
        )
        image, obj_map = toy_task.render(scene)
        images.append(image)
        empty.append(toy_task.patch_pixel_counts(obj_map >= 0) == 0)
    inner: Any = getattr(module, "model", module)
    layer = int(getattr(module, "config").vision_feature_layer)  # noqa: B009
    tower = inner.vision_tower
    device = next(tower.parameters()).device
    with torch.no_grad():
        states = tower(
            pixel_values=pixel_values(np.stack(images)).to(device, next(tower.parameters()).dtype),
            output_hidden_states=True,
        ).hidden_states[layer][:, 1:]
    mask = torch.as_tensor(np.stack(empty), device=device)
    feature: torch.Tensor = states[mask].mean(0)
    return feature
