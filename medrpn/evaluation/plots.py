"""PNG figures of evaluation results: the FROC curve and the lesion-class confusion matrix.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend state, so
safe in worker processes and threads) and written atomically: to a temporary file in the target folder,
then moved over the target with :func:`os.replace`, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medrpn.evaluation.froc import LUNA16_FP_RATES, FROCResult
from medrpn.overlays.atomic import atomic_path

__all__ = ["plot_confusion", "plot_froc"]


def _fraction_label(rate: float) -> str:
    """``0.125 -> "1/8"``, ``2.0 -> "2"``."""
    if rate < 1 and float(1 / rate).is_integer():
        return f"1/{int(1 / rate)}"
    return f"{rate:g}"


def _save_atomic(fig: Figure, path: Path | str, dpi: int) -> Path:
    """Render ``fig`` as PNG to ``path`` atomically (:func:`medrpn.overlays.atomic.atomic_path`)."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def plot_froc(
    result: FROCResult,
    path: Path | str,
    title: str = "FROC",
    *,
    label: str = "model",
    dpi: int = 120,
) -> Path:
    """Write the FROC curve as a PNG.

    The x axis is FPs per scan on a log2 scale from 1/8 to 8; the curve is the interpolated sensitivity
    (the same interpolation as the operating points, so the marks lie on the curve) sampled densely over
    that range; the operating points ``result.fp_rates`` within the range are marked and annotated with
    their sensitivity; the CPM is in the title and the legend.

    Args:
        result: the :class:`~medrpn.evaluation.froc.FROCResult`.
        path: target PNG path (parent folders are created).
        title: figure title; ``" — CPM 0.xxx"`` is appended.
        label: legend label of the curve.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    lo, hi = min(LUNA16_FP_RATES), max(LUNA16_FP_RATES)
    grid = np.geomspace(lo, hi, 400)
    curve = np.array([result.sensitivity_at(float(r)) for r in grid])

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(grid, curve, color="tab:blue", linewidth=2, label=f"{label} (CPM {result.cpm:.3f})")
    in_range = [(float(r), float(s)) for r, s in zip(result.fp_rates, result.sensitivities) if lo <= r <= hi]
    if in_range:
        xs, ys = zip(*in_range)
        ax.plot(xs, ys, linestyle="none", marker="o", color="tab:red", label="operating points")
        for x, y in in_range:
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo / 1.15, hi * 1.15)
    ax.set_xticks(list(LUNA16_FP_RATES))
    ax.set_xticklabels([_fraction_label(r) for r in LUNA16_FP_RATES])
    ax.minorticks_off()
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(f"{title} — CPM {result.cpm:.3f}")
    ax.grid(True, which="major", linestyle=":", alpha=0.6)
    ax.legend(loc="lower right")
    ax.text(
        0.02,
        0.97,
        f"{result.num_lesions} lesions, {result.num_scans} scans",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
    )
    fig.tight_layout()
    return _save_atomic(fig, path, dpi)


def plot_confusion(
    matrix: Any,
    class_names: Sequence[str],
    path: Path | str,
    title: str = "Lesion class confusion",
    *,
    dpi: int = 120,
) -> Path:
    """Write a confusion matrix from :func:`medrpn.evaluation.metrics.class_confusion` as a PNG.

    Args:
        matrix: ``(C+1, C+1)`` counts: rows = true class then "false positive", columns = predicted
            class then "missed" (numpy or torch).
        class_names: ``C`` foreground class names.
        path: target PNG path (parent folders are created).
        title: figure title.
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().numpy()
    mat = np.asarray(matrix)
    c = len(class_names)
    if mat.shape != (c + 1, c + 1):
        raise ValueError(f"matrix must have shape ({c + 1}, {c + 1}) for {c} class names, got {mat.shape}")
    rows = [*class_names, "false positive"]
    cols = [*class_names, "missed"]

    size = 1.2 + 0.9 * (c + 1)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(mat, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    vmax = float(mat.max()) if mat.size else 0.0
    for i in range(c + 1):
        for j in range(c + 1):
            v = mat[i, j]
            ax.text(
                j,
                i,
                f"{v:g}",
                ha="center",
                va="center",
                fontsize=9,
                color="white" if vmax > 0 and v > vmax / 2 else "black",
            )
    ax.set_xticks(range(c + 1))
    ax.set_xticklabels(cols, rotation=30, ha="right")
    ax.set_yticks(range(c + 1))
    ax.set_yticklabels(rows)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title)
    fig.tight_layout()
    return _save_atomic(fig, path, dpi)
