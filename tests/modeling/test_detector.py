"""LesionDetector: composition, RPN-only mode, spec round trip (what checkpoints store)."""

from __future__ import annotations

import json

import pytest
import torch

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.backbone import ResNetFPN
from medrpn.modeling.detector import HeadConfig, LesionDetector, RPNConfig
from medrpn.modeling.structures import Detections


def _detector(
    spatial_dims: int,
    rpn_only: bool = False,
    channels_last: bool = False,
    lesion_map: bool = False,
    lesion_map_score_weight: float = 0.0,
) -> LesionDetector:
    d = spatial_dims
    return LesionDetector(
        backbone=ResNetFPN(spatial_dims=d, variant="tiny", return_stages=(1, 2), fpn_channels=8),
        anchor_generator=AnchorGenerator(spatial_dims=d, shapes=[[[6.0] * d], [[12.0] * d]], spacing_mm=[2.0] * d),
        num_classes=3,
        rpn=RPNConfig(post_nms_top_k_test=20),
        head=HeadConfig(roi_size=3, representation_size=16, max_detections=5, score_threshold=0.0),
        rpn_only=rpn_only,
        lesion_map=lesion_map,
        lesion_map_score_weight=lesion_map_score_weight,
        channels_last=channels_last,
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("rpn_only", [False, True])
def test_forward_gives_detections(spatial_dims: int, rpn_only: bool) -> None:
    det = _detector(spatial_dims, rpn_only).eval()
    with torch.no_grad():
        out = det(torch.randn(2, 1, *([32] * spatial_dims)))
    assert len(out) == 2
    for d in out:
        assert d.boxes.shape[1] == 2 * spatial_dims and len(d) <= 5
        assert d.class_probs.shape[1] == (1 if rpn_only else 3)
        if rpn_only:
            torch.testing.assert_close(d.scores, d.objectness)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_spec_round_trip_is_plain_data(spatial_dims: int) -> None:
    det = _detector(spatial_dims)
    spec = json.loads(json.dumps(det.spec))  # plain JSON data only
    clone = LesionDetector.from_spec(spec)
    clone.load_state_dict(det.state_dict())
    x = torch.randn(1, 1, *([32] * spatial_dims))
    det.eval()
    clone.eval()
    with torch.no_grad():
        a, b = det(x)[0], clone(x)[0]
    torch.testing.assert_close(a.boxes, b.boxes)
    torch.testing.assert_close(a.scores, b.scores)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_gives_the_same_detections(spatial_dims: int) -> None:
    torch.manual_seed(0)
    plain = _detector(spatial_dims).eval()
    fast = _detector(spatial_dims, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=fmt)
    assert fast.spec["channels_last"] is True and LesionDetector.from_spec(fast.spec).memory_format == fmt
    x = torch.randn(1, 1, *([32] * spatial_dims))
    with torch.no_grad():
        a, b = plain(x)[0], fast(x)[0]
    torch.testing.assert_close(a.boxes, b.boxes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-4)


def test_spec_without_channels_last_key_still_loads() -> None:
    spec = json.loads(json.dumps(_detector(2).spec))
    del spec["channels_last"]  # checkpoints written before the option existed
    assert LesionDetector.from_spec(spec).memory_format == torch.contiguous_format


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_lesion_map_is_one_logit_per_finest_level_cell_and_round_trips(spatial_dims: int) -> None:
    det = _detector(spatial_dims, lesion_map=True)
    x = torch.randn(2, 1, *([32] * spatial_dims))
    features, _ = det.features_and_proposals(x)
    logits = det.lesion_map_logits(features)
    assert logits.shape == (2, 1, *features[0].shape[2:])
    assert tuple(features[0].shape[2:]) == tuple(32 // s for s in det.strides[0])
    clone = LesionDetector.from_spec(json.loads(json.dumps(det.spec)))
    clone.load_state_dict(det.state_dict())  # the map's weights are part of the state
    torch.testing.assert_close(clone.lesion_map_logits(features), logits)
    with pytest.raises(RuntimeError, match="no lesion map"):
        _detector(spatial_dims).lesion_map_logits(features)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_lesion_map_rescoring_by_hand(spatial_dims: int) -> None:
    d = spatial_dims
    det = _detector(d, lesion_map=True, lesion_map_score_weight=0.5)
    head = det.lesion_map_head
    assert isinstance(head, torch.nn.Conv2d | torch.nn.Conv3d)
    with torch.no_grad():  # map logit = feature channel 0
        head.weight.zero_()
        head.weight[0, 0] = 1.0
        head.bias.zero_()
    st = float(det.strides[0][0])
    grid = (8,) * d
    feat = torch.full((1, 8, *grid), -20.0)
    feat[(0, 0, *([5] * d))] = 20.0  # map ~1 at cell 5, ~0 elsewhere
    boxes = torch.tensor([[st] * d + [2 * st] * d, [5 * st] * d + [6 * st] * d])  # centres in cells 1 and 5
    dets = Detections(boxes, torch.tensor([0.9, 0.4]), torch.tensor([0, 1]), torch.rand(2, 3), torch.tensor([0.8, 0.7]))
    (out,) = det.rescore_with_lesion_map([feat], [dets], 0.5)
    torch.testing.assert_close(out.boxes, boxes.flip(0))  # the lesion-map hit now ranks first
    torch.testing.assert_close(out.scores, torch.tensor([0.4**0.5, 0.0]), atol=1e-4, rtol=0)
    assert out.labels.tolist() == [1, 0] and out.objectness.tolist() == pytest.approx([0.7, 0.8])
    # a centre one cell away from the peak still reads it (3x3(x3) max)
    near = Detections(boxes[1:] - st, torch.tensor([0.4]), torch.tensor([1]), torch.rand(1, 3), torch.tensor([0.7]))
    assert float(det.rescore_with_lesion_map([feat], [near], 1.0)[0].scores[0]) == pytest.approx(1.0)
    # through forward: weight 0 changes nothing, a constant map scales every score alike
    x = torch.randn(1, 1, *([32] * d))
    plain = _detector(d, lesion_map=True).eval()
    scaled = _detector(d, lesion_map=True, lesion_map_score_weight=0.5).eval()
    scaled.load_state_dict(plain.state_dict())
    for m in (plain, scaled):
        assert m.lesion_map_head is not None
        with torch.no_grad():
            m.lesion_map_head.weight.zero_()
            m.lesion_map_head.bias.fill_(0.0)  # map = 0.5 everywhere
    with torch.no_grad():
        a, b = plain(x)[0], scaled(x)[0]
    torch.testing.assert_close(b.scores, a.scores**0.5 * 0.5**0.5)
    assert LesionDetector.from_spec(json.loads(json.dumps(scaled.spec))).lesion_map_score_weight == 0.5


def test_lesion_map_score_weight_is_checked() -> None:
    with pytest.raises(ValueError, match="needs lesion_map"):
        _detector(2, lesion_map_score_weight=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _detector(2, lesion_map=True, lesion_map_score_weight=1.5)


def test_mismatched_parts_are_refused() -> None:
    with pytest.raises(ValueError, match="levels"):
        LesionDetector(
            backbone=ResNetFPN(spatial_dims=2, variant="tiny", return_stages=(1, 2, 3)),
            anchor_generator=AnchorGenerator(spatial_dims=2, shapes=[[[6.0, 6.0]]]),
        )
    with pytest.raises(ValueError, match="3D"):
        LesionDetector(
            backbone=ResNetFPN(spatial_dims=2, variant="tiny", return_stages=(1,)),
            anchor_generator=AnchorGenerator(spatial_dims=3, shapes=[[[6.0, 6.0, 6.0]]]),
        )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_head_input_branch_round_trips_and_is_used(spatial_dims: int) -> None:
    """``head.image_roi_size``: the head pools the network input too; the spec rebuilds it; old specs load."""
    d = spatial_dims
    det = LesionDetector(
        backbone=ResNetFPN(spatial_dims=d, variant="tiny", in_channels=2, return_stages=(1, 2), fpn_channels=8),
        anchor_generator=AnchorGenerator(spatial_dims=d, shapes=[[[6.0] * d], [[12.0] * d]], spacing_mm=[2.0] * d),
        num_classes=2,
        rpn=RPNConfig(post_nms_top_k_test=20),
        head=HeadConfig(roi_size=3, representation_size=16, max_detections=5, score_threshold=0.0, image_roi_size=4),
    ).eval()
    assert det.head is not None and det.head.image_channels == 2
    clone = LesionDetector.from_spec(json.loads(json.dumps(det.spec)))
    clone.load_state_dict(det.state_dict())
    clone.eval()
    x = torch.randn(1, 2, *([32] * d))
    with torch.no_grad():
        a, b = det(x)[0], clone(x)[0]
    torch.testing.assert_close(a.scores, b.scores)
    spec = json.loads(json.dumps(_detector(d).spec))
    for key in ("image_roi_size", "image_context", "image_min_extent"):
        spec["head"].pop(key)
    old = LesionDetector.from_spec(spec).head
    assert old is not None and old.image_roi_size is None and old.image_channels == 0
