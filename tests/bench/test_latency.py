"""Tests of tokenprune.bench.latency / presets and the ``tokenprune bench`` CLI (tiny preset)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import TYPE_CHECKING, Any

import pytest
import torch

from tokenprune.bench import latency
from tokenprune.bench.flops import kv_cache_bytes, prefill_flops, shape_from_config
from tokenprune.bench.latency import (
    BenchResult,
    RunMeasurement,
    VariantStats,
    cache_nbytes,
    format_result,
    make_inputs,
    run_benchmark,
)
from tokenprune.bench.presets import (
    build_preset,
    list_presets,
    preset_visual_tokens,
    resolve_dtype,
)
from tokenprune.cli import _bench, build_parser, main
from tokenprune.errors import BudgetError, ConfigError

if TYPE_CHECKING:
    from torch import nn

CONFIG: dict[str, Any] = {
    "scorer": {"name": "cls_attention"},
    "selector": {"name": "topk"},
    "keep": 64,
}
TEXT = 40
FULL = 256  # tiny preset: 96 px / 6 px patches
REPEATS, WARMUP, NEW = 3, 1, 3


@pytest.fixture(scope="module")
def model() -> Any:
    return build_preset("tiny")


@pytest.fixture(scope="module")
def traced(model: Any) -> tuple[BenchResult, list[int]]:
    """One benchmark run, plus the prefill lengths the language model saw, in call order."""
    lengths: list[int] = []

    def record(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        n = kwargs["inputs_embeds"].shape[1]
        if n > 1:  # decode steps feed one token
            lengths.append(int(n))

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = run_benchmark(
            model,
            CONFIG,
            make_inputs(model, text_tokens=TEXT),
            repeats=REPEATS,
            warmup=WARMUP,
            new_tokens=NEW,
            name="tiny",
        )
    finally:
        handle.remove()
    return result, lengths


@pytest.fixture(scope="module")
def result(traced: tuple[BenchResult, list[int]]) -> BenchResult:
    return traced[0]


# -- measurements -------------------------------------------------------------------------------


def test_fields_present_and_positive(result: BenchResult) -> None:
    for stats in (result.unpruned, result.pruned):
        assert stats.repeats == REPEATS
        assert len(stats.runs) == REPEATS
        for value in (stats.vision_s, stats.prefill_s, stats.end_to_end_s, stats.generate_s):
            assert value > 0
        assert stats.decode_s_per_token is not None
        assert stats.decode_s_per_token > 0
        assert stats.kv_cache_bytes is not None
        assert stats.kv_cache_bytes > 0
        assert stats.peak_memory_bytes is None  # CPU: not separable per run
        for run in stats.runs:
            assert run.decode_steps == NEW - 1
            assert run.generate_s >= run.end_to_end_s
    assert result.pruned.prune_s > 0
    assert result.unpruned.prune_s == 0
    assert result.peak_rss_bytes is not None
    assert result.peak_rss_bytes > 0
    assert result.setup.attn_implementation == "sdpa"
    assert result.setup.kept_visual_tokens == 64
    assert result.setup.full_visual_tokens == FULL
    assert result.setup.text_tokens == TEXT
    assert result.setup.threads == torch.get_num_threads()


def test_ratios_are_computed_from_medians(result: BenchResult) -> None:
    u, p = result.unpruned, result.pruned
    for stats in (u, p):
        assert stats.prefill_s == statistics.median(r.prefill_s for r in stats.runs)
        assert stats.vision_s == statistics.median(r.vision_s for r in stats.runs)
        assert stats.end_to_end_s == statistics.median(
            r.vision_s + r.prune_s + r.prefill_s for r in stats.runs
        )
    assert result.prefill_speedup == pytest.approx(u.prefill_s / p.prefill_s)
    assert result.end_to_end_speedup == pytest.approx(u.end_to_end_s / p.end_to_end_s)
    assert result.generate_speedup == pytest.approx(u.generate_s / p.generate_s)
    assert u.decode_s_per_token is not None
    assert p.decode_s_per_token is not None
    assert result.decode_ratio == pytest.approx(u.decode_s_per_token / p.decode_s_per_token)
    assert result.overhead_pct == pytest.approx(100 * p.prune_s / p.vision_s)
    assert result.prefill_vs_predicted_pct == pytest.approx(
        100 * result.prefill_speedup / result.predicted_prefill_ratio
    )


def test_runs_are_interleaved(traced: tuple[BenchResult, list[int]]) -> None:
    result, lengths = traced
    pair = (("unpruned", FULL + TEXT), ("pruned", 64 + TEXT))
    assert result.schedule == (
        *[("warmup", v) for v, _ in pair] * WARMUP,
        *[("timed", v) for v, _ in pair] * REPEATS,
    )
    assert result.order == ("unpruned", "pruned") * REPEATS
    # What the language model really saw, in call order: unpruned, pruned, unpruned, ...
    assert lengths == [n for _, n in pair] * (WARMUP + REPEATS)


def test_pruned_run_has_fewer_lm_tokens(result: BenchResult) -> None:
    assert result.unpruned.lm_prefill_tokens == FULL + TEXT
    assert result.pruned.lm_prefill_tokens == 64 + TEXT
    assert (result.unpruned.visual_tokens, result.pruned.visual_tokens) == (FULL, 64)
    assert result.kv_cache_ratio == pytest.approx((FULL + TEXT) / (64 + TEXT))


def test_kv_cache_bytes_match_the_analytic_size(model: nn.Module, result: BenchResult) -> None:
    lm = shape_from_config(model.config).lm
    for stats, n in ((result.unpruned, FULL), (result.pruned, 64)):
        assert stats.kv_cache_bytes == kv_cache_bytes(lm, n, text_tokens=TEXT, dtype="float32")


def test_prediction_uses_the_whole_prefill_and_the_real_text_count(
    model: nn.Module, result: BenchResult
) -> None:
    shape = shape_from_config(model.config, name="tiny")
    expected = prefill_flops(
        shape, 64, convention="desap", scope="prefill", text_tokens=TEXT, dtype="float32"
    )
    assert result.flops == expected
    assert result.predicted_prefill_ratio == pytest.approx(expected.ratio)
    assert result.flops_with_vision is not None
    assert result.flops_with_vision.vision_flops is not None
    assert result.predicted_end_to_end_ratio is not None
    assert 1 < result.predicted_end_to_end_ratio < result.predicted_prefill_ratio


def test_model_is_restored(model: nn.Module, result: BenchResult) -> None:
    del result  # the benchmark has run
    inner: Any = model.model
    for module in (inner.vision_tower, inner.language_model, model):
        assert not module._forward_pre_hooks
        assert not module._forward_hooks
    assert "generate" not in model.__dict__


def test_format_result(result: BenchResult) -> None:
    text = format_result(result)
    assert text.startswith("| median over repeats | unpruned | pruned | unpruned / pruned |")
    assert f"| {FULL + TEXT} ({FULL} + {TEXT}) | {64 + TEXT} (64 + {TEXT}) |" in text
    assert f"prefill speedup: **{result.prefill_speedup:.2f}x** measured" in text
    assert f"**{result.predicted_prefill_ratio:.2f}x** FLOPs-predicted" in text
    assert f"{result.prefill_vs_predicted_pct:.0f}% of predicted" in text
    assert "% of the vision-encoder time" in text
    assert "peak RSS is process-wide" in text
    assert "dtype float32" in text
    assert "interleaved" in text


def test_to_dict_is_json(result: BenchResult) -> None:
    data = json.loads(json.dumps(result.to_dict()))
    assert data["ratios"]["prefill_speedup"] == pytest.approx(result.prefill_speedup)
    assert data["order"] == ["unpruned", "pruned"] * REPEATS
    assert len(data["pruned"]["runs"]) == REPEATS
    assert data["flops"]["scope"] == "prefill"
    assert data["flops"]["text_tokens"] == TEXT


def test_single_new_token_measures_no_decode(model: nn.Module) -> None:
    result = run_benchmark(model, CONFIG, make_inputs(model), repeats=1, warmup=0, new_tokens=1)
    assert result.unpruned.decode_s_per_token is None
    assert result.decode_ratio is None
    assert result.schedule == (("timed", "unpruned"), ("timed", "pruned"))
    assert "not measured" in format_result(result)


def test_variant_stats_medians() -> None:
    def run(prefill: float) -> RunMeasurement:
        return RunMeasurement(
            variant="pruned",
            repeat=0,
            vision_s=1.0,
            prune_s=0.5,
            prefill_s=prefill,
            decode_s_per_token=None,
            generate_s=9.0,
            decode_steps=0,
            lm_prefill_tokens=10,
            visual_tokens=4,
            kv_cache_bytes=100,
        )

    stats = VariantStats.from_runs("pruned", [run(3.0), run(1.0), run(2.0)])
    assert (stats.prefill_s, stats.end_to_end_s, stats.decode_s_per_token) == (2.0, 3.5, None)
    with pytest.raises(ValueError, match="at least one run"):
        VariantStats.from_runs("pruned", [])
    with pytest.raises(ValueError, match="unpruned"):
        VariantStats.from_runs("unpruned", [run(1.0)])


def test_cuda_clock_reads_events(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.t = 0.0

        def record(self) -> None:
            self.t = time.perf_counter()

        def elapsed_time(self, end: FakeEvent) -> float:
            return (end.t - self.t) * 1e3  # milliseconds, as CUDA events report

    synced: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", synced.append)
    clock = latency._Clock(torch.device("cuda", 0))
    a = clock.mark()
    b = clock.mark()
    clock.sync()
    assert isinstance(a, FakeEvent)
    assert synced == [torch.device("cuda", 0)]
    assert clock.seconds(a, b) >= 0
    with pytest.raises(TypeError, match="mix"):
        clock.seconds(a, 1.0)


def test_cache_nbytes() -> None:
    assert cache_nbytes(None) is None
    assert cache_nbytes([torch.zeros(2, dtype=torch.bfloat16)]) == 4


# -- inputs and presets -------------------------------------------------------------------------


def test_make_inputs_layout(model: Any) -> None:
    batch = make_inputs(model, text_tokens=7, batch_size=3)
    ids = batch["input_ids"]
    assert tuple(ids.shape) == (3, FULL + 7)
    assert bool((ids == ids[0]).all())
    assert int((ids[0] == model.config.image_token_id).sum()) == FULL
    assert int(ids[0, 0]) == model.config.text_config.bos_token_id
    assert bool(batch["attention_mask"].all())
    assert batch["pixel_values"].dtype == torch.float32


def test_presets() -> None:
    assert list_presets() == ["tiny", "real-shaped"]
    assert preset_visual_tokens("real-shaped") == 576
    bf16: Any = build_preset("tiny", dtype=torch.bfloat16, lm_layers=1)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert bf16.config.text_config.num_hidden_layers == 1
    assert bf16.config.text_config._attn_implementation == "sdpa"
    assert make_inputs(bf16)["pixel_values"].dtype == torch.bfloat16
    assert resolve_dtype("torch.float32") == torch.float32


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_preset("huge"), "unknown benchmark preset 'huge'"),
        (lambda: build_preset("tiny", lm_layers=0), "lm_layers"),
        (lambda: resolve_dtype("int4"), "unknown dtype"),
        (lambda: preset_visual_tokens("nope"), "tiny, real-shaped"),
    ],
)
def test_preset_errors(call: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call()


# -- bad inputs to run_benchmark ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"repeats": 0}, "repeats must be an int >= 1"),
        ({"warmup": -1}, "warmup must be an int >= 0"),
        ({"new_tokens": 0}, "new_tokens must be an int >= 1"),
    ],
)
def test_bad_counts(model: nn.Module, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_benchmark(model, CONFIG, make_inputs(model), **kwargs)  # type: ignore[arg-type]


def test_bad_inputs(model: nn.Module) -> None:
    batch = make_inputs(model)
    with pytest.raises(ConfigError, match="one image"):
        run_benchmark(model, CONFIG, {**batch, "input_ids": batch["input_ids"][:, FULL:]})
    with pytest.raises(ConfigError, match="input_ids and pixel_values"):
        run_benchmark(model, CONFIG, {"input_ids": batch["input_ids"]})
    with pytest.raises(BudgetError, match="out of range"):
        run_benchmark(model, {**CONFIG, "keep": FULL + 1}, batch)
    with pytest.raises(ConfigError, match="text_tokens"):
        make_inputs(model, text_tokens=0)


def test_unsupported_model() -> None:
    with pytest.raises(ConfigError, match="LlavaForConditionalGeneration"):
        make_inputs(torch.nn.Linear(2, 2))


# -- CLI ------------------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(
        "--preset", "tiny", "--keep-ratio", "0.125", "--text-tokens", "12", "--repeats", "2",
        "--warmup", "0", "--new-tokens", "2", "--batch-size", "2", "--json",
    )  # fmt: skip
    assert _bench.handler(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["setup"]["kept_visual_tokens"] == 32
    assert data["setup"]["batch_size"] == 2
    assert data["setup"]["model"] == "tiny"
    assert data["pruned"]["lm_prefill_tokens"] == 32 + 12
    assert data["unpruned"]["lm_prefill_tokens"] == FULL + 12
    assert data["order"] == ["unpruned", "pruned"] * 2
    ratios = data["ratios"]
    expected = data["unpruned"]["prefill_s"] / data["pruned"]["prefill_s"]
    assert ratios["prefill_speedup"] == pytest.approx(expected)
    assert ratios["predicted_prefill_ratio"] == pytest.approx(data["flops"]["ratio"])


def test_cli_table_with_pipeline_file(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("scorer: {name: random}\nselector: {name: topk}\nkeep: 16\n")
    code = main(
        ["bench", "--preset", "tiny", "--pipeline", str(path), "--repeats", "1", "--warmup", "0",
         "--new-tokens", "2", "--lm-layers", "1", "--threads", "1"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "RandomScorer" in out
    assert f"{FULL} -> 16 visual tokens" in out
    assert "LM cut to 1 layers" in out
    assert "prefill speedup" in out


def test_cli_loads_a_checkpoint(
    model: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model.save_pretrained(tmp_path / "ckpt")
    argv = ["--model", str(tmp_path / "ckpt"), "--keep", "8", "--repeats", "1", "--warmup", "0"]
    assert main(["bench", *argv, "--new-tokens", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["setup"]["model"] == str(tmp_path / "ckpt")
    assert data["pruned"]["lm_prefill_tokens"] == 8 + TEXT
    assert data["setup"]["attn_implementation"] == "sdpa"
    assert main(["bench", "--model", str(tmp_path)]) == 2  # no config.json there
    assert "could not load model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--keep", "300"], "out of range for N=256"),
        (["--pipeline", "/nonexistent.yaml"], "does not exist"),
        (["--lm-layers", "2", "--model", "x"], "--lm-layers applies to --preset"),
        (["--device", "meta"], "only cpu and cuda"),
        (["--device", "tpu"], "invalid --device"),
    ],
)
def test_cli_errors(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    if "--model" not in argv:
        argv = ["--preset", "tiny", *argv]
    assert main(["bench", *argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_cuda_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["bench", "--preset", "tiny", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "tiny", "--keep", "4", "--keep-ratio", "0.5"],
        ["--preset", "tiny", "--model", "x"],
        [],
        ["--preset", "tiny", "--repeats", "0"],
        ["--preset", "tiny", "--keep-ratio", "1.5"],
        ["--preset", "tiny", "--text-tokens", "0"],
        ["--preset", "tiny", "--dtype", "int8"],
    ],
)
def test_cli_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["bench", *argv])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err
