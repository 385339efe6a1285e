"""Review images (PNG key-slice crops per finding) and the batch ``index.html``.

**Display convention** (radiological, as on a PACS): the scan is first reoriented to the closest LPS-aligned
grid using its affine (nibabel's ``io_orientation``; exact for axis-aligned grids with any axis flips or
permutations, nearest axes for oblique ones), then

- axial: patient's right on the image's left, anterior at the top (looking from the feet);
- coronal: patient's right on the image's left, superior at the top (looking from the front);
- sagittal: anterior on the image's left, superior at the top;
- a 2D image is shown with ``+x`` (LPS) to the right and ``+y`` downwards, which for a CR/DX image (identity
  LPS direction) is the stored row/column order.

Pixels are drawn with the aspect ratio of the voxel spacing, so anisotropic voxels (thick slices) look right,
and the box is drawn on voxel edges (the box of :func:`medrpn.geometry.world_to_image_boxes` on the displayed
grid). Each PNG shows a crop around the box (``max(2 x box size, 40 mm)`` per axis, moved to stay inside the image), the
box with ``#rank class score``, orientation letters, and a small full-slice thumbnail with the crop marked.

File names depend only on rank and view (``finding_01_axial.png``), never on patient data.

``index.html`` lists the scans of a batch (by scan id and the source path stored in ``proposals.json``), every
finding sorted by score across the batch with its review images, and the failures. :func:`index_entries`
rebuilds its input from an output folder alone (``proposals.json`` files and the PNGs next to them).
"""

from __future__ import annotations

import html
import io
import math
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from numpy.typing import NDArray

from medrpn.geometry import CONVENTION_NOTE, world_to_image_boxes
from medrpn.inference.results import Finding, ScanResult
from medrpn.overlays.atomic import atomic_write_bytes, atomic_write_text
from medrpn.overlays.nifti import spatial_affine
from medrpn.overlays.tables import PROPOSALS_JSON, collect_proposals

VIEWS_3D: Final = ("axial", "coronal", "sagittal")
"""Views written for a 3D scan, in this order."""

VIEW_2D: Final = "image"
"""The single view written for a 2D image."""

REVIEW_IMAGE_RE: Final = re.compile(r"^finding_(\d+)_(axial|coronal|sagittal|image)\.png$")
"""Names of review PNGs (group 1: rank, group 2: view)."""

MIN_CROP_MM: Final = 40.0
"""Smallest crop side, mm."""

BOX_COLOUR: Final = "#00ff66"


@dataclass(frozen=True)
class ReviewImage:
    """One written review PNG.

    Attributes:
        rank: rank of the finding shown.
        view: ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"image"`` (2D).
        path: the PNG.
    """

    rank: int
    view: str
    path: Path


def review_image_name(rank: int, view: str) -> str:
    """File name of a review PNG, e.g. ``finding_01_axial.png``.

    Args:
        rank: the finding's rank.
        view: the view name.

    Returns:
        The file name.
    """
    return f"finding_{int(rank):02d}_{view}.png"


# ----------------------------------------------------------------------------------------------------------------
# geometry of the displayed grid


@dataclass(frozen=True)
class _ViewSpec:
    normal: int | None  # canonical axis the slice is taken along (None: 2D)
    h: int  # canonical axis shown horizontally, increasing to the right
    v: int  # canonical axis shown vertically
    v_down: bool  # True: v increases downwards
    letters: tuple[str, str, str, str]  # left, right, top, bottom


VIEW_SPECS: Final = {
    "axial": _ViewSpec(2, 0, 1, True, ("R", "L", "A", "P")),
    "coronal": _ViewSpec(1, 0, 2, False, ("R", "L", "S", "I")),
    "sagittal": _ViewSpec(0, 1, 2, False, ("A", "P", "S", "I")),
    VIEW_2D: _ViewSpec(None, 0, 1, True, ("", "", "", "")),
}


@dataclass(frozen=True)
class CanonicalGrid:
    """The scan reoriented so that array axis ``a`` increases along LPS world axis ``a`` (closest axes).

    Attributes:
        array: the image with its axes permuted/flipped (a view of the input, its dtype).
        affine_ras: ``(D+1, D+1)`` RAS affine of ``array``.
        spacing: ``D`` voxel sizes, mm, of ``array``'s axes.
    """

    array: np.ndarray
    affine_ras: NDArray[np.float64]
    spacing: NDArray[np.float64]


def canonical_grid(image: np.ndarray, affine_ras: np.ndarray) -> CanonicalGrid:
    """Reorient an image to the closest LPS-aligned array order (axis 0 -> L, 1 -> P, 2 -> S).

    Args:
        image: ``spatial_shape`` array (``(X, Y, Z)`` or ``(X, Y)``).
        affine_ras: ``(D+1, D+1)`` RAS affine of ``image`` (4x4 accepted for 2D).

    Returns:
        The reoriented grid.
    """
    d = image.ndim
    ras = spatial_affine(affine_ras, d)
    flip = np.diag([-1.0, -1.0] + [1.0] * (d - 1))
    lps = flip @ ras
    ornt = nib.orientations.io_orientation(lps)
    array = nib.orientations.apply_orientation(image, ornt)  # a view: no copy of the volume
    lps_c = lps @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    return CanonicalGrid(array=array, affine_ras=flip @ lps_c, spacing=np.linalg.norm(lps_c[:d, :d], axis=0))


@dataclass(frozen=True)
class ViewPlane:
    """A key-slice crop as displayed.

    Attributes:
        pixels: ``(rows, cols)`` image as shown with ``origin`` (row 0 at the top for ``"upper"``).
        extent: ``(left, right, bottom, top)`` in canonical voxel-edge coordinates (matplotlib ``imshow``).
        origin: ``"upper"`` or ``"lower"``.
        aspect: height / width of one pixel (``spacing[v] / spacing[h]``).
        box: ``(h0, v0, h1, v1)`` the box on this plane, voxel-edge coordinates.
        slice_index: canonical index of the slice along the view normal (``-1`` in 2D).
        full: ``(rows, cols)`` the whole slice, same ``origin``.
        crop: ``(h0, v0, h1, v1)`` the crop window in voxel-edge coordinates.
    """

    pixels: NDArray[np.float32]
    extent: tuple[float, float, float, float]
    origin: Literal["upper", "lower"]
    aspect: float
    box: tuple[float, float, float, float]
    slice_index: int
    full: NDArray[np.float32]
    crop: tuple[int, int, int, int]


def view_plane(
    grid: CanonicalGrid, box_world: Sequence[float], view: str, min_crop_mm: float = MIN_CROP_MM
) -> ViewPlane:
    """The key slice of a box in one view: the slice through the box centre, cropped around the box.

    Args:
        grid: the canonical grid (:func:`canonical_grid`).
        box_world: ``2*D`` LPS mm box.
        view: ``"axial"``, ``"coronal"``, ``"sagittal"`` (3D) or ``"image"`` (2D).
        min_crop_mm: smallest crop side, mm.

    Returns:
        The plane to display.
    """
    spec = VIEW_SPECS[view]
    arr = grid.array
    d = arr.ndim
    b = world_to_image_boxes(np.asarray(box_world, dtype=np.float64)[None], grid.affine_ras).numpy()[0]
    lo, hi = b[:d], b[d:]
    if spec.normal is None:
        plane, s = arr, -1
    else:
        n = arr.shape[spec.normal]
        s = int(np.clip(math.floor((lo[spec.normal] + hi[spec.normal]) / 2), 0, n - 1))
        plane = np.take(arr, s, axis=spec.normal)  # remaining axes in increasing order: (h, v)
    crop: list[int] = []
    for ax in (spec.h, spec.v):
        size_vox = max(2.0 * (hi[ax] - lo[ax]) * grid.spacing[ax], min_crop_mm) / grid.spacing[ax]
        n = arr.shape[ax]
        size = min(max(math.ceil(size_vox - 1e-9), 1), n)
        # centred on the box, shifted (not shrunk) to stay inside the image
        a0 = int(np.clip(round((lo[ax] + hi[ax]) / 2 - size / 2), 0, n - size))
        crop += [a0, a0 + size]
    h0, h1, v0, v1 = crop
    pixels = plane[h0:h1, v0:v1].T
    if spec.v_down:
        extent = (float(h0), float(h1), float(v1), float(v0))
        origin: Literal["upper", "lower"] = "upper"
    else:
        extent, origin = (float(h0), float(h1), float(v0), float(v1)), "lower"
    return ViewPlane(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        extent=extent,
        origin=origin,
        aspect=float(grid.spacing[spec.v] / grid.spacing[spec.h]),
        box=(float(lo[spec.h]), float(lo[spec.v]), float(hi[spec.h]), float(hi[spec.v])),
        slice_index=s,
        full=np.ascontiguousarray(plane.T, dtype=np.float32),
        crop=(h0, v0, h1, v1),
    )


# ----------------------------------------------------------------------------------------------------------------
# PNG rendering


def display_range(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    if window is not None:
        level, width = float(window[0]), float(window[1])
        return level - width / 2, level + width / 2
    flat = image.ravel()
    if flat.size > 2_000_000:
        flat = flat[:: flat.size // 1_000_000]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(flat, [0.5, 99.5])
    return float(lo), (float(hi) if hi > lo else float(lo) + 1.0)


def _label(finding: Finding) -> str:
    return f"#{finding.rank} {finding.class_name} {finding.score:.2f}"


def draw_orientation_letters(ax: Any, letters: tuple[str, str, str, str], **text_kwargs: Any) -> None:
    """Patient-direction letters at the left, right, top and bottom edges of a displayed slice.

    Args:
        ax: matplotlib axes showing the slice.
        letters: ``(left, right, top, bottom)`` letters, e.g. ``("R", "L", "A", "P")`` for a radiological axial view.
        text_kwargs: extra ``ax.text`` arguments (e.g. ``bbox``, ``fontsize``, ``zorder``).
    """
    left, right, top, bottom = letters
    style = {"color": "yellow", "fontsize": 11, "weight": "bold", **text_kwargs}
    for x, y, s, ha, va in (
        (0.01, 0.5, left, "left", "center"),
        (0.99, 0.5, right, "right", "center"),
        (0.5, 0.99, top, "center", "top"),
        (0.5, 0.01, bottom, "center", "bottom"),
    ):
        if s:
            ax.text(x, y, s, transform=ax.transAxes, ha=ha, va=va, **style)


def _render(finding: Finding, plane: ViewPlane, view: str, vrange: tuple[float, float]) -> bytes:
    spec = VIEW_SPECS[view]
    fig = Figure(figsize=(6.4, 4.6), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(1, 2, width_ratios=(3.3, 1.3), left=0.02, right=0.98, bottom=0.1, top=0.9, wspace=0.06)
    ax = fig.add_subplot(gs[0, 0])
    thumb = fig.add_subplot(gs[0, 1])
    vmin, vmax = vrange
    ax.imshow(
        plane.pixels,
        extent=plane.extent,
        interpolation="nearest",
        cmap="gray",
        vmin=vmin,
        vmax=vmax,
        origin=plane.origin,
        aspect=plane.aspect,
    )
    h0, v0, h1, v1 = plane.box
    ax.add_patch(Rectangle((h0, v0), h1 - h0, v1 - v0, fill=False, edgecolor=BOX_COLOUR, linewidth=1.5))
    ax.set_xlim(plane.extent[0], plane.extent[1])
    ax.set_ylim(plane.extent[2], plane.extent[3])
    top_v = v0 if spec.v_down else v1  # the box edge shown at the top
    ax.text(
        (h0 + h1) / 2,
        top_v,
        _label(finding),
        color="black",
        fontsize=9,
        ha="center",
        va="bottom",
        bbox={"facecolor": BOX_COLOUR, "edgecolor": "none", "pad": 1.5, "alpha": 0.85},
        clip_on=True,
    )
    draw_orientation_letters(ax, spec.letters)
    ax.set_axis_off()
    title = f"{_label(finding)} | {view}"
    fig.text(0.02, 0.95, title, color="white", fontsize=11, ha="left", va="center")
    centre = ", ".join(f"{c:.1f}" for c in finding.centre)
    size = " x ".join(f"{s:.1f}" for s in finding.size)
    fig.text(0.02, 0.05, f"centre ({centre}) mm LPS   size {size} mm", color="white", fontsize=8, va="center")
    # thumbnail of the whole slice with the crop marked
    n_rows, n_cols = plane.full.shape
    if plane.origin == "upper":
        full_extent = (0.0, float(n_cols), float(n_rows), 0.0)
    else:
        full_extent = (0.0, float(n_cols), 0.0, float(n_rows))
    thumb.imshow(
        plane.full,
        extent=full_extent,
        interpolation="antialiased",
        cmap="gray",
        vmin=vmin,
        vmax=vmax,
        origin=plane.origin,
        aspect=plane.aspect,
    )
    c_h0, c_v0, c_h1, c_v1 = plane.crop
    thumb.add_patch(Rectangle((c_h0, c_v0), c_h1 - c_h0, c_v1 - c_v0, fill=False, edgecolor=BOX_COLOUR, linewidth=0.8))
    thumb.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="black", metadata={"Software": None})
    return buf.getvalue()


def _image_array(image: np.ndarray, spatial_shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == len(spatial_shape) + 1 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != spatial_shape:
        raise ValueError(f"image shape {arr.shape} != spatial_shape {spatial_shape}")
    return arr


def write_review_images(
    result: ScanResult,
    image: np.ndarray,
    out_dir: Path | str,
    *,
    top_k: int = 5,
    window: tuple[float, float] | None = (-600.0, 1500.0),
    min_crop_mm: float = MIN_CROP_MM,
    remove_stale: bool = True,
) -> list[ReviewImage]:
    """Write key-slice PNGs of the top-k findings: axial, coronal and sagittal in 3D, one view in 2D.

    Args:
        result: the scan's findings and source grid.
        image: the scan on the source grid, ``spatial_shape`` (or ``(1, *spatial_shape)``), HU for CT.
        out_dir: the scan's output folder (created if needed); the PNGs go directly into it.
        top_k: number of findings (by rank) to render.
        window: display ``(level, width)``; the default is a lung window. ``None``: the 0.5-99.5 percentile range
            of the image (use it for MR and projection radiographs).
        min_crop_mm: smallest crop side, mm.
        remove_stale: delete review PNGs in ``out_dir`` (``finding_<rank>_<view>.png``) left by an earlier run and
            not rewritten now, so the folder never shows images of findings that no longer exist.

    Returns:
        The written images, by rank then view.

    Raises:
        ValueError: when ``image`` does not match ``result.spatial_shape``.
    """
    out = Path(out_dir)
    shape = tuple(int(s) for s in result.spatial_shape)
    arr = _image_array(image, shape)
    findings = sorted(result.findings, key=lambda f: f.rank)[: max(int(top_k), 0)]
    written: list[ReviewImage] = []
    if findings:
        grid = canonical_grid(arr, result.affine_ras)
        vrange = display_range(arr, window)
        views = VIEWS_3D if arr.ndim == 3 else (VIEW_2D,)
        for f in findings:
            for view in views:
                plane = view_plane(grid, f.box, view, min_crop_mm)
                path = atomic_write_bytes(out / review_image_name(f.rank, view), _render(f, plane, view, vrange))
                written.append(ReviewImage(rank=f.rank, view=view, path=path))
    if remove_stale and out.is_dir():
        keep = {w.path.name for w in written}
        for p in out.iterdir():
            if REVIEW_IMAGE_RE.match(p.name) and p.name not in keep and p.is_file():
                p.unlink()
    return written


# ----------------------------------------------------------------------------------------------------------------
# index.html


@dataclass(frozen=True)
class IndexScan:
    """One scan of the batch index.

    Attributes:
        scan_id: the scan id (SeriesInstanceUID or file stem).
        source: the source path as stored in ``proposals.json`` (ideally relative to the input root).
        proposals: its ``proposals.json``.
        findings: its findings, in rank order.
        images: review PNGs by rank (views in display order).
        files: other output files of the scan to link (label map, Slicer markups, ...).
    """

    scan_id: str
    source: str
    proposals: Path
    findings: tuple[Finding, ...]
    images: Mapping[int, tuple[ReviewImage, ...]] = field(default_factory=dict)
    files: tuple[Path, ...] = ()


def find_review_images(folder: Path | str) -> dict[int, tuple[ReviewImage, ...]]:
    """Review PNGs in a scan folder, by rank.

    Args:
        folder: the scan's output folder.

    Returns:
        ``{rank: images}`` with views in the order axial, coronal, sagittal (or the 2D view).
    """
    order = {v: i for i, v in enumerate((*VIEWS_3D, VIEW_2D))}
    found: dict[int, list[ReviewImage]] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    for p in folder.iterdir():
        m = REVIEW_IMAGE_RE.match(p.name)
        if m and p.is_file():
            found.setdefault(int(m.group(1)), []).append(ReviewImage(int(m.group(1)), m.group(2), p))
    return {r: tuple(sorted(v, key=lambda im: order[im.view])) for r, v in sorted(found.items())}


def index_entries(output_root: Path | str) -> list[IndexScan]:
    """Rebuild the index entries from an output folder alone.

    Every ``proposals.json`` below ``output_root`` is one scan; the review PNGs and the other (non-hidden) files of
    its folder are attached.

    Args:
        output_root: the batch output folder.

    Returns:
        One entry per readable ``proposals.json``, sorted by path.
    """
    entries: list[IndexScan] = []
    for pf in collect_proposals(output_root):
        folder = pf.path.parent
        ranks = {f.rank for f in pf.findings}
        images = {r: ims for r, ims in find_review_images(folder).items() if r in ranks}
        files = tuple(
            sorted(
                p
                for p in folder.iterdir()
                if p.is_file()
                and not p.name.startswith(".")
                and p.name != PROPOSALS_JSON
                and not REVIEW_IMAGE_RE.match(p.name)
            )
        )
        entries.append(
            IndexScan(
                scan_id=pf.scan_id,
                source=pf.source,
                proposals=pf.path,
                findings=tuple(pf.findings),
                images=images,
                files=files,
            )
        )
    return entries


def _href(target: Path, base: Path) -> str:
    rel = Path(os.path.relpath(Path(target).resolve(), base.resolve())).as_posix()
    return html.escape(urllib.parse.quote(rel, safe="/"), quote=True)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt_vec(v: Sequence[float], sep: str) -> str:
    return sep.join(f"{x:.1f}" for x in v)


_CSP: Final = "script-src 'none'; object-src 'none'; base-uri 'none'"
"""Content-Security-Policy of the index: no scripts at all (defence in depth on top of escaping)."""

_CSS: Final = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: middle; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.thumb { height: 96px; margin-right: 3px; background: #000; }
.note { color: #666; font-size: 90%; }
code { font-size: 90%; }
"""


def write_index_html(
    output_root: Path | str,
    entries: Sequence[IndexScan],
    path: Path | str,
    *,
    failures: Sequence[tuple[str, str]] = (),
    title: str = "medrpn findings for review",
) -> Path:
    """Write the batch ``index.html`` (atomic): scans, all findings sorted by score, failures.

    All text is HTML-escaped and all links are relative to ``path``'s folder, so the output folder can be moved or
    zipped as a whole.

    Args:
        output_root: the batch output folder (scan folders are shown relative to it).
        entries: the scans (e.g. :func:`index_entries`).
        path: destination, normally ``output_root / "index.html"``.
        failures: ``(source, reason)`` pairs (e.g. :func:`medrpn.overlays.tables.read_failures_csv`).
        title: page title.

    Returns:
        The written path.
    """
    path = Path(path)
    base = path.parent
    root = Path(output_root)
    n_findings = sum(len(e.findings) for e in entries)
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>{len(entries)} scan(s), {n_findings} finding(s), {len(failures)} failure(s). "
        "Proposals for radiologist review, not a diagnosis.</p>",
        f'<p class="note">Coordinates: {_e(CONVENTION_NOTE)}. Centres and sizes in mm.</p>',
    ]

    # all findings, sorted by score across the batch
    rows = sorted(
        ((f, i, e) for i, e in enumerate(entries) for f in e.findings),
        key=lambda t: (-t[0].score, t[2].scan_id, t[0].rank),
    )
    parts += [
        '<h2 id="findings">Findings by score</h2>',
        "<table>",
        "<tr><th>#</th><th>score</th><th>scan</th><th>rank</th><th>class</th><th>objectness</th>"
        "<th>centre (LPS mm)</th><th>size (mm)</th><th>review images</th></tr>",
    ]
    for n, (f, i, e) in enumerate(rows, start=1):
        thumbs = " ".join(
            f'<a href="{_href(im.path, base)}"><img class="thumb" src="{_href(im.path, base)}" '
            f'alt="{_e(f"#{f.rank} {im.view}")}" loading="lazy"></a>'
            for im in e.images.get(f.rank, ())
        )
        parts.append(
            f'<tr><td class="num">{n}</td><td class="num">{f.score:.3f}</td>'
            f'<td><a href="#scan-{i}">{_e(e.scan_id)}</a> (<a href="{_href(e.proposals, base)}">json</a>)</td>'
            f'<td class="num">{f.rank}</td>'
            f'<td>{_e(f.class_name)}</td><td class="num">{f.objectness:.3f}</td>'
            f"<td>({_e(_fmt_vec(f.centre, ', '))})</td><td>{_e(_fmt_vec(f.size, ' x '))}</td>"
            f"<td>{thumbs}</td></tr>"
        )
    if not rows:
        parts.append('<tr><td colspan="9">no findings</td></tr>')
    parts.append("</table>")

    # scans
    parts += [
        '<h2 id="scans">Scans</h2>',
        "<table>",
        "<tr><th>scan id</th><th>source</th><th>output folder</th><th>findings</th><th>top score</th>"
        "<th>files</th></tr>",
    ]
    for i, e in enumerate(entries):
        folder = e.proposals.parent
        try:
            folder_text = folder.resolve().relative_to(root.resolve()).as_posix() or "."
        except ValueError:
            folder_text = folder.name
        top = f"{max(f.score for f in e.findings):.3f}" if e.findings else "-"
        links = [f'<a href="{_href(e.proposals, base)}">{_e(e.proposals.name)}</a>']
        links += [f'<a href="{_href(p, base)}">{_e(p.name)}</a>' for p in e.files]
        parts.append(
            f'<tr id="scan-{i}"><td>{_e(e.scan_id)}</td><td>{_e(e.source)}</td><td>{_e(folder_text)}</td>'
            f'<td class="num">{len(e.findings)}</td><td class="num">{top}</td><td>{" | ".join(links)}</td></tr>'
        )
    if not entries:
        parts.append('<tr><td colspan="6">no scans</td></tr>')
    parts.append("</table>")

    # failures
    parts += ['<h2 id="failures">Failures</h2>']
    if failures:
        parts += ["<table>", "<tr><th>source</th><th>reason</th></tr>"]
        parts += [f"<tr><td>{_e(s)}</td><td>{_e(r)}</td></tr>" for s, r in failures]
        parts.append("</table>")
    else:
        parts.append("<p>None.</p>")
    parts += ["</body>", "</html>", ""]
    return atomic_write_text(path, "\n".join(parts))
