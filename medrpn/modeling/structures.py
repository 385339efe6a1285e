"""Small typed results passed between the stages of the detector.

Shape glossary (used across :mod:`medrpn.modeling` and :mod:`medrpn.training`):

- ``B`` images in a batch, ``D`` spatial dims (2 or 3), ``L`` FPN levels.
- ``A`` anchors per feature-map cell; ``N`` anchors per image over all levels
  (``N = sum_l A * prod(grid_l)``), ordered level by level, within a level cell-major
  (C order over the spatial grid) and anchor-minor — the order of MONAI's ``AnchorGenerator``.
- ``K`` objectness logits per anchor: 1 (sigmoid objectness) or 2 (softmax background/object).
- Image boxes are ``(.., 2*D)`` StandardMode in voxel-edge image coordinates (see :mod:`medrpn.geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


def objectness_probability(logits: Tensor) -> Tensor:
    """Probability that an anchor holds an object.

    Args:
        logits: ``(..., K)`` with K = 1 (sigmoid) or K = 2 (softmax over background, object).

    Returns:
        ``(...)`` probabilities in [0, 1].
    """
    if logits.shape[-1] == 1:
        return torch.sigmoid(logits[..., 0])
    return torch.softmax(logits, dim=-1)[..., 1]


def objectness_log_odds(logits: Tensor) -> Tensor:
    """Log-odds of objectness, monotonic in :func:`objectness_probability` (used for ranking).

    Args:
        logits: ``(..., K)`` with K = 1 or 2.

    Returns:
        ``(...)`` log-odds.
    """
    if logits.shape[-1] == 1:
        return logits[..., 0]
    return logits[..., 1] - logits[..., 0]


@dataclass
class Proposals:
    """Proposals of one image, sorted by decreasing objectness.

    Attributes:
        boxes: ``(P, 4)`` in 2D or ``(P, 6)`` in 3D, image coordinates.
        scores: ``(P,)`` objectness probability.
        levels: ``(P,)`` int64 FPN level the proposal came from.
    """

    boxes: Tensor
    scores: Tensor
    levels: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def detach(self) -> Proposals:
        """A copy cut from the autograd graph (proposals never carry gradients into the second stage)."""
        return Proposals(self.boxes.detach(), self.scores.detach(), self.levels)


@dataclass
class RPNOutput:
    """Everything the RPN computed for a batch.

    Attributes:
        anchors: ``(N, 2*D)`` anchors in image coordinates, shared by all images of the batch.
        num_anchors_per_level: ``L`` ints summing to ``N``.
        objectness_logits: ``(B, N, K)`` raw objectness logits.
        deltas: ``(B, N, 2*D)`` predicted box offsets ``(dx, dy[, dz], dw, dh[, dd])`` per anchor.
        proposals: ``B`` per-image :class:`Proposals` (detached).
        image_shape: spatial shape of the network input, ``D`` ints.
    """

    anchors: Tensor
    num_anchors_per_level: list[int]
    objectness_logits: Tensor
    deltas: Tensor
    proposals: list[Proposals]
    image_shape: tuple[int, ...]


@dataclass
class Detections:
    """Final detections of one image (second stage, or RPN proposals in RPN-only mode).

    Attributes:
        boxes: ``(M, 2*D)`` image coordinates.
        scores: ``(M,)`` detection score (class probability; objectness in RPN-only mode).
        labels: ``(M,)`` int64 lesion class id, 0-based over foreground classes (0 in RPN-only mode).
        class_probs: ``(M, C)`` probabilities over the ``C`` foreground lesion classes.
        objectness: ``(M,)`` RPN objectness of the proposal each detection came from.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    class_probs: Tensor
    objectness: Tensor

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> Detections:
        """Move every field to ``device``."""
        return Detections(
            self.boxes.to(device),
            self.scores.to(device),
            self.labels.to(device),
            self.class_probs.to(device),
            self.objectness.to(device),
        )

    @staticmethod
    def empty(spatial_dims: int, num_classes: int, device: torch.device | str = "cpu") -> Detections:
        """No detections."""
        return Detections(
            torch.zeros(0, 2 * spatial_dims, device=device),
            torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.long, device=device),
            torch.zeros(0, num_classes, device=device),
            torch.zeros(0, device=device),
        )


@dataclass
class MatchResult:
    """Anchor-to-ground-truth assignment of one image.

    Attributes:
        labels: ``(N,)`` int64: 1 positive, 0 negative (background), -1 ignored.
        matched_gt: ``(N,)`` int64 index of the ground-truth box each anchor is compared with
            (meaningful where ``labels == 1``; 0 elsewhere).
        max_iou: ``(N,)`` best IoU of each anchor with any ground-truth box (0 when there is none).
    """

    labels: Tensor
    matched_gt: Tensor
    max_iou: Tensor

    POSITIVE: ClassVar[int] = 1
    NEGATIVE: ClassVar[int] = 0
    IGNORE: ClassVar[int] = -1
