"""Dense lesion-map targets and loss (Retina U-Net's auxiliary supervision)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medrpn.training.lesion_map import LesionMapLoss, lesion_map_loss, lesion_map_targets


@pytest.mark.parametrize("d", [2, 3])
def test_ellipsoid_cells_by_hand(d: int) -> None:
    # a box 8 voxels across centred at 8 on a stride-2 grid: cell centres 1, 3, 5, ... -> along each axis the
    # cells with centres 5, 7, 9, 11 (indices 2..5) lie within the half-extent of 4.
    box = torch.tensor([[4.0] * d + [12.0] * d])
    t = lesion_map_targets([box], (8,) * d, (2,) * d)[0, 0]
    expected = torch.zeros((8,) * d)
    for idx in itertools.product(range(8), repeat=d):
        centre = torch.tensor([(i + 0.5) * 2 for i in idx])
        if float((((centre - 8.0) / 4.0) ** 2).sum()) <= 1.0:
            expected[idx] = 1.0
    assert torch.equal((t > 0).float(), expected) and set(t.unique().tolist()) == {0, 1}
    assert t[(4,) * d] == 1 and t[(2,) * d] == 0  # the box corner cell is outside the ellipsoid


@pytest.mark.parametrize("d", [2, 3])
def test_lesion_smaller_than_a_cell_keeps_its_centre_cell(d: int) -> None:
    # 1-voxel lesion at voxel 6 (centre 6.5) on a stride-4 grid: no cell centre (2, 6, 10, ...) is inside it
    box = torch.tensor([[6.0] * d + [7.0] * d])
    t = lesion_map_targets([box], (4,) * d, (4,) * d)[0, 0]
    assert int(t.sum()) == 1 and t[(1,) * d] == 1


def test_anisotropic_stride_and_empty_images() -> None:
    boxes = [torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0, 8.0]]), torch.zeros(0, 6)]
    t = lesion_map_targets(boxes, (4, 4, 4), (1, 1, 2))
    assert t.shape == (2, 1, 4, 4, 4)
    assert t[1].sum() == 0
    # z stride 2: cells 0 and 1 (centres 1, 3) lie inside the z half-extent 4 around 4, cell 3 (centre 7) too
    assert t[0, 0, 2, 2].tolist() == [1.0, 1.0, 1.0, 1.0]


@settings(max_examples=40, deadline=None)
@given(
    d=st.sampled_from([2, 3]),
    lo=st.lists(st.floats(0.0, 20.0), min_size=3, max_size=3),
    size=st.lists(st.floats(0.2, 12.0), min_size=3, max_size=3),
    stride=st.sampled_from([1, 2, 4]),
)
def test_positive_cells_are_inside_the_box_or_hold_its_centre(
    d: int, lo: list[float], size: list[float], stride: int
) -> None:
    box = torch.tensor([lo[:d] + [a + b for a, b in zip(lo[:d], size[:d])]])
    grid = (32 // stride,) * d
    t = lesion_map_targets([box], grid, (stride,) * d)[0, 0]
    assert t.sum() >= 1
    mid = (box[0, :d] + box[0, d:]) / 2
    centre_cell = tuple(int(torch.div(m, stride, rounding_mode="floor")) for m in mid)
    for idx in t.nonzero().tolist():
        c = torch.tensor([(i + 0.5) * stride for i in idx])
        inside = bool(((c >= box[0, :d]) & (c <= box[0, d:])).all())
        assert inside or tuple(idx) == centre_cell


def test_batch_wide_lesion_indices_and_overlaps_go_to_the_deepest_ellipsoid() -> None:
    big = [0.0, 0.0, 16.0, 16.0]
    small = [5.0, 5.0, 7.0, 7.0]  # inside the big one, centre cell (3, 3) at stride 2
    t = lesion_map_targets([torch.tensor([big, small]), torch.tensor([small])], (8, 8), (2, 2))
    assert t[0, 0, 3, 3] == 2 and t[0, 0, 4, 4] == 1  # the small lesion owns its centre, the big one the rest
    assert set(t[1].unique().tolist()) == {0, 3}  # image 1's lesion is the batch's third


def _ce(logit: float, target: float) -> float:
    return float(torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logit), torch.tensor(target)))


def test_lesion_balanced_loss_weighs_every_lesion_alike_by_hand() -> None:
    ids = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    ids[0, 0, 0:3, 0:3] = 1  # a 9-cell lesion
    ids[0, 0, 5, 5] = 2  # a 1-cell lesion
    logits = torch.full((1, 1, 6, 6), -1.0)
    logits[0, 0, 0:3, 0:3] = 2.0
    logits[0, 0, 5, 5] = -3.0  # the small lesion is missed
    expected = _ce(-1.0, 0.0) + (_ce(2.0, 1.0) + _ce(-3.0, 1.0)) / 2
    assert float(lesion_map_loss(logits, ids, kind="lesion_balanced")) == pytest.approx(expected, rel=1e-6)
    # under plain cross-entropy the missed 1-cell lesion is one cell of 36
    plain = (26 * _ce(-1.0, 0.0) + 9 * _ce(2.0, 1.0) + _ce(-3.0, 1.0)) / 36
    assert float(lesion_map_loss(logits, ids, kind="bce_dice", dice_weight=0.0)) == pytest.approx(plain, rel=1e-6)
    # no lesion: background cross-entropy only
    assert float(lesion_map_loss(logits, torch.zeros_like(ids), kind="lesion_balanced")) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))), rel=1e-6
    )


@pytest.mark.parametrize("kind", ["lesion_balanced", "bce_dice"])
def test_loss_trains(kind: LesionMapLoss) -> None:
    ids = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    ids[0, 0, 2:4, 2:4] = 1
    logits = torch.zeros(1, 1, 6, 6, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.3)
    first = float(lesion_map_loss(logits, ids, kind=kind))
    for _ in range(50):
        opt.zero_grad()
        loss = lesion_map_loss(logits, ids, kind=kind)
        loss.backward()
        opt.step()
    assert float(loss) < 0.3 * first


def test_bce_dice_by_hand_and_bad_arguments() -> None:
    ids = torch.zeros(1, 1, 6, 6, dtype=torch.long)
    ids[0, 0, 2:4, 2:4] = 1
    zero = torch.zeros(1, 1, 6, 6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(zero, (ids > 0).float())
    dice = 2 * 0.5 * 4 / (0.5 * 36 + 4)
    assert lesion_map_loss(zero, ids, kind="bce_dice") == pytest.approx(float(bce) + 1 - dice, rel=1e-6)
    # no lesion in the batch: cross-entropy only
    assert lesion_map_loss(zero, torch.zeros_like(ids), kind="bce_dice") == pytest.approx(
        float(torch.log(torch.tensor(2.0)))
    )
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_map_loss(zero, torch.zeros(1, 1, 5, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="kind"):
        lesion_map_loss(zero, ids, kind="dice")  # type: ignore[arg-type]
