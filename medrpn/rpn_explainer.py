"""How a Region Proposal Network works, in numbers and pictures: the logic of ``notebooks/how_rpn_works.ipynb``.

Everything runs on one synthetic 2D slice (:func:`make_demo_slice`: an axial slice of the built-in synthetic chest
CT with four round lesions painted into the lungs, one of them smaller than the smallest anchor) and a tiny 2D RPN
(:func:`build_demo_rpn`: medrpn's :class:`~medrpn.modeling.backbone.ResNetFPN` with two FPN levels of strides 2 and
4, three anchors per cell) that :func:`train_demo_rpn` overfits to that slice in seconds on a CPU — the recipe of
``tests/modeling/test_rpn.py::test_rpn_overfits_bright_blobs``. Nothing here is a trained lesion detector; the point
is to look inside each step with medrpn's own components:

- **anchors** (:func:`level_summary`, :func:`anchors_at`, :func:`plot_anchors`): fixed boxes, the same few shapes at
  every feature-map cell of every level, centred at ``(c + 0.5) * stride``;
- **objectness** (:func:`objectness_maps`, :func:`plot_objectness`): per level, the highest anchor probability of
  every cell;
- **proposals and NMS** (:func:`nms_comparison`, :func:`plot_nms`): decoded anchors before and after non-maximum
  suppression (:func:`medrpn.modeling.proposals.select_proposals`, with and without suppression);
- **matching and sampling** (:func:`sampling_summary`, :func:`plot_sampling`): the matcher's positives/negatives/
  ignored anchors and the 256 the sampler keeps — the class imbalance in numbers;
- **a lesion smaller than the smallest anchor** (:func:`small_lesion_report`, :func:`plot_small_lesion`): its best
  IoU with any anchor, whether the matcher's low-quality match still gives it a positive, and what the proposals
  around it look like.

Coordinates are medrpn's image convention (:mod:`medrpn.geometry`): boxes ``[x0, y0, x1, y1]`` in voxels of the
slice, voxel ``i`` spanning ``[i, i + 1)``; array axis 0 is x (patient left, shown to the right) and axis 1 is y
(posterior, shown downwards), i.e. the slice is shown in radiological display.

All torch work runs with one intra-op thread (:func:`torch_threads`): on a small, shared CPU that is several times
faster for these tiny tensors than competing for cores.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from monai.data.box_utils import box_iou
from numpy.typing import NDArray
from scipy import ndimage
from torch import Tensor

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.backbone import ResNetFPN
from medrpn.modeling.proposals import ProposalSettings, select_proposals
from medrpn.modeling.rpn import RegionProposalNetwork
from medrpn.modeling.structures import MatchResult, Proposals, RPNOutput, objectness_probability
from medrpn.training.losses import RPNLoss
from medrpn.training.matching import IoUMatcher
from medrpn.training.sampling import BalancedSampler

__all__ = [
    "DEMO_ANCHOR_SIZES",
    "DEMO_ASPECT_RATIOS",
    "DemoRPN",
    "DemoSlice",
    "LevelInfo",
    "NMSComparison",
    "SamplingSummary",
    "SmallLesionReport",
    "TrainingLog",
    "anchors_at",
    "build_demo_rpn",
    "level_summary",
    "make_demo_slice",
    "nms_comparison",
    "objectness_maps",
    "plot_anchors",
    "plot_nms",
    "plot_objectness",
    "plot_sampling",
    "plot_slice",
    "plot_small_lesion",
    "plot_training",
    "recall_at",
    "sampling_summary",
    "small_lesion_report",
    "torch_threads",
    "train_demo_rpn",
]

DEMO_ANCHOR_SIZES: tuple[tuple[float, ...], ...] = ((6.0,), (16.0,))
"""Anchor sizes of the demo RPN per FPN level, voxels (edge of the equal-area square)."""

DEMO_ASPECT_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)
"""Anchor aspect ratios (h / w) of the demo RPN: three anchors per cell."""

DEMO_HU_WINDOW: tuple[float, float] = (-1000.0, 500.0)
"""HU range mapped to [0, 1] for the network input (medrpn's CT preset)."""

_GT_COLOUR = "#00e5ff"
_POS_COLOUR = "#00ff66"
_NEG_COLOUR = "#ff4040"
_IGN_COLOUR = "#ffaa00"
_LEVEL_COLOURS = ("#ffd400", "#ff5cf0", "#00ff66", "#00e5ff")


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count.

    Args:
        n: threads inside the block.

    Yields:
        Nothing; the previous count is restored on exit.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(max(int(n), 1))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# the demo slice


@dataclass(frozen=True)
class DemoSlice:
    """A synthetic axial CT slice with known lesion boxes.

    Attributes:
        image: ``(X, Y)`` float32 network input in [0, 1] (HU window :data:`DEMO_HU_WINDOW`).
        hu: ``(X, Y)`` float32 Hounsfield units.
        boxes: ``(M, 4)`` lesion boxes ``[x0, y0, x1, y1]``, voxel-edge image coordinates.
        diameters_mm: lesion diameters, mm (same order as ``boxes``; decreasing).
        spacing_mm: pixel spacing ``(sx, sy)``, mm.
    """

    image: NDArray[np.float32]
    hu: NDArray[np.float32]
    boxes: NDArray[np.float64]
    diameters_mm: tuple[float, ...]
    spacing_mm: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        """``(X, Y)``."""
        return (int(self.image.shape[0]), int(self.image.shape[1]))

    def tensor(self) -> Tensor:
        """The network input ``(1, 1, X, Y)`` float32."""
        return torch.from_numpy(np.ascontiguousarray(self.image))[None, None].float()

    def gt(self) -> Tensor:
        """The lesion boxes ``(M, 4)`` float32."""
        return torch.as_tensor(self.boxes, dtype=torch.float32)

    @property
    def smallest(self) -> int:
        """Index of the smallest lesion."""
        return int(np.argmin(self.diameters_mm))


def make_demo_slice(
    *,
    seed: int = 0,
    case_index: int = 2,
    size: tuple[int, int] = (128, 96),
    diameters_mm: Sequence[float] = (20.0, 13.0, 8.0, 3.5),
    lesion_hu: float = 30.0,
) -> DemoSlice:
    """An axial slice of the synthetic chest CT with round solid lesions painted into the lungs.

    The middle axial slice of synthetic case ``case_index`` (:func:`medrpn.data.synthetic.generate_case`; case 2 of
    seed 0 has no lesion of its own and 1.46 mm pixels) is cropped to ``size`` around the lungs; discs of the given
    diameters (anti-aliased edge) are placed at seeded random positions inside the lungs, apart from each other.

    Args:
        seed: seed of the synthetic case and of the lesion positions.
        case_index: synthetic case index.
        size: ``(X, Y)`` crop size, voxels.
        diameters_mm: lesion diameters, mm.
        lesion_hu: lesion density, HU.

    Returns:
        The slice.

    Raises:
        ValueError: a lesion does not fit in the lungs.
    """
    from medrpn.data.synthetic import generate_case

    case = generate_case(case_index, seed=seed)
    sx, sy = float(case.spacing[0]), float(case.spacing[1])
    hu = case.image[:, :, case.shape[2] // 2].astype(np.float32)
    smooth = ndimage.gaussian_filter(hu, 1.5)
    body = ndimage.binary_fill_holes(smooth > -500.0)
    lung = body & (smooth < -600.0)
    ii, jj = np.nonzero(lung)
    w, h = int(size[0]), int(size[1])
    cx = int(np.clip((ii.min() + ii.max()) // 2 - w // 2, 0, hu.shape[0] - w))
    cy = int(np.clip((jj.min() + jj.max()) // 2 - h // 2, 0, hu.shape[1] - h))
    hu = hu[cx : cx + w, cy : cy + h].copy()
    lung = lung[cx : cx + w, cy : cy + h]
    rng = np.random.default_rng(np.random.SeedSequence([seed, case_index, 0x7E5]))
    xx, yy = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5, indexing="ij")
    free = lung.copy()
    boxes = []
    diam = sorted((float(d) for d in diameters_mm), reverse=True)
    for d in diam:
        rx, ry = d / sx / 2.0, d / sy / 2.0
        margin = math.ceil(max(rx, ry)) + 1
        ok = ndimage.binary_erosion(free, iterations=margin)
        cand = np.argwhere(ok)
        if len(cand) == 0:
            raise ValueError(f"no room for a {d} mm lesion in the lungs of this slice")
        px, py = cand[rng.integers(len(cand))] + 0.5
        dist = np.sqrt(((xx - px) / rx) ** 2 + ((yy - py) / ry) ** 2)
        # anti-aliased disc: weight 1 inside, linear over one pixel at the edge
        weight = np.clip((1.0 - dist) * min(rx, ry) + 0.5, 0.0, 1.0).astype(np.float32)
        hu = hu * (1.0 - weight) + np.float32(lesion_hu) * weight
        free &= dist > 1.0 + 8.0 / max(min(rx, ry), 1e-3)
        boxes.append([px - rx, py - ry, px + rx, py + ry])
    lo, hi = DEMO_HU_WINDOW
    image = np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return DemoSlice(
        image=image,
        hu=hu.astype(np.float32),
        boxes=np.asarray(boxes, dtype=np.float64),
        diameters_mm=tuple(diam),
        spacing_mm=(sx, sy),
    )


def _show(ax: Axes, demo: DemoSlice, title: str = "", gt: bool = True) -> None:
    """The slice in radiological display (x to the right = patient left, y down = posterior), voxel-edge axes."""
    w, h = demo.shape
    ax.imshow(demo.image.T, cmap="gray", extent=(0, w, h, 0), interpolation="nearest", vmin=0.0, vmax=1.0)
    if gt:
        for b in demo.boxes:
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=_GT_COLOUR, lw=1.0, ls="--"))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)


def _box_patch(
    b: Sequence[float] | NDArray[np.floating], colour: str, lw: float = 1.2, alpha: float = 1.0, ls: str = "-"
) -> Rectangle:
    return Rectangle(
        (float(b[0]), float(b[1])),
        float(b[2] - b[0]),
        float(b[3] - b[1]),
        fill=False,
        ec=colour,
        lw=lw,
        alpha=alpha,
        ls=ls,
    )


def plot_slice(demo: DemoSlice) -> Figure:
    """The demo slice with its lesion boxes (dashed cyan) and their diameters.

    Args:
        demo: the slice.

    Returns:
        The figure.
    """
    fig = _figure(6.0, 4.8)
    ax = fig.add_subplot()
    sx, sy = demo.spacing_mm
    _show(ax, demo, f"synthetic axial slice, {demo.shape[0]} x {demo.shape[1]} pixels of {sx:.2f} x {sy:.2f} mm")
    for b, d in zip(demo.boxes, demo.diameters_mm):
        ax.text(float(b[2]) + 0.8, float(b[1]), f"{d:g} mm", color=_GT_COLOUR, fontsize=9, va="top")
    for x, y, s, ha, va in ((0.01, 0.5, "R", "left", "center"), (0.99, 0.5, "L", "right", "center")):
        ax.text(x, y, s, transform=ax.transAxes, color="yellow", fontsize=11, ha=ha, va=va, weight="bold")
    for x, y, s, ha, va in ((0.5, 0.99, "A", "center", "top"), (0.5, 0.01, "P", "center", "bottom")):
        ax.text(x, y, s, transform=ax.transAxes, color="yellow", fontsize=11, ha=ha, va=va, weight="bold")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# the demo model


@dataclass
class DemoRPN:
    """A tiny 2D RPN: backbone + FPN (2 levels), anchors, head, and the loss used to train it.

    Attributes:
        backbone: :class:`ResNetFPN` with levels of stride 2 and 4.
        rpn: the :class:`RegionProposalNetwork`.
        loss: :class:`RPNLoss` with its matcher (IoU 0.5 / 0.3, low-quality matches) and sampler (256 per image).
    """

    backbone: ResNetFPN
    rpn: RegionProposalNetwork
    loss: RPNLoss

    @property
    def anchor_generator(self) -> AnchorGenerator:
        """The fixed anchors."""
        return self.rpn.anchor_generator

    @property
    def matcher(self) -> IoUMatcher:
        """The loss's matcher."""
        m = self.loss.matcher
        assert isinstance(m, IoUMatcher)
        return m

    @property
    def strides(self) -> list[tuple[int, ...]]:
        """Per level, the stride with respect to the input."""
        return self.backbone.strides

    def grid_sizes(self, image_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Per level, the feature-map size for an input of ``image_shape``."""
        return [tuple(math.ceil(int(n) / int(s)) for n, s in zip(image_shape, st)) for st in self.strides]

    def anchors(self, image_shape: Sequence[int]) -> tuple[Tensor, list[int]]:
        """All anchors ``(N, 4)`` of an input of ``image_shape`` and their count per level."""
        return self.anchor_generator.anchors_for(self.grid_sizes(image_shape), self.strides)

    @torch.no_grad()
    def run(self, demo: DemoSlice) -> RPNOutput:
        """Inference (eval mode) on the slice."""
        self.backbone.eval()
        self.rpn.eval()
        with torch_threads(1):
            x = demo.tensor()
            return self.rpn(self.backbone(x), self.strides, x.shape[2:])


def build_demo_rpn(
    *,
    seed: int = 0,
    anchor_sizes: Sequence[Sequence[float]] = DEMO_ANCHOR_SIZES,
    aspect_ratios: Sequence[float] = DEMO_ASPECT_RATIOS,
    positive_threshold: float = 0.5,
    negative_threshold: float = 0.3,
    batch_size_per_image: int = 256,
    post_nms_top_k: int = 20,
    nms_iou: float = 0.5,
) -> DemoRPN:
    """Build the tiny demo RPN (seeded, untrained).

    Args:
        seed: torch seed of the weights and of the sampler.
        anchor_sizes: per level, anchor sizes in voxels.
        aspect_ratios: anchor aspect ratios ``h / w``.
        positive_threshold: matcher IoU for positives.
        negative_threshold: matcher IoU below which anchors are negatives.
        batch_size_per_image: anchors sampled per image for the loss.
        post_nms_top_k: proposals kept at inference.
        nms_iou: NMS IoU threshold.

    Returns:
        The model.
    """
    torch.manual_seed(seed)
    backbone = ResNetFPN(
        spatial_dims=2,
        channels=(8, 16),
        blocks_per_stage=(1, 1),
        stage_strides=(2, 2),
        return_stages=(0, 1),
        fpn_channels=16,
    )
    gen = AnchorGenerator(spatial_dims=2, sizes=[list(s) for s in anchor_sizes], aspect_ratios=list(aspect_ratios))
    rpn = RegionProposalNetwork(
        spatial_dims=2,
        in_channels=16,
        anchor_generator=gen,
        pre_nms_top_k_test=400,
        post_nms_top_k_test=post_nms_top_k,
        nms_iou=nms_iou,
    )
    loss = RPNLoss(
        matcher=IoUMatcher(positive_threshold=positive_threshold, negative_threshold=negative_threshold),
        sampler=BalancedSampler(
            batch_size_per_image=batch_size_per_image, generator=torch.Generator().manual_seed(seed)
        ),
    )
    return DemoRPN(backbone=backbone, rpn=rpn, loss=loss)


@dataclass(frozen=True)
class TrainingLog:
    """How the demo training went.

    Attributes:
        steps: optimiser steps run.
        seconds: wall time.
        losses: total loss per step.
        recall: fraction of lesions with a top-10 proposal of IoU >= 0.5 at the end.
    """

    steps: int
    seconds: float
    losses: tuple[float, ...]
    recall: float


def recall_at(model: DemoRPN, demo: DemoSlice, top_k: int = 10, iou: float = 0.5) -> float:
    """Fraction of the lesions found by one of the top-k proposals with IoU >= ``iou``.

    Args:
        model: the RPN.
        demo: the slice.
        top_k: proposals considered.
        iou: IoU threshold.

    Returns:
        The recall in [0, 1].
    """
    props = model.run(demo).proposals[0]
    if len(props) == 0 or len(demo.boxes) == 0:
        return 0.0
    ious = torch.as_tensor(box_iou(demo.gt(), props.boxes[:top_k]))
    return float((ious.max(dim=1).values >= iou).float().mean())


def train_demo_rpn(
    model: DemoRPN,
    demo: DemoSlice,
    *,
    steps: int = 200,
    lr: float = 3e-3,
    seed: int = 0,
    max_seconds: float = 60.0,
) -> TrainingLog:
    """Overfit the RPN to the slice (Adam, full image, RPN loss only), single-threaded and seeded.

    Args:
        model: the RPN (trained in place).
        demo: the slice.
        steps: optimiser steps.
        lr: learning rate.
        seed: torch seed of the training run.
        max_seconds: stop early after this wall time.

    Returns:
        The log.
    """
    torch.manual_seed(seed)
    params = list(model.backbone.parameters()) + list(model.rpn.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    x, gt = demo.tensor(), demo.gt()
    losses: list[float] = []
    start = time.perf_counter()
    with torch_threads(1):
        for _ in range(int(steps)):
            model.backbone.train()
            model.rpn.train()
            out = model.rpn(model.backbone(x), model.strides, x.shape[2:])
            loss = model.loss(out, [gt], model.rpn.box_coder, model.rpn.num_anchors)
            opt.zero_grad()
            loss.total.backward()
            opt.step()
            losses.append(float(loss.total.detach()))
            if time.perf_counter() - start > max_seconds:
                break
    seconds = time.perf_counter() - start
    return TrainingLog(steps=len(losses), seconds=seconds, losses=tuple(losses), recall=recall_at(model, demo))


def plot_training(log: TrainingLog) -> Figure:
    """The loss curve of :func:`train_demo_rpn`."""
    fig = _figure(6.0, 3.0)
    ax = fig.add_subplot()
    ax.semilogy(np.arange(1, log.steps + 1), log.losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("RPN loss (objectness + box)")
    ax.set_title(f"{log.steps} steps in {log.seconds:.1f} s, recall@10 (IoU 0.5) = {log.recall:.2f}", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# anchors


@dataclass(frozen=True)
class LevelInfo:
    """One FPN level of the demo RPN.

    Attributes:
        level: level index (0 = finest).
        stride: stride per axis, voxels.
        grid: feature-map size per axis.
        anchors_per_cell: anchors at each cell.
        num_anchors: anchors of the level (cells x anchors per cell).
        shapes: ``(A, 2)`` anchor extents ``(w, h)`` in voxels.
    """

    level: int
    stride: tuple[int, ...]
    grid: tuple[int, ...]
    anchors_per_cell: int
    num_anchors: int
    shapes: NDArray[np.float32]

    def describe(self) -> str:
        """One line."""
        shapes = ", ".join(f"{w:.1f}x{h:.1f}" for w, h in self.shapes)
        return (
            f"level {self.level}: stride {'x'.join(map(str, self.stride))}, grid {'x'.join(map(str, self.grid))}, "
            f"{self.anchors_per_cell} anchors/cell ({shapes} voxels) -> {self.num_anchors} anchors"
        )


def level_summary(model: DemoRPN, image_shape: Sequence[int]) -> list[LevelInfo]:
    """Per level: stride, grid, anchor shapes and counts.

    Args:
        model: the RPN.
        image_shape: ``(X, Y)``.

    Returns:
        One entry per level.
    """
    shapes = model.anchor_generator.voxel_shapes()
    _, counts = model.anchors(image_shape)
    return [
        LevelInfo(
            level=i,
            stride=tuple(int(s) for s in st),
            grid=tuple(int(g) for g in grid),
            anchors_per_cell=int(shapes[i].shape[0]),
            num_anchors=int(counts[i]),
            shapes=shapes[i].numpy().astype(np.float32),
        )
        for i, (st, grid) in enumerate(zip(model.strides, model.grid_sizes(image_shape)))
    ]


def anchors_at(model: DemoRPN, image_shape: Sequence[int], level: int, cell: Sequence[int]) -> Tensor:
    """The anchors of one feature-map cell (in the RPN's anchor order).

    Args:
        model: the RPN.
        image_shape: ``(X, Y)``.
        level: FPN level.
        cell: cell index per axis.

    Returns:
        ``(A, 4)`` boxes, all centred at ``(cell + 0.5) * stride``.
    """
    anchors, counts = model.anchors(image_shape)
    grid = model.grid_sizes(image_shape)[level]
    a = model.anchor_generator.num_anchors_per_location()[level]
    flat = int(np.ravel_multi_index(tuple(int(c) for c in cell), grid))
    start = sum(counts[:level]) + flat * a
    return anchors[start : start + a]


def _cell_of(model: DemoRPN, level: int, point: Sequence[float], image_shape: Sequence[int]) -> tuple[int, ...]:
    stride = model.strides[level]
    grid = model.grid_sizes(image_shape)[level]
    return tuple(int(np.clip(math.floor(p / s), 0, g - 1)) for p, s, g in zip(point, stride, grid))


def plot_anchors(model: DemoRPN, demo: DemoSlice, point: Sequence[float] | None = None) -> Figure:
    """Anchors on the slice: per level, the anchor centres (every cell) and the anchors of the cell at ``point``.

    Args:
        model: the RPN.
        demo: the slice.
        point: ``(x, y)`` voxel position; default: the centre of the largest lesion.

    Returns:
        A figure with one panel per level plus one with the anchors of every level at that point.
    """
    if point is None:
        b = demo.boxes[0]
        point = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    levels = level_summary(model, demo.shape)
    fig = _figure(4.2 * (len(levels) + 1), 3.9)
    axes = fig.subplots(1, len(levels) + 1)
    for info, ax in zip(levels, axes):
        grid_text = "x".join(map(str, info.grid))
        _show(ax, demo, f"level {info.level}: stride {info.stride[0]}, grid {grid_text}")
        sx, sy = info.stride
        gx, gy = info.grid
        cxs, cys = np.meshgrid((np.arange(gx) + 0.5) * sx, (np.arange(gy) + 0.5) * sy, indexing="ij")
        ax.plot(cxs.ravel(), cys.ravel(), ".", ms=1.0, color=_LEVEL_COLOURS[info.level], alpha=0.6)
        cell = _cell_of(model, info.level, point, demo.shape)
        for box in anchors_at(model, demo.shape, info.level, cell).numpy():
            ax.add_patch(_box_patch(box, _LEVEL_COLOURS[info.level], lw=1.4))
        shapes = ", ".join(f"{w:.1f}x{h:.1f}" for w, h in info.shapes)
        ax.set_xlabel(f"{info.anchors_per_cell} anchors/cell ({shapes}) -> {info.num_anchors} anchors", fontsize=8)
    ax = axes[-1]
    _show(ax, demo, "all levels at one point (zoom)")
    for info in levels:
        cell = _cell_of(model, info.level, point, demo.shape)
        for box in anchors_at(model, demo.shape, info.level, cell).numpy():
            ax.add_patch(_box_patch(box, _LEVEL_COLOURS[info.level], lw=1.4))
    half = max(float(levels[-1].shapes.max()), 12.0)
    ax.set_xlim(point[0] - half, point[0] + half)
    ax.set_ylim(point[1] + half, point[1] - half)
    total = sum(i.num_anchors for i in levels)
    ax.set_xlabel(f"{total} anchors in total; dashed cyan = lesions", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# objectness


def objectness_maps(model: DemoRPN, demo: DemoSlice) -> list[NDArray[np.float32]]:
    """Per level, the highest objectness probability over the anchors of every cell.

    Args:
        model: the RPN.
        demo: the slice.

    Returns:
        Per level a ``grid`` float32 array in [0, 1] (axis 0 = x).
    """
    out = model.run(demo)
    probs = objectness_probability(out.objectness_logits)[0]  # (N,)
    maps = []
    start = 0
    a = model.rpn.num_anchors
    for grid, count in zip(model.grid_sizes(demo.shape), out.num_anchors_per_level):
        level = probs[start : start + count].reshape(*grid, a).amax(dim=-1)
        maps.append(level.numpy().astype(np.float32))
        start += count
    return maps


def plot_objectness(model: DemoRPN, demo: DemoSlice) -> Figure:
    """The objectness heatmap of every level over the slice.

    Args:
        model: the RPN.
        demo: the slice.

    Returns:
        A figure with one panel per level.
    """
    maps = objectness_maps(model, demo)
    fig = _figure(4.6 * len(maps), 3.9)
    axes = np.atleast_1d(fig.subplots(1, len(maps)))
    w, h = demo.shape
    im = None
    for level, (m, ax, st) in enumerate(zip(maps, axes, model.strides)):
        _show(ax, demo, f"level {level} (stride {st[0]}): max objectness per cell")
        gx, gy = m.shape
        im = ax.imshow(m.T, extent=(0, gx * st[0], gy * st[1], 0), cmap="inferno", alpha=0.55, vmin=0.0, vmax=1.0)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    if im is not None:
        fig.colorbar(im, ax=list(axes), shrink=0.8, label="objectness")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# proposals and NMS


@dataclass(frozen=True)
class NMSComparison:
    """Proposals of the slice before and after NMS.

    Attributes:
        before: the decoded top-k candidates per level, clipped, without suppression.
        after: what the RPN outputs (per-level NMS, then the best ``post_nms_top_k``).
        nms_iou: the NMS threshold.
        pre_nms_top_k: candidates per level before NMS.
    """

    before: Proposals
    after: Proposals
    nms_iou: float
    pre_nms_top_k: int

    def describe(self, min_score: float = 0.5) -> str:
        """One line with the counts."""
        n_hi = int((self.before.scores >= min_score).sum())
        return (
            f"before NMS: {len(self.before)} candidate boxes ({self.pre_nms_top_k} best per level), {n_hi} with "
            f"objectness >= {min_score:g}; after NMS (IoU > {self.nms_iou:g} suppressed): {len(self.after)} proposals"
        )


def nms_comparison(model: DemoRPN, demo: DemoSlice) -> NMSComparison:
    """Run proposal selection on the slice twice: without suppression and with the RPN's NMS.

    Args:
        model: the RPN.
        demo: the slice.

    Returns:
        Both proposal sets.
    """
    out = model.run(demo)
    s = model.rpn.test_settings
    no_nms = ProposalSettings(
        pre_nms_top_k=s.pre_nms_top_k,
        post_nms_top_k=s.pre_nms_top_k * len(out.num_anchors_per_level),
        nms_iou=1.0,  # suppress only IoU > 1: nothing
        min_size=s.min_size,
        score_threshold=s.score_threshold,
    )
    args = (out.anchors, out.num_anchors_per_level, out.objectness_logits, out.deltas, demo.shape, model.rpn.box_coder)
    with torch_threads(1):
        before = select_proposals(*args, no_nms)[0]
        after = select_proposals(*args, s)[0]
    return NMSComparison(before=before, after=after, nms_iou=s.nms_iou, pre_nms_top_k=s.pre_nms_top_k)


def plot_nms(comparison: NMSComparison, demo: DemoSlice, min_score: float = 0.5, top_k: int = 10) -> Figure:
    """Candidates before NMS (objectness >= ``min_score``) and the top-k proposals after it.

    Args:
        comparison: from :func:`nms_comparison`.
        demo: the slice.
        min_score: objectness threshold of the boxes drawn before NMS.
        top_k: proposals drawn after NMS.

    Returns:
        A two-panel figure.
    """
    fig = _figure(10.0, 4.2)
    ax0, ax1 = fig.subplots(1, 2)
    before = comparison.before
    keep = before.scores >= min_score
    _show(ax0, demo, f"before NMS: {int(keep.sum())} boxes with objectness >= {min_score:g}")
    for b, sc in zip(before.boxes[keep].numpy(), before.scores[keep].numpy()):
        ax0.add_patch(_box_patch(b, "#ffd400", lw=0.6, alpha=float(0.15 + 0.5 * sc)))
    after = comparison.after
    _show(ax1, demo, f"after NMS: top {min(top_k, len(after))} of {len(after)} proposals (numbered by rank)")
    for i, b in enumerate(after.boxes[:top_k].numpy(), start=1):
        ax1.add_patch(_box_patch(b, "#ffd400", lw=1.3))
        ax1.text(float(b[0]), float(b[1]) - 0.3, str(i), color="#ffd400", fontsize=7, va="bottom")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# matching and sampling


@dataclass(frozen=True)
class SamplingSummary:
    """The matcher's labels and the sampler's picks for the slice.

    Attributes:
        num_anchors: all anchors.
        positives: anchors labelled positive (IoU >= threshold, or best anchor of a lesion).
        negatives: anchors labelled background.
        ignored: anchors between the thresholds (not trained).
        sampled_positives: positives the sampler kept.
        sampled_negatives: negatives the sampler kept.
        batch_size: the sampler's budget per image.
        anchors: ``(N, 4)`` the anchors.
        match: the matcher's output.
        sampled_pos: ``(N,)`` bool mask.
        sampled_neg: ``(N,)`` bool mask.
    """

    num_anchors: int
    positives: int
    negatives: int
    ignored: int
    sampled_positives: int
    sampled_negatives: int
    batch_size: int
    anchors: Tensor = field(repr=False)
    match: MatchResult = field(repr=False)
    sampled_pos: Tensor = field(repr=False)
    sampled_neg: Tensor = field(repr=False)

    @property
    def sampled(self) -> int:
        """Anchors entering the objectness loss."""
        return self.sampled_positives + self.sampled_negatives

    def describe(self) -> str:
        """The imbalance in one sentence."""
        ratio = self.negatives / max(self.positives, 1)
        return (
            f"{self.num_anchors} anchors: {self.positives} positive, {self.ignored} ignored, {self.negatives} negative "
            f"(1 positive per {ratio:.0f} negatives); the sampler trains on {self.sampled} "
            f"(budget {self.batch_size}): {self.sampled_positives} positives + {self.sampled_negatives} negatives"
        )


def sampling_summary(
    model: DemoRPN,
    demo: DemoSlice,
    *,
    matcher: IoUMatcher | None = None,
    sampler: BalancedSampler | None = None,
    seed: int = 0,
) -> SamplingSummary:
    """Label every anchor of the slice against the lesions and sample the loss's anchors.

    Args:
        model: the RPN (its anchors, and its matcher when ``matcher`` is None).
        demo: the slice.
        matcher: matcher to use.
        sampler: sampler to use; default: 256 per image, at most half positives, seeded.
        seed: seed of the default sampler.

    Returns:
        Counts and masks.
    """
    anchors, counts = model.anchors(demo.shape)
    matcher = matcher or model.matcher
    if sampler is None:
        sampler = BalancedSampler(batch_size_per_image=256, generator=torch.Generator().manual_seed(seed))
    match = matcher(demo.gt(), anchors, counts, model.rpn.num_anchors)
    pos, neg = sampler(match.labels)
    labels = match.labels
    return SamplingSummary(
        num_anchors=int(anchors.shape[0]),
        positives=int((labels == MatchResult.POSITIVE).sum()),
        negatives=int((labels == MatchResult.NEGATIVE).sum()),
        ignored=int((labels == MatchResult.IGNORE).sum()),
        sampled_positives=int(pos.sum()),
        sampled_negatives=int(neg.sum()),
        batch_size=int(sampler.batch_size_per_image),
        anchors=anchors,
        match=match,
        sampled_pos=pos,
        sampled_neg=neg,
    )


def plot_sampling(summary: SamplingSummary, demo: DemoSlice) -> Figure:
    """Sampled positives (boxes) and negatives (centres) on the slice, and the counts on a log scale.

    Args:
        summary: from :func:`sampling_summary`.
        demo: the slice.

    Returns:
        A two-panel figure.
    """
    fig = _figure(11.0, 4.2)
    ax0, ax1 = fig.subplots(1, 2, width_ratios=(1.4, 1.0))
    _show(ax0, demo, f"sampled: {summary.sampled_positives} positives (boxes), {summary.sampled_negatives} negatives")
    a = summary.anchors
    for b in a[summary.sampled_pos].numpy():
        ax0.add_patch(_box_patch(b, _POS_COLOUR, lw=0.9))
    neg = a[summary.sampled_neg].numpy()
    ax0.plot((neg[:, 0] + neg[:, 2]) / 2, (neg[:, 1] + neg[:, 3]) / 2, "x", ms=3, color=_NEG_COLOUR, alpha=0.8)
    names = ["all anchors", "negative", "ignored", "positive", "sampled\nnegatives", "sampled\npositives"]
    values = [
        summary.num_anchors,
        summary.negatives,
        summary.ignored,
        summary.positives,
        summary.sampled_negatives,
        summary.sampled_positives,
    ]
    colours = ["#888888", _NEG_COLOUR, _IGN_COLOUR, _POS_COLOUR, _NEG_COLOUR, _POS_COLOUR]
    bars = ax1.bar(range(len(values)), [max(v, 0.8) for v in values], color=colours)
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(values)), names, fontsize=8)
    for bar, v in zip(bars, values):
        ax1.text(bar.get_x() + bar.get_width() / 2, max(v, 0.8) * 1.15, str(v), ha="center", fontsize=8)
    ax1.set_title("matcher labels vs. what the loss sees", fontsize=10)
    ax1.set_ylim(0.5, summary.num_anchors * 4)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# the lesion smaller than the smallest anchor


@dataclass(frozen=True)
class SmallLesionReport:
    """What happens to a lesion smaller than every anchor.

    Attributes:
        index: index of the lesion in the slice's boxes.
        box: its box, voxels.
        size_vox: its extent ``(w, h)``, voxels.
        diameter_mm: its diameter, mm.
        smallest_anchor: the smallest anchor extent ``(w, h)``, voxels.
        best_iou: highest IoU of the lesion with any anchor.
        best_anchors: ``(K, 4)`` the anchor(s) the matcher makes positive for it (with low-quality matches: those
            reaching ``best_iou``, ties included).
        positive_threshold: matcher IoU for positives.
        negative_threshold: matcher IoU for negatives.
        positives_without_low_quality: anchors labelled positive for it by thresholds alone.
        positives_with_low_quality: anchors labelled positive for it with low-quality matches on.
        best_proposal_iou: highest IoU of a top-k proposal with it.
        best_proposal_rank: 1-based rank of that proposal (0 when there is none).
        best_proposal_score: its objectness.
        best_proposal: ``(4,)`` its box (zeros when there is none).
        top_k: proposals considered.
    """

    index: int
    box: tuple[float, ...]
    size_vox: tuple[float, ...]
    diameter_mm: float
    smallest_anchor: tuple[float, ...]
    best_iou: float
    best_anchors: NDArray[np.float32]
    positive_threshold: float
    negative_threshold: float
    positives_without_low_quality: int
    positives_with_low_quality: int
    best_proposal_iou: float
    best_proposal_rank: int
    best_proposal_score: float
    best_proposal: NDArray[np.float32]
    top_k: int

    @property
    def gets_positive(self) -> bool:
        """Whether the matcher (with low-quality matches) gives the lesion at least one positive anchor."""
        return self.positives_with_low_quality > 0

    def describe(self) -> str:
        """A few lines of explanation."""
        w, h = self.size_vox
        aw, ah = self.smallest_anchor
        lines = [
            f"lesion {self.diameter_mm:.1f} mm = {w:.1f} x {h:.1f} voxels; smallest anchor {aw:.1f} x {ah:.1f} voxels",
            f"best IoU with any anchor: {self.best_iou:.3f} (negative below {self.negative_threshold:g}, positive "
            f"from {self.positive_threshold:g})",
            f"positives by thresholds alone: {self.positives_without_low_quality}; with low-quality matches: "
            f"{self.positives_with_low_quality} -> "
            + ("the lesion still gets a positive anchor" if self.gets_positive else "the lesion gets no positive"),
        ]
        if self.best_proposal_rank:
            lines.append(
                f"best of the top {self.top_k} proposals: rank {self.best_proposal_rank}, IoU "
                f"{self.best_proposal_iou:.2f}, objectness {self.best_proposal_score:.2f}"
            )
        else:
            lines.append("no proposal")
        return "\n".join(lines)


def small_lesion_report(
    model: DemoRPN, demo: DemoSlice, index: int | None = None, top_k: int = 20
) -> SmallLesionReport:
    """Match one lesion alone against every anchor, with and without low-quality matches, and find its proposal.

    Args:
        model: the RPN.
        demo: the slice.
        index: the lesion; default: the smallest.
        top_k: proposals considered.

    Returns:
        The report.
    """
    i = demo.smallest if index is None else int(index)
    gt = demo.gt()[i : i + 1]
    anchors, counts = model.anchors(demo.shape)
    best = float(torch.as_tensor(box_iou(gt, anchors))[0].max())
    m = model.matcher
    positives: dict[bool, Tensor] = {}
    for low_quality in (False, True):
        matcher = IoUMatcher(
            positive_threshold=m.positive_threshold,
            negative_threshold=m.negative_threshold,
            allow_low_quality_matches=low_quality,
        )
        positives[low_quality] = matcher(gt, anchors, counts).labels == MatchResult.POSITIVE
    shapes = torch.cat(model.anchor_generator.voxel_shapes())
    smallest = shapes[torch.argmin(shapes.amax(dim=1))]  # the anchor with the shortest longest side
    props = model.run(demo).proposals[0]
    p_iou = 0.0
    p_rank = 0
    p_score = 0.0
    p_box = np.zeros(4, dtype=np.float32)
    if len(props):
        piou = torch.as_tensor(box_iou(gt, props.boxes[:top_k]))[0]
        j = int(torch.argmax(piou))
        p_iou, p_rank, p_score = float(piou[j]), j + 1, float(props.scores[j])
        p_box = props.boxes[j].numpy().astype(np.float32)
    b = demo.boxes[i]
    return SmallLesionReport(
        index=i,
        box=tuple(float(v) for v in b),
        size_vox=(float(b[2] - b[0]), float(b[3] - b[1])),
        diameter_mm=float(demo.diameters_mm[i]),
        smallest_anchor=tuple(float(v) for v in smallest),
        best_iou=best,
        best_anchors=anchors[positives[True]].numpy().astype(np.float32)
        if bool(positives[True].any())
        else np.zeros((0, 4), dtype=np.float32),
        positive_threshold=m.positive_threshold,
        negative_threshold=m.negative_threshold,
        positives_without_low_quality=int(positives[False].sum()),
        positives_with_low_quality=int(positives[True].sum()),
        best_proposal_iou=p_iou,
        best_proposal_rank=p_rank,
        best_proposal_score=p_score,
        best_proposal=p_box,
        top_k=top_k,
    )


def plot_small_lesion(report: SmallLesionReport, demo: DemoSlice, half_width: float = 12.0) -> Figure:
    """A close-up of the small lesion: its box, its best anchor(s) and its best proposal.

    Args:
        report: from :func:`small_lesion_report`.
        demo: the slice.
        half_width: half side of the close-up, voxels.

    Returns:
        The figure.
    """
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot()
    _show(ax, demo, f"{report.diameter_mm:.1f} mm lesion (cyan) vs. its best anchor(s) and proposal")
    for b in report.best_anchors:
        ax.add_patch(_box_patch(b, _IGN_COLOUR, lw=1.5, ls=":"))
    if report.best_proposal_rank:
        ax.add_patch(_box_patch(report.best_proposal, "#ffd400", lw=1.5))
    cx = (report.box[0] + report.box[2]) / 2
    cy = (report.box[1] + report.box[3]) / 2
    ax.set_xlim(cx - half_width, cx + half_width)
    ax.set_ylim(cy + half_width, cy - half_width)
    ax.set_xlabel(
        f"orange dotted: best anchor (IoU {report.best_iou:.2f}); yellow: proposal #{report.best_proposal_rank} "
        f"(IoU {report.best_proposal_iou:.2f})",
        fontsize=8,
    )
    return fig
