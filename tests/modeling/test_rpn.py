"""RPN head shapes, proposal selection, train/test settings, and overfitting on bright blobs."""

from __future__ import annotations

import pytest
import torch
from monai.data.box_utils import box_iou

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.backbone import ResNetFPN
from medrpn.modeling.rpn import RegionProposalNetwork, RPNHead
from medrpn.training.losses import RPNLoss
from medrpn.training.matching import IoUMatcher
from medrpn.training.sampling import BalancedSampler


def test_head_shapes_from_the_issue_2d_softmax() -> None:
    head = RPNHead(spatial_dims=2, in_channels=512, num_anchors=9, objectness="softmax")
    obj, deltas = head([torch.zeros(1, 512, 32, 32)])
    assert obj[0].shape == (1, 18, 32, 32)
    assert deltas[0].shape == (1, 36, 32, 32)


def test_head_shapes_3d_sigmoid() -> None:
    head = RPNHead(spatial_dims=3, in_channels=16, num_anchors=9, objectness="sigmoid")
    obj, deltas = head([torch.zeros(1, 16, 8, 8, 4)])
    assert obj[0].shape == (1, 9, 8, 8, 4)
    assert deltas[0].shape == (1, 54, 8, 8, 4)


def test_head_rejects_unknown_objectness() -> None:
    with pytest.raises(ValueError, match="objectness"):
        RPNHead(spatial_dims=2, in_channels=4, num_anchors=1, objectness="tanh")  # type: ignore[arg-type]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_flattened_layout_matches_anchor_order(spatial_dims: int) -> None:
    """Logit channel a*K+k at cell c must land at row c*A+a, the row of that anchor."""
    d = spatial_dims
    gen = AnchorGenerator(spatial_dims=d, shapes=[[[4.0] * d, [8.0] * d, [16.0] * d]])
    rpn = RegionProposalNetwork(spatial_dims=d, in_channels=4, anchor_generator=gen, objectness="softmax")
    grid = [3, 2, 2][:d]
    feats = [torch.zeros(1, 4, *grid)]
    with torch.no_grad():
        for p in rpn.head.parameters():
            p.zero_()
        # make logit k=1 of anchor a=2 at the last cell the only non-zero output
        rpn.head.cls_logits.bias[2 * 2 + 1] = 0.0  # type: ignore[index]
    logit_maps, _ = rpn.head(feats)
    logit_maps[0][(0, 2 * 2 + 1, *[g - 1 for g in grid])] = 5.0
    from medrpn.modeling.rpn import _flatten

    flat = _flatten(logit_maps, 2, 3)
    n_cells = int(torch.tensor(grid).prod())
    assert flat.shape == (1, n_cells * 3, 2)
    assert flat[0, (n_cells - 1) * 3 + 2, 1] == 5.0
    assert flat.abs().sum() == 5.0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_proposals_are_well_formed_and_phase_dependent(spatial_dims: int) -> None:
    d = spatial_dims
    gen = AnchorGenerator(spatial_dims=d, shapes=[[[4.0] * d, [8.0] * d]] * 2)
    rpn = RegionProposalNetwork(
        spatial_dims=d,
        in_channels=8,
        anchor_generator=gen,
        pre_nms_top_k_train=50,
        post_nms_top_k_train=40,
        pre_nms_top_k_test=30,
        post_nms_top_k_test=7,
    )
    shape = [32, 24, 16][:d]
    feats = [torch.randn(2, 8, *[s // 2 for s in shape]), torch.randn(2, 8, *[s // 4 for s in shape])]
    strides = [[2] * d, [4] * d]
    out = rpn(feats, strides=strides, image_shape=shape)
    assert out.objectness_logits.shape == (2, out.anchors.shape[0], 1)
    assert out.deltas.shape == (2, out.anchors.shape[0], 2 * d)
    for p in out.proposals:
        assert 0 < len(p) <= 40
        assert not p.boxes.requires_grad
        assert (p.boxes[:, :d] >= 0).all() and (p.boxes[:, d:] <= torch.tensor(shape, dtype=torch.float32)).all()
        assert (p.boxes[:, d:] > p.boxes[:, :d]).all()
        assert (p.scores[:-1] >= p.scores[1:]).all()
        # NMS within a level: no two kept boxes of one level overlap above 0.7
        for lvl in p.levels.unique():
            b = p.boxes[p.levels == lvl]
            iou = torch.as_tensor(box_iou(b, b)).fill_diagonal_(0)
            assert (iou <= 0.7 + 1e-6).all()
    rpn.eval()
    with torch.no_grad():
        out = rpn(feats, strides=strides, image_shape=shape)
    assert all(len(p) <= 7 for p in out.proposals)


def _blob_image(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed noisy image with three bright blobs of different sizes, and their boxes."""
    g = torch.Generator().manual_seed(0)
    size = 64 if spatial_dims == 2 else 40
    boxes = (
        [[8.0, 10.0, 20.0, 22.0], [36.0, 30.0, 52.0, 46.0], [14.0, 44.0, 22.0, 52.0]]
        if spatial_dims == 2
        else [
            [4.0, 6.0, 8.0, 14.0, 16.0, 18.0],
            [22.0, 20.0, 18.0, 34.0, 32.0, 30.0],
            [26.0, 4.0, 4.0, 32.0, 10.0, 10.0],
        ]
    )
    img = 0.1 * torch.randn((1, 1, *[size] * spatial_dims), generator=g)
    coords = torch.meshgrid(*[torch.arange(size) + 0.5] * spatial_dims, indexing="ij")
    for b in boxes:
        inside = torch.ones_like(coords[0], dtype=torch.bool)
        for a in range(spatial_dims):
            inside &= (coords[a] > b[a]) & (coords[a] < b[a + spatial_dims])
        img[0, 0][inside] += 1.0
    return img, torch.tensor(boxes)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rpn_overfits_bright_blobs(spatial_dims: int) -> None:
    """The RPN alone finds every blob (IoU >= 0.5) within its top 10 proposals in at most 400 steps."""
    d = spatial_dims
    torch.manual_seed(0)
    img, gt = _blob_image(d)
    backbone = ResNetFPN(
        spatial_dims=d, variant="tiny", stage_strides=(1, 2, 2, 2), return_stages=(1, 2), fpn_channels=16
    )
    gen = AnchorGenerator(spatial_dims=d, sizes=[[8.0], [16.0]], aspect_ratios=[1.0] if d == 2 else [(1.0, 1.0)])
    rpn = RegionProposalNetwork(
        spatial_dims=d, in_channels=16, anchor_generator=gen, post_nms_top_k_test=10, nms_iou=0.5
    )
    loss_fn = RPNLoss(
        matcher=IoUMatcher(positive_threshold=0.5, negative_threshold=0.3),
        sampler=BalancedSampler(batch_size_per_image=64),
    )
    params = list(backbone.parameters()) + list(rpn.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    recall = 0.0
    for step in range(400):
        backbone.train()
        rpn.train()
        feats = backbone(img)
        out = rpn(feats, backbone.strides, img.shape[2:])
        loss = loss_fn(out, [gt], rpn.box_coder, rpn.num_anchors)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        if step % 25 == 24:
            backbone.eval()
            rpn.eval()
            with torch.no_grad():
                props = rpn(backbone(img), backbone.strides, img.shape[2:]).proposals[0]
            iou = torch.as_tensor(box_iou(gt, props.boxes[:10]))
            recall = float((iou.max(dim=1).values >= 0.5).float().mean()) if len(props) else 0.0
            if recall == 1.0:
                break
    assert recall == 1.0, f"recall {recall} after {step + 1} steps"
