"""Anchor counts, shapes, mm conversion and positions, 2D and 3D."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

from medrpn.geometry import box_centers, box_sizes
from medrpn.modeling.anchors import AnchorGenerator, anchor_shapes_from_scales


def test_faster_rcnn_default_is_nine_anchors_per_cell() -> None:
    gen = AnchorGenerator(spatial_dims=2)
    assert gen.num_anchors_per_location() == [9]
    sizes = gen.voxel_shapes()[0]
    # ratio-major, size-minor; ratio 1 keeps squares of 32, 64, 128
    torch.testing.assert_close(sizes[3:6], torch.tensor([[32.0, 32.0], [64.0, 64.0], [128.0, 128.0]]))
    # ratio h/w = 2 at constant area
    w, h = sizes[6]
    assert math.isclose(float(h / w), 2.0, rel_tol=1e-6)
    assert math.isclose(float(w * h), 32.0 * 32.0, rel_tol=1e-5)


def test_3d_ratios_keep_volume() -> None:
    shapes = anchor_shapes_from_scales([10.0], [(1.0, 1.0), (1.0, 0.5), (2.0, 2.0)], 3)
    for s in shapes:
        assert math.isclose(s[0] * s[1] * s[2], 1000.0, rel_tol=1e-6)
    assert shapes[1][2] / shapes[1][0] == pytest.approx(0.5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mm_sizes_follow_anisotropic_spacing(spatial_dims: int) -> None:
    spacing = [0.5, 1.0, 2.5][:spatial_dims]
    shape_mm = [10.0] * spatial_dims
    gen = AnchorGenerator(spatial_dims=spatial_dims, shapes=[[shape_mm]], spacing_mm=spacing)
    vox = gen.voxel_shapes()[0][0]
    torch.testing.assert_close(vox, torch.tensor([10.0 / s for s in spacing]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_anchor_count_order_and_centres(spatial_dims: int) -> None:
    gen = AnchorGenerator(spatial_dims=spatial_dims, shapes=[[[4.0] * spatial_dims, [8.0] * spatial_dims]] * 2)
    grids = [(4, 3, 2)[:spatial_dims], (2, 2, 1)[:spatial_dims]]
    strides = [(2, 2, 4)[:spatial_dims], (4, 4, 8)[:spatial_dims]]
    anchors, counts = gen.anchors_for(grids, strides)
    assert counts == [2 * math.prod(grids[0]), 2 * math.prod(grids[1])]
    assert anchors.shape == (sum(counts), 2 * spatial_dims)
    # first cell of level 0: centre (0.5 * stride) for both anchors, then next cell along the last axis
    c = box_centers(anchors)
    torch.testing.assert_close(c[0], torch.tensor([0.5 * s for s in strides[0]]))
    torch.testing.assert_close(c[1], c[0])
    expected_next = [0.5 * s for s in strides[0]]
    expected_next[-1] += strides[0][-1]
    torch.testing.assert_close(c[2], torch.tensor(expected_next))
    torch.testing.assert_close(box_sizes(anchors[:2]), torch.tensor([[4.0] * spatial_dims, [8.0] * spatial_dims]))
    # the coarse level starts after the fine one
    torch.testing.assert_close(c[counts[0]], torch.tensor([0.5 * s for s in strides[1]]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_same_order_as_monai_for_even_strides(spatial_dims: int) -> None:
    """With even strides and even integer extents MONAI's (rounded) generator gives the same anchors."""
    base = [[8.0] * spatial_dims, [4.0, 12.0, 6.0][:spatial_dims]]
    ours = AnchorGenerator(spatial_dims=spatial_dims, shapes=[base, [[2 * v for v in s] for s in base]])
    monai = AnchorGeneratorWithAnchorShape(feature_map_scales=(1, 2), base_anchor_shapes=base)
    grids = [[4] * spatial_dims, [2] * spatial_dims]
    strides = [[2] * spatial_dims, [4] * spatial_dims]
    monai_anchors = monai.grid_anchors(grids, [[torch.tensor(s) for s in st] for st in strides])
    mine, _ = ours.anchors_for(grids, strides)
    torch.testing.assert_close(mine, torch.cat(monai_anchors).float())


def test_anchors_are_not_parameters() -> None:
    gen = AnchorGenerator(spatial_dims=3, shapes=[[[6.0, 6.0, 4.0]]])
    assert list(gen.parameters()) == []


def test_invalid_specs_raise() -> None:
    with pytest.raises(ValueError, match="same number of anchors"):
        AnchorGenerator(spatial_dims=2, shapes=[[[4.0, 4.0]], [[8.0, 8.0], [4.0, 16.0]]])
    with pytest.raises(ValueError, match="positive"):
        AnchorGenerator(spatial_dims=2, shapes=[[[4.0, -1.0]]])
    with pytest.raises(ValueError, match="pairs"):
        AnchorGenerator(spatial_dims=3, sizes=[[8.0]], aspect_ratios=[0.5, 1.0])
    with pytest.raises(ValueError, match="spacing_mm"):
        AnchorGenerator(spatial_dims=3, sizes=[[8.0]], aspect_ratios=[(1.0, 1.0)], spacing_mm=[1.0, 1.0])
    gen = AnchorGenerator(spatial_dims=2)
    with pytest.raises(ValueError, match="1 FPN levels"):
        gen.anchors_for([[4, 4], [2, 2]], [[2, 2], [4, 4]])


@settings(max_examples=30, deadline=None)
@given(
    spatial_dims=st.sampled_from([2, 3]),
    grid=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    stride=st.lists(st.integers(1, 9), min_size=3, max_size=3),
)
def test_every_cell_centre_carries_every_anchor(spatial_dims: int, grid: list[int], stride: list[int]) -> None:
    g, s = grid[:spatial_dims], stride[:spatial_dims]
    gen = AnchorGenerator(spatial_dims=spatial_dims, shapes=[[[3.0] * spatial_dims, [5.0] * spatial_dims]])
    anchors, _ = gen.anchors_for([g], [s])
    centres = box_centers(anchors).reshape(-1, 2, spatial_dims)
    torch.testing.assert_close(centres[:, 0], centres[:, 1])
    idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in g], indexing="ij"), -1).reshape(-1, spatial_dims)
    torch.testing.assert_close(centres[:, 0], (idx.float() + 0.5) * torch.tensor(s, dtype=torch.float32))
