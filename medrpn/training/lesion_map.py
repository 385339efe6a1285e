"""Dense lesion supervision on the finest FPN level (Retina U-Net's auxiliary segmentation loss).

Why: the RPN and the lesion head see only *sampled* anchors and RoIs. With random negatives the anchors
on vessels are almost never sampled, so the shared features are never told that a 3 mm vessel
cross-section is not a 3 mm nodule; hard-negative mining from the first step instead often stalls
(docs/detection_quality.md). A voxel-wise loss gives every cell of the finest level a target at once — the lesion
as positive, *all* the background (vessels included) as negative — with no sampling. Jaeger et al.,
"Retina U-Net" (ML4H 2020) and nnDetection train detectors this way on medical scans.

Targets come from the boxes alone (no masks needed): a cell of the level's grid is a lesion cell when
its centre lies in the ellipsoid (2D: ellipse) inscribed in a ground-truth box, or when it holds the
box centre (so a lesion smaller than one cell still has a positive cell); each lesion cell keeps the index
of its lesion. Two losses:

- ``"bce_dice"`` (the module's default): binary cross-entropy over all cells plus a soft Dice over the
  batch's lesion cells. Large lesions own most lesion cells, so a 3 mm nodule (one cell of a stride-2
  grid) weighs little against the vessels: on the demo data this map learned every lesion of 5 mm and
  more and gave the smaller ones a probability near 0 (docs/detection_quality.md).
- ``"lesion_balanced"``: the mean cross-entropy of the background cells plus the mean over lesions of each
  lesion's mean cross-entropy, so every lesion weighs the same whatever its size, and all lesions together
  weigh as much as the whole background. On the demo data the map then fired on small lesions *and* on
  hundreds of vessel branches per scan (a small lesion's map peak ranked 40th-440th in its scan), and the
  detector was worse (docs/detection_quality.md), so it is not the default.

Shapes: ``B`` images, grid ``(X, Y)`` in 2D or ``(X, Y, Z)`` in 3D, ``D`` spatial dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LesionMapLoss = Literal["lesion_balanced", "bce_dice"]
LESION_MAP_LOSSES: tuple[str, ...] = ("lesion_balanced", "bce_dice")


@torch.no_grad()
def lesion_map_targets(
    gt_boxes: Sequence[Tensor], grid_shape: Sequence[int], stride: Sequence[int], device: torch.device | None = None
) -> Tensor:
    """Rasterise ground-truth boxes into a lesion-index map on a feature grid.

    Args:
        gt_boxes: per image ``(M_b, 2*D)`` boxes in voxel-edge image coordinates (``xyzxyz``).
        grid_shape: ``(X, Y)`` or ``(X, Y, Z)`` cells of the level.
        stride: per-axis stride of the level in input voxels (cell ``j`` spans ``[j*s, (j+1)*s)``).
        device: target device (default: that of the first box tensor, else CPU).

    Returns:
        ``(B, 1, *grid_shape)`` int64: 0 for background, else ``1 +`` the index of the lesion the cell
        belongs to, counted over the whole batch (image 0's lesions first). Where lesions overlap, a cell
        goes to the lesion whose ellipsoid it is deepest in.
    """
    d = len(grid_shape)
    if len(stride) != d:
        raise ValueError(f"stride has {len(stride)} axes but the grid has {d}")
    if device is None:
        device = gt_boxes[0].device if len(gt_boxes) else torch.device("cpu")
    out = torch.zeros((len(gt_boxes), 1, *grid_shape), dtype=torch.long, device=device)
    first = 1
    centres = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) * s for n, s in zip(grid_shape, stride)]
    for b, boxes in enumerate(gt_boxes):
        if boxes.numel() == 0:
            continue
        boxes = boxes.to(device=device, dtype=torch.float32).reshape(-1, 2 * d)
        mid = (boxes[:, :d] + boxes[:, d:]) / 2
        half = ((boxes[:, d:] - boxes[:, :d]) / 2).clamp_min(1e-6)
        dist = torch.zeros((boxes.shape[0], *grid_shape), device=device)
        for a in range(d):
            view = [boxes.shape[0]] + [1] * d
            view[a + 1] = grid_shape[a]
            dist = dist + (((centres[a][None, :] - mid[:, a : a + 1]) / half[:, a : a + 1]) ** 2).reshape(view)
        cell = torch.stack(
            [(mid[:, a] / stride[a]).floor().long().clamp(0, grid_shape[a] - 1) for a in range(d)], dim=1
        )
        m = torch.arange(boxes.shape[0], device=device)
        dist[(m, *cell.T)] = -1.0  # each lesion owns its centre cell
        best, owner = dist.min(dim=0)
        out[b, 0] = torch.where(best <= 1.0, owner + first, torch.zeros_like(owner))
        first += boxes.shape[0]
    return out


def lesion_map_loss(
    logits: Tensor, lesion_ids: Tensor, kind: LesionMapLoss = "bce_dice", dice_weight: float = 1.0
) -> Tensor:
    """Dense lesion loss (see the module docstring for the two kinds).

    Args:
        logits: ``(B, 1, *grid)`` lesion-map logits.
        lesion_ids: ``(B, 1, *grid)`` lesion index per cell, 0 = background (:func:`lesion_map_targets`).
        kind: ``"lesion_balanced"`` or ``"bce_dice"``.
        dice_weight: weight of the Dice term of ``"bce_dice"`` (0 = cross-entropy only).

    Returns:
        Scalar loss (float32 even under autocast).
    """
    if logits.shape != lesion_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(lesion_ids.shape)} differ in shape")
    logits = logits.float()
    targets = (lesion_ids > 0).float()
    if kind == "lesion_balanced":
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten()
        ids = lesion_ids.flatten()
        background = ids == 0
        loss = ce[background].mean() if bool(background.any()) else ce.sum() * 0
        if bool((~background).any()):
            counts = torch.bincount(ids)[1:].to(ce.dtype)
            # index_add_, not bincount(weights=...): bincount has no gradient
            sums = torch.zeros_like(counts).index_add_(0, ids[~background] - 1, ce[~background])
            present = counts > 0
            loss = loss + (sums[present] / counts[present]).mean()
        return loss
    if kind != "bce_dice":
        raise ValueError(f"kind must be 'lesion_balanced' or 'bce_dice', got {kind!r}")
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    if dice_weight > 0 and bool(targets.sum() > 0):
        p = torch.sigmoid(logits)
        dice = 2 * (p * targets).sum() / (p.sum() + targets.sum()).clamp_min(1e-6)
        loss = loss + dice_weight * (1 - dice)
    return loss
