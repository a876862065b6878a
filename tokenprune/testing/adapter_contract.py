"""Adapter contract checks: the suite every model adapter must pass.

An adapter is described to the suite by an :class:`AdapterCase`: how to build a tiny seeded model,
a padded batch for it, and how many visual tokens each image or video contributes. tokenprune runs
every check over every registered adapter (``tests/adapters/test_contract.py``, cases in
:data:`tokenprune.testing.cases.ADAPTER_CASES`); a plugin author runs them over their own adapter
with one test::

    import pytest
    from tokenprune.testing.adapter_contract import CONTRACT_CHECKS, AdapterCase

    MY_CASE = AdapterCase(
        name="my_vlm",                       # the adapter's registry key
        make_model=lambda seed: tiny_my_vlm(seed=seed),
        make_inputs=lambda model, batch, seed: my_prompts(model, batch, seed=seed),
        tokens_per_item=lambda model, inputs: [16] * len(inputs["pixel_values"]),
        plugins=("my_package.plugin",),      # where the adapter is registered
    )

    @pytest.mark.parametrize("check", sorted(CONTRACT_CHECKS))
    def test_adapter_contract(check):
        CONTRACT_CHECKS[check](MY_CASE)

The checks are plain functions that raise :class:`AdapterContractError` (an
:class:`AssertionError`) naming the adapter and the broken rule, so they work under any test
runner. Each builds its own model from the case's seed; the adapter is found the way users find
it, through ``Runtime(autoload=False, plugins=case.plugins).resolve_adapter(model)``, and the
check fails if that resolves to another adapter than ``case.name``.

The rules:

- :func:`check_equivalence_at_full_budget`: a pipeline that keeps every token gives the unpatched
  model's logits (to ``1e-5``), under both position policies, and, for an adapter with the
  ``llm_attention`` capability, also with a keep-everything stage inside the language model.
- :func:`check_sequence_shortened`: the sequence the core model sees shrinks, row by row, by
  exactly ``N_i - budget(N_i)`` for every image or video ``i`` in the row.
- :func:`check_generate`: greedy ``generate`` with the KV cache on a batch of two with random
  pruning to 25% returns sequences that start with the caller's prompt, prunes like ``forward``
  and decodes one token per step from the cache.
- :func:`check_restore`: after ``remove()``, and after an exception raised inside a stage (at
  the encoder and, with ``llm_attention``, inside the language model), the model has exactly its
  original hooks and instance attributes and gives the outputs of a model that was never pruned;
  an exception never leaves a temporary hook behind.
- :func:`check_capabilities`: every declared capability is delivered to stages during a real
  forward pass (checked by a probe scorer), and a pipeline needing an undeclared one is refused
  when it is installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn, cast

import torch
from torch import nn

from tokenprune.adapters.base import QUERY_KWARG, ModelAdapter, PruneHandle
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext
from tokenprune.errors import CapabilityError
from tokenprune.pipeline import LlmStage, Pipeline
from tokenprune.plugin.manager import Runtime
from tokenprune.stages.base import Scorer, StageConfig
from tokenprune.stages.scorers.random import RandomScorer
from tokenprune.stages.selectors.topk import TopKSelector

__all__ = [
    "CONTRACT_CHECKS",
    "AdapterCase",
    "AdapterContractError",
    "check_capabilities",
    "check_equivalence_at_full_budget",
    "check_generate",
    "check_restore",
    "check_sequence_shortened",
]

Inputs = dict[str, Any]
ModelFn = Callable[[nn.Module, Mapping[str, Any]], list[int]]


@dataclass(frozen=True)
class AdapterCase:
    """A tiny seeded model and batch that exercise one adapter.

    Attributes:
        name: Registry key of the adapter the model must resolve to.
        make_model: ``make_model(seed)``: a tiny model in eval mode, the same for the same seed.
        make_inputs: ``make_inputs(model, batch, seed)``: keyword arguments for ``model(...)``
            and ``model.generate(...)``: a padded batch of ``batch >= 2`` prompts with different
            lengths and, where the model allows it, images of different sizes.
        tokens_per_item: Unpruned visual tokens of each image or video, as the core model (the
            LLM) sees them, in a fixed item order.
        prunable_per_item: The budget's ``N`` of each item, same order (default:
            ``tokens_per_item``). Smaller when the adapter passes structural tokens through
            unpruned (LLaVA-NeXT's ``image_newline``, Video-LLaVA's frame [CLS]).
        item_rows: Prompt row of each item, same order (default: item ``i`` in row ``i``).
        sequence_module: The module whose input is "the sequence": its per-row length is the
            ``attention_mask`` sum when it receives a 2-D one, else the token dimension of its
            first input (default: ``model.get_decoder()``, the language model).
        generative: Whether the model has ``generate`` (``False`` for classifiers).
        probe_layer: Vision block the capability probe reads.
        plugins: Plugins (module names or objects) that register the adapter, for adapters
            that are not built in.
    """

    name: str
    make_model: Callable[[int], nn.Module]
    make_inputs: Callable[[nn.Module, int, int], Inputs]
    tokens_per_item: ModelFn
    prunable_per_item: ModelFn | None = None
    item_rows: ModelFn | None = None
    sequence_module: Callable[[nn.Module], nn.Module] | None = None
    generative: bool = True
    probe_layer: int = -2
    plugins: tuple[str | object, ...] = field(default=())


class AdapterContractError(AssertionError):
    """An adapter broke a rule of the adapter contract."""


def _fail(case: AdapterCase, rule: str, detail: str) -> NoReturn:
    raise AdapterContractError(f"adapter {case.name!r} breaks {rule}: {detail}")


# -- plumbing ------------------------------------------------------------------------------------
def _adapter(case: AdapterCase, model: nn.Module) -> ModelAdapter:
    runtime = Runtime(case.plugins, autoload=False)
    adapter_cls = runtime.resolve_adapter(model)
    if adapter_cls.name != case.name:
        _fail(
            case,
            "adapter resolution",
            f"{type(model).__name__} resolves to adapter {adapter_cls.name!r}, not {case.name!r}",
        )
    return adapter_cls(model)


def _random_pipeline(
    keep_ratio: float, positions: Literal["contiguous", "original"] = "contiguous"
) -> Pipeline:
    return Pipeline(
        RandomScorer(seed=0), TopKSelector(), keep_ratio=keep_ratio, positions=positions
    )


def _llm_pipeline(keep_ratio: float) -> Pipeline:
    """Random pruning inside the language model only, before decoder layer 1."""
    return Pipeline.llm_only([LlmStage(1, _random_pipeline(keep_ratio))])


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


def _generate(model: nn.Module) -> Callable[..., Any]:
    generate: Callable[..., Any] = cast(Any, model).generate
    return generate


def _setup(case: AdapterCase, seed: int, batch: int = 2) -> tuple[nn.Module, Inputs]:
    model = case.make_model(seed)
    inputs = case.make_inputs(model, batch, seed)
    return model, inputs


def _sequence_module(case: AdapterCase, model: nn.Module) -> nn.Module:
    if case.sequence_module is not None:
        return case.sequence_module(model)
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is None:
        _fail(case, "the case definition", "set AdapterCase.sequence_module for this model")
    module: nn.Module = get_decoder()
    return module


@contextmanager
def _record_sequences(module: nn.Module) -> Iterator[list[list[int]]]:
    """Record the per-row sequence lengths of every call of ``module``."""
    calls: list[list[int]] = []

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        hidden = kwargs.get("inputs_embeds", kwargs.get("hidden_states"))
        if hidden is None:
            hidden = args[0] if args else kwargs.get("input_ids")
        if hidden is None:
            return
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and hidden.shape[1] == mask.shape[1]:
            calls.append([int(n) for n in mask.sum(-1)])
            return
        calls.append([int(hidden.shape[1])] * int(hidden.shape[0]))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _items(
    case: AdapterCase, model: nn.Module, inputs: Inputs
) -> tuple[list[int], list[int], list[int]]:
    tokens = list(case.tokens_per_item(model, inputs))
    prunable = list((case.prunable_per_item or case.tokens_per_item)(model, inputs))
    rows = list(case.item_rows(model, inputs)) if case.item_rows else list(range(len(tokens)))
    if not len(tokens) == len(prunable) == len(rows) or not tokens:
        _fail(
            case,
            "the case definition",
            f"tokens_per_item ({len(tokens)}), prunable_per_item ({len(prunable)}) and item_rows "
            f"({len(rows)}) must describe the same, non-empty list of items",
        )
    if any(not 1 <= p <= t for p, t in zip(prunable, tokens, strict=True)):
        _fail(case, "the case definition", f"prunable {prunable} must lie in [1, {tokens}]")
    return tokens, prunable, rows


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Every hook dict (keys and hook identities) and the instance attributes of every module."""
    snap: dict[str, Any] = {}
    for name, module in model.named_modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if isinstance(hooks, Mapping):
                snap[f"{name or '<model>'}.{attr}"] = tuple((k, id(v)) for k, v in hooks.items())
        snap[f"{name or '<model>'}.__dict__"] = tuple(sorted(vars(module)))
    return snap


def _diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return "; ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys[:5])


# -- the checks ----------------------------------------------------------------------------------
@torch.no_grad()
def check_equivalence_at_full_budget(
    case: AdapterCase, *, seed: int = 0, atol: float = 1e-5
) -> None:
    """A pipeline keeping all ``N`` tokens reproduces the unpatched model's logits.

    Checked for both position policies (``contiguous`` and ``original``), on a padded batch of
    two.

    Raises:
        AdapterContractError: If the output shape differs or any logit differs by more than
            ``atol``.
    """
    model, inputs = _setup(case, seed)
    reference = _output_tensor(model(**inputs))
    adapter = _adapter(case, model)
    settings = {
        f"positions={positions!r}": _random_pipeline(1.0, positions)
        for positions in ("contiguous", "original")
    }
    if Capability.LLM_ATTENTION in adapter.capabilities:
        settings["an LLM stage at layer 1"] = _llm_pipeline(1.0)
    for label, pipeline in settings.items():
        with adapter.install(pipeline):
            output = _output_tensor(model(**inputs))
        if output.shape != reference.shape:
            _fail(
                case,
                "equivalence at full budget",
                f"{label}: output shape {tuple(output.shape)} != unpatched "
                f"{tuple(reference.shape)}",
            )
        err = float((output.float() - reference.float()).abs().max())
        if err > atol:
            _fail(
                case,
                "equivalence at full budget",
                f"{label}: max |logit difference| {err:.3g} > {atol:g}",
            )


@torch.no_grad()
def check_sequence_shortened(case: AdapterCase, keep_ratio: float, *, seed: int = 0) -> None:
    """The core model's sequence shrinks by exactly the pruned count of every image or video.

    Row ``r`` must lose ``sum(N_i - budget(N_i))`` over the items ``i`` in row ``r``, where
    ``N_i`` is the item's prunable count and ``budget`` is the pipeline's (``keep_ratio``,
    rounded half up, at least one token).

    Raises:
        AdapterContractError: If a row's length differs from the expectation.
    """
    model, inputs = _setup(case, seed)
    tokens, prunable, rows = _items(case, model, inputs)
    module = _sequence_module(case, model)
    with _record_sequences(module) as calls:
        model(**inputs)
    if not calls:
        _fail(case, "the case definition", "sequence_module was not called by forward")
    before = calls[0]
    for row in set(rows):
        visual = sum(t for t, r in zip(tokens, rows, strict=True) if r == row)
        if visual > before[row]:
            _fail(
                case,
                "the case definition",
                f"row {row} holds {visual} visual tokens but the unpruned sequence has "
                f"{before[row]} tokens",
            )
    pipeline = _random_pipeline(keep_ratio)
    with _adapter(case, model).install(pipeline), _record_sequences(module) as calls:
        model(**inputs)
    after = calls[0]
    expected = list(before)
    for n, row in zip(prunable, rows, strict=True):
        expected[row] -= n - pipeline.budget(n)
    if after != expected:
        _fail(
            case,
            f"sequence shortening at keep_ratio={keep_ratio}",
            f"row lengths {before} became {after}, expected {expected} (prunable tokens per "
            f"item {prunable} in rows {rows})",
        )


@torch.no_grad()
def check_generate(
    case: AdapterCase, *, seed: int = 0, keep_ratio: float = 0.25, max_new_tokens: int = 4
) -> None:
    """Greedy, cached ``generate`` on a pruned batch of two behaves like on an unpruned one.

    The returned sequences start with the caller's (unpruned) prompt and add 1 to
    ``max_new_tokens`` tokens; generation is deterministic; the first new token of every row
    that is unpadded after pruning equals the argmax of the pruned ``forward`` (both prune the
    same way); and after the prefill every step feeds one token per row to the core model (the
    KV cache is used).
    For a ``generative=False`` case it checks that installing adds no ``generate``.

    Raises:
        AdapterContractError: If any of these fails.
    """
    model, inputs = _setup(case, seed)
    adapter = _adapter(case, model)
    pipeline = _random_pipeline(keep_ratio)
    if not case.generative:
        with adapter.install(pipeline):
            if "generate" in vars(model):
                _fail(case, "generate", "installing added a generate() to a non-generative model")
        return
    prompt = inputs["input_ids"]
    module = _sequence_module(case, model)
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "use_cache": True}
    with adapter.install(pipeline):
        with _record_sequences(module) as forward_calls:
            logits = _output_tensor(model(**inputs))
        with _record_sequences(module) as calls:
            first = _generate(model)(**inputs, **settings)
        second = _generate(model)(**inputs, **settings)
    sequences = first if isinstance(first, torch.Tensor) else first.sequences
    again = second if isinstance(second, torch.Tensor) else second.sequences
    length = prompt.shape[1]
    if sequences.shape[0] != prompt.shape[0] or not torch.equal(sequences[:, :length], prompt):
        _fail(case, "generate", "the returned sequences do not start with the original prompt")
    new = sequences.shape[1] - length
    if not 1 <= new <= max_new_tokens:
        _fail(case, "generate", f"{new} new tokens for max_new_tokens={max_new_tokens}")
    if not torch.equal(sequences, again):
        _fail(case, "generate", "two greedy generate() calls gave different tokens")
    pruned_lengths = forward_calls[0]
    for row in (r for r, n in enumerate(pruned_lengths) if n == max(pruned_lengths)):
        expected = int(logits[row, -1].argmax())
        if int(sequences[row, length]) != expected:
            _fail(
                case,
                "generate",
                f"row {row}: first generated token {int(sequences[row, length])} != argmax "
                f"{expected} of the pruned forward pass (generate prunes differently?)",
            )
    decode_steps = calls[1:]
    if len(decode_steps) != new - 1 or any(set(c) != {1} for c in decode_steps):
        lengths = [max(c) for c in calls]
        _fail(
            case,
            "generate",
            f"expected a prefill and {new - 1} one-token cached steps, the core model saw "
            f"sequence lengths {lengths}",
        )


class _ProbeScorerConfig(StageConfig):
    """Configuration of the capability probe."""

    name: Literal["adapter_contract_probe"] = "adapter_contract_probe"
    capability: Capability | None = None
    layer: int = -2
    queries: tuple[str, ...] = ()
    fail: bool = False


class _ProbeError(RuntimeError):
    """Raised on purpose inside a stage by :func:`check_restore`."""


class _ProbeScorer(Scorer[_ProbeScorerConfig]):
    """Uses one capability through the context, then scores at random (or raises on purpose)."""

    name: ClassVar[str] = "adapter_contract_probe"
    Config: ClassVar[type[StageConfig]] = _ProbeScorerConfig

    def __init__(self, config: _ProbeScorerConfig) -> None:
        super().__init__(config)
        self.calls = 0

    def required_capabilities(self) -> frozenset[Capability]:
        cap = self.config.capability
        return frozenset() if cap is None else frozenset({cap})

    def vision_layers(self) -> frozenset[int]:
        cap = self.config.capability
        layered = {Capability.VISION_BLOCK, Capability.CLS_ATTENTION, Capability.RECEIVED_ATTENTION}
        return frozenset({self.config.layer}) if cap in layered else frozenset()

    def score(self, ctx: PruneContext) -> torch.Tensor:
        self.calls += 1
        if self.config.fail:
            raise _ProbeError("failure injected by the adapter contract")
        if self.config.capability is not None:
            _probe(self.config, ctx)
        b, n = ctx.visual.batch_size, ctx.visual.num_tokens
        return torch.rand(b, n, generator=torch.Generator().manual_seed(self.calls))


def _probe(config: _ProbeScorerConfig, ctx: PruneContext) -> None:
    cap = config.capability
    b, n = ctx.visual.batch_size, ctx.visual.num_tokens
    problem: str | None = None
    if cap not in ctx.capabilities:
        problem = "it is missing from ctx.capabilities"
    elif cap is Capability.VISION_BLOCK:
        block = ctx.vision_block(config.layer)
        shape = tuple(block.hidden.shape)
        if (
            len(shape) != 3
            or shape[0] != b
            or shape[1] != block.num_prefix_tokens + block.group_size * n
        ):
            problem = f"hidden {shape} is not (B, P + G*N, C) for B={b}, N={n}"
        elif block.normed().shape != block.hidden.shape:
            problem = "normed() changes the shape"
    elif cap in (Capability.CLS_ATTENTION, Capability.RECEIVED_ATTENTION):
        fn = ctx.cls_attention if cap is Capability.CLS_ATTENTION else ctx.received_attention
        att = fn(config.layer)
        if tuple(att.shape) != (b, n) or not bool(torch.isfinite(att).all()):
            problem = f"got shape {tuple(att.shape)} (want {(b, n)}) or non-finite values"
        elif bool((att < 0).any()) or bool((att.sum(-1) > 1 + 1e-4).any()):
            problem = "values are not attention weights (negative, or rows summing above 1)"
    elif cap is Capability.TEXT_EMBEDDINGS:
        text = ctx.text
        if text is None or text.embeddings is None or text.mask is None:
            problem = "ctx.text has no embeddings"
        elif text.embeddings.shape[0] != b or not bool(text.mask.any(-1).all()):
            problem = f"embeddings {tuple(text.embeddings.shape)} for B={b}, or an empty prompt"
    elif cap is Capability.TEXT_QUERY:
        texts = None if ctx.text is None else ctx.text.texts
        if texts is None or len(texts) != b or not set(texts) <= set(config.queries):
            problem = f"ctx.text.texts is {texts!r}, not one of the given questions per image"
    elif cap is Capability.LLM_ATTENTION:
        att = ctx.llm_attention()
        if tuple(att.shape) != (b, n) or not bool(torch.isfinite(att).all()):
            problem = f"got shape {tuple(att.shape)} (want {(b, n)}) or non-finite values"
        elif bool((att < 0).any()) or bool((att.sum(-1) > 1 + 1e-4).any()):
            problem = "values are not attention weights (negative, or rows summing above 1)"
    elif cap is Capability.PROJECTOR:
        if ctx.projector is None:
            problem = "ctx.projector is None"
        else:
            projected = ctx.projector(ctx.visual.features)
            if tuple(projected.shape[:2]) != (b, n) or not bool(torch.isfinite(projected).all()):
                problem = f"projecting {(b, n)} tokens gave {tuple(projected.shape)}"
    if problem is not None:
        name = "none" if cap is None else cap.value
        raise AdapterContractError(f"declared capability {name!r} is not delivered: {problem}")


def _probe_pipeline(
    config: _ProbeScorerConfig, *, inside_llm: bool = False
) -> tuple[Pipeline, _ProbeScorer]:
    """The probe at the encoder position, or (``llm_attention``, ``inside_llm``) at LLM layer 1."""
    scorer = _ProbeScorer(config)
    pipeline = Pipeline(scorer, TopKSelector(), keep_ratio=0.5)
    if inside_llm or config.capability is Capability.LLM_ATTENTION:
        pipeline = Pipeline.llm_only([LlmStage(1, pipeline)])
    return pipeline, scorer


@torch.no_grad()
def check_capabilities(case: AdapterCase, *, seed: int = 0) -> None:
    """Declared capabilities are delivered; undeclared ones are refused at install time.

    For every declared capability a probe scorer that requires it runs inside a real forward
    pass and uses it (``ctx.vision_block``, ``ctx.cls_attention``, ``ctx.received_attention``,
    the text embeddings, the question strings, ``ctx.projector``) and checks the shapes. For
    every other capability, installing a pipeline that requires it must raise
    :class:`~tokenprune.errors.CapabilityError` and leave the model untouched.

    Raises:
        AdapterContractError: If a capability is declared but not delivered, or not declared but
            accepted.
    """
    model, inputs = _setup(case, seed)
    adapter = _adapter(case, model)
    declared = adapter.capabilities
    if not all(isinstance(c, Capability) for c in declared):
        _fail(case, "capabilities", f"{sorted(map(str, declared))} are not all Capability members")
    batch = int(inputs["input_ids"].shape[0]) if "input_ids" in inputs else 0
    queries = tuple(f"contract question {i}" for i in range(batch))
    for cap in sorted(Capability, key=lambda c: c.value):
        pipeline, probe = _probe_pipeline(
            _ProbeScorerConfig(capability=cap, layer=case.probe_layer, queries=queries)
        )
        if cap not in declared:
            before = _snapshot(model)
            try:
                adapter.install(pipeline).remove()
            except CapabilityError:
                pass
            else:
                _fail(case, "capabilities", f"undeclared {cap.value!r} was accepted at install")
            if _snapshot(model) != before:
                _fail(case, "capabilities", "a refused installation left changes on the model")
            continue
        extra = {QUERY_KWARG: list(queries)} if cap is Capability.TEXT_QUERY else {}
        with adapter.install(pipeline):
            try:
                model(**inputs, **extra)
            except AdapterContractError as exc:
                _fail(case, "capabilities", str(exc))
        if probe.calls == 0:
            _fail(case, "capabilities", f"probing {cap.value!r}: the pipeline never ran")


@torch.no_grad()
def check_restore(case: AdapterCase, *, seed: int = 0) -> None:
    """The model is restored exactly after ``remove()`` and after a failure inside a stage.

    Checked: the hook dicts of every submodule and the instance attributes (``__dict__`` keys)
    of every submodule equal the originals (taken after one unpruned call, so hooks the model
    installs lazily on its first call count as original); while installed, a failing call
    leaves exactly the installation's hooks (no temporary hook survives); the error reaches the
    caller; and after removal ``forward`` (and ``generate``) give the outputs of a model that
    was never pruned.

    Raises:
        AdapterContractError: If anything is left behind or the outputs differ.
    """
    model, inputs = _setup(case, seed)
    fresh = case.make_model(seed)
    reference = _output_tensor(fresh(**inputs))
    settings = {"max_new_tokens": 3, "do_sample": False}
    reference_generate = _generate(fresh)(**inputs, **settings) if case.generative else None
    # transformers installs some hooks of its own lazily, on the first forward pass (output
    # capturing); one unpruned call makes them part of the state the adapter must restore.
    _output_tensor(model(**inputs))
    if case.generative:
        _generate(model)(**inputs, **settings)
    adapter = _adapter(case, model)
    original = _snapshot(model)

    def same_as_never_pruned(when: str) -> None:
        state = _snapshot(model)
        if state != original:
            _fail(case, "exact restore", f"{when}, the model differs: {_diff(original, state)}")
        output = _output_tensor(model(**inputs))
        if output.shape != reference.shape or not torch.equal(output, reference):
            _fail(case, "exact restore", f"{when}, forward differs from a never-pruned model")
        if reference_generate is not None:
            generated = _generate(model)(**inputs, **settings)
            if not torch.equal(generated, reference_generate):
                _fail(case, "exact restore", f"{when}, generate differs from a never-pruned model")

    handle: PruneHandle = adapter.install(_random_pipeline(0.25))
    model(**inputs)
    if case.generative:
        _generate(model)(**inputs, **settings)
    handle.remove()
    handle.remove()  # idempotent
    same_as_never_pruned("after remove()")

    failing = [_probe_pipeline(_ProbeScorerConfig(fail=True))]
    if Capability.LLM_ATTENTION in adapter.capabilities:
        failing.append(_probe_pipeline(_ProbeScorerConfig(fail=True), inside_llm=True))
    calls: list[Callable[[], Any]] = [lambda: model(**inputs)]
    if case.generative:  # look generate up at call time: the installation shadows it
        calls.append(lambda: _generate(model)(**inputs, **settings))
    for (pipeline, _), call in ((f, c) for f in failing for c in calls):
        with adapter.install(pipeline) as handle:
            installed = _snapshot(model)
            try:
                call()
            except _ProbeError:
                pass
            else:
                _fail(case, "exact restore", "an exception raised inside a stage was swallowed")
            state = _snapshot(model)
            if state != installed:
                _fail(
                    case,
                    "exact restore",
                    f"a failed call left temporary hooks: {_diff(installed, state)}",
                )
        # the installation must also come off when an exception leaves the `with` block
        try:
            with adapter.install(pipeline):
                call()
        except _ProbeError:
            pass
    if any(probe.calls == 0 for _, probe in failing):
        _fail(case, "exact restore", "the failing stage was never called")
    same_as_never_pruned("after an exception inside a stage")


CONTRACT_CHECKS: Mapping[str, Callable[[AdapterCase], None]] = {
    "equivalence_at_full_budget": check_equivalence_at_full_budget,
    "sequence_shortened[0.25]": functools.partial(check_sequence_shortened, keep_ratio=0.25),
    "sequence_shortened[0.01]": functools.partial(check_sequence_shortened, keep_ratio=0.01),
    "generate": check_generate,
    "restore": check_restore,
    "capabilities": check_capabilities,
}
"""Every contract check by name (``0.01`` keeps a single token per image or video)."""
