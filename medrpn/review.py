"""Reviewing the findings of a batch-inference run: browse, accept/reject/comment, export — the logic of
``notebooks/review_proposals.ipynb``.

A :class:`ReviewSession` is opened on a batch output folder (``medrpn infer --output OUT``)::

    session = ReviewSession.open("runs/demo/infer", scan_root="data/heldout")
    print(session.table())                          # every finding, sorted by score
    sel = session.select(session.table()[0].scan, 1)  # slice indices through its centre + zoom window
    fig = render_review_figure(session, sel.scan, sel.finding.rank, window="lung")
    session.accept(sel.scan, 1, comment="nodule, follow up")
    session.export("review_export/review.json", "review_export/review.csv")

**What it reads.** Only the ``proposals.json`` of every scan folder below the output folder
(:func:`medrpn.overlays.tables.collect_proposals`) and, lazily and only to draw it, the scan itself
(:func:`medrpn.data.io.load_scan`). ``source`` in ``proposals.json`` is the scan's path relative to the input root
it was found under (or absolute); :func:`resolve_source` looks for it under each ``scan_root`` and, so that one root
such as ``data/heldout`` serves both ``data/heldout/dicom`` and ``data/heldout/nifti`` inputs, under each root's
immediate sub-folders. The loaded scan must match the grid stored in ``proposals.json`` (shape and affine), otherwise
:class:`ScanMismatchError` is raised rather than drawing boxes on the wrong image.

**Scans are named by a key.** ``ReviewScan.key`` is the scan id (SeriesInstanceUID for DICOM, file stem otherwise);
when two scans of the batch share an id (two ``ct.nii.gz`` in different folders) it is ``"<scan id>@<folder>"``
with the scan's output folder relative to the output root. Every method that takes ``scan_id`` takes that key.

**Coordinates.** Boxes are world boxes in **LPS millimetres**, MONAI ``StandardMode`` (``[x_min, y_min, z_min,
x_max, y_max, z_max]``; ``xyxy`` in 2D), exactly as in ``proposals.json`` (see :mod:`medrpn.geometry`); the centre is
the box centre, also LPS mm. The export files restate this convention.

**Display.** Slices are shown the way :mod:`medrpn.overlays.images` shows them (radiological convention: axial with
the patient's right on the left and anterior at the top, coronal with right on the left and superior at the top,
sagittal with anterior on the left and superior at the top; pixels with the voxel aspect ratio); this module reuses
its :func:`~medrpn.overlays.images.canonical_grid` and :func:`~medrpn.overlays.images.view_plane`. Slice indices
(:class:`Selection`, :func:`draw_view`) are indices of that displayed (LPS-aligned) grid: ``axial`` counts slices
from inferior to superior, ``coronal`` from anterior to posterior, ``sagittal`` from the patient's right to left.

**Decisions and export.** Decisions live in memory until :meth:`ReviewSession.export` writes them (JSON + CSV,
atomically). The export never touches the batch outputs: a target inside the output folder is refused unless it lies
in its ``reviewed/`` sub-folder (:data:`REVIEW_SUBDIR`), reserved batch file names are refused everywhere inside it,
targets inside a scan root are refused, and an existing file is only replaced when it is an earlier review export.
:meth:`ReviewSession.load_decisions` reads an export back to resume a review.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import html
import io
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from numpy.typing import NDArray

from medrpn.geometry import CONVENTION_NOTE, WORLD_SPACE, image_to_world_boxes, world_to_image_boxes, world_to_voxel
from medrpn.inference.results import DEFAULT_CLASS_NAMES, Finding
from medrpn.overlays.atomic import atomic_write_text
from medrpn.overlays.images import (
    BOX_COLOUR,
    VIEW_2D,
    VIEW_SPECS,
    VIEWS_3D,
    CanonicalGrid,
    ViewPlane,
    canonical_grid,
    display_range,
    draw_orientation_letters,
    view_plane,
)
from medrpn.overlays.nifti import spatial_affine
from medrpn.overlays.tables import CANDIDATES_CSV, FAILURES_CSV, PROPOSALS_JSON, ProposalsFile, collect_proposals

logger = logging.getLogger(__name__)

__all__ = [
    "DECISIONS",
    "REVIEW_CSV_HEADER",
    "REVIEW_FORMAT",
    "REVIEW_SUBDIR",
    "WINDOW_PRESETS",
    "Decision",
    "DemoBatch",
    "FindingRow",
    "FindingTable",
    "ProtectedPathError",
    "ReviewController",
    "ReviewScan",
    "ReviewSession",
    "ScanMismatchError",
    "ScanNotAvailableError",
    "Selection",
    "ViewDrawing",
    "check_export_target",
    "draw_view",
    "figure_png",
    "render_review_figure",
    "resolve_source",
    "resolve_window",
    "review_widget",
    "widgets_available",
    "write_demo_batch",
]

WINDOW_PRESETS: Final[Mapping[str, tuple[float, float]]] = MappingProxyType(
    {
        "lung": (-600.0, 1500.0),
        "soft tissue": (40.0, 400.0),
        "bone": (400.0, 1800.0),
        "mediastinum": (50.0, 350.0),
    }
)
"""Display window presets, ``name -> (level, width)`` in HU."""

DECISIONS: Final = ("pending", "accepted", "rejected")
"""Possible decisions; ``pending`` = not decided (yet)."""

REVIEW_SUBDIR: Final = "reviewed"
"""The only sub-folder of a batch output folder an export may write into."""

REVIEW_FORMAT: Final = "medrpn-review"
"""``format`` field of an exported review JSON."""

REVIEW_VERSION: Final = 1
"""``version`` field of an exported review JSON."""

PROTECTED_NAMES: Final = frozenset({PROPOSALS_JSON, CANDIDATES_CSV, FAILURES_CSV, "index.html"})
"""Batch-output file names an export may never use inside the output folder (a ``proposals.json`` written there
would be read back as a scan)."""

REVIEW_CSV_HEADER: Final = (
    "scan",
    "scan_id",
    "rank",
    "decision",
    "comment",
    "score",
    "class_name",
    "label",
    "objectness",
    "centre_x_lps_mm",
    "centre_y_lps_mm",
    "centre_z_lps_mm",
    "x_min_lps_mm",
    "y_min_lps_mm",
    "z_min_lps_mm",
    "x_max_lps_mm",
    "y_max_lps_mm",
    "z_max_lps_mm",
    "decided_at",
    "source",
    "proposals",
)
"""Columns of the exported review CSV (the ``_lps_mm`` suffix states the convention; z columns empty in 2D)."""

EXPORT_CONVENTION: Final = (
    CONVENTION_NOTE + "; 'centre' is the box centre and 'size' the box extent per axis, LPS mm; in 2D boxes are "
    "[x_min, y_min, x_max, y_max] (MONAI 'xyxy')"
)
"""Coordinate statement written into every export."""

SELECTED_COLOUR: Final = "#ffd400"
"""Colour of the selected finding (others use :data:`medrpn.overlays.images.BOX_COLOUR`)."""

DEFAULT_ZOOM_MM: Final = 80.0
"""Smallest side of the zoom window around a selected finding, mm."""

_BOX_EPS: Final = 1e-6
_AXIS_NAMES: Final = ("x", "y", "z")
_FIG_BG: Final = "#101010"


class ScanNotAvailableError(FileNotFoundError):
    """The scan of a ``proposals.json`` cannot be found under the scan roots."""


class ScanMismatchError(ValueError):
    """The scan found on disk does not have the grid stored in ``proposals.json``."""


class ProtectedPathError(ValueError):
    """An export target that would touch the batch outputs or the scan inputs."""


# ----------------------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class ReviewScan:
    """One scan of the batch, as read from its ``proposals.json``.

    Attributes:
        key: unique name in the session (the scan id, or ``"<scan id>@<folder>"`` when ids repeat).
        scan_id: the scan id stored in ``proposals.json``.
        source: the source path stored in ``proposals.json``.
        proposals: the ``proposals.json`` file.
        findings: its findings, in rank order.
        affine_ras: ``(D+1, D+1)`` RAS affine of the source grid.
        spatial_shape: ``D`` sizes of the source grid.
        class_names: lesion class names.
        source_path: the scan on disk, or ``None`` when it was not found (tables and export still work).
    """

    key: str
    scan_id: str
    source: str
    proposals: Path
    findings: tuple[Finding, ...]
    affine_ras: NDArray[np.float64]
    spatial_shape: tuple[int, ...]
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    source_path: Path | None = None

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.spatial_shape)

    @property
    def views(self) -> tuple[str, ...]:
        """``("axial", "coronal", "sagittal")`` for a volume, ``("image",)`` for a 2D image."""
        return VIEWS_3D if self.spatial_dims == 3 else (VIEW_2D,)

    def finding(self, rank: int) -> Finding:
        """The finding of a given rank.

        Args:
            rank: 1-based rank.

        Returns:
            The finding.

        Raises:
            KeyError: no finding has that rank.
        """
        for f in self.findings:
            if f.rank == int(rank):
                return f
        raise KeyError(f"scan {self.key!r} has no finding of rank {rank} (ranks {[f.rank for f in self.findings]})")


@dataclass
class Decision:
    """The reviewer's decision on one finding.

    Attributes:
        decision: one of :data:`DECISIONS`.
        comment: free text.
        decided_at: ISO-8601 UTC time of the last change (empty when never changed).
    """

    decision: str = "pending"
    comment: str = ""
    decided_at: str = ""


@dataclass(frozen=True)
class FindingRow:
    """One line of the findings table.

    Attributes:
        scan: the scan key.
        scan_id: the scan id.
        rank: rank within the scan.
        score: detection score.
        label: lesion class id.
        class_name: lesion class name.
        objectness: RPN objectness.
        box: LPS mm box (StandardMode).
        centre: LPS mm box centre.
        size: box extent per axis, mm.
        decision: current decision.
        comment: current comment.
    """

    scan: str
    scan_id: str
    rank: int
    score: float
    label: int
    class_name: str
    objectness: float
    box: tuple[float, ...]
    centre: tuple[float, ...]
    size: tuple[float, ...]
    decision: str = "pending"
    comment: str = ""


def _fmt_vec(v: Sequence[float], sep: str = ", ") -> str:
    return sep.join(f"{x:.1f}" for x in v)


class FindingTable(list[FindingRow]):
    """A list of :class:`FindingRow` that prints as a text table and shows as HTML in a notebook."""

    COLUMNS: Final = ("#", "scan", "rank", "score", "class", "centre LPS (mm)", "size (mm)", "decision", "comment")

    def cells(self) -> list[list[str]]:
        """The table's cells as strings, one list per row (columns :attr:`COLUMNS`)."""
        return [
            [
                str(i),
                r.scan,
                str(r.rank),
                f"{r.score:.3f}",
                r.class_name,
                f"({_fmt_vec(r.centre)})",
                _fmt_vec(r.size, " x "),
                r.decision,
                r.comment,
            ]
            for i, r in enumerate(self, start=1)
        ]

    def to_text(self, max_rows: int | None = None) -> str:
        """Fixed-width text table.

        Args:
            max_rows: show at most this many rows (a last line says how many were left out).

        Returns:
            The table.
        """
        cells = self.cells()
        shown = cells if max_rows is None else cells[: max(max_rows, 0)]
        rows = [list(self.COLUMNS), *shown]
        widths = [max(len(r[c]) for r in rows) for c in range(len(self.COLUMNS))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if len(shown) < len(cells):
            lines.append(f"... {len(cells) - len(shown)} more")
        if not cells:
            lines.append("(no findings)")
        return "\n".join(lines)

    def to_html(self) -> str:
        """HTML table (every cell escaped)."""
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.COLUMNS)
        body = (
            "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.cells())
            or f'<tr><td colspan="{len(self.COLUMNS)}">no findings</td></tr>'
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        return self.to_html()


@dataclass(frozen=True)
class Selection:
    """Where a finding is in the displayed grid.

    Attributes:
        scan: the scan key.
        finding: the finding.
        voxel: continuous index of the finding's centre on the **source** grid (voxel centres at integers).
        slices: per view, the displayed-grid index of the slice through the centre (the slice the batch's review PNGs
            show); ``axial`` counts inferior -> superior, ``coronal`` anterior -> posterior, ``sagittal`` right ->
            left, ``image`` is ``-1`` (2D).
        zoom: per view, the zoom window ``(h0, v0, h1, v1)`` in displayed-grid voxels (voxel-edge coordinates of
            the horizontal and vertical display axes) centred on the finding, at least ``zoom_mm`` per side.
    """

    scan: str
    finding: Finding
    voxel: tuple[float, ...]
    slices: Mapping[str, int]
    zoom: Mapping[str, tuple[int, int, int, int]]

    @property
    def axial(self) -> int:
        """Index of the axial slice (3D)."""
        return self.slices["axial"]

    @property
    def coronal(self) -> int:
        """Index of the coronal slice (3D)."""
        return self.slices["coronal"]

    @property
    def sagittal(self) -> int:
        """Index of the sagittal slice (3D)."""
        return self.slices["sagittal"]


# ----------------------------------------------------------------------------------------------------------------
# helpers


def resolve_window(window: str | tuple[float, float] | None, image: np.ndarray | None = None) -> tuple[float, float]:
    """Display range ``(vmin, vmax)`` of a window.

    Args:
        window: a preset name of :data:`WINDOW_PRESETS` (case-insensitive), ``(level, width)`` in HU, or ``None``/
            ``"auto"`` for the 0.5-99.5 percentile range of ``image`` (MR, radiographs).
        image: the image, needed for ``None``/``"auto"``.

    Returns:
        ``(vmin, vmax)``.

    Raises:
        ValueError: unknown preset, non-positive width, or ``None`` without an image.
    """
    if isinstance(window, str):
        name = window.strip().lower()
        if name == "auto":
            window = None
        elif name in WINDOW_PRESETS:
            window = WINDOW_PRESETS[name]
        else:
            raise ValueError(f"unknown window preset {window!r}; choose from {[*WINDOW_PRESETS, 'auto']}")
    if window is None:
        if image is None:
            raise ValueError("an automatic window needs the image")
        return display_range(np.asarray(image), None)
    level, width = float(window[0]), float(window[1])
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    return display_range(np.zeros(1), (level, width))


def _window_name(window: str | tuple[float, float] | None) -> str:
    if window is None:
        return "auto"
    if isinstance(window, str):
        return window
    return f"L {float(window[0]):g} / W {float(window[1]):g}"


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _as_roots(scan_root: Path | str | Sequence[Path | str] | None) -> tuple[Path, ...]:
    if scan_root is None:
        return ()
    if isinstance(scan_root, str | os.PathLike):
        parts = [p for p in str(scan_root).split(os.pathsep) if p] if isinstance(scan_root, str) else [scan_root]
        return tuple(Path(p).expanduser() for p in parts)
    return tuple(Path(p).expanduser() for p in scan_root)


def resolve_source(source: str, scan_roots: Sequence[Path | str] = ()) -> Path | None:
    """Find a scan on disk from the ``source`` stored in ``proposals.json``.

    Tried in order: an absolute ``source`` as is; ``root / source`` for every root; ``root / child / source`` for
    every immediate sub-folder ``child`` of every root (so ``data/heldout`` finds the scans of the
    ``data/heldout/dicom`` and ``data/heldout/nifti`` inputs); without roots, ``source`` relative to the working
    directory.

    Args:
        source: the stored source path.
        scan_roots: folders the batch inputs were found under.

    Returns:
        The existing file/folder, or ``None``.
    """
    if not source:
        return None
    src = Path(source).expanduser()
    candidates: list[Path] = []
    if src.is_absolute():
        candidates.append(src)
    else:
        roots = [Path(r).expanduser() for r in scan_roots]
        candidates += [r / src for r in roots]
        for r in roots:
            if r.is_dir():
                try:
                    children = sorted(c for c in r.iterdir() if c.is_dir() and not c.name.startswith("."))
                except OSError:
                    children = []
                candidates += [c / src for c in children]
        if not roots:
            candidates.append(src)
    for c in candidates:
        if c.exists():
            return c
    return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_EXPORT_JSON_HEAD: Final = re.compile(r'^\s*\{\s*"format"\s*:\s*"' + re.escape(REVIEW_FORMAT) + '"')


def _is_review_export(path: Path) -> bool:
    """Whether an existing file is an earlier review export (JSON starting with our ``format``, or our CSV header)."""
    try:
        with path.open("r", encoding="utf-8") as fh:
            head = fh.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    if _EXPORT_JSON_HEAD.match(head):
        return True
    return head.splitlines()[:1] == [",".join(REVIEW_CSV_HEADER)]


def check_export_target(path: Path | str, output_dir: Path | str, scan_roots: Sequence[Path | str] = ()) -> Path:
    """Refuse an export target that could touch the batch outputs or the scans.

    Args:
        path: the file to write.
        output_dir: the batch output folder.
        scan_roots: the scan input folders.

    Returns:
        The path (unchanged).

    Raises:
        ProtectedPathError: the target is inside the output folder but not in its ``reviewed/`` sub-folder, has a
            reserved batch file name inside the output folder, is inside a scan root, is a folder, or is an existing
            file that is not an earlier review export.
    """
    p = Path(path).expanduser()
    target = p.resolve()
    out = Path(output_dir).expanduser().resolve()
    reviewed = out / REVIEW_SUBDIR
    if _is_within(target, out):
        if target.name in PROTECTED_NAMES:
            raise ProtectedPathError(f"{p}: {target.name!r} is a batch-output file name; choose another name")
        if not (_is_within(target, reviewed) and target != reviewed):
            raise ProtectedPathError(
                f"{p} is inside the batch output folder {output_dir}: the review never writes over the batch "
                f"outputs; export to a new folder (e.g. {out.parent / 'review_export'}) or to {reviewed}"
            )
    for root in scan_roots:
        r = Path(root).expanduser().resolve()
        if _is_within(target, r):
            raise ProtectedPathError(f"{p} is inside the scan folder {root}: the review never writes into its inputs")
    if target.is_dir():
        raise ProtectedPathError(f"{p} is a folder; give a file name")
    if target.exists() and not _is_review_export(target):
        raise ProtectedPathError(f"{p} exists and is not an earlier review export; refusing to overwrite it")
    return p


def figure_png(fig: Figure, dpi: float | None = None) -> bytes:
    """Render a figure to PNG bytes (no pyplot, works headless and in any notebook backend).

    Args:
        fig: the figure.
        dpi: resolution (default: the figure's).

    Returns:
        The PNG file content.
    """
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor(), metadata={"Software": None})
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# session


def _scan_from_file(pf: ProposalsFile, key: str, roots: Sequence[Path]) -> ReviewScan:
    doc = pf.doc
    d = pf.spatial_dims
    shape = tuple(int(s) for s in doc.get("spatial_shape") or ())
    if len(shape) != d:
        raise ValueError(f"{pf.path}: missing or invalid spatial_shape")
    affine = spatial_affine(np.asarray(doc["affine_ras"], dtype=np.float64), d)
    return ReviewScan(
        key=key,
        scan_id=pf.scan_id,
        source=pf.source,
        proposals=pf.path,
        findings=tuple(sorted(pf.findings, key=lambda f: f.rank)),
        affine_ras=affine,
        spatial_shape=shape,
        class_names=tuple(str(c) for c in doc.get("class_names", DEFAULT_CLASS_NAMES)),
        source_path=resolve_source(pf.source, roots),
    )


class ReviewSession:
    """Findings of a batch output folder, the scans behind them, and the reviewer's decisions.

    Args:
        output_dir: the batch output folder.
        scans: the scans (see :meth:`open`).
        scan_roots: folders the scans were found under (never written to).
        cache_size: number of loaded scans kept in memory.
    """

    def __init__(
        self, output_dir: Path | str, scans: Sequence[ReviewScan], scan_roots: Sequence[Path] = (), cache_size: int = 2
    ) -> None:
        self.output_dir = Path(output_dir)
        self.scan_roots = tuple(scan_roots)
        self.scans: dict[str, ReviewScan] = {s.key: s for s in scans}
        if len(self.scans) != len(scans):
            raise ValueError("scan keys must be unique")
        self.cache_size = max(int(cache_size), 1)
        self._decisions: dict[tuple[str, int], Decision] = {}
        self._images: OrderedDict[str, CanonicalGrid] = OrderedDict()
        self._geometry: dict[str, CanonicalGrid] = {}

    @classmethod
    def open(
        cls,
        output_dir: Path | str,
        scan_root: Path | str | Sequence[Path | str] | None = None,
        *,
        decisions: Path | str | None = None,
        cache_size: int = 2,
    ) -> ReviewSession:
        """Read every ``proposals.json`` below a batch output folder.

        Args:
            output_dir: the batch output folder.
            scan_root: the folder(s) the batch inputs were under (a path, an ``os.pathsep``-separated string or a
                sequence); ``None``: sources are absolute or relative to the working directory.
            decisions: an earlier export to resume (see :meth:`load_decisions`).
            cache_size: number of loaded scans kept in memory.

        Returns:
            The session (scans sorted by output folder).

        Raises:
            FileNotFoundError: ``output_dir`` is not a folder.
        """
        out = Path(output_dir).expanduser()
        if not out.is_dir():
            raise FileNotFoundError(f"batch output folder {output_dir} does not exist")
        roots = _as_roots(scan_root)
        files = [
            pf for pf in collect_proposals(out) if not _is_within(pf.path.resolve(), (out / REVIEW_SUBDIR).resolve())
        ]
        counts: dict[str, int] = {}
        for pf in files:
            counts[pf.scan_id] = counts.get(pf.scan_id, 0) + 1
        scans: list[ReviewScan] = []
        for pf in files:
            key = pf.scan_id
            if counts[pf.scan_id] > 1 or not key:
                rel = pf.path.parent.resolve().relative_to(out.resolve()).as_posix()
                key = f"{pf.scan_id}@{rel}"
            try:
                scans.append(_scan_from_file(pf, key, roots))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("skipping %s: %s", pf.path, exc)
        session = cls(out, scans, roots, cache_size=cache_size)
        if decisions is not None:
            session.load_decisions(decisions)
        return session

    # -- lookup -------------------------------------------------------------------------------------------------

    @property
    def scan_ids(self) -> list[str]:
        """Scan keys, in output-folder order."""
        return list(self.scans)

    def scan(self, scan_id: str) -> ReviewScan:
        """A scan by key.

        Args:
            scan_id: the scan key (:attr:`ReviewScan.key`); a plain scan id is accepted when it is unambiguous.

        Returns:
            The scan.

        Raises:
            KeyError: unknown or ambiguous.
        """
        if scan_id in self.scans:
            return self.scans[scan_id]
        matches = [s for s in self.scans.values() if s.scan_id == scan_id]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise KeyError(f"scan id {scan_id!r} is ambiguous; use one of {[s.key for s in matches]}")
        raise KeyError(f"unknown scan {scan_id!r}; the session has {list(self.scans)}")

    def _key(self, scan_id: str, rank: int) -> tuple[str, int]:
        scan = self.scan(scan_id)
        scan.finding(rank)
        return scan.key, int(rank)

    # -- tables -------------------------------------------------------------------------------------------------

    def _row(self, scan: ReviewScan, f: Finding) -> FindingRow:
        dec = self._decisions.get((scan.key, f.rank), Decision())
        return FindingRow(
            scan=scan.key,
            scan_id=scan.scan_id,
            rank=f.rank,
            score=f.score,
            label=f.label,
            class_name=f.class_name,
            objectness=f.objectness,
            box=f.box,
            centre=f.centre,
            size=f.size,
            decision=dec.decision,
            comment=dec.comment,
        )

    def table(self, scan_id: str | None = None, min_score: float = 0.0) -> FindingTable:
        """Findings sorted by decreasing score (ties: scan key, then rank).

        Args:
            scan_id: only this scan; ``None``: every scan of the batch.
            min_score: keep findings with ``score >= min_score``.

        Returns:
            The rows.
        """
        scans = [self.scan(scan_id)] if scan_id is not None else list(self.scans.values())
        rows = [self._row(s, f) for s in scans for f in s.findings if f.score >= min_score]
        rows.sort(key=lambda r: (-r.score, r.scan, r.rank))
        return FindingTable(rows)

    def filter(self, min_score: float, scan_id: str | None = None) -> FindingTable:
        """Findings with ``score >= min_score``, sorted by score (same as :meth:`table`).

        Args:
            min_score: the score threshold.
            scan_id: only this scan.

        Returns:
            The rows.
        """
        return self.table(scan_id, min_score=min_score)

    # -- geometry and images --------------------------------------------------------------------------------------

    def geometry(self, scan_id: str) -> CanonicalGrid:
        """The displayed grid of a scan without loading it (its array is a zero-size-in-memory placeholder).

        Args:
            scan_id: the scan key.

        Returns:
            The grid (affine and spacing of the displayed, LPS-aligned array).
        """
        scan = self.scan(scan_id)
        if scan.key not in self._geometry:
            placeholder = np.broadcast_to(np.zeros((), dtype=np.float32), scan.spatial_shape)
            self._geometry[scan.key] = canonical_grid(placeholder, scan.affine_ras)
        return self._geometry[scan.key]

    def num_slices(self, scan_id: str, view: str) -> int:
        """Number of slices of a view (1 for the 2D ``image`` view).

        Args:
            scan_id: the scan key.
            view: ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"image"``.

        Returns:
            The count.
        """
        spec = VIEW_SPECS[view]
        if spec.normal is None:
            return 1
        return int(self.geometry(scan_id).array.shape[spec.normal])

    def image(self, scan_id: str) -> CanonicalGrid:
        """The scan, loaded on first use (:func:`medrpn.data.io.load_scan`) and shown in the displayed grid.

        Args:
            scan_id: the scan key.

        Returns:
            The displayed grid with the scan's values (HU for CT).

        Raises:
            ScanNotAvailableError: the source was not found under the scan roots.
            ScanMismatchError: the scan on disk does not have the grid stored in ``proposals.json``.
        """
        from medrpn.data.io import load_scan  # heavy import, only when drawing

        scan = self.scan(scan_id)
        if scan.key in self._images:
            self._images.move_to_end(scan.key)
            return self._images[scan.key]
        if scan.source_path is None:
            roots = ", ".join(str(r) for r in self.scan_roots) or "(none: give scan_root)"
            raise ScanNotAvailableError(f"scan {scan.key}: source {scan.source!r} not found under {roots}")
        img = load_scan(scan.source_path)
        arr = np.asarray(img.detach().cpu().numpy(), dtype=np.float32)[0]
        affine = spatial_affine(np.asarray(img.affine, dtype=np.float64), scan.spatial_dims)
        if tuple(arr.shape) != scan.spatial_shape or not np.allclose(affine, scan.affine_ras, atol=1e-3):
            raise ScanMismatchError(
                f"scan {scan.key}: {scan.source_path} has shape {tuple(arr.shape)} and affine {affine.tolist()}, "
                f"but {scan.proposals} was computed on shape {scan.spatial_shape} and affine "
                f"{scan.affine_ras.tolist()}; is it the same scan?"
            )
        grid = canonical_grid(arr, scan.affine_ras)
        self._images[scan.key] = grid
        while len(self._images) > self.cache_size:
            self._images.popitem(last=False)
        return grid

    def select(self, scan_id: str, rank: int, zoom_mm: float = DEFAULT_ZOOM_MM) -> Selection:
        """Where a finding is: slice indices through its centre and a zoom window, per view (no image loaded).

        Args:
            scan_id: the scan key.
            rank: the finding's rank.
            zoom_mm: smallest side of the zoom window, mm (it is also at least twice the box).

        Returns:
            The selection.
        """
        scan = self.scan(scan_id)
        f = scan.finding(rank)
        grid = self.geometry(scan.key)
        slices: dict[str, int] = {}
        zoom: dict[str, tuple[int, int, int, int]] = {}
        for view in scan.views:
            plane = view_plane(grid, f.box, view, min_crop_mm=zoom_mm)
            slices[view] = plane.slice_index
            zoom[view] = plane.crop
        voxel = world_to_voxel(np.asarray([f.centre], dtype=np.float64), scan.affine_ras).numpy()[0]
        return Selection(
            scan=scan.key,
            finding=f,
            voxel=tuple(float(v) for v in voxel),
            slices=MappingProxyType(slices),
            zoom=MappingProxyType(zoom),
        )

    # -- decisions ----------------------------------------------------------------------------------------------

    @property
    def decisions(self) -> dict[tuple[str, int], Decision]:
        """Decisions made so far, ``(scan key, rank) -> Decision`` (a copy)."""
        return {k: Decision(v.decision, v.comment, v.decided_at) for k, v in self._decisions.items()}

    def decision(self, scan_id: str, rank: int) -> Decision:
        """The current decision on a finding (``pending`` when none)."""
        key = self._key(scan_id, rank)
        d = self._decisions.get(key, Decision())
        return Decision(d.decision, d.comment, d.decided_at)

    def _set(self, scan_id: str, rank: int, decision: str | None, comment: str | None) -> Decision:
        key = self._key(scan_id, rank)
        cur = self._decisions.get(key, Decision())
        new = Decision(
            decision=cur.decision if decision is None else decision,
            comment=cur.comment if comment is None else str(comment),
            decided_at=_now(),
        )
        self._decisions[key] = new
        return Decision(new.decision, new.comment, new.decided_at)

    def accept(self, scan_id: str, rank: int, comment: str = "") -> Decision:
        """Accept a finding (a real lesion to report/follow up).

        Args:
            scan_id: the scan key.
            rank: the finding's rank.
            comment: replaces the comment when not empty.

        Returns:
            The new decision.
        """
        return self._set(scan_id, rank, "accepted", comment or None)

    def reject(self, scan_id: str, rank: int, comment: str = "") -> Decision:
        """Reject a finding (false positive).

        Args:
            scan_id: the scan key.
            rank: the finding's rank.
            comment: replaces the comment when not empty.

        Returns:
            The new decision.
        """
        return self._set(scan_id, rank, "rejected", comment or None)

    def comment(self, scan_id: str, rank: int, text: str) -> Decision:
        """Set the comment of a finding, keeping its decision.

        Args:
            scan_id: the scan key.
            rank: the finding's rank.
            text: the comment (``""`` clears it).

        Returns:
            The new decision.
        """
        return self._set(scan_id, rank, None, text)

    def reset(self, scan_id: str, rank: int) -> Decision:
        """Back to ``pending`` (the comment is kept).

        Args:
            scan_id: the scan key.
            rank: the finding's rank.

        Returns:
            The new decision.
        """
        return self._set(scan_id, rank, "pending", None)

    def summary(self) -> dict[str, int]:
        """Number of findings per decision, plus ``total``."""
        counts = dict.fromkeys(DECISIONS, 0)
        for s in self.scans.values():
            for f in s.findings:
                counts[self._decisions.get((s.key, f.rank), Decision()).decision] += 1
        counts["total"] = sum(counts[d] for d in DECISIONS)
        return counts

    # -- export / resume ----------------------------------------------------------------------------------------

    def _rel(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.output_dir.resolve()).as_posix()
        except ValueError:
            return str(path)

    def export_records(self, include_pending: bool = True) -> list[dict[str, Any]]:
        """The exported findings as plain dicts (sorted by decreasing score, like :meth:`table`).

        Args:
            include_pending: also list undecided findings.

        Returns:
            One dict per finding.
        """
        out = []
        for row in self.table():
            if row.decision == "pending" and not include_pending:
                continue
            scan = self.scans[row.scan]
            f = scan.finding(row.rank)
            dec = self._decisions.get((scan.key, f.rank), Decision())
            out.append(
                {
                    "scan": scan.key,
                    "scan_id": scan.scan_id,
                    "rank": f.rank,
                    "decision": dec.decision,
                    "comment": dec.comment,
                    "decided_at": dec.decided_at,
                    "score": f.score,
                    "label": f.label,
                    "class_name": f.class_name,
                    "class_probs": list(f.class_probs),
                    "objectness": f.objectness,
                    "box": list(f.box),
                    "centre": list(f.centre),
                    "size": list(f.size),
                    "source": scan.source,
                    "proposals": self._rel(scan.proposals),
                }
            )
        return out

    def export(
        self,
        path_json: Path | str,
        path_csv: Path | str | None = None,
        *,
        reviewer: str = "",
        include_pending: bool = True,
    ) -> tuple[Path, Path | None]:
        """Write the reviewed findings (decision, comment, score, class, world box and centre) as JSON (+ CSV).

        Both files are checked with :func:`check_export_target` before anything is written, then written
        atomically. The batch output folder is never modified (except, if you ask for it, new files in its
        ``reviewed/`` sub-folder).

        Args:
            path_json: the JSON file (format :data:`REVIEW_FORMAT`, readable by :meth:`load_decisions`).
            path_csv: the CSV file (columns :data:`REVIEW_CSV_HEADER`), or ``None``.
            reviewer: optional reviewer name/initials stored in the JSON.
            include_pending: also list undecided findings.

        Returns:
            The written paths.

        Raises:
            ProtectedPathError: a refused target (nothing is written then).
        """
        targets = [Path(path_json)] + ([Path(path_csv)] if path_csv is not None else [])
        if len(targets) == 2 and targets[0].expanduser().resolve() == targets[1].expanduser().resolve():
            raise ProtectedPathError("the JSON and CSV exports must be different files")
        for t in targets:
            check_export_target(t, self.output_dir, self.scan_roots)
        records = self.export_records(include_pending=include_pending)
        dims = {s.spatial_dims for s in self.scans.values()}
        doc = {
            "format": REVIEW_FORMAT,
            "version": REVIEW_VERSION,
            "description": "radiologist review of medrpn proposals (proposals for review, not a diagnosis)",
            "exported_at": _now(),
            "reviewer": reviewer,
            "output_dir": str(self.output_dir.resolve()),
            "coordinate_system": WORLD_SPACE,
            "box_mode": "xyzxyz" if dims == {3} else ("xyxy" if dims == {2} else "xyzxyz (3D) / xyxy (2D)"),
            "convention": EXPORT_CONVENTION,
            "summary": self.summary(),
            "scans": [
                {
                    "scan": s.key,
                    "scan_id": s.scan_id,
                    "source": s.source,
                    "proposals": self._rel(s.proposals),
                    "proposals_sha256": _sha256(s.proposals),
                    "spatial_shape": list(s.spatial_shape),
                    "affine_ras": s.affine_ras.tolist(),
                }
                for s in self.scans.values()
            ],
            "findings": records,
        }
        json_path = atomic_write_text(targets[0], json.dumps(doc, indent=2, allow_nan=False) + "\n")
        csv_path = None
        if path_csv is not None:
            csv_path = atomic_write_text(targets[1], _records_csv(records))
        return json_path, csv_path

    def load_decisions(self, path: Path | str) -> int:
        """Restore decisions from an earlier export (resume a review).

        A record is restored when its scan (key, else unambiguous scan id) and rank exist and the box is unchanged
        (1e-6 mm); others — e.g. after inference was rerun — are skipped with a warning.

        Args:
            path: an exported review JSON.

        Returns:
            The number of decisions restored.

        Raises:
            ValueError: the file is not a review export.
        """
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != REVIEW_FORMAT:
            raise ValueError(f"{path} is not a {REVIEW_FORMAT} export")
        restored = 0
        for rec in doc.get("findings", []):
            try:
                scan = self.scan(str(rec.get("scan") or rec["scan_id"]))
            except KeyError:
                try:
                    scan = self.scan(str(rec["scan_id"]))
                except KeyError:
                    logger.warning("review %s: scan %s not in this batch, skipped", path, rec.get("scan"))
                    continue
            try:
                f = scan.finding(int(rec["rank"]))
            except KeyError:
                logger.warning("review %s: %s rank %s no longer exists, skipped", path, scan.key, rec.get("rank"))
                continue
            box = [float(v) for v in rec.get("box", [])]
            if len(box) != len(f.box) or any(abs(a - b) > 1e-6 for a, b in zip(box, f.box)):
                logger.warning("review %s: %s rank %s has a different box now, skipped", path, scan.key, f.rank)
                continue
            decision = str(rec.get("decision", "pending"))
            if decision not in DECISIONS:
                logger.warning("review %s: unknown decision %r, skipped", path, decision)
                continue
            if decision == "pending" and not rec.get("comment"):
                continue
            self._decisions[(scan.key, f.rank)] = Decision(
                decision, str(rec.get("comment", "")), str(rec.get("decided_at", ""))
            )
            restored += 1
        return restored


def _num(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def _records_csv(records: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(REVIEW_CSV_HEADER)
    for r in records:
        box = [float(v) for v in r["box"]]
        d = len(box) // 2
        centre: list[float | None] = [float(v) for v in r["centre"]] + [None] * (3 - d)
        lo: list[float | None] = [*box[:d], *([None] * (3 - d))]
        hi: list[float | None] = [*box[d:], *([None] * (3 - d))]
        writer.writerow(
            [
                r["scan"],
                r["scan_id"],
                r["rank"],
                r["decision"],
                r["comment"],
                _num(r["score"]),
                r["class_name"],
                r["label"],
                _num(r["objectness"]),
                *(_num(v) for v in centre),
                *(_num(v) for v in lo),
                *(_num(v) for v in hi),
                r["decided_at"],
                r["source"],
                r["proposals"],
            ]
        )
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# drawing


@dataclass(frozen=True)
class ViewDrawing:
    """What :func:`draw_view` drew.

    Attributes:
        view: the view.
        slice_index: displayed-grid index of the slice (``-1`` for a 2D image).
        num_slices: slices in that view.
        ranks: ranks of the findings drawn (score above the threshold and intersecting the slice), by rank.
        selected: rank of the highlighted finding, if any.
        window: ``(vmin, vmax)`` used.
    """

    view: str
    slice_index: int
    num_slices: int
    ranks: tuple[int, ...]
    selected: int | None
    window: tuple[float, float]


def _full_slice(grid: CanonicalGrid, view: str, index: int) -> ViewPlane:
    """The whole slice ``index`` of a view, via :func:`view_plane` with a box covering that slice entirely."""
    spec = VIEW_SPECS[view]
    shape = grid.array.shape
    d = len(shape)
    lo = [0.0] * d
    hi = [float(n) for n in shape]
    if spec.normal is not None:
        lo[spec.normal], hi[spec.normal] = float(index), float(index + 1)
    box_world = image_to_world_boxes(np.asarray([lo + hi], dtype=np.float64), grid.affine_ras).numpy()[0]
    return view_plane(grid, box_world, view, min_crop_mm=0.0)


def _slice_position(grid: CanonicalGrid, view: str, index: int) -> str:
    spec = VIEW_SPECS[view]
    if spec.normal is None:
        return ""
    centre = [(n - 1) / 2.0 for n in grid.array.shape]
    centre[spec.normal] = float(index)
    affine_lps = np.diag([-1.0, -1.0] + [1.0] * (len(centre) - 1)) @ grid.affine_ras
    world = affine_lps[:-1, :-1] @ np.asarray(centre) + affine_lps[:-1, -1]
    return f"{_AXIS_NAMES[spec.normal]} = {world[spec.normal]:.1f} mm"


def _label_position(spec: Any, h0: float, v0: float, h1: float, v1: float) -> tuple[float, float]:
    return (h0 + h1) / 2, (v0 if spec.v_down else v1)


def draw_view(
    ax: Axes,
    session: ReviewSession,
    scan_id: str,
    view: str,
    index: int | None = None,
    window: str | tuple[float, float] | None = "lung",
    min_score: float = 0.0,
    zoom_on: int | None = None,
    *,
    highlight: int | None = None,
    zoom_mm: float = DEFAULT_ZOOM_MM,
    thumbnail: bool = False,
    title: bool = True,
) -> ViewDrawing:
    """Draw one slice in radiological display with the findings on it.

    Every finding with ``score >= min_score`` whose box intersects the slice is drawn as a rectangle on voxel edges,
    labelled ``#rank score``; the selected one (``zoom_on`` or ``highlight``) in :data:`SELECTED_COLOUR`, thicker.
    Orientation letters are drawn at the edges, pixels with the voxel aspect ratio.

    Args:
        ax: matplotlib axes to draw into (cleared first).
        session: the review session.
        scan_id: the scan key.
        view: ``"axial"``, ``"coronal"``, ``"sagittal"`` (3D) or ``"image"`` (2D).
        index: displayed-grid slice index; ``None``: through the selected finding's centre, else the middle slice.
        window: window preset name, ``(level, width)`` or ``None``/``"auto"`` (see :func:`resolve_window`).
        min_score: score threshold of the findings drawn.
        zoom_on: rank of a finding to select and zoom on (zoom window of :meth:`ReviewSession.select`).
        highlight: rank of a finding to select without zooming (ignored when ``zoom_on`` is given).
        zoom_mm: smallest side of the zoom window, mm.
        thumbnail: when zoomed, add a small inset of the whole slice with the zoom window marked.
        title: put the view name, slice number and position in the title.

    Returns:
        What was drawn.

    Raises:
        ValueError: a view the scan does not have.
    """
    scan = session.scan(scan_id)
    if view not in scan.views:
        raise ValueError(f"scan {scan.key} is {scan.spatial_dims}D: views are {scan.views}, got {view!r}")
    spec = VIEW_SPECS[view]
    grid = session.image(scan.key)
    selected = zoom_on if zoom_on is not None else highlight
    selection = session.select(scan.key, selected, zoom_mm=zoom_mm) if selected is not None else None
    n = session.num_slices(scan.key, view)
    if spec.normal is None:
        index = -1
    elif index is None:
        index = selection.slices[view] if selection is not None else n // 2
    else:
        index = int(np.clip(int(index), 0, n - 1))
    plane = _full_slice(grid, view, max(index, 0))
    vrange = resolve_window(window, grid.array)

    ax.clear()
    ax.set_facecolor("black")
    ax.imshow(
        plane.pixels,
        extent=plane.extent,
        interpolation="nearest",
        cmap="gray",
        vmin=vrange[0],
        vmax=vrange[1],
        origin=plane.origin,
        aspect=plane.aspect,
    )
    # findings on this slice
    drawn: list[int] = []
    labels: list[tuple[Any, float]] = []  # (text, the box edge shown at the bottom)
    findings = [f for f in scan.findings if f.score >= min_score or f.rank == selected]
    if findings:
        boxes = world_to_image_boxes(np.asarray([f.box for f in findings], dtype=np.float64), grid.affine_ras).numpy()
        d = boxes.shape[1] // 2
        order = sorted(range(len(findings)), key=lambda i: findings[i].rank == selected)  # selected drawn last
        for i in order:
            f, b = findings[i], boxes[i]
            if spec.normal is not None:
                a = spec.normal
                if not (b[a] < index + 1 - _BOX_EPS and b[a + d] > index + _BOX_EPS):
                    continue
            h0, h1, v0, v1 = b[spec.h], b[spec.h + d], b[spec.v], b[spec.v + d]
            is_sel = f.rank == selected
            colour = SELECTED_COLOUR if is_sel else BOX_COLOUR
            ax.add_patch(
                Rectangle(
                    (h0, v0),
                    h1 - h0,
                    v1 - v0,
                    fill=False,
                    edgecolor=colour,
                    linewidth=2.2 if is_sel else 1.2,
                    label=f"finding #{f.rank}",
                )
            )
            x, y = _label_position(spec, h0, v0, h1, v1)
            label = ax.text(
                x,
                y,
                f"#{f.rank} {f.score:.2f}",
                color="black",
                fontsize=9,
                ha="center",
                va="bottom",
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.0, "alpha": 0.85},
                clip_on=True,
            )
            labels.append((label, v1 if spec.v_down else v0))
            drawn.append(f.rank)
    full_h = (plane.extent[0], plane.extent[1])
    full_v = (plane.extent[2], plane.extent[3])
    zoomed = zoom_on is not None and selection is not None
    if zoomed and selection is not None:
        zh0, zv0, zh1, zv1 = selection.zoom[view]
        ax.set_xlim(zh0, zh1)
        ax.set_ylim((zv1, zv0) if spec.v_down else (zv0, zv1))
    else:
        ax.set_xlim(*full_h)
        ax.set_ylim(*full_v)
    # a label that would sit at the very top of the view (under the orientation letter) goes below its box
    y_lo, y_hi = sorted(ax.get_ylim())
    for label, bottom_v in labels:
        _, top_v = label.get_position()
        frac = (top_v - y_lo) / max(y_hi - y_lo, 1e-9)
        if (frac if not spec.v_down else 1.0 - frac) > 0.92:
            label.set_position((label.get_position()[0], bottom_v))
            label.set_verticalalignment("top")
    draw_orientation_letters(
        ax,
        spec.letters,
        fontsize=12,
        zorder=5,
        bbox={"facecolor": "black", "edgecolor": "none", "alpha": 0.55, "pad": 1.5},
    )
    ax.set_xticks([])
    ax.set_yticks([])
    for sp in ax.spines.values():
        sp.set_color("#444444")
    if title:
        where = "" if spec.normal is None else f" {index + 1}/{n}   {_slice_position(grid, view, index)}"
        ax.set_title(f"{view}{where}", color="white", fontsize=10)
    if thumbnail and zoomed and selection is not None:
        inset = ax.inset_axes((0.0, 0.0, 0.3, 0.3))
        inset.imshow(
            plane.pixels,
            extent=plane.extent,
            interpolation="antialiased",
            cmap="gray",
            vmin=vrange[0],
            vmax=vrange[1],
            origin=plane.origin,
            aspect=plane.aspect,
        )
        zh0, zv0, zh1, zv1 = selection.zoom[view]
        inset.add_patch(Rectangle((zh0, zv0), zh1 - zh0, zv1 - zv0, fill=False, edgecolor=SELECTED_COLOUR, lw=0.8))
        inset.set_xlim(*full_h)
        inset.set_ylim(*full_v)
        inset.set_xticks([])
        inset.set_yticks([])
        for sp in inset.spines.values():
            sp.set_color("#888888")
    return ViewDrawing(
        view=view,
        slice_index=index,
        num_slices=n,
        ranks=tuple(sorted(drawn)),
        selected=selected,
        window=vrange,
    )


def _draw_table(
    ax: Axes, session: ReviewSession, scan_id: str, selected: int | None, min_score: float, max_rows: int
) -> None:
    ax.set_axis_off()
    rows = list(session.table(scan_id, min_score=min_score))
    if selected is not None and all(r.rank != selected for r in rows):
        rows += [r for r in session.table(scan_id) if r.rank == selected]
        rows.sort(key=lambda r: (-r.score, r.rank))
    shown = rows[:max_rows]
    if selected is not None and all(r.rank != selected for r in shown):
        shown = [*shown[: max(max_rows - 1, 0)], *[r for r in rows if r.rank == selected]]
    columns = ["#", "score", "class", "centre LPS (mm)", "size (mm)", "objectness", "decision", "comment"]
    cells = [
        [
            str(r.rank),
            f"{r.score:.3f}",
            r.class_name,
            f"({_fmt_vec(r.centre)})",
            _fmt_vec(r.size, " x "),
            f"{r.objectness:.2f}",
            r.decision,
            (r.comment[:38] + "...") if len(r.comment) > 40 else r.comment,
        ]
        for r in shown
    ] or [["-", "-", "no findings above the threshold", "", "", "", "", ""]]
    table = ax.table(
        cellText=cells,
        colLabels=columns,
        loc="upper center",
        cellLoc="left",
        colLoc="left",
        colWidths=[0.04, 0.07, 0.11, 0.22, 0.16, 0.08, 0.09, 0.23],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.35)
    decision_colour = {"accepted": "#1f6f3a", "rejected": "#7a2323"}
    for (r, c), cell in table.get_celld().items():
        cell.set_edgecolor("#3a3a3a")
        if r == 0:
            cell.set_facecolor("#2e2e2e")
            cell.get_text().set_color("white")
            cell.get_text().set_fontweight("bold")
            continue
        row = shown[r - 1] if r - 1 < len(shown) else None
        face = "#1a1a1a"
        if row is not None and row.rank == selected:
            face = "#5a4a00"
        elif row is not None and c == 6 and row.decision in decision_colour:
            face = decision_colour[row.decision]
        cell.set_facecolor(face)
        cell.get_text().set_color("white")
    extra = len(rows) - len(shown)
    if extra > 0:
        ax.text(0.5, 0.0, f"... {extra} more finding(s)", transform=ax.transAxes, color="#bbbbbb", ha="center")


def render_review_figure(
    session: ReviewSession,
    scan_id: str,
    rank: int | None = None,
    *,
    window: str | tuple[float, float] | None = "lung",
    min_score: float = 0.0,
    zoom: bool = True,
    indices: Mapping[str, int] | None = None,
    zoom_mm: float = DEFAULT_ZOOM_MM,
    max_table_rows: int = 8,
    figsize: tuple[float, float] = (15.0, 9.0),
    dpi: float = 100.0,
) -> Figure:
    """The review view of one finding: axial, coronal and sagittal (or the 2D image) plus a findings table.

    Works headless (a plain :class:`~matplotlib.figure.Figure` with an Agg canvas, no pyplot state): save it with
    ``fig.savefig`` or :func:`figure_png`, or display it in a notebook.

    Args:
        session: the review session.
        scan_id: the scan key.
        rank: the selected finding; ``None``: the scan's top-ranked finding above ``min_score`` (none: no selection).
        window: window preset name, ``(level, width)`` or ``None``/``"auto"``.
        min_score: score threshold of the findings drawn and listed.
        zoom: zoom every view on the selected finding (with a whole-slice inset).
        indices: per view, a slice index overriding the one through the finding (e.g. from a slider).
        zoom_mm: smallest side of the zoom window, mm.
        max_table_rows: rows of the findings table.
        figsize: figure size, inches.
        dpi: figure resolution.

    Returns:
        The figure.
    """
    scan = session.scan(scan_id)
    if rank is None:
        above = [f for f in scan.findings if f.score >= min_score]
        rank = above[0].rank if above else None
    indices = dict(indices or {})
    fig = Figure(figsize=figsize, dpi=dpi, facecolor=_FIG_BG)
    FigureCanvasAgg(fig)
    views = scan.views
    gs = fig.add_gridspec(
        2, len(views), height_ratios=(3.0, 1.15), left=0.02, right=0.98, top=0.9, bottom=0.03, hspace=0.12, wspace=0.04
    )
    window_used: tuple[float, float] | None = None
    for i, view in enumerate(views):
        ax = fig.add_subplot(gs[0, i])
        drawing = draw_view(
            ax,
            session,
            scan.key,
            view,
            indices.get(view),
            window,
            min_score,
            zoom_on=rank if zoom else None,
            highlight=rank,
            zoom_mm=zoom_mm,
            thumbnail=zoom,
        )
        window_used = drawing.window
    table_ax = fig.add_subplot(gs[1, :])
    _draw_table(table_ax, session, scan.key, rank, min_score, max_table_rows)
    if rank is not None:
        f = scan.finding(rank)
        dec = session.decision(scan.key, rank)
        head = (
            f"{scan.key}   finding #{f.rank}: {f.class_name}, score {f.score:.3f}, objectness {f.objectness:.2f}"
            f"   [{dec.decision}]"
        )
        sub = f"centre ({_fmt_vec(f.centre)}) mm LPS   size {_fmt_vec(f.size, ' x ')} mm"
    else:
        head, sub = f"{scan.key}   no finding above score {min_score:g}", ""
    lo, hi = window_used if window_used is not None else (0.0, 0.0)
    sub += f"   |   window {_window_name(window)} ({lo:.0f} .. {hi:.0f})   |   findings with score >= {min_score:g}"
    fig.text(0.02, 0.965, head, color="white", fontsize=13, ha="left", va="center", weight="bold")
    fig.text(0.02, 0.93, sub, color="#cccccc", fontsize=9.5, ha="left", va="center")
    fig.text(
        0.98,
        0.965,
        "proposals for radiologist review, not a diagnosis",
        color="#999999",
        fontsize=8.5,
        ha="right",
        va="center",
    )
    return fig


# ----------------------------------------------------------------------------------------------------------------
# demo data


@dataclass(frozen=True)
class DemoBatch:
    """A synthetic batch output folder written by :func:`write_demo_batch`.

    Attributes:
        output_dir: the batch output folder (one scan folder with its ``proposals.json``, ``candidates.csv``,
            ``failures.csv``).
        scan_root: the folder holding the scan (``<case id>.nii.gz``).
        scan_id: the scan id (the file stem).
        num_lesions: ground-truth lesions listed as findings (the batch has one more finding: a false positive).
    """

    output_dir: Path
    scan_root: Path
    scan_id: str
    num_lesions: int


def write_demo_batch(
    root: Path | str, *, seed: int = 0, case_index: int = 3, shape: tuple[int, int, int] | None = None
) -> DemoBatch:
    """Write a synthetic scan and a batch output folder whose findings are its lesions plus one false positive.

    For demos and tests of the review without a trained model: ``root/scans/<case>.nii.gz`` (the built-in synthetic
    chest CT, :func:`medrpn.data.synthetic.generate_case`) and ``root/infer/<case>/proposals.json`` written the way
    the batch runner writes it (:func:`medrpn.overlays.tables.write_proposals_json`, source relative to
    ``root/scans``), plus ``candidates.csv`` and an empty ``failures.csv``. Lesions get scores decreasing with
    their size (0.93, 0.81, ...); the false positive (score 0.58) is the largest lesion's box mirrored across the
    body's mid-sagittal plane.

    Args:
        root: destination folder (created).
        seed: synthetic dataset seed.
        case_index: synthetic case index (pick one with lesions; case 3 of seed 0 has four).
        shape: volume shape, ``None`` for the case's own field of view.

    Returns:
        Where things are.

    Raises:
        ValueError: the case has no lesion.
    """
    from medrpn.data.synthetic import CLASS_NAMES, generate_case, write_case_nifti
    from medrpn.inference.results import ScanResult, make_findings
    from medrpn.overlays.tables import write_candidates_csv, write_failures_csv, write_proposals_json

    root = Path(root)
    case = generate_case(case_index, seed=seed, shape=shape)
    if not case.lesions:
        raise ValueError(f"synthetic case {case_index} of seed {seed} has no lesion; pick another")
    scans = root / "scans"
    out = root / "infer"
    image = scans / f"{case.case_id}.nii.gz"
    write_case_nifti(case, image, root / "labels" / f"{case.case_id}_label.nii.gz")
    lesions = sorted(case.lesions, key=lambda les: -les.diameter_mm)
    boxes = [list(les.box) for les in lesions]
    labels = [les.class_id for les in lesions]
    scores = [round(0.93 - 0.12 * i, 2) for i in range(len(lesions))]
    # false positive: the largest lesion mirrored across the centre of the field of view (x)
    b = lesions[0].box
    cx = case.origin[0] + (case.shape[0] - 1) * case.spacing[0] / 2.0
    boxes.append([2 * cx - b[3], b[1], b[2], 2 * cx - b[0], b[4], b[5]])
    labels.append(0)
    scores.append(0.58)
    n_cls = len(CLASS_NAMES)
    probs = np.full((len(boxes), n_cls), 0.1 / max(n_cls - 1, 1))
    for i, lab in enumerate(labels):
        probs[i, lab] = 0.9
    findings = make_findings(
        np.asarray(boxes, dtype=np.float64),
        np.asarray(scores),
        np.asarray(labels),
        probs,
        np.clip(np.asarray(scores) + 0.04, 0.0, 1.0),
        CLASS_NAMES,
    )
    result = ScanResult(
        scan_id=case.case_id,
        source=image.name,
        source_format="nifti",
        affine_ras=case.affine_ras,
        spatial_shape=case.shape,
        findings=findings,
        class_names=CLASS_NAMES,
        model="synthetic ground truth + one false positive (demo)",
    )
    write_proposals_json(result, out / case.case_id)
    write_candidates_csv([result], out / CANDIDATES_CSV)
    write_failures_csv([], out / FAILURES_CSV)
    return DemoBatch(output_dir=out, scan_root=scans, scan_id=case.case_id, num_lesions=len(lesions))


# ----------------------------------------------------------------------------------------------------------------
# interactive review (notebook)


@dataclass
class ReviewController:
    """State of an interactive review: the selected finding, slices, window, threshold — widget-independent.

    The notebook's widgets (:func:`review_widget`) only call these methods, so the behaviour is testable
    without ipywidgets.

    Attributes:
        session: the review session.
        window: window preset name, ``(level, width)`` or ``None``.
        min_score: score threshold.
        zoom: zoom the views on the selected finding.
        zoom_mm: smallest zoom window side, mm.
        current: ``(scan key, rank)`` of the selected finding, or ``None``.
        indices: per view, the displayed slice.
    """

    session: ReviewSession
    window: str | tuple[float, float] | None = "lung"
    min_score: float = 0.0
    zoom: bool = True
    zoom_mm: float = DEFAULT_ZOOM_MM
    current: tuple[str, int] | None = None
    indices: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.current is None:
            rows = self.rows()
            if rows:
                self.select(rows[0].scan, rows[0].rank)
        else:
            self.select(*self.current)

    def rows(self) -> FindingTable:
        """Findings above the threshold, by score."""
        return self.session.table(min_score=self.min_score)

    def options(self) -> list[tuple[str, tuple[str, int]]]:
        """``(label, (scan, rank))`` of every finding above the threshold, by score (for a dropdown)."""
        return [
            (f"{r.score:.3f}  {r.scan}  #{r.rank}  {r.class_name}  [{r.decision}]", (r.scan, r.rank))
            for r in self.rows()
        ]

    def select(self, scan_id: str, rank: int) -> Selection:
        """Select a finding; the slices move to its centre.

        Args:
            scan_id: the scan key.
            rank: the finding's rank.

        Returns:
            The selection.
        """
        sel = self.session.select(scan_id, rank, zoom_mm=self.zoom_mm)
        self.current = (sel.scan, sel.finding.rank)
        self.indices = {v: i for v, i in sel.slices.items() if i >= 0}
        return sel

    def set_slice(self, view: str, index: int) -> int:
        """Show another slice of a view (clamped to the scan).

        Args:
            view: the view.
            index: the slice index.

        Returns:
            The index used.
        """
        if self.current is None:
            raise ValueError("no finding selected")
        n = self.session.num_slices(self.current[0], view)
        self.indices[view] = int(np.clip(int(index), 0, n - 1))
        return self.indices[view]

    def set_window(self, window: str | tuple[float, float] | None) -> None:
        """Change the window (validated)."""
        resolve_window(window, np.zeros(1))
        self.window = window

    def set_min_score(self, value: float) -> None:
        """Change the score threshold; the selection stays (it is still drawn, highlighted)."""
        self.min_score = float(value)

    def _require(self) -> tuple[str, int]:
        if self.current is None:
            raise ValueError("no finding selected")
        return self.current

    def accept(self, comment: str = "") -> Decision:
        """Accept the selected finding."""
        return self.session.accept(*self._require(), comment=comment)

    def reject(self, comment: str = "") -> Decision:
        """Reject the selected finding."""
        return self.session.reject(*self._require(), comment=comment)

    def comment(self, text: str) -> Decision:
        """Comment the selected finding."""
        return self.session.comment(*self._require(), text)

    def next(self) -> tuple[str, int] | None:
        """Select the next finding (by score) after the current one; returns it, or ``None`` at the end."""
        keys = [(r.scan, r.rank) for r in self.rows()]
        if not keys:
            return None
        pos = keys.index(self.current) + 1 if self.current in keys else 0
        if pos >= len(keys):
            return None
        self.select(*keys[pos])
        return self.current

    def status(self) -> str:
        """One line about the selected finding and the review progress."""
        s = self.session.summary()
        progress = f"{s['accepted']} accepted, {s['rejected']} rejected, {s['pending']} pending"
        if self.current is None:
            return f"no finding selected ({progress})"
        d = self.session.decision(*self.current)
        extra = f" - {d.comment}" if d.comment else ""
        return f"{self.current[0]} #{self.current[1]}: {d.decision}{extra}   ({progress})"

    def figure(self, **kwargs: Any) -> Figure:
        """The review figure of the current state (extra keyword arguments go to :func:`render_review_figure`)."""
        if self.current is None:
            raise ValueError("no finding selected")
        scan, rank = self.current
        return render_review_figure(
            self.session,
            scan,
            rank,
            window=self.window,
            min_score=self.min_score,
            zoom=self.zoom,
            indices=self.indices,
            zoom_mm=self.zoom_mm,
            **kwargs,
        )

    def png(self, **kwargs: Any) -> bytes:
        """The review figure as PNG bytes."""
        return figure_png(self.figure(**kwargs))


def widgets_available() -> bool:
    """Whether ``ipywidgets`` can be imported (the notebook falls back to static figures otherwise)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def review_widget(controller: ReviewController) -> Any:
    """An ipywidgets review panel around a :class:`ReviewController`.

    Controls: finding selector, score-threshold slider, window preset dropdown, one slice slider per view,
    comment box, Accept / Reject / Save comment / Next buttons; the figure is shown as a PNG image.

    Args:
        controller: the review state.

    Returns:
        An ``ipywidgets.VBox`` to display.

    Raises:
        ImportError: ipywidgets is not installed.
    """
    import ipywidgets as w

    finding = w.Dropdown(options=controller.options(), description="finding", layout=w.Layout(width="70%"))
    if controller.current is not None and any(v == controller.current for _, v in controller.options()):
        finding.value = controller.current
    threshold = w.FloatSlider(
        value=controller.min_score, min=0.0, max=1.0, step=0.01, description="min score", continuous_update=False
    )
    presets = [*WINDOW_PRESETS, "auto"]
    window = w.Dropdown(
        options=presets, value=controller.window if controller.window in presets else presets[0], description="window"
    )
    sliders = {
        v: w.IntSlider(value=0, min=0, max=1, description=v, continuous_update=False) for v in (*VIEWS_3D, VIEW_2D)
    }
    comment = w.Text(value="", placeholder="comment", description="comment", layout=w.Layout(width="70%"))
    buttons = {
        "accept": w.Button(description="Accept", button_style="success"),
        "reject": w.Button(description="Reject", button_style="danger"),
        "comment": w.Button(description="Save comment"),
        "next": w.Button(description="Next"),
    }
    image = w.Image(format="png")
    status = w.HTML()
    busy = {"syncing": False}

    def sync_sliders() -> None:
        busy["syncing"] = True
        try:
            scan = controller.session.scan(controller.current[0]) if controller.current else None
            for v, s in sliders.items():
                if scan is None or v not in scan.views or v == VIEW_2D:
                    s.layout.display = "none"
                    continue
                s.layout.display = None
                s.max = max(controller.session.num_slices(scan.key, v) - 1, 0)
                s.value = controller.indices.get(v, 0)
            if controller.current is not None:
                comment.value = controller.session.decision(*controller.current).comment
        finally:
            busy["syncing"] = False

    def refresh() -> None:
        if controller.current is not None:
            image.value = controller.png()
        status.value = html.escape(controller.status())

    def refresh_options() -> None:
        busy["syncing"] = True
        try:
            opts = controller.options()
            finding.options = opts
            if controller.current is not None and any(v == controller.current for _, v in opts):
                finding.value = controller.current
        finally:
            busy["syncing"] = False

    def on_finding(change: dict[str, Any]) -> None:
        if busy["syncing"] or change.get("new") is None:
            return
        controller.select(*change["new"])
        sync_sliders()
        refresh()

    def on_threshold(change: dict[str, Any]) -> None:
        controller.set_min_score(change["new"])
        refresh_options()
        refresh()

    def on_window(change: dict[str, Any]) -> None:
        controller.set_window(None if change["new"] == "auto" else change["new"])
        refresh()

    def on_slider(view: str) -> Any:
        def handler(change: dict[str, Any]) -> None:
            if busy["syncing"]:
                return
            controller.set_slice(view, change["new"])
            refresh()

        return handler

    def on_button(action: str) -> Any:
        def handler(_button: Any) -> None:
            if action == "accept":
                controller.accept(comment.value)
            elif action == "reject":
                controller.reject(comment.value)
            elif action == "comment":
                controller.comment(comment.value)
            elif action == "next":
                controller.next()
                sync_sliders()
            refresh_options()
            refresh()

        return handler

    finding.observe(on_finding, names="value")
    threshold.observe(on_threshold, names="value")
    window.observe(on_window, names="value")
    for v, s in sliders.items():
        s.observe(on_slider(v), names="value")
    for action, b in buttons.items():
        b.on_click(on_button(action))
    sync_sliders()
    refresh()
    return w.VBox(
        [
            finding,
            w.HBox([threshold, window]),
            w.HBox(list(sliders.values())),
            image,
            comment,
            w.HBox(list(buttons.values())),
            status,
        ]
    )
