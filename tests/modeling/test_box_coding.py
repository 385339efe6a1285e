"""Box coding (MONAI's BoxCoder as the RPN uses it): round trip and the log-size clamp."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.rpn import RegionProposalNetwork


def _coder(spatial_dims: int):  # the coder exactly as the RPN builds it
    gen = AnchorGenerator(spatial_dims=spatial_dims, shapes=[[[4.0] * spatial_dims]])
    return RegionProposalNetwork(spatial_dims=spatial_dims, in_channels=4, anchor_generator=gen).box_coder


@settings(max_examples=40, deadline=None)
@given(
    spatial_dims=st.sampled_from([2, 3]),
    data=st.lists(st.floats(0.0, 100.0), min_size=12, max_size=12),
    extents=st.lists(st.floats(1.0, 50.0), min_size=6, max_size=6),  # ratio < 62.5: below the clamp
)
def test_encode_decode_round_trip(spatial_dims: int, data: list[float], extents: list[float]) -> None:
    d = spatial_dims
    lo_a = torch.tensor(data[:d]).unsqueeze(0)
    lo_g = torch.tensor(data[6 : 6 + d]).unsqueeze(0)
    anchor = torch.cat([lo_a, lo_a + torch.tensor(extents[:d])], 1)
    gt = torch.cat([lo_g, lo_g + torch.tensor(extents[3 : 3 + d])], 1)
    coder = _coder(d)
    deltas = coder.encode_single(gt, anchor)
    assert deltas.shape == (1, 2 * d)
    torch.testing.assert_close(coder.decode_single(deltas, anchor), gt, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hand_computed_deltas(spatial_dims: int) -> None:
    d = spatial_dims
    anchor = torch.tensor([[0.0] * d + [10.0] * d])
    gt = torch.tensor([[2.0] * d + [22.0] * d])  # centre +7, size x2
    deltas = _coder(d).encode_single(gt, anchor)
    torch.testing.assert_close(deltas, torch.tensor([[0.7] * d + [math.log(2.0)] * d]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_log_size_deltas_are_clamped(spatial_dims: int) -> None:
    d = spatial_dims
    anchor = torch.tensor([[0.0] * d + [16.0] * d])
    boxes = _coder(d).decode_single(torch.tensor([[0.0] * d + [50.0] * d]), anchor)
    extents = boxes[0, d:] - boxes[0, :d]
    torch.testing.assert_close(extents, torch.full((d,), 1000.0), rtol=1e-4, atol=1e-2)
