"""The box convention: world LPS mm <-> voxel-edge image boxes, hand-built and property-based."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medrpn.geometry import (
    cccwhd_to_standard,
    image_to_world_boxes,
    lps_affine,
    standard_to_cccwhd,
    voxel_to_world,
    world_to_image_boxes,
    world_to_voxel,
)


def _ras_affine(spacing: list[float], origin_lps: list[float], flips: list[int] | None = None) -> torch.Tensor:
    """RAS affine of a grid with LPS origin and axis directions +/-x, +/-y, +/-z (LPS)."""
    d = len(spacing)
    flips = flips or [1] * d
    lps = np.eye(d + 1)
    for a in range(d):
        lps[a, a] = spacing[a] * flips[a]
        lps[a, d] = origin_lps[a]
    flip = np.diag([-1.0, -1.0] + [1.0] * (d - 1))
    return torch.as_tensor(flip @ lps)


def test_hand_computed_3d_axial() -> None:
    # LPS origin (-100, -50, 20), spacing (0.5, 0.5, 2.0): voxel (0,0,0) centre is the origin
    aff = _ras_affine([0.5, 0.5, 2.0], [-100.0, -50.0, 20.0])
    # the world box exactly covering voxels i=2..5, j=0..1, k=3 (edges at centre +- half spacing)
    world = torch.tensor([[-100 + 2 * 0.5 - 0.25, -50 - 0.25, 20 + 3 * 2 - 1, -100 + 5 * 0.5 + 0.25, -50 + 0.75, 27.0]])
    img = world_to_image_boxes(world, aff)
    torch.testing.assert_close(img, torch.tensor([[2.0, 0.0, 3.0, 6.0, 2.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(image_to_world_boxes(img, aff), world.double())


def test_flipped_axes_swap_corners() -> None:
    # x runs towards the patient's right (-x in LPS): a higher index means a smaller world x
    aff = _ras_affine([1.0, 1.0, 1.0], [10.0, 0.0, 0.0], flips=[-1, 1, 1])
    world = torch.tensor([[7.5, 0.5, 0.5, 9.5, 1.5, 1.5]])  # voxels i = 1..2 (centres x=9, x=8)
    img = world_to_image_boxes(world, aff)
    torch.testing.assert_close(img, torch.tensor([[1.0, 1.0, 1.0, 3.0, 2.0, 2.0]], dtype=torch.float64))


def test_2d_affine() -> None:
    aff = _ras_affine([0.2, 0.3], [5.0, -5.0])
    world = torch.tensor([[5.0 - 0.1, -5.0 - 0.15, 5.0 + 0.3, -5.0 + 0.45]], dtype=torch.float64)  # voxels 0..1, 0..1
    img = world_to_image_boxes(world, aff)
    torch.testing.assert_close(img, torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64))


def test_lps_affine_flips_x_and_y() -> None:
    aff = _ras_affine([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    lps = lps_affine(aff)
    torch.testing.assert_close(lps[:3, 3], torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(torch.diag(lps)[:3], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_cccwhd_round_trip() -> None:
    b = torch.tensor([[10.0, 20.0, 30.0, 4.0, 6.0, 8.0]])
    std = cccwhd_to_standard(b)
    torch.testing.assert_close(std, torch.tensor([[8.0, 17.0, 26.0, 12.0, 23.0, 34.0]], dtype=torch.float64))
    torch.testing.assert_close(standard_to_cccwhd(std), b.double())
    assert cccwhd_to_standard(torch.zeros(0, 6)).shape == (0, 6)


finite = st.floats(-200.0, 200.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    spacing=st.lists(st.floats(0.3, 5.0), min_size=3, max_size=3),
    origin=st.lists(finite, min_size=3, max_size=3),
    flips=st.lists(st.sampled_from([-1, 1]), min_size=3, max_size=3),
    lo=st.lists(finite, min_size=3, max_size=3),
    ext=st.lists(st.floats(0.1, 50.0), min_size=3, max_size=3),
    dims=st.sampled_from([2, 3]),
)
def test_world_image_round_trip(spacing, origin, flips, lo, ext, dims) -> None:  # type: ignore[no-untyped-def]
    aff = _ras_affine(spacing[:dims], origin[:dims], flips[:dims])
    world = torch.tensor([lo[:dims] + [a + e for a, e in zip(lo[:dims], ext[:dims])]], dtype=torch.float64)
    img = world_to_image_boxes(world, aff)
    d = dims
    assert (img[:, d:] >= img[:, :d]).all()
    # extents scale by spacing
    torch.testing.assert_close(
        img[0, d:] - img[0, :d],
        torch.tensor(ext[:d], dtype=torch.float64) / torch.tensor(spacing[:d], dtype=torch.float64),
    )
    torch.testing.assert_close(image_to_world_boxes(img, aff), world)


@settings(max_examples=40, deadline=None)
@given(
    spacing=st.lists(st.floats(0.3, 5.0), min_size=3, max_size=3),
    origin=st.lists(finite, min_size=3, max_size=3),
    idx=st.lists(st.floats(0.0, 300.0), min_size=3, max_size=3),
)
def test_point_round_trip_and_box_centre_is_voxel_centre_plus_half(spacing, origin, idx) -> None:  # type: ignore[no-untyped-def]
    aff = _ras_affine(spacing, origin)
    pts = torch.tensor([idx], dtype=torch.float64)
    world = voxel_to_world(pts, aff)
    torch.testing.assert_close(world_to_voxel(world, aff), pts)
    # a degenerate world box at a voxel centre maps to image coordinate index + 0.5
    box = torch.cat([world, world], 1)
    torch.testing.assert_close(world_to_image_boxes(box, aff)[:, :3], pts + 0.5)


def test_oblique_grid_gives_enclosing_box() -> None:
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    lps = np.eye(4)
    lps[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    aff = torch.as_tensor(np.diag([-1.0, -1, 1, 1]) @ lps)
    img = torch.tensor([[0.0, 0.0, 0.0, 10.0, 10.0, 1.0]], dtype=torch.float64)
    world = image_to_world_boxes(img, aff)
    back = world_to_image_boxes(world, aff)
    assert (back[:, :3] <= img[:, :3] + 1e-9).all() and (back[:, 3:] >= img[:, 3:] - 1e-9).all()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(back, img)  # the enclosing box of a rotated box is larger
