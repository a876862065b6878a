"""Value types passed between pipeline stages.

All of them are frozen dataclasses holding tensors; none holds a reference to a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.errors import ShapeError

__all__ = ["PrunedTokens", "Selection", "TextTokens", "VisualTokens"]


@dataclass(frozen=True)
class VisualTokens:
    """The visual tokens of a batch of images, in the space where they are pruned.

    For LLaVA-style models these are the vision-tower features that the projector consumes
    (LLaVA-1.5: ``hidden_states[-2]`` without [CLS]).

    Attributes:
        features: Token features.
        grid: ``(height, width)`` of the patch grid when the tokens form one raster-ordered grid,
            else ``None``.

    Shape:
        - features: :math:`(B, N, D)`
    """

    features: torch.Tensor
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.features.ndim != 3:
            raise ShapeError(
                f"VisualTokens.features must be (B, N, D), got shape {tuple(self.features.shape)}"
            )
        if self.grid is not None and self.grid[0] * self.grid[1] != self.features.shape[1]:
            raise ShapeError(
                f"VisualTokens.grid {self.grid} has {self.grid[0] * self.grid[1]} cells but "
                f"features hold N={self.features.shape[1]} tokens"
            )

    @property
    def batch_size(self) -> int:
        """Number of images ``B``."""
        return int(self.features.shape[0])

    @property
    def num_tokens(self) -> int:
        """Number of tokens per image ``N``."""
        return int(self.features.shape[1])


@dataclass(frozen=True)
class TextTokens:
    """The prompt of each image: raw strings and/or language-model embeddings.

    Attributes:
        texts: The user's question per image (``tokenprune_query``), or ``None``.
        embeddings: Language-model input embeddings of the prompt's text tokens, or ``None``.
        mask: ``True`` for real (non-padding) rows of ``embeddings``; required with it.

    Shape:
        - embeddings: :math:`(B, T, D)`
        - mask: :math:`(B, T)`, bool
    """

    texts: tuple[str, ...] | None = None
    embeddings: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.embeddings is None) != (self.mask is None):
            raise ShapeError("TextTokens.embeddings and TextTokens.mask go together")
        if (
            self.mask is not None
            and self.embeddings is not None
            and (self.mask.dtype != torch.bool or self.embeddings.shape[:2] != self.mask.shape)
        ):
            raise ShapeError(
                f"TextTokens.mask must be a bool tensor of shape (B, T) = "
                f"{tuple(self.embeddings.shape[:2])}, got {self.mask.dtype} "
                f"{tuple(self.mask.shape)}"
            )
        if (
            self.texts is not None
            and self.embeddings is not None
            and len(self.texts) != self.embeddings.shape[0]
        ):
            raise ShapeError(
                f"TextTokens.texts has {len(self.texts)} strings for a batch of "
                f"{self.embeddings.shape[0]}"
            )


@dataclass(frozen=True)
class Selection:
    """Which tokens survive, per image.

    Attributes:
        keep_idx: Kept token indices, strictly increasing along the last dimension, so the kept
            tokens stay in their original (raster) order.

    Shape:
        - keep_idx: :math:`(B, K)`, ``torch.long``
    """

    keep_idx: torch.Tensor

    def __post_init__(self) -> None:
        idx = self.keep_idx
        if idx.ndim != 2 or idx.dtype != torch.long:
            raise ShapeError(
                f"Selection.keep_idx must be a (B, K) long tensor, got {idx.dtype} "
                f"{tuple(idx.shape)}"
            )
        if idx.shape[1] > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
            raise ShapeError(
                "Selection.keep_idx must be strictly increasing per row (sorted, no duplicates); "
                "use tokenprune.functional.sorted_keep_indices to build it"
            )

    @property
    def num_kept(self) -> int:
        """Number of kept tokens per image ``K``."""
        return int(self.keep_idx.shape[1])

    def mask(self, num_tokens: int) -> torch.Tensor:
        """Boolean keep mask over all ``num_tokens`` positions.

        Shape:
            - output: :math:`(B, N)`
        """
        out = torch.zeros(
            self.keep_idx.shape[0], num_tokens, dtype=torch.bool, device=self.keep_idx.device
        )
        return out.scatter_(1, self.keep_idx, True)


@dataclass(frozen=True)
class PrunedTokens:
    """The output of a pipeline: exactly ``K`` tokens per image.

    Attributes:
        features: The tokens handed on to the model (kept, possibly merged).
        keep_idx: Original index of each output token (the cluster centre for merged tokens).
        weights: How many original tokens (or how much weight) each output token stands for;
            all ones when nothing was merged.

    Shape:
        - features: :math:`(B, K, D)`
        - keep_idx: :math:`(B, K)`
        - weights: :math:`(B, K)`
    """

    features: torch.Tensor
    keep_idx: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        b, k = self.keep_idx.shape
        if self.features.ndim != 3 or tuple(self.features.shape[:2]) != (b, k):
            raise ShapeError(
                f"PrunedTokens.features must be (B, K, D) with (B, K) = {(b, k)}, got "
                f"{tuple(self.features.shape)}"
            )
        if tuple(self.weights.shape) != (b, k):
            raise ShapeError(
                f"PrunedTokens.weights must be (B, K) = {(b, k)}, got {tuple(self.weights.shape)}"
            )

    @property
    def num_kept(self) -> int:
        """Number of output tokens per image ``K``."""
        return int(self.keep_idx.shape[1])
