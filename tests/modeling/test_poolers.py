"""Tests for FPN level assignment and :class:`medrpn.modeling.poolers.MultiScaleRoIAlign` (2D and 3D)."""

from __future__ import annotations

import pytest
import torch

from medrpn.modeling.poolers import MultiScaleRoIAlign, assign_fpn_levels
from medrpn.ops.roi_align import roi_align

STRIDES_2D = [(4, 4), (8, 8), (16, 16), (32, 32)]
STRIDES_3D = [(4, 4, 1), (8, 8, 2), (16, 16, 4)]


def _box(center: float | list[float], extent: list[float]) -> list[float]:
    c = [center] * len(extent) if isinstance(center, float) else center
    return [ci - e / 2 for ci, e in zip(c, extent)] + [ci + e / 2 for ci, e in zip(c, extent)]


def test_assign_levels_2d_small_to_fine_large_to_coarse() -> None:
    boxes = torch.tensor(
        [
            _box(100.0, [2.0, 2.0]),  # tiny -> finest
            _box(100.0, [28.0, 28.0]),  # 7 cells on stride 4
            _box(100.0, [56.0, 56.0]),  # 7 cells on stride 8
            _box(100.0, [112.0, 112.0]),  # 7 cells on stride 16
            _box(100.0, [4000.0, 4000.0]),  # huge -> coarsest
            [5.0, 5.0, 5.0, 5.0],  # degenerate -> finest
            _box(100.0, [7.0 * 4 * 2**0.5, 7.0 * 4 * 2**0.5]),  # exact tie between levels 0 and 1 -> finer
        ],
        dtype=torch.float64,
    )
    levels = assign_fpn_levels(boxes, STRIDES_2D, (7, 7))
    assert levels.dtype == torch.int64
    assert levels.tolist() == [0, 0, 1, 2, 3, 0, 0]


def test_assign_levels_3d_anisotropic() -> None:
    boxes = torch.tensor(
        [
            # A flat box (56 x 56 x 14 voxels) on a pyramid whose z-stride is 4x finer: 14/14/14 cells on level 0,
            # 7/7/7 on level 1 -> level 1. A rule ignoring the per-axis strides (cube-root volume / in-plane
            # stride: 35.3 / 4 = 8.8 cells on level 0 vs 4.4 on level 1) would pick level 0.
            _box(100.0, [56.0, 56.0, 14.0]),
            # The same volume as an isotropic-voxel cube (35.3^3): 8.8 x 8.8 x 35 cells on level 0 (gm 14) -> 1.
            _box(100.0, [35.3, 35.3, 35.3]),
            # Elongated in x: 112 x 28 x 7 voxels -> level 1 cells 14 x 3.5 x 3.5 (gm 5.6), level 0 gm 11.1 -> 1.
            _box(100.0, [112.0, 28.0, 7.0]),
            _box(100.0, [28.0, 28.0, 7.0]),  # 7 cells per axis on level 0
            _box(100.0, [112.0, 112.0, 28.0]),  # 7 cells per axis on level 2
            _box(100.0, [1000.0, 1000.0, 300.0]),  # coarsest
        ],
        dtype=torch.float64,
    )
    assert assign_fpn_levels(boxes, STRIDES_3D, (7, 7, 7)).tolist() == [1, 1, 1, 0, 2, 2]
    # An anisotropic output size changes the target to gm(7, 7, 2) = 4.6 cells: 56 x 56 x 14 (7 cells on level 1,
    # 3.5 on level 2) and 28 x 28 x 7 (7 on level 0, 3.5 on level 1) both move one level coarser.
    assert assign_fpn_levels(boxes[[0, 3]], STRIDES_3D, (7, 7, 2)).tolist() == [2, 1]
    # Explicit target: 3.5 cells -> 28 x 28 x 7 box goes to level 1.
    assert assign_fpn_levels(boxes[[3]], STRIDES_3D, (7, 7, 7), target_size=3.5).tolist() == [1]


def test_assign_levels_invalid() -> None:
    with pytest.raises(ValueError):
        assign_fpn_levels(torch.zeros(1, 6), STRIDES_2D, (7, 7))
    with pytest.raises(ValueError):
        assign_fpn_levels(torch.zeros(1, 4), STRIDES_2D, (7, 7, 7))


def _pyramid(dims: int, batch: int, channels: int, requires_grad: bool = False):
    strides = STRIDES_2D[:3] if dims == 2 else STRIDES_3D
    image = (128, 96) if dims == 2 else (128, 96, 32)
    features = [
        torch.randn(batch, channels, *[i // s for i, s in zip(image, stride)], requires_grad=requires_grad)
        for stride in strides
    ]
    return features, strides, image


def _random_boxes(num: int, image: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    size = torch.tensor(image, dtype=torch.float32)
    extent = torch.exp(torch.rand(num, len(image), generator=gen) * 4.0) * size / 40.0
    centre = torch.rand(num, len(image), generator=gen) * size
    return torch.cat([centre - extent / 2, centre + extent / 2], dim=1)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_multiscale_matches_direct_roi_align(dims: int, sampling_ratio: int) -> None:
    features, strides, image = _pyramid(dims, batch=2, channels=3, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    boxes = [_random_boxes(9, image, gen), _random_boxes(0, image, gen), _random_boxes(6, image, gen)]
    leaves = features
    features = [torch.cat([f, f.detach().flip(0)[:1]], dim=0) for f in leaves]  # batch of 3 images
    output_size = (4, 3, 2)[:dims]
    pooler = MultiScaleRoIAlign(spatial_dims=dims, output_size=output_size, sampling_ratio=sampling_ratio)
    out = pooler(features, boxes, strides)
    assert out.shape == (15, 3, *output_size)

    all_boxes = torch.cat(boxes)
    image_of_box = [0] * 9 + [2] * 6
    levels = assign_fpn_levels(all_boxes, strides, output_size)
    assert len(set(levels.tolist())) >= 2  # the check below exercises more than one level
    for k in range(all_boxes.shape[0]):
        lvl = int(levels[k])
        roi = torch.cat([torch.tensor([float(image_of_box[k])]), all_boxes[k]])[None]
        direct = roi_align(features[lvl], roi, output_size, [1.0 / s for s in strides[lvl]], sampling_ratio)
        torch.testing.assert_close(out[k : k + 1], direct)

    out.sum().backward()
    used = set(levels[:9].tolist())  # image 2 is a detached copy: only image 0's boxes reach the leaves
    for lvl, leaf in enumerate(leaves):
        assert (leaf.grad is not None and leaf.grad.abs().sum() > 0) == (lvl in used)


@pytest.mark.parametrize("dims", [2, 3])
def test_multiscale_canonical_level_and_empty(dims: int) -> None:
    features, strides, _ = _pyramid(dims, batch=1, channels=2)
    pooler = MultiScaleRoIAlign(spatial_dims=dims, output_size=2, canonical_level=2, canonical_scale=48.0)
    # Without the canonical anchor a 48-voxel (2D) box is 6 cells on stride 8 (closest to 2 cells: stride 16 / 32);
    # with it, a box of geometric-mean extent 48 voxels goes to level 2.
    extent = [48.0] * dims if dims == 2 else [48.0 * 2, 48.0 * 2, 48.0 / 4]  # gm 48, anisotropic
    box = torch.tensor([_box(40.0, extent)])
    out = pooler(features, [box], strides)
    direct = roi_align(features[2], torch.cat([torch.zeros(1, 1), box], 1), 2, [1.0 / s for s in strides[2]])
    torch.testing.assert_close(out, direct)

    empty = pooler(features, [torch.zeros(0, 2 * dims)], strides)
    assert empty.shape == (0, 2, *([2] * dims))
    with pytest.raises(ValueError):
        MultiScaleRoIAlign(spatial_dims=dims, output_size=2, canonical_level=1)
    with pytest.raises(ValueError):
        pooler(features[:2], [box], strides)
