"""Tests of tokenprune.bench.flops (analytic prefill FLOPs) and the ``tokenprune flops`` CLI."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import doctest
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tokenprune.bench import flops
from tokenprune.bench.flops import (
    PRESETS,
    LMShape,
    VisionShape,
    VLMShape,
    format_table,
    get_preset,
    kv_cache_bytes,
    layer_token_counts,
    list_presets,
    llm_flops,
    llm_layer_flops,
    load_shape,
    pipeline_schedule,
    prefill_flops,
    resolve_tokens,
    shape_from_config,
    vision_flops,
    vit_layer_flops,
)
from tokenprune.cli import _flops
from tokenprune.errors import BudgetError, ConfigError
from tokenprune.plugin import Runtime

if TYPE_CHECKING:
    from collections.abc import Callable

T = 1e12
LLAVA = get_preset("llava-1.5-7b")
# A tiny LM whose FLOPs are easy to compute by hand: d = 3, m = 5.
TINY = LMShape(layers=2, hidden=3, intermediate=5, heads=1, kv_heads=1)


# ----------------------------------------------------------------------------- paper values


@pytest.mark.parametrize(
    ("tokens", "paper_tflops"), [(576, 3.82), (192, 1.25), (128, 0.83), (64, 0.42)]
)
def test_desap_paper_values_llava_1_5_7b(tokens: int, paper_tflops: float) -> None:
    r = prefill_flops("llava-1.5-7b", tokens, convention="desap")
    assert r.total_flops / T == pytest.approx(paper_tflops, rel=0.02)
    assert r.reference_flops / T == pytest.approx(3.82, rel=0.02)


def test_desap_exact_values_pinned() -> None:
    # 32 * (4 n d^2 + 2 n^2 d + 3 n d m), d = 4096, m = 11008.
    got = {n: prefill_flops(LLAVA, n, convention="desap").total_flops for n in (576, 192, 128, 64)}
    assert got == {
        576: 3_817_152_184_320,
        192: 1_253_056_708_608,
        128: 833_223_655_424,
        64: 415_538_085_888,
    }
    assert got[576] / got[64] == pytest.approx(9.186, abs=1e-3)  # the paper's "10x"
    assert (got[576] - got[64]) / T == pytest.approx(3.4, abs=0.01)  # "3.4 TFLOPs saved"


def test_desap_llava_next_2880_vs_320() -> None:
    r = prefill_flops("llava-next-7b", 320, convention="desap")
    assert r.full_visual_tokens == 2880
    assert r.reference_flops == 20_825_222_676_480
    assert r.total_flops == 2_099_165_265_920
    assert r.reference_flops / T == pytest.approx(20.8, rel=0.02)
    assert r.total_flops / T == pytest.approx(2.10, rel=0.02)
    assert r.ratio == pytest.approx(9.92, abs=0.01)


# ----------------------------------------------------------------------------- fastv arithmetic


def test_layer_flops_by_hand() -> None:
    # n = 2, d = 3, m = 5: 4*2*9 = 72, 2*4*3 = 24, ffn 2*2*3*5 = 60 (fastv) or 3*2*3*5 = 90 (desap)
    assert llm_layer_flops(2, 3, 5) == 72 + 24 + 60
    assert llm_layer_flops(2, 3, 5, "fastv") == 156
    assert llm_layer_flops(2, 3, 5, "desap") == 72 + 24 + 90
    assert llm_layer_flops(1, 3, 5) == 36 + 6 + 30
    assert vit_layer_flops(2, 3, 5) == 156
    assert vit_layer_flops(2, 3, 5, mlp_matrices=3) == 186


def test_llm_flops_by_hand() -> None:
    assert llm_flops(TINY, 2) == 2 * 156
    assert llm_flops(TINY, 2, convention="desap") == 2 * 186
    # whole prefill: n = 1 visual + 1 text = 2 in every layer
    assert llm_flops(TINY, 1, text_tokens=1) == 2 * 156


def test_fastv_llava_values_match_notes() -> None:
    # docs/transformers-notes.md section 5: 576 + 60 -> 3.307 T, 64 + 60 -> 0.628 T, ratio 5.26x.
    full = prefill_flops(LLAVA, 576)
    assert full.total_flops / T == pytest.approx(2.986, abs=1e-3)
    r = prefill_flops(LLAVA, 64)
    assert r.ratio == pytest.approx(9.24, abs=0.005)
    pre = prefill_flops(LLAVA, 64, scope="prefill", text_tokens=60)
    assert pre.llm_flops / T == pytest.approx(0.628, abs=1e-3)
    assert pre.reference_flops / T == pytest.approx(3.307, abs=1e-3)
    assert pre.ratio == pytest.approx(5.26, abs=0.005)
    vis = prefill_flops(LLAVA, 64, scope="prefill", text_tokens=60, include_vision=True)
    assert vis.vision_flops is not None
    assert vis.vision_flops / T == pytest.approx(0.191, abs=1e-3)
    assert vis.ratio == pytest.approx(4.27, abs=0.005)


def test_vision_flops_by_hand() -> None:
    clip = VisionShape(layers=24, hidden=1024, intermediate=4096, heads=16, tokens=577)
    per_layer = 4 * 577 * 1024**2 + 2 * 577**2 * 1024 + 2 * 577 * 1024 * 4096
    assert vision_flops(clip) == 24 * per_layer
    assert vision_flops(dataclasses.replace(clip, sequences=5)) == 5 * 24 * per_layer


def test_vision_term_is_in_both_runs() -> None:
    r = prefill_flops(LLAVA, 64, include_vision=True)
    plain = prefill_flops(LLAVA, 64)
    assert r.vision_flops == vision_flops(LLAVA.vision)  # type: ignore[arg-type]
    assert r.total_flops == plain.total_flops + r.vision_flops
    assert r.reference_flops == plain.reference_flops + r.vision_flops
    assert 1.0 < r.ratio < plain.ratio


# ----------------------------------------------------------------------------- multi-stage


def test_layer_token_counts() -> None:
    assert layer_token_counts(4, 576) == (576,) * 4
    assert layer_token_counts(4, 576, [(2, 144)]) == (576, 576, 144, 144)
    assert layer_token_counts(5, 8, [(1, 4), (3, 0)]) == (8, 4, 4, 0, 0)


@pytest.mark.parametrize("convention", ["fastv", "desap"])
@pytest.mark.parametrize("text", [0, 60])
def test_multistage_equals_sum_of_pieces(convention: flops.Convention, text: int) -> None:
    k, n0, n1 = 2, 576, 144
    lm = LLAVA.lm
    staged = llm_flops(lm, n0, stages=[(k, n1)], text_tokens=text, convention=convention)
    first = llm_flops(
        dataclasses.replace(lm, layers=k), n0, text_tokens=text, convention=convention
    )
    rest = llm_flops(
        dataclasses.replace(lm, layers=lm.layers - k), n1, text_tokens=text, convention=convention
    )
    assert staged == first + rest
    per = llm_layer_flops(n0 + text, lm.hidden, lm.intermediate, convention)
    per1 = llm_layer_flops(n1 + text, lm.hidden, lm.intermediate, convention)
    assert staged == k * per + (lm.layers - k) * per1


def test_three_stage_schedule_and_kv_cache() -> None:
    lm = LLAVA.lm
    stages = [(8, 288), (16, 144), (24, 72)]  # PyramidDrop-like
    expected = sum(8 * llm_layer_flops(n, lm.hidden, lm.intermediate) for n in (576, 288, 144, 72))
    assert llm_flops(lm, 576, stages=stages) == expected
    per_token_layer = 2 * lm.kv_heads * lm.attention_head_dim * 2  # bf16
    assert kv_cache_bytes(lm, 576, stages=stages) == per_token_layer * 8 * (576 + 288 + 144 + 72)


def test_prefill_flops_with_stage_ratio() -> None:
    r = prefill_flops(LLAVA, 576, stages=[(2, 0.25)])  # FastV K = 2, R = 75%
    assert r.stages == ((2, 144),)
    assert r.visual_tokens == 576
    assert r.total_flops == llm_flops(LLAVA.lm, 576, stages=[(2, 144)])
    assert r.ratio == pytest.approx(3.43, abs=0.005)


@pytest.mark.parametrize(
    ("stages", "error", "match"),
    [
        ([(0, 100)], ConfigError, r"outside \[1, 31\]"),
        ([(32, 100)], ConfigError, r"outside \[1, 31\]"),
        ([(4, 100), (4, 50)], ConfigError, "strictly increase"),
        ([(4, 100), (2, 50)], ConfigError, "strictly increase"),
        ([(4, 700)], BudgetError, "between 0 and 576"),
        ([(4, 100), (8, 200)], BudgetError, "between 0 and 100"),
        ([(4, -1)], BudgetError, "between 0 and 576"),
    ],
)
def test_bad_stages(stages: list[tuple[int, int]], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        llm_flops(LLAVA.lm, 576, stages=stages)


# ----------------------------------------------------------------------------- ratios


@pytest.mark.parametrize(
    ("value", "full", "expected"),
    [
        (0.111, 576, 64),  # 63.936
        (0.222, 576, 128),  # 127.872
        (0.333, 576, 192),  # 191.808
        (0.5, 5, 3),  # 2.5 rounds half up
        (0.125, 4, 1),  # 0.5 rounds half up
        (0.0001, 576, 1),  # minimum of 1
        (1.0, 576, 576),
        (1, 576, 1),  # an int is a count, not a ratio
        (576, 576, 576),
        (0.111, 2880, 320),  # 319.68: the LLaVA-NeXT budget
    ],
)
def test_resolve_tokens(value: float, full: int, expected: int) -> None:
    assert resolve_tokens(value, full) == expected


@pytest.mark.parametrize("value", [0, -1, 577, 0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_resolve_tokens_out_of_range(value: float) -> None:
    with pytest.raises(BudgetError):
        resolve_tokens(value, 576)


@pytest.mark.parametrize("value", [True, "64", None])
def test_resolve_tokens_wrong_type(value: Any) -> None:
    with pytest.raises(ConfigError, match="int count or a float ratio"):
        resolve_tokens(value, 576)


def test_resolve_tokens_allow_zero() -> None:
    assert resolve_tokens(0, 576, allow_zero=True) == 0
    assert resolve_tokens(0.0, 576, allow_zero=True) == 0
    assert resolve_tokens(0.0001, 576, allow_zero=True) == 1


def test_ratio_and_reduction() -> None:
    r = prefill_flops(LLAVA, 0.111, convention="desap")
    assert r.visual_tokens == 64
    assert r.ratio == r.reference_flops / r.total_flops
    assert r.reduction == pytest.approx(1 - r.total_flops / r.reference_flops)
    assert r.reduction == pytest.approx(0.891, abs=1e-3)
    full = prefill_flops(LLAVA)
    assert full.visual_tokens == 576
    assert full.ratio == 1.0
    assert full.reduction == 0.0


# ----------------------------------------------------------------------------- kv cache, presets


def test_kv_cache_bytes() -> None:
    lm = LLAVA.lm
    assert kv_cache_bytes(lm, 576) == 2 * 32 * 32 * 128 * 576 * 2
    assert kv_cache_bytes(lm, 576, dtype="float32") == 2 * kv_cache_bytes(lm, 576)
    assert kv_cache_bytes(lm, 576, dtype="torch.float16") == kv_cache_bytes(lm, 576)
    assert kv_cache_bytes(lm, 576, dtype="fp8") * 2 == kv_cache_bytes(lm, 576)
    assert kv_cache_bytes(lm, 64, text_tokens=60) == 2 * 32 * 32 * 128 * 124 * 2
    qwen = get_preset("qwen2.5-vl-7b").lm  # GQA: 4 KV heads of 128
    assert kv_cache_bytes(qwen, 1024) == 2 * 28 * 4 * 128 * 1024 * 2
    with pytest.raises(ConfigError, match="unknown KV-cache dtype 'int3'"):
        kv_cache_bytes(lm, 576, dtype="int3")


def test_presets_listed() -> None:
    assert list_presets() == [
        "llava-1.5-13b",
        "llava-1.5-7b",
        "llava-next-7b",
        "qwen2.5-vl-7b",
        "video-llava-7b",
    ]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset(name: str) -> None:
    shape = get_preset(name)
    assert shape.name == name
    assert shape.source.startswith("public config.json")
    assert shape.vision is not None
    full = prefill_flops(name, include_vision=True)
    assert full.ratio == 1.0
    half = prefill_flops(name, 0.5, scope="prefill", text_tokens=60, include_vision=True)
    assert 1.0 < half.ratio < 2.0
    json.dumps(half.to_dict())


def test_preset_values() -> None:
    assert get_preset("llava-1.5-13b").lm == LMShape(
        layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40, vocab=32064
    )
    next7b = get_preset("llava-next-7b")
    assert next7b.lm == LLAVA.lm
    assert next7b.visual_tokens == 5 * 576
    qwen = get_preset("qwen2.5-vl-7b")
    assert (qwen.lm.layers, qwen.lm.hidden, qwen.lm.intermediate) == (28, 3584, 18944)
    assert (qwen.lm.heads, qwen.lm.kv_heads) == (28, 4)
    assert qwen.vision is not None
    assert (qwen.vision.layers, qwen.vision.hidden, qwen.vision.intermediate) == (32, 1280, 3420)
    video = get_preset("video-llava-7b")
    assert video.lm == LLAVA.lm
    assert video.visual_tokens == 8 * 256


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(ConfigError, match="unknown model preset 'llava-7b'") as info:
        get_preset("llava-7b")
    for name in PRESETS:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match=r"available presets: llava-1\.5-13b, llava-1\.5-7b"):
        load_shape("llava-7b")
    with pytest.raises(ConfigError, match="available presets"):
        prefill_flops("nope")


def test_with_visual_tokens() -> None:
    qwen = get_preset("qwen2.5-vl-7b").with_visual_tokens(256)
    assert qwen.visual_tokens == 256
    assert qwen.vision is not None
    assert qwen.vision.tokens == 4 * 256  # 2 x 2 merge: the encoder sees 4 patches per token
    llava = LLAVA.with_visual_tokens(100)
    assert llava.vision == LLAVA.vision  # fixed resolution: encoder unchanged
    assert load_shape("qwen2.5-vl-7b", visual_tokens=256) == qwen


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"convention": "pdrop"}, "unknown FLOPs convention 'pdrop'; choose one of fastv, desap"),
        ({"scope": "all"}, "unknown scope 'all'"),
        ({"text_tokens": 60}, "only count with scope='prefill'"),
        ({"scope": "prefill", "text_tokens": -1}, "text_tokens must be an int >= 0"),
        ({"dtype": "int3"}, "unknown KV-cache dtype"),
    ],
)
def test_prefill_flops_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        prefill_flops(LLAVA, 64, **kwargs)


def test_include_vision_needs_an_encoder() -> None:
    text_only = VLMShape(name="lm", lm=TINY, visual_tokens=4)
    with pytest.raises(ConfigError, match="no known vision encoder"):
        prefill_flops(text_only, include_vision=True)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (
            LMShape,
            {"layers": 0, "hidden": 4, "intermediate": 4, "heads": 1, "kv_heads": 1},
            "layers",
        ),
        (
            LMShape,
            {"layers": 1, "hidden": 5, "intermediate": 4, "heads": 2, "kv_heads": 1},
            "head_dim",
        ),
        (
            VisionShape,
            {"layers": 1, "hidden": 4, "intermediate": 4, "heads": 1, "tokens": -3},
            "tokens",
        ),
        (
            VisionShape,
            {
                "layers": 1,
                "hidden": 4,
                "intermediate": 4,
                "heads": 1,
                "tokens": 3,
                "mlp_matrices": 4,
            },
            "mlp_matrices",
        ),
    ],
)
def test_shape_validation(cls: Callable[..., object], kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


# ----------------------------------------------------------------------------- result, table


def test_to_dict_round_trip() -> None:
    r = prefill_flops(LLAVA, 64, scope="prefill", text_tokens=60, stages=[(2, 32)])
    d = json.loads(json.dumps(r.to_dict()))
    assert d["convention"] == "fastv"
    assert d["formula"] == "4nd^2 + 2n^2d + 2ndm"
    assert d["scope"] == "prefill"
    assert d["stages"] == [[2, 32]]
    assert d["total_flops"] == r.llm_flops
    assert d["vision_flops"] is None
    assert d["ratio"] == pytest.approx(r.ratio)
    assert "multiply-accumulate" in d["units"]


def test_format_table() -> None:
    results = [prefill_flops(LLAVA, n, convention=c) for c in ("desap", "fastv") for n in (576, 64)]
    table = format_table(results)
    lines = table.splitlines()
    assert lines[0].startswith("| model | convention | scope |")
    assert "vs unpruned" in lines[0]
    assert lines[1] == "|" + "---|" * 12
    assert all(line.count("|") == 13 for line in lines[:6])
    assert "| llava-1.5-7b | desap | visual | 576 / 576 | 0 | - | 3.817 |" in lines[2]
    assert "| 64 / 576 |" in lines[3]
    assert "| 9.19x | 89.1% | 32.0 (bfloat16) |" in lines[3]
    assert "| 9.24x |" in lines[5]
    assert "- desap: per LLM layer 4nd^2 + 2n^2d + 3ndm" in table
    assert "- fastv: per LLM layer 4nd^2 + 2n^2d + 2ndm" in table
    assert "scope visual" in table
    assert "scope prefill" not in table


# ----------------------------------------------------------------------------- configs


def test_shape_from_text_config() -> None:
    text = argparse.Namespace(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=32,
        vocab_size=100,
    )
    shape = shape_from_config(text, name="toy", visual_tokens=16)
    assert shape.lm == LMShape(
        layers=2, hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=100, head_dim=32
    )
    assert shape.lm.attention_head_dim == 32
    assert shape.vision is None
    with pytest.raises(ConfigError, match="pass visual_tokens"):
        shape_from_config(text)
    with pytest.raises(ConfigError, match="lacks intermediate_size"):
        shape_from_config(
            argparse.Namespace(hidden_size=4, num_hidden_layers=1, num_attention_heads=1),
            visual_tokens=4,
        )


def test_shape_from_transformers_configs(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    llava = shape_from_config(transformers.LlavaConfig())
    assert dataclasses.replace(llava.lm, vocab=32064) == LLAVA.lm
    assert llava.visual_tokens == 576
    assert llava.vision == LLAVA.vision
    full = shape_from_config(transformers.LlavaConfig(vision_feature_select_strategy="full"))
    assert full.visual_tokens == 577

    nxt = shape_from_config(transformers.LlavaNextConfig())
    assert nxt.visual_tokens == 2880
    assert nxt.vision == get_preset("llava-next-7b").vision

    video = shape_from_config(transformers.VideoLlavaConfig())
    assert video.visual_tokens == 2056  # transformers keeps each frame's [CLS]: 8 x 257
    assert video.vision is not None
    assert (video.vision.tokens, video.vision.sequences) == (257, 8)

    preset = get_preset("qwen2.5-vl-7b")
    qwen_cfg = transformers.Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
        },
    )
    qwen = shape_from_config(qwen_cfg, name="qwen2.5-vl-7b")
    assert (qwen.lm, qwen.vision, qwen.visual_tokens) == (
        preset.lm,
        preset.vision,
        preset.visual_tokens,
    )
    assert shape_from_config(qwen_cfg, visual_tokens=256) == dataclasses.replace(
        preset.with_visual_tokens(256), name=qwen_cfg.model_type, source=qwen.source
    )

    transformers.LlavaConfig().save_pretrained(tmp_path)
    from_dir = load_shape(str(tmp_path))
    assert from_dir.name == str(tmp_path)
    assert from_dir.lm == llava.lm


def test_load_shape_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        load_shape(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="could not load a transformers config"):
        load_shape(str(tmp_path))

    def offline(*_args: object, **_kwargs: object) -> object:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ConfigError, match="hub id needs network access"):
        load_shape("some-owner/some-model")


# ----------------------------------------------------------------------------- CLI


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="tokenprune")
    _flops.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["flops", *argv])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli(
        ["--model", "llava-1.5-7b", "--tokens", "576,192,128,64", "--convention", "desap"], capsys
    )
    assert (rc, err) == (0, "")
    rows = [line for line in out.splitlines() if line.startswith("| llava-1.5-7b")]
    assert [row.split(" | ")[6] for row in rows] == ["3.817", "1.253", "0.833", "0.416"]
    assert [row.split(" | ")[9] for row in rows] == ["1.00x", "3.05x", "4.58x", "9.19x"]
    assert "- desap: per LLM layer 4nd^2 + 2n^2d + 3ndm" in out
    assert "- model shape: public config.json of llava-hf/llava-1.5-7b-hf" in out


def test_cli_ratios_and_prefill(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(
        ["--model", "llava-1.5-7b", "--tokens", "0.111", "--text-tokens", "60", "--json"], capsys
    )
    assert rc == 0
    (d,) = json.loads(out)
    assert (d["visual_tokens"], d["text_tokens"], d["scope"]) == (64, 60, "prefill")
    assert d["convention"] == "fastv"
    assert d["ratio"] == pytest.approx(5.26, abs=0.005)


def test_cli_json_stages_and_vision(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(
        [
            "--model",
            "llava-1.5-7b",
            "--tokens",
            "576,288",
            "--stage",
            "8:144",
            "--stage",
            "16:0.125",
            "--include-vision",
            "--dtype",
            "float16",
            "--json",
        ],
        capsys,
    )
    assert rc == 0
    data = json.loads(out)
    assert [d["visual_tokens"] for d in data] == [576, 288]
    assert all(d["stages"] == [[8, 144], [16, 72]] for d in data)
    assert all(d["vision_flops"] > 0 and d["dtype"] == "float16" for d in data)
    expected = prefill_flops(
        LLAVA, 288, stages=[(8, 144), (16, 72)], include_vision=True, dtype="float16"
    )
    assert data[1] == json.loads(json.dumps(expected.to_dict()))
    # nargs="+" form: one --stage flag with two stages
    rc, out2, _ = _cli(
        [
            "--model",
            "llava-1.5-7b",
            "--tokens",
            "576,288",
            "--stage",
            "8:144",
            "16:0.125",
            "--include-vision",
            "--dtype",
            "float16",
            "--json",
        ],
        capsys,
    )
    assert (rc, out2) == (0, out)


def test_cli_full_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(
        ["--model", "qwen2.5-vl-7b", "--full-tokens", "256", "--tokens", "0.5", "--json"], capsys
    )
    assert rc == 0
    (d,) = json.loads(out)
    assert (d["full_visual_tokens"], d["visual_tokens"]) == (256, 128)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--model", "llava-7b"], "unknown model preset 'llava-7b'; available presets: "),
        (["--model", "llava-1.5-7b", "--tokens", "577"], r"token count 577 is outside \[1, 576\]"),
        (["--model", "llava-1.5-7b", "--tokens", "0"], r"token count 0 is outside \[1, 576\]"),
        (["--model", "llava-1.5-7b", "--tokens", "1.5"], r"token ratio 1.5 is outside \(0, 1\]"),
        (["--model", "llava-1.5-7b", "--stage", "40:10"], r"outside \[1, 31\]"),
        (
            ["--model", "llava-1.5-7b", "--stage", "2:600"],
            r"stage 2:600: token count 600 is outside",
        ),
        (["--model", "llava-1.5-7b", "--tokens", "64", "--stage", "2:100"], "between 0 and 64"),
        (["--model", "llava-1.5-7b", "--scope", "prefill"], "needs --text-tokens"),
        (
            ["--model", "llava-1.5-7b", "--scope", "visual", "--text-tokens", "60"],
            "only with --scope prefill",
        ),
        (["--model", "llava-1.5-7b", "--dtype", "int3"], "unknown KV-cache dtype"),
    ],
)
def test_cli_bad_values(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli(argv, capsys)
    assert rc == 2
    assert out == ""
    assert err.startswith("tokenprune flops: error: ")
    assert re.search(match, err)
    if "unknown model preset" in match:
        assert all(name in err for name in PRESETS)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--stage", "2-144"], "malformed stage '2-144': expected LAYER:TOKENS"),
        (["--stage", "x:5"], "malformed stage 'x:5'"),
        (["--stage", "2:abc"], "malformed stage '2:abc': invalid token budget 'abc'"),
        (["--stage", "2:"], "malformed stage '2:'"),
        (["--tokens", "64,abc"], "invalid token budget 'abc'"),
        (["--tokens", "-5"], "invalid token budget '-5'"),
        (["--tokens", ","], "at least one"),
        (["--text-tokens", "-1"], "expected an int >= 0"),
        (["--full-tokens", "0"], "expected an int >= 1"),
        (["--convention", "pdrop"], "invalid choice: 'pdrop'"),
    ],
)
def test_cli_malformed_arguments(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _cli(["--model", "llava-1.5-7b", *argv], capsys)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_requires_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _cli(["--tokens", "64"], capsys)
    assert "--model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- module hygiene


def test_doctests() -> None:
    result = doctest.testmod(flops, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 10
    assert result.failed == 0


def test_flops_module_imports_no_torch() -> None:
    tree = ast.parse(Path(flops.__file__).read_text())
    top_level = [
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else node.names[:1])
    ]
    assert not [name for name in top_level if name.split(".")[0] in {"torch", "transformers"}]


# ----------------------------------------------------------------------------- pipeline configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _llm_layer(n: int) -> int:
    """FastV convention for one LLaVA-1.5-7B decoder layer, written out by hand."""
    d, m = 4096, 11008
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def test_multi_stage_config_flops_pinned(capsys: pytest.CaptureFixture[str]) -> None:
    # DeSAP to 192 at the encoder, FastV to 64 before layer 2: layers 0-1 see 192, 2-31 see 64.
    code, out, err = _cli(
        ["--model", "llava-1.5-7b", "--config", str(CONFIGS / "desap192_fastv64.yaml"), "--json"],
        capsys,
    )
    assert code == 0, err
    (row,) = json.loads(out)
    assert (row["visual_tokens"], row["stages"]) == (192, [[2, 64]])
    assert row["llm_flops"] == 2 * _llm_layer(192) + 30 * _llm_layer(64) == 363_998_478_336
    assert row["reference_flops"] == 32 * _llm_layer(576)
    assert row["ratio"] == pytest.approx(8.20, abs=0.005)


def test_fastv_config_schedule_matches_the_paper_setting() -> None:
    runtime = Runtime(autoload=False)
    config = runtime.load_config(CONFIGS / "fastv_k2_50pct.yaml")
    assert pipeline_schedule(config, 576) == (576, ((2, 288),))
    r = prefill_flops(LLAVA, *pipeline_schedule(config, 576)[:1], stages=[(2, 288)])
    assert r.llm_flops == 2 * _llm_layer(576) + 30 * _llm_layer(288)
    # ratios of the arriving tokens, rounded half up at each position
    chained = runtime.parse_config(
        {"scorer": {"name": "random"}, "selector": {"name": "topk"}, "keep_ratio": 0.333,
         "llm": [{"layer": 2, "keep_ratio": 0.5}, {"layer": 16, "keep": 16}]}
    )  # fmt: skip
    assert pipeline_schedule(chained, 576) == (192, ((2, 96), (16, 16)))


def test_config_excludes_tokens_and_stages(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(
        ["--model", "llava-1.5-7b", "--config", str(CONFIGS / "fastv_k2_50pct.yaml"),
         "--tokens", "64"], capsys
    )  # fmt: skip
    assert code == 2
    assert "--config gives the budgets" in err


def test_config_count_above_the_model_tokens_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = _cli(
        ["--model", "llava-1.5-7b", "--full-tokens", "100", "--config",
         str(CONFIGS / "desap192_fastv64.yaml")], capsys
    )  # fmt: skip
    assert code == 2
    assert "keep: token count 192 is outside [1, 100]" in err
