"""The one box convention of medrpn, and every conversion across it.

**World boxes** (everything that crosses a file or module boundary: annotations, datalists, results,
overlays) are in **LPS millimetres** — DICOM/ITK/LUNA16 patient coordinates: +x towards the patient's
Left, +y Posterior, +z Superior — in MONAI's ``StandardMode`` (``xyxy`` in 2D, ``xyzxyz`` in 3D):
the minimum corner then the maximum corner. MONAI's detection datalists store the same boxes as
``cccwhd`` (centre then size, LPS mm), as MONAI's LUNA16 bundle does; :func:`cccwhd_to_standard`
converts.

**Image boxes** (inside the model: anchors, proposals, RoIs) are ``StandardMode`` boxes in continuous
voxel coordinates of the network input array with the **voxel-edge convention**: voxel ``i`` spans
``[i, i + 1)`` and its centre is at ``i + 0.5``. Box coordinate ``d`` refers to spatial array axis ``d``
(tensor dim ``2 + d`` of a ``(B, C, *spatial)`` batch). This is the convention MONAI's box flip, crop,
zoom and rot90 transforms use; MONAI's affine box transform instead treats the voxel *centre* as the
integer index, which is why the world <-> image conversion lives here (it adds the half-voxel shift)
rather than in ``AffineBoxToImageCoordinated``.

**Affines** are MONAI's: ``MetaTensor.affine`` maps a voxel index (centre at the integer) to **RAS**
world millimetres. ``diag(-1, -1, 1, 1) @ affine`` gives the LPS affine (``diag(-1, -1, 1)`` in 2D).

All 2**D corners of a box are transformed and the axis-aligned bounding box of the result is taken,
so boxes stay correct for flipped and permuted axes and are the tight enclosing box for oblique
scans (MONAI's box transforms move only two corners, exact only for axis-aligned grids).

Shapes: ``N`` boxes, ``D`` = spatial dims (2 or 3). Boxes are ``(N, 2*D)``; affines ``(D+1, D+1)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Final

import numpy as np
import torch
from monai.data.box_utils import CenterSizeMode, StandardMode, convert_box_mode
from torch import Tensor

WORLD_SPACE: Final = "LPS"
"""Patient coordinate system of every world box and point in medrpn."""

BOX_MODE: Final = "xyzxyz"
"""MONAI box mode of world and image boxes in 3D (``xyxy`` in 2D): min corner, then max corner."""

DATALIST_BOX_MODE: Final = "cccwhd"
"""Box mode of MONAI detection datalist files (centre, then size), LPS mm."""

CONVENTION_NOTE: Final = (
    "boxes are [x_min, y_min, z_min, x_max, y_max, z_max] in LPS world millimetres (DICOM patient "
    "coordinates: +x left, +y posterior, +z superior); MONAI StandardMode 'xyzxyz'"
)
"""Human-readable statement written into every output file."""


def _as_tensor(x: Tensor | np.ndarray | Sequence[float], dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=dtype)


def lps_ras_flip(spatial_dims: int) -> Tensor:
    """The matrix that converts between LPS and RAS (its own inverse).

    Args:
        spatial_dims: 2 or 3.

    Returns:
        ``diag(-1, -1, 1, 1)`` in 3D, ``diag(-1, -1, 1)`` in 2D, float64.
    """
    diag = [-1.0, -1.0] + [1.0] * (spatial_dims - 1)
    return torch.diag(torch.tensor(diag, dtype=torch.float64))


def affine_for_dims(affine: Tensor | np.ndarray, spatial_dims: int) -> Tensor:
    """The ``(D+1, D+1)`` affine of the first ``D`` axes (a 2D image may carry a 3D ``(4, 4)`` affine).

    Args:
        affine: ``(K, K)`` affine with ``K - 1 >= spatial_dims``.
        spatial_dims: 2 or 3.

    Returns:
        ``(D+1, D+1)`` float64: the in-plane block and translation (the plane's world x/y).
    """
    a = _as_tensor(affine)
    if a.shape[0] == spatial_dims + 1:
        return a
    keep = [*range(spatial_dims), a.shape[0] - 1]
    return a[keep][:, keep]


def lps_affine(affine_ras: Tensor | np.ndarray, spatial_dims: int | None = None) -> Tensor:
    """LPS voxel-to-world affine from MONAI's RAS affine.

    Args:
        affine_ras: ``(D+1, D+1)`` RAS affine (``MetaTensor.affine``).
        spatial_dims: reduce a larger affine to ``D`` axes (see :func:`affine_for_dims`).

    Returns:
        ``(D+1, D+1)`` float64 LPS affine.
    """
    a = _as_tensor(affine_ras)
    if spatial_dims is not None:
        a = affine_for_dims(a, spatial_dims)
    return lps_ras_flip(a.shape[0] - 1) @ a


def _corners(boxes: Tensor) -> Tensor:
    """All 2**D corners of boxes: ``(N, 2*D)`` -> ``(N, 2**D, D)``."""
    d = boxes.shape[1] // 2
    lo, hi = boxes[:, :d], boxes[:, d:]
    pts = []
    for choice in itertools.product((0, 1), repeat=d):
        pts.append(torch.stack([hi[:, a] if c else lo[:, a] for a, c in enumerate(choice)], dim=1))
    return torch.stack(pts, dim=1)


def _transform_boxes(boxes: Tensor, matrix: Tensor, pre_shift: float, post_shift: float) -> Tensor:
    d = boxes.shape[1] // 2
    pts = _corners(boxes.to(torch.float64)) + pre_shift  # (N, 2**D, D)
    pts = pts @ matrix[:d, :d].T + matrix[:d, d] + post_shift
    return torch.cat([pts.amin(dim=1), pts.amax(dim=1)], dim=1)


def world_to_image_boxes(boxes_world: Tensor | np.ndarray, affine_ras: Tensor | np.ndarray) -> Tensor:
    """LPS world-mm boxes -> voxel-edge image boxes of the grid described by ``affine_ras``.

    Args:
        boxes_world: ``(N, 4)`` in 2D or ``(N, 6)`` in 3D, LPS mm, StandardMode.
        affine_ras: ``(3, 3)`` in 2D or ``(4, 4)`` in 3D, MONAI's RAS voxel-to-world affine.

    Returns:
        ``(N, 2*D)`` float64 image boxes (voxel ``i`` spans ``[i, i+1)``).
    """
    b = _as_tensor(boxes_world)
    b = b.reshape(-1, b.shape[-1] if b.ndim == 2 else _as_tensor(affine_ras).shape[0] * 2 - 2)
    inv = torch.linalg.inv(lps_affine(affine_ras, b.shape[1] // 2))
    return _transform_boxes(b, inv, 0.0, 0.5)


def image_to_world_boxes(boxes_image: Tensor | np.ndarray, affine_ras: Tensor | np.ndarray) -> Tensor:
    """Voxel-edge image boxes -> LPS world-mm boxes (inverse of :func:`world_to_image_boxes`).

    Args:
        boxes_image: ``(N, 4)`` in 2D or ``(N, 6)`` in 3D, voxel-edge image coordinates, StandardMode.
        affine_ras: ``(3, 3)`` in 2D or ``(4, 4)`` in 3D, MONAI's RAS voxel-to-world affine.

    Returns:
        ``(N, 2*D)`` float64 LPS world boxes.
    """
    b = _as_tensor(boxes_image)
    b = b.reshape(-1, b.shape[-1] if b.ndim == 2 else _as_tensor(affine_ras).shape[0] * 2 - 2)
    a = lps_affine(affine_ras, b.shape[1] // 2)
    return _transform_boxes(b, a, -0.5, 0.0)


def world_to_voxel(points_world: Tensor | np.ndarray, affine_ras: Tensor | np.ndarray) -> Tensor:
    """LPS world points -> continuous voxel indices (voxel centres at integers, as the affine defines).

    Args:
        points_world: ``(N, D)`` LPS mm.
        affine_ras: ``(D+1, D+1)`` RAS affine.

    Returns:
        ``(N, D)`` float64 voxel indices.
    """
    p = _as_tensor(points_world)
    d = p.shape[-1] if p.ndim == 2 else _as_tensor(affine_ras).shape[0] - 1
    inv = torch.linalg.inv(lps_affine(affine_ras, d))
    return p.reshape(-1, d) @ inv[:d, :d].T + inv[:d, d]


def voxel_to_world(indices: Tensor | np.ndarray, affine_ras: Tensor | np.ndarray) -> Tensor:
    """Continuous voxel indices (centres at integers) -> LPS world points.

    Args:
        indices: ``(N, D)`` voxel indices.
        affine_ras: ``(D+1, D+1)`` RAS affine.

    Returns:
        ``(N, D)`` float64 LPS mm.
    """
    p = _as_tensor(indices)
    d = p.shape[-1] if p.ndim == 2 else _as_tensor(affine_ras).shape[0] - 1
    a = lps_affine(affine_ras, d)
    return p.reshape(-1, d) @ a[:d, :d].T + a[:d, d]


def cccwhd_to_standard(boxes: Tensor | np.ndarray) -> Tensor:
    """Datalist boxes (centre + size, ``cccwhd``/``ccwh``) -> StandardMode (``xyzxyz``/``xyxy``).

    Args:
        boxes: ``(N, 4)`` or ``(N, 6)``.

    Returns:
        ``(N, 2*D)`` float64.
    """
    b = _as_tensor(boxes)
    if b.numel() == 0:
        return b.reshape(0, b.shape[-1] if b.ndim == 2 else 6)
    out = convert_box_mode(b, src_mode=CenterSizeMode, dst_mode=StandardMode)
    return torch.as_tensor(out, dtype=torch.float64)


def standard_to_cccwhd(boxes: Tensor | np.ndarray) -> Tensor:
    """StandardMode -> centre + size (the datalist's ``cccwhd``/``ccwh``).

    Args:
        boxes: ``(N, 4)`` or ``(N, 6)``.

    Returns:
        ``(N, 2*D)`` float64.
    """
    b = _as_tensor(boxes)
    if b.numel() == 0:
        return b.reshape(0, b.shape[-1] if b.ndim == 2 else 6)
    out = convert_box_mode(b, src_mode=StandardMode, dst_mode=CenterSizeMode)
    return torch.as_tensor(out, dtype=torch.float64)


def box_centers(boxes: Tensor) -> Tensor:
    """Centres of StandardMode boxes.

    Args:
        boxes: ``(N, 2*D)``.

    Returns:
        ``(N, D)``.
    """
    d = boxes.shape[1] // 2
    return (boxes[:, :d] + boxes[:, d:]) / 2


def box_sizes(boxes: Tensor) -> Tensor:
    """Per-axis extents of StandardMode boxes.

    Args:
        boxes: ``(N, 2*D)``.

    Returns:
        ``(N, D)``.
    """
    d = boxes.shape[1] // 2
    return boxes[:, d:] - boxes[:, :d]
