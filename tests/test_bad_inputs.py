"""The bad-input catalogue: every mistake a user can make gets a tokenprune error that says what.

Each row of :data:`TABLE` is one mistake: a callable that makes it, the exact error class it must
raise, and a regular expression its message must match. The expressions check that the message
names the offending field or tensor and says how to fix it, not only that something failed.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
from torch import nn

import tokenprune
from tokenprune import (
    AdapterError,
    BudgetError,
    CapabilityError,
    ConfigError,
    Pipeline,
    PluginError,
    PruneContext,
    Runtime,
    Scorer,
    ShapeError,
    StageConfig,
    TokenPruneError,
    hookimpl,
)
from tokenprune.stages.selectors.topk import TopKSelector
from tokenprune.testing import llava_prompts, make_context, tiny_llava

N = 16  # tokens per image of tiny_llava(): a 4x4 patch grid


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: Test id.
        trigger: Makes the mistake; must raise.
        error: The exact class of the error.
        match: Regular expression the message must match (``re.search``).
        requires: Module the case needs (a plugin); the case is skipped without it.
    """

    id: str
    trigger: Callable[[], Any]
    error: type[TokenPruneError]
    match: str
    requires: str | None = None


# -- shared, lazily built inputs ------------------------------------------------------------------


@functools.cache
def runtime() -> Runtime:
    return Runtime(autoload=False)


@functools.cache
def llava() -> nn.Module:
    return tiny_llava()


def prompts(rows: list[tuple[int, int]] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
    return llava_prompts(llava(), rows or [(2, 3), (1, 4)], **kwargs)


def config(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "scorer": {"name": "cls_attention"},
        "selector": {"name": "topk"},
        "keep": 4,
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def forward(pipeline: Any, batch: dict[str, Any], model: nn.Module | None = None) -> None:
    model = model if model is not None else llava()
    with tokenprune.apply(model, pipeline, runtime=runtime()), torch.no_grad():
        model(**batch)


# -- stages that produce bad values ---------------------------------------------------------------


class BadScoresConfig(StageConfig):
    name: Literal["bad_scores"] = "bad_scores"
    value: float = math.nan


class BadScoresScorer(Scorer[BadScoresConfig]):
    """Scores one token with ``value`` (NaN or Inf) and the others with 0."""

    name: ClassVar[str] = "bad_scores"
    Config: ClassVar[type[StageConfig]] = BadScoresConfig

    def score(self, ctx: PruneContext) -> torch.Tensor:
        scores = torch.zeros(ctx.visual.batch_size, ctx.visual.num_tokens)
        scores[0, 0] = self.config.value
        return scores


def bad_scores(value: float) -> None:
    ctx = make_context(2, N, 8, 4)
    Pipeline(BadScoresScorer(value=value), TopKSelector(), keep=4)(ctx)


def nan_features() -> None:
    batch = prompts()
    batch["pixel_values"] = torch.full_like(batch["pixel_values"], math.nan)
    forward(config(), batch)


# -- plugins --------------------------------------------------------------------------------------


class HealthyPlugin:
    __name__ = "healthy"

    @hookimpl
    def tokenprune_register_stages(self, registry: Any) -> None:
        registry.add(BadScoresScorer)


class BrokenPlugin:
    __name__ = "broken"

    @hookimpl
    def tokenprune_register_stages(self, registry: Any) -> None:
        raise RuntimeError("cannot register my stages")


def plugin_raises() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = Runtime([BrokenPlugin(), HealthyPlugin()], autoload=False)
    assert [str(w.message) for w in caught] == [str(f) for f in rt.failures]
    assert "bad_scores" in rt.stages.names("scorer")  # the other plugin still loads
    assert [p.name for p in rt.plugins] == ["builtin", "healthy"]
    raise rt.failures[0]


# -- files ----------------------------------------------------------------------------------------


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def truncated_saved_pipeline(tmp: Path) -> None:
    saved = tokenprune.save_pipeline(config(), tmp / "model", runtime=runtime())
    saved.write_text(saved.read_text(encoding="utf-8")[:45], encoding="utf-8")
    tokenprune.apply(llava(), tmp / "model", runtime=runtime())


# -- DeSAP (a text-guided plugin) -----------------------------------------------------------------


@functools.cache
def desap_pipeline() -> Pipeline:
    from tokenprune.testing.clip import tiny_paired_clip
    from tokenprune_desap.merger import NearestMerger
    from tokenprune_desap.scorer import DesapScorer
    from tokenprune_desap.selector import DesapJointSelector
    from tokenprune_desap.text_encoder import PairedTextEncoder

    clip, tokenizer = tiny_paired_clip(llava())
    scorer = DesapScorer(text_encoder=PairedTextEncoder(clip, tokenizer))
    return Pipeline(scorer, DesapJointSelector(), NearestMerger(), keep=4)


def truncated_text_encoder(tmp: Path) -> None:
    from tokenprune.testing.clip import tiny_paired_clip

    folder = tmp / "clip"
    tiny_paired_clip(llava(), save_to=folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    desap = {"name": "desap", "text_encoder": str(folder)}
    cfg = config(scorer=desap, selector={"name": "desap_joint"}, merger={"name": "nearest_merge"})
    tokenprune.apply(llava(), cfg)  # the encoder is loaded (and checked) at install time


# -- the table ------------------------------------------------------------------------------------

BUDGET_HINT = r"\n  \(`keep` is a token count >= 1 and `keep_ratio` a fraction in \(0, 1\]"


def table(tmp: Path) -> list[Case]:
    """The catalogue; ``tmp`` is a scratch directory for the cases that need files."""
    rt = runtime()
    return [
        Case(
            "unknown-stage-name",
            lambda: rt.parse_config(config(scorer={"name": "cls_atention"})),
            ConfigError,
            r"unknown scorer 'cls_atention'; available: .*cls_attention.* install that package "
            r"or name its module under `plugins:`",
        ),
        Case(
            "unknown-adapter-name",
            lambda: rt.adapters.get("lava"),
            ConfigError,
            r"unknown adapter 'lava'; available: .*\bllava\b",
        ),
        Case(
            "misspelled-stage-field",
            lambda: rt.parse_config(config(scorer={"name": "cls_attention", "layr": -2})),
            ConfigError,
            r"scorer\.cls_attention\.layr: Extra inputs are not permitted; did you mean `layer`\?",
        ),
        Case(
            "misspelled-top-level-field",
            lambda: rt.parse_config({**config(), "kep": 4}),
            ConfigError,
            r"\n  kep: Extra inputs are not permitted; did you mean `keep`\? \(allowed: .*keep",
        ),
        Case(
            "misspelled-stage-keyword",
            lambda: TopKSelector(scroe="task"),
            ConfigError,
            r"TopKSelector: invalid options: scroe: Extra inputs are not permitted",
        ),
        Case(
            "keep-zero",
            lambda: rt.parse_config(config(keep=0)),
            BudgetError,
            r"keep: Input should be greater than 0" + BUDGET_HINT,
        ),
        Case(
            "keep-negative",
            lambda: rt.parse_config(config(keep=-3)),
            BudgetError,
            r"keep: Input should be greater than 0" + BUDGET_HINT,
        ),
        Case(
            "keep-above-N-at-forward",
            lambda: forward(config(keep=N + 1), prompts()),
            BudgetError,
            rf"`keep`={N + 1} is out of range for N={N} tokens per image; use 1 <= keep <= {N} "
            r"or a `keep_ratio`",
        ),
        Case(
            "keep_ratio-zero",
            lambda: rt.parse_config(config(keep=None, keep_ratio=0.0)),
            BudgetError,
            r"keep_ratio: Input should be greater than 0" + BUDGET_HINT,
        ),
        Case(
            "keep_ratio-above-one",
            lambda: rt.parse_config(config(keep=None, keep_ratio=1.5)),
            BudgetError,
            r"keep_ratio: Input should be less than or equal to 1" + BUDGET_HINT,
        ),
        Case(
            "keep_ratio-nan",
            lambda: rt.parse_config(config(keep=None, keep_ratio=math.nan)),
            BudgetError,
            r"keep_ratio: Input should be a finite number" + BUDGET_HINT,
        ),
        Case(
            "keep_ratio-nan-in-code",
            lambda: Pipeline(BadScoresScorer(), TopKSelector(), keep_ratio=math.nan),
            BudgetError,
            r"`keep_ratio`=nan must be in \(0, 1\]",
        ),
        Case(
            "keep-and-keep_ratio",
            lambda: rt.parse_config(config(keep=4, keep_ratio=0.5)),
            BudgetError,
            r"<config>: give exactly one of `keep` \(a count\) and `keep_ratio` \(a fraction\)",
        ),
        Case(
            "nan-scores",
            lambda: bad_scores(math.nan),
            ShapeError,
            r"bad_scores scores contains 1 NaN/Inf values; check the model's dtype \(float16 "
            r"overflow\) and the scorer's inputs",
        ),
        Case(
            "inf-scores",
            lambda: bad_scores(math.inf),
            ShapeError,
            r"bad_scores scores contains 1 NaN/Inf values; check the model's dtype",
        ),
        Case(
            "nan-features",
            nan_features,
            ShapeError,
            r"visual features contains NaN/Inf values before pruning; the vision tower produced "
            r"invalid activations \(try float32 or bfloat16",
        ),
        Case(
            "text-guided-without-question",
            lambda: forward(desap_pipeline(), prompts()),
            CapabilityError,
            r"the pipeline is text-guided but no question was given: pass "
            r"tokenprune_query=\[\.\.\.\] \(the user's question, one string per prompt\) to "
            r"forward\(\)",
            requires="tokenprune_desap",
        ),
        Case(
            "empty-question",
            lambda: forward(desap_pipeline(), {**prompts(), "tokenprune_query": ["what ?", " "]}),
            CapabilityError,
            r"desap got an empty question \(a blank tokenprune_query string\); .*pass it in "
            r"tokenprune_query, one non-empty string per prompt",
            requires="tokenprune_desap",
        ),
        Case(
            "question-count-mismatch",
            lambda: forward(config(), {**prompts(), "tokenprune_query": ["one question"]}),
            AdapterError,
            r"tokenprune_query has 1 string\(s\) but the batch has 2 prompt\(s\); pass one "
            r"question per prompt",
        ),
        Case(
            "more-images-than-placeholders",
            lambda: forward(
                config(),
                {
                    **prompts(),
                    "pixel_values": prompts([(2, 3), (1, 4), (1, 1)])["pixel_values"],
                },
            ),
            AdapterError,
            r"found placeholders for 2 image\(s\) in input_ids but pixel_values hold 3; each "
            r"image needs its own placeholder span",
        ),
        Case(
            "more-placeholders-than-images",
            lambda: forward(
                config(), {**prompts(), "pixel_values": prompts([(2, 3)])["pixel_values"]}
            ),
            AdapterError,
            r"input_ids hold more image placeholders than the 1 image\(s\) in pixel_values; "
            r"build prompts with the model's processor",
        ),
        Case(
            "capability-missing-on-the-model",
            lambda: tokenprune.apply(qwen(), config(), runtime=rt),
            CapabilityError,
            r"scorer 'cls_attention' requires capability 'cls_attention', which adapter "
            r"'qwen2_5_vl' does not provide; .*use the 'received_attention' scorer instead",
        ),
        Case(
            "unsupported-model-class",
            lambda: tokenprune.apply(nn.Linear(4, 4), config(), runtime=rt),
            AdapterError,
            r"unsupported model class Linear: no adapter accepts it\. Supported: llava "
            r"\(LlavaForConditionalGeneration\).* Install a plugin that adds an adapter for it",
        ),
        Case(
            "truncated-text-encoder-checkpoint",
            lambda: truncated_text_encoder(tmp),
            ConfigError,
            r"desap `text_encoder`='.*clip' cannot be loaded as a CLIPModel with a tokenizer "
            r"from safetensors weights \(SafetensorError: .*\); .*with intact model\.safetensors",
            requires="tokenprune_desap",
        ),
        Case(
            "truncated-saved-pipeline",
            lambda: truncated_saved_pipeline(tmp),
            ConfigError,
            r"config file '.*tokenprune\.json' cannot be parsed \(.*\); the file is damaged or "
            r"truncated; write it again with tokenprune\.save_pipeline",
        ),
        Case(
            "plugin-raises-during-registration",
            plugin_raises,
            PluginError,
            r"plugin 'broken' \(.*\) failed to load: RuntimeError: cannot register my stages",
        ),
        Case(
            "unknown-file-extension",
            lambda: rt.load_config(write(tmp, "pipeline.ini", "keep = 1\n")),
            ConfigError,
            r"config file '.*pipeline\.ini': unknown extension '\.ini'; use \.yaml, \.toml or "
            r"\.json",
        ),
        Case(
            "neither-a-path-nor-a-preset",
            lambda: tokenprune.apply(llava(), "visionzip-46", runtime=rt),
            ConfigError,
            r"config 'visionzip-46' does not exist as a file or directory, and it is not a preset "
            r"name \(presets: .*visionzip-64.*\); pass a \.yaml/\.toml/\.json file, a directory",
        ),
        Case(
            "directory-without-a-saved-pipeline",
            lambda: tokenprune.apply(llava(), tmp, runtime=rt),
            ConfigError,
            r"directory '.*' has no tokenprune\.json; write one with tokenprune\.save_pipeline",
        ),
    ]


@functools.cache
def qwen() -> nn.Module:
    from tokenprune.testing.models import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl()


IDS = [case.id for case in table(Path("."))]


def test_the_catalogue_is_complete() -> None:
    assert len(IDS) >= 15
    assert len(set(IDS)) == len(IDS), "duplicate case ids"


@pytest.mark.parametrize("case_id", IDS)
def test_bad_input_is_reported(case_id: str, tmp_path: Path) -> None:
    (case,) = [c for c in table(tmp_path) if c.id == case_id]
    if case.requires is not None:
        pytest.importorskip(case.requires)
    with pytest.raises(TokenPruneError) as info:
        case.trigger()
    error = info.value
    assert type(error) is case.error, f"{case.id}: raised {type(error).__name__}: {error}"
    assert info.match(case.match)


def test_failed_calls_leave_the_model_unpruned(tmp_path: Path) -> None:
    """The errors raised inside forward leave no hook behind on the shared model."""
    inside_forward = {
        "keep-above-N-at-forward",
        "nan-features",
        "question-count-mismatch",
        "more-images-than-placeholders",
    }
    for case in table(tmp_path):
        if case.id in inside_forward:
            with pytest.raises(case.error):
                case.trigger()
    model = llava()
    assert not model._forward_pre_hooks
    assert "generate" not in model.__dict__
