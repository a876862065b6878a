"""The fidelity tools (tokenprune.eval.fidelity): oracle, length control, gates and the report."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import numpy as np
import pytest
import torch

from tokenprune.context import PruneContext
from tokenprune.errors import ConfigError, ShapeError
from tokenprune.eval import fidelity
from tokenprune.eval.fidelity import (
    FASTV,
    GATES,
    LENGTH_SUFFIX,
    ORACLE,
    ORIGINAL_SUFFIX,
    FidelityReport,
    LengthControl,
    OracleScorer,
    background_feature,
    check_gates,
    fidelity_pipelines,
    installed_methods,
    length_control_spec,
    oracle_spec,
)
from tokenprune.eval.parallel import RESULTS_FILE
from tokenprune.eval.report import Summary, SummaryRow
from tokenprune.eval.runner import EvalSpec, PipelineSpec, parse_budgets, run_eval
from tokenprune.eval.tasks import EvalTaskError, Sample, Task
from tokenprune.pipeline import Pipeline
from tokenprune.plugin import Runtime
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.toy import task as toy
from tokenprune.types import VisualTokens

N = 16  # visual tokens per image of the tiny model (32 px, 8 px patches)
D = 64  # its vision width
RANDOM = {"scorer": {"name": "random", "seed": 3}, "selector": {"name": "topk"}, "keep": 4}
FAMILIES = toy.FAMILIES


# -- the oracle -----------------------------------------------------------------------------------


def _ctx(features: torch.Tensor, keep: int, grid: tuple[int, int] | None = None) -> PruneContext:
    return PruneContext(visual=VisualTokens(features, grid=grid), keep=keep)


def test_oracle_ranks_relevant_tokens_by_weight_then_follows_the_fill() -> None:
    rel = torch.tensor(
        [[0.0, 3.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]]
    )
    x = torch.randn(2, 8, 4)
    ctx = _ctx(x, keep=3)
    fill = RandomScorer(seed=7)
    scores = OracleScorer(rel, fill).score(ctx)
    assert scores.shape == (2, 8)
    fill_scores = fill.score(ctx)
    for b in range(2):
        relevant = sorted((i for i in range(8) if rel[b, i] > 0), key=lambda i: -float(rel[b, i]))
        others = sorted(
            (i for i in range(8) if rel[b, i] == 0), key=lambda i: -float(fill_scores[b, i])
        )
        assert torch.argsort(scores[b], descending=True).tolist() == relevant + others
        assert float(scores[b, relevant].min()) > 1.0 > float(scores[b, others].max())
        assert float(scores[b, others].min()) >= 0.0
    # Through a top-k pipeline: every relevant token fits the budget of 3, then the best fill.
    pipe = Pipeline(OracleScorer(rel, fill), TopKSelector(), keep=3)
    kept = pipe(ctx).keep_idx.tolist()
    best_fill = max((i for i in range(8) if rel[1, i] == 0), key=lambda i: float(fill_scores[1, i]))
    assert kept == [[1, 3, 5], sorted([0, 7, best_fill])]
    # A budget below the relevant count keeps the most covered ones.
    two = Pipeline(OracleScorer(rel, fill), TopKSelector(), keep=2)(_ctx(x, keep=2))
    assert two.keep_idx.tolist() == [[1, 5], [0, 7]]


def test_oracle_refuses_relevance_of_the_wrong_shape() -> None:
    ctx = _ctx(torch.randn(2, 8, 4), keep=2)
    for shape in ((2, 7), (1, 8), (8,)):
        with pytest.raises(ShapeError, match="relevance"):
            OracleScorer(torch.ones(shape), RandomScorer(seed=0)).score(ctx)


def test_oracle_spec_is_the_random_top_k_config_with_a_factory() -> None:
    spec = oracle_spec(0.25, positions="original", seed=5)
    assert spec.name == ORACLE
    assert spec.factory is not None
    assert dict(spec.config or {}) == {
        "scorer": {"name": "random", "seed": 5},
        "selector": {"name": "topk"},
        "merger": {"name": "drop"},
        "keep_ratio": 0.25,
        "positions": "original",
    }
    Runtime(autoload=False).parse_config(spec.config or {})  # a valid pipeline config


def _relevant_tokens(index: int) -> dict[int, float]:
    """Three relevant tokens per sample, weights 1 < 2 < 3."""
    return {index % N: 1.0, (index + 5) % N: 2.0, (index + 9) % N: 3.0}


class _WithRelevance(Task):
    """The tiny task, its samples knowing where the answer is."""

    name = "tiny_relevance"
    families = ("colour", "bright")

    def __init__(self, inner: Task) -> None:
        self.inner = inner

    def samples(self, split: str, seed: int, limit: int | None) -> list[Sample]:
        out = []
        for s in self.inner.samples(split, seed, limit):
            rel = np.zeros(N)
            for i, w in _relevant_tokens(s.index).items():
                rel[i] = w
            out.append(dataclasses.replace(s, relevance=rel))
        return out


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def oracle_run(
    tiny: ModuleType, model: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Oracle, random and both length controls at 4 and 2 of 16 tokens, 6 samples."""
    filler = torch.zeros(D)
    spec = EvalSpec(
        task=_WithRelevance(tiny.tiny_task()),
        pipelines=[
            oracle_spec(),
            PipelineSpec("random", RANDOM),
            length_control_spec(oracle_spec(), filler),
            length_control_spec(PipelineSpec("random", RANDOM), filler),
        ],
        budgets=parse_budgets("4,2"),
        batch_size=4,
        max_new_tokens=2,
    )
    out = tmp_path_factory.mktemp("oracle")
    summary = run_eval(model, spec, out, progress=False)
    assert summary is not None
    return {(r["pipeline"], r["budget"], r["sample_id"]): r for r in _lines(out / RESULTS_FILE)}


def test_oracle_keeps_the_relevant_tokens_through_the_runner(
    oracle_run: dict[tuple[str, str, str], dict[str, Any]],
) -> None:
    oracle = [r for (p, _, _), r in oracle_run.items() if p == ORACLE]
    assert len(oracle) == 2 * 6
    for r in oracle:
        relevant = _relevant_tokens(r["index"])
        kept = r["kept_tokens"][0]
        assert kept == int(r["budget"])
        assert r["relevant_total"] == 3
        assert r["relevant_kept"] == min(r["relevant_total"], kept)
        if kept >= 3:
            assert set(relevant) <= set(r["kept_idx"])
        else:  # the most covered two: weights 3 and 2
            assert r["kept_idx"] == sorted(i for i, w in relevant.items() if w >= 2.0)
    # The other pipelines' counts follow their own selection.
    for (p, _, _), r in oracle_run.items():
        if p in ("random", "random" + LENGTH_SUFFIX):
            hits = set(r["kept_idx"]) & set(_relevant_tokens(r["index"]))
            assert (r["relevant_total"], r["relevant_kept"]) == (3, len(hits))


def test_length_control_records_see_the_inner_selection(
    oracle_run: dict[tuple[str, str, str], dict[str, Any]],
) -> None:
    for name in (ORACLE, "random"):
        for (p, budget, sid), r in oracle_run.items():
            if p != name:
                continue
            ctrl = oracle_run[(name + LENGTH_SUFFIX, budget, sid)]
            assert ctrl["kept_tokens"] == [int(budget)]
            assert ctrl["total_tokens"] == [N]
            assert ctrl["kept_idx"] == r["kept_idx"]  # same seeded selection as real pruning
            assert ctrl["relevant_kept"] == r["relevant_kept"]


def test_oracle_on_samples_without_relevance_raises(
    tiny: ModuleType, model: Any, tmp_path: Path
) -> None:
    spec = EvalSpec(
        task=tiny.tiny_task(),
        pipelines=[oracle_spec()],
        budgets=parse_budgets("4"),
        max_new_tokens=1,
    )
    with pytest.raises(EvalTaskError, match=r"Sample\.relevance"):
        run_eval(model, spec, tmp_path, progress=False)


# -- the length control ---------------------------------------------------------------------------


def test_length_control_puts_the_inner_outputs_back_and_fills_the_rest() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    filler = torch.full((4,), -7.0)
    inner = Pipeline(RandomScorer(seed=1), TopKSelector(), keep=2)
    lc = LengthControl(inner, filler)
    assert lc.budget(6) == 6
    assert lc.positions == "original"
    out = lc(_ctx(x, keep=lc.budget(6)))
    expected = inner(_ctx(x, keep=2))
    assert out.features.shape == (2, 6, 4)
    assert out.keep_idx.tolist() == [list(range(6))] * 2
    torch.testing.assert_close(out.weights, torch.ones(2, 6))
    for b in range(2):
        kept = expected.keep_idx[b].tolist()
        torch.testing.assert_close(out.features[b, kept], expected.features[b])
        torch.testing.assert_close(out.features[b, kept], x[b, kept])  # drop: the originals
        others = [i for i in range(6) if i not in kept]
        assert len(others) == 4
        assert (out.features[b, others] == -7.0).all()


@pytest.mark.parametrize(
    "config",
    [
        {
            "scorer": {"name": "uniform"},
            "selector": {"name": "pool"},
            "merger": {"name": "pool_merge"},
            "keep": 4,
        },
        {
            "scorer": {"name": "uniform"},
            "selector": {"name": "tome", "metric": "features"},
            "merger": {"name": "tome_merge"},
            "keep": 4,
        },
    ],
    ids=["pool", "tome"],
)
def test_length_control_of_a_merging_pipeline(config: Mapping[str, Any]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    inner = Runtime(autoload=False).build_pipeline(config)
    expected = inner(_ctx(x, keep=4, grid=(4, 4)))
    out = LengthControl(inner, torch.zeros(8))(_ctx(x, keep=16, grid=(4, 4)))
    assert out.features.shape == (2, 16, 8)
    for b in range(2):
        kept = expected.keep_idx[b].tolist()
        torch.testing.assert_close(out.features[b, kept], expected.features[b])
        # merged: the outputs are group means, not the anchor tokens themselves
        assert not torch.allclose(out.features[b, kept], x[b, kept])
        others = [i for i in range(16) if i not in kept]
        assert (out.features[b, others] == 0).all()


def test_length_control_refuses_llm_side_pipelines_and_a_wrong_filler() -> None:
    rt = Runtime(autoload=False)
    fastv = rt.build_pipeline(FASTV)
    with pytest.raises(ConfigError, match="vision encoder"):
        LengthControl(fastv, torch.zeros(4))
    fastv_stage = {k: v for k, v in FASTV["llm"][0].items() if k != "keep_ratio"}
    both = rt.build_pipeline({**RANDOM, "keep": 8, "llm": [{**fastv_stage, "keep": 4}]})
    with pytest.raises(ConfigError, match="vision encoder"):
        LengthControl(both, torch.zeros(4))
    lc = LengthControl(Pipeline(RandomScorer(), TopKSelector(), keep=2), torch.zeros(5))
    with pytest.raises(ShapeError, match="filler"):
        lc(_ctx(torch.randn(1, 6, 4), keep=6))
    with pytest.raises(ConfigError, match="baseline"):
        length_control_spec(PipelineSpec("unpruned"), torch.zeros(4))


def test_length_control_gives_the_model_every_position(
    tiny: ModuleType, model: Any, tmp_path: Path
) -> None:
    """The language model's prefill is as long as unpruned under the control, shorter without."""
    lengths: list[int] = []

    def count(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        length = int(kwargs["inputs_embeds"].shape[1])
        if length > 1:  # the prefill; the decoding steps feed one token
            lengths.append(length)

    random = PipelineSpec("random", RANDOM)
    spec = EvalSpec(
        task=tiny.tiny_task(),
        pipelines=[length_control_spec(random, torch.zeros(D)), random],
        budgets=parse_budgets("4"),
        batch_size=4,
        max_new_tokens=2,
    )
    handle = model.module.model.language_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        summary = run_eval(model, spec, tmp_path, progress=False)
    finally:
        handle.remove()
    assert summary is not None
    # unpruned (batches of 4 and 2), random@length, random: one prefill per generate call
    assert len(lengths) == 6
    unpruned, control, real = lengths[0:2], lengths[2:4], lengths[4:6]
    assert control == unpruned
    assert real == [n - (N - 4) for n in unpruned]
    rows = {r.pipeline: r for r in summary.rows}
    assert rows["random" + LENGTH_SUFFIX].kept_tokens == 4.0  # what the recorder saw: the inner


# -- grid, gates and report -----------------------------------------------------------------------


def test_fidelity_pipelines_names_and_variants() -> None:
    methods = [
        PipelineSpec(
            "x", {"scorer": {"name": "random"}, "selector": {"name": "topk"}, "keep_ratio": 0.5}
        ),
        PipelineSpec("fastv", FASTV),
        PipelineSpec("unpruned"),
    ]
    specs = fidelity_pipelines(methods, torch.zeros(D))
    names = [s.name for s in specs]
    assert names == [
        "oracle", "oracle@original", "oracle@length", "x", "x@original", "x@length",
        "fastv", "fastv@original",
    ]  # fmt: skip
    by = {s.name: s for s in specs}
    for name in ("oracle", "x", "fastv"):
        assert (by[name].config or {})["positions"] == "contiguous"
        assert (by[name + ORIGINAL_SUFFIX].config or {})["positions"] == "original"
    for name in ("oracle", "x"):
        assert (by[name + LENGTH_SUFFIX].config or {})["positions"] == "contiguous"
        assert by[name + LENGTH_SUFFIX].factory is not None
    assert by["x"].factory is None
    assert by["oracle"].factory is not None
    assert by["oracle@original"].factory is not None  # the oracle stays an oracle


def _row(
    pipeline: str,
    budget: str,
    accuracy: float,
    *,
    families: Mapping[str, float] | None = None,
    well_formed: float | None = 1.0,
    recall: float | None = None,
) -> SummaryRow:
    fams = dict(families) if families is not None else dict.fromkeys(FAMILIES, accuracy)
    return SummaryRow(
        pipeline, budget, 200, 16.0, fams, accuracy, None,
        recall=recall, hit_rate=recall, well_formed=well_formed,
    )  # fmt: skip


BASE_FAMILIES = {"attribute": 1.0, "existence": 1.0, "counting": 0.85, "spatial": 0.85,
                 "describe": 0.95}  # fmt: skip
BUDGETS = ["0.333", "0.111", "0.056"]


def _passing_rows() -> list[SummaryRow]:
    """A fidelity grid where every gate passes exactly at or just inside its threshold."""
    oracle_fams = {**BASE_FAMILIES, "attribute": 0.95, "existence": 0.95}
    low_fams = {**BASE_FAMILIES, "attribute": 0.90, "existence": 0.90}
    rows = [
        _row("unpruned", "full", 0.90, families=BASE_FAMILIES, well_formed=0.5),
        _row(ORACLE, "0.333", 0.88, families=BASE_FAMILIES),
        _row(ORACLE, "0.111", 0.86, families=oracle_fams),
        _row(ORACLE, "0.056", 0.80, families=low_fams),
        _row(ORACLE + LENGTH_SUFFIX, "0.333", 0.84, well_formed=0.2),  # not real pruning
        _row(ORACLE + LENGTH_SUFFIX, "0.111", 0.90),
        _row("rnd", "0.333", 0.70, well_formed=0.99),
        _row("rnd", "0.111", 0.60),
        _row("rnd", "0.056", 0.50),
        _row("rnd" + LENGTH_SUFFIX, "0.333", 0.74),
        _row("rnd" + LENGTH_SUFFIX, "0.111", 0.56),
        _row("random", "0.333", 0.99),  # not the method named as random_name
        _row("m", "0.111", 0.70, well_formed=None),  # no well-formedness known: not counted
    ]
    return rows


def _gates(
    rows: Sequence[SummaryRow], heldout: SummaryRow | None = None, random_name: str = "rnd"
) -> list[bool | None]:
    summary = Summary(FAMILIES, list(rows))
    gates = check_gates(
        summary, heldout, methods=["rnd", "random", "m"], budgets=BUDGETS, random_name=random_name
    )
    assert [g.name for g in gates] == list(GATES)
    return [g.passed for g in gates]


def _replace(
    rows: list[SummaryRow], pipeline: str, budget: str, **changes: Any
) -> list[SummaryRow]:
    return [
        dataclasses.replace(r, **changes) if (r.pipeline, r.budget) == (pipeline, budget) else r
        for r in rows
    ]


def test_gates_pass_on_the_thresholds() -> None:
    held = _row("unpruned", "full", 0.92)
    assert _gates(_passing_rows(), held) == [True] * 6
    assert _gates(_passing_rows(), None) == [True] * 5 + [None]


def test_gate_1_unpruned_targets() -> None:
    rows = _passing_rows()
    low = _replace(rows, "unpruned", "full", family_accuracy={**BASE_FAMILIES, "counting": 0.84})
    assert _gates(low)[0] is False
    assert _gates(_replace(rows, "unpruned", "full", accuracy=0.89))[0] is False
    missing = {k: v for k, v in BASE_FAMILIES.items() if k != "describe"}
    assert _gates(_replace(rows, "unpruned", "full", family_accuracy=missing))[0] is False


def test_gate_2_oracle_retention() -> None:
    rows = _passing_rows()
    worse = {**rows[2].family_accuracy, "attribute": 0.94}
    assert _gates(_replace(rows, ORACLE, "0.111", family_accuracy=worse))[1] is False
    worse = {**rows[3].family_accuracy, "existence": 0.89}
    assert _gates(_replace(rows, ORACLE, "0.056", family_accuracy=worse))[1] is False
    # counting is not part of this gate
    other = {**rows[2].family_accuracy, "counting": 0.0}
    assert _gates(_replace(rows, ORACLE, "0.111", family_accuracy=other))[1] is True
    no_oracle = [r for r in rows if r.pipeline != ORACLE or r.budget == "0.333"]
    assert _gates(no_oracle)[1] is None


def test_gate_3_real_pruning_within_5_points_of_its_length_control() -> None:
    rows = _passing_rows()
    assert _gates(_replace(rows, "rnd", "0.333", accuracy=0.68))[2] is False  # -6 points
    assert _gates(_replace(rows, "rnd" + LENGTH_SUFFIX, "0.111", accuracy=0.54))[2] is False
    assert _gates(_replace(rows, ORACLE + LENGTH_SUFFIX, "0.111", accuracy=0.92))[2] is False
    # 0.056 is not part of this gate
    extra = [*rows, _row("rnd" + LENGTH_SUFFIX, "0.056", 0.99)]
    assert _gates(extra)[2] is True
    assert _gates([r for r in rows if not r.pipeline.endswith(LENGTH_SUFFIX)])[2] is None


def test_gate_4_oracle_beats_the_named_random_method() -> None:
    rows = _passing_rows()
    assert _gates(_replace(rows, "rnd", "0.056", accuracy=0.81))[3] is False
    assert _gates(_replace(rows, "rnd", "0.056", accuracy=0.80))[3] is True  # ties pass
    # "random" scores 0.99 at 0.333: it would fail the gate if it were the random method
    assert _gates(rows, random_name="random")[3] is False
    assert _gates(rows, random_name="nothing")[3] is None


def test_gate_5_well_formed_answers_of_real_pruning() -> None:
    rows = _passing_rows()
    assert _gates(_replace(rows, "rnd", "0.056", well_formed=0.98))[4] is False
    assert _gates(_replace(rows, ORACLE, "0.111", well_formed=0.5))[4] is False
    assert _gates(_replace(rows, "rnd" + LENGTH_SUFFIX, "0.111", well_formed=0.5))[4] is True
    unknown = [dataclasses.replace(r, well_formed=None) for r in rows]
    assert _gates(unknown)[4] is None


def test_gate_6_held_out_seed() -> None:
    rows = _passing_rows()
    assert _gates(rows, _row("unpruned", "full", 0.88))[5] is True
    assert _gates(rows, _row("unpruned", "full", 0.86))[5] is False
    assert _gates(rows, _row("unpruned", "full", 0.94))[5] is False


def test_gates_without_an_unpruned_row_are_not_measured() -> None:
    rows = [r for r in _passing_rows() if r.pipeline != "unpruned"]
    assert _gates(rows, _row("unpruned", "full", 0.9)) == [None] * 6


def test_fidelity_report_markdown() -> None:
    rows = [
        *_passing_rows(),
        _row(ORACLE + ORIGINAL_SUFFIX, "0.111", 0.85, well_formed=0.995),
    ]
    rows = _replace(rows, ORACLE, "0.111", recall=0.75, hit_rate=0.5)
    rows = _replace(rows, "rnd", "0.333", accuracy=0.60)  # gate 3 fails: -14 points
    summary = Summary(FAMILIES, rows)
    held = _row("unpruned", "full", 0.91)
    gates = check_gates(summary, held, methods=["rnd"], budgets=BUDGETS, random_name="rnd")
    md = FidelityReport(summary, held, gates, ["rnd"]).to_markdown("Fidelity of tiny")
    assert md.startswith("# Fidelity of tiny\n")
    assert (
        "| oracle | 0.111 | 86.0 / 100.0 | 85.0 / 99.5 | 90.0 / 100.0 | -4.0 | 75.0 | 50.0 |" in md
    )
    assert "| rnd | 0.333 | 60.0 / 99.0 | - | 74.0 / 100.0 | -14.0 | - | - |" in md
    assert "| rnd | 0.056 | 50.0 / 100.0 | - | - | n/a | - | - |" in md
    assert "| m |" not in md  # not among the report's methods
    assert "| evaluated split | 100.0 | 100.0 | 85.0 | 85.0 | 95.0 | 90.0 |" in md
    assert "| held-out seed |" in md
    verdicts = {g.name: g.passed for g in gates}
    assert verdicts[GATES[2]] is False
    for gate in gates:
        verdict = {True: "pass", False: "**FAIL**", None: "not measured"}[gate.passed]
        assert f"| {gate.name} | {verdict} | {gate.measured} |" in md
    assert "rnd @ 0.333: -14.0" in md
    data = FidelityReport(summary, held, gates, ["rnd"]).to_json()
    assert [g["passed"] for g in data["gates"]] == [g.passed for g in gates]
    assert len(data["rows"]) == len(rows)
    json.dumps(data)  # plain data


def test_fidelity_report_without_held_out_seed() -> None:
    summary = Summary(FAMILIES, _passing_rows())
    gates = check_gates(summary, None, methods=["rnd"], budgets=BUDGETS, random_name="rnd")
    md = FidelityReport(summary, None, gates, ["rnd"]).to_markdown("t")
    assert "held-out seed |" not in md
    assert f"| {GATES[5]} | not measured | not measured |" in md


# -- the shipped toy model's helpers --------------------------------------------------------------


def test_installed_methods_of_the_built_ins(tmp_path: Path) -> None:
    rt = Runtime(autoload=False)
    specs = installed_methods(tmp_path / "clip", rt)
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    assert {"random", "cls_attention", "pool", "tome", "divprune", "fastv"} <= set(names)
    assert "desap" not in names  # its plugin is not loaded
    for spec in specs:
        assert spec.config is not None
        rt.parse_config(spec.config)


def test_background_feature_is_the_mean_of_the_empty_patches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

    from tokenprune.toy import model as toy_model

    size = toy_model.TowerSize(
        hidden=32, layers=2, heads=2, text_hidden=32, text_layers=1, projection=16
    )
    vision = cast(CLIPVisionConfig, toy_model.build_clip_config(size, 16).vision_config)
    text = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=2, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(toy_model.build_llava_config(vision, text, 5)).eval()
    # Every scene is one square of radius 14 centred at (16, 80): pixels 4..28 x 68..92.
    scene = toy.Scene((toy.SceneObject("green", "square", 14, 2, 0, 16, 80),), 7)
    monkeypatch.setattr(toy, "sample_scene", lambda rng: scene)
    feature = background_feature(llava, scenes=2)
    assert feature.shape == (32,)
    assert feature.dtype == torch.float32

    empty = np.ones((toy.GRID, toy.GRID), bool)
    empty[8:12, 0:4] = False  # the patches the square touches
    image = toy.render(scene)[0]
    with torch.no_grad():
        states = llava.model.vision_tower(
            pixel_values=toy_model.pixel_values(image[None]), output_hidden_states=True
        ).hidden_states[-2][0, 1:]
    expected = states[torch.as_tensor(empty.reshape(-1))].mean(0)
    torch.testing.assert_close(feature, expected)
    assert not torch.allclose(feature, states.mean(0))


def test_card_section_is_inserted_before_the_differences_then_replaced(tmp_path: Path) -> None:
    card = tmp_path / "MODEL_CARD.md"
    card.write_text("# Card\n\n## Results\nr\n\n## How this toy differs from a real VLM\n- x\n")
    fidelity.write_card_section(card, fidelity.CARD_HEADING + "\nfirst\n")
    text = card.read_text()
    assert text.index("first") < text.index("## How this toy differs")
    assert text.index("## Results") < text.index(fidelity.CARD_HEADING)
    fidelity.write_card_section(card, fidelity.CARD_HEADING + "\nsecond\n")
    text = card.read_text()
    assert "first" not in text
    assert text.count(fidelity.CARD_HEADING) == 1
    assert text.endswith("## How this toy differs from a real VLM\n- x\n")
    bare = tmp_path / "BARE.md"
    bare.write_text("# Card\n")
    fidelity.write_card_section(bare, fidelity.CARD_HEADING + "\nthird\n")
    assert bare.read_text().endswith(fidelity.CARD_HEADING + "\nthird\n\n")
