r"""Spatial average pooling: the plain down-sampling baseline.

The ``h x w`` patch grid is cut into an ``h' x w'`` grid of non-overlapping windows with
``h' w' = K``, and every window is replaced by the mean of its tokens. Benchmarks report that
this simple baseline is hard to beat (VTC-Bench), so every method should be compared with it.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from tokenprune.errors import BudgetError, ShapeError
from tokenprune.functional.assign import check_keep_indices

__all__ = ["pool_shape", "pool_windows", "spatial_nearest_assignment"]


def pool_shape(grid: tuple[int, int], keep: int) -> tuple[int, int]:
    r"""The output grid ``(h', w')`` with ``h' * w' == keep`` for an ``(h, w)`` patch grid.

    Among the factor pairs of ``keep`` that fit (:math:`h' \le h`, :math:`w' \le w`), the
    choice is, in order: the aspect ratio closest to the grid's (smallest
    :math:`\max(\rho, 1/\rho)` with :math:`\rho = h' w / (w' h)`), then windows that divide the
    grid evenly, then the larger ``h'``. So a square ``K`` whose side divides a square grid
    gives plain ``s x s`` pooling with stride ``s`` (576 tokens, ``K`` = 64: 3x3 windows), and
    any other ``K`` the nearest-shaped adaptive grid.

    Args:
        grid: Patch grid ``(h, w)``.
        keep: Tokens per image ``K``.

    Raises:
        BudgetError: If no factor pair of ``keep`` fits the grid (``keep`` prime and larger
            than both sides, for instance).

    Examples:
        >>> pool_shape((24, 24), 64), pool_shape((24, 24), 144), pool_shape((24, 24), 32)
        ((8, 8), (12, 12), (8, 4))
    """
    h, w = grid
    if h < 1 or w < 1:
        raise BudgetError(f"grid must have positive sides, got {grid}")
    if not 1 <= keep <= h * w:
        raise BudgetError(f"keep={keep} is out of range for a {h}x{w} grid")
    best: tuple[tuple[Fraction, bool, int], tuple[int, int]] | None = None
    for rows in range(1, keep + 1):
        if keep % rows:
            continue
        cols = keep // rows
        if rows > h or cols > w:
            continue
        ratio = Fraction(rows * w, cols * h)
        key = (max(ratio, 1 / ratio), bool(h % rows or w % cols), -rows)
        if best is None or key < best[0]:
            best = (key, (rows, cols))
    if best is None:
        raise BudgetError(
            f"cannot pool a {h}x{w} grid to exactly keep={keep} tokens: no h' x w' = {keep} "
            f"with h' <= {h} and w' <= {w}; choose another budget"
        )
    return best[1]


def _bins(size: int, parts: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin of every cell along one axis, and the centre cell of every bin."""
    cells = torch.arange(size, device=device)
    bins = torch.div(cells * parts, size, rounding_mode="floor")
    start = torch.div(
        torch.arange(parts, device=device) * size + parts - 1, parts, rounding_mode="floor"
    )  # ceil(i * size / parts)
    end = torch.cat([start[1:], torch.tensor([size], device=device)])
    return bins, start + torch.div(end - start - 1, 2, rounding_mode="floor")


def pool_windows(
    grid: tuple[int, int], keep: int, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The pooling windows of an ``(h, w)`` grid pooled to ``keep`` tokens.

    With ``(h', w') = pool_shape(grid, keep)``, row :math:`r` falls in window row
    :math:`\lfloor r h' / h \rfloor` and column :math:`c` in window column
    :math:`\lfloor c w' / w \rfloor`: non-overlapping windows whose sizes differ by at most one
    cell (unlike ``adaptive_avg_pool2d``, whose windows may overlap), so every token belongs to
    exactly one window. A window is represented by its central cell (the upper-left of the
    central four for even sizes).

    Returns:
        ``(keep_idx, assignment)``: the representatives' raster indices, increasing, and the
        window (raster order) of every token.

    Raises:
        BudgetError: As :func:`pool_shape`.

    Shape:
        - output: :math:`(K,)` and :math:`(h w,)`, long

    Examples:
        >>> keep_idx, window = pool_windows((4, 4), 4)
        >>> keep_idx.tolist(), window.view(4, 4).tolist()
        ([0, 2, 8, 10], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    """
    rows, cols = pool_shape(grid, keep)
    h, w = grid
    dev = torch.device(device) if device is not None else None
    row_bin, row_centre = _bins(h, rows, dev)
    col_bin, col_centre = _bins(w, cols, dev)
    assignment = (row_bin.unsqueeze(1) * cols + col_bin.unsqueeze(0)).flatten()
    keep_idx = (row_centre.unsqueeze(1) * w + col_centre.unsqueeze(0)).flatten()
    return keep_idx, assignment


def spatial_nearest_assignment(grid: tuple[int, int], keep_idx: torch.Tensor) -> torch.Tensor:
    r"""Assign every cell of the grid to the spatially nearest kept token.

    Distance is Euclidean on (row, column) cells; ties go to the kept token with the lower
    index; kept tokens are their own nearest.

    Args:
        grid: Patch grid ``(h, w)``.
        keep_idx: Kept raster indices, strictly increasing per row.

    Returns:
        The position in ``keep_idx`` of each cell's nearest kept token.

    Raises:
        ShapeError: If ``keep_idx`` is invalid for the grid.

    Shape:
        - keep_idx: :math:`(B, K)`
        - output: :math:`(B, h w)`, long

    Examples:
        >>> spatial_nearest_assignment((1, 5), torch.tensor([[0, 3]])).tolist()
        [[0, 0, 1, 1, 1]]
    """
    h, w = grid
    if keep_idx.ndim != 2:
        raise ShapeError(f"keep_idx must be (B, K), got {tuple(keep_idx.shape)}")
    check_keep_indices(keep_idx, batch=keep_idx.shape[0], num_tokens=h * w)
    cells = torch.arange(h * w, device=keep_idx.device)
    r, c = cells // w, cells % w  # (N,)
    kr, kc = keep_idx // w, keep_idx % w  # (B, K)
    dist = (r.view(1, -1, 1) - kr.unsqueeze(1)) ** 2 + (c.view(1, -1, 1) - kc.unsqueeze(1)) ** 2
    return dist.argmin(dim=-1)
