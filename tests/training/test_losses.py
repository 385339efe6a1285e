"""RPN loss terms: names, hand-built values, no-gradient assignment, GIoU option, empty images."""

from __future__ import annotations

import pytest
import torch

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.rpn import RegionProposalNetwork
from medrpn.training.losses import RPNLoss, assign_anchor_targets
from medrpn.training.matching import IoUMatcher
from medrpn.training.sampling import BalancedSampler


def _rpn(spatial_dims: int, objectness: str = "sigmoid") -> RegionProposalNetwork:
    d = spatial_dims
    gen = AnchorGenerator(spatial_dims=d, shapes=[[[8.0] * d, [16.0] * d]])
    return RegionProposalNetwork(spatial_dims=d, in_channels=8, anchor_generator=gen, objectness=objectness)  # type: ignore[arg-type]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("objectness", ["sigmoid", "softmax"])
@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_loss_terms_are_named_finite_and_differentiable(spatial_dims: int, objectness: str, box_loss: str) -> None:
    d = spatial_dims
    rpn = _rpn(d, objectness)
    feats = [torch.randn(2, 8, *([8] * d), requires_grad=True)]
    out = rpn(feats, strides=[[4] * d], image_shape=[32] * d)
    gt = [torch.tensor([[4.0] * d + [14.0] * d]), torch.zeros(0, 2 * d)]
    loss = RPNLoss(box_loss=box_loss)(out, gt, rpn.box_coder, rpn.num_anchors)  # type: ignore[arg-type]
    terms = loss.as_dict()
    assert set(terms) == {"loss_rpn_objectness", "loss_rpn_box"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert float(terms["loss_rpn_box"].detach()) > 0.0
    loss.total.backward()
    assert feats[0].grad is not None and torch.isfinite(feats[0].grad).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_loss_is_float32_under_bfloat16_autocast(spatial_dims: int) -> None:
    """``precision: bf16-mixed`` on a CPU: bf16 predictions, float32 loss terms close to the float32 loss."""
    d = spatial_dims
    torch.manual_seed(0)
    rpn = _rpn(d)
    feats = [torch.randn(2, 8, *([8] * d), requires_grad=True)]
    gt = [torch.tensor([[4.0] * d + [14.0] * d]), torch.zeros(0, 2 * d)]
    loss_fn = RPNLoss(sampler=BalancedSampler(batch_size_per_image=10_000))  # every anchor: no sampling noise
    ref = loss_fn(rpn(feats, strides=[[4] * d], image_shape=[32] * d), gt, rpn.box_coder, rpn.num_anchors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rpn(feats, strides=[[4] * d], image_shape=[32] * d)
        assert out.objectness_logits.dtype == torch.bfloat16
        loss = loss_fn(out, gt, rpn.box_coder, rpn.num_anchors)
    for name, term in loss.as_dict().items():
        assert term.dtype == torch.float32 and torch.isfinite(term), name
        torch.testing.assert_close(term, ref.as_dict()[name], atol=2e-2, rtol=2e-2)
    loss.total.backward()
    assert feats[0].grad is not None and torch.isfinite(feats[0].grad).all()


def test_objectness_loss_matches_hand_computation() -> None:
    """All-zero logits give BCE = log 2 on every sampled anchor."""
    rpn = _rpn(2)
    for p in rpn.parameters():
        torch.nn.init.zeros_(p)
    out = rpn([torch.zeros(1, 8, 4, 4)], strides=[[4, 4]], image_shape=[16, 16])
    gt = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    loss = RPNLoss()(out, gt, rpn.box_coder, rpn.num_anchors)
    torch.testing.assert_close(loss.objectness, torch.log(torch.tensor(2.0)))


def test_weights_scale_terms() -> None:
    rpn = _rpn(2)
    out = rpn([torch.randn(1, 8, 4, 4)], strides=[[4, 4]], image_shape=[16, 16])
    gt = [torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    torch.manual_seed(0)
    a = RPNLoss()(out, gt, rpn.box_coder, rpn.num_anchors)
    torch.manual_seed(0)
    b = RPNLoss(objectness_weight=2.0, box_weight=0.5)(out, gt, rpn.box_coder, rpn.num_anchors)
    torch.testing.assert_close(b.objectness, 2 * a.objectness)
    torch.testing.assert_close(b.box, 0.5 * a.box)


def test_assignment_has_no_gradient_and_respects_budget() -> None:
    anchors = torch.tensor([[0.0, 0, 8, 8], [0, 0, 9, 9], [20, 20, 28, 28], [40, 40, 48, 48]], requires_grad=True)
    targets = assign_anchor_targets(
        anchors,
        [4],
        1,
        [torch.tensor([[0.0, 0, 8, 8]])],
        IoUMatcher(),
        BalancedSampler(batch_size_per_image=2, positive_fraction=0.5),
    )
    t = targets[0]
    assert not t.gt_boxes.requires_grad
    assert int(t.sampled_pos.sum()) == 1 and int(t.sampled_neg.sum()) == 1
    assert t.match.labels.tolist() == [1, 1, 0, 0]
