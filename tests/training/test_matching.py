"""Hand-built matcher cases: thresholds, ignore band, low-quality matches, chunking, ATSS."""

from __future__ import annotations

import pytest
import torch

from medrpn.training.matching import ATSSMatcher, IoUMatcher


def _box(lo: list[float], hi: list[float]) -> list[float]:
    return lo + hi


def _cube(x0: float, size: float, d: int) -> list[float]:
    return _box([x0] * d, [x0 + size] * d)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_thresholds_and_ignore_band(spatial_dims: int) -> None:
    d = spatial_dims
    gt = torch.tensor([_cube(0, 10, d)])
    # exact overlap (IoU 1), IoU 0.5-ish (ignored), tiny overlap (negative), far (negative)
    half = _box([0.0] * d, [10.0] + [10.0] * (d - 1))
    half[d] = 5.0  # half the box along axis 0 -> IoU 0.5
    anchors = torch.tensor([_cube(0, 10, d), half, _cube(9, 10, d), _cube(50, 10, d)])
    m = IoUMatcher(positive_threshold=0.7, negative_threshold=0.3, allow_low_quality_matches=False)(gt, anchors)
    assert m.labels.tolist() == [1, -1, 0, 0]
    assert m.matched_gt.tolist()[0] == 0
    torch.testing.assert_close(m.max_iou[:2], torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_low_quality_match_gives_every_box_its_best_anchor(spatial_dims: int) -> None:
    d = spatial_dims
    # the second box (a tiny lesion) overlaps anchors only weakly; its best anchor must become positive
    gt = torch.tensor([_cube(0, 10, d), _cube(40, 2, d)])
    anchors = torch.tensor([_cube(0, 10, d), _cube(39, 8, d), _cube(38, 16, d), _cube(80, 4, d)])
    strict = IoUMatcher(allow_low_quality_matches=False)(gt, anchors)
    assert strict.labels.tolist() == [1, 0, 0, 0]
    loose = IoUMatcher(allow_low_quality_matches=True)(gt, anchors)
    assert loose.labels.tolist() == [1, 1, 0, 0]
    assert loose.matched_gt.tolist()[:2] == [0, 1]


def test_low_quality_ties_are_all_positive() -> None:
    gt = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [-4.0, -4.0, 4.0, 4.0], [20.0, 20.0, 28.0, 28.0]])
    m = IoUMatcher()(gt, anchors)  # both overlapping anchors have IoU 0.25, the best
    assert m.labels.tolist() == [1, 1, 0]


def test_no_ground_truth_means_all_negative() -> None:
    anchors = torch.rand(7, 6) + torch.tensor([0, 0, 0, 1, 1, 1.0])
    m = IoUMatcher()(torch.zeros(0, 6), anchors)
    assert m.labels.tolist() == [0] * 7


def test_chunking_does_not_change_the_result() -> None:
    g = torch.Generator().manual_seed(1)
    lo = torch.rand(500, 3, generator=g) * 50
    anchors = torch.cat([lo, lo + 2 + torch.rand(500, 3, generator=g) * 10], 1)
    lo_gt = torch.rand(4, 3, generator=g) * 50
    gt = torch.cat([lo_gt, lo_gt + 3 + torch.rand(4, 3, generator=g) * 8], 1)
    a = IoUMatcher(positive_threshold=0.5, negative_threshold=0.2)(gt, anchors)
    b = IoUMatcher(positive_threshold=0.5, negative_threshold=0.2, chunk_size=37)(gt, anchors)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.matched_gt, b.matched_gt)


def test_invalid_thresholds() -> None:
    with pytest.raises(ValueError, match="negative_threshold"):
        IoUMatcher(positive_threshold=0.3, negative_threshold=0.5)


def test_atss_matches_the_closest_well_overlapping_anchors() -> None:
    gt = torch.tensor([[10.0, 10.0, 10.0, 18.0, 18.0, 18.0]])
    centres = torch.arange(0, 32, 4.0) + 2.0
    grid = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), -1).reshape(-1, 3)
    anchors = torch.cat([grid - 4, grid + 4], 1)
    m = ATSSMatcher(num_candidates=4)(gt, anchors, [anchors.shape[0]], 1)
    assert set(m.labels.unique().tolist()) <= {0, 1}
    pos = anchors[m.labels == 1]
    assert len(pos) >= 1
    assert (m.max_iou[m.labels == 1] > 0.2).all()
    assert (m.matched_gt[m.labels == 1] == 0).all()
