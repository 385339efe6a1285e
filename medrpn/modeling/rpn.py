"""Region Proposal Network: a small conv head over every FPN level, anchors, and proposal selection.

The RPN does not classify lesions: for every fixed anchor it predicts only *objectness* (is there
something here?) and four/six box offsets ``(dx, dy[, dz], dw, dh[, dd])`` relative to the anchor.
The best-scoring decoded anchors, after NMS, are the proposals handed to the lesion head.

Shapes: ``B`` images, ``C`` feature channels, ``A`` anchors per cell, ``K`` objectness logits per
anchor (1 sigmoid / 2 softmax), level ``l`` grid ``(X_l, Y_l)`` in 2D or ``(X_l, Y_l, Z_l)`` in 3D;
see :mod:`medrpn.modeling.structures` for the flattened ``(B, N, ...)`` layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.proposals import ProposalSettings, select_proposals
from medrpn.modeling.structures import RPNOutput

ObjectnessMode = Literal["sigmoid", "softmax"]


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared trunk, then two sibling 1x1 convs (objectness, box deltas).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of every FPN level.
        num_anchors: anchors per feature-map cell ``A``.
        objectness: ``"sigmoid"`` (one logit per anchor) or ``"softmax"`` (two per anchor, background
            and object, as in the original Faster R-CNN paper).

    Example (2D, softmax, 9 anchors)::

        head = RPNHead(spatial_dims=2, in_channels=512, num_anchors=9, objectness="softmax")
        obj, deltas = head([torch.zeros(1, 512, 32, 32)])
        obj[0].shape, deltas[0].shape  # (1, 18, 32, 32), (1, 36, 32, 32)
    """

    def __init__(
        self, *, spatial_dims: int, in_channels: int, num_anchors: int, objectness: ObjectnessMode = "sigmoid"
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if objectness not in ("sigmoid", "softmax"):
            raise ValueError(f"objectness must be 'sigmoid' or 'softmax', got {objectness!r}")
        conv = Conv[Conv.CONV, spatial_dims]
        self.spatial_dims = spatial_dims
        self.num_anchors = num_anchors
        self.logits_per_anchor = 1 if objectness == "sigmoid" else 2
        self.conv = conv(in_channels, in_channels, kernel_size=3, padding=1)
        self.cls_logits = conv(in_channels, num_anchors * self.logits_per_anchor, kernel_size=1)
        self.bbox_pred = conv(in_channels, num_anchors * 2 * spatial_dims, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)  # type: ignore[arg-type]

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Run the head on every level.

        Args:
            features: per level ``(B, C, X_l, Y_l)`` in 2D or ``(B, C, X_l, Y_l, Z_l)`` in 3D.

        Returns:
            Per level objectness ``(B, A*K, *grid_l)`` and deltas ``(B, A*2*D, *grid_l)``; channel
            ``a*K + k`` is logit ``k`` of anchor ``a``, channel ``a*2*D + j`` is delta ``j`` of anchor ``a``.
        """
        logits, deltas = [], []
        for f in features:
            t = torch.relu(self.conv(f))
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def _flatten(maps: Sequence[Tensor], per_anchor: int, num_anchors: int) -> Tensor:
    """``L`` maps ``(B, A*V, *grid)`` -> ``(B, N, V)`` in (level, cell, anchor) order."""
    out = []
    for m in maps:
        b, spatial = m.shape[0], m.shape[2:]
        m = m.reshape(b, num_anchors, per_anchor, *spatial)
        m = m.permute(0, *range(3, 3 + len(spatial)), 1, 2)  # (B, *grid, A, V)
        out.append(m.reshape(b, -1, per_anchor))
    return torch.cat(out, dim=1)


class RegionProposalNetwork(nn.Module):
    """Anchors -> objectness + deltas -> decoded, filtered proposals.

    Args:
        spatial_dims: 2 or 3.
        in_channels: FPN channels.
        anchor_generator: the fixed anchors; its number of levels must match the features.
        objectness: ``"sigmoid"`` or ``"softmax"`` (see :class:`RPNHead`).
        box_coder_weights: weights of the ``2*D`` deltas (MONAI ``BoxCoder``); all ones by default.
        box_delta_clip: clamp of log-size deltas before ``exp`` (default ``log(1000 / 16)``).
        pre_nms_top_k_train: candidates per level before NMS while training.
        post_nms_top_k_train: proposals per image while training.
        pre_nms_top_k_test: candidates per level before NMS at inference.
        post_nms_top_k_test: proposals per image at inference.
        nms_iou: NMS IoU threshold (Faster R-CNN: 0.7).
        min_size: minimum proposal extent in voxels.
        score_threshold: minimum objectness probability of a proposal.

    The settings of the current phase are chosen by ``self.training``.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        anchor_generator: AnchorGenerator,
        objectness: ObjectnessMode = "sigmoid",
        box_coder_weights: Sequence[float] | None = None,
        box_delta_clip: float | None = None,
        pre_nms_top_k_train: int = 2000,
        post_nms_top_k_train: int = 2000,
        pre_nms_top_k_test: int = 1000,
        post_nms_top_k_test: int = 300,
        nms_iou: float = 0.7,
        min_size: float = 1e-3,
        score_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        if anchor_generator.spatial_dims != spatial_dims:
            raise ValueError(f"anchor_generator is {anchor_generator.spatial_dims}D but the RPN is {spatial_dims}D")
        self.spatial_dims = spatial_dims
        self.anchor_generator = anchor_generator
        num_anchors = anchor_generator.num_anchors_per_location()[0]
        self.head = RPNHead(
            spatial_dims=spatial_dims, in_channels=in_channels, num_anchors=num_anchors, objectness=objectness
        )
        weights = tuple(box_coder_weights) if box_coder_weights is not None else (1.0,) * (2 * spatial_dims)
        if len(weights) != 2 * spatial_dims:
            raise ValueError(f"box_coder_weights needs {2 * spatial_dims} values, got {len(weights)}")
        self.box_coder = BoxCoder(weights=weights, boxes_xform_clip=box_delta_clip)
        self.train_settings = ProposalSettings(
            pre_nms_top_k=pre_nms_top_k_train,
            post_nms_top_k=post_nms_top_k_train,
            nms_iou=nms_iou,
            min_size=min_size,
            score_threshold=score_threshold,
        )
        self.test_settings = ProposalSettings(
            pre_nms_top_k=pre_nms_top_k_test,
            post_nms_top_k=post_nms_top_k_test,
            nms_iou=nms_iou,
            min_size=min_size,
            score_threshold=score_threshold,
        )

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map cell."""
        return self.head.num_anchors

    def forward(
        self, features: Sequence[Tensor], strides: Sequence[Sequence[int]], image_shape: Sequence[int]
    ) -> RPNOutput:
        """Predict objectness and deltas for every anchor and select proposals.

        Args:
            features: per level ``(B, C, X_l, Y_l)`` in 2D or ``(B, C, X_l, Y_l, Z_l)`` in 3D.
            strides: per level the ``D`` integer strides of the level w.r.t. the input.
            image_shape: the ``D`` spatial sizes of the network input.

        Returns:
            :class:`RPNOutput` with flattened logits ``(B, N, K)``, deltas ``(B, N, 2*D)``, the
            anchors ``(N, 2*D)`` and per-image proposals (detached).
        """
        if len(features) != self.anchor_generator.num_levels:
            raise ValueError(
                f"the anchors are defined for {self.anchor_generator.num_levels} levels, "
                f"got {len(features)} feature maps"
            )
        logit_maps, delta_maps = self.head(features)
        grids = [tuple(int(s) for s in f.shape[2:]) for f in features]
        anchors, counts = self.anchor_generator.anchors_for(grids, strides, device=features[0].device)
        logits = _flatten(logit_maps, self.head.logits_per_anchor, self.num_anchors)
        deltas = _flatten(delta_maps, 2 * self.spatial_dims, self.num_anchors)
        settings = self.train_settings if self.training else self.test_settings
        proposals = select_proposals(anchors, counts, logits, deltas, image_shape, self.box_coder, settings)
        return RPNOutput(
            anchors=anchors,
            num_anchors_per_level=counts,
            objectness_logits=logits,
            deltas=deltas,
            proposals=proposals,
            image_shape=tuple(int(s) for s in image_shape),
        )
