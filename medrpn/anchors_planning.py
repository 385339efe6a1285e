"""Anchor planning from the data: coverage analysis of an anchor set and anchor sets tuned to the lesions.

Everything works **per axis in voxels of the network input** (the training spacing), so anisotropic
spacing, anisotropic anchors and lesions elongated along any axis are handled alike; millimetres are only
the input (world boxes) and the output (config values with ``spacing_mm``).

**Shape IoU.** A lesion of extents ``b`` (``D`` values) and an anchor of extents ``a`` are compared
*centred on each other*: ``IoU = prod(min(a, b)) / (prod(a) + prod(b) - prod(min(a, b)))``. This is the
best IoU the anchor shape can reach on that lesion — an **upper bound**: real anchors sit on the grid of
cell centres of their FPN level, ``(c + 0.5) * stride``, so a lesion centre is up to half a stride off the
nearest anchor centre along every axis, which lowers the IoU. The report also gives the matching lower
bound, the *grid IoU*: the best over anchors of the IoU with the lesion centre half a stride of the anchor's
level off along every axis (the worst position on the grid), which every lesion reaches wherever it lies.

**Coverage** is the fraction of lesions whose best shape IoU is ``>= positive_iou`` (the RPN matcher's
positive threshold): a lesion below it can only be matched by the matcher's low-quality rule.

**Why a lesion is not covered** (checked in this order, over the anchors of all levels):

- ``"too small"``: no extent exceeds the smallest anchor extent along its axis (``b_d <= min_k a_kd`` for
  every axis ``d``), i.e. every anchor contains the lesion: smaller anchors are needed;
- ``"too large"``: every extent reaches the largest anchor extent along its axis (``b_d >= max_k a_kd``
  for every ``d``), i.e. the lesion contains every anchor: larger anchors are needed;
- ``"too elongated"``: even rescaling an anchor uniformly to the best size (keeping its aspect ratios)
  cannot reach ``positive_iou``: the lesion's aspect ratios are outside what the anchors offer;
- ``"shape mismatch"``: otherwise: a rescaled anchor would cover it, so its size falls in a gap between
  the anchor sizes (or the shape is off along some axes and not others).

**Planning** (:func:`plan_anchors`) chooses ``A`` shapes per FPN level (the same count on every level:
the RPN head is shared):

1. *Candidates*: the lesion shapes (deduplicated, subsampled beyond ``max_candidates``), k-means cluster
   centres of the lesion shapes in log-size space (``k`` = ``L*A / 2``, ``L*A``, ``2*L*A``), the baseline's
   shapes, and per level ``A`` filler cubes (so every level can always be filled).
2. *Level rule*: a candidate is allowed on level ``l`` when its size in cells of that level,
   ``g_l = geomean_d(a_d / stride_ld)``, is in ``[min_cells, max_cells]`` (default ``[1.5, 12]``): at
   least 1.5 cells, so the half-cell grid offset does not ruin the IoU, at most 12 cells, so the level's
   features still see the whole anchor. The finest level also takes everything smaller, the coarsest
   everything larger, a size in a gap between windows goes to the nearest window, and baseline shapes
   are also allowed on their own level.
3. *Greedy maximum coverage*: repeatedly add the candidate that covers the most new lesions (ties: the
   largest gain in summed best IoU) among those for which some assignment of the chosen set to levels
   still respects the rule and the budget of ``A`` per level (a bipartite matching, checked with
   :func:`scipy.optimize.linear_sum_assignment`). Once no candidate adds coverage or raises the mean best
   IoU by 1e-4, the free slots of a level take its baseline shapes, then its filler cubes (a budget larger
   than the data needs keeps sensible, distinct anchors). Chosen shapes are then assigned to levels
   preferring a size of ``sqrt(min_cells * max_cells)`` (about 4.2) cells.
4. *Refinement*: a local search that replaces one anchor at a time (by another allowed candidate of its
   level, the geometric mean of the lesions it currently matches best, or the anchor itself scaled by a
   factor shrinking from 1.25 to about 1.01 along one axis or all axes) whenever that covers more lesions,
   or as many with a mean best IoU larger by 1e-4: coverage is never lost.
5. The search runs twice, from the greedy set and from the baseline (when it has the same levels and at
   most ``A`` anchors per level; padded greedily up to the budget), and keeps the better (coverage, then
   mean best IoU). If the result is still below the baseline on the planning data (same levels and count),
   the baseline shapes are returned, so a plan is **never worse than the baseline** on the data it was planned on.

``anchors: auto`` (:class:`medrpn.modeling.anchors.AnchorGenerator` with ``shapes="auto"``) is resolved by
:func:`plan_for_training` from the training split before fitting; :func:`restore_planned_anchors` puts the
planned shapes of a checkpoint back into a model built from an ``auto`` config. ``medrpn anchors analyze``
and ``medrpn anchors plan`` are :func:`anchors_main`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from medrpn.modeling.anchors import AnchorGenerator
from medrpn.overlays.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from medrpn.data.datalists import CaseRecord
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.modeling.detector import LesionDetector
    from medrpn.module import LesionDetectionModule

__all__ = [
    "REASONS",
    "AnchorReport",
    "PlannedAnchors",
    "UncoveredLesion",
    "analyze_anchors",
    "anchors_main",
    "apply_anchor_shapes",
    "best_rescaled_iou",
    "grid_iou",
    "lesion_sizes_from_records",
    "level_rule",
    "plan_anchors",
    "plan_for_training",
    "restore_planned_anchors",
    "shape_iou",
    "uncovered_reason",
]

REASONS: tuple[str, ...] = ("too small", "too large", "too elongated", "shape mismatch")
"""Why a lesion is not covered, in the order they are checked (see the module docstring)."""

DEFAULT_MIN_CELLS = 1.5
DEFAULT_MAX_CELLS = 12.0
_AXIS_OF_CODE = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}


# ---------------------------------------------------------------------------------------------- IoU
def shape_iou(sizes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of boxes centred on each other (the upper bound of the IoU on the grid).

    Args:
        sizes: ``(N, D)`` positive lesion extents.
        anchors: ``(K, D)`` positive anchor extents (same units).

    Returns:
        ``(N, K)`` float64 IoUs ``prod(min(a, b)) / (prod(a) + prod(b) - prod(min(a, b)))``.
    """
    b = np.asarray(sizes, dtype=np.float64)
    a = np.asarray(anchors, dtype=np.float64)
    inter = np.prod(np.minimum(b[:, None, :], a[None, :, :]), axis=2)
    union = np.prod(b, axis=1)[:, None] + np.prod(a, axis=1)[None, :] - inter
    return inter / union


def grid_iou(sizes: np.ndarray, anchors: np.ndarray, offset: Sequence[float] | np.ndarray) -> np.ndarray:
    """IoU of a lesion and an anchor whose centres are ``offset`` apart along each axis.

    Args:
        sizes: ``(N, D)`` lesion extents.
        anchors: ``(K, D)`` anchor extents.
        offset: ``(D,)`` centre distance per axis (e.g. half the stride: the worst grid position).

    Returns:
        ``(N, K)`` IoUs; per axis the overlap is ``clip((a + b) / 2 - |offset|, 0, min(a, b))``.
    """
    b = np.asarray(sizes, dtype=np.float64)[:, None, :]
    a = np.asarray(anchors, dtype=np.float64)[None, :, :]
    off = np.abs(np.asarray(offset, dtype=np.float64))
    overlap = np.clip((a + b) / 2.0 - off, 0.0, np.minimum(a, b))
    inter = np.prod(overlap, axis=2)
    union = np.prod(b, axis=2) + np.prod(a, axis=2) - inter
    return inter / union


def best_rescaled_iou(size: Sequence[float] | np.ndarray, anchors: np.ndarray) -> float:
    """Best shape IoU of one lesion with any anchor rescaled uniformly (its aspect ratios kept), exactly.

    For an anchor ``s * a`` the IoU is piecewise ``c s^m / (P + Q s^D - c s^m)`` between the breakpoints
    ``s = b_d / a_d`` (``m`` axes where the anchor is the smaller), with its only stationary point at
    ``s^D = m P / ((D - m) Q)``; the maximum is at a breakpoint or at one of these points.

    Args:
        size: ``(D,)`` lesion extents.
        anchors: ``(K, D)`` anchor extents.

    Returns:
        The maximum over anchors and scales.
    """
    b = np.asarray(size, dtype=np.float64)
    a = np.asarray(anchors, dtype=np.float64).reshape(-1, b.shape[0])
    d = b.shape[0]
    p = float(np.prod(b))
    best = 0.0
    for anchor in a:
        q = float(np.prod(anchor))
        scales = list(b / anchor)
        scales += [(m * p / ((d - m) * q)) ** (1.0 / d) for m in range(1, d)]
        shapes = np.asarray(scales)[:, None] * anchor[None, :]
        best = max(best, float(shape_iou(b[None], shapes).max()))
    return best


def uncovered_reason(size: Sequence[float] | np.ndarray, anchors: np.ndarray, positive_iou: float) -> str:
    """Why a lesion is not covered by an anchor set (one of :data:`REASONS`; see the module docstring).

    Args:
        size: ``(D,)`` lesion extents in voxels.
        anchors: ``(K, D)`` anchor extents in voxels (all levels).
        positive_iou: the coverage threshold.

    Returns:
        ``"too small"``, ``"too large"``, ``"too elongated"`` or ``"shape mismatch"``.
    """
    b = np.asarray(size, dtype=np.float64)
    a = np.asarray(anchors, dtype=np.float64).reshape(-1, b.shape[0])
    if np.all(b <= a.min(axis=0)):
        return "too small"
    if np.all(b >= a.max(axis=0)):
        return "too large"
    if best_rescaled_iou(b, a) < positive_iou:
        return "too elongated"
    return "shape mismatch"


# ---------------------------------------------------------------------------------------------- inputs
def _sizes_array(sizes: Any, name: str = "lesion sizes") -> np.ndarray:
    arr = np.asarray(sizes, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(f"{name} must be (N, 2) or (N, 3), got shape {arr.shape}")
    bad = ~np.all(np.isfinite(arr) & (arr > 0), axis=1)
    if bad.any():
        raise ValueError(f"{name} must be positive and finite; rows {np.flatnonzero(bad)[:10].tolist()} are not")
    return arr


def _strides_array(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> np.ndarray:
    rows = []
    for s in strides:
        if isinstance(s, int | float):
            rows.append([float(s)] * spatial_dims)
        else:
            vals = [float(v) for v in s]
            if len(vals) != spatial_dims:
                raise ValueError(f"a stride needs {spatial_dims} values, got {vals}")
            rows.append(vals)
    if not rows:
        raise ValueError("no FPN level strides given")
    arr = np.asarray(rows, dtype=np.float64)
    if np.any(arr <= 0):
        raise ValueError(f"strides must be positive, got {arr.tolist()}")
    return arr


def _spacing(spacing_mm: Sequence[float] | np.ndarray | None, spatial_dims: int) -> np.ndarray:
    if spacing_mm is None:
        return np.ones(spatial_dims)
    arr = np.asarray([float(s) for s in spacing_mm], dtype=np.float64)
    if arr.shape != (spatial_dims,) or np.any(arr <= 0):
        raise ValueError(f"spacing_mm needs {spatial_dims} positive values, got {list(spacing_mm)}")
    return arr


def _generator_voxel_shapes(generator: AnchorGenerator) -> list[np.ndarray]:
    return [s.detach().cpu().double().numpy() for s in generator.voxel_shapes()]


def _fmt_shape(shape: Sequence[float], digits: int = 3) -> str:
    return "×".join(f"{round(float(v), digits):g}" for v in shape)


def _world_axes(orientation: str | None, spatial_dims: int) -> list[int]:
    """World axis (0 x, 1 y, 2 z) of each network axis for orientation codes such as ``"RAS"``."""
    if not orientation:
        return list(range(spatial_dims))
    codes = orientation.upper()
    try:
        axes = [_AXIS_OF_CODE[c] for c in codes]
    except KeyError as exc:
        raise ValueError(f"unknown orientation code in {orientation!r}") from exc
    return axes[:spatial_dims]


def lesion_sizes_from_records(
    records: Sequence[CaseRecord], spatial_dims: int, orientation: str | None = "RAS"
) -> tuple[np.ndarray, list[str]]:
    """Per-axis lesion extents in mm along the network's axes, from datalist records (world boxes).

    World boxes (LPS mm, StandardMode) are axis-aligned, so reorientation only permutes their extents:
    network axis ``i`` is the world axis of ``orientation[i]`` (R/L -> x, A/P -> y, S/I -> z). In 2D
    (axial slices of volumes) the in-plane extents, the first two axes of ``orientation``, are used: the
    largest cross-section of the lesion.

    Args:
        records: datalist records with ``(M, 4)`` or ``(M, 6)`` world boxes.
        spatial_dims: 2 or 3 (the network's).
        orientation: axis codes scans are reoriented to (``None``: world order).

    Returns:
        ``(N, spatial_dims)`` extents in mm and ``N`` lesion ids ``"<case_id>#<k>"``. Degenerate boxes
        (an extent <= 0) are skipped with a warning.
    """
    sizes: list[np.ndarray] = []
    ids: list[str] = []
    skipped = 0
    for rec in records:
        boxes = np.asarray(rec.boxes, dtype=np.float64)
        if boxes.size == 0:
            continue
        d_box = boxes.shape[1] // 2
        ext = boxes[:, d_box:] - boxes[:, :d_box]
        axes = _world_axes(orientation if d_box == 3 else None, spatial_dims)
        if max(axes) >= d_box:
            raise ValueError(f"case {rec.case_id}: {d_box}D boxes cannot give a {spatial_dims}D network's sizes")
        ext = ext[:, axes]
        for k, e in enumerate(ext):
            if np.all(np.isfinite(e) & (e > 0)):
                sizes.append(e)
                ids.append(f"{rec.case_id}#{k}")
            else:
                skipped += 1
    if skipped:
        warnings.warn(f"skipped {skipped} degenerate lesion boxes (an extent <= 0)", stacklevel=2)
    arr = np.stack(sizes) if sizes else np.zeros((0, spatial_dims))
    return arr, ids


# ---------------------------------------------------------------------------------------------- analysis
@dataclass(frozen=True)
class UncoveredLesion:
    """A lesion whose best shape IoU is below the positive threshold.

    Attributes:
        lesion_id: identifier (``"<case_id>#<k>"`` from datalists).
        size_mm: ``D`` extents in mm.
        size_vox: ``D`` extents in voxels at the training spacing.
        best_iou: best shape IoU over all anchors.
        level: FPN level of that anchor.
        reason: one of :data:`REASONS`.
    """

    lesion_id: str
    size_mm: tuple[float, ...]
    size_vox: tuple[float, ...]
    best_iou: float
    level: int
    reason: str


@dataclass
class AnchorReport:
    """Coverage of the lesions of a data split by an anchor set (see :func:`analyze_anchors`).

    Attributes:
        lesion_ids: ``N`` lesion ids.
        sizes_mm: ``(N, D)`` extents in mm (network axis order).
        sizes_vox: ``(N, D)`` extents in voxels at the training spacing.
        best_iou: ``(N,)`` best shape IoU (upper bound: anchor centred on the lesion).
        best_level: ``(N,)`` FPN level of the best anchor.
        best_anchor: ``(N,)`` index of the best anchor within its level.
        grid_iou_min: ``(N,)`` lower bound: best IoU with the lesion centre half a stride off along every axis.
        anchors_vox: per level ``(A, D)`` anchor extents in voxels.
        strides: per level ``D`` strides.
        spacing_mm: ``D`` training spacing.
        positive_iou: coverage threshold.
        reasons: ``N`` reasons (``None`` for covered lesions).
    """

    lesion_ids: list[str]
    sizes_mm: np.ndarray
    sizes_vox: np.ndarray
    best_iou: np.ndarray
    best_level: np.ndarray
    best_anchor: np.ndarray
    grid_iou_min: np.ndarray
    anchors_vox: list[np.ndarray]
    strides: list[tuple[float, ...]]
    spacing_mm: tuple[float, ...]
    positive_iou: float
    reasons: list[str | None] = field(default_factory=list)

    @property
    def num_lesions(self) -> int:
        """``N``."""
        return len(self.lesion_ids)

    @property
    def covered(self) -> np.ndarray:
        """``(N,)`` bool: best shape IoU ``>= positive_iou``."""
        return self.best_iou >= self.positive_iou

    @property
    def coverage(self) -> float:
        """Fraction of covered lesions (NaN without lesions)."""
        return float(self.covered.mean()) if self.num_lesions else float("nan")

    @property
    def mean_best_iou(self) -> float:
        """Mean best shape IoU (NaN without lesions)."""
        return float(self.best_iou.mean()) if self.num_lesions else float("nan")

    @property
    def anchors_mm(self) -> list[np.ndarray]:
        """Per level ``(A, D)`` anchor extents in mm at the training spacing."""
        return [a * np.asarray(self.spacing_mm) for a in self.anchors_vox]

    @property
    def uncovered(self) -> list[UncoveredLesion]:
        """The uncovered lesions with their reasons, worst IoU first."""
        out = [
            UncoveredLesion(
                lesion_id=self.lesion_ids[i],
                size_mm=tuple(float(v) for v in self.sizes_mm[i]),
                size_vox=tuple(float(v) for v in self.sizes_vox[i]),
                best_iou=float(self.best_iou[i]),
                level=int(self.best_level[i]),
                reason=str(self.reasons[i]),
            )
            for i in np.flatnonzero(~self.covered)
        ]
        return sorted(out, key=lambda u: u.best_iou)

    @property
    def reason_counts(self) -> dict[str, int]:
        """Number of uncovered lesions per reason (every reason listed)."""
        counts = dict.fromkeys(REASONS, 0)
        for r in self.reasons:
            if r is not None:
                counts[r] += 1
        return counts

    def to_markdown(self, max_rows: int = 50) -> str:
        """Summary, per-level table and the uncovered lesions (at most ``max_rows``) as Markdown."""
        n = self.num_lesions
        lines = ["## Anchor coverage", ""]
        lines.append(
            f"- lesions: {n}; positive IoU {self.positive_iou:g} (shape IoU: anchor centred on the lesion, an "
            "upper bound the grid offset lowers)"
        )
        if n:
            lines.append(
                f"- coverage: **{self.coverage:.3f}** ({int(self.covered.sum())}/{n}); mean best IoU "
                f"{self.mean_best_iou:.3f}; lower bound on the grid (half-stride offset): coverage "
                f"{float((self.grid_iou_min >= self.positive_iou).mean()):.3f}, mean IoU "
                f"{float(self.grid_iou_min.mean()):.3f}"
            )
            counts = ", ".join(f"{k} {v}" for k, v in self.reason_counts.items())
            lines.append(f"- uncovered: {int((~self.covered).sum())} ({counts})")
        lines += [
            "",
            "| level | stride | anchors (mm) | anchors (voxels) | best for | covered |",
            "|---|---|---|---|---|---|",
        ]
        for lvl, (mm, vox) in enumerate(zip(self.anchors_mm, self.anchors_vox)):
            mask = self.best_level == lvl
            lines.append(
                f"| {lvl} | {_fmt_shape(self.strides[lvl])} | {', '.join(_fmt_shape(s, 2) for s in mm)} | "
                f"{', '.join(_fmt_shape(s, 2) for s in vox)} | {int(mask.sum())} | "
                f"{int((mask & self.covered).sum())} |"
            )
        unc = self.uncovered
        if unc:
            lines += [
                "",
                f"### Uncovered lesions ({len(unc)})",
                "",
                "| lesion | size (mm) | size (voxels) | best IoU | level | reason |",
                "|---|---|---|---|---|---|",
            ]
            for u in unc[:max_rows]:
                lines.append(
                    f"| {u.lesion_id} | {_fmt_shape(u.size_mm, 1)} | {_fmt_shape(u.size_vox, 2)} | {u.best_iou:.3f} | "
                    f"{u.level} | {u.reason} |"
                )
            if len(unc) > max_rows:
                lines.append(f"| ... {len(unc) - max_rows} more | | | | | |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data report (JSON-ready; NaN becomes ``None``)."""

        def num(v: float) -> float | None:
            return None if math.isnan(v) else float(v)

        return {
            "num_lesions": self.num_lesions,
            "positive_iou": float(self.positive_iou),
            "iou": "shape IoU (anchor centred on the lesion; upper bound), grid_iou_min: half-stride offset",
            "coverage": num(self.coverage),
            "mean_best_iou": num(self.mean_best_iou),
            "grid_coverage": num(float((self.grid_iou_min >= self.positive_iou).mean())) if self.num_lesions else None,
            "reason_counts": self.reason_counts,
            "spacing_mm": list(self.spacing_mm),
            "strides": [list(s) for s in self.strides],
            "anchors_vox": [a.round(4).tolist() for a in self.anchors_vox],
            "anchors_mm": [a.round(4).tolist() for a in self.anchors_mm],
            "lesions": [
                {
                    "id": self.lesion_ids[i],
                    "size_mm": self.sizes_mm[i].round(4).tolist(),
                    "size_vox": self.sizes_vox[i].round(4).tolist(),
                    "best_iou": round(float(self.best_iou[i]), 6),
                    "grid_iou_min": round(float(self.grid_iou_min[i]), 6),
                    "level": int(self.best_level[i]),
                    "anchor": int(self.best_anchor[i]),
                    "covered": bool(self.covered[i]),
                    "reason": self.reasons[i],
                }
                for i in range(self.num_lesions)
            ],
        }

    def write_json(self, path: Path | str) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def write_histogram(self, path: Path | str, axis_names: Sequence[str] = ("x", "y", "z"), dpi: int = 110) -> Path:
        """Per-axis histogram of lesion sizes in mm with the anchor extents marked, as a PNG (atomic).

        Args:
            path: the PNG to write.
            axis_names: names of the network axes.
            dpi: resolution.

        Returns:
            ``path``.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, StrMethodFormatter

        d = len(self.spacing_mm)
        fig = Figure(figsize=(4.2 * d, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, d, squeeze=False)[0]
        all_mm = [a for a in self.anchors_mm]
        values = [self.sizes_mm.reshape(-1)] + [a.reshape(-1) for a in all_mm]
        lo = max(min(float(v.min()) for v in values if v.size) / 1.3, 1e-3)
        hi = max(float(v.max()) for v in values if v.size) * 1.3
        bins = np.geomspace(lo, hi, 40)
        colours = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
        for ax_i, ax in enumerate(axes):
            if self.num_lesions:
                ax.hist(self.sizes_mm[:, ax_i], bins=bins, color="tab:blue", alpha=0.75, label="lesions")
            for lvl, shapes in enumerate(all_mm):
                for j, s in enumerate(shapes):
                    ax.axvline(
                        float(s[ax_i]),
                        color=colours[lvl % len(colours)],
                        lw=1.5,
                        ls="--",
                        label=f"level {lvl} (stride {_fmt_shape(self.strides[lvl])})" if j == 0 else None,
                    )
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(f"extent along {axis_names[ax_i] if ax_i < len(axis_names) else ax_i} (mm)")
            ax.set_ylabel("lesions")
        axes[0].legend(fontsize=7)
        cov = "n/a" if not self.num_lesions else f"{self.coverage:.3f}"
        fig.suptitle(f"lesion sizes vs anchors: coverage {cov} at shape IoU >= {self.positive_iou:g}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
            os.chmod(tmp, 0o644)
        return Path(path)


def analyze_anchors(
    lesion_sizes_mm: Any,
    lesion_ids: Sequence[str],
    anchor_generator: AnchorGenerator,
    strides: Sequence[int | Sequence[int]],
    spacing_mm: Sequence[float] | np.ndarray,
    positive_iou: float,
) -> AnchorReport:
    """How well an anchor set covers a set of lesions (shape IoU; see the module docstring).

    Args:
        lesion_sizes_mm: ``(N, D)`` lesion extents in mm along the network's axes.
        lesion_ids: ``N`` identifiers.
        anchor_generator: the anchors (its :meth:`~AnchorGenerator.voxel_shapes` are used as they are).
        strides: per FPN level, the stride (an int or ``D`` ints).
        spacing_mm: ``D`` voxel spacing of the network input (the training spacing).
        positive_iou: coverage threshold (the RPN's positive IoU).

    Returns:
        An :class:`AnchorReport`.
    """
    d = anchor_generator.spatial_dims
    spacing = _spacing(spacing_mm, d)
    raw = np.asarray(lesion_sizes_mm, dtype=np.float64).reshape(-1, d)
    sizes_mm = _sizes_array(raw) if raw.shape[0] else raw
    if len(lesion_ids) != sizes_mm.shape[0]:
        raise ValueError(f"{len(lesion_ids)} lesion ids for {sizes_mm.shape[0]} lesions")
    stride_arr = _strides_array(strides, d)
    anchors = _generator_voxel_shapes(anchor_generator)
    if len(anchors) != len(stride_arr):
        raise ValueError(f"the anchors define {len(anchors)} levels but {len(stride_arr)} strides were given")
    sizes_vox = sizes_mm / spacing
    flat = np.concatenate(anchors)
    level_of = np.concatenate([np.full(len(a), lvl) for lvl, a in enumerate(anchors)])
    index_in_level = np.concatenate([np.arange(len(a)) for a in anchors])
    n = sizes_vox.shape[0]
    if n:
        iou = shape_iou(sizes_vox, flat)
        best_k = iou.argmax(axis=1)
        best = iou[np.arange(n), best_k]
        grid = np.max(
            np.concatenate(
                [grid_iou(sizes_vox, a, stride_arr[lvl] / 2.0) for lvl, a in enumerate(anchors)],
                axis=1,
            ),
            axis=1,
        )
    else:
        best_k = np.zeros(0, dtype=np.int64)
        best = np.zeros(0)
        grid = np.zeros(0)
    reasons: list[str | None] = [
        None if best[i] >= positive_iou else uncovered_reason(sizes_vox[i], flat, positive_iou) for i in range(n)
    ]
    return AnchorReport(
        lesion_ids=[str(i) for i in lesion_ids],
        sizes_mm=sizes_mm,
        sizes_vox=sizes_vox,
        best_iou=best,
        best_level=level_of[best_k].astype(np.int64),
        best_anchor=index_in_level[best_k].astype(np.int64),
        grid_iou_min=grid,
        anchors_vox=anchors,
        strides=[tuple(float(v) for v in s) for s in stride_arr],
        spacing_mm=tuple(float(s) for s in spacing),
        positive_iou=float(positive_iou),
        reasons=reasons,
    )


# ---------------------------------------------------------------------------------------------- planning
def level_rule(
    shapes_vox: np.ndarray,
    strides: Sequence[int | Sequence[int]] | np.ndarray,
    min_cells: float = DEFAULT_MIN_CELLS,
    max_cells: float = DEFAULT_MAX_CELLS,
) -> np.ndarray:
    """Which FPN levels may carry each anchor shape (see the module docstring, "Level rule").

    Args:
        shapes_vox: ``(C, D)`` anchor extents in voxels.
        strides: per level the stride (int or ``D`` ints), or an ``(L, D)`` array.
        min_cells: smallest size in cells of a level (geometric mean over axes).
        max_cells: largest size in cells of a level.

    Returns:
        ``(C, L)`` bool; every row has at least one True.
    """
    shapes = np.asarray(shapes_vox, dtype=np.float64)
    st = strides if isinstance(strides, np.ndarray) else _strides_array(strides, shapes.shape[1])
    cells = np.exp(np.log(shapes)[:, None, :] - np.log(st)[None, :, :]).prod(axis=2) ** (1.0 / shapes.shape[1])
    lo, hi = min_cells * (1 - 1e-9), max_cells * (1 + 1e-9)  # window edges included despite rounding
    allowed = (cells >= lo) & (cells <= hi)
    geo_stride = np.exp(np.log(st).mean(axis=1))
    finest, coarsest = int(np.argmin(geo_stride)), int(np.argmax(geo_stride))
    allowed[:, finest] |= cells[:, finest] <= hi
    allowed[:, coarsest] |= cells[:, coarsest] >= lo
    lonely = ~allowed.any(axis=1)
    if lonely.any():  # in a gap between windows: the nearest window in log scale
        dist = np.maximum(np.log(min_cells) - np.log(cells), np.log(cells) - np.log(max_cells))
        allowed[np.flatnonzero(lonely), np.argmin(dist[lonely], axis=1)] = True
    return allowed


def _kmeans_log(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 30) -> np.ndarray:
    """k-means (k-means++ start) of rows of ``x``; returns ``(<=k, D)`` centres."""
    n = x.shape[0]
    centres = [x[int(rng.integers(n))]]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            break
        i = int(rng.choice(n, p=d2 / total))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(axis=1))
    c = np.stack(centres)
    for _ in range(iters):
        labels = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
        new = np.stack([x[labels == j].mean(axis=0) if np.any(labels == j) else c[j] for j in range(len(c))])
        if np.allclose(new, c):
            break
        c = new
    return c


class _Pool:
    """Candidate anchor shapes (voxels), their IoU with every lesion and the levels each may go to.

    Deduplicated by shape; storage grows by doubling, so adding one candidate costs ``O(N)``.
    """

    def __init__(self, sizes: np.ndarray, num_levels: int) -> None:
        self.sizes = sizes
        self.count = 0
        self._shapes = np.zeros((64, sizes.shape[1]))
        self._allowed = np.zeros((64, num_levels), dtype=bool)
        self._iou = np.zeros((sizes.shape[0], 64), dtype=np.float32)
        self._keys: dict[tuple[float, ...], int] = {}

    @property
    def shapes(self) -> np.ndarray:
        """``(C, D)`` candidate extents."""
        return self._shapes[: self.count]

    @property
    def allowed(self) -> np.ndarray:
        """``(C, L)`` levels each candidate may go to."""
        return self._allowed[: self.count]

    @property
    def iou(self) -> np.ndarray:
        """``(N, C)`` float32 shape IoU of every lesion with every candidate."""
        return self._iou[:, : self.count]

    def add(self, shapes: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Append candidates (an existing shape only gains levels); returns their indices."""
        idx = []
        new: list[int] = []
        for s, a in zip(shapes, allowed):
            key = _key(s)
            j = self._keys.get(key)
            if j is None:
                j = self.count
                if j == len(self._shapes):
                    cap = 2 * len(self._shapes)
                    self._shapes = np.concatenate([self._shapes, np.zeros_like(self._shapes)])[:cap]
                    self._allowed = np.concatenate([self._allowed, np.zeros_like(self._allowed)])[:cap]
                    self._iou = np.concatenate([self._iou, np.zeros_like(self._iou)], axis=1)[:, :cap]
                self._keys[key] = j
                self._shapes[j] = s
                self.count += 1
                new.append(j)
            self._allowed[j] |= a
            idx.append(j)
        if new:
            self._iou[:, new] = shape_iou(self.sizes, self._shapes[new]).astype(np.float32)
        return np.asarray(idx, dtype=np.int64)


def _score(best: np.ndarray, thr: float) -> tuple[int, float]:
    return int((best >= thr).sum()), float(best.sum(dtype=np.float64))


def _better(a: tuple[int, float], b: tuple[int, float], tol: float = 1e-9) -> bool:
    """Lexicographic: more covered lesions, or as many with an IoU sum larger by more than ``tol``."""
    return a[0] > b[0] or (a[0] == b[0] and a[1] > b[1] + tol)


class _SlotState:
    """Selected candidates (flat, with their levels) and each lesion's best and second-best anchor."""

    def __init__(self, planner: _Planner, slots: list[list[int]]) -> None:
        self.planner = planner
        self.sel = [c for level in slots for c in level]
        self.level = [lvl for lvl, level in enumerate(slots) for _ in level]
        self._update()

    def _update(self) -> None:
        m = self.planner.pool.iou[:, self.sel]
        rows = np.arange(m.shape[0])
        self.arg1 = m.argmax(axis=1)
        self.best1 = m[rows, self.arg1]
        if m.shape[1] > 1:
            m = m.copy()
            m[rows, self.arg1] = -1.0
            self.best2 = m.max(axis=1)
        else:
            self.best2 = np.zeros_like(self.best1)

    def best_without(self, s: int) -> np.ndarray:
        """``(N,)`` best IoU over the selection without slot ``s``."""
        return np.where(self.arg1 == s, self.best2, self.best1)

    def replace(self, s: int, cand: int) -> None:
        self.sel[s] = cand
        self._update()

    def slots(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.planner.L)]
        for c, lvl in zip(self.sel, self.level):
            out[lvl].append(c)
        return out


class _Planner:
    """Greedy + local search over a candidate pool (see the module docstring)."""

    def __init__(
        self,
        sizes: np.ndarray,
        strides: np.ndarray,
        per_level: int,
        thr: float,
        min_cells: float,
        max_cells: float,
    ) -> None:
        self.sizes = sizes
        self.strides = strides
        self.L = len(strides)
        self.A = per_level
        self.thr = thr
        self.min_cells = min_cells
        self.max_cells = max_cells
        self.natural = math.sqrt(min_cells * max_cells)
        self.log_sizes = np.log(sizes)
        self.tol = 1e-4 * len(sizes)  # refinement: a swap must raise the mean best IoU by 1e-4
        self.defaults: dict[int, list[int]] = {}  # per level: candidates for slots nothing else improves
        self.pool = _Pool(sizes, self.L)

    def add(self, shapes: np.ndarray, extra_level: int | None = None) -> np.ndarray:
        shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, self.sizes.shape[1])
        allowed = level_rule(shapes, self.strides, self.min_cells, self.max_cells)
        if extra_level is not None:
            allowed[:, extra_level] = True
        return self.pool.add(shapes, allowed)

    def _cells_cost(self, cands: Sequence[int]) -> np.ndarray:
        """``(len(cands), L)`` preference cost ``|log(cells / natural)|``."""
        s = np.log(self.pool.shapes[list(cands)])
        cells = np.exp((s[:, None, :] - np.log(self.strides)[None]).mean(axis=2))
        return np.abs(np.log(cells / self.natural))

    def _assign(self, cands: list[int], pinned: Mapping[int, int]) -> list[int] | None:
        """Levels of ``cands`` respecting the rule and ``A`` per level (preferring natural sizes), or None."""
        if not cands:
            return []
        allowed = self.pool.allowed[cands].copy()
        for r, c in enumerate(cands):
            if c in pinned:
                allowed[r] = False
                allowed[r, pinned[c]] = True
        big = 1e6
        cost = np.where(allowed, self._cells_cost(cands), big)
        cost = np.repeat(cost, self.A, axis=1)  # slots: level-major
        rows, cols = linear_sum_assignment(cost)
        if np.any(cost[rows, cols] >= big):
            return None
        levels = [0] * len(cands)
        for r, c in zip(rows, cols):
            levels[r] = int(c // self.A)
        return levels

    def greedy(self, start: list[tuple[int, int]]) -> list[list[int]]:
        """Greedy maximum coverage from pinned ``(candidate, level)`` pairs; returns per-level candidate lists.

        Once no candidate adds coverage or mean best IoU (by more than the refinement tolerance), the
        remaining slots of each level take that level's defaults (:attr:`defaults`: the baseline's shapes of
        the level, then filler cubes) instead of near-duplicates of useful shapes.
        """
        pinned = dict(start)
        chosen = [c for c, _ in start]
        iou = self.pool.iou
        best = iou[:, chosen].max(axis=1) if chosen else np.zeros(len(self.sizes), np.float32)
        blocked = np.zeros(iou.shape[1], dtype=bool)
        blocked[chosen] = True
        saturated, use_defaults = False, bool(self.defaults)
        while len(chosen) < self.L * self.A:
            if saturated:
                if not self._fill_defaults(chosen, pinned):
                    saturated = use_defaults = False  # defaults exhausted: back to the greedy order
                continue
            nb = np.maximum(best[:, None], iou)
            cov = (nb >= self.thr).sum(axis=0)
            tot = nb.sum(axis=0, dtype=np.float64)
            order = np.lexsort((-tot, -cov))
            picked = None
            for c in order:
                if blocked[c]:
                    continue
                if self._assign([*chosen, int(c)], pinned) is not None:
                    picked = int(c)
                    break
                blocked[c] = True  # infeasible now, so for every superset too (a matroid)
            if picked is None:
                break
            cur = _score(best, self.thr)
            if use_defaults and not _better((int(cov[picked]), float(tot[picked])), cur, self.tol):
                saturated = True
                continue
            chosen.append(picked)
            blocked[picked] = True
            best = np.maximum(best, iou[:, picked])
        levels = self._assign(chosen, pinned)
        if levels is None or len(chosen) != self.L * self.A:
            raise RuntimeError("could not fill every FPN level with anchors (internal error)")
        slots: list[list[int]] = [[] for _ in range(self.L)]
        for c, lvl in zip(chosen, levels):
            slots[lvl].append(c)
        return slots

    def _fill_defaults(self, chosen: list[int], pinned: dict[int, int]) -> bool:
        """Add one default shape to a level with a free slot (pinned there); False if none fits."""
        levels = self._assign(chosen, pinned)
        if levels is None:
            return False
        for lvl in range(self.L):
            if levels.count(lvl) >= self.A:
                continue
            for c in self.defaults.get(lvl, []):
                if c not in chosen and self._assign([*chosen, c], {**pinned, c: lvl}) is not None:
                    chosen.append(c)
                    pinned[c] = lvl
                    return True
        return False

    def refine(self, slots: list[list[int]], max_outer: int = 3, max_local: int = 30) -> list[list[int]]:
        """Local search: swap single anchors while (covered, IoU sum) improves lexicographically.

        Alternates a pass over the candidate pool with local moves (centroid of the lesions an anchor
        serves best, per-axis and uniform scaling by a factor shrinking from 1.25 to about 1.01) until
        neither improves.
        """
        state = _SlotState(self, slots)
        for outer in range(max_outer):
            pool_improved = self._pass(state, None)
            if outer > 0 and not pool_improved:
                break
            step = math.log(1.25)
            for _ in range(max_local):
                if not self._pass(state, step):
                    if step < math.log(1.01):
                        break
                    step /= 2.0
        return state.slots()

    def _moves(self, state: _SlotState, s: int, step: float) -> np.ndarray:
        """Local moves of slot ``s``: centroid of the lesions it serves, scaled copies; ``(m, D)``."""
        base = self.pool.shapes[state.sel[s]]
        served = state.arg1 == s
        moves = [np.exp(self.log_sizes[served].mean(axis=0))] if served.any() else []
        for f in (math.exp(step), math.exp(-step)):
            moves.append(base * f)
            for ax in range(base.shape[0]):
                m = base.copy()
                m[ax] *= f
                moves.append(m)
        mv = np.stack(moves)
        return mv[level_rule(mv, self.strides, self.min_cells, self.max_cells)[:, state.level[s]]]

    def _pass(self, state: _SlotState, step: float | None) -> bool:
        """One sweep over the slots: pool candidates (``step`` None) or local moves; True if improved."""
        improved = False
        for s in range(len(state.sel)):
            best_wo = state.best_without(s)
            cur = _score(np.maximum(best_wo, self.pool.iou[:, state.sel[s]]), self.thr)
            if step is None:
                cand = np.flatnonzero(self.pool.allowed[:, state.level[s]])
                cand = cand[~np.isin(cand, state.sel)]
                if cand.size == 0:
                    continue
                cols = self.pool.iou[:, cand]
            else:
                mv = self._moves(state, s, step)
                if len(mv) == 0:
                    continue
                cols = shape_iou(self.sizes, mv).astype(np.float32)
            nb = np.maximum(best_wo[:, None], cols)
            cov = (nb >= self.thr).sum(axis=0)
            tot = nb.sum(axis=0, dtype=np.float64)
            k = int(np.lexsort((-tot, -cov))[0])
            if _better((int(cov[k]), float(tot[k])), cur, self.tol):
                new = int(cand[k]) if step is None else int(self.add(mv[k : k + 1])[0])
                if new in state.sel:
                    continue
                state.replace(s, new)
                improved = True
        return improved

    def evaluate(self, slots: list[list[int]]) -> tuple[int, float]:
        chosen = [c for level in slots for c in level]
        return _score(self.pool.iou[:, chosen].max(axis=1), self.thr)


@dataclass
class PlannedAnchors:
    """Anchor shapes planned from lesion sizes (see :func:`plan_anchors`).

    Attributes:
        shapes_vox: per level ``A`` shapes, ``D`` extents in voxels of the network input.
        shapes_mm: the same in mm (``None`` when planned without ``spacing_mm``).
        spacing_mm: the spacing of ``shapes_mm`` (the generator's), or None.
        strides: per level ``D`` strides.
        anchors_per_location: ``A``.
        positive_iou: coverage threshold.
        num_lesions: lesions planned on.
        coverage: fraction covered by the plan (shape IoU, measured on the generator the shapes build).
        mean_iou: mean best shape IoU of the plan.
        baseline_coverage: the baseline's coverage on the same lesions (None without baseline).
        baseline_mean_iou: the baseline's mean best IoU.
        used_baseline: the returned shapes are the baseline's (nothing better was found).
        seconds: planning time.
    """

    shapes_vox: list[list[list[float]]]
    shapes_mm: list[list[list[float]]] | None
    spacing_mm: tuple[float, ...] | None
    strides: list[tuple[float, ...]]
    anchors_per_location: int
    positive_iou: float
    num_lesions: int
    coverage: float
    mean_iou: float
    baseline_coverage: float | None = None
    baseline_mean_iou: float | None = None
    used_baseline: bool = False
    seconds: float = 0.0

    @property
    def spatial_dims(self) -> int:
        """``D``."""
        return len(self.shapes[0][0])

    @property
    def shapes(self) -> list[list[list[float]]]:
        """Shapes in the generator's units: mm when ``spacing_mm`` is set, else voxels."""
        return self.shapes_mm if self.shapes_mm is not None else self.shapes_vox

    def generator(self) -> AnchorGenerator:
        """An :class:`AnchorGenerator` with these anchors."""
        return AnchorGenerator(spatial_dims=self.spatial_dims, shapes=self.shapes, spacing_mm=self.spacing_mm)

    def init_args(self) -> dict[str, Any]:
        """``model.detector.init_args.anchor_generator.init_args`` as plain data."""
        return {
            "spatial_dims": self.spatial_dims,
            "spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
            "shapes": self.shapes,
        }

    def summary(self) -> str:
        """One line: coverage and mean IoU before -> after."""
        before = (
            f"{self.baseline_coverage:.3f} (mean IoU {self.baseline_mean_iou:.3f}) -> "
            if self.baseline_coverage is not None and self.baseline_mean_iou is not None
            else ""
        )
        note = " [baseline kept: nothing better found]" if self.used_baseline else ""
        return (
            f"shape-IoU coverage at IoU >= {self.positive_iou:g} on {self.num_lesions} lesions: {before}"
            f"{self.coverage:.3f} (mean IoU {self.mean_iou:.3f}), {self.anchors_per_location} anchors per level, "
            f"{self.seconds:.2f} s{note}"
        )

    def yaml_snippet(self, nested: bool = True) -> str:
        """The anchor generator settings as YAML, to paste into a config or pass as a second ``--config``.

        Args:
            nested: wrap in ``model: detector: init_args: anchor_generator:`` (with the class path); else
                only the ``init_args`` keys.
        """

        def num(v: float) -> str:
            return format(float(v), ".10g") if float(v) != int(v) else f"{float(v):.1f}"

        def flow(values: Sequence[float]) -> str:
            return "[" + ", ".join(num(v) for v in values) + "]"

        body = [f"spatial_dims: {self.spatial_dims}"]
        body.append(f"spacing_mm: {'null' if self.spacing_mm is None else flow(self.spacing_mm)}")
        body.append("shapes:")
        for lvl, level in enumerate(self.shapes):
            stride = "x".join(f"{s:g}" for s in self.strides[lvl])
            body.append(f"  - [{', '.join(flow(s) for s in level)}]   # level {lvl}, stride {stride}")
        header = [f"# {self.summary()}"]
        if not nested:
            return "\n".join(header + body) + "\n"
        pad = " " * 8
        lines = [
            *header,
            "model:",
            "  detector:",
            "    init_args:",
            "      anchor_generator:",
            "        class_path: medrpn.modeling.anchors.AnchorGenerator",
            "        init_args:",
        ]
        lines += [pad + "  " + b for b in body]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready)."""
        return {
            "shapes_vox": self.shapes_vox,
            "shapes_mm": self.shapes_mm,
            "spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
            "strides": [list(s) for s in self.strides],
            "anchors_per_location": self.anchors_per_location,
            "positive_iou": self.positive_iou,
            "num_lesions": self.num_lesions,
            "coverage": self.coverage,
            "mean_iou": self.mean_iou,
            "baseline_coverage": self.baseline_coverage,
            "baseline_mean_iou": self.baseline_mean_iou,
            "used_baseline": self.used_baseline,
            "seconds": self.seconds,
        }


def _measure(sizes: np.ndarray, anchors_vox: Sequence[np.ndarray], thr: float) -> tuple[float, float]:
    best = shape_iou(sizes, np.concatenate(list(anchors_vox))).max(axis=1)
    return float((best >= thr).mean()), float(best.mean())


def plan_anchors(
    lesion_sizes_vox: Any,
    strides: Sequence[int | Sequence[int]],
    anchors_per_location: int,
    positive_iou: float,
    *,
    spacing_mm: Sequence[float] | np.ndarray | None = None,
    baseline: AnchorGenerator | None = None,
    min_cells: float = DEFAULT_MIN_CELLS,
    max_cells: float = DEFAULT_MAX_CELLS,
    max_candidates: int = 1000,
    seed: int = 0,
) -> PlannedAnchors:
    """Plan ``anchors_per_location`` anchor shapes per FPN level maximising shape-IoU coverage.

    See the module docstring for the candidates, the level rule, the greedy + refinement search and the
    never-worse-than-baseline guarantee. Deterministic for a given ``seed``.

    Args:
        lesion_sizes_vox: ``(N, D)`` lesion extents in voxels at the training spacing (network axes).
        strides: per FPN level, the stride (an int or ``D`` ints), finest first.
        anchors_per_location: anchors per level ``A`` (the budget).
        positive_iou: coverage threshold.
        spacing_mm: ``D`` spacing of the generator the shapes are for: the result is also given in mm
            (``shapes_mm``); None: voxels only.
        baseline: the anchors to beat (e.g. the config's); its shapes are candidates and a start point.
        min_cells: level rule, smallest size in cells.
        max_cells: level rule, largest size in cells.
        max_candidates: lesion shapes kept as candidates (a random subset beyond it).
        seed: random seed of the subsampling and k-means.

    Returns:
        A :class:`PlannedAnchors`.

    Raises:
        ValueError: without lesions, or with inconsistent dimensions.
    """
    t0 = time.perf_counter()
    sizes = _sizes_array(lesion_sizes_vox)
    n, d = sizes.shape
    if n == 0:
        raise ValueError("no lesions to plan anchors from")
    if anchors_per_location < 1:
        raise ValueError(f"anchors_per_location must be >= 1, got {anchors_per_location}")
    if not 0 < positive_iou <= 1:
        raise ValueError(f"positive_iou must be in (0, 1], got {positive_iou}")
    stride_arr = _strides_array(strides, d)
    n_levels = len(stride_arr)
    out_spacing = None if spacing_mm is None else _spacing(spacing_mm, d)
    base_vox: list[np.ndarray] | None = None
    if baseline is not None:
        if baseline.spatial_dims != d:
            raise ValueError(f"the baseline anchors are {baseline.spatial_dims}D, the lesions {d}D")
        if baseline.num_levels != n_levels:
            raise ValueError(f"the baseline has {baseline.num_levels} levels, {n_levels} strides were given")
        base_vox = _generator_voxel_shapes(baseline)
    rng = np.random.default_rng(seed)
    planner = _Planner(sizes, stride_arr, anchors_per_location, float(positive_iou), min_cells, max_cells)

    # candidates: lesion shapes, cluster centres, baseline, fillers
    log_sizes = np.log(sizes)
    unique = np.unique(np.round(log_sizes, 6), axis=0)
    if len(unique) > max_candidates:
        unique = unique[np.sort(rng.choice(len(unique), max_candidates, replace=False))]
    planner.add(np.exp(unique))
    budget = n_levels * anchors_per_location
    for k in sorted({max(1, budget // 2), budget, 2 * budget}):
        if k < len(unique):
            planner.add(np.exp(_kmeans_log(log_sizes, k, rng)))
    base_idx: list[np.ndarray] = []
    if base_vox is not None:
        base_idx = [planner.add(shapes, extra_level=lvl) for lvl, shapes in enumerate(base_vox)]
    natural = math.sqrt(min_cells * max_cells)
    for lvl in range(n_levels):
        factors = 2.0 ** ((np.arange(anchors_per_location) - (anchors_per_location - 1) / 2) / anchors_per_location)
        fillers = planner.add(stride_arr[lvl][None, :] * natural * factors[:, None], extra_level=lvl)
        defaults = [*(base_idx[lvl].tolist() if base_idx else []), *fillers.tolist()]
        planner.defaults[lvl] = list(dict.fromkeys(int(c) for c in defaults))

    # searches: from scratch, and from the baseline (padded greedily up to the budget)
    results = [planner.refine(planner.greedy([]))]
    if base_idx and all(len(ix) <= anchors_per_location for ix in base_idx):
        start = [(int(c), lvl) for lvl, ix in enumerate(base_idx) for c in dict.fromkeys(ix.tolist())]
        results.append(planner.refine(planner.greedy(start)))
    scores = [planner.evaluate(r) for r in results]
    best_i = 0
    for i in range(1, len(results)):
        if _better(scores[i], scores[best_i]):
            best_i = i
    slots = results[best_i]
    shapes_vox_arr = [np.stack([planner.pool.shapes[c] for c in level]) for level in slots]
    shapes_vox_arr = [level[np.argsort(np.prod(level, axis=1), kind="stable")] for level in shapes_vox_arr]

    # output units; the baseline's own numbers are kept for its shapes (exact round trip)
    scale = out_spacing if out_spacing is not None else np.ones(d)
    base_units: dict[tuple[float, ...], list[float]] = {}
    if baseline is not None and base_vox is not None:
        same_units = (baseline.spacing_mm is None and out_spacing is None) or (
            baseline.spacing_mm is not None
            and out_spacing is not None
            and np.array_equal(np.asarray(baseline.spacing_mm), out_spacing)
        )
        for lvl, level in enumerate(base_vox):
            for j, s in enumerate(level):
                exact = list(baseline.shapes_mm_or_vox[lvl][j]) if same_units else list(s * scale)
                base_units[_key(s)] = [float(v) for v in exact]

    def units(shape_vox: np.ndarray) -> list[float]:
        return base_units.get(_key(shape_vox)) or [round(float(v), 3) for v in shape_vox * scale]

    plan = PlannedAnchors(
        shapes_vox=[],
        shapes_mm=None,
        spacing_mm=None if out_spacing is None else tuple(float(s) for s in out_spacing),
        strides=[tuple(float(v) for v in s) for s in stride_arr],
        anchors_per_location=anchors_per_location,
        positive_iou=float(positive_iou),
        num_lesions=n,
        coverage=0.0,
        mean_iou=0.0,
    )
    _set_shapes(plan, [[units(s) for s in level] for level in shapes_vox_arr], sizes)
    if base_vox is not None:
        b_cov, b_iou = _measure(sizes, base_vox, positive_iou)
        plan.baseline_coverage, plan.baseline_mean_iou = b_cov, b_iou
        if all(len(level) == anchors_per_location for level in base_vox):
            worse = plan.coverage < b_cov or (plan.coverage == b_cov and plan.mean_iou < b_iou)
            if worse:
                _set_shapes(plan, [[units(s) for s in level] for level in base_vox], sizes)
            plan.used_baseline = _same_sets(plan.shapes_vox, base_vox)
    plan.seconds = time.perf_counter() - t0
    return plan


def _key(shape_vox: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(np.log(np.asarray(shape_vox, dtype=np.float64)), 9))


def _set_shapes(plan: PlannedAnchors, shapes: list[list[list[float]]], sizes: np.ndarray) -> None:
    """Install output-unit shapes and measure them through the generator they build (float32 as in training)."""
    if plan.spacing_mm is None:
        plan.shapes_mm, plan.shapes_vox = None, shapes
    else:
        plan.shapes_mm = shapes
    final_vox = _generator_voxel_shapes(plan.generator())
    plan.shapes_vox = [[[float(v) for v in s] for s in level] for level in final_vox]
    plan.coverage, plan.mean_iou = _measure(sizes, final_vox, plan.positive_iou)


def _same_sets(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Same anchor shapes on every level, in any order."""
    for x, y in zip(a, b):
        xs = sorted(map(tuple, np.asarray(x, dtype=np.float64).tolist()))
        ys = sorted(map(tuple, np.asarray(y, dtype=np.float64).tolist()))
        if xs != ys:
            return False
    return len(a) == len(b)


# ---------------------------------------------------------------------------------------------- training
def apply_anchor_shapes(detector: LesionDetector, shapes_mm_or_vox: Sequence[Sequence[Sequence[float]]]) -> None:
    """Install new anchor shapes in a detector and keep its checkpointed ``spec`` in sync.

    ``LesionDetector.spec`` holds a copy of the generator's spec taken at construction, so after
    :meth:`AnchorGenerator.replace_shapes` it is refreshed here; checkpoints (``medrpn_inference``) then
    carry the new shapes and :meth:`LesionDetector.from_spec` rebuilds them.

    Args:
        detector: the detector (its ``rpn.anchor_generator`` is changed in place).
        shapes_mm_or_vox: per level, ``A`` shapes in the generator's units.
    """
    gen = detector.rpn.anchor_generator
    gen.replace_shapes(shapes_mm_or_vox)
    detector.spec["anchor_generator"] = dict(gen.spec)


def restore_planned_anchors(detector: LesionDetector, checkpoint: Mapping[str, Any]) -> bool:
    """Put the anchor shapes stored in a medrpn checkpoint back into a detector (e.g. built from ``auto``).

    Call from ``on_load_checkpoint``: a model rebuilt from an ``anchors: auto`` config has placeholder
    anchors until then.

    Args:
        detector: the detector to update.
        checkpoint: a checkpoint dict with ``medrpn_inference.detector.anchor_generator``.

    Returns:
        True when shapes were installed (explicit, compatible shapes differing from the current ones).
    """
    spec = checkpoint.get("medrpn_inference", {}).get("detector", {}).get("anchor_generator", {})
    shapes = spec.get("shapes")
    gen = detector.rpn.anchor_generator
    if not isinstance(shapes, list) or shapes == gen.spec.get("shapes"):
        return False
    apply_anchor_shapes(detector, shapes)
    return True


def plan_for_training(module: LesionDetectionModule, datamodule: LesionDataModule) -> PlannedAnchors | None:
    """Plan ``anchors: auto`` from the training split and install the shapes (before fitting).

    Reads the training split's world boxes (no image is loaded), converts their extents to voxels at the
    datamodule's spacing (2D: in-plane), plans with the module's RPN positive IoU and the generator's
    anchors per cell, and installs the result with :func:`apply_anchor_shapes`.

    Args:
        module: the LightningModule (its detector's generator may need planning).
        datamodule: the datamodule (``records``, ``keys["fit"]``, ``spacing_mm``, ``orientation``).

    Returns:
        The plan, or None when the generator has explicit shapes already.

    Raises:
        ValueError: when the training split has no lesion.
    """
    detector = module.detector
    gen = detector.rpn.anchor_generator
    if not getattr(gen, "needs_planning", False):
        return None
    d = gen.spatial_dims
    records = datamodule.records(datamodule.keys["fit"])
    sizes_mm, _ = lesion_sizes_from_records(records, d, getattr(datamodule, "orientation", "RAS"))
    if len(sizes_mm) == 0:
        raise ValueError(f"anchors: auto needs lesions, but the {datamodule.keys['fit']!r} split has none")
    data_spacing = np.asarray(datamodule.spacing_mm[:d], dtype=np.float64)
    plan = plan_anchors(
        sizes_mm / data_spacing,
        detector.strides,
        gen.num_anchors_per_location()[0],
        float(module.rpn_cfg.positive_iou),
        spacing_mm=gen.spacing_mm,
        baseline=gen,
    )
    apply_anchor_shapes(detector, plan.shapes)
    from lightning_utilities.core.rank_zero import rank_zero_info

    rank_zero_info(f"anchors: auto -> planned from the training split: {plan.summary()}")
    return plan


# ---------------------------------------------------------------------------------------------- CLI
def _build(config: str, extra: Sequence[str]) -> tuple[LesionDetectionModule, LesionDataModule]:
    from medrpn.cli import MedrpnCLI
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.module import LesionDetectionModule

    argv = sys.argv
    sys.argv = argv[:1]  # the config parser gets `args` only (LightningCLI warns when sys.argv has more)
    try:
        cli = MedrpnCLI(
            LesionDetectionModule,
            LesionDataModule,
            run=False,
            args=["--config", config, "--trainer.logger", "false", *extra],
            parser_kwargs={"default_env": False, "prog": "medrpn anchors"},
        )
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule


def _lesions(
    module: LesionDetectionModule, dm: LesionDataModule, split: str | None
) -> tuple[np.ndarray, list[str], np.ndarray, str]:
    d = module.detector.spatial_dims
    key = split or dm.keys["fit"]
    sizes_mm, ids = lesion_sizes_from_records(dm.records(key), d, dm.orientation)
    return sizes_mm, ids, np.asarray(dm.spacing_mm[:d], dtype=np.float64), key


def anchors_main(argv: Sequence[str] | None = None) -> int:
    """``medrpn anchors analyze|plan``: anchor coverage report and anchor planning from a training config.

    Options the subcommand does not know (e.g. ``--data.datalist=...``) are passed to the Lightning
    config parser, after ``--config`` and ``--trainer.logger false``.

    Args:
        argv: arguments after ``medrpn anchors`` (default: ``sys.argv[1:]``).

    Returns:
        Exit status.
    """
    parser = argparse.ArgumentParser(
        prog="medrpn anchors",
        description="Anchor coverage analysis and planning from the lesion boxes of a training config's data.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    an = sub.add_parser("analyze", help="coverage of the configured anchors", allow_abbrev=False)
    pl = sub.add_parser("plan", help="plan anchors from the data and print the config snippet", allow_abbrev=False)
    for p in (an, pl):
        p.add_argument("--config", required=True, help="Lightning YAML config (model + data)")
        p.add_argument("--split", default=None, help="datalist split (default: the training split)")
        p.add_argument("--out", default="runs/anchors", help="output folder (default: runs/anchors)")
    pl.add_argument("--budget", type=int, default=None, help="anchors per level (default: the config's)")
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))

    module, dm = _build(args.config, extra)
    gen = module.detector.rpn.anchor_generator
    strides = module.detector.strides
    thr = float(module.rpn_cfg.positive_iou)
    sizes_mm, ids, spacing, split = _lesions(module, dm, args.split)
    out = Path(args.out)
    if args.command == "analyze":
        if gen.needs_planning:
            print("note: the config's anchors are `auto` placeholders; run `medrpn anchors plan` to see a plan")
        report = analyze_anchors(sizes_mm, ids, gen, strides, spacing, thr)
        print(f"split {split!r} of {dm.datalist}\n")
        print(report.to_markdown())
        png = report.write_histogram(out / "anchor_sizes.png")
        js = report.write_json(out / "anchor_report.json")
        md = atomic_write_text(out / "anchor_report.md", report.to_markdown(max_rows=10_000) + "\n")
        print(f"\nwrote {png}, {js}, {md}")
        return 0
    if len(sizes_mm) == 0:
        print(f"medrpn anchors plan: the {split!r} split has no lesion", file=sys.stderr)
        return 1
    budget = args.budget or gen.num_anchors_per_location()[0]
    plan = plan_anchors(
        sizes_mm / spacing,
        strides,
        budget,
        thr,
        spacing_mm=gen.spacing_mm if gen.spacing_mm is not None else spacing,
        baseline=gen,
    )
    snippet = plan.yaml_snippet()
    print(snippet)
    before = (
        f"{plan.baseline_coverage:.3f} (mean IoU {plan.baseline_mean_iou:.3f})"
        if plan.baseline_coverage is not None and plan.baseline_mean_iou is not None
        else "n/a"
    )
    label = "auto placeholders" if gen.needs_planning else "configured anchors"
    print(f"coverage before ({label}): {before}")
    print(f"coverage after  (planned, {budget}/level): {plan.coverage:.3f} (mean IoU {plan.mean_iou:.3f})")
    y = atomic_write_text(out / "anchors_plan.yaml", snippet)
    js = atomic_write_text(out / "anchors_plan.json", json.dumps(plan.to_dict(), indent=1) + "\n")
    print(f"wrote {y}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(anchors_main())
