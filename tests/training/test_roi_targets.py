"""RoI sampling for the lesion head and its loss."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medrpn.modeling.lesion_head import LesionHead
from medrpn.modeling.structures import Proposals
from medrpn.training.roi_targets import CentreRule, RoISampler, centre_distance, lesion_head_loss


def _props(boxes: list[list[float]]) -> Proposals:
    b = torch.tensor(boxes)
    return Proposals(b, torch.linspace(0.9, 0.1, len(b)), torch.zeros(len(b), dtype=torch.long))


def test_ground_truth_is_added_and_classes_are_offset_by_background() -> None:
    gt = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    props = [_props([[50.0, 50.0, 60.0, 60.0], [11.0, 11.0, 20.0, 20.0]])]
    t = RoISampler(positive_iou=0.5, rois_per_image=16, positive_fraction=0.5)(props, [gt], [torch.tensor([2])])[0]
    assert len(t.rois) == 3  # two proposals + the ground-truth box
    # lesion class 2 -> target 3 (0 is background); the far proposal is background
    assert sorted(t.classes.tolist()) == [0, 3, 3]
    assert (t.gt_boxes[t.classes > 0] == gt).all()


def test_images_without_lesions_give_background_only() -> None:
    t = RoISampler()([_props([[0.0, 0.0, 5.0, 5.0]])], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])[0]
    assert t.classes.tolist() == [0]


def test_positive_fraction_caps_positives() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    near = [[0.0, 0.0, 10.0, 10.0 + i * 0.1] for i in range(20)]
    far = [[50.0 + i, 50.0, 60.0 + i, 60.0] for i in range(20)]
    t = RoISampler(rois_per_image=8, positive_fraction=0.25)([_props(near + far)], [gt], [torch.tensor([0])])[0]
    assert int((t.classes > 0).sum()) == 2 and len(t.classes) == 8


def test_loss_hand_computed() -> None:
    head = LesionHead(spatial_dims=2, in_channels=4, num_classes=2)
    gt = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    t = RoISampler(rois_per_image=4)([_props([[40.0, 40.0, 50.0, 50.0]])], [gt], [torch.tensor([1])])
    logits = torch.zeros(len(t[0].rois), 3, requires_grad=True)  # uniform: CE = log 3 for every RoI
    deltas = torch.zeros(len(t[0].rois), 2, 4, requires_grad=True)
    loss = lesion_head_loss(logits, deltas, t, head.box_coder)
    assert math.isclose(float(loss.classification), math.log(3.0), rel_tol=1e-6)
    assert float(loss.box) == 0.0  # the ground-truth RoI needs zero deltas
    loss.total.backward()
    assert set(loss.as_dict()) == {"loss_head_class", "loss_head_box"}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_giou_box_loss_hand_computed(spatial_dims: int) -> None:
    """One positive RoI, zero deltas: the decoded box is the RoI itself, so the loss is ``1 - GIoU(RoI, lesion)``.

    Lesion ``[0, 10]^d``, RoI ``[0, 10] x [5, 15] x ...`` (shifted by half its extent on the last axis): IoU 1/3,
    enclosing box = union, so GIoU = IoU and the summed loss is 2/3 over the sampled RoIs.
    """
    d = spatial_dims
    head = LesionHead(spatial_dims=d, in_channels=4, num_classes=1)
    gt = torch.tensor([[0.0] * d + [10.0] * d])
    roi = [0.0] * (d - 1) + [5.0] + [10.0] * (d - 1) + [15.0]
    sampler = RoISampler(positive_iou=0.3, rois_per_image=4, add_gt_as_proposals=False)
    t = sampler([_props([roi, [50.0] * d + [60.0] * d])], [gt], [torch.tensor([0])])
    assert sorted(t[0].classes.tolist()) == [0, 1]
    n = len(t[0].rois)
    logits = torch.zeros(n, 2)
    deltas = torch.zeros(n, 1, 2 * d, requires_grad=True)
    loss = lesion_head_loss(logits, deltas, t, head.box_coder, box_loss="giou")
    assert math.isclose(float(loss.box), (2.0 / 3.0) / n, rel_tol=1e-5)
    loss.box.backward()
    assert deltas.grad is not None
    pos = int(torch.nonzero(t[0].classes).squeeze())
    # the gradient moves the positive's box towards the lesion (its last-axis centre down); the background RoI
    # gets none
    assert deltas.grad[pos, 0, d - 1] > 0 and deltas.grad[1 - pos].abs().sum() == 0
    # smooth L1 and GIoU agree that a RoI equal to the lesion needs no correction
    exact = sampler([_props([gt[0].tolist()])], [gt], [torch.tensor([0])])
    m = len(exact[0].rois)
    at_rest = lesion_head_loss(torch.zeros(m, 2), torch.zeros(m, 1, 2 * d), exact, head.box_coder, box_loss="giou")
    assert float(at_rest.box) < 1e-6


def test_head_box_loss_is_checked() -> None:
    from medrpn.module import HeadTrainingConfig

    bad: Any = "l2"  # a config value the Literal type would reject statically
    with pytest.raises(ValueError, match="box_loss must be one of"):
        HeadTrainingConfig(box_loss=bad)
    head = LesionHead(spatial_dims=2, in_channels=4, num_classes=1)
    t = RoISampler()([_props([[0.0, 0.0, 5.0, 5.0]])], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    with pytest.raises(ValueError, match="box_loss must be one of"):
        lesion_head_loss(torch.zeros(1, 2), torch.zeros(1, 1, 4), t, head.box_coder, box_loss=bad)


def _box(centre: list[float], half: list[float]) -> list[float]:
    return [c - h for c, h in zip(centre, half)] + [c + h for c, h in zip(centre, half)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("rule", ["iou", "ignore", "positive"])
def test_centre_rule_relabels_loose_rois_centred_on_a_lesion(spatial_dims: int, rule: CentreRule) -> None:
    d = spatial_dims
    gt = torch.tensor([_box([20.0] * d, [1.5] * d)])  # a 3-voxel lesion
    loose = _box([20.5] * d, [4.0] * d)  # centred on it (0.33 semi-axes away), IoU (3/8)^d < 0.2: background by IoU
    beside = _box([20.0 + 2.5] + [20.0] * (d - 1), [1.5] * d)  # centre outside the lesion (1.67 semi-axes)
    far = _box([60.0] * d, [1.5] * d)
    props = [_props([loose, beside, far])]
    sampler = RoISampler(
        positive_iou=0.3,
        negative_iou=0.2,
        rois_per_image=16,
        positive_fraction=0.5,
        add_gt_as_proposals=False,
        centre_rule=rule,
    )
    t = sampler(props, [gt], [torch.tensor([1])])[0]
    by_roi = {tuple(r.tolist()): int(c) for r, c in zip(t.rois, t.classes)}
    expected_loose = {"iou": 0, "ignore": None, "positive": 2}[rule]
    assert by_roi.get(tuple(loose)) == expected_loose
    assert by_roi[tuple(beside)] == 0 and by_roi[tuple(far)] == 0
    if rule == "positive":
        assert (t.gt_boxes[t.classes > 0] == gt).all()


def test_centre_rule_picks_the_lesion_it_is_centred_in_and_keeps_iou_positives() -> None:
    gt = torch.tensor([_box([20.0, 20.0], [2.0, 2.0]), _box([26.0, 20.0], [4.0, 4.0])])  # overlapping lesions
    rois = [_box([21.0, 20.0], [6.0, 6.0]), _box([26.0, 20.0], [4.0, 4.0])]  # centred in lesion 0; = lesion 1
    t = RoISampler(
        positive_iou=0.5,
        negative_iou=0.2,
        rois_per_image=8,
        positive_fraction=1.0,
        add_gt_as_proposals=False,
        centre_rule="positive",
    )([_props(rois)], [gt], [torch.tensor([0, 1])])[0]
    # RoI 0: 0.5 semi-axes from lesion 0 (inside), 1.25 from lesion 1 (outside): a positive of lesion 0
    assert t.classes.tolist() == [1, 2]
    assert torch.equal(t.gt_boxes, gt)


def test_centre_rule_is_checked() -> None:
    bad: Any = "centre"  # what an unchecked config could pass
    with pytest.raises(ValueError, match="centre_rule"):
        RoISampler(centre_rule=bad)


@settings(max_examples=50, deadline=None)
@given(
    centre=st.lists(st.floats(-50, 50), min_size=3, max_size=3),
    half=st.lists(st.floats(0.5, 20), min_size=3, max_size=3),
    unit=st.lists(st.floats(-1, 1), min_size=3, max_size=3),
    scale=st.floats(0.0, 2.0),
    roi_half=st.floats(0.5, 30),
)
def test_centre_distance_is_in_semi_axis_units(
    centre: list[float], half: list[float], unit: list[float], scale: float, roi_half: float
) -> None:
    norm = math.sqrt(sum(u * u for u in unit))
    if norm < 1e-3:
        return
    direction = [u / norm for u in unit]
    roi_centre = [c + scale * h * u for c, h, u in zip(centre, half, direction)]
    gt = torch.tensor([_box(centre, half)], dtype=torch.float64)
    roi = torch.tensor([_box(roi_centre, [roi_half] * 3)], dtype=torch.float64)
    # the RoI's size does not matter, only where its centre lies
    assert math.isclose(float(centre_distance(gt, roi)[0, 0]), scale, rel_tol=1e-6, abs_tol=1e-6)
