"""Tests for :func:`medrpn.ops.roi_align.roi_align` against a slow, explicit-loop reference (2D and 3D)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
import torch

import medrpn.ops.roi_align as roi_align_module
from medrpn.ops.roi_align import roi_align


def reference_roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: Sequence[int],
    spatial_scale: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """Obviously-correct torchvision-semantics RoIAlign: Python loops over RoIs, bins, samples and corners."""
    dims = features.dim() - 2
    feats = features.detach().to(torch.float64).movedim(1, -1)  # channel-last: feats[(b, *index)] is (C,)
    channels = feats.shape[-1]
    spatial = feats.shape[1:-1]
    out = torch.zeros(rois.shape[0], *output_size, channels, dtype=torch.float64)
    for k in range(rois.shape[0]):
        roi = [float(v) for v in rois[k]]
        batch = int(roi[0])
        offset = 0.5 if aligned else 0.0
        start = [roi[1 + d] * spatial_scale[d] - offset for d in range(dims)]
        end = [roi[1 + dims + d] * spatial_scale[d] - offset for d in range(dims)]
        size = [end[d] - start[d] for d in range(dims)]
        if not aligned:
            size = [max(s, 1.0) for s in size]
        bin_size = [size[d] / output_size[d] for d in range(dims)]
        grid = [sampling_ratio if sampling_ratio > 0 else math.ceil(size[d] / output_size[d]) for d in range(dims)]
        count = max(math.prod(grid), 1)
        for p in itertools.product(*[range(o) for o in output_size]):
            acc = torch.zeros(channels, dtype=torch.float64)
            for i in itertools.product(*[range(max(g, 0)) for g in grid]):
                coord = [start[d] + p[d] * bin_size[d] + (i[d] + 0.5) * bin_size[d] / grid[d] for d in range(dims)]
                if any(coord[d] < -1.0 or coord[d] > spatial[d] for d in range(dims)):
                    continue
                lows, highs, fracs = [], [], []
                for d in range(dims):
                    c = max(coord[d], 0.0)
                    low = int(c)
                    if low >= spatial[d] - 1:
                        low = high = spatial[d] - 1
                        c = float(low)
                    else:
                        high = low + 1
                    lows.append(low)
                    highs.append(high)
                    fracs.append(c - low)
                for corner in itertools.product((0, 1), repeat=dims):
                    weight = 1.0
                    index = []
                    for d in range(dims):
                        weight *= fracs[d] if corner[d] else 1.0 - fracs[d]
                        index.append(highs[d] if corner[d] else lows[d])
                    acc += weight * feats[(batch, *index)]
            out[(k, *p)] = acc / count
    return out.movedim(-1, 1)


def _random_case(dims: int, num_rois: int = 6, batch: int = 2, channels: int = 3, seed: int = 0):
    """Random features and non-integer RoIs, many partly (or fully) outside the feature map."""
    gen = torch.Generator().manual_seed(seed)
    spatial = (7, 5, 4)[:dims]
    scale = (0.5, 0.25, 1.0)[:dims]  # anisotropic in 3D
    image_extent = torch.tensor([s / sc for s, sc in zip(spatial, scale)])
    features = torch.randn(batch, channels, *spatial, generator=gen)
    low = torch.rand(num_rois, dims, generator=gen) * (image_extent + 6.0) - 4.0
    extent = torch.rand(num_rois, dims, generator=gen) * image_extent * 0.9
    batch_idx = torch.randint(0, batch, (num_rois, 1), generator=gen).float()
    rois = torch.cat([batch_idx, low, low + extent], dim=1)
    return features, rois, scale


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3, 0])
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_reference(dims: int, sampling_ratio: int, aligned: bool) -> None:
    features, rois, scale = _random_case(dims, seed=10 * dims + sampling_ratio)
    output_size = (2, 3, 2)[:dims]
    got = roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
    want = reference_roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
    assert got.shape == (rois.shape[0], features.shape[1], *output_size)
    assert got.dtype == features.dtype
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_chunked_evaluation_matches(dims: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny block budget forces chunking over RoIs and interpolation terms; the result must not change."""
    features, rois, scale = _random_case(dims, num_rois=5, seed=3)
    features.requires_grad_(True)
    full = roi_align(features, rois, 3, scale, 0)
    (grad_full,) = torch.autograd.grad(full.square().sum(), features)
    monkeypatch.setattr(roi_align_module, "_MAX_BLOCK_ELEMS", 7)
    chunked = roi_align(features, rois, 3, scale, 0)
    (grad_chunked,) = torch.autograd.grad(chunked.square().sum(), features)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(grad_chunked, grad_full)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 0])
def test_constant_map_gives_constant(dims: int, sampling_ratio: int) -> None:
    spatial = (6, 5, 4)[:dims]
    features = torch.full((1, 2, *spatial), 3.25)
    # Boxes inside the (stride-2) image extent, including ones touching its borders.
    boxes = [[0.0] * dims + [2.0 * s for s in spatial], [0.7, 1.3, 0.2][:dims] + [5.1, 9.9, 3.3][:dims]]
    rois = torch.tensor([[0.0, *b] for b in boxes])
    out = roi_align(features, rois, (3, 2, 2)[:dims], 0.5, sampling_ratio)
    torch.testing.assert_close(out, torch.full_like(out, 3.25))


@pytest.mark.parametrize("dims", [2, 3])
def test_linear_ramp_gives_bin_centres(dims: int) -> None:
    """Multilinear interpolation is exact on f = a + sum_d b_d * i_d, so a bin is f at its centre."""
    spatial = (8, 6, 5)[:dims]
    scale = (0.5, 0.25, 1.0)[:dims]
    a, slopes = 1.5, (2.0, -0.75, 0.5)[:dims]
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in spatial], indexing="ij")
    ramp = torch.full(spatial, a, dtype=torch.float64)
    for b, g in zip(slopes, grids):
        ramp = ramp + b * g
    features = ramp[None, None].clone()
    # Image box -> feature coords start = lo * scale - 0.5; keep all samples within [0, size - 1].
    lo = (2.0, 4.0, 1.0)[:dims]
    hi = (12.0, 18.0, 4.0)[:dims]
    output_size = (2, 3, 3)[:dims]
    rois = torch.tensor([[0.0, *lo, *hi]], dtype=torch.float64)
    for sampling_ratio in (1, 2, 3):
        out = roi_align(features, rois, output_size, scale, sampling_ratio)[0, 0]
        expected = torch.full(output_size, a, dtype=torch.float64)
        for d in range(dims):
            start = lo[d] * scale[d] - 0.5
            bin_size = (hi[d] - lo[d]) * scale[d] / output_size[d]
            centres = start + (torch.arange(output_size[d], dtype=torch.float64) + 0.5) * bin_size
            shape = [1] * dims
            shape[d] = output_size[d]
            expected = expected + slopes[d] * centres.view(shape)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dims", [2, 3])
def test_single_cell_box(dims: int) -> None:
    """A box covering exactly cell c of a stride-s map, output 1 and sampling 1, returns that cell's value."""
    spatial = (5, 4, 3)[:dims]
    strides = (4.0, 2.0, 1.0)[:dims]
    features = torch.randn(2, 3, *spatial)
    for cell3 in [(0, 0, 0), (2, 3, 1), (4, 1, 2)]:
        cell = cell3[:dims]
        box = [c * s for c, s in zip(cell, strides)] + [(c + 1) * s for c, s in zip(cell, strides)]
        rois = torch.tensor([[1.0, *box]])
        out = roi_align(features, rois, 1, [1.0 / s for s in strides], 1)
        torch.testing.assert_close(out.flatten(2)[0, :, 0], features[1].movedim(0, -1)[cell])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_gradcheck(dims: int, sampling_ratio: int) -> None:
    features = torch.randn(2, 2, *(4, 3, 3)[:dims], dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [
            [0.0, *[0.3, -1.2, 0.5][:dims], *[3.7, 2.9, 2.2][:dims]],
            [1.0, *[1.1, 0.4, 0.0][:dims], *[2.6, 3.5, 3.0][:dims]],
        ],
        dtype=torch.float64,
    )

    def fn(x: torch.Tensor) -> torch.Tensor:
        return roi_align(x, rois, 2, 1.0, sampling_ratio)

    assert torch.autograd.gradcheck(fn, (features,))
    assert torch.autograd.gradgradcheck(fn, (features,))


def test_no_grad_to_rois_and_empty_input() -> None:
    features = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 1.0, 1.0, 4.0, 5.0, 3.0]], requires_grad=True)
    out = roi_align(features, rois, (2, 2, 1))
    out.sum().backward()
    assert rois.grad is None
    assert features.grad is not None and features.grad.abs().sum() > 0
    empty = roi_align(features, rois[:0], (2, 3, 4))
    assert empty.shape == (0, 4, 2, 3, 4)


def test_invalid_inputs() -> None:
    features = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError):
        roi_align(features, torch.zeros(1, 7), 2)  # 3D rois for 2D features
    with pytest.raises(ValueError):
        roi_align(features, torch.tensor([[2.0, 0.0, 0.0, 1.0, 1.0]]), 2)  # batch index out of range
    with pytest.raises(ValueError):
        roi_align(features, torch.zeros(1, 5), (2, 2, 2))
    with pytest.raises(ValueError):
        roi_align(features, torch.zeros(1, 5), 2, spatial_scale=(1.0, 1.0, 1.0))
