"""Analytic prefill FLOPs and KV-cache size of a VLM before and after visual-token pruning.

Pure Python: model shapes in, integers out; no torch, no weights. The counts follow the
token-pruning papers, which count one multiply-accumulate as one FLOP (double the numbers for
hardware FLOPs; ratios are unaffected). Per LLM decoder layer that sees ``n`` tokens, with hidden
size ``d`` and FFN intermediate size ``m``:

.. math::

    fastv  (FastV, PyramidDrop):     4*n*d^2 + 2*n^2*d + 2*n*d*m
    desap  (DeSAP, App. B.2 Eq. 6):  4*n*d^2 + 2*n^2*d + 3*n*d*m   (SwiGLU: three FFN matrices)

``4nd^2`` is the Q, K, V and O projections (both conventions assume ``kv_heads == heads``),
``2n^2d`` the scores and the weighted sum, the last term the FFN. The LLM total is the sum over
layers, so a multi-stage schedule (FastV: ``n0`` tokens in layers ``< K``, ``n1`` from ``K`` on)
is a sum of per-layer terms. ``scope="visual"`` counts visual tokens only (the papers' numbers);
``scope="prefill"`` uses ``n = visual + text`` in every layer. The optional vision-encoder term is,
per ViT block, ``4*n*d^2 + 2*n^2*d + k*n*d*m`` with the encoder's own ``n`` (patches, plus [CLS]
where the encoder has one), ``d``, ``m`` and ``k`` MLP matrices (2 for CLIP), times the number of
encoded images, crops or frames. It does not change with pruning, so it only dilutes the ratio.

Examples:
    >>> r = prefill_flops("llava-1.5-7b", 64, convention="desap")
    >>> f"{r.reference_flops / 1e12:.2f} T -> {r.total_flops / 1e12:.2f} T ({r.ratio:.1f}x)"
    '3.82 T -> 0.42 T (9.2x)'
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from tokenprune.errors import BudgetError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from tokenprune.config import PipelineConfig

__all__ = [
    "CONVENTIONS",
    "DTYPE_BYTES",
    "PRESETS",
    "SCOPES",
    "Convention",
    "FlopsResult",
    "LMShape",
    "Scope",
    "VLMShape",
    "VisionShape",
    "format_table",
    "get_preset",
    "kv_cache_bytes",
    "layer_token_counts",
    "list_presets",
    "llm_flops",
    "llm_layer_flops",
    "load_shape",
    "pipeline_schedule",
    "prefill_flops",
    "resolve_tokens",
    "shape_from_config",
    "shape_from_pretrained",
    "vision_flops",
    "vit_layer_flops",
]

Convention = Literal["fastv", "desap"]
"""Name of a per-layer LLM FLOPs formula (see :data:`CONVENTIONS`)."""

Scope = Literal["visual", "prefill"]
"""Which tokens the LLM term counts: visual tokens only, or visual + text (whole prefill)."""

CONVENTIONS: Final[Mapping[str, str]] = {
    "fastv": "4nd^2 + 2n^2d + 2ndm",
    "desap": "4nd^2 + 2n^2d + 3ndm",
}
"""Per-decoder-layer formula of each convention (``n`` tokens, hidden ``d``, intermediate ``m``)."""

_FFN_MATRICES: Final[Mapping[str, int]] = {"fastv": 2, "desap": 3}

SCOPES: Final[tuple[str, ...]] = ("visual", "prefill")
"""Accepted values of ``scope``."""

DTYPE_BYTES: Final[Mapping[str, int]] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
}
"""Bytes per element of the KV-cache dtypes understood by :func:`kv_cache_bytes`."""

_DTYPE_ALIASES: Final[Mapping[str, str]] = {
    "fp64": "float64",
    "double": "float64",
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp8": "float8_e4m3fn",
}

_UNITS: Final[str] = "FLOPs counting one multiply-accumulate as one FLOP (x2 for hardware FLOPs)"

# Qwen2.5-VL is dynamic-resolution (4 to 16,384 visual tokens per image); without an image we
# assume an 896x896 one: 64x64 patches of 14 px, merged 2x2 into 32x32 = 1,024 LLM tokens.
_QWEN_DEFAULT_TOKENS: Final[int] = 1024


def _check_positive(owner: str, **values: int | None) -> None:
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{owner}.{key} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class LMShape:
    """Shape of a decoder-only language model, as far as FLOPs and the KV cache care.

    Attributes:
        layers: Number of decoder layers ``L`` (``num_hidden_layers``).
        hidden: Hidden size ``d`` (``hidden_size``).
        intermediate: FFN intermediate size ``m`` (``intermediate_size``).
        heads: Attention (query) heads (``num_attention_heads``).
        kv_heads: Key/value heads (``num_key_value_heads``; equal to ``heads`` without GQA).
        vocab: Vocabulary size, informational only (the prefill logits are not counted).
        head_dim: Per-head size when it is not ``hidden // heads`` (``head_dim`` in the config).

    Raises:
        ConfigError: A size is not a positive int, or ``hidden`` is not divisible by ``heads``
            while ``head_dim`` is not given.
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int | None = None
    head_dim: int | None = None

    def __post_init__(self) -> None:
        _check_positive(
            "LMShape",
            layers=self.layers,
            hidden=self.hidden,
            intermediate=self.intermediate,
            heads=self.heads,
            kv_heads=self.kv_heads,
            vocab=self.vocab,
            head_dim=self.head_dim,
        )
        if self.head_dim is None and self.hidden % self.heads:
            raise ConfigError(
                f"LMShape.hidden={self.hidden} is not divisible by heads={self.heads}; "
                "pass head_dim explicitly"
            )

    @property
    def attention_head_dim(self) -> int:
        """Per-head size: ``head_dim`` if given, else ``hidden // heads``."""
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads


@dataclass(frozen=True)
class VisionShape:
    """Shape and workload of a ViT vision encoder for one full (unpruned) input.

    Attributes:
        layers: Number of transformer blocks that run (all of them in transformers, even when
            the LLM reads the penultimate layer).
        hidden: Hidden size ``d``.
        intermediate: MLP intermediate size ``m``.
        heads: Attention heads (informational).
        tokens: Sequence length of one encoded image, crop or frame, [CLS] included where the
            encoder has one (CLIP ViT-L/14-336: 24 x 24 patches + 1 = 577).
        sequences: How many images, crops or frames are encoded (LLaVA-NeXT: 5 crops; Video-LLaVA:
            8 frames).
        mlp_matrices: Matrices in the MLP: 2 for a plain MLP (CLIP), 3 for a gated one.

    Raises:
        ConfigError: A value is not a positive int, or ``mlp_matrices`` is not 2 or 3.
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    tokens: int
    sequences: int = 1
    mlp_matrices: int = 2

    def __post_init__(self) -> None:
        _check_positive(
            "VisionShape",
            layers=self.layers,
            hidden=self.hidden,
            intermediate=self.intermediate,
            heads=self.heads,
            tokens=self.tokens,
            sequences=self.sequences,
        )
        if self.mlp_matrices not in (2, 3):
            raise ConfigError(f"VisionShape.mlp_matrices must be 2 or 3, got {self.mlp_matrices!r}")


@dataclass(frozen=True)
class VLMShape:
    """A vision-language model: its LLM, its vision encoder and its full visual-token count.

    Attributes:
        name: Preset name or config source, printed in results.
        lm: The language model.
        visual_tokens: Visual tokens the LLM sees without pruning (``N``); token ratios are
            taken of this number.
        vision: The vision encoder, or ``None`` when unknown (text-only config).
        dynamic_resolution: ``True`` when the encoder workload grows with ``visual_tokens``
            (Qwen2.5-VL), so :meth:`with_visual_tokens` rescales ``vision.tokens`` too.
        source: Where the numbers come from.

    Raises:
        ConfigError: ``visual_tokens`` is not a positive int.
    """

    name: str
    lm: LMShape
    visual_tokens: int
    vision: VisionShape | None = None
    dynamic_resolution: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        _check_positive("VLMShape", visual_tokens=self.visual_tokens)

    def with_visual_tokens(self, visual_tokens: int) -> VLMShape:
        """Return a copy whose full visual-token count is ``visual_tokens``.

        Args:
            visual_tokens: The new ``N`` (for example the token count of a given image on a
                dynamic-resolution model).

        Returns:
            The new shape. For a dynamic-resolution model the encoder sequence length is scaled
            by the same factor; for fixed-resolution models the encoder workload is unchanged.

        Examples:
            >>> get_preset("qwen2.5-vl-7b").with_visual_tokens(256).vision.tokens
            1024
        """
        vision = self.vision
        if self.dynamic_resolution and vision is not None:
            per_token = max(1, vision.tokens // self.visual_tokens)
            vision = dataclasses.replace(vision, tokens=visual_tokens * per_token)
        return dataclasses.replace(self, visual_tokens=visual_tokens, vision=vision)


_VICUNA_7B = LMShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32064)
_CLIP_L_336 = VisionShape(layers=24, hidden=1024, intermediate=4096, heads=16, tokens=577)

PRESETS: Final[Mapping[str, VLMShape]] = {
    "llava-1.5-7b": VLMShape(
        name="llava-1.5-7b",
        lm=_VICUNA_7B,
        visual_tokens=576,
        vision=_CLIP_L_336,
        source="public config.json of llava-hf/llava-1.5-7b-hf (Vicuna-7B v1.5 LM, CLIP "
        "ViT-L/14-336: 24 x 24 = 576 patches, + [CLS] in the encoder)",
    ),
    "llava-1.5-13b": VLMShape(
        name="llava-1.5-13b",
        lm=LMShape(layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40, vocab=32064),
        visual_tokens=576,
        vision=_CLIP_L_336,
        source="public config.json of llava-hf/llava-1.5-13b-hf (Vicuna-13B v1.5 LM, CLIP "
        "ViT-L/14-336)",
    ),
    "llava-next-7b": VLMShape(
        name="llava-next-7b",
        lm=_VICUNA_7B,
        visual_tokens=2880,
        vision=dataclasses.replace(_CLIP_L_336, sequences=5),
        source="public config.json of llava-hf/llava-v1.6-vicuna-7b-hf; 2,880 = 5 x 576 (base "
        "image + 2 x 2 anyres crops), the papers' maximum, without the per-row newline tokens",
    ),
    "qwen2.5-vl-7b": VLMShape(
        name="qwen2.5-vl-7b",
        lm=LMShape(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064),
        visual_tokens=_QWEN_DEFAULT_TOKENS,
        vision=VisionShape(
            layers=32, hidden=1280, intermediate=3420, heads=16, tokens=4 * 1024, mlp_matrices=3
        ),
        dynamic_resolution=True,
        source="public config.json of Qwen/Qwen2.5-VL-7B-Instruct (LM 28 x 3584, FFN 18944, "
        "28/4 heads; ViT 32 blocks x 1280, gated MLP 3420, 2 x 2 patch merge); dynamic "
        "resolution, N = 1,024 assumes an 896 x 896 image (4,096 ViT patches)",
    ),
    "video-llava-7b": VLMShape(
        name="video-llava-7b",
        lm=_VICUNA_7B,
        visual_tokens=2048,
        vision=VisionShape(
            layers=24, hidden=1024, intermediate=4096, heads=16, tokens=257, sequences=8
        ),
        source="public config.json of LanguageBind/Video-LLaVA-7B-hf (Vicuna-7B v1.5 LM, "
        "LanguageBind ViT-L/14 at 224 px); 2,048 = 8 frames x 256 patches, the papers' count "
        "(transformers also passes each frame's [CLS]: video_seq_length = 2,056)",
    ),
}
"""Built-in model shapes by name, written by hand from the public ``config.json`` values."""


def list_presets() -> list[str]:
    """Names of the built-in model presets, sorted.

    Returns:
        The keys of :data:`PRESETS`.

    Examples:
        >>> list_presets()[:2]
        ['llava-1.5-13b', 'llava-1.5-7b']
    """
    return sorted(PRESETS)


def get_preset(name: str) -> VLMShape:
    """Look up a built-in model shape by name.

    Args:
        name: A key of :data:`PRESETS`, for example ``"llava-1.5-7b"``.

    Returns:
        The preset.

    Raises:
        ConfigError: Unknown name; the message lists the available presets.

    Examples:
        >>> get_preset("llava-1.5-7b").lm.layers
        32
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; available presets: {', '.join(list_presets())} "
            "(or give a directory containing config.json, or a hub id 'owner/name')"
        ) from None


def resolve_tokens(value: float, full: int, *, allow_zero: bool = False) -> int:
    """Turn a token count or a keep ratio into a token count.

    An ``int`` is a count, a ``float`` a ratio of ``full``, resolved as
    ``round_half_up(ratio * full)`` with a minimum of 1 for a positive ratio.

    Args:
        value: Token count (``int``) or keep ratio in ``(0, 1]`` (``float``); the runtime type
            decides the meaning, so ``1`` is one token and ``1.0`` is all ``full``.
        full: The full visual-token count ``N``.
        allow_zero: Accept 0 (and a ratio of 0.0); used for later stages that drop every
            visual token.

    Returns:
        The token count, in ``[1, full]`` (``[0, full]`` with ``allow_zero``).

    Raises:
        BudgetError: The count is outside ``[1, full]`` or the ratio outside ``(0, 1]``.
        ConfigError: ``value`` is neither an int nor a float.

    Examples:
        >>> resolve_tokens(0.111, 576), resolve_tokens(192, 576), resolve_tokens(0.5, 5)
        (64, 192, 3)
    """
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"token budget must be an int count or a float ratio, got {value!r}")
    if isinstance(value, int):
        if not low <= value <= full:
            raise BudgetError(f"token count {value} is outside [{low}, {full}] (N = {full})")
        return value
    if not math.isfinite(value) or not (0.0 <= value <= 1.0) or (value == 0.0 and not allow_zero):
        bounds = "[0, 1]" if allow_zero else "(0, 1]"
        raise BudgetError(f"token ratio {value!r} is outside {bounds}")
    count = int((Decimal(repr(value)) * full).to_integral_value(rounding=ROUND_HALF_UP))
    return max(count, 1 if value > 0.0 else 0)


def layer_token_counts(
    num_layers: int, tokens: int, stages: Sequence[tuple[int, int]] = ()
) -> tuple[int, ...]:
    """Visual tokens seen by each LLM layer under a multi-stage schedule.

    Args:
        num_layers: LLM decoder layers ``L``.
        tokens: Visual tokens entering layer 0.
        stages: ``(layer_index, tokens_after)`` pairs: layers ``>= layer_index`` see
            ``tokens_after`` tokens (until the next stage). Layer indices strictly increase in
            ``[1, L - 1]``; token counts never increase.

    Returns:
        ``L`` token counts, one per layer.

    Raises:
        ConfigError: A layer index is out of range or not increasing.
        BudgetError: A stage keeps more tokens than the stage before it, or a negative number.

    Examples:
        >>> layer_token_counts(4, 576, [(2, 144)])
        (576, 576, 144, 144)
    """
    counts = [tokens] * num_layers
    previous_layer, previous_tokens = 0, tokens
    for layer, after in stages:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
            raise ConfigError(f"stage layer {layer!r} is outside [1, {num_layers - 1}]")
        if layer <= previous_layer:
            raise ConfigError(
                f"stage layers must strictly increase, got {layer} after {previous_layer}"
            )
        if not 0 <= after <= previous_tokens:
            raise BudgetError(
                f"stage {layer}:{after} must keep between 0 and {previous_tokens} tokens "
                "(the count before it)"
            )
        counts[layer:] = [after] * (num_layers - layer)
        previous_layer, previous_tokens = layer, after
    return tuple(counts)


def pipeline_schedule(config: PipelineConfig, full: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """The per-layer token schedule of a (multi-stage) pipeline config, for one image of ``full``.

    The encoder stage's budget gives the tokens entering LLM layer 0 (all ``full`` without an
    encoder stage); each LLM stage's budget, a count or a ratio of the tokens *arriving* at its
    layer (rounded half up, at least 1, as the pipeline does), gives the tokens of the layers from
    its ``layer`` on. Layers ``< K`` thus see the encoder-pruned count, layers ``>= K`` the
    LLM-pruned one.

    Args:
        config: A validated pipeline configuration.
        full: The unpruned visual-token count ``N`` of one image.

    Returns:
        ``(tokens entering layer 0, ((layer, tokens from that layer on), ...))``, ready for
        :func:`prefill_flops` (``tokens`` and ``stages``).

    Raises:
        BudgetError: A count exceeds the tokens arriving at its position.

    Examples:
        >>> from tokenprune.plugin import Runtime
        >>> cfg = Runtime(autoload=False).parse_config({
        ...     "scorer": {"name": "cls_attention"}, "selector": {"name": "topk"}, "keep": 192,
        ...     "llm": [{"layer": 2, "keep": 64}]})
        >>> pipeline_schedule(cfg, 576)
        (192, ((2, 64),))
        >>> pipeline_schedule(Runtime(autoload=False).parse_config({"llm": [{}]}), 576)
        (576, ((2, 288),))
    """

    def budget(keep: int | None, ratio: float | None, arriving: int, where: str) -> int:
        value: float = keep if keep is not None else float(ratio if ratio is not None else 1.0)
        try:
            return resolve_tokens(value, arriving)
        except BudgetError as exc:
            raise BudgetError(f"{where}: {exc}") from None

    tokens = full
    if config.has_encoder_stage:
        tokens = budget(config.keep, config.keep_ratio, full, "keep")
    schedule: list[tuple[int, int]] = []
    arriving = tokens
    for i, stage in enumerate(config.llm):
        arriving = budget(stage.keep, stage.keep_ratio, arriving, f"llm.{i}")
        schedule.append((stage.layer, arriving))
    return tokens, tuple(schedule)


def _check_convention(convention: str) -> int:
    try:
        return _FFN_MATRICES[convention]
    except KeyError:
        raise ConfigError(
            f"unknown FLOPs convention {convention!r}; choose one of {', '.join(CONVENTIONS)}"
        ) from None


def llm_layer_flops(
    n: int, hidden: int, intermediate: int, convention: Convention = "fastv"
) -> int:
    """FLOPs of one LLM decoder layer over ``n`` tokens.

    Args:
        n: Tokens the layer processes.
        hidden: Hidden size ``d``.
        intermediate: FFN intermediate size ``m``.
        convention: ``"fastv"`` (``4nd^2 + 2n^2d + 2ndm``) or ``"desap"``
            (``4nd^2 + 2n^2d + 3ndm``).

    Returns:
        The FLOPs (one multiply-accumulate counted as one).

    Raises:
        ConfigError: Unknown convention.

    Examples:
        >>> llm_layer_flops(2, 3, 5), llm_layer_flops(2, 3, 5, "desap")
        (156, 186)
    """
    ffn = _check_convention(convention)
    return 4 * n * hidden * hidden + 2 * n * n * hidden + ffn * n * hidden * intermediate


def vit_layer_flops(n: int, hidden: int, intermediate: int, mlp_matrices: int = 2) -> int:
    """FLOPs of one ViT block over a sequence of ``n`` tokens: ``4nd^2 + 2n^2d + k*n*d*m``.

    Args:
        n: Sequence length ([CLS] included where the encoder has one).
        hidden: Hidden size ``d``.
        intermediate: MLP intermediate size ``m``.
        mlp_matrices: ``k``, 2 for a plain MLP, 3 for a gated one.

    Returns:
        The FLOPs (one multiply-accumulate counted as one).

    Examples:
        >>> vit_layer_flops(2, 3, 5)
        156
    """
    return 4 * n * hidden * hidden + 2 * n * n * hidden + mlp_matrices * n * hidden * intermediate


def llm_flops(
    lm: LMShape,
    tokens: int,
    *,
    stages: Sequence[tuple[int, int]] = (),
    text_tokens: int = 0,
    convention: Convention = "fastv",
) -> int:
    """LLM prefill FLOPs, summed over decoder layers.

    Args:
        lm: The language model.
        tokens: Visual tokens entering layer 0.
        stages: Multi-stage schedule, see :func:`layer_token_counts`.
        text_tokens: Text tokens added to every layer's ``n`` (0 counts visual tokens only).
        convention: Per-layer formula, see :data:`CONVENTIONS`.

    Returns:
        ``sum_k layer_flops(visual_k + text_tokens)``.

    Raises:
        ConfigError: Unknown convention or malformed stages.
        BudgetError: Stages that increase the token count.

    Examples:
        >>> lm = LMShape(layers=2, hidden=3, intermediate=5, heads=1, kv_heads=1)
        >>> llm_flops(lm, 2), llm_flops(lm, 2, stages=[(1, 1)])
        (312, 228)
    """
    _check_convention(convention)
    return sum(
        llm_layer_flops(n + text_tokens, lm.hidden, lm.intermediate, convention)
        for n in layer_token_counts(lm.layers, tokens, stages)
    )


def vision_flops(vision: VisionShape) -> int:
    """Vision-encoder FLOPs for one full input (all crops or frames).

    Args:
        vision: The encoder shape and workload.

    Returns:
        ``sequences * layers * vit_layer_flops(tokens, hidden, intermediate, mlp_matrices)``.

    Examples:
        >>> f"{vision_flops(get_preset('llava-1.5-7b').vision) / 1e12:.3f}"  # CLIP ViT-L/14-336
        '0.191'
    """
    per_layer = vit_layer_flops(
        vision.tokens, vision.hidden, vision.intermediate, vision.mlp_matrices
    )
    return vision.sequences * vision.layers * per_layer


def _dtype_bytes(dtype: str) -> tuple[str, int]:
    key = dtype.lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    try:
        return key, DTYPE_BYTES[key]
    except KeyError:
        raise ConfigError(
            f"unknown KV-cache dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}"
        ) from None


def kv_cache_bytes(
    lm: LMShape,
    tokens: int,
    *,
    stages: Sequence[tuple[int, int]] = (),
    text_tokens: int = 0,
    dtype: str = "bfloat16",
) -> int:
    """KV-cache size after prefill: ``sum_k 2 * kv_heads * head_dim * n_k * bytes``.

    Without stages this is ``2 * layers * kv_heads * head_dim * n * bytes``; with stages each layer
    caches the tokens it saw.

    Args:
        lm: The language model.
        tokens: Visual tokens entering layer 0.
        stages: Multi-stage schedule, see :func:`layer_token_counts`.
        text_tokens: Text tokens cached in every layer.
        dtype: Cache dtype name (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"fp8"``...).

    Returns:
        Bytes.

    Raises:
        ConfigError: Unknown dtype or malformed stages.

    Examples:
        >>> kv_cache_bytes(get_preset("llava-1.5-7b").lm, 576) / 2**20  # MiB
        288.0
    """
    _, nbytes = _dtype_bytes(dtype)
    per_token = 2 * lm.kv_heads * lm.attention_head_dim * nbytes
    return sum(per_token * (n + text_tokens) for n in layer_token_counts(lm.layers, tokens, stages))


@dataclass(frozen=True)
class FlopsResult:
    """Analytic prefill cost of one pruning setting, next to the unpruned run.

    Attributes:
        model: Model name.
        convention: Per-layer formula used for the LLM term.
        scope: ``"visual"`` (visual tokens only) or ``"prefill"`` (visual + text tokens).
        full_visual_tokens: ``N``, the unpruned visual-token count.
        visual_tokens: Visual tokens entering LLM layer 0.
        text_tokens: Text tokens counted in every layer (0 for ``scope="visual"``).
        stages: Resolved multi-stage schedule, ``(layer_index, tokens_after)`` pairs.
        llm_flops: LLM decoder FLOPs.
        vision_flops: Vision-encoder FLOPs, or ``None`` when not included.
        reference_flops: Total FLOPs of the unpruned run (``N`` tokens in every layer, same
            scope, text tokens, convention and vision term).
        kv_cache_bytes: KV-cache size after prefill, for the tokens in ``scope``.
        dtype: KV-cache dtype.
    """

    model: str
    convention: Convention
    scope: Scope
    full_visual_tokens: int
    visual_tokens: int
    text_tokens: int
    stages: tuple[tuple[int, int], ...]
    llm_flops: int
    vision_flops: int | None
    reference_flops: int
    kv_cache_bytes: int
    dtype: str

    @property
    def formula(self) -> str:
        """The per-layer LLM formula of :attr:`convention`."""
        return CONVENTIONS[self.convention]

    @property
    def total_flops(self) -> int:
        """LLM FLOPs plus vision-encoder FLOPs (when included)."""
        return self.llm_flops + (self.vision_flops or 0)

    @property
    def ratio(self) -> float:
        """How many times fewer FLOPs than the unpruned run (``reference / total``)."""
        return self.reference_flops / self.total_flops

    @property
    def reduction(self) -> float:
        """Fraction of the unpruned FLOPs removed (``1 - total / reference``, DeSAP Eq. 8)."""
        return 1.0 - self.total_flops / self.reference_flops

    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``formula``, ``units``, ``total_flops``, ``ratio`` and ``reduction``.

        Returns:
            A JSON-serialisable dict (stages as lists of ``[layer, tokens]``).

        Examples:
            >>> d = prefill_flops("llava-1.5-7b", 64).to_dict()
            >>> d["convention"], d["formula"], d["visual_tokens"], round(d["ratio"], 2)
            ('fastv', '4nd^2 + 2n^2d + 2ndm', 64, 9.24)
        """
        out = dataclasses.asdict(self)
        out["stages"] = [list(stage) for stage in self.stages]
        out.update(
            formula=self.formula,
            units=_UNITS,
            total_flops=self.total_flops,
            ratio=self.ratio,
            reduction=self.reduction,
        )
        return out


def prefill_flops(
    model: VLMShape | str,
    tokens: float | None = None,
    *,
    convention: Convention = "fastv",
    scope: Scope = "visual",
    text_tokens: int = 0,
    include_vision: bool = False,
    stages: Sequence[tuple[int, float]] = (),
    dtype: str = "bfloat16",
) -> FlopsResult:
    """Analytic prefill FLOPs and KV cache of one pruning setting, and of the unpruned run.

    Args:
        model: A shape or a preset name (see :func:`list_presets`).
        tokens: Visual tokens kept before LLM layer 0: an ``int`` count, a ``float`` ratio of
            ``N`` (see :func:`resolve_tokens`; the runtime type decides), or ``None`` for all
            ``N``.
        convention: LLM per-layer formula, ``"fastv"`` or ``"desap"`` (see :data:`CONVENTIONS`).
        scope: ``"visual"`` counts visual tokens only (as the papers do); ``"prefill"`` adds
            ``text_tokens`` to every layer's ``n``.
        text_tokens: Prompt tokens; only allowed with ``scope="prefill"``.
        include_vision: Add the vision-encoder FLOPs (unchanged by pruning) to both runs.
        stages: Further pruning inside the LLM, ``(layer_index, tokens_after)`` pairs with counts
            or ratios of ``N``; layers ``>= layer_index`` see ``tokens_after`` visual tokens.
        dtype: KV-cache dtype.

    Returns:
        The result, with the unpruned total in ``reference_flops``.

    Raises:
        ConfigError: Unknown preset, convention, scope or dtype; text tokens with
            ``scope="visual"``; ``include_vision`` without a known encoder; malformed stages.
        BudgetError: Token counts or ratios out of range.

    Examples:
        >>> r = prefill_flops("llava-1.5-7b", 64, convention="desap")
        >>> round(r.total_flops / 1e12, 2), round(r.reference_flops / 1e12, 2)
        (0.42, 3.82)
        >>> r = prefill_flops("llava-1.5-7b", 64, scope="prefill", text_tokens=60)
        >>> f"{r.ratio:.2f}x"
        '5.26x'
        >>> r = prefill_flops("llava-1.5-7b", 576, stages=[(2, 0.25)])  # FastV K=2, R=75%
        >>> r.stages, f"{r.ratio:.2f}x"
        (((2, 144),), '3.43x')
    """
    shape = get_preset(model) if isinstance(model, str) else model
    _check_convention(convention)
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 0:
        raise ConfigError(f"text_tokens must be an int >= 0, got {text_tokens!r}")
    if scope == "visual" and text_tokens:
        raise ConfigError(
            f"text_tokens={text_tokens} only count with scope='prefill' (whole prefill); "
            "scope='visual' counts visual tokens only"
        )
    dtype_name, _ = _dtype_bytes(dtype)
    full = shape.visual_tokens
    kept = full if tokens is None else resolve_tokens(tokens, full)
    schedule: list[tuple[int, int]] = []
    for layer, after in stages:
        try:
            schedule.append((layer, resolve_tokens(after, full, allow_zero=True)))
        except BudgetError as exc:
            raise BudgetError(f"stage {layer}:{after}: {exc}") from None
    llm = llm_flops(shape.lm, kept, stages=schedule, text_tokens=text_tokens, convention=convention)
    reference = llm_flops(shape.lm, full, text_tokens=text_tokens, convention=convention)
    vision: int | None = None
    if include_vision:
        if shape.vision is None:
            raise ConfigError(
                f"model {shape.name!r} has no known vision encoder; drop include_vision"
            )
        vision = vision_flops(shape.vision)
        reference += vision
    return FlopsResult(
        model=shape.name,
        convention=convention,
        scope=scope,
        full_visual_tokens=full,
        visual_tokens=kept,
        text_tokens=text_tokens,
        stages=tuple(schedule),
        llm_flops=llm,
        vision_flops=vision,
        reference_flops=reference,
        kv_cache_bytes=kv_cache_bytes(
            shape.lm, kept, stages=schedule, text_tokens=text_tokens, dtype=dtype_name
        ),
        dtype=dtype_name,
    )


def _tflops(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e12:.3f}"


def format_table(results: Sequence[FlopsResult]) -> str:
    """Render results as a Markdown table, followed by notes on the conventions used.

    Args:
        results: Results from :func:`prefill_flops`.

    Returns:
        The table; every row states its convention and scope, and ``vs unpruned`` is
        ``reference_flops / total_flops``.

    Examples:
        >>> print(format_table([prefill_flops("llava-1.5-7b", 64, convention="desap")]))
        ... # doctest: +NORMALIZE_WHITESPACE
        | model | convention | scope | visual tokens | text tokens | stages | LLM TFLOPs |
          vision TFLOPs | total TFLOPs | vs unpruned | reduction | KV cache MiB |
        |---|---|---|---|---|---|---|---|---|---|---|---|
        | llava-1.5-7b | desap | visual | 64 / 576 | 0 | - | 0.416 | - | 0.416 | 9.19x |
          89.1% | 32.0 (bfloat16) |
        <BLANKLINE>
        - desap: per LLM layer 4nd^2 + 2n^2d + 3ndm (n tokens, hidden d, FFN m), summed over layers.
        - scope visual: n = visual tokens only.
        - FLOPs count one multiply-accumulate as one FLOP (x2 for hardware FLOPs);
          vs unpruned = FLOPs with all N visual tokens in every layer / FLOPs of the row.
    """
    header = (
        "| model | convention | scope | visual tokens | text tokens | stages | LLM TFLOPs "
        "| vision TFLOPs | total TFLOPs | vs unpruned | reduction | KV cache MiB |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in results:
        stages = ", ".join(f"{layer}:{n}" for layer, n in r.stages) or "-"
        cells = [
            r.model,
            r.convention,
            r.scope,
            f"{r.visual_tokens} / {r.full_visual_tokens}",
            str(r.text_tokens),
            stages,
            _tflops(r.llm_flops),
            _tflops(r.vision_flops),
            _tflops(r.total_flops),
            f"{r.ratio:.2f}x",
            f"{100 * r.reduction:.1f}%",
            f"{r.kv_cache_bytes / 2**20:.1f} ({r.dtype})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for convention in dict.fromkeys(r.convention for r in results):
        lines.append(
            f"- {convention}: per LLM layer {CONVENTIONS[convention]} (n tokens, hidden d, FFN m), "
            "summed over layers."
        )
    scopes = dict.fromkeys(r.scope for r in results)
    if "visual" in scopes:
        lines.append("- scope visual: n = visual tokens only.")
    if "prefill" in scopes:
        lines.append("- scope prefill: n = visual + text tokens (whole prefill).")
    if any(r.vision_flops is not None for r in results):
        lines.append(
            "- vision: encoder FLOPs, per ViT block 4nd^2 + 2n^2d + k*n*d*m with the encoder's "
            "own n ([CLS] included), d, m; unchanged by pruning, counted in both runs."
        )
    lines.append(
        "- FLOPs count one multiply-accumulate as one FLOP (x2 for hardware FLOPs); "
        "vs unpruned = FLOPs with all N visual tokens in every layer / FLOPs of the row."
    )
    return "\n".join(lines)


def _get(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _lm_from_config(config: Any) -> LMShape:
    fields = {
        "hidden_size": _get(config, "hidden_size"),
        "intermediate_size": _get(config, "intermediate_size"),
        "num_hidden_layers": _get(config, "num_hidden_layers"),
        "num_attention_heads": _get(config, "num_attention_heads"),
    }
    missing = [key for key, value in fields.items() if value is None]
    if missing:
        raise ConfigError(
            f"{type(config).__name__} lacks {', '.join(missing)}; expected a LLaVA, LLaVA-NeXT, "
            "Video-LLaVA or Qwen2.5-VL config, or a text config with hidden_size, "
            "intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads"
        )
    heads = int(fields["num_attention_heads"])
    head_dim = _get(config, "head_dim")
    hidden = int(fields["hidden_size"])
    return LMShape(
        layers=int(fields["num_hidden_layers"]),
        hidden=hidden,
        intermediate=int(fields["intermediate_size"]),
        heads=heads,
        kv_heads=int(_get(config, "num_key_value_heads") or heads),
        vocab=_get(config, "vocab_size"),
        head_dim=None if head_dim is None or head_dim * heads == hidden else int(head_dim),
    )


def _clip_vision(config: Any) -> tuple[VisionShape, int]:
    side = int(config.image_size) // int(config.patch_size)
    vision = VisionShape(
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        intermediate=int(config.intermediate_size),
        heads=int(config.num_attention_heads),
        tokens=side * side + 1,
    )
    return vision, side * side


def shape_from_config(
    config: Any, *, name: str | None = None, visual_tokens: int | None = None
) -> VLMShape:
    """Build a :class:`VLMShape` from a transformers config object.

    Supported: ``LlavaConfig`` (``N`` = patches, + [CLS] with the ``"full"`` feature strategy),
    ``LlavaNextConfig`` (``N`` = per-image tokens x (largest anyres grid + 1 base image)),
    ``VideoLlavaConfig`` (``N`` = ``video_seq_length``, which in transformers includes one [CLS]
    per frame), ``Qwen2_5_VLConfig`` (dynamic resolution: ``N`` = ``visual_tokens``, default
    1,024) and plain text configs (no vision encoder; ``visual_tokens`` required). Only
    attributes are read, so transformers is never imported here.

    Args:
        config: The config object.
        name: Name printed in results; defaults to the config's ``_name_or_path`` or
            ``model_type``.
        visual_tokens: Override of ``N``.

    Returns:
        The shape.

    Raises:
        ConfigError: Missing attributes, or a text-only config without ``visual_tokens``.

    Examples:
        >>> from types import SimpleNamespace as NS
        >>> text = NS(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...           num_attention_heads=4, num_key_value_heads=2)
        >>> shape = shape_from_config(text, name="tiny", visual_tokens=16)
        >>> shape.lm.layers, shape.lm.kv_heads, shape.visual_tokens, shape.vision
        (2, 2, 16, None)
    """
    model_type = str(getattr(config, "model_type", "") or "")
    label = name or str(getattr(config, "_name_or_path", "") or "") or model_type or "model"
    text_config = getattr(config, "text_config", None)
    lm = _lm_from_config(text_config if text_config is not None else config)
    vision_config = getattr(config, "vision_config", None)
    source = f"{type(config).__name__} ({model_type or 'text config'})"
    vision: VisionShape | None = None
    dynamic = False
    if model_type in ("llava", "llava_next", "video_llava") and vision_config is not None:
        vision, patches = _clip_vision(vision_config)
        per_image = patches
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            per_image += 1
        full = per_image
        if model_type == "llava_next":
            image_size = int(vision_config.image_size)
            pinpoints = getattr(config, "image_grid_pinpoints", None) or [[image_size] * 2]
            crops = 1 + max((h // image_size) * (w // image_size) for h, w in pinpoints)
            vision = dataclasses.replace(vision, sequences=crops)
            full = crops * per_image
        elif model_type == "video_llava":
            full = int(getattr(config, "video_seq_length", 8 * vision.tokens))
            vision = dataclasses.replace(vision, sequences=max(1, full // vision.tokens))
    elif model_type == "qwen2_5_vl" and vision_config is not None:
        merge = int(vision_config.spatial_merge_size)
        full = visual_tokens or _QWEN_DEFAULT_TOKENS
        vision = VisionShape(
            layers=int(vision_config.depth),
            hidden=int(vision_config.hidden_size),
            intermediate=int(vision_config.intermediate_size),
            heads=int(vision_config.num_heads),
            tokens=full * merge * merge,
            mlp_matrices=3,
        )
        dynamic = True
    elif visual_tokens is None:
        raise ConfigError(
            f"{type(config).__name__} has no vision encoder tokenprune knows; pass visual_tokens "
            "(CLI: --full-tokens) to set the unpruned visual-token count N"
        )
    else:
        full = visual_tokens
    shape = VLMShape(
        name=label,
        lm=lm,
        visual_tokens=full,
        vision=vision,
        dynamic_resolution=dynamic,
        source=source,
    )
    return shape.with_visual_tokens(visual_tokens) if visual_tokens is not None else shape


def shape_from_pretrained(
    name_or_path: str | Path, *, visual_tokens: int | None = None
) -> VLMShape:
    """Build a :class:`VLMShape` from a directory with ``config.json`` or a hub id.

    Uses ``transformers.AutoConfig.from_pretrained`` (imported here, lazily), then
    :func:`shape_from_config`.

    Args:
        name_or_path: Local directory or hub id (``"owner/name"``).
        visual_tokens: Override of ``N``.

    Returns:
        The shape, named ``name_or_path``.

    Raises:
        ConfigError: transformers is missing, or the config cannot be loaded or understood.
    """
    try:
        from transformers import AutoConfig  # lazy: keeps this module torch-free
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ConfigError(f"loading {name_or_path!r} needs transformers: {exc}") from exc
    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
    except (OSError, ValueError, KeyError) as exc:
        hint = (
            ""
            if Path(name_or_path).is_dir()
            else " (a hub id needs network access or a cached download; offline, give a "
            "directory containing config.json)"
        )
        raise ConfigError(
            f"could not load a transformers config from {str(name_or_path)!r}{hint}: {exc}"
        ) from exc
    return shape_from_config(config, name=str(name_or_path), visual_tokens=visual_tokens)


def load_shape(model: str, *, visual_tokens: int | None = None) -> VLMShape:
    """Resolve a preset name, a local directory or a hub id to a :class:`VLMShape`.

    Args:
        model: A preset name (:func:`list_presets`), a directory containing ``config.json``, or
            a hub id ``"owner/name"`` (needs network or a local cache).
        visual_tokens: Override of ``N`` (for dynamic-resolution models, the token count of
            your image).

    Returns:
        The shape.

    Raises:
        ConfigError: Unknown preset (the message lists them), a directory without
            ``config.json``, or a config that cannot be loaded.

    Examples:
        >>> load_shape("qwen2.5-vl-7b", visual_tokens=256).visual_tokens
        256
    """
    if model in PRESETS:
        shape = PRESETS[model]
        return shape.with_visual_tokens(visual_tokens) if visual_tokens is not None else shape
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"directory {model!r} has no config.json")
        return shape_from_pretrained(path, visual_tokens=visual_tokens)
    if "/" in model:
        return shape_from_pretrained(model, visual_tokens=visual_tokens)
    return get_preset(model)
