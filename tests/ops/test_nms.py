"""Tests for medrpn.ops.nms: exact agreement with MONAI's NMS on hand-built and random inputs, 2D and 3D."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data.box_utils import batched_nms as monai_batched_nms
from monai.data.box_utils import box_area, box_iou
from monai.data.box_utils import non_max_suppression as monai_nms

from medrpn.ops import nms as nms_module
from medrpn.ops.nms import batched_nms, nms

DIMS = [2, 3]


def _boxes(rows: list[list[float]], dims: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Build boxes from 2D rows ``[x0, y0, x1, y1]``; in 3D a unit z-extent ``[0, 1)`` is added (IoU unchanged)."""
    t = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)
    if dims == 3:
        zeros = torch.zeros(t.shape[0], 1, dtype=torch.float64)
        t = torch.cat([t[:, :2], zeros, t[:, 2:], zeros + 1], dim=1)
    return t.to(dtype)


def _check(boxes: torch.Tensor, scores: torch.Tensor, thr: float, k: int = -1, **kwargs: int) -> torch.Tensor:
    """Run ours and MONAI's; assert identical indices, dtype and device; return ours."""
    ours = nms(boxes, scores, thr, k, **kwargs)
    ref = monai_nms(boxes, scores, thr, k)
    assert ours.dtype == torch.int64
    assert ours.device == boxes.device
    assert ours.tolist() == ref.tolist(), (ours.tolist(), ref.tolist())
    return ours


@contextlib.contextmanager
def _stress(pair_chunk: int = 7) -> Iterator[None]:
    """Force every code path on small inputs: grid (never exhaustive), tiny pair chunks, binary-search cell lookups,
    the sequential fallback after a single parallel round, single-box first block and kept-box chunks."""
    with (
        mock.patch.object(nms_module, "_DENSE_PAIRS", 0),
        mock.patch.object(nms_module, "_FIRST_BLOCK", 1),
        mock.patch.object(nms_module, "_KEPT_CHUNK", 1),
        mock.patch.object(nms_module, "_PAIR_CHUNK", pair_chunk),
        mock.patch.object(nms_module, "_TABLE_CELLS", 0),
        mock.patch.object(nms_module, "_TABLE_CELLS_PER_BOX", 0),
        mock.patch.object(nms_module, "_MAX_ROUNDS", 1),
    ):
        yield


# --------------------------------------------------------------------------------------------- hand-built cases


@pytest.mark.parametrize("dims", DIMS)
def test_ties_keep_input_order(dims: int) -> None:
    # Boxes 0 and 1 overlap (IoU 0.9), box 2 is far away; all scores equal: the stable sort keeps input order.
    boxes = _boxes([[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]], dims)
    scores = torch.ones(3)
    assert _check(boxes, scores, 0.5).tolist() == [0, 2]
    # Swapped pair: the first of the tie still wins (index 0 is now the former box 1).
    assert _check(boxes[[1, 0, 2]], scores, 0.5).tolist() == [0, 2]
    # Partial ties: the higher score wins regardless of position.
    assert _check(boxes, torch.tensor([0.5, 0.9, 0.5]), 0.5).tolist() == [1, 2]


@pytest.mark.parametrize("dims", DIMS)
def test_identical_boxes(dims: int) -> None:
    boxes = _boxes([[3, 4, 9, 12]] * 5, dims)
    scores = torch.tensor([0.2, 0.7, 0.7, 0.1, 0.7])
    assert _check(boxes, scores, 0.5).tolist() == [1]
    assert _check(boxes, scores, 0.99).tolist() == [1]
    # IoU of identical boxes is area / (area + eps) < 1, so a threshold of 1.0 keeps all of them (sorted).
    assert _check(boxes, scores, 1.0).tolist() == [1, 2, 4, 0, 3]


@pytest.mark.parametrize("dims", DIMS)
def test_nested_boxes(dims: int) -> None:
    # IoU(inner, outer) = 16 / 100.
    boxes = _boxes([[0, 0, 10, 10], [2, 2, 6, 6], [1, 1, 9, 9]], dims)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert _check(boxes, scores, 0.5).tolist() == [0, 1]  # box 2 (IoU 0.64 with box 0) goes
    assert _check(boxes, scores, 0.1).tolist() == [0]
    assert _check(boxes, scores, 0.7).tolist() == [0, 1, 2]


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exactly_at_threshold(dims: int, dtype: torch.dtype) -> None:
    boxes = _boxes([[0, 0, 3, 1], [1, 0, 3, 1]], dims, dtype)  # IoU 2/3 (minus eps), not representable exactly
    scores = torch.tensor([0.9, 0.8])
    iou32 = box_iou(boxes[:1].float(), boxes[1:].float())[0, 0]
    at = float(iou32)
    below = float(torch.nextafter(iou32, torch.tensor(0.0)))
    assert _check(boxes, scores, at).tolist() == [0, 1]  # IoU <= threshold is kept
    assert _check(boxes, scores, below).tolist() == [0]  # one float32 ulp below: suppressed
    # A float64 threshold a hair below the float32 IoU: MONAI compares in the boxes' dtype, so float32 boxes
    # (threshold rounded to float32 == IoU) keep the box, float64 boxes (exact comparison) suppress it.
    hair = at - abs(at) * 2.0**-40
    assert _check(boxes, scores, hair).tolist() == ([0, 1] if dtype == torch.float32 else [0])


@pytest.mark.parametrize("dims", DIMS)
def test_empty_and_single(dims: int) -> None:
    empty = torch.zeros(0, 2 * dims)
    out = nms(empty, torch.zeros(0), 0.5)
    assert out.dtype == torch.int64 and out.shape == (0,)
    assert monai_nms(empty, torch.zeros(0), 0.5).shape == (0,)
    out = batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert out.dtype == torch.int64 and out.shape == (0,)
    one = _boxes([[1, 2, 3, 4]], dims)
    for k in (-1, 1, 5):
        assert _check(one, torch.tensor([0.3]), 0.5, k).tolist() == [0]


@pytest.mark.parametrize("dims", DIMS)
def test_max_proposals(dims: int) -> None:
    rows = [[10 * i, 0, 10 * i + 8, 8] for i in range(6)] + [[1, 0, 9, 8]]  # 6 disjoint boxes + 1 duplicate
    boxes = _boxes(rows, dims)
    scores = torch.tensor([0.1, 0.6, 0.3, 0.9, 0.5, 0.2, 0.95])
    full = _check(boxes, scores, 0.5)
    assert full.tolist() == [6, 3, 1, 4, 2, 5]
    for k in (1, 2, 3, 6, 7, 100):
        assert _check(boxes, scores, 0.5, k).tolist() == full[:k].tolist()
        assert _check(boxes, scores, 0.5, k, block_size=2).tolist() == full[:k].tolist()
    assert _check(boxes, scores, 0.5, 0).tolist() == full.tolist()  # 0 means "no limit", like -1


@pytest.mark.parametrize("dims", DIMS)
def test_degenerate_boxes(dims: int) -> None:
    # Zero-width boxes have IoU 0 with everything: never suppressed, never suppressing (for thresholds >= 0).
    boxes = _boxes([[0, 0, 0, 10], [0, 0, 10, 10], [5, 5, 5, 5], [0, 0, 10, 10], [2, 2, 8, 2]], dims)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert _check(boxes, scores, 0.5).tolist() == [0, 1, 2, 4]
    assert _check(boxes, scores, 0.0).tolist() == [0, 1, 2, 4]
    assert _check(boxes, scores, -0.0).tolist() == [0, 1, 2, 4]
    assert _check(boxes, scores, -0.1).tolist() == [0]  # a negative threshold suppresses even IoU 0


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 1.0, -1.0, 2.0])
def test_thresholds_range(dims: int, thr: float) -> None:
    g = torch.Generator().manual_seed(1)
    lo = torch.randint(0, 20, (60, dims), generator=g).float()
    boxes = torch.cat([lo, lo + torch.randint(1, 8, (60, dims), generator=g)], dim=1)
    _check(boxes, torch.rand(60, generator=g), thr)


@pytest.mark.parametrize("dims", DIMS)
def test_integer_boxes_and_float_scores(dims: int) -> None:
    # MONAI casts scores to the boxes' dtype: integer boxes make 0.2 / 0.7 / 0.9 all tie at 0.
    boxes = _boxes([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dims).long()
    scores = torch.tensor([0.2, 0.9, 0.7])
    assert _check(boxes, scores, 0.5).tolist() == [0, 2]


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int32, torch.int64])
def test_other_dtypes(dims: int, dtype: torch.dtype) -> None:
    # Half-precision IoUs are rounded to half before the comparison, integer boxes round the scores: as MONAI.
    g = torch.Generator().manual_seed(4)
    lo = torch.randint(0, 40, (150, dims), generator=g)
    boxes = torch.cat([lo, lo + torch.randint(1, 12, (150, dims), generator=g)], dim=1).to(dtype)
    scores = torch.rand(150, generator=g) * 3
    for thr in (0.3, 0.5, 0.7):
        _check(boxes, scores, thr)
        _check(boxes, scores, thr, block_size=16)
    # A tiny negative threshold rounds to -0.0 in float16 (IoU 0 is then kept) but stays negative otherwise.
    out = _check(boxes, scores, -1e-10)
    assert (out.numel() > 1) == (dtype == torch.float16)


@pytest.mark.parametrize("dims", DIMS)
def test_metatensor_and_grad_inputs(dims: int) -> None:
    from monai.data import MetaTensor

    g = torch.Generator().manual_seed(6)
    lo = torch.rand(80, dims, generator=g) * 30
    boxes = torch.cat([lo, lo + 2 + torch.rand(80, dims, generator=g) * 8], dim=1)
    scores = torch.rand(80, generator=g)
    ref = monai_nms(boxes, scores, 0.4).tolist()
    out = nms(MetaTensor(boxes), MetaTensor(scores), 0.4)
    assert type(out) is torch.Tensor and out.tolist() == ref
    out = nms(boxes.clone().requires_grad_(True), scores.clone().requires_grad_(True), 0.4)
    assert not out.requires_grad and out.tolist() == ref


@pytest.mark.parametrize("dims", DIMS)
def test_invalid_boxes_raise_like_monai(dims: int) -> None:
    bad = _boxes([[0, 0, 10, 10], [5, 5, 4, 8]], dims)  # max < min on x
    scores = torch.tensor([0.9, 0.8])
    with pytest.raises(ValueError, match="invalid values"):
        monai_nms(bad, scores, 0.5)
    with pytest.raises(ValueError, match="invalid values"):
        nms(bad, scores, 0.5)
    nan = _boxes([[0, 0, 10, 10], [0, 0, float("nan"), 8]], dims)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nms(nan, scores, 0.5)
    with pytest.raises(ValueError):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError):
        nms(_boxes([[0, 0, 1, 1]], dims), torch.zeros(2), 0.5)
    with pytest.raises(ValueError):
        nms(_boxes([[0, 0, 1, 1]], dims), torch.zeros(1), 0.5, block_size=0)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("stress", [False, True])
def test_long_chain_needs_sequential_resolution(dims: int, stress: bool) -> None:
    # Equal scores, each box overlaps the next with IoU 8/12 > 0.5 and the one after with 6/14 < 0.5: the greedy
    # result alternates, and the dependency chain is longer than the parallel round limit.
    n = 61
    boxes = _boxes([[2 * i, 0, 2 * i + 10, 1] for i in range(n)], dims)
    scores = torch.ones(n)
    with _stress() if stress else contextlib.nullcontext():
        out = _check(boxes, scores, 0.5)
        assert out.tolist() == list(range(0, n, 2))
        assert _check(boxes, scores, 0.5, block_size=7).tolist() == out.tolist()


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_sparse_and_clustered(dims: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7 + dims)
    n = 400
    # Half uniform over a small volume, half in tight clusters: both many kept and many suppressed boxes.
    centres = torch.cat([torch.rand(n // 2, dims, generator=g) * 200, torch.randn(n // 2, dims, generator=g) * 3 + 60])
    sizes = 2 + torch.rand(n, dims, generator=g) * 30
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1).to(dtype)
    scores = torch.rand(n, generator=g, dtype=dtype)
    full = _check(boxes, scores, 0.4)
    assert 0 < full.numel() < n
    for block_size in (1, 3, 7, 64):
        assert nms(boxes, scores, 0.4, block_size=block_size).tolist() == full.tolist()
    with _stress(pair_chunk=61):
        assert nms(boxes, scores, 0.4, block_size=37).tolist() == full.tolist()
    assert _check(boxes, scores, 0.4, 50, block_size=16).tolist() == full[:50].tolist()


@pytest.mark.parametrize("dims", DIMS)
def test_mixed_sizes_use_several_grid_levels(dims: int) -> None:
    g = torch.Generator().manual_seed(3)
    n = 300
    centres = torch.rand(n, dims, generator=g) * 300
    sizes = 2.0 ** (1 + 6 * torch.rand(n, 1, generator=g)) * (0.5 + torch.rand(n, dims, generator=g))
    sizes[:5] *= 20  # a few boxes far larger than the rest
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    scores = torch.rand(n, generator=g)
    grid = nms_module._Grid(boxes[:, :dims], boxes[:, dims:], torch.ones(n, dtype=torch.bool))
    assert grid.n_levels > 2
    assert len(set(grid.level.tolist())) > 2
    full = _check(boxes, scores, 0.1)
    assert nms(boxes, scores, 0.1, block_size=50).tolist() == full.tolist()
    with _stress(pair_chunk=97):
        assert nms(boxes, scores, 0.1, block_size=50).tolist() == full.tolist()


# ------------------------------------------------------------------------------------------------ internals


@pytest.mark.parametrize("dims", DIMS)
def test_pair_iou_is_bitwise_monai(dims: int) -> None:
    g = torch.Generator().manual_seed(11)
    n = 300
    # Wide dynamic range so that every rounding step matters.
    scale = 10.0 ** torch.randint(-3, 6, (n, 1), generator=g)
    lo = (torch.rand(n, dims, generator=g, dtype=torch.float64) - 0.5) * scale
    size = (
        torch.rand(n, dims, generator=g, dtype=torch.float64)
        * scale
        * 10.0 ** torch.randint(-2, 2, (n, 1), generator=g)
    )
    boxes = torch.cat([lo, lo + size], dim=1)
    for dtype in (torch.float32, torch.float64):
        b = boxes.to(dtype)
        ref = box_iou(b, b).float()
        f32 = b.float()
        area = box_area(f32)
        i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        i, j = i.flatten(), j.flatten()
        ours = nms_module._pair_iou(f32[i], f32[j], area[i], area[j])
        assert torch.equal(ours.view(n, n), ref)
        assert torch.equal(ref, ref.T)  # symmetry, relied upon for the (later, earlier) argument order


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("stress", [False, True])
@pytest.mark.parametrize("spread", [1.0, 50.0])
def test_grid_pairs_superset_without_duplicates(dims: int, stress: bool, spread: float) -> None:
    g = torch.Generator().manual_seed(5)
    n = 500
    lo = torch.rand(n, dims, generator=g) * 100
    size = (0.5 + torch.rand(n, dims, generator=g) * 8) * spread ** torch.rand(n, 1, generator=g)
    size[:10] *= 20
    hi = lo + size
    with _stress(pair_chunk=499) if stress else contextlib.nullcontext():
        grid = nms_module._Grid(lo, hi, torch.ones(n, dtype=torch.bool))
        assert grid.n_levels > 1  # the 20x outliers alone call for finer levels
        p = torch.arange(0, n, 2)
        q = torch.arange(1, n, 2)
        q_entry, chunks = grid.pairs(p, q)
        assert bool(((q_entry >= 0) & (q_entry < q.numel())).all())
        found = [pair for ip, jq in chunks for pair in zip(p[ip].tolist(), q[q_entry[jq]].tolist())]
    assert len(found) == len(set(found))
    overlap = ((lo[p][:, None] < hi[q][None]) & (lo[q][None] < hi[p][:, None])).all(dim=2)
    needed = {(int(p[a]), int(q[b])) for a, b in overlap.nonzero().tolist()}
    assert needed
    assert needed <= set(found)
    if spread == 1.0:
        assert len(found) < p.numel() * q.numel() / 10  # the grid does prune


# -------------------------------------------------------------------------------------------------- batched


@pytest.mark.parametrize("dims", DIMS)
def test_batched_labels_do_not_interact(dims: int) -> None:
    boxes = _boxes([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 10]], dims)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 1, 0, 1])
    ours = batched_nms(boxes, scores, labels, 0.5)
    assert ours.tolist() == [0, 1]
    assert ours.tolist() == monai_batched_nms(boxes, scores, labels, 0.5).tolist()
    assert batched_nms(boxes, scores, labels, 0.5, 1).tolist() == [0]


def test_batched_reproduces_offset_rounding() -> None:
    # MONAI shifts class-1 boxes by (max coordinate + 1) = 1001 in float32, which rounds their fractional
    # coordinates; thresholds set exactly at the IoUs of the shifted boxes only agree if we shift identically.
    g = torch.Generator().manual_seed(9)
    shifts = torch.rand(20, generator=g) * 0.5
    rows = [[0.0, 0.0, 1000.0, 1000.0]]
    for x in shifts.tolist():
        rows += [[0.1, 0.2, 5.3, 7.7], [0.1 + x, 0.2, 5.3 + x, 7.7]]
    boxes = torch.tensor(rows)
    scores = torch.tensor([1.0] + [0.9, 0.8] * 20)
    for i in range(20):
        labels = torch.zeros(41, dtype=torch.long)
        labels[1 + 2 * i : 3 + 2 * i] = 1
        shifted = boxes + (labels.float() * 1001.0)[:, None]
        thr = float(box_iou(shifted[1 + 2 * i : 2 + 2 * i], shifted[2 + 2 * i : 3 + 2 * i])[0, 0])
        ours = batched_nms(boxes, scores, labels, thr)
        assert ours.tolist() == monai_batched_nms(boxes, scores, labels, thr).tolist()
        assert 2 + 2 * i in ours.tolist()  # at the threshold: kept


# ------------------------------------------------------------------------------------------------ properties


@st.composite
def _box_sets(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dims = draw(st.sampled_from(DIMS))
    n = draw(st.integers(0, 40))
    if draw(st.booleans()):  # small integer grid: many identical/touching boxes and exact ratios
        lo = draw(st.lists(st.lists(st.integers(0, 6), min_size=dims, max_size=dims), min_size=n, max_size=n))
        ext = draw(st.lists(st.lists(st.integers(0, 4), min_size=dims, max_size=dims), min_size=n, max_size=n))
    else:
        coord = st.floats(0, 30, allow_nan=False, width=32)
        lo = draw(st.lists(st.lists(coord, min_size=dims, max_size=dims), min_size=n, max_size=n))
        size = st.floats(0, 12, allow_nan=False, width=32)
        ext = draw(st.lists(st.lists(size, min_size=dims, max_size=dims), min_size=n, max_size=n))
    lo_t = torch.tensor(lo, dtype=torch.float64).reshape(n, dims)
    boxes = torch.cat([lo_t, lo_t + torch.tensor(ext, dtype=torch.float64).reshape(n, dims)], dim=1)
    if draw(st.booleans()):  # heavy ties
        scores = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=n, max_size=n))
    else:
        scores = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=n, max_size=n))
    labels = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    return boxes, torch.tensor(scores, dtype=torch.float64), torch.tensor(labels, dtype=torch.long)


_THRESHOLDS = st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 1.0]), st.floats(0, 1))


@settings(max_examples=120, deadline=None)
@given(
    data=_box_sets(),
    thr=_THRESHOLDS,
    k=st.sampled_from([-1, 0, 1, 2, 5]),
    block_size=st.sampled_from([1, 2, 3, 7, 1024]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    stress=st.booleans(),
)
def test_nms_matches_monai(
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    thr: float,
    k: int,
    block_size: int,
    dtype: torch.dtype,
    stress: bool,
) -> None:
    boxes, scores, _ = data
    boxes = boxes.to(dtype)
    with _stress() if stress else contextlib.nullcontext():
        _check(boxes, scores.to(dtype), thr, k, block_size=block_size)


@settings(max_examples=60, deadline=None)
@given(
    data=_box_sets(),
    thr=_THRESHOLDS,
    k=st.sampled_from([-1, 1, 3]),
    block_size=st.sampled_from([2, 7, 1024]),
    stress=st.booleans(),
)
def test_batched_nms_matches_monai(
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], thr: float, k: int, block_size: int, stress: bool
) -> None:
    boxes, scores, labels = data
    with _stress() if stress else contextlib.nullcontext():
        ours = batched_nms(boxes, scores, labels, thr, k, block_size=block_size)
    ref = monai_batched_nms(boxes, scores, labels, thr, k)
    assert ours.dtype == torch.int64
    assert ours.tolist() == ref.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("dims", DIMS)
def test_cuda_matches_cpu(dims: int) -> None:
    g = torch.Generator().manual_seed(2)
    lo = torch.rand(500, dims, generator=g) * 100
    boxes = torch.cat([lo, lo + 1 + torch.rand(500, dims, generator=g) * 10], dim=1)
    scores = torch.rand(500, generator=g)
    cpu = nms(boxes, scores, 0.3)
    gpu = nms(boxes.cuda(), scores.cuda(), 0.3)
    assert gpu.device.type == "cuda"
    assert gpu.cpu().tolist() == cpu.tolist() == monai_nms(boxes, scores, 0.3).tolist()
