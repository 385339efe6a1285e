"""RoI sampling for the lesion head and its loss."""

from __future__ import annotations

import math

import torch

from medrpn.modeling.lesion_head import LesionHead
from medrpn.modeling.structures import Proposals
from medrpn.training.roi_targets import RoISampler, lesion_head_loss


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
