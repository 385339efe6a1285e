"""Lesion head: shapes, the background offset of class ids, post-processing rules."""

from __future__ import annotations

import math

import pytest
import torch

from medrpn.modeling.lesion_head import LesionHead, postprocess_detections
from medrpn.modeling.structures import Proposals


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes(spatial_dims: int) -> None:
    d = spatial_dims
    head = LesionHead(spatial_dims=d, in_channels=8, num_classes=3, roi_size=4, representation_size=32)
    feats = [torch.randn(2, 8, *([16] * d)), torch.randn(2, 8, *([8] * d))]
    rois = [torch.tensor([[1.0] * d + [9.0] * d]), torch.tensor([[0.0] * d + [30.0] * d, [2.0] * d + [5.0] * d])]
    logits, deltas = head(feats, rois, strides=[[2] * d, [4] * d])
    assert logits.shape == (3, 4)  # num_classes + 1 (background at 0)
    assert deltas.shape == (3, 3, 2 * d)


def test_num_classes_counts_foreground_only() -> None:
    with pytest.raises(ValueError, match="foreground"):
        LesionHead(spatial_dims=2, in_channels=4, num_classes=0)


def test_postprocess_hand_built() -> None:
    """Score = 1 - p(background); label = best foreground class (id = logit index - 1); NMS; top-k."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [30.0, 30.0, 40.0, 40.0]])
    props = [Proposals(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long))]
    # logits: [background, solid, ground-glass, part-solid]
    logits = torch.log(torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.3, 0.5, 0.1, 0.1], [0.96, 0.02, 0.01, 0.01]]))
    deltas = torch.zeros(3, 3, 4)
    head = LesionHead(spatial_dims=2, in_channels=4, num_classes=3)
    dets = postprocess_detections(
        logits,
        deltas,
        props,
        [64, 64],
        head.box_coder,
        score_threshold=0.05,
        nms_iou=0.5,
        max_detections=10,
        min_size=0.0,
    )[0]
    # the second box overlaps the first (IoU 0.68) and scores lower: suppressed; the third scores 0.04 < 0.05
    assert len(dets) == 1
    assert dets.labels.tolist() == [1]  # ground-glass
    assert math.isclose(float(dets.scores[0]), 0.9, rel_tol=1e-5)
    torch.testing.assert_close(dets.class_probs[0], torch.tensor([0.1, 0.7, 0.1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dets.boxes[0], boxes[0])  # zero deltas keep the proposal box
    assert float(dets.objectness[0]) == pytest.approx(0.9)


def test_postprocess_refines_with_the_predicted_class_deltas_and_clips() -> None:
    props = [Proposals(torch.tensor([[50.0, 50.0, 60.0, 60.0]]), torch.tensor([0.9]), torch.zeros(1, dtype=torch.long))]
    logits = torch.tensor([[-5.0, -5.0, -5.0, 5.0]])  # part-solid
    head = LesionHead(spatial_dims=2, in_channels=4, num_classes=3)
    deltas = torch.zeros(1, 3, 4)
    deltas[0, 2, 0] = 10.0  # dx for part-solid only (weights 10): +1 box width -> clipped at 64
    dets = head.postprocess(logits, deltas, props, [64, 64])[0]
    torch.testing.assert_close(dets.boxes[0], torch.tensor([60.0, 50.0, 64.0, 60.0]))
    assert dets.labels.tolist() == [2]
