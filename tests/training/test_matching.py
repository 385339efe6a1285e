"""Hand-built matcher cases: thresholds, ignore band, low-quality matches, chunking, ATSS."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medrpn.ops.box_iou import pairwise_iou
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
    with pytest.raises(ValueError, match="min_positives_per_box"):
        IoUMatcher(min_positives_per_box=-1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_min_positives_gives_a_small_box_its_k_best_anchors(spatial_dims: int) -> None:
    d = spatial_dims
    # a 2-unit lesion on a grid of 4-unit anchors: the thresholds make none positive, the low-quality rule one
    gt = torch.tensor([_cube(1, 2, d)])
    anchors = torch.tensor([_cube(0, 4, d), _cube(1.5, 4, d), _cube(-2, 4, d), _cube(2.5, 4, d), _cube(30, 4, d)])
    one = IoUMatcher(positive_threshold=0.5, negative_threshold=0.05)(gt, anchors)
    assert one.labels.tolist().count(1) == 1
    three = IoUMatcher(positive_threshold=0.5, negative_threshold=0.05, min_positives_per_box=3)(gt, anchors)
    best3 = torch.argsort(three.max_iou, descending=True)[:3]
    assert sorted(torch.nonzero(three.labels == 1).squeeze(1).tolist()) == sorted(best3.tolist())
    assert three.labels[4] == 0  # no overlap: never made positive, however large k
    many = IoUMatcher(positive_threshold=0.5, negative_threshold=0.05, min_positives_per_box=50)(gt, anchors)
    assert many.labels.tolist() == [1, 1, 1, 1, 0]


def test_min_positives_keeps_existing_matches() -> None:
    # box 0 owns anchor 0 by threshold; box 1's top 2 are anchor 1 (its own) and anchor 0, which stays box 0's
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [8.0, 8.0, 11.0, 11.0]])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [9.0, 9.0, 13.0, 13.0], [50.0, 50.0, 54.0, 54.0]])
    m = IoUMatcher(positive_threshold=0.7, negative_threshold=0.3, min_positives_per_box=2)(gt, anchors)
    assert m.labels.tolist() == [1, 1, 0]
    assert m.matched_gt.tolist()[:2] == [0, 1]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), chunk=st.integers(3, 50))
def test_min_positives_matches_a_brute_force_reference(seed: int, k: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(60, 3, generator=g) * 30
    anchors = torch.cat([lo, lo + 1 + torch.rand(60, 3, generator=g) * 6], 1)
    lo_gt = torch.rand(3, 3, generator=g) * 30
    gt = torch.cat([lo_gt, lo_gt + 0.5 + torch.rand(3, 3, generator=g) * 4], 1)
    m = IoUMatcher(positive_threshold=0.4, negative_threshold=0.1, min_positives_per_box=k, chunk_size=chunk)(
        gt, anchors
    )
    base = IoUMatcher(positive_threshold=0.4, negative_threshold=0.1)(gt, anchors)
    iou = pairwise_iou(gt, anchors)
    # everything positive before stays positive with the same box
    was = base.labels == 1
    assert bool((m.labels[was] == 1).all())
    assert torch.equal(m.matched_gt[was], base.matched_gt[was])
    # every box's k best overlapping anchors are positive (for it or for a box with a higher IoU there)
    for j in range(gt.shape[0]):
        for a in torch.argsort(iou[j], descending=True, stable=True)[:k].tolist():
            if iou[j, a] > 0:
                assert m.labels[a] == 1
                assert iou[m.matched_gt[a], a] >= iou[j, a] or was[a]
    # and nothing else became positive
    extra = (m.labels == 1) & ~was
    topk = torch.zeros_like(extra)
    for j in range(gt.shape[0]):
        topk[torch.argsort(iou[j], descending=True, stable=True)[:k]] = True
    assert bool((~extra | topk).all())


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
