"""Overlays of kept and merged visual tokens on an image (numpy and Pillow only).

Every function takes the image, the patch ``grid`` ``(rows, cols)`` of the visual tokens (raster
order) and the kept token indices; none touches a model. Kept patches are shown at full
brightness with an outline, dropped patches dimmed; with an ``assignment`` (the kept token each
token is merged into) dropped patches are tinted with their cluster's colour instead.

Examples:
    >>> image = np.full((32, 32, 3), 200, np.uint8)
    >>> keep_mask((4, 4), [0, 5]).astype(int)[:2]
    array([[1, 0, 0, 0],
           [0, 1, 0, 0]])
    >>> overlay_selection(image, (4, 4), [0, 5], scale=2).shape
    (64, 64, 3)
    >>> panel_grid_size((32, 32), 3, scale=2)
    (204, 84)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "GAP",
    "KEPT_COLOUR",
    "TITLE_HEIGHT",
    "Panel",
    "cell_index_map",
    "keep_mask",
    "overlay_selection",
    "panel_grid_size",
    "render_panels",
    "save_panels",
]

KEPT_COLOUR = (255, 215, 0)
"""Outline colour of kept patches."""
TITLE_HEIGHT = 20
"""Height in pixels of the title strip above each panel."""
GAP = 6
"""Pixels between panels."""

# A fixed qualitative palette (matplotlib's tab20), so cluster colours are reproducible.
_PALETTE = np.array(
    [
        (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
        (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
        (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (127, 127, 127),
        (199, 199, 199), (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
    ],
    dtype=np.float64,
)  # fmt: skip


@dataclass(frozen=True)
class Panel:
    """One panel of a grid: a title and a selection (``keep_idx=None``: the plain image).

    Attributes:
        title: Text above the panel.
        keep_idx: Kept token indices (raster order), or ``None`` for the unmodified image.
        assignment: Original index of the kept token each token is merged into, or ``None``.
    """

    title: str
    keep_idx: Sequence[int] | np.ndarray | None = None
    assignment: Sequence[int] | np.ndarray | None = None


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    rows, cols = int(grid[0]), int(grid[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be (rows, cols) >= 1, got {grid}")
    return rows, cols


def keep_mask(grid: tuple[int, int], keep_idx: Sequence[int] | np.ndarray) -> np.ndarray:
    """Boolean ``(rows, cols)`` mask of the kept tokens.

    Raises:
        ValueError: If an index is outside the grid.
    """
    rows, cols = _check_grid(grid)
    idx = np.asarray(keep_idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= rows * cols):
        raise ValueError(f"keep_idx has indices outside the {rows}x{cols} grid")
    mask = np.zeros(rows * cols, dtype=bool)
    mask[idx] = True
    return mask.reshape(rows, cols)


def cell_index_map(grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Token index of every pixel of an image of ``size`` ``(H, W)`` split into ``grid``.

    Cells are as even as integer pixels allow (nearest-neighbour upsampling of the grid).
    """
    rows, cols = _check_grid(grid)
    h, w = size
    r = (np.arange(h) * rows) // h
    c = (np.arange(w) * cols) // w
    return np.asarray(r[:, None] * cols + c[None, :], dtype=np.int64)


def _upscale(image: np.ndarray, scale: int) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def overlay_selection(
    image: np.ndarray,
    grid: tuple[int, int],
    keep_idx: Sequence[int] | np.ndarray,
    *,
    assignment: Sequence[int] | np.ndarray | None = None,
    scale: int = 1,
    dim: float = 0.3,
    tint: float = 0.55,
    outline: tuple[int, int, int] = KEPT_COLOUR,
) -> np.ndarray:
    """Draw a token selection on an image.

    Args:
        image: ``uint8`` RGB image ``(H, W, 3)``; the grid covers it entirely.
        grid: ``(rows, cols)`` of the visual tokens, raster order.
        keep_idx: Kept token indices.
        assignment: For every token, the original index of the kept token it is merged into
            (length ``rows * cols``); dropped patches are then tinted with that cluster's colour.
        scale: Integer upscaling before drawing (nearest neighbour), so outlines stay thin.
        dim: Brightness of dropped patches (without ``assignment``).
        tint: Strength of the cluster colour on dropped patches (with ``assignment``).
        outline: Colour of the outline drawn around kept regions.

    Returns:
        ``uint8`` image ``(H * scale, W * scale, 3)``.
    """
    rows, cols = _check_grid(grid)
    big = _upscale(image, scale).astype(np.float64)
    h, w = big.shape[:2]
    cells = cell_index_map((rows, cols), (h, w))
    kept_cells = keep_mask((rows, cols), keep_idx).reshape(-1)
    kept = kept_cells[cells]
    if assignment is None:
        big[~kept] *= dim
    else:
        owner = np.asarray(assignment, dtype=np.int64).reshape(-1)
        if owner.size != rows * cols:
            raise ValueError(f"assignment has {owner.size} entries for {rows * cols} tokens")
        order = {int(k): i for i, k in enumerate(np.flatnonzero(kept_cells))}
        try:
            cluster = np.array([order[int(o)] for o in owner])
        except KeyError as exc:
            raise ValueError(f"assignment points at token {exc}, which is not kept") from None
        colours = _PALETTE[cluster[cells] % len(_PALETTE)]
        big[~kept] = (1 - tint) * big[~kept] * 0.6 + tint * colours[~kept]
    # Outline: kept pixels whose right/left/up/down neighbour is dropped (or the border).
    padded = np.pad(kept, 1, constant_values=False)
    edge = kept & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    big[edge] = outline
    return np.asarray(np.clip(big, 0, 255).round(), dtype=np.uint8)


def panel_grid_size(
    image_size: tuple[int, int], num_panels: int, *, scale: int = 4
) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`render_panels`'s output.

    Args:
        image_size: ``(H, W)`` of the image.
        num_panels: Number of panels (the plain image counts as one).
        scale: Upscaling factor.
    """
    h, w = image_size
    return (num_panels * w * scale + (num_panels - 1) * GAP, h * scale + TITLE_HEIGHT)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def render_panels(
    image: np.ndarray,
    grid: tuple[int, int],
    panels: Sequence[Panel],
    *,
    scale: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Draw panels side by side: each a title strip above the image with its selection.

    Args:
        image: ``uint8`` RGB image ``(H, W, 3)``.
        grid: ``(rows, cols)`` of the visual tokens.
        panels: The panels, left to right (``Panel("image")`` shows the plain image).
        scale: Integer upscaling of the image.
        background: Colour of the title strips and gaps.

    Returns:
        A Pillow RGB image of size :func:`panel_grid_size`.
    """
    if not panels:
        raise ValueError("give at least one panel")
    h, w = image.shape[:2]
    width, height = panel_grid_size((h, w), len(panels), scale=scale)
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i, panel in enumerate(panels):
        if panel.keep_idx is None:
            pixels = _upscale(image, scale)
        else:
            pixels = overlay_selection(
                image, grid, panel.keep_idx, assignment=panel.assignment, scale=scale
            )
        x = i * (w * scale + GAP)
        canvas.paste(Image.fromarray(pixels), (x, TITLE_HEIGHT))
        draw.text((x + 2, 3), panel.title, fill=(0, 0, 0), font=font)
    return canvas


def save_panels(
    path: str | Path,
    image: np.ndarray,
    grid: tuple[int, int],
    panels: Sequence[Panel],
    *,
    scale: int = 4,
) -> Path:
    """:func:`render_panels` written to a PNG file (parent directories created).

    Returns:
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_panels(image, grid, panels, scale=scale).save(out, format="PNG")
    return out
