"""ResNetFPN: level shapes and strides, the space-to-depth input (``input_unshuffle``), argument checks."""

from __future__ import annotations

import json

import pytest
import torch

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.backbone import ResNetFPN
from medrpn.modeling.detector import HeadConfig, LesionDetector, RPNConfig


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_levels_have_the_reported_strides(spatial_dims: int) -> None:
    net = ResNetFPN(spatial_dims=spatial_dims, variant="tiny", stage_strides=(1, 2, 2, 2), fpn_channels=8)
    size = (32, 24, 16)[:spatial_dims]
    feats = net(torch.randn(2, 1, *size))
    assert net.strides == [(2,) * spatial_dims, (4,) * spatial_dims, (8,) * spatial_dims]
    for f, stride in zip(feats, net.strides):
        assert f.shape == (2, 8, *(n // s for n, s in zip(size, stride)))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_input_unshuffle_keeps_the_levels_and_drops_the_full_resolution_stage(spatial_dims: int) -> None:
    """r=2 with one stage fewer gives the same level grids as a full-resolution first stage."""
    full = ResNetFPN(
        spatial_dims=spatial_dims,
        in_channels=3,
        channels=(4, 8, 16),
        blocks_per_stage=(1, 1, 1),
        stage_strides=(1, 2, 2),
        return_stages=(1, 2),
        fpn_channels=8,
    )
    s2d = ResNetFPN(
        spatial_dims=spatial_dims,
        in_channels=3,
        channels=(8, 16),
        blocks_per_stage=(1, 1),
        stage_strides=(1, 2),
        return_stages=(0, 1),
        fpn_channels=8,
        input_unshuffle=2,
    )
    assert s2d.strides == full.strides == [(2,) * spatial_dims, (4,) * spatial_dims]
    first_conv = next(m for m in s2d.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d))
    assert first_conv.in_channels == 3 * 2**spatial_dims  # every 2^D block of the 3 input channels
    x = torch.randn(1, 3, *(16, 12, 8)[:spatial_dims])
    assert [f.shape for f in s2d(x)] == [f.shape for f in full(x)]


def _space_to_depth_net(spatial_dims: int) -> tuple[ResNetFPN, list[torch.Tensor]]:
    """One stage behind ``input_unshuffle=2``, and the list its first stage's inputs are recorded in."""
    net = ResNetFPN(
        spatial_dims=spatial_dims,
        channels=(8,),
        blocks_per_stage=(1,),
        stage_strides=(1,),
        return_stages=(0,),
        fpn_channels=4,
        input_unshuffle=2,
    )
    seen: list[torch.Tensor] = []
    net.stages[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    return net, seen


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_input_unshuffle_pads_odd_sizes_at_the_far_end(spatial_dims: int) -> None:
    """An odd input gets the grid of a strided convolution, ceil(n / 2), and its voxels keep their cells."""
    net, seen = _space_to_depth_net(spatial_dims)
    x = torch.zeros(1, 1, *(7, 6, 5)[:spatial_dims])
    x[(0, 0, *(n - 1 for n in x.shape[2:]))] = 1.0  # the last voxel on every axis
    (feat,) = net(x)
    assert feat.shape[2:] == tuple((n + 1) // 2 for n in x.shape[2:])
    assert seen[0].nonzero()[0, 2:].tolist() == [(n - 1) // 2 for n in x.shape[2:]]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_input_unshuffle_is_lossless_space_to_depth(spatial_dims: int) -> None:
    """Each of the 2^D voxels of a block lands in its own channel of the block's cell: nothing is averaged."""
    net, seen = _space_to_depth_net(spatial_dims)
    channels = set()
    for offset in range(2**spatial_dims):
        x = torch.zeros(1, 1, *(8,) * spatial_dims)
        x[(0, 0, *(2 + (offset >> a & 1) for a in range(spatial_dims)))] = 1.0  # a voxel of the cell (1, 1[, 1])
        net(x)
        nonzero = seen[-1].nonzero().tolist()
        assert len(nonzero) == 1 and nonzero[0][2:] == [1] * spatial_dims
        channels.add(nonzero[0][1])
    assert channels == set(range(2**spatial_dims))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_detector_with_input_unshuffle_pads_odd_inputs_and_round_trips(spatial_dims: int) -> None:
    d = spatial_dims
    det = LesionDetector(
        backbone=ResNetFPN(
            spatial_dims=d,
            channels=(8, 16),
            blocks_per_stage=(1, 1),
            stage_strides=(1, 2),
            return_stages=(0, 1),
            fpn_channels=8,
            input_unshuffle=2,
        ),
        anchor_generator=AnchorGenerator(spatial_dims=d, shapes=[[[6.0] * d], [[12.0] * d]], spacing_mm=[2.0] * d),
        num_classes=3,
        rpn=RPNConfig(post_nms_top_k_test=20),
        head=HeadConfig(roi_size=3, representation_size=16, max_detections=5, score_threshold=0.0),
    ).eval()
    clone = LesionDetector.from_spec(json.loads(json.dumps(det.spec)))
    clone.load_state_dict(det.state_dict())
    clone.eval()
    x = torch.randn(1, 1, *(29, 30, 19)[:d])  # odd sizes: zero-padded at the far end before the space-to-depth
    with torch.no_grad():
        a, b = det(x)[0], clone(x)[0]
    torch.testing.assert_close(a.boxes, b.boxes)
    assert a.boxes.shape[1] == 2 * d and torch.isfinite(a.boxes).all()


def test_spec_without_input_unshuffle_key_still_loads() -> None:
    spec = ResNetFPN(spatial_dims=2, variant="tiny").spec
    del spec["input_unshuffle"]  # checkpoints written before the option existed
    assert ResNetFPN(**spec).input_unshuffle == 1


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="input_unshuffle"):
        ResNetFPN(spatial_dims=3, variant="tiny", input_unshuffle=0)
    with pytest.raises(ValueError, match="spatial_dims"):
        ResNetFPN(spatial_dims=4, variant="tiny")
