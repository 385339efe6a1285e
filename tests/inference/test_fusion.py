"""Weighted fusion of test-time-augmentation views: hand-built cases and invariants, 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medrpn.inference.fusion import fuse_views
from medrpn.inference.whole_scan import WholeScanConfig
from medrpn.modeling.structures import Detections


def _dets(
    boxes: list[list[float]], scores: list[float], dims: int, probs: list[list[float]] | None = None
) -> Detections:
    s = torch.tensor(scores, dtype=torch.float32)
    p = torch.tensor(probs, dtype=torch.float32) if probs is not None else torch.stack([s, 1 - s], dim=1)
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 2 * dims),
        s,
        p.argmax(dim=1) if len(s) else torch.zeros(0, dtype=torch.long),
        p.reshape(-1, 2),
        s.clone(),
    )


def _box(dims: int, lo: float, hi: float) -> list[float]:
    return [lo] * dims + [hi] * dims


@pytest.mark.parametrize("dims", [2, 3])
def test_agreeing_views_keep_the_mean_score_and_the_weighted_box(dims: int) -> None:
    views = [
        _dets([_box(dims, 10, 20)], [0.9], dims),
        _dets([_box(dims, 11, 21)], [0.6], dims),
        _dets([_box(dims, 10, 20)], [0.3], dims),
    ]
    out = fuse_views(views, 0.3)
    assert len(out) == 1
    np.testing.assert_allclose(out.scores.numpy(), [0.6], rtol=1e-6)
    lo = (10 * 0.9 + 11 * 0.6 + 10 * 0.3) / 1.8
    np.testing.assert_allclose(out.boxes.numpy(), [[lo] * dims + [lo + 10] * dims], rtol=1e-6)
    np.testing.assert_allclose(out.objectness.numpy(), [0.6], rtol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_a_finding_seen_in_one_view_only_sinks_below_a_consistent_one(dims: int) -> None:
    consistent = _box(dims, 0, 8)
    lookalike = _box(dims, 40, 46)
    views = [
        _dets([lookalike, consistent], [0.95, 0.6], dims),
        _dets([consistent], [0.55], dims),
        _dets([consistent], [0.65], dims),
    ]
    out = fuse_views(views, 0.3)
    np.testing.assert_allclose(out.scores.numpy(), [0.6, 0.95 / 3], rtol=1e-6)
    np.testing.assert_allclose(out.boxes[1].numpy(), lookalike)


@pytest.mark.parametrize("dims", [2, 3])
def test_two_detections_of_the_same_view_are_never_fused(dims: int) -> None:
    # both overlap the other view's box; only the better one of view 0 joins it
    views = [_dets([_box(dims, 0, 10), _box(dims, 1, 11)], [0.8, 0.7], dims), _dets([_box(dims, 0, 10)], [0.6], dims)]
    out = fuse_views(views, 0.3)
    assert len(out) == 2
    np.testing.assert_allclose(out.scores.numpy(), [0.7, 0.35], rtol=1e-6)


def test_fused_findings_below_min_score_are_dropped() -> None:
    views = [_dets([_box(3, 0, 10), _box(3, 30, 40)], [0.9, 0.05], 3), _dets([_box(3, 0, 10)], [0.7], 3)]
    out = fuse_views(views, 0.3, min_score=0.03)  # the one-view finding fuses to 0.025
    np.testing.assert_allclose(out.scores.numpy(), [0.8], rtol=1e-6)
    assert len(fuse_views(views, 0.3)) == 2


def test_class_probabilities_are_score_weighted_and_set_the_label() -> None:
    views = [
        _dets([_box(3, 0, 10)], [0.9], 3, probs=[[0.2, 0.7]]),
        _dets([_box(3, 0, 10)], [0.1], 3, probs=[[0.09, 0.01]]),
    ]
    out = fuse_views(views, 0.5)
    np.testing.assert_allclose(
        out.class_probs.numpy(), [[(0.2 * 0.9 + 0.09 * 0.1), (0.7 * 0.9 + 0.01 * 0.1)]], rtol=1e-6
    )
    assert out.labels.tolist() == [1]


def test_one_view_is_returned_unchanged_but_sorted() -> None:
    view = _dets([_box(2, 0, 5), _box(2, 20, 30)], [0.2, 0.7], 2)
    out = fuse_views([view], 0.3)
    np.testing.assert_allclose(out.scores.numpy(), [0.7, 0.2])
    np.testing.assert_allclose(out.boxes.numpy(), [_box(2, 20, 30), _box(2, 0, 5)])


def test_empty_views_and_bad_arguments() -> None:
    empty = Detections.empty(3, 2)
    assert len(fuse_views([empty, empty], 0.3)) == 0
    with pytest.raises(ValueError, match="at least one view"):
        fuse_views([], 0.3)
    with pytest.raises(ValueError, match="iou_threshold"):
        fuse_views([empty], 0.0)
    with pytest.raises(ValueError, match="flip_merge"):
        WholeScanConfig(flip_merge="median")  # type: ignore[arg-type]


@st.composite
def _views(draw: st.DrawFn) -> tuple[int, list[Detections]]:
    dims = draw(st.sampled_from([2, 3]))
    n_views = draw(st.integers(1, 4))
    views = []
    for _ in range(n_views):
        n = draw(st.integers(0, 6))
        lo = draw(st.lists(st.lists(st.floats(0, 50), min_size=dims, max_size=dims), min_size=n, max_size=n))
        ext = draw(st.lists(st.lists(st.floats(1, 20), min_size=dims, max_size=dims), min_size=n, max_size=n))
        scores = draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n))
        boxes = [a + [x + e for x, e in zip(a, b)] for a, b in zip(lo, ext)]
        views.append(_dets(boxes, scores, dims))
    return n_views, views


@settings(max_examples=60, deadline=None)
@given(_views(), st.floats(0.05, 0.9))
def test_fusion_conserves_score_mass_and_stays_inside_the_members(
    data: tuple[int, list[Detections]], iou: float
) -> None:
    n_views, views = data
    out = fuse_views(views, iou)
    total = sum(float(v.scores.sum()) for v in views)
    # every detection lands in exactly one cluster: the fused scores sum to the total / number of views
    np.testing.assert_allclose(float(out.scores.sum()) * n_views, total, rtol=1e-5, atol=1e-6)
    assert len(out) >= max(len(v) for v in views)
    assert len(out) <= sum(len(v) for v in views)
    if len(out):
        best = max(float(v.scores.max()) for v in views if len(v))
        assert float(out.scores.max()) <= best + 1e-6
        assert bool((out.scores[:-1] >= out.scores[1:]).all())
        every = torch.cat([v.boxes for v in views])
        d = every.shape[1] // 2
        assert bool((out.boxes[:, :d] >= every[:, :d].min(0).values - 1e-4).all())
        assert bool((out.boxes[:, d:] <= every[:, d:].max(0).values + 1e-4).all())
