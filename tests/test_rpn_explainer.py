"""The logic of notebooks/how_rpn_works.ipynb: demo slice, anchors, matching/sampling counts, NMS, small lesion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from monai.data.box_utils import box_iou

from medrpn.rpn_explainer import (
    DemoRPN,
    DemoSlice,
    TrainingLog,
    anchors_at,
    build_demo_rpn,
    level_summary,
    make_demo_slice,
    nms_comparison,
    objectness_maps,
    plot_anchors,
    plot_nms,
    plot_objectness,
    plot_sampling,
    plot_small_lesion,
    plot_training,
    sampling_summary,
    small_lesion_report,
    torch_threads,
    train_demo_rpn,
)


@pytest.fixture(scope="module")
def demo() -> DemoSlice:
    return make_demo_slice()


@pytest.fixture(scope="module")
def trained(demo: DemoSlice) -> tuple[DemoRPN, TrainingLog]:
    model = build_demo_rpn(seed=0)
    log = train_demo_rpn(model, demo, steps=100, seed=0)
    return model, log


def test_demo_slice(demo: DemoSlice) -> None:
    assert demo.shape == (128, 96) and demo.image.dtype == np.float32
    assert demo.image.min() >= 0.0 and demo.image.max() <= 1.0
    assert demo.boxes.shape == (4, 4) and demo.diameters_mm == (20.0, 13.0, 8.0, 3.5)
    assert demo.smallest == 3
    w, h = demo.shape
    assert (demo.boxes[:, :2] >= 0).all() and (demo.boxes[:, 2] <= w).all() and (demo.boxes[:, 3] <= h).all()
    sizes = demo.boxes[:, 2:] - demo.boxes[:, :2]
    np.testing.assert_allclose(sizes, np.outer(demo.diameters_mm, 1.0 / np.asarray(demo.spacing_mm)), rtol=1e-9)
    for b in demo.boxes:  # the lesion (about +30 HU) is painted at the box centre, in the lung
        assert demo.hu[int((b[0] + b[2]) / 2), int((b[1] + b[3]) / 2)] > -300.0
    assert demo.tensor().shape == (1, 1, 128, 96)
    again = make_demo_slice()
    np.testing.assert_array_equal(again.image, demo.image)
    np.testing.assert_array_equal(again.boxes, demo.boxes)


def test_levels_and_anchor_positions(demo: DemoSlice) -> None:
    model = build_demo_rpn()
    levels = level_summary(model, demo.shape)
    assert [(lv.stride, lv.grid, lv.anchors_per_cell, lv.num_anchors) for lv in levels] == [
        ((2, 2), (64, 48), 3, 64 * 48 * 3),
        ((4, 4), (32, 24), 3, 32 * 24 * 3),
    ]
    np.testing.assert_allclose(levels[0].shapes.prod(axis=1), 36.0, rtol=1e-5)  # equal area, ratios 0.5/1/2
    assert "9216 anchors" in levels[0].describe()
    for level, cell in ((0, (10, 7)), (1, (3, 20))):
        a = anchors_at(model, demo.shape, level, cell)
        stride = levels[level].stride
        centres = (a[:, :2] + a[:, 2:]) / 2
        expected = torch.tensor([(c + 0.5) * s for c, s in zip(cell, stride)])
        torch.testing.assert_close(centres, expected.expand_as(centres))
        torch.testing.assert_close(a[:, 2:] - a[:, :2], torch.as_tensor(levels[level].shapes))


def test_sampling_counts_show_the_imbalance(demo: DemoSlice) -> None:
    s = sampling_summary(build_demo_rpn(), demo)
    assert s.num_anchors == 11520
    assert s.positives + s.negatives + s.ignored == s.num_anchors
    assert 0 < s.positives < 100 and s.negatives > 100 * s.positives
    assert s.batch_size == 256
    assert s.sampled_positives == min(s.positives, 128)
    assert s.sampled == 256 and s.sampled_negatives == 256 - s.sampled_positives
    assert int(s.sampled_pos.sum()) == s.sampled_positives and not (s.sampled_pos & s.sampled_neg).any()
    assert (s.match.labels[s.sampled_pos] == 1).all() and (s.match.labels[s.sampled_neg] == 0).all()
    text = s.describe()
    assert "11520 anchors" in text and f"{s.positives} positive" in text and "256" in text


def test_lesion_smaller_than_the_smallest_anchor(demo: DemoSlice) -> None:
    r = small_lesion_report(build_demo_rpn(), demo)
    assert r.index == demo.smallest
    assert max(r.size_vox) < min(r.smallest_anchor)
    assert r.smallest_anchor == pytest.approx((6.0, 6.0))
    # the whole lesion fits in the anchor: IoU = lesion area / anchor area
    assert r.best_iou == pytest.approx(r.size_vox[0] * r.size_vox[1] / 36.0, rel=1e-4)
    assert r.best_iou < r.negative_threshold
    assert r.positives_without_low_quality == 0
    assert r.positives_with_low_quality == len(r.best_anchors) >= 1 and r.gets_positive
    assert "low-quality" in r.describe()


def test_training_objectness_and_nms(demo: DemoSlice, trained: tuple[DemoRPN, TrainingLog]) -> None:
    model, log = trained
    assert log.steps == 100 and log.seconds < 60.0
    assert np.mean(log.losses[-10:]) < 0.3 * np.mean(log.losses[:10])
    assert log.recall >= 0.5
    maps = objectness_maps(model, demo)
    assert [m.shape for m in maps] == [(64, 48), (32, 24)]
    assert all(m.min() >= 0.0 and m.max() <= 1.0 for m in maps)
    # the cell on the largest lesion scores higher than a cell in the air outside the body
    b = demo.boxes[0]
    lvl = maps[1]
    assert lvl[int((b[0] + b[2]) / 8), int((b[1] + b[3]) / 8)] > lvl[0, 0]
    cmp = nms_comparison(model, demo)
    assert 0 < len(cmp.after) <= 20 < len(cmp.before)
    assert (cmp.after.scores[:-1] >= cmp.after.scores[1:]).all()
    iou_with_before = torch.as_tensor(box_iou(cmp.after.boxes, cmp.before.boxes))
    assert (iou_with_before.max(dim=1).values > 1 - 1e-6).all()  # NMS only removes boxes
    for lvl_id in cmp.after.levels.unique():
        kept = cmp.after.boxes[cmp.after.levels == lvl_id]
        iou = torch.as_tensor(box_iou(kept, kept)).fill_diagonal_(0)
        assert (iou <= cmp.nms_iou + 1e-6).all()
    assert "after NMS" in cmp.describe()


def test_plots(demo: DemoSlice, trained: tuple[DemoRPN, TrainingLog]) -> None:
    model, log = trained
    with torch_threads(1):
        figs = {
            "anchors": plot_anchors(model, demo),
            "objectness": plot_objectness(model, demo),
            "nms": plot_nms(nms_comparison(model, demo), demo),
            "sampling": plot_sampling(sampling_summary(model, demo), demo),
            "small": plot_small_lesion(small_lesion_report(model, demo), demo),
            "training": plot_training(log),
        }
    assert all(isinstance(f, Figure) for f in figs.values())
    anchor_axes = figs["anchors"].axes
    assert len(anchor_axes) == 3
    # per level: 4 lesion boxes + 3 anchors at the chosen cell; last panel: 4 lesions + 6 anchors
    assert [sum(isinstance(p, Rectangle) for p in a.patches) for a in anchor_axes] == [7, 7, 10]
    for fig in figs.values():
        fig.canvas.draw()  # type: ignore[attr-defined]


def test_torch_threads_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
