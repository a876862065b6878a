"""Pruning positions inside a Llama-style language model (FastV and multi-stage pipelines).

Model-independent machinery for adapters whose language model is a stack of Llama-style decoder
layers (``layers[i].self_attn`` with ``q_proj``/``k_proj``, ``head_dim``, ``scaling``; the
modeling module's public ``apply_rotary_pos_emb``; a ``DynamicCache``). Everything is done with
per-instance forward pre-hooks recorded in the installation's :class:`HookSet`:

- **session** (pre-hook and ``always_call`` forward hook on the multimodal model, the module that
  sees ``input_ids``): a call whose ``input_ids`` hold image placeholders on an empty cache starts
  a pruning *session* (the prefill); a call on a cache that a session filled is a decoding step of
  that session. The session lives in a context variable for the duration of the call, and is
  remembered per cache object (weakly) for the decoding steps.
- **capture** (pre-hook on ``layers[K-1].self_attn``): recomputes the query row of each row's last
  prompt token against all keys of that layer (rotary embedding, grouped-query heads, scale and
  the model's mask) and keeps the head-averaged attention; no ``output_attentions``, so it works
  under SDPA.
- **layer** (pre-hook on every decoder layer ``>= K``): at layer ``K`` of the prefill it runs the
  position's pipeline on each image's visual tokens and drops the others; every layer from ``K``
  on gets the shorter hidden states, rotary ``(cos, sin)``, position ids and 4-D mask (rows and
  columns gathered per batch row). Those layers write the shorter keys and values into their own
  layers of the cache; on decoding steps they drop the pruned key columns from the mask.

Only visual tokens are pruned: every text token stays, in order. Rows then hold different
numbers of tokens (more or fewer images, more or less padding); to keep one tensor per batch, the
padding is dropped where it is not needed, and rows shorter than the longest keep a few padding
positions, then dropped positions, as *fillers*: their key column is masked for every query but
their own, so they influence nothing, and their outputs (like those at padding) carry no meaning.
"""

from __future__ import annotations

import contextvars
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenprune import functional as F
from tokenprune.adapters._hooks import HookSet
from tokenprune.adapters._sequence import find_image_spans
from tokenprune.capabilities import LLM_POSITION
from tokenprune.context import PruneContext
from tokenprune.errors import AdapterError
from tokenprune.pipeline import LlmStage, Pipeline
from tokenprune.types import VisualTokens

__all__ = ["LlmPruning", "check_llm_stages"]

Rotary = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_SUPPORTED_ATTENTION = ("sdpa", "eager")


def _rotary_function(attention: nn.Module) -> Rotary:
    """The public ``apply_rotary_pos_emb`` of the module that defines ``attention``'s class."""
    module = sys.modules.get(type(attention).__module__)
    rotary = getattr(module, "apply_rotary_pos_emb", None)
    if not callable(rotary):
        raise AdapterError(
            f"{type(attention).__name__} comes from a modeling module without a public "
            "apply_rotary_pos_emb; pruning inside this language model is not supported"
        )
    fn: Rotary = rotary
    return fn


def check_llm_stages(language_model: nn.Module, pipeline: Pipeline) -> None:
    """Check that ``pipeline``'s LLM stages fit the language model (at install time).

    Raises:
        AdapterError: If a layer does not exist (``layer`` must be below the number of decoder
            layers), the attention implementation is not ``sdpa`` or ``eager``, or the decoder
            layers are not Llama-style.
    """
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise AdapterError(
            f"{type(language_model).__name__} has no `layers` list of decoder layers; pruning "
            "inside this language model is not supported"
        )
    for i, stage in enumerate(pipeline.llm):
        if not 1 <= stage.layer < len(layers):
            raise AdapterError(
                f"llm.{i}.layer={stage.layer} does not exist: the language model has "
                f"{len(layers)} decoder layers, so an LLM stage's layer must lie in "
                f"[1, {len(layers) - 1}] (tokens are dropped before that layer)"
            )
    config = getattr(language_model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _SUPPORTED_ATTENTION:
        raise AdapterError(
            f"pruning inside the language model supports attn_implementation 'sdpa' or 'eager', "
            f"got {implementation!r}; load the model with attn_implementation='sdpa'"
        )
    for stage in pipeline.llm:
        attention = getattr(layers[stage.layer - 1], "self_attn", None)
        needed = ("q_proj", "k_proj", "head_dim", "scaling")
        if attention is None or not all(hasattr(attention, a) for a in needed):
            raise AdapterError(
                f"decoder layer {stage.layer - 1} has no Llama-style self_attn (q_proj, k_proj, "
                "head_dim, scaling); pruning inside this language model is not supported"
            )
        _rotary_function(attention)


def _gather_rows(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Per batch row, take ``index`` along ``dim`` of ``x`` (batch first, broadcast if 1)."""
    b = index.shape[0]
    x = x.expand(b, *x.shape[1:])
    shape = [1] * x.ndim
    shape[0], shape[dim] = b, index.shape[1]
    view = index.view(shape)
    sizes = list(x.shape)
    sizes[dim] = index.shape[1]
    return x.gather(dim, view.expand(sizes))


@dataclass
class _Plan:
    """The sequence the decoder layers from one LLM stage on see during the prefill.

    Attributes:
        layer: First decoder layer that sees it.
        cols: Column of the unpruned prefill sequence of every kept position, ``(B, L_j)``.
        select: Index of every kept position in the previous plan's sequence, ``(B, L_j)``.
        filler: Dropped positions kept only to give every row the same length, ``(B, L_j)``.
    """

    layer: int
    cols: torch.Tensor
    select: torch.Tensor
    filler: torch.Tensor


@dataclass(eq=False)
class _Session:
    """One pruned prefill and the decoding steps that continue from its cache."""

    length: int
    cols: torch.Tensor  # (B, Lc) original column of each current position
    filler: torch.Tensor  # (B, Lc)
    pad: torch.Tensor  # (B, Lc) padding positions (attention_mask == 0)
    image_rows: torch.Tensor  # (B_img,)
    image_cols: torch.Tensor  # (B_img, N) current position of each remaining visual token
    last: torch.Tensor  # (B,) current position of each row's last prompt token
    phase: str = "prefill"
    past: int = 0
    query: int = 0
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    plans: list[_Plan] = field(default_factory=list)
    sliced: dict[int, tuple[tuple[int, ...], dict[str, Any]]] = field(default_factory=dict)


def _mask_value(mask: torch.Tensor) -> float:
    return float(torch.finfo(mask.dtype).min)


class LlmPruning:
    """The hooks that run a pipeline's LLM stages on one model instance.

    Args:
        pipeline: The installed pipeline (``pipeline.llm`` non-empty).
        owner: The module that receives ``input_ids`` and calls the language model (LLaVA's
            ``model.model``); a session starts in its forward pre-hook.
        language_model: The decoder stack (``layers``, ``config``).
        image_token_id: The image placeholder id in ``input_ids``.
        tokens_per_image: Visual tokens of each image as the language model receives them (after
            the encoder stage).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        owner: nn.Module,
        language_model: nn.Module,
        *,
        image_token_id: int,
        tokens_per_image: int,
    ) -> None:
        check_llm_stages(language_model, pipeline)
        self.stages: tuple[LlmStage, ...] = pipeline.llm
        self.owner = owner
        self.layers: Any = getattr(language_model, "layers")  # noqa: B009
        config: Any = language_model.config
        self.eager = config._attn_implementation == "eager"
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.current: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
            "tokenprune_llm_session", default=None
        )
        self.by_cache: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()

    # -- installation ------------------------------------------------------------------------
    def install(self, hooks: HookSet) -> None:
        """Register every hook in ``hooks`` (removed with the installation)."""
        hooks.add(
            "tokenprune.llm.session",
            self.owner.register_forward_pre_hook(self._begin, with_kwargs=True),
        )
        hooks.add(
            "tokenprune.llm.session_end",
            self.owner.register_forward_hook(self._end, always_call=True),
        )
        for j, stage in enumerate(self.stages):
            attention = self.layers[stage.layer - 1].self_attn
            hook = self._capture_hook(j, _rotary_function(attention))
            hooks.add(
                f"tokenprune.llm.capture[{stage.layer - 1}]",
                attention.register_forward_pre_hook(hook, with_kwargs=True),
            )
        first = self.stages[0].layer
        for index in range(first, len(self.layers)):
            j = max(i for i, s in enumerate(self.stages) if s.layer <= index)
            hooks.add(
                f"tokenprune.llm.layer[{index}]",
                self.layers[index].register_forward_pre_hook(
                    self._layer_hook(index, j), with_kwargs=True
                ),
            )

    # -- sessions ----------------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.current.set(None)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache in self.by_cache:
            session = self.by_cache[cache]
            length = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
            query = int(length.shape[1]) if isinstance(length, torch.Tensor) else 1
            if query != 1:
                raise AdapterError(
                    f"this cache was pruned inside the language model; it can only be continued "
                    f"one token at a time (generate's decoding steps), not with {query} new "
                    "tokens. Pass the whole conversation again without a cache"
                )
            session.phase, session.past, session.query = "decode", int(cache.get_seq_length()), 1
            self.current.set(session)
            return
        if not isinstance(input_ids, torch.Tensor) or not bool(
            (input_ids == self.image_token_id).any()
        ):
            return  # nothing visual in this call: no pruning inside the LLM
        if cache is not None:
            from transformers import DynamicCache  # lazy: adapters import transformers lazily

            if not isinstance(cache, DynamicCache):
                raise AdapterError(
                    f"pruning inside the language model needs a DynamicCache, got "
                    f"{type(cache).__name__}; use the default cache (cache_implementation="
                    "'dynamic')"
                )
            if int(cache.get_seq_length()):
                raise AdapterError(
                    "pruning inside the language model starts from an empty cache; this cache "
                    "already holds tokens. Pass the whole conversation without a cache"
                )
        self.current.set(self._new_session(input_ids, kwargs.get("attention_mask")))

    def _end(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        session = self.current.get()
        if session is not None:
            session.phase = "decode"
            session.sliced.clear()
            session.attention.clear()
        self.current.set(None)

    def _new_session(self, input_ids: torch.Tensor, attention_mask: Any) -> _Session:
        b, length = input_ids.shape
        device = input_ids.device
        mask = (
            attention_mask.bool()
            if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        placeholders = int((input_ids == self.image_token_id).sum())
        n = self.tokens_per_image
        if placeholders % n:
            raise AdapterError(
                f"input_ids hold {placeholders} image placeholders, not a multiple of the {n} "
                "tokens of one image; build prompts with the model's processor"
            )
        spans = find_image_spans(input_ids, self.image_token_id, [n] * (placeholders // n))
        rows = torch.tensor([s.row for s in spans], dtype=torch.long, device=device)
        starts = torch.tensor([s.start for s in spans], dtype=torch.long, device=device)
        image_cols = starts[:, None] + torch.arange(n, device=device)
        positions = torch.arange(length, device=device).expand(b, length)
        last = torch.where(mask, positions, -1).max(dim=1).values.clamp(min=0)
        if bool((input_ids.gather(1, last[:, None]) == self.image_token_id).any()):
            raise AdapterError(
                "pruning inside the language model needs text after the image: a prompt row "
                "ends with an image placeholder (its last prompt token would be pruned)"
            )
        return _Session(
            length=length,
            cols=positions.clone(),
            filler=torch.zeros(b, length, dtype=torch.bool, device=device),
            pad=~mask,
            image_rows=rows.reshape(-1),
            image_cols=image_cols.reshape(-1, n),
            last=last,
        )

    # -- capture -----------------------------------------------------------------------------
    def _capture_hook(
        self, j: int, rotary: Rotary
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            session = self.current.get()
            if session is None or session.phase != "prefill" or len(session.plans) != j:
                return
            hidden: torch.Tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                session.attention[j] = _last_token_attention(
                    module, rotary, hidden, cos, sin, kwargs.get("attention_mask"), session.last
                )

        return hook

    # -- layers ------------------------------------------------------------------------------
    def _layer_hook(
        self, index: int, j: int
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]:
        stage = self.stages[j]

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            session = self.current.get()
            if session is None:
                return None
            if session.phase == "decode":
                return args, {**kwargs, **self._decode_inputs(session, j, kwargs)}
            hidden = args[0] if args else kwargs.pop("hidden_states")
            args = args[1:]
            if index == stage.layer:
                if len(session.plans) != j:
                    raise AdapterError(f"LLM stage {j} ran twice in one forward pass")
                hidden = self._prune(session, j, hidden)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None:
                self.by_cache[cache] = session
            return (hidden, *args), {**kwargs, **self._prefill_inputs(session, j, kwargs)}

        return hook

    def _prune(self, session: _Session, j: int, hidden: torch.Tensor) -> torch.Tensor:
        stage = self.stages[j]
        attention = session.attention.pop(j, None)
        if attention is None:
            raise AdapterError(
                f"decoder layer {stage.layer - 1} did not run its attention before layer "
                f"{stage.layer}; cannot score the visual tokens"
            )
        rows, cols = session.image_rows, session.image_cols
        b, current = session.cols.shape
        pipeline = stage.pipeline
        ctx = PruneContext(
            visual=VisualTokens(hidden[rows[:, None], cols]),
            keep=pipeline.budget(cols.shape[1]),
            capabilities=LLM_POSITION,
            last_token_attention=attention[rows[:, None], cols],
            llm_layer=stage.layer,
        )
        pruned = pipeline(ctx)
        kept = cols.gather(1, pruned.keep_idx)
        visual = torch.zeros(b, current, dtype=torch.bool, device=hidden.device)
        visual[rows[:, None], cols] = True
        keep = ~visual & ~session.filler & ~session.pad
        keep[rows[:, None], kept] = True
        counts = keep.sum(dim=1)
        length = int(counts.max())
        need = length - counts
        # Shorter rows are filled up to the batch length with padding first, then dropped tokens.
        pads = ~keep & session.pad
        filler = pads & (pads.long().cumsum(dim=1) <= need[:, None])
        others = ~keep & ~session.pad
        need = need - filler.sum(dim=1)
        filler |= others & (others.long().cumsum(dim=1) <= need[:, None])
        chosen = keep | filler
        select = torch.nonzero(chosen)[:, 1].view(b, length)
        inverse = torch.full((b, current), -1, dtype=torch.long, device=hidden.device)
        inverse.scatter_(1, select, torch.arange(length, device=hidden.device).expand(b, length))
        plan = _Plan(
            layer=stage.layer,
            cols=session.cols.gather(1, select),
            select=select,
            filler=filler.gather(1, select),
        )
        session.plans.append(plan)
        session.cols, session.filler = plan.cols, plan.filler
        session.pad = session.pad.gather(1, select)
        session.image_cols = inverse[rows[:, None], kept]
        session.last = inverse.gather(1, session.last[:, None]).squeeze(1)
        out = _gather_rows(hidden, select, 1).clone()
        out[rows[:, None], session.image_cols] = pruned.features.to(out.dtype)
        return out

    def _prefill_inputs(self, session: _Session, j: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        plan = session.plans[j]
        mask = kwargs.get("attention_mask")
        cos_sin = kwargs.get("position_embeddings")
        position_ids = kwargs.get("position_ids")
        key = (id(mask), id(cos_sin), id(position_ids))
        cached = session.sliced.get(j)
        if cached is not None and cached[0] == key:
            return cached[1]
        out: dict[str, Any] = {}
        if isinstance(cos_sin, tuple):
            out["position_embeddings"] = tuple(_gather_rows(t, plan.cols, 1) for t in cos_sin)
        if isinstance(position_ids, torch.Tensor):
            out["position_ids"] = _gather_rows(position_ids, plan.cols, position_ids.ndim - 1)
        out["attention_mask"] = self._prefill_mask(mask, plan)
        session.sliced[j] = (key, out)
        return out

    def _prefill_mask(self, mask: Any, plan: _Plan) -> Any:
        length = plan.cols.shape[1]
        device = plan.cols.device
        diagonal = torch.eye(length, dtype=torch.bool, device=device)
        hidden_keys = plan.filler[:, None, None, :] & ~diagonal
        if mask is None:
            if not bool(plan.filler.any()):
                return None  # no padding, no fillers: causal attention over the kept tokens
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            return self._as_mask(causal & ~hidden_keys, plan.cols)
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
            raise AdapterError(
                f"expected a 4-D attention mask in the decoder layers, got {type(mask).__name__}"
            )
        rows = _gather_rows(mask, plan.cols, 2)
        both = _gather_rows(rows.transpose(2, 3), plan.cols, 2).transpose(2, 3)
        if mask.dtype == torch.bool:
            return both & ~hidden_keys
        return both.masked_fill(hidden_keys, _mask_value(mask))

    def _decode_inputs(self, session: _Session, j: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        plan = session.plans[j]
        mask = kwargs.get("attention_mask")
        b = plan.cols.shape[0]
        device = plan.cols.device
        extra = session.past + session.query - session.length
        later = torch.arange(session.length, session.length + extra, device=device)
        cols = torch.cat([plan.cols, later.expand(b, extra)], dim=1)
        hidden = torch.cat(
            [plan.filler, torch.zeros(b, extra, dtype=torch.bool, device=device)], dim=1
        )[:, None, None, :]
        if mask is None:
            if not bool(plan.filler.any()):
                return {}
            width = cols.shape[1]
            start = width - session.query
            causal = torch.arange(width, device=device)[None, :] <= (
                start + torch.arange(session.query, device=device)[:, None]
            )
            return {"attention_mask": self._as_mask(causal & ~hidden, cols)}
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
            raise AdapterError(
                f"expected a 4-D attention mask in the decoder layers, got {type(mask).__name__}"
            )
        picked = _gather_rows(mask.transpose(2, 3), cols, 2).transpose(2, 3)
        if mask.dtype == torch.bool:
            return {"attention_mask": picked & ~hidden}
        return {"attention_mask": picked.masked_fill(hidden, _mask_value(mask))}

    def _as_mask(self, allowed: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """A mask in the format of the model's attention implementation (bool or additive)."""
        allowed = allowed.expand(cols.shape[0], 1, *allowed.shape[-2:])
        if not self.eager:
            return allowed
        dtype = self.layers[0].self_attn.q_proj.weight.dtype
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, float(torch.finfo(dtype).min))


def _last_token_attention(
    attention: nn.Module,
    rotary: Rotary,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: Any,
    last: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged attention of each row's ``last`` token over all positions of one layer.

    Shape:
        - hidden: :math:`(B, T, C)` (after the layer's input norm)
        - cos, sin: :math:`(B, T, d)` or :math:`(1, T, d)`
        - output: :math:`(B, T)`
    """
    module: Any = attention
    b, t, _ = hidden.shape
    head_dim = int(module.head_dim)
    batch = torch.arange(b, device=hidden.device)
    query = module.q_proj(hidden[batch, last]).view(b, -1, 1, head_dim)
    keys = module.k_proj(hidden).view(b, t, -1, head_dim).transpose(1, 2)
    cos, sin = cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:])
    query, _ = rotary(query, query, cos[batch, last][:, None], sin[batch, last][:, None])
    keys, _ = rotary(keys, keys, cos, sin)
    if isinstance(mask, torch.Tensor) and mask.ndim == 4:
        full = mask.expand(b, *mask.shape[1:])
        row: torch.Tensor = full[batch, 0, last]
    else:
        row = torch.arange(t, device=hidden.device)[None, :] <= last[:, None]
    return F.query_row_attention(query[:, :, 0], keys, row, scaling=float(module.scaling))
