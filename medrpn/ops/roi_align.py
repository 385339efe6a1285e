"""Pure-PyTorch N-dimensional RoIAlign (2D and 3D through one code path).

Why our own implementation: torchvision is not a dependency of medrpn (and its ``roi_align`` is 2D only), and MONAI
has no RoIAlign operator. This module reproduces the semantics of torchvision / detectron2 ``ROIAlign`` generalised
to ``D`` spatial dimensions, using only differentiable-by-construction PyTorch primitives (``index_select`` /
``index_add_``), so it runs unchanged on CPU and CUDA without a compiled extension.

Conventions (see the package docs): tensors are channel-first, ``(B, C, X, Y)`` in 2D and ``(B, C, X, Y, Z)`` in 3D;
box coordinate ``d`` refers to spatial dim ``d`` (tensor dim ``2 + d``); boxes are MONAI ``StandardMode``
(``[x0, y0, x1, y1]`` / ``[x0, y0, z0, x1, y1, z1]``) in continuous image voxel coordinates with the voxel-edge
convention (voxel ``i`` spans ``[i, i + 1)``).

Algorithm. Per axis, the sample coordinates of a RoI form a regular 1D grid (``output_size[d]`` bins times ``g_d``
samples), and multilinear interpolation with torchvision's border rule is a product of independent 1D rules. The
whole operator is therefore *separable*: for every RoI, output bin and axis we compute a short list of
``(feature index, weight)`` pairs (the two interpolation corners of every sample point, already divided by ``g_d``
and zeroed for out-of-range samples; pairs hitting the same cell are merged into a dense window when that is
shorter). The output is the sum over the Cartesian product of those per-axis lists of ``prod_d weight_d *
features[b, :, idx_0, ..., idx_{D-1}]``. We evaluate it with row gathers on a channel-last copy of the features,
accumulating over blocks of the product so that at most ``_MAX_BLOCK_ELEMS`` gathered values exist at any time
(never the full ``K x C x bins x samples`` tensor). Gradients w.r.t. ``features`` are the adjoint (``index_add_``
of the same pairs), implemented as a custom autograd function whose own backward is the forward operator again, so
the op is differentiable any number of times. No gradient flows to ``rois`` (as in torchvision).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["roi_align"]

# Upper bound on the number of gathered feature values held at once (per block of RoIs x interpolation terms).
_MAX_BLOCK_ELEMS = 1 << 24


def _as_tuple(value: int | float | Sequence[int] | Sequence[float], dims: int, name: str) -> tuple[Any, ...]:
    if isinstance(value, (int, float)):
        return (value,) * dims
    out = tuple(value)
    if len(out) != dims:
        raise ValueError(f"{name} must be a scalar or have {dims} entries (one per spatial dim), got {out}.")
    return out


@dataclass
class _Group:
    """RoIs sharing the same number of sample points per axis, with their per-axis interpolation terms.

    Attributes:
        roi_index: ``(Kg,)`` positions of these RoIs in the ``K`` input RoIs, or ``None`` for "all, in order".
        batch: ``(Kg,)`` int64 batch index of each RoI.
        idx: per axis ``d``, ``(Kg, output_size[d], J_d)`` int64 feature indices along spatial dim ``d``.
        weight: per axis ``d``, ``(Kg, output_size[d], J_d)`` weights (feature dtype); they include ``1 / g_d``.
    """

    roi_index: Tensor | None
    batch: Tensor
    idx: list[Tensor]
    weight: list[Tensor]


def _axis_terms(
    start: Tensor, bin_size: Tensor, out: int, grid: int, size: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Interpolation terms along one axis.

    Args:
        start: ``(Kg,)`` RoI start in (aligned) feature coordinates, float64.
        bin_size: ``(Kg,)`` bin size in feature cells, float64.
        out: number of output bins along this axis.
        grid: number of sample points per bin along this axis (``>= 1``).
        size: feature-map size along this axis.
        dtype: dtype of the returned weights.

    Returns:
        ``(idx, weight)``, both ``(Kg, out, J)``: int64 indices in ``[0, size)`` and weights (already divided by
        ``grid``, zero for out-of-range samples), where ``J <= 2 * grid``.
    """
    device = start.device
    p = torch.arange(out, device=device, dtype=start.dtype).view(1, out, 1)
    i = torch.arange(grid, device=device, dtype=start.dtype).view(1, 1, grid) + 0.5
    b = bin_size.view(-1, 1, 1)
    # Same evaluation order as torchvision: start + p * bin + (i + .5) * bin / grid.
    coord = start.view(-1, 1, 1) + p * b + i * b / grid  # (Kg, out, grid)

    valid = (coord >= -1.0) & (coord <= size)
    c = coord.clamp(min=0.0)
    low = c.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(c), c - low.to(c.dtype))
    scale = valid.to(c.dtype) / grid
    idx = torch.stack((low, high), dim=-1).flatten(-2)  # (Kg, out, 2 * grid)
    weight = torch.stack(((1.0 - frac) * scale, frac * scale), dim=-1).flatten(-2)

    # Merge terms hitting the same cell when the touched cells form a window shorter than 2 * grid: the number of
    # gathers is the product of the per-axis term counts, so this matters (e.g. 4 -> 3 terms per axis typically).
    if idx.numel() > 0:
        valid2 = valid.repeat_interleave(2, dim=-1)
        lo = torch.where(valid2, idx, torch.full_like(idx, size)).amin(dim=-1)  # (Kg, out)
        hi = torch.where(valid2, idx, torch.full_like(idx, -1)).amax(dim=-1)
        lo = torch.minimum(lo, hi.clamp(min=0))  # rows without valid samples: window at 0 (all weights are 0)
        window = int((hi - lo).max().clamp(min=0).item()) + 1
        if window < idx.shape[-1]:
            rel = (idx - lo.unsqueeze(-1)).clamp(0, window - 1)
            dense = weight.new_zeros(*weight.shape[:-1], window)
            dense.scatter_add_(-1, rel, weight)
            offsets = torch.arange(window, device=device)
            idx = (lo.unsqueeze(-1) + offsets).clamp(max=size - 1)  # clamped entries have zero weight
            weight = dense
    return idx, weight.to(dtype)


class _Plan:
    """Per-axis interpolation terms for all RoIs, plus the block-wise gather / scatter evaluation."""

    def __init__(
        self,
        feature_shape: torch.Size,
        rois: Tensor,
        output_size: tuple[int, ...],
        spatial_scale: tuple[float, ...],
        sampling_ratio: int,
        aligned: bool,
        dtype: torch.dtype,
    ) -> None:
        self.feature_shape = feature_shape
        self.spatial_shape = tuple(int(s) for s in feature_shape[2:])
        self.output_size = output_size
        self.num_rois = int(rois.shape[0])
        dims = len(output_size)
        # Row strides of the flattened (B * N, C) channel-last feature matrix.
        strides = [1] * dims
        for d in range(dims - 2, -1, -1):
            strides[d] = strides[d + 1] * self.spatial_shape[d + 1]
        self.axis_strides = strides
        self.num_voxels = math.prod(self.spatial_shape)
        self.groups: list[_Group] = []
        if self.num_rois == 0:
            return

        # Geometry in float64 (cheap: O(K * bins * samples) per axis) for robust floor / border decisions.
        geo_dtype = torch.float64 if rois.device.type in ("cpu", "cuda") else torch.float32
        geo = rois.detach().to(dtype=geo_dtype)
        batch = geo[:, 0].long()
        bmin, bmax = int(batch.min().item()), int(batch.max().item())
        if bmin < 0 or bmax >= feature_shape[0]:
            raise ValueError(f"RoI batch indices must be in [0, {feature_shape[0]}), got range [{bmin}, {bmax}].")
        scale = torch.tensor(spatial_scale, dtype=geo_dtype, device=geo.device)
        offset = 0.5 if aligned else 0.0
        start = geo[:, 1 : 1 + dims] * scale - offset
        end = geo[:, 1 + dims : 1 + 2 * dims] * scale - offset
        size = end - start
        if not aligned:
            size = size.clamp(min=1.0)  # torchvision: force malformed RoIs to be 1x1
        out_t = torch.tensor(output_size, dtype=geo_dtype, device=geo.device)
        bin_size = size / out_t

        selections: list[tuple[Tensor | None, tuple[int, ...]]]
        if sampling_ratio > 0:
            selections = [(None, (sampling_ratio,) * dims)]
        else:
            grid = torch.ceil(size / out_t).clamp(min=0).long()  # adaptive, per RoI and axis (torchvision rule)
            uniq, inverse = torch.unique(grid, dim=0, return_inverse=True)
            selections = []
            for u, row in enumerate(uniq.tolist()):
                if min(row) <= 0:
                    continue  # no sample points: torchvision outputs 0 for these RoIs
                selections.append((torch.nonzero(inverse == u).flatten(), tuple(row)))

        for sel, grid_sizes in selections:
            s, bs, bt = (start, bin_size, batch) if sel is None else (start[sel], bin_size[sel], batch[sel])
            idx, weight = [], []
            for d in range(dims):
                i_d, w_d = _axis_terms(s[:, d], bs[:, d], output_size[d], grid_sizes[d], self.spatial_shape[d], dtype)
                idx.append(i_d)
                weight.append(w_d)
            self.groups.append(_Group(roi_index=sel, batch=bt, idx=idx, weight=weight))

    def _blocks(self, group: _Group, channels: int) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        """Yield ``(k0, k1, lin, w)``: flattened row indices and weights, both ``(k1 - k0, P, m)``."""
        dims = len(self.output_size)
        num_bins = math.prod(self.output_size)
        terms = [w.shape[-1] for w in group.weight]
        num_terms = math.prod(terms)
        inner = [math.prod(terms[d + 1 :]) for d in range(dims)]
        per_roi = max(1, num_bins * channels)
        kg = int(group.batch.shape[0])
        kc = max(1, min(kg, _MAX_BLOCK_ELEMS // per_roi))
        device = group.batch.device
        for k0 in range(0, kg, kc):
            k1 = min(kg, k0 + kc)
            m = max(1, min(num_terms, _MAX_BLOCK_ELEMS // ((k1 - k0) * per_roi)))
            base = (group.batch[k0:k1] * self.num_voxels).view(-1, *([1] * (dims + 1)))
            for j0 in range(0, num_terms, m):
                js = torch.arange(j0, min(num_terms, j0 + m), device=device)
                lin = base
                w: Tensor | None = None
                for d in range(dims):
                    jd = (js // inner[d]) % terms[d]
                    shape = [k1 - k0] + [1] * dims + [js.numel()]
                    shape[1 + d] = self.output_size[d]
                    lin = lin + group.idx[d][k0:k1][:, :, jd].view(shape) * self.axis_strides[d]
                    w_d = group.weight[d][k0:k1][:, :, jd].view(shape)
                    w = w_d if w is None else w * w_d
                assert w is not None
                yield k0, k1, lin.reshape(k1 - k0, num_bins, -1), w.reshape(k1 - k0, num_bins, -1)

    def apply(self, features: Tensor) -> Tensor:
        """Forward operator: ``(B, C, *spatial)`` -> ``(K, C, *output_size)``."""
        channels = features.shape[1]
        num_bins = math.prod(self.output_size)
        flat = features.movedim(1, -1).reshape(-1, channels)  # (B * N, C), channel-last rows
        out = flat.new_zeros(self.num_rois, num_bins, channels)
        for group in self.groups:
            acc = out if group.roi_index is None else flat.new_zeros(group.batch.shape[0], num_bins, channels)
            for k0, k1, lin, w in self._blocks(group, channels):
                kc, m = k1 - k0, lin.shape[-1]
                rows = flat.index_select(0, lin.reshape(-1)).view(kc * num_bins, m, channels)
                acc[k0:k1] += torch.bmm(w.reshape(kc * num_bins, 1, m), rows).view(kc, num_bins, channels)
            if group.roi_index is not None:
                out.index_copy_(0, group.roi_index, acc)
        return out.view(self.num_rois, *self.output_size, channels).movedim(-1, 1).contiguous()

    def adjoint(self, grad: Tensor) -> Tensor:
        """Adjoint (gradient) operator: ``(K, C, *output_size)`` -> ``(B, C, *spatial)``."""
        channels = grad.shape[1]
        num_bins = math.prod(self.output_size)
        g_rows = grad.movedim(1, -1).reshape(self.num_rois, num_bins, channels)
        flat = g_rows.new_zeros(self.feature_shape[0] * self.num_voxels, channels)
        for group in self.groups:
            g_group = g_rows if group.roi_index is None else g_rows.index_select(0, group.roi_index)
            for k0, k1, lin, w in self._blocks(group, channels):
                kc, m = k1 - k0, lin.shape[-1]
                contrib = torch.bmm(w.reshape(kc * num_bins, m, 1), g_group[k0:k1].reshape(kc * num_bins, 1, channels))
                flat.index_add_(0, lin.reshape(-1), contrib.view(-1, channels))
        shape = (self.feature_shape[0], *self.spatial_shape, channels)
        return flat.view(shape).movedim(-1, 1).contiguous()


class _RoIAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, features: Tensor, plan: _Plan) -> Tensor:
        ctx.plan = plan
        return plan.apply(features)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return _RoIAlignAdjointFunction.apply(grad_output, ctx.plan), None


class _RoIAlignAdjointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, grad_output: Tensor, plan: _Plan) -> Tensor:
        ctx.plan = plan
        return plan.adjoint(grad_output)

    @staticmethod
    def backward(ctx: Any, grad_grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return _RoIAlignFunction.apply(grad_grad, ctx.plan), None


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | Sequence[int],
    spatial_scale: float | Sequence[float] = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign for 2D or 3D channel-first feature maps (torchvision / detectron2 semantics, ``D``-dimensional).

    Each RoI is scaled by ``spatial_scale`` (and shifted by ``-0.5`` when ``aligned``, so that feature value ``c``
    sits at image coordinate ``(c + 0.5) / spatial_scale``), divided into ``output_size`` bins, and every bin is the
    mean of ``sampling_ratio`` regularly spaced samples per axis (at ``bin_start + (i + 0.5) * bin_size / g``),
    each obtained by bilinear (2D) / trilinear (3D) interpolation. Border rule (torchvision): a sample with a
    coordinate ``< -1`` or ``> size`` along any axis contributes 0; otherwise the coordinate is clamped to ``>= 0``
    and, if its low index is ``>= size - 1``, both corners use ``size - 1``.

    Args:
        features: ``(B, C, X, Y)`` in 2D or ``(B, C, X, Y, Z)`` in 3D. Gradients flow to it (any order).
        rois: ``(K, 5)`` in 2D, ``(K, 7)`` in 3D: batch index followed by a ``StandardMode`` box
            ``[x0, y0, x1, y1]`` / ``[x0, y0, z0, x1, y1, z1]`` in image coordinates. Not differentiated.
        output_size: pooled size, an int or one int per spatial dim.
        spatial_scale: factor mapping image coordinates to feature coordinates (``1 / stride``); a float or one
            float per spatial dim (anisotropic pyramids).
        sampling_ratio: sample points per bin and axis; ``<= 0`` means adaptive ``ceil(roi_size / output_size)``
            per RoI and axis (as torchvision; RoIs are then grouped by their sample counts, which may be slower).
        aligned: apply the half-pixel shift (``True``, recommended). When ``False`` RoI sizes are forced to be at
            least one feature cell, as in torchvision's legacy mode.

    Returns:
        ``(K, C, *output_size)``, i.e. ``(K, C, ox, oy)`` in 2D or ``(K, C, ox, oy, oz)`` in 3D.

    Raises:
        ValueError: on inconsistent shapes or batch indices outside ``[0, B)``.
    """
    if features.dim() < 3:
        raise ValueError(
            f"features must be (B, C, *spatial) with at least one spatial dim, got {tuple(features.shape)}."
        )
    dims = features.dim() - 2
    if rois.dim() != 2 or rois.shape[1] != 1 + 2 * dims:
        raise ValueError(f"rois must be (K, {1 + 2 * dims}) for {dims}D features, got {tuple(rois.shape)}.")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}.")
    out_size = tuple(int(v) for v in _as_tuple(output_size, dims, "output_size"))
    if min(out_size) <= 0:
        raise ValueError(f"output_size must be positive, got {out_size}.")
    scale = tuple(float(v) for v in _as_tuple(spatial_scale, dims, "spatial_scale"))
    plan = _Plan(
        features.shape, rois.to(features.device), out_size, scale, int(sampling_ratio), aligned, features.dtype
    )
    out: Tensor = _RoIAlignFunction.apply(features, plan)
    return out
