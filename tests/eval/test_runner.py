"""End-to-end tests of the evaluation runner on ``tiny_llava`` with a tiny synthetic task."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tokenprune.errors import BudgetError, ConfigError
from tokenprune.eval import models as eval_models
from tokenprune.eval.models import ModelAssetsMissingError, load_eval_model
from tokenprune.eval.parallel import RESULTS_FILE, shard_path
from tokenprune.eval.report import summarize
from tokenprune.eval.runner import (
    RUNS_FILE,
    SETUP_FILE,
    Budget,
    EvalSpec,
    PipelineSpec,
    PruneRecord,
    PruneRecorder,
    _selection_fields,
    load_pipeline_spec,
    model_fingerprint,
    parse_budgets,
    rebudget,
    run_eval,
)
from tokenprune.eval.tasks import Sample
from tokenprune.plugin import Runtime

RANDOM = {"scorer": {"name": "random"}, "selector": {"name": "topk"}, "keep": 4}
CLS = {"scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}, "keep": 4}


@pytest.fixture(scope="module")
def spec(tiny: ModuleType) -> EvalSpec:
    return EvalSpec(
        task=tiny.tiny_task(),
        pipelines=[PipelineSpec("random", RANDOM), PipelineSpec("cls", CLS)],
        budgets=parse_budgets("0.5,4"),
        batch_size=4,
        max_new_tokens=2,
    )


@pytest.fixture(scope="module")
def finished(model: Any, spec: EvalSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete run (6 samples x (unpruned + 2 pipelines x 2 budgets))."""
    out = tmp_path_factory.mktemp("finished")
    model.calls.clear()
    run_eval(model, spec, out, progress=False)
    return out


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_writes_results_summary_and_plot(finished: Path, model: Any) -> None:
    records = _lines(finished / RESULTS_FILE)
    assert len(records) == 6 * (1 + 2 * 2)
    keys = [(r["pipeline"], r["budget"], r["sample_id"]) for r in records]
    assert len(set(keys)) == len(keys)
    expected_fields = {
        "pipeline", "budget", "sample_id", "index", "family", "question", "answer",
        "prediction", "correct", "kept_tokens", "total_tokens", "well_formed", "kept_idx",
        "relevant_total", "relevant_kept",
    }  # fmt: skip
    assert all(set(r) == expected_fields for r in records)
    by_key = {(r["pipeline"], r["budget"]): r for r in records}
    assert by_key[("random", "0.5")]["kept_tokens"] == [8]
    assert by_key[("cls", "4")]["kept_tokens"] == [4]
    assert by_key[("cls", "4")]["total_tokens"] == [16]
    assert by_key[("unpruned", "full")]["kept_tokens"] is None
    assert not (finished / "shards").exists()

    md = (finished / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| pipeline"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "pipeline", "budget", "visual tokens", "colour", "bright", "overall", "95% CI",
        "retention", "recall", "hit rate", "well-formed", "samples",
    ]  # fmt: skip
    csv_lines = (finished / "summary.csv").read_text().splitlines()
    assert csv_lines[0] == (
        "pipeline,budget,visual tokens,colour,bright,overall,ci_low,ci_high,retention,recall,"
        "hit rate,well-formed,samples"
    )
    assert len(csv_lines) == 1 + 5
    with Image.open(finished / "accuracy.png") as png:
        assert png.format == "PNG"
        # overall + one panel per family (colour, bright) side by side, legend on the right
        assert png.size == (1320, 360)

    (run,) = _lines(finished / RUNS_FILE)
    assert run["task"] == "tiny"
    assert run["seed"] == 0
    assert run["model"] == "tiny_llava"
    assert run["pipelines"]["random"]["0.5"]["keep_ratio"] == 0.5
    assert "keep" not in run["pipelines"]["random"]["0.5"]
    assert run["pipelines"]["cls"]["4"]["scorer"] == {"name": "cls_attention", "layer": -2}
    assert run["pipelines"]["unpruned"] == {"full": None}
    assert {"tokenprune", "torch", "transformers"} <= set(run["versions"])
    assert "builtin" in {p["name"] for p in run["plugins"]}
    assert run["new_records"] == 30
    assert run["num_processes"] == 1


def test_batches_and_text_queries(finished: Path, model: Any) -> None:
    # unpruned: 2 batches (4 + 2 samples); then 2 pipelines x 2 budgets x 2 batches.
    assert len(model.calls) == 10
    plain = [c for c in model.calls if "tokenprune_query" not in c]
    assert len(plain) == 2
    for call in model.calls:
        if "tokenprune_query" in call:
            assert call["tokenprune_query"] == call["questions"]


def test_resume_skips_finished_keys(finished: Path, model: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    original = (out / RESULTS_FILE).read_text()
    model.calls.clear()
    run_eval(model, _spec_of(finished, model), out, progress=False)
    assert model.calls == []
    assert (out / RESULTS_FILE).read_text() == original
    assert len(_lines(out / RUNS_FILE)) == 2

    # Drop three records: random@4 of one sample and cls@0.5 of two samples.
    records = _lines(out / RESULTS_FILE)
    drop = {("random", "4", "test-colour-0"), ("cls", "0.5", "test-bright-1"),
            ("cls", "0.5", "test-bright-2")}  # fmt: skip
    kept = [r for r in records if (r["pipeline"], r["budget"], r["sample_id"]) not in drop]
    (out / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    model.calls.clear()
    run_eval(model, _spec_of(finished, model), out, progress=False)
    assert [len(c["questions"]) for c in model.calls] == [1, 2]
    again = _lines(out / RESULTS_FILE)
    assert len(again) == len(records)
    assert {(r["pipeline"], r["budget"], r["sample_id"]) for r in again} == {
        (r["pipeline"], r["budget"], r["sample_id"]) for r in records
    }
    assert _lines(out / RUNS_FILE)[-1]["new_records"] == 3


def test_resume_reads_interrupted_shards(finished: Path, model: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    records = _lines(out / RESULTS_FILE)
    victim = next(r for r in records if r["pipeline"] == "random" and r["budget"] == "4")
    rest = [r for r in records if r is not victim]
    (out / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rest))
    shard = shard_path(out, 0, 1)
    shard.parent.mkdir()
    shard.write_text(json.dumps(victim) + '\n{"pipeline": "random", "budg')  # cut short
    model.calls.clear()
    run_eval(model, _spec_of(finished, model), out, progress=False)
    assert model.calls == []
    assert len(_lines(out / RESULTS_FILE)) == len(records)
    assert not shard.parent.exists()


def test_resume_refuses_another_model_or_setting(
    finished: Path, model: Any, tmp_path: Path
) -> None:
    setup = json.loads((finished / SETUP_FILE).read_text())
    assert setup == {
        "model_fingerprint": model_fingerprint(model.module),
        "task": "tiny",
        "max_new_tokens": _spec_of(finished, model).max_new_tokens,
    }
    assert _lines(finished / RUNS_FILE)[0]["model_fingerprint"] == setup["model_fingerprint"]
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    original = (out / RESULTS_FILE).read_text()
    other = {**setup, "model_fingerprint": "0" * 16}
    (out / SETUP_FILE).write_text(json.dumps(other))
    model.calls.clear()
    with pytest.raises(ConfigError, match="model_fingerprint: '0000000000000000' there"):
        run_eval(model, _spec_of(finished, model), out, progress=False)
    assert model.calls == []
    assert (out / RESULTS_FILE).read_text() == original
    spec = _spec_of(finished, model)
    (out / SETUP_FILE).write_text(json.dumps(setup))
    longer = EvalSpec(**{**spec.__dict__, "max_new_tokens": spec.max_new_tokens + 1})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        run_eval(model, longer, out, progress=False)
    (out / SETUP_FILE).unlink()  # records of unknown origin
    with pytest.raises(ConfigError, match="holds results but no setup"):
        run_eval(model, spec, out, progress=False)
    assert model.calls == []


def test_model_fingerprint_follows_the_weights(model: Any) -> None:
    import torch

    module = model.module
    before = model_fingerprint(module)
    param = next(module.parameters())
    with torch.no_grad():
        saved = param.detach().clone()
        param.reshape(-1)[0] += 1.0
        changed = model_fingerprint(module)
        param.copy_(saved)
    assert changed != before
    assert model_fingerprint(module) == before


def _spec_of(finished: Path, model: Any) -> EvalSpec:
    tiny = importlib.import_module("_tiny")
    return EvalSpec(
        task=tiny.tiny_task(),
        pipelines=[PipelineSpec("random", RANDOM), PipelineSpec("cls", CLS)],
        budgets=parse_budgets("0.5,4"),
        batch_size=4,
        max_new_tokens=2,
    )


def test_retention_is_relative_to_unpruned_on_the_same_samples(finished: Path) -> None:
    records = _lines(finished / RESULTS_FILE)
    grid = [("unpruned", "full"), ("random", "0.5"), ("random", "4"), ("cls", "0.5"), ("cls", "4")]
    summary = summarize(records, grid, families=["colour", "bright"])
    base = [r["correct"] for r in records if r["pipeline"] == "unpruned"]
    base_acc = sum(base) / len(base)
    for row in summary.rows:
        own = [
            r["correct"]
            for r in records
            if (r["pipeline"], r["budget"]) == (row.pipeline, row.budget)
        ]
        assert row.accuracy == pytest.approx(sum(own) / len(own))
        if base_acc:
            assert row.retention == pytest.approx(row.accuracy / base_acc)
    # Only the samples the baseline also answered count for retention.
    subset = [
        r for r in records if r["pipeline"] != "unpruned" or r["sample_id"] != "test-colour-0"
    ]
    sub = summarize(subset, grid)
    cls = next(r for r in sub.rows if (r.pipeline, r.budget) == ("cls", "4"))
    same = [r for r in records if r["sample_id"] != "test-colour-0"]
    b = [r["correct"] for r in same if r["pipeline"] == "unpruned"]
    c = [r["correct"] for r in same if (r["pipeline"], r["budget"]) == ("cls", "4")]
    expected = (sum(c) / len(c)) / (sum(b) / len(b)) if sum(b) else None
    assert cls.retention == (pytest.approx(expected) if expected is not None else None)


def test_summary_without_baseline_hits_has_no_retention() -> None:
    recs = [
        {"pipeline": "unpruned", "budget": "full", "sample_id": "a", "family": "f",
         "correct": False, "kept_tokens": None, "total_tokens": None},
        {"pipeline": "p", "budget": "1", "sample_id": "a", "family": "f",
         "correct": True, "kept_tokens": [1], "total_tokens": [4]},
    ]  # fmt: skip
    s = summarize(recs, [("unpruned", "full"), ("p", "1")])
    assert [r.retention for r in s.rows] == [None, None]
    assert "| -" in s.to_markdown()
    assert s.rows[0].kept_tokens == 4.0


def test_rebudget_puts_the_budget_on_the_last_llm_position() -> None:
    rt = Runtime(autoload=False)
    fastv = {"llm": [{"layer": 2, "keep_ratio": 0.5}]}
    assert rebudget(fastv, Budget.parse("0.111"), rt)["llm"][0]["keep_ratio"] == 0.111
    assert rebudget(fastv, Budget.parse("16"), rt)["llm"][0]["keep"] == 16
    two = {**RANDOM, "keep": None, "keep_ratio": 0.5, "llm": [{"layer": 2, "keep_ratio": 0.5}]}
    two = {k: v for k, v in two.items() if v is not None}
    out = rebudget(two, Budget.parse("0.125"), rt)
    assert out["keep_ratio"] == 0.5  # the encoder stage keeps its own budget
    assert out["llm"][0]["keep_ratio"] == pytest.approx(0.25)  # 0.125 of all = 0.25 of 0.5
    with pytest.raises(ConfigError, match="keeps more than"):
        rebudget(two, Budget.parse("0.75"), rt)
    counted = {**{k: v for k, v in two.items() if k != "keep_ratio"}, "keep": 8}
    with pytest.raises(ConfigError, match="token counts"):
        rebudget(counted, Budget.parse("0.125"), rt)
    assert rebudget(counted, Budget.parse("4"), rt)["llm"][0]["keep"] == 4


def test_budgets_and_pipeline_specs(tmp_path: Path) -> None:
    assert Budget.parse("1.0") == Budget("1.0", keep_ratio=1.0)
    assert Budget.parse("64") == Budget("64", keep=64)
    for bad in ("0", "1.5", "-3", "abc", "0.0"):
        with pytest.raises(BudgetError):
            Budget.parse(bad)
    with pytest.raises(BudgetError, match="duplicate"):
        parse_budgets("0.5,0.5")
    rt = Runtime(autoload=False)
    assert rebudget(RANDOM, Budget.parse("2"), rt)["keep"] == 2
    (tmp_path / "unpruned.yaml").write_text(
        "scorer: {name: random}\nselector: {name: topk}\nkeep: 2\n"
    )
    with pytest.raises(ConfigError, match="reserved"):
        load_pipeline_spec(tmp_path / "unpruned.yaml", rt)
    (tmp_path / "mine.yaml").write_text("scorer: {name: random}\nselector: {name: topk}\nkeep: 2\n")
    assert load_pipeline_spec(tmp_path / "mine.yaml", rt).name == "mine"
    assert load_pipeline_spec("unpruned", rt).is_baseline
    with pytest.raises(ConfigError, match="unique"):
        EvalSpec(task=None, pipelines=[PipelineSpec("a", RANDOM)] * 2, budgets=[])  # type: ignore[arg-type]


def test_default_model_missing_assets_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenprune.toy.model as toy_model

    def missing(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("toy model asset vlm/config.json is missing; run the training")

    monkeypatch.setattr(toy_model, "load_default_model", missing)
    with pytest.raises(ModelAssetsMissingError, match="run the training"):
        load_eval_model("default")
    with pytest.raises(eval_models.EvalModelError, match="cannot import model factory"):
        load_eval_model("no_such_module_xyz:factory")


def test_cli_eval(tiny: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tokenprune.cli import main
    from tokenprune.cli._eval import DEFAULT_BUDGETS
    from tokenprune.eval.runner import DEFAULT_BUDGETS as RUNNER_DEFAULT

    assert DEFAULT_BUDGETS == RUNNER_DEFAULT
    cfg = tmp_path / "rnd.yaml"
    cfg.write_text("scorer: {name: random}\nselector: {name: topk}\nkeep: 8\n")
    out = tmp_path / "out"
    argv = [
        "eval", "--model", "_tiny:tiny_model", "--task", "_tiny:tiny_task", "--pipeline",
        str(cfg), "--budgets", "4", "--limit", "1", "--batch-size", "2", "--max-new-tokens", "1",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| rnd      | 4      | 4" in printed
    assert len(_lines(out / RESULTS_FILE)) == 2 * 2
    assert main([*argv[:3], "--task", "nope", *argv[5:]]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_demo_pipelines_include_installed_reference_methods(tmp_path: Path) -> None:
    from tokenprune.eval.demo import DEMO_BUDGET, demo_pipelines

    runtime = Runtime()
    specs = demo_pipelines(tmp_path / "clip", runtime)
    names = [s.name for s in specs]
    assert names[:3] == ["oracle", "random", "cls_attention"]
    if "desap" in runtime.stages.names("scorer"):
        desap = next(s for s in specs if s.name == "desap")
        assert desap.config is not None
        assert desap.config["scorer"]["text_encoder"] == str(tmp_path / "clip")
        runtime.parse_config(desap.config)  # valid without loading the encoder
    if "desap_dynamic" in runtime.stages.names("selector"):
        assert "desap_dynamic" in names
    without = Runtime(autoload=False)  # built-ins only: the plugin methods drop out
    assert [s.name for s in demo_pipelines(tmp_path / "clip", without)] == names[:3]
    for spec in specs:
        assert spec.config is not None
        assert spec.config["keep_ratio"] == float(DEMO_BUDGET)


def test_run_demo(
    tiny: ModuleType, model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tokenprune.toy.model as toy_model
    from tokenprune.eval import demo
    from tokenprune.viz.overlay import panel_grid_size

    def missing(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("language model file smollm2.gguf is missing")

    monkeypatch.setattr(toy_model, "load_default_model", missing)
    with pytest.raises(ModelAssetsMissingError, match=r"smollm2\.gguf is missing"):
        demo.run_demo(tmp_path / "none")

    # The plumbing, with the tiny model and task standing in for the shipped ones.
    (tmp_path / "assets" / "clip").mkdir(parents=True)
    monkeypatch.setattr(toy_model, "ASSETS", tmp_path / "assets")
    monkeypatch.setattr(demo, "toy_eval_model", lambda device: model)
    monkeypatch.setattr(demo, "ShapesTask", tiny.TinyTask)
    monkeypatch.setattr(demo, "REFERENCE_METHODS", {})
    printed: list[str] = []
    summary = demo.run_demo(
        tmp_path / "demo", limit=1, batch_size=2, progress=False, echo=printed.append
    )
    assert [(r.pipeline, r.budget, r.kept_tokens) for r in summary.rows] == [
        ("unpruned", "full", 16.0),
        ("random", "0.111", 2.0),
        ("cls_attention", "0.111", 2.0),
    ]
    assert printed[0] == summary.to_markdown()
    for name in ("summary.md", "summary.csv", "accuracy.png", "results.jsonl"):
        assert (tmp_path / "demo" / name).is_file()
    with Image.open(tmp_path / "demo" / "overlay.png") as png:
        assert png.size == panel_grid_size((32, 32), 3, scale=4)


# -- what each sample kept ------------------------------------------------------------------------


def _record(keep_idx: list[list[int]], num_tokens: int) -> PruneRecord:
    idx = np.asarray(keep_idx, dtype=np.int64)
    return PruneRecord(idx, np.ones(idx.shape, np.float32), num_tokens, None)


def test_kept_per_sample_at_one_position() -> None:
    recorder = PruneRecorder()
    recorder.records.append(_record([[3, 0, 2], [1, 5, 4]], 6))
    kept = recorder.kept_per_sample(2)
    assert kept is not None
    assert [k.tolist() for k in kept] == [[0, 2, 3], [1, 4, 5]]


def test_kept_per_sample_composes_llm_positions_with_the_encoder() -> None:
    recorder = PruneRecorder()
    recorder.records.append(_record([[1, 3, 5, 7], [0, 1, 2, 3]], 8))  # encoder: 4 of 8
    recorder.records.append(_record([[2, 0], [3, 1]], 4))  # LLM: 2 of the 4 arriving
    kept = recorder.kept_per_sample(2)
    assert kept is not None
    assert [k.tolist() for k in kept] == [[1, 5], [1, 3]]
    # one sample per call: the rows are the positions of that sample
    single = PruneRecorder()
    single.records += [_record([[1, 3, 5, 7]], 8), _record([[0, 2]], 4)]
    out = single.kept_per_sample(1)
    assert out is not None
    assert [k.tolist() for k in out] == [[1, 5]]


def test_kept_per_sample_is_none_when_the_calls_do_not_form_positions() -> None:
    recorder = PruneRecorder()
    assert recorder.kept_per_sample(2) is None  # nothing recorded
    recorder.records.append(_record([[1, 3, 5, 7], [0, 1, 2, 3]], 8))
    assert recorder.kept_per_sample(3) is None  # 2 rows for 3 samples
    recorder.records.append(_record([[2, 0], [3, 1]], 5))  # 5 tokens arrive? only 4 were kept
    assert recorder.kept_per_sample(2) is None


def _sample(relevance: np.ndarray | None) -> Sample:
    return Sample("s", 0, "f", np.zeros((4, 4, 3), np.uint8), "Q?", "yes", relevance=relevance)


def test_selection_fields() -> None:
    rel = np.array([0.0, 2.0, 0.0, 1.0, 3.0, 0.0])
    fields = _selection_fields(_sample(rel), np.array([1, 2]), 6)
    assert fields == {"kept_idx": [1, 2], "relevant_total": 3, "relevant_kept": 1}
    assert _selection_fields(_sample(rel), np.array([1, 3, 4]), 6)["relevant_kept"] == 3
    assert _selection_fields(_sample(np.zeros(6)), np.array([0]), 6)["relevant_total"] == 0
    unknown = {"relevant_total": None, "relevant_kept": None}
    assert _selection_fields(_sample(rel), None, 6) == {"kept_idx": None, **unknown}
    assert _selection_fields(_sample(None), np.array([0, 4]), 6) == {"kept_idx": [0, 4], **unknown}
    # a relevance map that is not one entry per visual token of the image is not used
    assert _selection_fields(_sample(rel), np.array([1, 2]), 5) == {"kept_idx": [1, 2], **unknown}
    assert _selection_fields(_sample(rel), np.array([1, 2]), None) == {
        "kept_idx": [1, 2],
        **unknown,
    }


def test_records_have_the_kept_indices_of_each_sample(finished: Path) -> None:
    for r in _lines(finished / RESULTS_FILE):
        if r["pipeline"] == "unpruned":
            assert r["kept_idx"] is None
            continue
        assert len(r["kept_idx"]) == r["kept_tokens"][0]
        assert r["kept_idx"] == sorted(set(r["kept_idx"]))
        assert all(0 <= i < r["total_tokens"][0] for i in r["kept_idx"])
        # the tiny task knows neither where the answer is nor its answer set
        assert (r["relevant_total"], r["relevant_kept"], r["well_formed"]) == (None, None, None)
