"""Measured latency and memory of a VLM before and after visual-token pruning.

:func:`run_benchmark` times the unpruned and the pruned model in one process, on the same model
instance and the same attention kernels, **interleaved**: every repeat runs the unpruned model
and then the pruned one (warm-up repeats first, in the same order), so drift in the machine's
load hits both alike. Each run is one ``model.generate(...)`` call with exactly
``new_tokens`` greedy tokens; the parts are timed without changing the library:

- **vision encoder**: a forward pre-hook and a forward hook on the vision tower;
- **pruning stage** (scorer + selector + merger, with the pipeline's own shape checks): the
  pipeline is wrapped in a :class:`~tokenprune.pipeline.Pipeline` subclass that times each call;
- **LLM prefill**: hooks on the language model (the decoder stack, without the LM head); its
  first call during ``generate`` is the prefill;
- **decode**: from the start of the language model's second call to the return of
  ``generate``, divided by the decode steps (``new_tokens - 1``); this includes the LM head,
  the logits processing and the cache update of every step;
- **generate**: the whole call.

On CUDA the marks are ``torch.cuda.Event`` records, read after one synchronisation at the end
of each run, and peak memory is ``torch.cuda.max_memory_allocated`` (reset before each run).
On CPU the marks are ``time.perf_counter``; peak memory cannot be separated per run there
(the process's peak RSS is global and only grows), so each run reports the bytes of its KV
cache after the prefill (the tensors' ``nbytes``), and the report gives the process peak RSS
once. The temporary hooks are removed when the benchmark ends.

The measured prefill speedup is printed next to the FLOPs-predicted ratio for the same shapes
(:func:`tokenprune.bench.flops.prefill_flops` with ``scope="prefill"`` and the prompt's actual
text-token count).

Examples:
    >>> from tokenprune.bench.presets import build_preset
    >>> model = build_preset("tiny")
    >>> cfg = {"scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}, "keep": 64}
    >>> result = run_benchmark(model, cfg, make_inputs(model), repeats=1, warmup=0, new_tokens=2)
    >>> result.unpruned.lm_prefill_tokens, result.pruned.lm_prefill_tokens  # 256 + 40, 64 + 40
    (296, 104)
    >>> result.order
    ('unpruned', 'pruned')
"""

from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import torch
from torch import nn

from tokenprune.api import apply
from tokenprune.bench.flops import FlopsResult, VLMShape, prefill_flops, shape_from_config
from tokenprune.errors import AdapterError, ConfigError
from tokenprune.pipeline import Pipeline
from tokenprune.plugin.manager import Runtime

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from tokenprune.bench.flops import Convention
    from tokenprune.config import PipelineConfig
    from tokenprune.context import PruneContext
    from tokenprune.types import PrunedTokens

__all__ = [
    "VARIANTS",
    "BenchResult",
    "BenchSetup",
    "RunMeasurement",
    "Variant",
    "VariantStats",
    "cache_nbytes",
    "cpu_bf16_native",
    "format_result",
    "make_inputs",
    "peak_rss_bytes",
    "run_benchmark",
]

Variant = Literal["unpruned", "pruned"]
"""Which model a run used."""

VARIANTS: Final[tuple[Variant, Variant]] = ("unpruned", "pruned")
"""The order of the two runs inside every repeat."""

Mark = float | torch.cuda.Event
"""A point in time: ``perf_counter`` seconds on CPU, a recorded event on CUDA."""


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunMeasurement:
    """One timed ``generate`` call.

    Attributes:
        variant: ``"unpruned"`` or ``"pruned"``.
        repeat: Index of the repeat (0-based, warm-up runs excluded).
        vision_s: Vision-tower time, seconds.
        prune_s: Pruning-stage time (scorer + selector + merger), seconds; 0 when unpruned.
        prefill_s: Language-model prefill time (decoder stack), seconds.
        decode_s_per_token: Mean time per decode step, seconds; ``None`` with one new token.
        generate_s: Wall time of the whole ``generate`` call, seconds.
        decode_steps: Language-model calls after the prefill.
        lm_prefill_tokens: Sequence length of the prefill (per row, text tokens included).
        visual_tokens: Visual tokens per image the language model received.
        kv_cache_bytes: Bytes of the KV cache right after the prefill (``None`` if the model's
            cache is not readable).
        peak_memory_bytes: CUDA peak allocated bytes during the run; ``None`` on CPU.
        start_memory_bytes: CUDA allocated bytes when the run started (mostly the weights);
            ``None`` on CPU.
    """

    variant: Variant
    repeat: int
    vision_s: float
    prune_s: float
    prefill_s: float
    decode_s_per_token: float | None
    generate_s: float
    decode_steps: int
    lm_prefill_tokens: int
    visual_tokens: int
    kv_cache_bytes: int | None
    peak_memory_bytes: int | None = None
    start_memory_bytes: int | None = None

    @property
    def end_to_end_s(self) -> float:
        """Vision encoder + pruning + LLM prefill, seconds."""
        return self.vision_s + self.prune_s + self.prefill_s


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _median_int(values: Sequence[int | None]) -> int | None:
    median = _median([None if v is None else float(v) for v in values])
    return None if median is None else round(median)


@dataclass(frozen=True)
class VariantStats:
    """Medians over the timed repeats of one variant.

    Attributes:
        variant: ``"unpruned"`` or ``"pruned"``.
        repeats: Number of timed runs.
        vision_s: Median vision-tower time, seconds.
        prune_s: Median pruning-stage time, seconds.
        prefill_s: Median LLM prefill time, seconds.
        end_to_end_s: Median over runs of vision + pruning + prefill, seconds.
        decode_s_per_token: Median time per decode step, seconds (``None`` without decoding).
        generate_s: Median ``generate`` wall time, seconds.
        lm_prefill_tokens: Prefill sequence length per row.
        visual_tokens: Visual tokens per image the language model received.
        kv_cache_bytes: KV-cache bytes after the prefill.
        peak_memory_bytes: Median CUDA peak allocated bytes (``None`` on CPU).
        start_memory_bytes: Median CUDA allocated bytes at the start of a run.
        runs: The individual runs, in execution order.
    """

    variant: Variant
    repeats: int
    vision_s: float
    prune_s: float
    prefill_s: float
    end_to_end_s: float
    decode_s_per_token: float | None
    generate_s: float
    lm_prefill_tokens: int
    visual_tokens: int
    kv_cache_bytes: int | None
    peak_memory_bytes: int | None
    start_memory_bytes: int | None
    runs: tuple[RunMeasurement, ...] = field(repr=False)

    @property
    def peak_above_start_bytes(self) -> int | None:
        """CUDA peak minus the memory allocated at the start (activations, cache, workspace)."""
        if self.peak_memory_bytes is None or self.start_memory_bytes is None:
            return None
        return self.peak_memory_bytes - self.start_memory_bytes

    @classmethod
    def from_runs(cls, variant: Variant, runs: Sequence[RunMeasurement]) -> VariantStats:
        """Summarise runs by their medians.

        Args:
            variant: The variant the runs belong to.
            runs: At least one run of that variant.

        Returns:
            The summary.

        Raises:
            ValueError: No runs, or a run of another variant.
        """
        if not runs:
            raise ValueError("VariantStats needs at least one run")
        if any(r.variant != variant for r in runs):
            raise ValueError(f"all runs must be {variant!r} runs")

        def med(values: Sequence[float]) -> float:
            return statistics.median(values)

        return cls(
            variant=variant,
            repeats=len(runs),
            vision_s=med([r.vision_s for r in runs]),
            prune_s=med([r.prune_s for r in runs]),
            prefill_s=med([r.prefill_s for r in runs]),
            end_to_end_s=med([r.end_to_end_s for r in runs]),
            decode_s_per_token=_median([r.decode_s_per_token for r in runs]),
            generate_s=med([r.generate_s for r in runs]),
            lm_prefill_tokens=runs[0].lm_prefill_tokens,
            visual_tokens=runs[0].visual_tokens,
            kv_cache_bytes=_median_int([r.kv_cache_bytes for r in runs]),
            peak_memory_bytes=_median_int([r.peak_memory_bytes for r in runs]),
            start_memory_bytes=_median_int([r.start_memory_bytes for r in runs]),
            runs=tuple(runs),
        )

    def to_dict(self) -> dict[str, Any]:
        """All fields, ``end_to_end_s`` and ``peak_above_start_bytes``; runs as dicts.

        Returns:
            A JSON-serialisable dict.
        """
        out = dataclasses.asdict(self)
        out["runs"] = [{**dataclasses.asdict(r), "end_to_end_s": r.end_to_end_s} for r in self.runs]
        out["peak_above_start_bytes"] = self.peak_above_start_bytes
        return out


@dataclass(frozen=True)
class BenchSetup:
    """What was measured, and under which conditions.

    Attributes:
        model: Model name (preset, path or hub id).
        description: One-line description of the model.
        device: Device, in words.
        dtype: Parameter dtype.
        threads: ``torch.get_num_threads()`` during the run.
        attn_implementation: Attention implementation of the language model and the vision
            tower (the same in both variants).
        parameters: Parameter count.
        vision_shape: The vision tower's shape, in words.
        lm_shape: The language model's shape, in words.
        batch_size: Prompts per call, one image each.
        text_tokens: Text tokens per prompt (everything but the image placeholders).
        full_visual_tokens: Visual tokens per image without pruning (``N``).
        kept_visual_tokens: Visual tokens per image after pruning (``K``).
        new_tokens: Tokens generated per call.
        repeats: Timed repeats per variant.
        warmup: Warm-up repeats per variant (not timed).
        pipeline: The pruning pipeline, in words.
    """

    model: str
    description: str
    device: str
    dtype: str
    threads: int
    attn_implementation: str
    parameters: int
    vision_shape: str
    lm_shape: str
    batch_size: int
    text_tokens: int
    full_visual_tokens: int
    kept_visual_tokens: int
    new_tokens: int
    repeats: int
    warmup: int
    pipeline: str


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class BenchResult:
    """The two variants' medians, their ratios, and the FLOPs prediction for the same shapes.

    Every ratio is ``unpruned median / pruned median`` (a speedup when above 1).

    Attributes:
        setup: Conditions of the measurement.
        unpruned: Medians of the unpruned runs.
        pruned: Medians of the pruned runs.
        flops: Analytic LLM prefill FLOPs of the pruned setting and the unpruned reference
            (whole prefill: visual + text tokens).
        flops_with_vision: The same with the vision encoder counted in both runs (``None``
            when the model's encoder shape is unknown).
        schedule: Every run in execution order as ``(phase, variant)``, phase ``"warmup"`` or
            ``"timed"``.
        peak_rss_bytes: Peak resident memory of the whole process at the end (model building and
            both variants together; not separable per run), ``None`` where unavailable.
    """

    setup: BenchSetup
    unpruned: VariantStats
    pruned: VariantStats
    flops: FlopsResult
    flops_with_vision: FlopsResult | None
    schedule: tuple[tuple[str, Variant], ...]
    peak_rss_bytes: int | None = None

    @property
    def order(self) -> tuple[Variant, ...]:
        """Variants of the timed runs, in execution order."""
        return tuple(variant for phase, variant in self.schedule if phase == "timed")

    @property
    def prefill_speedup(self) -> float:
        """Unpruned / pruned median LLM prefill time."""
        return self.unpruned.prefill_s / self.pruned.prefill_s

    @property
    def end_to_end_speedup(self) -> float:
        """Unpruned / pruned median of vision + pruning + prefill."""
        return self.unpruned.end_to_end_s / self.pruned.end_to_end_s

    @property
    def generate_speedup(self) -> float:
        """Unpruned / pruned median wall time of the whole ``generate`` call."""
        return self.unpruned.generate_s / self.pruned.generate_s

    @property
    def overhead_pct(self) -> float:
        """Pruning time as a percentage of the (pruned run's) vision-encoder time."""
        return 100.0 * self.pruned.prune_s / self.pruned.vision_s

    @property
    def decode_ratio(self) -> float | None:
        """Unpruned / pruned median time per decoded token (``None`` without decoding)."""
        return _ratio(self.unpruned.decode_s_per_token, self.pruned.decode_s_per_token)

    @property
    def kv_cache_ratio(self) -> float | None:
        """Unpruned / pruned KV-cache bytes after the prefill."""
        return _ratio(
            None if self.unpruned.kv_cache_bytes is None else float(self.unpruned.kv_cache_bytes),
            None if self.pruned.kv_cache_bytes is None else float(self.pruned.kv_cache_bytes),
        )

    @property
    def predicted_prefill_ratio(self) -> float:
        """FLOPs-predicted LLM prefill ratio for the same shapes (whole prefill)."""
        return self.flops.ratio

    @property
    def predicted_end_to_end_ratio(self) -> float | None:
        """FLOPs-predicted ratio with the vision encoder counted (``None`` if unknown)."""
        return None if self.flops_with_vision is None else self.flops_with_vision.ratio

    @property
    def prefill_vs_predicted_pct(self) -> float:
        """Measured prefill speedup as a percentage of the FLOPs-predicted ratio."""
        return 100.0 * self.prefill_speedup / self.predicted_prefill_ratio

    def to_dict(self) -> dict[str, Any]:
        """Setup, both variants, every ratio and the FLOPs results.

        Returns:
            A JSON-serialisable dict.
        """
        return {
            "setup": dataclasses.asdict(self.setup),
            "unpruned": self.unpruned.to_dict(),
            "pruned": self.pruned.to_dict(),
            "ratios": {
                "prefill_speedup": self.prefill_speedup,
                "end_to_end_speedup": self.end_to_end_speedup,
                "generate_speedup": self.generate_speedup,
                "decode_per_token_ratio": self.decode_ratio,
                "kv_cache_ratio": self.kv_cache_ratio,
                "overhead_pct_of_vision": self.overhead_pct,
                "predicted_prefill_ratio": self.predicted_prefill_ratio,
                "predicted_end_to_end_ratio": self.predicted_end_to_end_ratio,
                "prefill_vs_predicted_pct": self.prefill_vs_predicted_pct,
            },
            "flops": self.flops.to_dict(),
            "flops_with_vision": (
                None if self.flops_with_vision is None else self.flops_with_vision.to_dict()
            ),
            "schedule": [list(item) for item in self.schedule],
            "order": list(self.order),
            "peak_rss_bytes": self.peak_rss_bytes,
        }


# -- timing machinery ---------------------------------------------------------------------------


class _Clock:
    """``perf_counter`` marks on CPU, CUDA events on CUDA (read after :meth:`sync`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Mark:
        if self.cuda:
            cuda: Any = torch.cuda  # Event's constructor is untyped
            event: torch.cuda.Event = cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, start: Mark, end: Mark) -> float:
        if isinstance(start, float) and isinstance(end, float):
            return end - start
        if isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event):
            return float(start.elapsed_time(end)) / 1e3
        raise TypeError("cannot mix CPU and CUDA time marks")


@dataclass
class _RunLog:
    vision: list[tuple[Mark, Mark | None]] = field(default_factory=list)
    prune: list[tuple[Mark, Mark]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    lm_start: list[Mark] = field(default_factory=list)
    lm_end: list[Mark] = field(default_factory=list)
    lm_tokens: list[int] = field(default_factory=list)
    kv_cache_bytes: int | None = None


def cache_nbytes(cache: Any) -> int | None:
    """Bytes held by a transformers KV cache (``Cache.layers[i].keys/values``) or legacy tuples.

    Args:
        cache: A ``transformers`` cache object, or nested tuples/lists of tensors.

    Returns:
        The sum of the tensors' ``nbytes``, or ``None`` when no tensor is found.

    Examples:
        >>> cache_nbytes(((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),))
        192
    """
    tensors: list[torch.Tensor] = []

    def collect(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, tuple | list):
            for item in obj:
                collect(item)

    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            collect([getattr(layer, "keys", None), getattr(layer, "values", None)])
    else:
        collect(cache)
    return sum(t.nbytes for t in tensors) if tensors else None


def _sequence_length(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    for value in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), *args[:1]):
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return int(value.shape[1])
    return 0


class _Probe:
    """Temporary hooks on the vision tower and the language model that fill a :class:`_RunLog`."""

    def __init__(self, clock: _Clock, vision: nn.Module, lm: nn.Module) -> None:
        self.clock = clock
        self.log: _RunLog | None = None
        self._handles: list[RemovableHandle] = [
            vision.register_forward_pre_hook(self._vision_start),
            vision.register_forward_hook(self._vision_end),
            lm.register_forward_pre_hook(self._lm_start, with_kwargs=True),
            lm.register_forward_hook(self._lm_end, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _vision_start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.log is not None:
            self.log.vision.append((self.clock.mark(), None))

    def _vision_end(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.log is not None and self.log.vision:
            start, _ = self.log.vision[-1]
            self.log.vision[-1] = (start, self.clock.mark())

    def _lm_start(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.lm_tokens.append(_sequence_length(args, kwargs))
            self.log.lm_start.append(self.clock.mark())

    def _lm_end(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if self.log is None:
            return
        self.log.lm_end.append(self.clock.mark())
        if len(self.log.lm_end) == 1 and isinstance(output, Mapping):
            cache = output.get("cache")
            if cache is None:
                cache = output.get("past_key_values")
            self.log.kv_cache_bytes = cache_nbytes(cache)


class _TimedPipeline(Pipeline):
    """The benchmarked pipeline, unchanged except that each call is timed into the probe's log."""

    def __init__(self, pipeline: Pipeline, probe: _Probe) -> None:
        super().__init__(
            pipeline.scorer,
            pipeline.selector,
            pipeline.merger,
            keep=pipeline.keep,
            keep_ratio=pipeline.keep_ratio,
            positions=pipeline.positions,
            runtime=pipeline.runtime,
        )
        self.probe = probe

    def __call__(self, ctx: PruneContext) -> PrunedTokens:
        log = self.probe.log
        start = self.probe.clock.mark()
        pruned = super().__call__(ctx)
        if log is not None:
            log.prune.append((start, self.probe.clock.mark()))
            log.kept.append(ctx.keep)
        return pruned


@contextmanager
def _probe(clock: _Clock, vision: nn.Module, lm: nn.Module) -> Iterator[_Probe]:
    probe = _Probe(clock, vision, lm)
    try:
        yield probe
    finally:
        probe.remove()


# -- model facts and inputs ---------------------------------------------------------------------


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    inner = getattr(model, "model", None)
    vision = getattr(inner, "vision_tower", None)
    lm = getattr(inner, "language_model", None)
    if not isinstance(vision, nn.Module) or not isinstance(lm, nn.Module):
        raise ConfigError(
            f"{type(model).__name__} has no model.vision_tower / model.language_model; "
            "tokenprune bench supports LLaVA-1.5-style models (LlavaForConditionalGeneration)"
        )
    return vision, lm


def _llava_facts(model: nn.Module) -> tuple[Any, int, int]:
    """Config, image-token id and visual tokens per image of a LLaVA-1.5-style model."""
    if type(model).__name__ != "LlavaForConditionalGeneration":
        raise ConfigError(
            f"tokenprune bench builds prompts for LlavaForConditionalGeneration only, got "
            f"{type(model).__name__}"
        )
    config: Any = model.config
    vc = config.vision_config
    return config, int(config.image_token_id), int((vc.image_size // vc.patch_size) ** 2)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        raise ConfigError(f"{type(model).__name__} has no parameters")
    return param.device, param.dtype


def make_inputs(
    model: nn.Module, *, text_tokens: int = 40, batch_size: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch of identical prompts, one random image each, for a LLaVA-1.5-style model.

    Each row is ``[BOS]``, up to 4 random text tokens, the ``N`` image placeholders, then the
    remaining random text tokens: ``text_tokens`` non-image tokens in all (BOS included), as a
    chat template would lay out ``USER: <image> <question> ASSISTANT:``. No padding.

    Args:
        model: A ``LlavaForConditionalGeneration``.
        text_tokens: Non-image tokens per prompt, at least 1 (the BOS).
        batch_size: Rows (one image each).
        seed: Seed of the token ids and pixels.

    Returns:
        ``input_ids``, ``attention_mask`` and ``pixel_values`` on the model's device, pixels in
        its dtype.

    Raises:
        ConfigError: Not a LLaVA-1.5-style model, or a count below 1.

    Examples:
        >>> from tokenprune.bench.presets import build_preset
        >>> batch = make_inputs(build_preset("tiny"), text_tokens=10, batch_size=2)
        >>> tuple(batch["input_ids"].shape), tuple(batch["pixel_values"].shape)
        ((2, 266), (2, 3, 96, 96))
    """
    for key, value in (("text_tokens", text_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be an int >= 1, got {value!r}")
    config, image_id, n = _llava_facts(model)
    device, dtype = _model_device_dtype(model)
    text = config.text_config
    bos = text.bos_token_id if text.bos_token_id is not None else 1
    high = min(int(text.vocab_size), image_id) if image_id >= 10 else int(text.vocab_size)
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(10, max(high, 11), (text_tokens - 1,), generator=g)
    body[body == image_id] = 10
    before = min(4, text_tokens - 1)
    row = torch.cat(
        [
            torch.tensor([bos]),
            body[:before],
            torch.full((n,), image_id),
            body[before:],
        ]
    )
    ids = row.unsqueeze(0).repeat(batch_size, 1)
    size = int(config.vision_config.image_size)
    pixels = torch.randn(batch_size, 3, size, size, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
    }


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far, in bytes (``None`` where unknown).

    Process-wide and monotone: it covers everything the process did, not one run.

    Returns:
        Bytes, from ``resource.getrusage`` (Linux reports KiB, macOS bytes).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if platform.system() == "Darwin" else peak * 1024


def cpu_bf16_native() -> bool | None:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX).

    Without it, bfloat16 matmuls are emulated and can be two orders of magnitude slower than
    float32, which would make a bfloat16 benchmark measure the emulation.

    Returns:
        ``True``/``False``, or ``None`` when this torch build cannot tell.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return None


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    native = cpu_bf16_native()
    bf16 = "unknown" if native is None else "native" if native else "emulated"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{device} ({platform.machine()}, {capability}, bfloat16 {bf16})"


def _describe_shape(shape: VLMShape) -> tuple[str, str]:
    lm = shape.lm
    lm_text = (
        f"{lm.layers} layers x {lm.hidden}, FFN {lm.intermediate}, {lm.heads} / {lm.kv_heads} "
        f"heads" + (f", vocab {lm.vocab}" if lm.vocab else "")
    )
    vision = shape.vision
    vision_text = (
        "unknown"
        if vision is None
        else f"{vision.layers} blocks x {vision.hidden}, MLP {vision.intermediate}, "
        f"{vision.heads} heads, {vision.tokens} tokens per image"
    )
    return vision_text, lm_text


def _attn_implementation(model: nn.Module) -> str:
    config: Any = model.config
    names = {
        str(getattr(sub, "_attn_implementation", None))
        for sub in (config, getattr(config, "text_config", None), config.vision_config)
        if sub is not None
    }
    return ", ".join(sorted(names))


# -- the benchmark ------------------------------------------------------------------------------


def _check_count(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


def _build_pipeline(
    pipeline: Pipeline | PipelineConfig | Mapping[str, Any], runtime: Runtime | None
) -> tuple[Pipeline, Runtime]:
    if isinstance(pipeline, Pipeline):
        return pipeline, runtime or pipeline.runtime or Runtime()
    runtime = runtime or Runtime()
    return runtime.build_pipeline(pipeline), runtime


def _measure(
    log: _RunLog,
    clock: _Clock,
    start: Mark,
    end: Mark,
    *,
    variant: Variant,
    repeat: int,
    memory: tuple[int | None, int | None],
) -> RunMeasurement:
    if not log.lm_start or len(log.lm_end) != len(log.lm_start):
        raise AdapterError(f"the {variant} run never completed a language-model call")
    if not log.vision or any(end_ is None for _, end_ in log.vision):
        raise AdapterError(f"the {variant} run did not run the vision tower")
    if variant == "pruned" and not log.prune:
        raise AdapterError("the pruned run did not call the pruning pipeline")
    steps = len(log.lm_start) - 1
    decode = clock.seconds(log.lm_start[1], end) / steps if steps else None
    return RunMeasurement(
        variant=variant,
        repeat=repeat,
        vision_s=sum(clock.seconds(s, cast("Mark", e)) for s, e in log.vision),
        prune_s=sum(clock.seconds(s, e) for s, e in log.prune),
        prefill_s=clock.seconds(log.lm_start[0], log.lm_end[0]),
        decode_s_per_token=decode,
        generate_s=clock.seconds(start, end),
        decode_steps=steps,
        lm_prefill_tokens=log.lm_tokens[0],
        visual_tokens=0,  # filled in by the caller, which knows the text length
        kv_cache_bytes=log.kv_cache_bytes,
        start_memory_bytes=memory[0],
        peak_memory_bytes=memory[1],
    )


def run_benchmark(
    model: nn.Module,
    pipeline: Pipeline | PipelineConfig | Mapping[str, Any],
    inputs: Mapping[str, torch.Tensor],
    *,
    repeats: int = 5,
    warmup: int = 1,
    new_tokens: int = 8,
    convention: Convention = "desap",
    runtime: Runtime | None = None,
    name: str | None = None,
    description: str = "",
) -> BenchResult:
    """Time the unpruned and the pruned model, interleaved, and compare with the FLOPs ratio.

    Each repeat (warm-up repeats first) runs ``generate`` unpruned, then with ``pipeline``
    installed through :func:`tokenprune.apply` (removed again after the run), on the same
    model instance. The model's own attention implementation is used in both (SDPA for the
    presets); nothing asks for attention weights.

    Args:
        model: A LLaVA-1.5-style model (``model.model.vision_tower`` and
            ``model.model.language_model``), in eval mode.
        pipeline: The pruning pipeline, or a config (mapping) to build it from.
        inputs: ``input_ids``, ``attention_mask`` and ``pixel_values`` on the model's device,
            one image per row, every row with the same number of text tokens (see
            :func:`make_inputs`).
        repeats: Timed repeats per variant (medians are reported).
        warmup: Untimed repeats per variant before them.
        new_tokens: Tokens generated per call (``min_new_tokens`` = ``max_new_tokens``, greedy);
            1 measures no decoding.
        convention: FLOPs convention of the prediction (``"desap"`` counts the three SwiGLU FFN
            matrices of a Llama LM, ``"fastv"`` two).
        runtime: Plugin runtime; the pipeline's own, or a fresh one, if omitted.
        name: Model name for the report (default: the config's ``_name_or_path`` or class).
        description: One line describing the model.

    Returns:
        The medians, ratios and FLOPs prediction.

    Raises:
        ConfigError: Bad counts, inputs without images or with rows of different layouts, or a
            model the benchmark cannot hook.
        BudgetError: The pipeline's budget does not fit the model's visual-token count.
        AdapterError: A run did not reach the parts being timed, or fed the language model an
            unexpected number of tokens.
    """
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
    _check_count("new_tokens", new_tokens, 1)
    vision, lm = _parts(model)
    config, image_id, full = _llava_facts(model)
    device, dtype = _model_device_dtype(model)
    input_ids = inputs.get("input_ids")
    if input_ids is None or inputs.get("pixel_values") is None:
        raise ConfigError("inputs need input_ids and pixel_values (see make_inputs)")
    per_row = (input_ids == image_id).sum(-1)
    if not bool((per_row == full).all()) or int(inputs["pixel_values"].shape[0]) != len(per_row):
        raise ConfigError(
            f"every row needs exactly one image ({full} placeholder tokens id {image_id}) and "
            "pixel_values one image per row"
        )
    text_tokens = int(input_ids.shape[1]) - full
    built, runtime = _build_pipeline(pipeline, runtime)
    kept = built.budget(full)

    label = name or str(getattr(config, "_name_or_path", "") or "") or type(model).__name__
    shape = shape_from_config(config, name=label)
    dtype_name = str(dtype).removeprefix("torch.")
    flops = prefill_flops(
        shape,
        kept,
        convention=convention,
        scope="prefill",
        text_tokens=text_tokens,
        dtype=dtype_name,
    )
    flops_vision = (
        None
        if shape.vision is None
        else prefill_flops(
            shape,
            kept,
            convention=convention,
            scope="prefill",
            text_tokens=text_tokens,
            include_vision=True,
            dtype=dtype_name,
        )
    )

    clock = _Clock(device)
    runs: dict[Variant, list[RunMeasurement]] = {"unpruned": [], "pruned": []}
    schedule: list[tuple[str, Variant]] = []
    with torch.inference_mode(), _probe(clock, vision, lm) as probe:
        timed = _TimedPipeline(built, probe)
        for repeat in range(warmup + repeats):
            phase = "warmup" if repeat < warmup else "timed"
            for variant in VARIANTS:
                handle = apply(model, timed, runtime=runtime) if variant == "pruned" else None
                try:
                    log = _RunLog()
                    clock.sync()
                    memory: tuple[int | None, int | None] = (None, None)
                    if clock.cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                        memory = (torch.cuda.memory_allocated(device), None)
                    probe.log = log
                    generate = cast("Any", model).generate  # the pruned one while installed
                    start = clock.mark()
                    generate(
                        **inputs,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                    )
                    end = clock.mark()
                    probe.log = None
                    clock.sync()
                    if clock.cuda:
                        memory = (memory[0], torch.cuda.max_memory_allocated(device))
                finally:
                    probe.log = None
                    if handle is not None:
                        handle.remove()
                schedule.append((phase, variant))
                if phase == "warmup":
                    continue
                run = _measure(
                    log, clock, start, end, variant=variant, repeat=repeat - warmup, memory=memory
                )
                visual = run.lm_prefill_tokens - text_tokens
                expected = kept if variant == "pruned" else full
                if visual != expected:
                    raise AdapterError(
                        f"the {variant} run fed the language model {run.lm_prefill_tokens} "
                        f"tokens per row; expected {expected} visual + {text_tokens} text tokens"
                    )
                runs[variant].append(dataclasses.replace(run, visual_tokens=visual))

    vision_text, lm_text = _describe_shape(shape)
    setup = BenchSetup(
        model=label,
        description=description,
        device=_describe_device(device),
        dtype=dtype_name,
        threads=torch.get_num_threads(),
        attn_implementation=_attn_implementation(model),
        parameters=sum(p.numel() for p in model.parameters()),
        vision_shape=vision_text,
        lm_shape=lm_text,
        batch_size=int(input_ids.shape[0]),
        text_tokens=text_tokens,
        full_visual_tokens=full,
        kept_visual_tokens=kept,
        new_tokens=new_tokens,
        repeats=repeats,
        warmup=warmup,
        pipeline=repr(built),
    )
    return BenchResult(
        setup=setup,
        unpruned=VariantStats.from_runs("unpruned", runs["unpruned"]),
        pruned=VariantStats.from_runs("pruned", runs["pruned"]),
        flops=flops,
        flops_with_vision=flops_vision,
        schedule=tuple(schedule),
        peak_rss_bytes=None if clock.cuda else peak_rss_bytes(),
    )


# -- report -------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def format_result(result: BenchResult) -> str:
    """Render a result as a Markdown table of medians, the ratio lines and the conditions.

    Args:
        result: From :func:`run_benchmark`.

    Returns:
        The report.
    """
    u, p, s = result.unpruned, result.pruned, result
    rows: list[tuple[str, str, str, str]] = [
        (
            "LLM prefill tokens per row (visual + text)",
            f"{u.lm_prefill_tokens} ({u.visual_tokens} + {s.setup.text_tokens})",
            f"{p.lm_prefill_tokens} ({p.visual_tokens} + {s.setup.text_tokens})",
            _x(u.lm_prefill_tokens / p.lm_prefill_tokens),
        ),
        ("vision encoder ms", _ms(u.vision_s), _ms(p.vision_s), _x(_ratio(u.vision_s, p.vision_s))),
        ("pruning (scorer + selector + merger) ms", "-", _ms(p.prune_s), "-"),
        ("LLM prefill ms", _ms(u.prefill_s), _ms(p.prefill_s), _x(s.prefill_speedup)),
        (
            "vision + pruning + prefill ms",
            _ms(u.end_to_end_s),
            _ms(p.end_to_end_s),
            _x(s.end_to_end_speedup),
        ),
        (
            "decode ms per token",
            _ms(u.decode_s_per_token),
            _ms(p.decode_s_per_token),
            _x(s.decode_ratio),
        ),
        (
            f"generate ms ({s.setup.new_tokens} new tokens)",
            _ms(u.generate_s),
            _ms(p.generate_s),
            _x(s.generate_speedup),
        ),
        (
            "KV cache after prefill MiB",
            _mib(u.kv_cache_bytes),
            _mib(p.kv_cache_bytes),
            _x(s.kv_cache_ratio),
        ),
    ]
    if u.peak_memory_bytes is not None and p.peak_memory_bytes is not None:
        rows.append(
            (
                "CUDA peak allocated MiB",
                _mib(u.peak_memory_bytes),
                _mib(p.peak_memory_bytes),
                _x(u.peak_memory_bytes / p.peak_memory_bytes),
            )
        )
        above_u, above_p = u.peak_above_start_bytes, p.peak_above_start_bytes
        rows.append(
            (
                "CUDA peak above run start MiB",
                _mib(above_u),
                _mib(above_p),
                _x(_ratio(None if above_u is None else float(above_u), above_p)),
            )
        )
    lines = [
        "| median over repeats | unpruned | pruned | unpruned / pruned |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]
    f = s.flops
    lines.append(
        f"- prefill speedup: **{_x(s.prefill_speedup)}** measured vs **{_x(f.ratio)}** "
        f"FLOPs-predicted ({f.convention}: {f.formula} per layer, whole prefill "
        f"{f.full_visual_tokens}+{f.text_tokens} vs {f.visual_tokens}+{f.text_tokens} tokens): "
        f"measured = {s.prefill_vs_predicted_pct:.0f}% of predicted"
    )
    predicted_e2e = s.predicted_end_to_end_ratio
    lines.append(
        f"- end-to-end (vision + pruning + prefill) speedup: {_x(s.end_to_end_speedup)}"
        + (
            ""
            if predicted_e2e is None
            else f" (FLOPs-predicted with the vision encoder: {_x(predicted_e2e)})"
        )
    )
    lines.append(
        f"- pruning overhead: {s.overhead_pct:.1f}% of the vision-encoder time "
        f"({_ms(p.prune_s)} ms vs {_ms(p.vision_s)} ms)"
    )
    lines.append(
        "- decode time per token, unpruned / pruned: "
        + (
            _x(s.decode_ratio)
            if s.decode_ratio is not None
            else "not measured (--new-tokens 1 decodes nothing)"
        )
    )
    lines.append(f"- whole generate call speedup: {_x(s.generate_speedup)}")
    if u.peak_memory_bytes is None:
        rss = (
            ""
            if s.peak_rss_bytes is None
            else f" Process peak RSS: {s.peak_rss_bytes / 2**30:.2f} GiB (model build and both "
            "variants together)."
        )
        lines.append(
            "- memory (CPU): the KV-cache row is the nbytes of the cache tensors after the "
            "prefill; peak RSS is process-wide and monotone, so it cannot be split per run." + rss
        )
    setup = s.setup
    lines += [
        "",
        f"- model: {setup.model}" + (f" ({setup.description})" if setup.description else ""),
        f"- shapes: vision {setup.vision_shape}; LM {setup.lm_shape}; "
        f"{setup.parameters / 1e6:.1f} M parameters",
        f"- device {setup.device}, dtype {setup.dtype}, torch threads {setup.threads}, "
        f"attention {setup.attn_implementation} in both variants",
        f"- batch {setup.batch_size}, {setup.text_tokens} text tokens + 1 image "
        f"({setup.full_visual_tokens} -> {setup.kept_visual_tokens} visual tokens), "
        f"{setup.new_tokens} new tokens (greedy)",
        f"- pipeline: {setup.pipeline}",
        f"- medians of {setup.repeats} repeats after {setup.warmup} warm-up, interleaved "
        "(unpruned, pruned, unpruned, pruned, ...); "
        + ("CUDA events" if u.peak_memory_bytes is not None else "time.perf_counter"),
    ]
    return "\n".join(lines)
