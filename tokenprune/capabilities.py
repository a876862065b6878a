"""What a model adapter can provide to pipeline stages."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ENCODER_ONLY", "LLM_POSITION", "Capability"]


class Capability(StrEnum):
    """A piece of model information a stage may require.

    Stages list the capabilities they need in ``requires``; a model adapter lists the ones it
    provides in ``capabilities``. :meth:`tokenprune.Pipeline.check_compatible` compares the two
    when the pipeline is applied, so a missing capability fails before any forward pass.
    """

    VISION_BLOCK = "vision_block"
    """Input hidden state of a chosen vision block with its LayerNorm and q/k/v/out projections."""

    CLS_ATTENTION = "cls_attention"
    """Head-averaged [CLS]-to-patch attention of a chosen vision block (towers with a [CLS])."""

    RECEIVED_ATTENTION = "received_attention"
    """Head-averaged attention each token receives, averaged over queries (towers without [CLS])."""

    TEXT_EMBEDDINGS = "text_embeddings"
    """Language-model input embeddings of the prompt's text tokens."""

    TEXT_QUERY = "text_query"
    """The raw text of the user's question, passed per call as ``tokenprune_query``."""

    PROJECTOR = "projector"
    """The model's projector, mapping pruning-space features into the language model's space."""

    LLM_ATTENTION = "llm_attention"
    """In-LLM token dropping: pruning positions after a chosen decoder layer, where stages get the
    head-averaged attention the last prompt token pays to each visual token in the layer before."""


ENCODER_ONLY: frozenset[Capability] = frozenset(
    {
        Capability.VISION_BLOCK,
        Capability.CLS_ATTENTION,
        Capability.RECEIVED_ATTENTION,
        Capability.PROJECTOR,
    }
)
"""Capabilities that exist only at the encoder position (they describe the vision tower)."""

LLM_POSITION: frozenset[Capability] = frozenset({Capability.LLM_ATTENTION})
"""Everything a stage can get at a pruning position inside the language model."""
