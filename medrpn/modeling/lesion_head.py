"""Second stage: RoIAlign over the proposals, then lesion class scores and class-specific box refinement.

The RPN only says "something is here"; this head says what it is. ``num_classes`` counts the
**foreground lesion classes only** (e.g. 3: solid, ground-glass, part-solid); the classifier has
``num_classes + 1`` outputs with **index 0 = background**, so lesion class id ``c`` (0-based, as in
the datalists) is logit ``c + 1``. This is the only place the offset appears (see
:func:`postprocess_detections` and :mod:`medrpn.training.roi_targets`).

Inference turns every proposal into at most one finding: its lesion class is the most probable
foreground class, its score the lesion probability ``1 - p(background)`` (a radiologist reviews
regions, not class-duplicates of one region), its box the refinement predicted for that class; then a
score threshold, class-agnostic NMS and a maximum number of detections per image.

Optionally (``image_roi_size``) the head also pools the **network input** itself (the image and any shape
channels) at full resolution over a context window around each RoI, and concatenates those values to the FPN
features. The finest FPN level of the 3D demo has a stride of 2 voxels (3 mm), so a 3 mm nodule is one feature
cell there; the input window shows the head its intensities (what the lesion classes are defined by) and whether
a bright blob continues outward as a vessel. It is a RoIAlign over the input, not a second CNN, so it costs
almost nothing per step (an image-context CNN of 16 and 32 channels cost 30% of the demo's steps,
docs/detection_quality.md).

Shapes: ``R`` RoIs over the batch, ``C`` foreground classes, ``D`` spatial dims, pooled size ``P``
(``(7, 7)`` in 2D, e.g. ``(5, 5, 5)`` in 3D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.apps.detection.utils.box_coder import BoxCoder
from torch import Tensor, nn

from medrpn.modeling.poolers import MultiScaleRoIAlign
from medrpn.modeling.structures import Detections, Proposals
from medrpn.ops.nms import nms
from medrpn.ops.roi_align import roi_align


class LesionHead(nn.Module):
    """RoI features -> two-layer MLP -> (C + 1) class logits and C class-specific box deltas.

    Args:
        spatial_dims: 2 or 3.
        in_channels: FPN channels.
        num_classes: number of foreground lesion classes (background excluded).
        roi_size: pooled size per axis (int or ``D`` ints).
        sampling_ratio: RoIAlign samples per bin and axis (<= 0: adaptive).
        representation_size: width of the MLP.
        box_coder_weights: weights of the ``2*D`` refinement deltas (Faster R-CNN: 10, 10, 5, 5).
        score_threshold: minimum lesion probability of a detection.
        nms_iou: class-agnostic NMS threshold at inference.
        max_detections: maximum detections per image.
        min_size: minimum detection extent in voxels.
        image_channels: channels of the network input pooled by the input branch (0: no input branch).
        image_roi_size: pooled size per axis of the input branch (int or ``D`` ints); required iff
            ``image_channels > 0``.
        image_context: the input window is the RoI scaled by this factor about its centre ...
        image_min_extent: ... and at least this many input voxels per axis.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        roi_size: int | Sequence[int] = 7,
        sampling_ratio: int = 2,
        representation_size: int = 256,
        box_coder_weights: Sequence[float] | None = None,
        score_threshold: float = 0.05,
        nms_iou: float = 0.3,
        max_detections: int = 100,
        min_size: float = 1e-3,
        image_channels: int = 0,
        image_roi_size: int | Sequence[int] | None = None,
        image_context: float = 2.0,
        image_min_extent: float = 6.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes counts foreground lesion classes and must be >= 1, got {num_classes}")
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        size = (roi_size,) * spatial_dims if isinstance(roi_size, int) else tuple(int(s) for s in roi_size)
        if len(size) != spatial_dims:
            raise ValueError(f"roi_size needs {spatial_dims} values, got {list(size)}")
        self.roi_size = size
        self.sampling_ratio = int(sampling_ratio)
        self.pooler = MultiScaleRoIAlign(spatial_dims=spatial_dims, output_size=size, sampling_ratio=sampling_ratio)
        if (image_channels > 0) != (image_roi_size is not None):
            raise ValueError("image_channels > 0 and image_roi_size must be given together")
        if image_context < 1.0 or image_min_extent < 0.0:
            raise ValueError(
                f"image_context must be >= 1 and image_min_extent >= 0, got {image_context}, {image_min_extent}"
            )
        self.image_channels = int(image_channels)
        self.image_roi_size: tuple[int, ...] | None = None
        if image_roi_size is not None:
            isize = (image_roi_size,) * spatial_dims if isinstance(image_roi_size, int) else tuple(image_roi_size)
            if len(isize) != spatial_dims or min(isize) <= 0:
                raise ValueError(f"image_roi_size needs {spatial_dims} positive values, got {image_roi_size}")
            self.image_roi_size = tuple(int(v) for v in isize)
        self.image_context = float(image_context)
        self.image_min_extent = float(image_min_extent)
        image_features = self.image_channels * math.prod(self.image_roi_size) if self.image_roi_size else 0
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * math.prod(size) + image_features, representation_size),
            nn.ReLU(inplace=True),
            nn.Linear(representation_size, representation_size),
            nn.ReLU(inplace=True),
        )
        self.cls_score = nn.Linear(representation_size, num_classes + 1)
        self.bbox_pred = nn.Linear(representation_size, num_classes * 2 * spatial_dims)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        default_weights = (10.0,) * spatial_dims + (5.0,) * spatial_dims
        weights = tuple(box_coder_weights) if box_coder_weights is not None else default_weights
        self.box_coder = BoxCoder(weights=weights)
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections
        self.min_size = min_size

    def forward(
        self,
        features: Sequence[Tensor],
        rois: Sequence[Tensor],
        strides: Sequence[Sequence[int]],
        images: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Classify and refine RoIs.

        Args:
            features: per level ``(B, C_fpn, *grid_l)``.
            rois: per image ``(R_b, 2*D)`` boxes in image coordinates.
            strides: per level the ``D`` strides.
            images: the network input ``(B, C_in, X, Y)`` / ``(B, C_in, X, Y, Z)``; required by the input branch
                (``image_channels > 0``), ignored otherwise.

        Returns:
            Class logits ``(R, C + 1)`` (index 0 = background) and deltas ``(R, C, 2*D)``, rows in the
            order of concatenating ``rois``.
        """
        pooled = self.pooler(list(features), list(rois), strides).flatten(1)
        if self.image_roi_size is not None:
            if images is None:
                raise ValueError("this lesion head pools the network input too: pass images")
            pooled = torch.cat([pooled, self.pool_input(images, rois).to(pooled.dtype)], dim=1)
        x = self.fc(pooled)
        logits = self.cls_score(x)
        deltas = self.bbox_pred(x).reshape(-1, self.num_classes, 2 * self.spatial_dims)
        return logits, deltas

    def pool_input(self, images: Tensor, rois: Sequence[Tensor]) -> Tensor:
        """RoIAlign of the network input over each RoI's context window (the input branch).

        Args:
            images: ``(B, C_in, *spatial)`` with ``C_in == image_channels``.
            rois: per image ``(R_b, 2*D)`` boxes in image coordinates.

        Returns:
            ``(R, C_in * prod(image_roi_size))``, rows in the order of concatenating ``rois``.
        """
        if self.image_roi_size is None:
            raise RuntimeError("this lesion head has no input branch")
        if images.shape[1] != self.image_channels:
            raise ValueError(f"the input branch expects {self.image_channels} channels, got {images.shape[1]}")
        d = self.spatial_dims
        boxes = torch.cat([r.to(images.device, torch.float32) for r in rois])
        if boxes.numel() == 0:
            return images.new_zeros((0, self.image_channels * math.prod(self.image_roi_size)))
        batch = torch.cat([torch.full((len(r),), float(b), device=images.device) for b, r in enumerate(rois)])
        centre = (boxes[:, :d] + boxes[:, d:]) / 2
        half = ((boxes[:, d:] - boxes[:, :d]) * self.image_context).clamp_min(self.image_min_extent) / 2
        window = torch.cat([batch[:, None], centre - half, centre + half], dim=1)
        pooled = roi_align(images.float(), window, self.image_roi_size, 1.0, self.sampling_ratio, aligned=True)
        return pooled.flatten(1)

    @torch.no_grad()
    def postprocess(
        self,
        logits: Tensor,
        deltas: Tensor,
        proposals: Sequence[Proposals],
        image_shape: Sequence[int],
    ) -> list[Detections]:
        """Turn head outputs into per-image detections (see the module docstring).

        Args:
            logits: ``(R, C + 1)``.
            deltas: ``(R, C, 2*D)``.
            proposals: the ``B`` per-image proposals the RoIs came from (``R = sum_b len(proposals[b])``).
            image_shape: ``D`` spatial sizes for clipping.

        Returns:
            ``B`` :class:`Detections` sorted by decreasing score.
        """
        return postprocess_detections(
            logits,
            deltas,
            proposals,
            image_shape,
            self.box_coder,
            score_threshold=self.score_threshold,
            nms_iou=self.nms_iou,
            max_detections=self.max_detections,
            min_size=self.min_size,
        )


def postprocess_detections(
    logits: Tensor,
    deltas: Tensor,
    proposals: Sequence[Proposals],
    image_shape: Sequence[int],
    coder: BoxCoder,
    *,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
    min_size: float,
) -> list[Detections]:
    """One finding per proposal: most probable lesion class, lesion probability, class box; NMS; top-k.

    Args:
        logits: ``(R, C + 1)`` with index 0 = background.
        deltas: ``(R, C, 2*D)``.
        proposals: ``B`` per-image proposals, ``R`` in total.
        image_shape: ``D`` spatial sizes for clipping.
        coder: the head's box coder.
        score_threshold: minimum lesion probability.
        nms_iou: class-agnostic NMS threshold.
        max_detections: maximum detections per image.
        min_size: minimum extent in voxels.

    Returns:
        ``B`` :class:`Detections`.
    """
    probs = torch.softmax(logits.float(), dim=1)
    fg = probs[:, 1:]
    num_classes = fg.shape[1]
    lesion_prob = 1.0 - probs[:, 0]
    labels = fg.argmax(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    out = []
    start = 0
    d = deltas.shape[2] // 2
    limit = torch.tensor([float(s) for s in image_shape], device=logits.device).repeat(2)
    for p in proposals:
        stop = start + len(p)
        sl = slice(start, stop)
        start = stop
        if len(p) == 0:
            out.append(Detections.empty(d, num_classes, logits.device))
            continue
        chosen = deltas[sl][rows[: len(p)], labels[sl]]
        boxes = coder.decode_single(chosen.float(), p.boxes.float())
        boxes = torch.minimum(torch.clamp(boxes, min=0.0), limit)
        score = lesion_prob[sl]
        keep = (score >= score_threshold) & ((boxes[:, d:] - boxes[:, :d]) >= min_size).all(dim=1)
        idx = torch.nonzero(keep).squeeze(1)
        kept = idx[nms(boxes[idx], score[idx], nms_iou, max_detections)]
        out.append(
            Detections(
                boxes=boxes[kept],
                scores=score[kept],
                labels=labels[sl][kept],
                class_probs=fg[sl][kept],
                objectness=p.scores[kept],
            )
        )
    return out
