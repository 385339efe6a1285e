"""LesionDetector: composition, RPN-only mode, spec round trip (what checkpoints store)."""

from __future__ import annotations

import json

import pytest
import torch

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.backbone import ResNetFPN
from medrpn.modeling.detector import HeadConfig, LesionDetector, RPNConfig


def _detector(spatial_dims: int, rpn_only: bool = False, channels_last: bool = False) -> LesionDetector:
    d = spatial_dims
    return LesionDetector(
        backbone=ResNetFPN(spatial_dims=d, variant="tiny", return_stages=(1, 2), fpn_channels=8),
        anchor_generator=AnchorGenerator(spatial_dims=d, shapes=[[[6.0] * d], [[12.0] * d]], spacing_mm=[2.0] * d),
        num_classes=3,
        rpn=RPNConfig(post_nms_top_k_test=20),
        head=HeadConfig(roi_size=3, representation_size=16, max_detections=5, score_threshold=0.0),
        rpn_only=rpn_only,
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
