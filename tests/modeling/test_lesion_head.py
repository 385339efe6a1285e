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


def _ramp(spatial_dims: int, size: int, axis: int) -> torch.Tensor:
    """``(1, 1, *[size] * D)`` whose value at voxel ``i`` along ``axis`` is ``i + 0.5``: its continuous coordinate
    in the aligned RoIAlign convention, so a pooled bin reads its own centre coordinate along ``axis``."""
    shape = [1] * spatial_dims
    shape[axis] = size
    values = (torch.arange(size, dtype=torch.float32) + 0.5).reshape(shape)
    return values.expand(*[size] * spatial_dims)[None, None].contiguous()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    ("box_lo", "box_hi", "expected_lo", "expected_hi"),
    [
        (10.0, 12.0, 8.0, 14.0),  # a 2-voxel box: the window is the 6-voxel minimum about its centre
        (10.0, 16.0, 7.0, 19.0),  # a 6-voxel box: twice its extent
    ],
)
def test_input_branch_pools_the_context_window(
    spatial_dims: int, box_lo: float, box_hi: float, expected_lo: float, expected_hi: float
) -> None:
    d = spatial_dims
    head = LesionHead(
        spatial_dims=d,
        in_channels=4,
        num_classes=2,
        image_channels=1,
        image_roi_size=6,
        image_context=2.0,
        image_min_extent=6.0,
    )
    box = torch.tensor([[box_lo] * d + [box_hi] * d])
    step = (expected_hi - expected_lo) / 6
    centres = expected_lo + step * (torch.arange(6, dtype=torch.float32) + 0.5)
    for axis in range(d):
        pooled = head.pool_input(_ramp(d, 32, axis), [box]).reshape([6] * d)
        along = pooled.movedim(axis, 0).reshape(6, -1)
        torch.testing.assert_close(along, centres[:, None].expand_as(along), rtol=0, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_input_branch_reads_each_rois_own_image_and_feeds_the_classifier(spatial_dims: int) -> None:
    d = spatial_dims
    head = LesionHead(
        spatial_dims=d,
        in_channels=8,
        num_classes=3,
        roi_size=2,
        representation_size=16,
        image_channels=2,
        image_roi_size=3,
    )
    feats = [torch.randn(2, 8, *([8] * d), requires_grad=True)]
    images = torch.stack([torch.full((2, *([16] * d)), 1.0), torch.full((2, *([16] * d)), 5.0)])
    rois = [torch.tensor([[4.0] * d + [8.0] * d]), torch.tensor([[2.0] * d + [6.0] * d, [6.0] * d + [9.0] * d])]
    pooled = head.pool_input(images, rois)
    assert pooled.shape == (3, 2 * 3**d)
    torch.testing.assert_close(pooled[0], torch.full_like(pooled[0], 1.0))
    torch.testing.assert_close(pooled[1:], torch.full_like(pooled[1:], 5.0))
    logits, deltas = head(feats, rois, strides=[[2] * d], images=images)
    assert logits.shape == (3, 4) and deltas.shape == (3, 3, 2 * d)
    # the classifier sees the input: a different image under the same features changes the logits
    logits_other, _ = head(feats, rois, strides=[[2] * d], images=images * 3)
    assert not torch.allclose(logits, logits_other)
    logits.sum().backward()
    assert feats[0].grad is not None and torch.isfinite(feats[0].grad).all()


def test_input_branch_needs_the_images_and_consistent_settings() -> None:
    head = LesionHead(spatial_dims=2, in_channels=4, num_classes=1, roi_size=2, image_channels=1, image_roi_size=3)
    feats = [torch.randn(1, 4, 8, 8)]
    rois = [torch.tensor([[1.0, 1.0, 5.0, 5.0]])]
    with pytest.raises(ValueError, match="pass images"):
        head(feats, rois, strides=[[2, 2]])
    with pytest.raises(ValueError, match="expects 1 channels"):
        head(feats, rois, strides=[[2, 2]], images=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="together"):
        LesionHead(spatial_dims=2, in_channels=4, num_classes=1, image_roi_size=3)
    with pytest.raises(ValueError, match="image_context"):
        LesionHead(spatial_dims=2, in_channels=4, num_classes=1, image_channels=1, image_roi_size=3, image_context=0.5)
