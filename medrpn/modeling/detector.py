"""``LesionDetector``: backbone + FPN -> RPN -> RoIAlign -> lesion head, 2D or 3D.

The detector only holds networks and runs them; losses live in :mod:`medrpn.training`, whole-scan
tiling in :mod:`medrpn.inference.whole_scan`. In **RPN-only mode** there is no lesion head: the
proposals, scored by objectness, are the final output (one "lesion" class).

Shapes: ``B`` images; input ``(B, C_in, X, Y)`` in 2D or ``(B, C_in, X, Y, Z)`` in 3D; boxes in
voxel-edge image coordinates of the input (see :mod:`medrpn.geometry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.backbone import ResNetFPN
from medrpn.modeling.lesion_head import LesionHead
from medrpn.modeling.rpn import ObjectnessMode, RegionProposalNetwork
from medrpn.modeling.structures import Detections, RPNOutput


@dataclass(frozen=True)
class RPNConfig:
    """RPN settings (Faster R-CNN paper defaults for 2D).

    Attributes:
        objectness: ``"sigmoid"`` (1 logit per anchor) or ``"softmax"`` (2 logits per anchor).
        pre_nms_top_k_train: candidates per level before NMS in training.
        post_nms_top_k_train: proposals per image in training.
        pre_nms_top_k_test: candidates per level before NMS at inference.
        post_nms_top_k_test: proposals per image at inference.
        nms_iou: NMS IoU threshold.
        min_size: minimum proposal extent in voxels.
        box_coder_weights: ``2*D`` delta weights (default all ones).
    """

    objectness: ObjectnessMode = "sigmoid"
    pre_nms_top_k_train: int = 2000
    post_nms_top_k_train: int = 2000
    pre_nms_top_k_test: int = 1000
    post_nms_top_k_test: int = 300
    nms_iou: float = 0.7
    min_size: float = 1e-3
    box_coder_weights: tuple[float, ...] | None = None


@dataclass(frozen=True)
class HeadConfig:
    """Lesion-head settings.

    Attributes:
        roi_size: pooled size per axis.
        sampling_ratio: RoIAlign samples per bin and axis.
        representation_size: MLP width.
        score_threshold: minimum lesion probability of a detection.
        nms_iou: class-agnostic NMS threshold of detections.
        max_detections: detections per image.
        image_roi_size: pooled size per axis of the head's input branch (the network input pooled at full
            resolution over a context window around each RoI, concatenated to the FPN features; see
            :class:`~medrpn.modeling.lesion_head.LesionHead`); ``None``: off.
        image_context: that window is the RoI scaled by this factor about its centre ...
        image_min_extent: ... and at least this many input voxels per axis.
    """

    roi_size: int | tuple[int, ...] = 7
    sampling_ratio: int = 2
    representation_size: int = 256
    score_threshold: float = 0.05
    nms_iou: float = 0.3
    max_detections: int = 100
    image_roi_size: int | tuple[int, ...] | None = None
    image_context: float = 2.0
    image_min_extent: float = 6.0


RPN_DEFAULT = RPNConfig()
HEAD_DEFAULT = HeadConfig()


class LesionDetector(nn.Module):
    """Two-stage lesion detector (Faster R-CNN style) with an RPN-only mode.

    Args:
        backbone: encoder + FPN exposing ``spatial_dims``, ``out_channels`` and ``strides``.
        anchor_generator: fixed anchors, one entry per FPN level.
        num_classes: foreground lesion classes (background not counted).
        rpn: RPN settings.
        head: lesion-head settings.
        rpn_only: no lesion head; proposals are the output.
        lesion_map: add a 1x1 convolution predicting a voxel-wise lesion logit map on the finest FPN level
            (:meth:`lesion_map_logits`), trained by the module's dense lesion loss
            (:mod:`medrpn.training.lesion_map`, Retina U-Net's auxiliary segmentation) so that the shared
            features learn every background cell, vessels included, not only the sampled anchors.
        lesion_map_score_weight: ``w`` in ``[0, 1]``: with a lesion map, a detection's score becomes
            ``score ** (1 - w) * map ** w``, where ``map`` is the map's highest probability within one cell of
            the box centre (0: the map does not change scores).
        channels_last: keep conv weights and activations channels-last (``torch.channels_last`` in 2D,
            ``channels_last_3d`` in 3D). oneDNN's CPU convolutions are faster in that layout (the demo's training
            step: 1.19x in float32, 1.82x together with bfloat16 autocast, ``benchmarks/train_speed.py``);
            results are the same up to float rounding.
    """

    def __init__(
        self,
        *,
        backbone: ResNetFPN,
        anchor_generator: AnchorGenerator,
        num_classes: int = 3,
        rpn: RPNConfig = RPN_DEFAULT,
        head: HeadConfig = HEAD_DEFAULT,
        rpn_only: bool = False,
        lesion_map: bool = False,
        lesion_map_score_weight: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        rpn = RPNConfig(**rpn) if isinstance(rpn, dict) else rpn
        head = HeadConfig(**head) if isinstance(head, dict) else head
        d = backbone.spatial_dims
        if anchor_generator.spatial_dims != d:
            raise ValueError(f"the backbone is {d}D but the anchors are {anchor_generator.spatial_dims}D")
        if anchor_generator.num_levels != backbone.num_levels:
            raise ValueError(
                f"the anchors define {anchor_generator.num_levels} FPN levels but the backbone returns "
                f"{backbone.num_levels}"
            )
        if not 0.0 <= lesion_map_score_weight <= 1.0:
            raise ValueError(f"lesion_map_score_weight must lie in [0, 1], got {lesion_map_score_weight}")
        if lesion_map_score_weight > 0 and not lesion_map:
            raise ValueError("lesion_map_score_weight > 0 needs lesion_map=True")
        self.spec: dict[str, Any] = {
            "backbone": dict(backbone.spec),
            "anchor_generator": dict(anchor_generator.spec),
            "num_classes": num_classes,
            "rpn": asdict(rpn),
            "head": asdict(head),
            "rpn_only": rpn_only,
            "lesion_map": lesion_map,
            "lesion_map_score_weight": lesion_map_score_weight,
            "channels_last": channels_last,
        }
        """Plain-data description of the whole detector (see :meth:`from_spec`); stored in checkpoints."""
        self.spatial_dims = d
        self.num_classes = 1 if rpn_only else num_classes
        self.rpn_only = rpn_only
        self.backbone = backbone
        self.rpn = RegionProposalNetwork(
            spatial_dims=d,
            in_channels=backbone.out_channels,
            anchor_generator=anchor_generator,
            objectness=rpn.objectness,
            box_coder_weights=rpn.box_coder_weights,
            pre_nms_top_k_train=rpn.pre_nms_top_k_train,
            post_nms_top_k_train=rpn.post_nms_top_k_train,
            pre_nms_top_k_test=rpn.pre_nms_top_k_test,
            post_nms_top_k_test=rpn.post_nms_top_k_test,
            nms_iou=rpn.nms_iou,
            min_size=rpn.min_size,
        )
        self.head: LesionHead | None = None
        if not rpn_only:
            self.head = LesionHead(
                spatial_dims=d,
                in_channels=backbone.out_channels,
                num_classes=num_classes,
                roi_size=head.roi_size if isinstance(head.roi_size, int) else tuple(head.roi_size),
                sampling_ratio=head.sampling_ratio,
                representation_size=head.representation_size,
                score_threshold=head.score_threshold,
                nms_iou=head.nms_iou,
                max_detections=head.max_detections,
                image_channels=backbone.in_channels if head.image_roi_size is not None else 0,
                image_roi_size=head.image_roi_size,
                image_context=head.image_context,
                image_min_extent=head.image_min_extent,
            )
        self.lesion_map_head: nn.Module | None = (
            Conv[Conv.CONV, d](backbone.out_channels, 1, kernel_size=1) if lesion_map else None
        )
        self.lesion_map_score_weight = float(lesion_map_score_weight)
        self.max_detections = head.max_detections
        self.memory_format = (
            (torch.channels_last if d == 2 else torch.channels_last_3d) if channels_last else torch.contiguous_format
        )
        if channels_last:
            self.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # torch supports it; stubs lag

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LesionDetector:
        """Rebuild a detector (untrained) from :attr:`spec` — plain data only, no unpickling."""
        return cls(
            backbone=ResNetFPN(**spec["backbone"]),
            anchor_generator=AnchorGenerator(**spec["anchor_generator"]),
            num_classes=int(spec["num_classes"]),
            rpn=RPNConfig(**_tuples(spec["rpn"])),
            head=HeadConfig(**_tuples(spec["head"])),
            rpn_only=bool(spec["rpn_only"]),
            lesion_map=bool(spec.get("lesion_map", False)),
            lesion_map_score_weight=float(spec.get("lesion_map_score_weight", 0.0)),
            channels_last=bool(spec.get("channels_last", False)),
        )

    @property
    def strides(self) -> list[tuple[int, ...]]:
        """Per FPN level, the per-axis stride."""
        return self.backbone.strides

    @property
    def in_channels(self) -> int:
        """Channels of the network input."""
        return int(self.backbone.in_channels)

    def features_and_proposals(self, images: Tensor) -> tuple[list[Tensor], RPNOutput]:
        """Run the backbone and the RPN.

        Args:
            images: ``(B, C_in, X, Y)`` or ``(B, C_in, X, Y, Z)``.

        Returns:
            FPN features per level and the RPN output (proposals detached).
        """
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a ({self.spatial_dims + 2})-dim batch, got shape {tuple(images.shape)}")
        features = self.backbone(images.contiguous(memory_format=self.memory_format))
        out = self.rpn(features, self.strides, images.shape[2:])
        return features, out

    def lesion_map_logits(self, features: Sequence[Tensor]) -> Tensor:
        """Voxel-wise lesion logits on the finest FPN level (needs ``lesion_map=True``).

        Args:
            features: per level ``(B, C, *grid_l)``, finest first.

        Returns:
            ``(B, 1, *grid_0)`` logits; the level's stride is ``strides[0]``.
        """
        if self.lesion_map_head is None:
            raise RuntimeError("this detector has no lesion map (build it with lesion_map=True)")
        return self.lesion_map_head(features[0])

    def forward(self, images: Tensor) -> list[Detections]:
        """Detect lesions (use in eval mode).

        Args:
            images: ``(B, C_in, X, Y)`` in 2D or ``(B, C_in, X, Y, Z)`` in 3D.

        Returns:
            ``B`` :class:`Detections` in image coordinates, sorted by score.
        """
        features, out = self.features_and_proposals(images)
        return self.forward_from(features, out, images)

    def forward_from(
        self, features: Sequence[Tensor], out: RPNOutput, images: Tensor | None = None
    ) -> list[Detections]:
        """Second stage from already computed features and RPN output (see :meth:`forward`).

        Args:
            features: per level ``(B, C, *grid_l)``.
            out: the RPN output for the same batch.
            images: the batch's network input, ``(B, C_in, *spatial)``; needed when the head pools the input
                (``head.image_roi_size``).

        Returns:
            ``B`` :class:`Detections`.
        """
        k = self.max_detections
        if self.head is None:
            dets = [
                Detections(
                    boxes=p.boxes[:k],
                    scores=p.scores[:k],
                    labels=torch.zeros(min(len(p), k), dtype=torch.long, device=p.boxes.device),
                    class_probs=p.scores[:k, None],
                    objectness=p.scores[:k],
                )
                for p in out.proposals
            ]
        else:
            logits, deltas = self.head(features, [p.boxes for p in out.proposals], self.strides, images)
            dets = self.head.postprocess(logits, deltas, out.proposals, out.image_shape)
        if self.lesion_map_score_weight > 0:
            dets = self.rescore_with_lesion_map(features, dets, self.lesion_map_score_weight)
        return dets

    def rescore_with_lesion_map(
        self, features: Sequence[Tensor], detections: Sequence[Detections], weight: float
    ) -> list[Detections]:
        """Scores ``score ** (1 - weight) * map ** weight``, re-sorted (see ``lesion_map_score_weight``).

        ``map`` is the lesion-map probability maximised over the 3x3(x3) cells around the cell holding the
        box centre, so a centre one cell off the lesion's peak still reads it.

        Args:
            features: per level ``(B, C, *grid_l)`` of the same batch.
            detections: ``B`` detections in image coordinates.
            weight: ``w`` in ``[0, 1]``.

        Returns:
            ``B`` :class:`Detections` with new scores, sorted by them.
        """
        prob = torch.sigmoid(self.lesion_map_logits(features).float())
        pool = F.max_pool2d if self.spatial_dims == 2 else F.max_pool3d
        prob = pool(prob, kernel_size=3, stride=1, padding=1)[:, 0]
        d = self.spatial_dims
        stride = torch.tensor(self.strides[0], dtype=torch.float32, device=prob.device)
        upper = torch.tensor(prob.shape[1:], device=prob.device) - 1
        out = []
        for b, det in enumerate(detections):
            if len(det) == 0:
                out.append(det)
                continue
            centre = (det.boxes[:, :d] + det.boxes[:, d:]).float() / 2
            cell = torch.minimum((centre / stride).floor().long().clamp_min(0), upper)
            m = prob[b][tuple(cell.T)].to(det.scores.dtype)
            scores = det.scores.clamp_min(0) ** (1 - weight) * m**weight
            order = scores.argsort(descending=True)
            out.append(
                Detections(
                    det.boxes[order], scores[order], det.labels[order], det.class_probs[order], det.objectness[order]
                )
            )
        return out


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def padded_shape(shape: Sequence[int], strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Smallest shape >= ``shape`` divisible by the coarsest stride on every axis."""
    coarsest = [max(s[a] for s in strides) for a in range(len(shape))]
    return tuple(-(-int(n) // c) * c for n, c in zip(shape, coarsest))
