"""The lean matching IoU agrees with MONAI's box_iou."""

from __future__ import annotations

import pytest
import torch
from monai.data.box_utils import box_iou

from medrpn.ops.box_iou import pairwise_iou


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_matches_monai(spatial_dims: int) -> None:
    g = torch.Generator().manual_seed(spatial_dims)
    lo = torch.rand(50, spatial_dims, generator=g) * 40
    a = torch.cat([lo, lo + 0.5 + torch.rand(50, spatial_dims, generator=g) * 20], 1)
    lo = torch.rand(7, spatial_dims, generator=g) * 40
    b = torch.cat([lo, lo + 0.5 + torch.rand(7, spatial_dims, generator=g) * 20], 1)
    ours = pairwise_iou(b, a, chunk_size=13)
    torch.testing.assert_close(ours, torch.as_tensor(box_iou(b, a)).float(), atol=1e-5, rtol=1e-5)


def test_hand_computed_and_degenerate() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(pairwise_iou(a, b), torch.tensor([[1.0 / 7.0, 0.0, 0.0]]))
    assert pairwise_iou(b[2:], b[2:]).item() == 0.0  # empty union: 0, not NaN
