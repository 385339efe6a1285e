"""Resampling an array from one voxel grid onto another, through world space.

Used to bring per-voxel outputs computed on the **preprocessed** grid (reoriented, resampled to the model's
spacing) back onto the **source** grid of the scan as loaded from disk, so overlays line up voxel for voxel
with the original images (:mod:`medrpn.overlays.nifti`).

Both grids are described by MONAI's RAS voxel-to-world affines (voxel centres at integer indices, see
:mod:`medrpn.geometry`). Target voxel ``b`` takes the value of the source array at the continuous index
``inv(affine_a) @ affine_b @ b``. A grid covers the **voxel-edge extent** ``[-0.5, n - 0.5]`` of every axis:
target voxels whose centre falls inside that extent of grid A get a value (between the outermost voxel centres
and the edge, the edge voxel's value), all others get ``fill``.

Implementation: when every axis of grid B runs along one axis of grid A (flips, permutations, any spacing and
offset: the usual source grid vs. its RAS-reoriented, resampled copy) the interpolation is separable and done
axis by axis with ``index_select`` (a 512 x 512 x 300 target takes a few seconds). Otherwise (oblique) it falls
back to ``torch.nn.functional.grid_sample`` (``align_corners=False``, border padding, then the outside is
masked), evaluated in chunks of target slices so that the sampling grid never needs more than a few tens of MB.
Both paths give the same values (linear: the multilinear interpolation of the ``2**D`` neighbours; nearest: the
closest voxel, ties rounded to even).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from medrpn.geometry import affine_for_dims

__all__ = ["resample_to_grid"]

ResampleMode = Literal["linear", "nearest"]

_CHUNK_VOXELS = 1 << 21
"""Target voxels sampled per ``grid_sample`` call (about 2M: a 24 MB float32 sampling grid in 3D)."""

_EDGE_TOL = 1e-6
"""Tolerance (in voxels of grid A) on the voxel-edge extent test."""


def resample_to_grid(
    array: np.ndarray,
    affine_a: np.ndarray | torch.Tensor,
    affine_b: np.ndarray | torch.Tensor,
    shape_b: tuple[int, ...] | list[int],
    mode: ResampleMode = "linear",
    *,
    fill: float = 0.0,
    _force_general: bool = False,
) -> np.ndarray:
    """Resample ``array`` (on grid A) onto grid B.

    Args:
        array: ``(X, Y)`` or ``(X, Y, Z)`` values on grid A.
        affine_a: RAS voxel-to-world affine of grid A, ``(D+1, D+1)`` (a 2D array also accepts MONAI's
            ``(4, 4)`` affine; its in-plane block is used).
        affine_b: RAS voxel-to-world affine of grid B, same conventions.
        shape_b: ``D`` sizes of grid B.
        mode: ``"linear"`` (bilinear/trilinear) or ``"nearest"`` (labels).
        fill: value of grid-B voxels whose centre lies outside grid A's voxel-edge extent.
        _force_general: always use the ``grid_sample`` path (for tests).

    Returns:
        ``shape_b`` array: float32 for ``"linear"`` (float64 if ``array`` is float64), ``array.dtype`` for
        ``"nearest"``.

    Raises:
        ValueError: on a dimension mismatch, an unknown mode or a singular affine.
    """
    src = np.asarray(array)
    d = src.ndim
    shape_out = tuple(int(s) for s in shape_b)
    if d not in (2, 3):
        raise ValueError(f"expected a 2D or 3D array, got shape {src.shape}")
    if len(shape_out) != d:
        raise ValueError(f"shape_b {list(shape_out)} does not match the {d}D array")
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    a = affine_for_dims(torch.as_tensor(np.asarray(affine_a, dtype=np.float64)), d)
    b = affine_for_dims(torch.as_tensor(np.asarray(affine_b, dtype=np.float64)), d)
    if abs(float(torch.linalg.det(a))) < 1e-12:
        raise ValueError("affine_a is singular")
    # continuous grid-A index of grid-B voxel index: idx_a = m @ idx_b + t
    b_to_a = torch.linalg.inv(a) @ b
    m, t = b_to_a[:d, :d], b_to_a[:d, d]

    if np.issubdtype(src.dtype, np.floating):
        work_dtype = torch.float64 if src.dtype == np.float64 else torch.float32
    else:
        work_dtype = torch.float64  # integers (labels) stay exact
    out_dtype = src.dtype if mode == "nearest" else (np.float64 if work_dtype == torch.float64 else np.float32)
    if min(shape_out) == 0 or src.size == 0:
        return np.full(shape_out, fill, dtype=out_dtype)

    inp = torch.from_numpy(np.ascontiguousarray(src)).to(work_dtype)
    perm = _axis_permutation(m)
    if perm is not None and not _force_general:
        values, masks = _resample_separable(inp, m, t, perm, shape_out, mode)
        result = np.ascontiguousarray(values.numpy()).astype(out_dtype, copy=False)
        for axis, inside in enumerate(masks):
            index: list[slice | np.ndarray] = [slice(None)] * d
            index[axis] = ~inside.numpy()
            result[tuple(index)] = fill
        return result

    out = np.full(shape_out, fill, dtype=out_dtype)

    # grid_sample: input (1, 1, *A) ; the last grid component indexes the LAST input axis
    inp = inp[None, None]
    size_a = torch.tensor(src.shape, dtype=torch.float64)
    sample_mode = "bilinear" if mode == "linear" else "nearest"
    per_slice = int(np.prod(shape_out[:-1]))
    chunk = max(1, _CHUNK_VOXELS // max(per_slice, 1))
    # per-axis contributions of the grid-B indices (broadcast instead of a full index array)
    axes = [torch.arange(n, dtype=torch.float64) for n in shape_out]
    for k0 in range(0, shape_out[-1], chunk):
        k1 = min(shape_out[-1], k0 + chunk)
        sub = [*axes[:-1], axes[-1][k0:k1]]
        coords = t.clone().reshape(*([1] * d), d).expand(*[len(s) for s in sub], d).clone()
        for axis, values in enumerate(sub):
            view = [1] * d
            view[axis] = len(values)
            coords += values.reshape(*view, 1) * m[:, axis]
        inside = ((coords >= -0.5 - _EDGE_TOL) & (coords <= size_a - 0.5 + _EDGE_TOL)).all(dim=-1)
        if not bool(inside.any()):
            continue
        norm = (2.0 * coords + 1.0) / size_a - 1.0  # align_corners=False: -1/+1 are the outer voxel edges
        grid = norm.flip(-1).to(work_dtype)[None]
        sampled = F.grid_sample(inp, grid, mode=sample_mode, padding_mode="border", align_corners=False)[0, 0]
        sampled_np = sampled.numpy()
        block = out[..., k0:k1]
        mask = inside.numpy()
        block[mask] = sampled_np[mask].astype(out_dtype, copy=False)
    return out


def _axis_permutation(m: torch.Tensor, tol: float = 1e-9) -> list[int] | None:
    """For an axis-aligned index map ``m`` (one non-zero per row and column), ``perm[b]`` = the A axis of B axis b."""
    d = m.shape[0]
    big = m.abs() > tol * float(m.abs().max())
    if not bool((big.sum(dim=0) == 1).all()) or not bool((big.sum(dim=1) == 1).all()):
        return None
    return [int(torch.nonzero(big[:, b])[0, 0]) for b in range(d)]


def _resample_separable(
    inp: torch.Tensor, m: torch.Tensor, t: torch.Tensor, perm: list[int], shape_out: tuple[int, ...], mode: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Axis-by-axis resampling for an axis-aligned map; returns the values and, per B axis, the inside mask."""
    x = inp.permute(*perm)  # axis b of x is A axis perm[b]
    masks = []
    for b, n_b in enumerate(shape_out):
        a_axis = perm[b]
        n_a = int(inp.shape[a_axis])
        coords = torch.arange(n_b, dtype=torch.float64) * m[a_axis, b] + t[a_axis]
        masks.append((coords >= -0.5 - _EDGE_TOL) & (coords <= n_a - 0.5 + _EDGE_TOL))
        c = coords.clamp(0.0, n_a - 1.0)
        view = [1] * len(shape_out)
        view[b] = n_b
        if mode == "nearest":
            x = x.index_select(b, torch.round(c).long())
            continue
        lo = torch.floor(c).long().clamp(0, n_a - 1)
        hi = (lo + 1).clamp(max=n_a - 1)
        w = (c - lo.to(torch.float64)).to(x.dtype).reshape(view)
        x_lo = x.index_select(b, lo)
        x_hi = x.index_select(b, hi)
        x_hi -= x_lo
        x_hi *= w
        x_lo += x_hi
        x = x_lo
        del x_hi
    return x, masks
