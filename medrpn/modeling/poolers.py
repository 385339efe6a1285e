"""Multi-scale RoIAlign over a 2D/3D (possibly anisotropic) feature pyramid, with FPN level assignment.

Level assignment rule (:func:`assign_fpn_levels`). FPN assigns a box of size ``w x h`` to level
``k = k0 + log2(sqrt(w h) / 224)``, i.e. it picks the level on which the box covers a fixed number of feature cells.
We state that directly and make it per-axis so that anisotropic boxes and anisotropic strides are handled: on level
``l`` a box covers ``n_{l,d} = extent_d / stride_l[d]`` cells along axis ``d``; we pick the level whose geometric
mean ``(prod_d n_{l,d}) ** (1 / D)`` is closest in log scale to a target, by default the geometric mean of the pooled
``output_size``::

    level(box) = argmin_l | mean_d log(extent_d / stride_l[d]) - log(target) |

(ties go to the finer level). With isotropic power-of-two strides ``2**l`` this is
``round(log2(gm(extent) / target))``, the FPN formula with a canonical box of ``target`` cells; unlike the usual
``sqrt(area)`` rule, a thin axial slab and a level whose z-stride stays 1 are compared cell-for-cell per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from medrpn.ops.roi_align import roi_align

__all__ = ["MultiScaleRoIAlign", "assign_fpn_levels"]

# Extents are clamped to this many voxels before taking logs (degenerate boxes go to the finest level).
_MIN_EXTENT = 1e-6
# Level costs (log units) closer than this to the best one count as ties.
_TIE_TOLERANCE = 1e-9


def _check_strides(strides: Sequence[Sequence[int]], dims: int) -> list[tuple[float, ...]]:
    out = [tuple(float(s) for s in level) for level in strides]
    if not out:
        raise ValueError("strides must list at least one pyramid level.")
    for level in out:
        if len(level) != dims or min(level) <= 0:
            raise ValueError(f"every stride must have {dims} positive entries, got {level}.")
    return out


def assign_fpn_levels(
    boxes: Tensor,
    strides: Sequence[Sequence[int]],
    output_size: Sequence[int],
    *,
    target_size: float | None = None,
) -> Tensor:
    """Assign each box to the pyramid level where its extent in feature cells best matches the pooled size.

    Rule: ``argmin_l | mean_d log(extent_d / strides[l][d]) - log(target) |`` with ``target`` the geometric mean of
    ``output_size`` (or ``target_size``); ties go to the finer (lower-index) level. See the module docstring.

    Args:
        boxes: ``(K, 4)`` in 2D or ``(K, 6)`` in 3D, ``StandardMode`` boxes in image voxel coordinates.
        strides: per level, the per-axis stride of that level (``D`` ints each), finest level first.
        output_size: pooled output size, ``D`` ints (one per spatial dim).
        target_size: optional override of the target number of cells (geometric mean over axes).

    Returns:
        ``(K,)`` int64 level index in ``[0, len(strides))`` on ``boxes.device``.
    """
    if boxes.dim() != 2 or boxes.shape[1] % 2 != 0 or boxes.shape[1] == 0:
        raise ValueError(f"boxes must be (K, 2 * D), got {tuple(boxes.shape)}.")
    dims = boxes.shape[1] // 2
    levels = _check_strides(strides, dims)
    out_size = tuple(output_size)
    if len(out_size) != dims or min(out_size) <= 0:
        raise ValueError(f"output_size must have {dims} positive entries, got {out_size}.")
    target = target_size if target_size is not None else math.prod(float(o) for o in out_size) ** (1.0 / dims)
    if target <= 0:
        raise ValueError(f"target_size must be positive, got {target}.")

    b = boxes.detach().to(torch.float64)
    log_extent = (b[:, dims:] - b[:, :dims]).clamp(min=_MIN_EXTENT).log()  # (K, D)
    log_stride = torch.tensor(levels, dtype=torch.float64, device=b.device).log()  # (L, D)
    log_cells = (log_extent.unsqueeze(1) - log_stride.unsqueeze(0)).mean(dim=-1)  # (K, L) log geometric mean
    cost = (log_cells - math.log(target)).abs()
    # First level within rounding of the minimum, so that exact ties deterministically go to the finer level.
    best = cost.amin(dim=1, keepdim=True)
    return (cost <= best + _TIE_TOLERANCE).to(torch.uint8).argmax(dim=1).to(torch.int64)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign of per-image boxes from the pyramid level chosen by :func:`assign_fpn_levels`.

    Args:
        spatial_dims: 2 or 3.
        output_size: pooled size, an int or ``spatial_dims`` ints.
        sampling_ratio: sample points per bin and axis (``<= 0``: adaptive), see :func:`medrpn.ops.roi_align`.
        canonical_level: optional FPN-style anchor for level assignment: boxes whose geometric-mean extent is
            ``canonical_scale`` voxels go to this level (the target cell count becomes
            ``canonical_scale / geometric_mean(strides[canonical_level])``). ``None`` (default): the target is the
            geometric mean of ``output_size``.
        canonical_scale: geometric-mean box extent in image voxels mapped to ``canonical_level``; required iff
            ``canonical_level`` is given.
        aligned: half-pixel aligned RoIAlign (recommended).
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        output_size: int | Sequence[int],
        sampling_ratio: int = 2,
        canonical_level: int | None = None,
        canonical_scale: float | None = None,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        out = (int(output_size),) * spatial_dims if isinstance(output_size, int) else tuple(int(o) for o in output_size)
        if len(out) != spatial_dims or min(out) <= 0:
            raise ValueError(f"output_size must be a positive int or {spatial_dims} positive ints, got {output_size}.")
        if (canonical_level is None) != (canonical_scale is None):
            raise ValueError("canonical_level and canonical_scale must be given together.")
        if canonical_scale is not None and canonical_scale <= 0:
            raise ValueError(f"canonical_scale must be positive, got {canonical_scale}.")
        self.spatial_dims = spatial_dims
        self.output_size = out
        self.sampling_ratio = int(sampling_ratio)
        self.canonical_level = canonical_level
        self.canonical_scale = canonical_scale
        self.aligned = aligned

    def _target_size(self, strides: Sequence[Sequence[int]]) -> float | None:
        if self.canonical_level is None or self.canonical_scale is None:
            return None
        if not 0 <= self.canonical_level < len(strides):
            raise ValueError(
                f"canonical_level {self.canonical_level} is not a level of a {len(strides)}-level pyramid."
            )
        level = strides[self.canonical_level]
        return self.canonical_scale / math.prod(float(s) for s in level) ** (1.0 / self.spatial_dims)

    def forward(self, features: list[Tensor], boxes: list[Tensor], strides: Sequence[Sequence[int]]) -> Tensor:
        """Pool every box from its assigned level.

        Args:
            features: per level ``l``, ``(B, C, X_l, Y_l)`` in 2D or ``(B, C, X_l, Y_l, Z_l)`` in 3D (same ``B``
                and ``C`` on all levels).
            boxes: per image ``b``, ``(K_b, 4)`` in 2D or ``(K_b, 6)`` in 3D ``StandardMode`` boxes in image voxel
                coordinates.
            strides: per level, the ``spatial_dims`` per-axis strides (image voxels per feature cell).

        Returns:
            ``(sum_b K_b, C, *output_size)``, i.e. ``(K, C, ox, oy)`` / ``(K, C, ox, oy, oz)``; rows in the order of
            ``torch.cat(boxes)``.
        """
        dims = self.spatial_dims
        if len(features) != len(strides) or not features:
            raise ValueError(f"got {len(features)} feature levels but {len(strides)} strides.")
        _check_strides(strides, dims)
        ref = features[0]
        for feat in features:
            if feat.dim() != dims + 2 or feat.shape[:2] != ref.shape[:2]:
                raise ValueError(
                    f"feature levels must all be (B, C, *spatial) with {dims} spatial dims and equal B, C."
                )
        if len(boxes) != ref.shape[0]:
            raise ValueError(f"got boxes for {len(boxes)} images but features have batch size {ref.shape[0]}.")
        for bx in boxes:
            if bx.dim() != 2 or bx.shape[1] != 2 * dims:
                raise ValueError(f"each boxes[b] must be (K_b, {2 * dims}), got {tuple(bx.shape)}.")

        device = ref.device
        all_boxes = torch.cat([bx.to(device=device, dtype=torch.float64) for bx in boxes], dim=0)
        batch_idx = torch.cat(
            [torch.full((bx.shape[0],), b, dtype=torch.float64, device=device) for b, bx in enumerate(boxes)]
        )
        num = all_boxes.shape[0]
        if num == 0:
            return ref.new_zeros((0, ref.shape[1], *self.output_size))
        levels = assign_fpn_levels(all_boxes, strides, self.output_size, target_size=self._target_size(strides))
        rois = torch.cat([batch_idx.unsqueeze(1), all_boxes], dim=1)

        pooled: list[Tensor] = []
        order: list[Tensor] = []
        for lvl, (feat, stride) in enumerate(zip(features, strides)):
            idx = torch.nonzero(levels == lvl).flatten()
            if idx.numel() == 0:
                continue
            scale = [1.0 / float(s) for s in stride]
            pooled.append(roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio, self.aligned))
            order.append(idx)
        # Undo the grouping by level: row j of cat(pooled) belongs to box cat(order)[j].
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(pooled, dim=0).index_select(0, inverse)

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
            f"canonical_level={self.canonical_level}, canonical_scale={self.canonical_scale}, aligned={self.aligned}"
        )
