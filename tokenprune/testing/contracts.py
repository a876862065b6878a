"""Stage contract checks: the suite every scorer, selector and merger must pass.

tokenprune runs :func:`check_stage` over every registered stage, and plugin authors can run it over
theirs with one test::

    import pytest
    from tokenprune.testing import check_stage, registered_stages

    @pytest.mark.parametrize(
        "stage_cls", registered_stages(), ids=lambda s: f"{s.role}:{s.name}"
    )
    def test_stage_contract(stage_cls):
        check_stage(stage_cls)

The checks are plain functions that raise :class:`AssertionError` with a message naming the stage
and the broken rule, so they work under any test runner. The inputs come from
:func:`make_context`: a synthetic :class:`~tokenprune.context.PruneContext` with every capability
(CLIP-like vision blocks with a [CLS] token, prompt text and embeddings, a projector), built from
private seeded generators, so no model is downloaded and the global RNG is never touched.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, get_args

import torch
from pydantic import ValidationError
from torch import nn

from tokenprune import functional as F
from tokenprune.capabilities import Capability
from tokenprune.context import PruneContext, Stash, VisionBlock
from tokenprune.errors import TokenPruneError
from tokenprune.stages.base import Merger, Scorer, Scores, Selector, Stage, StageConfig
from tokenprune.types import PrunedTokens, Selection, TextTokens, VisualTokens

if TYPE_CHECKING:
    from tokenprune.plugin.manager import Runtime

__all__ = ["ContextFactory", "check_stage", "make_context", "registered_stages"]

ContextFactory = Callable[..., PruneContext]
"""Builds a context as ``factory(batch, num_tokens, dim, keep, seed=seed)``, like
:func:`make_context`."""

BATCH = 3
"""Batch size used by the contract (more than one image, and odd)."""
DIM = 16
"""Feature width used by the contract."""
NUM_TOKENS = (1, 2, 7, 16)
"""Token counts ``N`` every stage is run on (``1`` is the smallest image a budget allows)."""
_SEED = 1234


# -- synthetic context ---------------------------------------------------------------------------


def _linear(fan_in: int, fan_out: int, generator: torch.Generator) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(fan_out, fan_in, generator=generator) * fan_in**-0.5)
        layer.bias.copy_(torch.randn(fan_out, generator=generator) * 0.02)
    return layer.requires_grad_(False).eval()


def _layer_norm(width: int, generator: torch.Generator) -> nn.LayerNorm:
    norm = nn.LayerNorm(width)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(width, generator=generator))
        norm.bias.copy_(0.1 * torch.randn(width, generator=generator))
    return norm.requires_grad_(False).eval()


_BlockModules = tuple[nn.LayerNorm, nn.Linear, nn.Linear, nn.Linear, nn.Linear]


@functools.lru_cache(maxsize=32)
def _modules(
    seed: int, dim: int, llm_dim: int, num_layers: int
) -> tuple[tuple[_BlockModules, ...], nn.Module]:
    """Frozen block modules and projector, shared by the contexts with the same sizes and seed.

    Building modules dominates the cost of a context, and the contract builds hundreds.
    """
    g = torch.Generator().manual_seed(seed)
    # Module constructors draw their default init from the global RNG: restore it afterwards.
    # Every value that stays comes from ``g``.
    with torch.random.fork_rng(devices=[]):
        blocks = tuple(
            (
                _layer_norm(dim, g),
                _linear(dim, dim, g),
                _linear(dim, dim, g),
                _linear(dim, dim, g),
                _linear(dim, dim, g),
            )
            for _ in range(num_layers)
        )
        projector = nn.Sequential(_linear(dim, llm_dim, g), nn.GELU(), _linear(llm_dim, llm_dim, g))
    return blocks, projector.eval()


def _grid(num_tokens: int) -> tuple[int, int]:
    rows = max(d for d in range(1, math.isqrt(num_tokens) + 1) if num_tokens % d == 0)
    return rows, num_tokens // rows


def make_context(
    batch: int,
    num_tokens: int,
    dim: int,
    keep: int,
    *,
    seed: int = 0,
    with_cls_block: bool = True,
    text: bool | Sequence[str] = True,
    num_layers: int = 2,
    num_heads: int = 2,
    text_length: int = 5,
    llm_dim: int | None = None,
) -> PruneContext:
    """A synthetic, seeded :class:`~tokenprune.context.PruneContext` with every capability.

    The context mimics what the LLaVA adapter builds, at toy size:

    - ``num_layers`` CLIP-like vision blocks (random ``LayerNorm`` and q/k/v/out ``Linear``
      modules of width ``dim``), each with an input hidden state of ``P + N`` tokens, where the
      prefix ``P`` is one [CLS] token when ``with_cls_block`` (else ``0``);
    - visual tokens equal to the patch part of the last block's input (as LLaVA-1.5's
      ``hidden_states[-2]``), on the most square ``(rows, cols)`` grid of ``N`` cells;
    - a two-layer MLP projector from ``dim`` to ``llm_dim``;
    - prompt text: one question per image, and ``(B, T, llm_dim)`` embeddings whose mask marks
      a different number of real (left-aligned) rows per image;
    - the attention of a last prompt token inside a language model (``ctx.llm_attention()``):
      ``(B, N)`` non-negative values summing to less than 1 per image (the rest of the softmax
      went to text tokens), as at an LLM position.

    Everything is drawn from private generators seeded with ``seed``: the same arguments give
    equal tensors, and the global RNG is left untouched. The (frozen) modules are shared by the
    contexts built with the same ``seed``, ``dim``, ``llm_dim`` and ``num_layers``; like a real
    model's, stages must never modify them.

    Args:
        batch: Number of images ``B``.
        num_tokens: Tokens per image ``N``.
        dim: Width ``D`` of the visual tokens and the vision blocks.
        keep: Tokens to keep per image ``K``.
        seed: Seed of all random values.
        with_cls_block: Give the blocks a [CLS] prefix token; without it the context lacks the
            ``cls_attention`` capability (like a Qwen2.5-VL tower).
        text: ``True`` for synthetic questions, ``False`` for no prompt at all (no text
            capabilities), or the questions themselves (one per image).
        num_layers: Number of vision blocks, all captured.
        num_heads: Attention heads of each block (must divide ``dim``).
        text_length: Padded prompt length ``T``.
        llm_dim: Width of the language-model space (projector output and text embeddings);
            ``2 * dim`` by default, so a stage that mixes up the two spaces fails loudly.

    Returns:
        The context.

    Shape:
        - ``ctx.visual.features``: :math:`(B, N, D)`
        - ``ctx.blocks[i].hidden``: :math:`(B, P + N, D)`
        - ``ctx.text.embeddings``: :math:`(B, T, D_{llm})`

    Examples:
        >>> ctx = make_context(2, 9, 8, 3, seed=0)
        >>> tuple(ctx.visual.features.shape), ctx.visual.grid, ctx.keep
        ((2, 9, 8), (3, 3), 3)
        >>> tuple(ctx.cls_attention(-1).shape)
        (2, 9)
        >>> bool((make_context(2, 9, 8, 3, seed=0).visual.features == ctx.visual.features).all())
        True
    """
    if min(batch, num_tokens, dim, num_layers, text_length) < 1:
        raise ValueError("batch, num_tokens, dim, num_layers and text_length must be positive")
    if dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
    llm_dim = 2 * dim if llm_dim is None else llm_dim
    modules, projector = _modules(seed, dim, llm_dim, num_layers)
    g = torch.Generator().manual_seed(seed)
    prefix = 1 if with_cls_block else 0

    blocks: dict[int, VisionBlock] = {}
    for index, (layer_norm, q_proj, k_proj, v_proj, out_proj) in enumerate(modules):
        blocks[index] = VisionBlock(
            index=index,
            hidden=torch.randn(batch, prefix + num_tokens, dim, generator=g),
            layer_norm=layer_norm,
            q_proj=q_proj,
            k_proj=k_proj,
            v_proj=v_proj,
            out_proj=out_proj,
            num_heads=num_heads,
            num_prefix_tokens=prefix,
        )
    features = blocks[num_layers - 1].hidden[:, prefix:]

    capabilities = set(Capability)
    if not with_cls_block:
        capabilities.discard(Capability.CLS_ATTENTION)
    prompt: TextTokens | None = None
    if text is False:
        capabilities -= {Capability.TEXT_QUERY, Capability.TEXT_EMBEDDINGS}
    else:
        texts = (
            tuple(f"what is in part {i} of the image?" for i in range(batch))
            if text is True
            else tuple(text)
        )
        embeddings = torch.randn(batch, text_length, llm_dim, generator=g)
        lengths = torch.tensor([max(1, text_length - i % 3) for i in range(batch)])
        mask = torch.arange(text_length).unsqueeze(0) < lengths.unsqueeze(1)
        prompt = TextTokens(texts=texts, embeddings=embeddings, mask=mask)

    logits = torch.randn(batch, num_tokens + text_length, generator=g)
    llm_attention = logits.softmax(dim=-1)[:, :num_tokens]

    return PruneContext(
        visual=VisualTokens(features, grid=_grid(num_tokens)),
        keep=keep,
        capabilities=frozenset(capabilities),
        text=prompt,
        blocks=blocks,
        num_layers=num_layers,
        projector=projector,
        last_token_attention=llm_attention,
    )


# -- discovery -----------------------------------------------------------------------------------


def registered_stages(runtime: Runtime | None = None) -> list[type[Stage[Any]]]:
    """Every stage class registered in ``runtime``, sorted by role and name.

    Meant for parametrising a contract test, with ids such as ``f"{cls.role}:{cls.name}"``.

    Args:
        runtime: The runtime to read; a fresh ``Runtime()`` (built-ins and installed plugins)
            if omitted.

    Examples:
        >>> from tokenprune.plugin import Runtime
        >>> ids = [f"{s.role}:{s.name}" for s in registered_stages(Runtime(autoload=False))]
        >>> "selector:topk" in ids, ids == sorted(ids)
        (True, True)
    """
    if runtime is None:
        from tokenprune.plugin.manager import Runtime

        runtime = Runtime()
    return [registration.obj for registration in runtime.stages]


# -- the contract --------------------------------------------------------------------------------


def check_stage(stage_cls: type[Stage[Any]], *, make_context: ContextFactory | None = None) -> None:
    """Run the whole stage contract on ``stage_cls``.

    Every stage:

    - is a ``Scorer``, ``Selector`` or ``Merger`` subclass with a non-empty ``name``, a frozen
      ``Config`` (``extra="forbid"``) whose ``name`` literal equals ``name``, and whose config
      survives a JSON round trip;
    - runs on batches of three images with ``N`` = 1, 2, 7 and 16 tokens, and on one image;
    - is deterministic: the same inputs give equal outputs, also on a second call of the same
      instance (no state kept between calls);
    - leaves its inputs (tensors and modules of the context) and the global torch RNG untouched;
    - when a capability it requires (``required_capabilities()``) is missing, raises a
      :class:`~tokenprune.errors.TokenPruneError` (or still works), never another exception.

    Per role:

    - **scorers** return a finite floating ``(B, N)`` map, or a non-empty mapping of such maps;
      given vision blocks whose token count disagrees with the visual tokens, they raise a
      ``TokenPruneError`` or still return ``(B, N)`` maps, never a wrongly shaped result;
    - **selectors** return exactly ``K`` unique, in-range, ascending ``long`` indices per image
      for ``K`` = 1, a middle value and ``N``; ties (constant or integer scores) are broken
      deterministically; scores of the wrong shape, or with NaN, raise a ``TokenPruneError``;
      a single-map selector gives the same result for a tensor and a one-entry mapping;
    - **mergers** return :class:`~tokenprune.types.PrunedTokens` with finite ``(B, K, D)``
      features of the input dtype, ``keep_idx`` equal to the selection and ``(B, K)`` weights;
      a selection with the wrong batch size or an index ``>= N`` raises a ``TokenPruneError``.

    Conventions a stage class may follow (plain classmethods, no registration needed):

    - ``contract_config() -> StageConfig``: the configuration to check; by default
      ``stage_cls.Config(name=stage_cls.name)``, so define it when the config has required
      fields or when the defaults need something a synthetic context cannot give (a download).
    - ``contract_score_names() -> Sequence[str]``: for a selector that consumes several named
      score maps, their names; the contract then passes a mapping of random maps.

    Args:
        stage_cls: The stage class to check.
        make_context: Context factory called as ``make_context(batch, num_tokens, dim, keep,
            seed=seed)``; :func:`tokenprune.testing.make_context` (with enough vision blocks for
            the stage's ``vision_layers()``) if omitted.

    Raises:
        AssertionError: On the first broken rule, naming the stage, the rule and the sizes.

    Examples:
        >>> from tokenprune.stages.selectors.topk import TopKSelector
        >>> check_stage(TopKSelector)
    """
    _Contract(stage_cls, make_context).run()


def _stage_label(stage_cls: type[Any]) -> str:
    role = getattr(stage_cls, "role", "?")
    name = getattr(stage_cls, "name", "?")
    return f"{role} {name!r} ({stage_cls.__module__}.{stage_cls.__qualname__})"


def _maps(scores: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(scores, torch.Tensor):
        return {"scores": scores}
    if isinstance(scores, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in scores.items()
    ):
        return dict(scores)
    return None


def _snapshot(ctx: PruneContext) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    tensors = [("ctx.visual.features", ctx.visual.features)]
    if ctx.last_token_attention is not None:
        tensors.append(("ctx.last_token_attention", ctx.last_token_attention))
    tensors += [(f"ctx.blocks[{i}].hidden", b.hidden) for i, b in ctx.blocks.items()]
    if ctx.text is not None and ctx.text.embeddings is not None:
        tensors.append(("ctx.text.embeddings", ctx.text.embeddings))
    modules: dict[str, Any] = {"ctx.projector": ctx.projector}
    for i, block in ctx.blocks.items():
        for part in ("layer_norm", "q_proj", "k_proj", "v_proj", "out_proj"):
            modules[f"ctx.blocks[{i}].{part}"] = getattr(block, part)
    for prefix, module in modules.items():
        if isinstance(module, nn.Module):
            tensors += [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]
    return [(name, t, t.detach().clone()) for name, t in tensors]


def _without(ctx: PruneContext, capability: Capability) -> PruneContext:
    """``ctx`` minus one capability and the data behind it."""
    changes: dict[str, Any] = {"capabilities": ctx.capabilities - {capability}, "stash": Stash()}
    if capability is Capability.VISION_BLOCK:
        changes["blocks"] = {}
    elif capability is Capability.PROJECTOR:
        changes["projector"] = None
    elif capability is Capability.LLM_ATTENTION:
        changes["last_token_attention"] = None
    elif capability in (Capability.TEXT_QUERY, Capability.TEXT_EMBEDDINGS) and ctx.text is not None:
        text = ctx.text
        if capability is Capability.TEXT_QUERY:
            keep_text = text.embeddings is not None
            changes["text"] = dataclasses.replace(text, texts=None) if keep_text else None
        else:
            keep_text = text.texts is not None
            changes["text"] = TextTokens(texts=text.texts) if keep_text else None
    return dataclasses.replace(ctx, **changes)


class _Contract:
    """One run of the contract on one stage class (kept private: the API is :func:`check_stage`)."""

    def __init__(self, stage_cls: type[Stage[Any]], factory: ContextFactory | None) -> None:
        self.stage_cls = stage_cls
        self.label = _stage_label(stage_cls)
        self.user_factory = factory is not None
        self.factory: ContextFactory = factory if factory is not None else make_context
        # Inputs made by the contract come from here, never from the global RNG.
        self.generator = torch.Generator().manual_seed(_SEED)

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator)

    # -- helpers ---------------------------------------------------------------------------
    def fail(self, message: str) -> NoReturn:
        raise AssertionError(f"stage contract: {self.label}: {message}")

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.fail(message)

    def context(self, batch: int, num_tokens: int, keep: int, seed: int = _SEED) -> PruneContext:
        ctx = self.factory(batch, num_tokens, DIM, keep, seed=seed)
        if not isinstance(ctx, PruneContext):
            self.fail(f"the context factory returned {type(ctx).__name__}, not a PruneContext")
        got = (ctx.visual.batch_size, ctx.visual.num_tokens, ctx.keep)
        if got != (batch, num_tokens, keep):
            self.fail(
                f"the context factory was asked for (B, N, K) = {(batch, num_tokens, keep)} "
                f"but built {got}"
            )
        return ctx

    def call(self, what: str, fn: Callable[[], Any], ctx: PruneContext, where: str) -> Any:
        """Call the stage; check that it keeps its inputs and the global RNG untouched."""
        rng = torch.random.get_rng_state()
        inputs = _snapshot(ctx)
        try:
            result = fn()
        except Exception as exc:
            hint = ""
            if isinstance(self.stage, Selector) and self.score_names() is None:
                hint = (
                    "; if this selector consumes several named score maps, define a classmethod "
                    "contract_score_names() returning their names"
                )
            raise AssertionError(
                f"stage contract: {self.label}: {what} raised {type(exc).__name__} on {where}: "
                f"{exc}{hint}"
            ) from exc
        if not torch.equal(rng, torch.random.get_rng_state()):
            self.fail(
                f"{what} changed the global torch RNG on {where}; draw random numbers from a "
                "private torch.Generator seeded from the config"
            )
        for name, tensor, before in inputs:
            if not torch.equal(tensor, before):
                self.fail(f"{what} modified its input {name} in place on {where}")
        return result

    def expect_error(self, what: str, fn: Callable[[], Any], where: str) -> Any:
        """Return the result of ``fn`` or ``None`` if it raised a :class:`TokenPruneError`."""
        try:
            return fn()
        except TokenPruneError:
            return None
        except Exception as exc:
            raise AssertionError(
                f"stage contract: {self.label}: {what} on {where} raised {type(exc).__name__} "
                f"({exc}); raise a tokenprune error (ShapeError, CapabilityError, ...) instead"
            ) from exc

    @staticmethod
    def budgets(num_tokens: int) -> list[int]:
        return sorted({1, max(1, num_tokens // 2), num_tokens})

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> None:
        self.check_class()
        self.config = self.build_config()
        self.stage = self.new_stage()
        if not self.user_factory:
            self.factory = functools.partial(make_context, num_layers=self.num_layers())
        if isinstance(self.stage, Scorer):
            self.check_scorer()
        elif isinstance(self.stage, Selector):
            self.check_selector()
        else:
            self.check_merger()
        self.check_missing_capabilities()

    def check_class(self) -> None:
        cls = self.stage_cls
        if not isinstance(cls, type) or not issubclass(cls, Scorer | Selector | Merger):
            self.fail("is not a Scorer, Selector or Merger subclass")
        role = {Scorer: "scorer", Selector: "selector", Merger: "merger"}
        expected = next(r for base, r in role.items() if issubclass(cls, base))
        self.check(cls.role == expected, f"role is {cls.role!r}, expected {expected!r}")
        name = getattr(cls, "name", None)
        self.check(isinstance(name, str) and bool(name), "has no non-empty `name` class attribute")
        config = getattr(cls, "Config", None)
        if not (isinstance(config, type) and issubclass(config, StageConfig)):
            self.fail("`Config` must be a StageConfig subclass")
        literal = get_args(config.model_fields["name"].annotation)
        self.check(
            literal == (name,),
            f"Config.name must be Literal[{name!r}], got {config.model_fields['name'].annotation}",
        )
        settings = config.model_config
        self.check(
            settings.get("frozen") is True and settings.get("extra") == "forbid",
            "Config must be frozen with extra='forbid' (inherit StageConfig's model_config)",
        )
        requires = cls.requires
        self.check(
            isinstance(requires, frozenset) and all(isinstance(c, Capability) for c in requires),
            f"`requires` must be a frozenset of Capability, got {requires!r}",
        )

    def build_config(self) -> StageConfig:
        cls = self.stage_cls
        hook = getattr(cls, "contract_config", None)
        if hook is not None:
            config = hook()
            if not isinstance(config, cls.Config):
                self.fail(
                    f"contract_config() returned {type(config).__name__}, not {cls.Config.__name__}"
                )
        else:
            try:
                config = cls.Config(name=cls.name)
            except ValidationError as exc:
                self.fail(
                    f"{cls.Config.__name__}(name={cls.name!r}) is invalid ({exc.error_count()} "
                    "error(s)); give the fields defaults or define a classmethod "
                    f"contract_config() returning a valid config:\n{exc}"
                )
        try:
            again = type(config).model_validate_json(config.model_dump_json())
        except ValidationError as exc:
            self.fail(f"its config does not survive a JSON round trip: {exc}")
        self.check(again == config, f"JSON round trip changed the config: {config!r} -> {again!r}")
        return config

    def new_stage(self) -> Stage[Any]:
        try:
            stage = self.stage_cls(self.config)
        except Exception as exc:
            raise AssertionError(
                f"stage contract: {self.label}: cannot be built from {self.config!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.check(isinstance(repr(stage), str), "repr() must return a string")
        layers = stage.vision_layers()
        self.check(
            isinstance(layers, frozenset) and all(isinstance(i, int) for i in layers),
            f"vision_layers() must return a frozenset of ints, got {layers!r}",
        )
        return stage

    def num_layers(self) -> int:
        layers = self.stage.vision_layers()
        needed = [i + 1 if i >= 0 else -i for i in layers]
        return max([2, *needed])

    # -- scorers ---------------------------------------------------------------------------
    def check_scores_output(self, scores: Any, batch: int, num_tokens: int, where: str) -> None:
        maps = _maps(scores)
        if not maps:
            self.fail(
                f"score() returned {type(scores).__name__} on {where}; return a (B, N) tensor or "
                "a non-empty mapping of named (B, N) tensors"
            )
        for key, value in maps.items():
            self.check(
                tuple(value.shape) == (batch, num_tokens),
                f"score map {key!r} has shape {tuple(value.shape)} on {where}, expected "
                f"(B, N) = {(batch, num_tokens)}",
            )
            self.check(
                value.is_floating_point(), f"score map {key!r} is {value.dtype}, not floating"
            )
            self.check(
                bool(torch.isfinite(value).all()), f"score map {key!r} has NaN/Inf on {where}"
            )

    def check_scorer(self) -> None:
        stage = self.stage
        assert isinstance(stage, Scorer)
        for batch, n in [(1, 4), *((BATCH, n) for n in NUM_TOKENS)]:
            keep = max(1, n // 2)
            where = f"B={batch}, N={n}, K={keep}"
            ctx = self.context(batch, n, keep)
            first = self.call("score()", functools.partial(stage.score, ctx), ctx, where)
            self.check_scores_output(first, batch, n, where)
            # The same instance again, on an equal fresh context: no state, no randomness.
            ctx2 = self.context(batch, n, keep)
            second = self.call("score()", functools.partial(stage.score, ctx2), ctx2, where)
            a, b = _maps(first), _maps(second)
            assert a is not None
            assert b is not None
            self.check(
                a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
                f"score() is not deterministic on {where}: two calls on equal inputs differ",
            )
        # Vision blocks that disagree with the visual tokens (N + 1 patches vs N tokens).
        n = NUM_TOKENS[-1]
        ctx = self.context(BATCH, n, n // 2)
        bad = dataclasses.replace(
            ctx, visual=VisualTokens(ctx.visual.features[:, 1:]), keep=1, stash=Stash()
        )
        where = f"blocks with {n} patches but N={n - 1} visual tokens"
        result = self.expect_error("score()", functools.partial(stage.score, bad), where)
        if result is not None:
            self.check_scores_output(result, BATCH, n - 1, where)

    # -- selectors -------------------------------------------------------------------------
    def score_names(self) -> tuple[str, ...] | None:
        hook = getattr(self.stage_cls, "contract_score_names", None)
        if hook is None:
            return None
        names = tuple(hook())
        self.check(
            bool(names) and all(isinstance(n, str) for n in names),
            f"contract_score_names() must return non-empty names, got {names!r}",
        )
        return names

    def make_scores(self, make: Callable[[], torch.Tensor]) -> Scores:
        names = self.score_names()
        if names is None:
            return make()
        return {name: make() for name in names}

    def check_selection(self, selection: Any, batch: int, n: int, k: int, where: str) -> None:
        if not isinstance(selection, Selection):
            self.fail(f"select() returned {type(selection).__name__} on {where}, not a Selection")
        idx = selection.keep_idx
        self.check(idx.dtype == torch.long, f"keep_idx is {idx.dtype}, not torch.long")
        self.check(
            tuple(idx.shape) == (batch, k),
            f"keep_idx has shape {tuple(idx.shape)} on {where}, expected (B, K) = {(batch, k)}",
        )
        self.check(
            bool(((idx >= 0) & (idx < n)).all()),
            f"keep_idx has indices outside [0, {n}) on {where}",
        )
        self.check(
            bool((idx[:, 1:] > idx[:, :-1]).all()),
            f"keep_idx is not strictly increasing (sorted, unique) per row on {where}",
        )

    def select(self, scores: Scores, ctx: PruneContext, where: str) -> Selection:
        stage = self.stage
        assert isinstance(stage, Selector)
        before = {k: v.clone() for k, v in (_maps(scores) or {}).items()}
        selection = self.call("select()", functools.partial(stage.select, scores, ctx), ctx, where)
        if not isinstance(selection, Selection):
            self.fail(f"select() returned {type(selection).__name__} on {where}, not a Selection")
        after = _maps(scores) or {}
        self.check(
            all(torch.equal(before[k], after[k]) for k in before),
            f"select() modified the scores in place on {where}",
        )
        return selection

    def check_selector(self) -> None:
        stage = self.stage
        assert isinstance(stage, Selector)
        g = self.generator
        kinds: list[tuple[str, Callable[[int, int], torch.Tensor]]] = [
            ("random scores", self.uniform),
            ("constant scores", lambda b, n: torch.ones(b, n)),
            (
                "integer scores with ties",
                lambda b, n: torch.randint(0, 3, (b, n), generator=g).float(),
            ),
        ]
        for batch, n in [(1, 4), *((BATCH, n) for n in NUM_TOKENS)]:
            for k in self.budgets(n):
                for kind, make in kinds:
                    where = f"{kind}, B={batch}, N={n}, K={k}"
                    scores = self.make_scores(functools.partial(make, batch, n))
                    first = self.select(scores, self.context(batch, n, k), where)
                    self.check_selection(first, batch, n, k, where)
                    second = self.select(scores, self.context(batch, n, k), where)
                    self.check(
                        torch.equal(first.keep_idx, second.keep_idx),
                        f"select() is not deterministic on {where}: two calls on equal inputs "
                        "differ",
                    )
                    if self.score_names() is None and kind == "random scores":
                        assert isinstance(scores, torch.Tensor)
                        named = self.select({"scores": scores}, self.context(batch, n, k), where)
                        self.check(
                            torch.equal(first.keep_idx, named.keep_idx),
                            f"select() gives a different result for a one-entry mapping of "
                            f"scores than for the bare tensor on {where}",
                        )
        self.check_selector_errors()

    def check_selector_errors(self) -> None:
        stage = self.stage
        assert isinstance(stage, Selector)
        n = NUM_TOKENS[-1]

        def nan_scores() -> torch.Tensor:
            s = self.uniform(BATCH, n)
            s[0, 3] = float("nan")
            return s

        bad_inputs: list[tuple[str, Callable[[], torch.Tensor]]] = [
            (f"scores of shape (B, N + 1) = {(BATCH, n + 1)}", lambda: self.uniform(BATCH, n + 1)),
            (f"scores of shape (B + 1, N) = {(BATCH + 1, n)}", lambda: self.uniform(BATCH + 1, n)),
            (f"1-D scores of shape {(n,)}", lambda: self.uniform(n)),
            ("scores with a NaN", nan_scores),
        ]
        for what, make in bad_inputs:
            ctx = self.context(BATCH, n, n // 2)
            scores = self.make_scores(make)
            result = self.expect_error(
                "select()", functools.partial(stage.select, scores, ctx), what
            )
            if result is not None:
                self.fail(f"select() accepted {what} silently; raise a ShapeError")

    # -- mergers ---------------------------------------------------------------------------
    def check_merger(self) -> None:
        stage = self.stage
        assert isinstance(stage, Merger)
        for batch, n in [(1, 4), *((BATCH, n) for n in NUM_TOKENS)]:
            for k in self.budgets(n):
                where = f"B={batch}, N={n}, K={k}"
                selection = Selection(F.topk_keep_indices(self.uniform(batch, n), k))
                ctx = self.context(batch, n, k)
                first = self.call(
                    "merge()", functools.partial(stage.merge, ctx, selection), ctx, where
                )
                self.check_pruned(first, ctx, selection, where)
                ctx2 = self.context(batch, n, k)
                second = self.call(
                    "merge()", functools.partial(stage.merge, ctx2, selection), ctx2, where
                )
                self.check(
                    torch.equal(first.features, second.features)
                    and torch.equal(first.weights, second.weights),
                    f"merge() is not deterministic on {where}: two calls on equal inputs differ",
                )
        n = NUM_TOKENS[-1]
        ctx = self.context(BATCH, n, 2)
        bad_selections = [
            (
                f"a selection for B + 1 = {BATCH + 1} images",
                Selection(torch.tensor([[0, 1]] * (BATCH + 1))),
            ),
            (f"a selection with index N = {n}", Selection(torch.tensor([[0, n]] * BATCH))),
        ]
        for what, selection in bad_selections:
            result = self.expect_error(
                "merge()", functools.partial(stage.merge, ctx, selection), what
            )
            if result is not None:
                self.fail(f"merge() accepted {what} silently; raise a ShapeError")

    def check_pruned(
        self, pruned: Any, ctx: PruneContext, selection: Selection, where: str
    ) -> None:
        if not isinstance(pruned, PrunedTokens):
            self.fail(f"merge() returned {type(pruned).__name__} on {where}, not PrunedTokens")
        feats = ctx.visual.features
        b, k = selection.keep_idx.shape
        expected = (b, k, feats.shape[-1])
        self.check(
            tuple(pruned.features.shape) == expected,
            f"features have shape {tuple(pruned.features.shape)} on {where}, expected "
            f"(B, K, D) = {expected}",
        )
        self.check(
            pruned.features.dtype == feats.dtype,
            f"features are {pruned.features.dtype} on {where}, expected the input's {feats.dtype}",
        )
        self.check(bool(torch.isfinite(pruned.features).all()), f"features have NaN/Inf on {where}")
        self.check(
            torch.equal(pruned.keep_idx, selection.keep_idx),
            f"keep_idx differs from the selection on {where}",
        )
        self.check(
            tuple(pruned.weights.shape) == (b, k) and bool(torch.isfinite(pruned.weights).all()),
            f"weights must be finite with shape (B, K) = {(b, k)} on {where}, got "
            f"{tuple(pruned.weights.shape)}",
        )

    # -- every role ------------------------------------------------------------------------
    def check_missing_capabilities(self) -> None:
        stage = self.stage
        n = NUM_TOKENS[-1]
        k = n // 2
        required = stage.required_capabilities()
        self.check(
            isinstance(required, frozenset) and all(isinstance(c, Capability) for c in required),
            f"required_capabilities() must return a frozenset of Capability, got {required!r}",
        )
        for capability in sorted(required, key=lambda c: c.value):
            ctx = _without(self.context(BATCH, n, k), capability)
            where = f"a context without capability {capability.value!r}"
            if isinstance(stage, Scorer):
                self.expect_error("score()", functools.partial(stage.score, ctx), where)
            elif isinstance(stage, Selector):
                scores = self.make_scores(functools.partial(self.uniform, BATCH, n))
                self.expect_error("select()", functools.partial(stage.select, scores, ctx), where)
            elif isinstance(stage, Merger):
                selection = Selection(torch.arange(k).expand(BATCH, k).contiguous())
                self.expect_error("merge()", functools.partial(stage.merge, ctx, selection), where)
