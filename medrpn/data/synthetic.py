"""Built-in synthetic chest-CT lesion dataset: the embedded default of the demo and of the tests.

The generator draws a procedural chest-CT *phantom* per case and hides 0-4 lung lesions in it, then writes the
same volume as NIfTI, as a DICOM CT series, and as MONAI/LUNA16-style ground truth. Nothing here comes from a
patient: every value is drawn from a seeded random generator, and every DICOM header says so.

The phantom, in Hounsfield units (HU), built in world LPS millimetres around a body centre near the field of view:

- **Air** (-1000 HU) outside the body.
- **Body**: an elliptical cross-section whose semi-axes vary smoothly along z, a subcutaneous **fat** layer
  (about -100 HU) over **soft tissue / muscle** (about +45 HU).
- **Ribs**: oval-section bone (about +700 HU) on an ellipse just inside the chest wall; each rib descends
  anteriorly, so axial slices show bright arcs and dots around the body, with a gap at the sternum.
- **Spine**: a vertebral body (cancellous about +250 HU with a +650 HU cortex, softer discs at a regular pitch),
  spinal canal and spinous process at the posterior midline; a **sternum** anteriorly.
- **Mediastinum**: fat with a **heart** ellipsoid (about +40 HU) in the lower anterior chest, descending and
  ascending **aorta** tubes, an **oesophagus**.
- **Lungs**: two D-shaped volumes (about -850 HU with a smooth random texture and a mild gravity-dependent
  gradient) bounded by the ribs, the mediastinum, an apex taper at the top and diaphragm domes at the bottom.
- **Vessels**: random branching tube trees from each hilum (diameter 8 mm down to 2 mm, contrast-ish +30..+60 HU),
  clipped to the lungs; on axial slices their cross-sections are the classic nodule look-alikes.
- **Airways**: trachea, main bronchi and a few generations of branching tubes of air with a soft-tissue wall.
- **Lesions** (the ground truth), 3-30 mm, size log-uniform so small ones are common; shape ``round`` (sphere),
  ``lobulated`` (sphere plus bumps) or ``elongated`` (ellipsoid with axis ratios up to 2.5, axis-aligned or mildly
  rotated); density by class: ``solid`` (0..+60 HU), ``ground-glass`` (-650..-450 HU, fainter) or ``part-solid``
  (a ground-glass halo around a solid core). Lesions lie in the lung parenchyma (never overlapping a vessel or an
  airway), some deliberately touching the pleura or a vessel, never touching each other (their boxes are kept
  apart by a two-voxel margin, so each lesion is its own connected component of the label mask).
- Finally a mild anisotropic Gaussian blur (partial volume) and Gaussian noise (sigma 10-40 HU, drawn per case),
  then rounding and clipping to the 12-bit CT range [-1024, 3071] HU.

Geometry conventions (project-wide): world coordinates are LPS millimetres; the array axis order is
(i, j, k) = (DICOM column, DICOM row, slice), i.e. shape (X, Y, Z); voxel (i, j, k) has its centre at
``origin + (i*sx, j*sy, k*sz)`` (axial orientation, ImageOrientationPatient [1,0,0,0,1,0]) and spans half a
spacing either side. A lesion's ground-truth box is the world box of its label voxels with that voxel-extent rule,
so box and mask agree exactly. Class ids: 0 solid, 1 ground-glass, 2 part-solid; label-mask value = class id + 1.

Determinism: case ``i`` of seed ``s`` depends only on ``(s, i)`` (not on how many cases are generated), arrays and
annotation files are byte-identical across runs, and all DICOM UIDs are derived from ``(s, i)`` as ``2.25``
UUID-5 UIDs. About one case in seven has no lesion and one in three stores its DICOM files in descending z order
(InstanceNumber still increasing), in a fixed per-seed pattern so that any 7 (resp. 3) consecutive cases contain
at least one of each.

Output layout of :func:`generate_dataset` (all paths in JSON are relative to the output folder)::

    OUT/nifti/case_000.nii.gz          CT, int16 HU, RAS affine, qform/sform code 1
    OUT/labels/case_000_label.nii.gz   uint8 label mask (class id + 1), same grid
    OUT/dicom/case_000/IM_0000.dcm ... CT Image Storage series, one file per slice
    OUT/annotations.csv                LUNA16: seriesuid,coordX,coordY,coordZ,diameter_mm (LPS mm)
    OUT/seriesuids.csv                 LUNA16: every case's seriesuid, one per line (cases without lesions too)
    OUT/datalist.json                  MONAI detection datalist, boxes cccwhd in LPS mm
    OUT/lesions.json                   full ground truth per case and lesion
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import sys
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = [
    "CLASS_NAMES",
    "SHAPE_KINDS",
    "SyntheticCase",
    "SyntheticLesion",
    "SyntheticSummary",
    "case_is_descending",
    "case_is_empty",
    "generate_case",
    "generate_dataset",
    "main",
    "synthetic_uid",
    "write_case_dicom",
    "write_case_nifti",
]

CLASS_NAMES: tuple[str, ...] = ("solid", "ground-glass", "part-solid")
"""Lesion class names indexed by class id (0-based foreground classes; label-mask value = class id + 1)."""

SHAPE_KINDS: tuple[str, ...] = ("round", "lobulated", "elongated")
"""Lesion shape kinds."""

HU_MIN, HU_MAX = -1024, 3071
RESCALE_INTERCEPT = -1024
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 3.0, 30.0
DEFAULT_LESION_MM: tuple[float, float] = (3.2, 27.0)
"""Range of the drawn lesion diameter (log-uniform; part-solid lesions start at 8 mm); shapes may extend beyond."""
GENERATOR_VERSION = "1"  # bump when the phantom changes (the output of a given seed changes)
DATALIST_NAME, ANNOTATIONS_NAME, LESIONS_NAME = "datalist.json", "annotations.csv", "lesions.json"
SERIESUIDS_NAME = "seriesuids.csv"

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "medrpn/synthetic-chest-ct")
_EMPTY_PERIOD = 7  # one case in 7 (~14%) has no lesion
_DESCENDING_PERIOD = 3  # one case in 3 stores its DICOM slices in descending z
_F32 = np.float32

FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]


# --------------------------------------------------------------------------------------------------------------
# Public records
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticLesion:
    """Ground truth of one lesion of a synthetic case.

    Attributes:
        lesion_id: 1-based index of the lesion within its case (order of datalist ``box``/``label`` lists).
        class_id: 0 solid, 1 ground-glass, 2 part-solid (label-mask value is ``class_id + 1``).
        shape_kind: ``"round"``, ``"lobulated"`` or ``"elongated"``.
        voxel_box: inclusive voxel index box ``(i0, j0, k0, i1, j1, k1)``.
        box: world box ``(x0, y0, z0, x1, y1, z1)`` in LPS mm (StandardMode), voxel extents included.
        centroid: mean of the lesion's voxel centres, LPS mm.
        voxel_count: number of label voxels.
        touches: ``"pleura"``, ``"vessel"`` or ``None`` (pleura wins when it touches both).
    """

    lesion_id: int
    class_id: int
    shape_kind: str
    voxel_box: tuple[int, int, int, int, int, int]
    box: tuple[float, float, float, float, float, float]
    centroid: tuple[float, float, float]
    voxel_count: int
    touches: str | None

    @property
    def class_name(self) -> str:
        """Name of the lesion class."""
        return CLASS_NAMES[self.class_id]

    @property
    def center(self) -> tuple[float, float, float]:
        """Centre of :attr:`box` (LPS mm): the cccwhd centre and the LUNA16 coordX/Y/Z."""
        b = self.box
        return ((b[0] + b[3]) / 2.0, (b[1] + b[4]) / 2.0, (b[2] + b[5]) / 2.0)

    @property
    def size(self) -> tuple[float, float, float]:
        """Box extents ``(w, h, d)`` in mm along x, y, z."""
        b = self.box
        return (b[3] - b[0], b[4] - b[1], b[5] - b[2])

    @property
    def diameter_mm(self) -> float:
        """Longest in-plane (x/y) extent of the box, the LUNA16 ``diameter_mm``."""
        w, h, _ = self.size
        return max(w, h)

    @property
    def box_cccwhd(self) -> tuple[float, float, float, float, float, float]:
        """The box as ``[cx, cy, cz, w, h, d]`` (LPS mm), the datalist encoding."""
        return (*self.center, *self.size)


@dataclass
class SyntheticCase:
    """One generated case held in memory (see :func:`generate_case`).

    Attributes:
        case_id: ``"case_000"`` style identifier.
        index: case index within the dataset.
        seed: dataset seed.
        image: int16 HU volume, shape (X, Y, Z) = (columns, rows, slices).
        label: uint8 label mask (class id + 1, 0 background), same shape.
        spacing: voxel spacing ``(sx, sy, sz)`` in mm.
        origin: LPS position (mm) of the centre of voxel (0, 0, 0).
        lesions: ground truth of the lesions, in label order.
        descending: whether the DICOM files store slices in descending z order.
        noise_sigma: standard deviation (HU) of the added Gaussian noise.
        study_date: ``YYYYMMDD`` study date of the fake study.
    """

    case_id: str
    index: int
    seed: int
    image: NDArray[np.int16]
    label: NDArray[np.uint8]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    lesions: list[SyntheticLesion] = field(default_factory=list)
    descending: bool = False
    noise_sigma: float = 0.0
    study_date: str = "20200101"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape (X, Y, Z)."""
        nx, ny, nz = self.image.shape
        return (int(nx), int(ny), int(nz))

    @property
    def series_uid(self) -> str:
        """DICOM SeriesInstanceUID (also the LUNA16 ``seriesuid``)."""
        return synthetic_uid(self.seed, self.index, "series")

    @property
    def study_uid(self) -> str:
        """DICOM StudyInstanceUID."""
        return synthetic_uid(self.seed, self.index, "study")

    @property
    def frame_of_reference_uid(self) -> str:
        """DICOM FrameOfReferenceUID."""
        return synthetic_uid(self.seed, self.index, "frame-of-reference")

    @property
    def affine_lps(self) -> NDArray[np.float64]:
        """4x4 voxel-index -> LPS mm affine."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    @property
    def affine_ras(self) -> NDArray[np.float64]:
        """4x4 voxel-index -> RAS mm affine (what the NIfTI files store)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`generate_dataset` wrote.

    Attributes:
        out_dir: the output folder.
        datalist: path of ``datalist.json``.
        annotations: path of ``annotations.csv``.
        lesions: path of ``lesions.json``.
        case_ids: all case ids, in index order.
        training_ids: case ids of the ``training`` split.
        validation_ids: case ids of the ``validation`` split.
        num_lesions: total number of lesions over all cases.
        dicom: whether DICOM series were written.
    """

    out_dir: Path
    datalist: Path
    annotations: Path
    lesions: Path
    case_ids: tuple[str, ...]
    training_ids: tuple[str, ...]
    validation_ids: tuple[str, ...]
    num_lesions: int
    dicom: bool

    @property
    def num_cases(self) -> int:
        """Number of cases."""
        return len(self.case_ids)


# --------------------------------------------------------------------------------------------------------------
# Determinism helpers
# --------------------------------------------------------------------------------------------------------------
def synthetic_uid(seed: int, index: int, *parts: object) -> str:
    """Deterministic DICOM UID ``2.25.<uuid5 integer>`` derived from the seed, the case index and ``parts``.

    (``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy sources and is random, hence this helper.)
    """
    name = "/".join(str(p) for p in (seed, index, *parts))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def _pattern_offset(seed: int, period: int, salt: int) -> int:
    return int(np.random.default_rng(np.random.SeedSequence([seed, salt])).integers(period))


def case_is_empty(seed: int, index: int) -> bool:
    """Whether case ``index`` of ``seed`` has no lesion (one case in 7, any 7 consecutive cases hold one)."""
    return (index + _pattern_offset(seed, _EMPTY_PERIOD, 0xE4)) % _EMPTY_PERIOD == 0


def case_is_descending(seed: int, index: int) -> bool:
    """Whether case ``index`` of ``seed`` stores its DICOM slices in descending z (one case in 3)."""
    return (index + _pattern_offset(seed, _DESCENDING_PERIOD, 0xD5)) % _DESCENDING_PERIOD == 0


# --------------------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Grid:
    """Voxel-centre coordinates relative to the body centre (mm) plus absolute origin and spacing."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    center: tuple[float, float, float]  # body centre x, y (LPS) and z of slice 0
    x: FloatArray = field(init=False)
    y: FloatArray = field(init=False)
    z: FloatArray = field(init=False)

    def __post_init__(self) -> None:
        axes = []
        for n, s, o, c in zip(self.shape, self.spacing, self.origin, self.center):
            axes.append((o + np.arange(n) * s - c).astype(_F32))
        self.x, self.y, self.z = axes

    def index_of(self, p: NDArray[np.floating[Any]]) -> tuple[int, int, int] | None:
        """Nearest voxel index of relative point ``p`` or ``None`` when outside the volume."""
        idx = []
        for v, a, s, n in zip(p, (self.x, self.y, self.z), self.spacing, self.shape):
            i = round((float(v) - float(a[0])) / s)
            if i < 0 or i >= n:
                return None
            idx.append(i)
        return (idx[0], idx[1], idx[2])

    def window(
        self, lo: Sequence[float] | NDArray[Any], hi: Sequence[float] | NDArray[Any], pad: int = 0
    ) -> tuple[slice, slice, slice] | None:
        """Index slices covering relative box ``[lo, hi]`` (plus ``pad`` voxels), clipped; ``None`` if empty."""
        sl = []
        for lo_v, hi_v, a, s, n in zip(lo, hi, (self.x, self.y, self.z), self.spacing, self.shape):
            i0 = max(math.ceil((lo_v - float(a[0])) / s) - pad, 0)
            i1 = min(math.floor((hi_v - float(a[0])) / s) + pad, n - 1)
            if i1 < i0:
                return None
            sl.append(slice(i0, i1 + 1))
        return (sl[0], sl[1], sl[2])

    def sub(self, sl: tuple[slice, slice, slice]) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Broadcastable relative coordinates of a window."""
        return (self.x[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.z[sl[2]][None, None, :])


def _sample_geometry(
    rng: np.random.Generator, shape: tuple[int, int, int] | None
) -> tuple[tuple[int, int, int], tuple[float, float, float], tuple[float, float, float]]:
    s_xy = round(float(rng.uniform(1.4, 2.2)), 4)
    s_z = round(float(rng.uniform(1.5, 3.5)), 3)
    fov_xy = float(rng.uniform(290.0, 350.0))
    fov_z = float(rng.uniform(200.0, 280.0))
    if shape is None:
        n_xy = int(np.clip(round(fov_xy / s_xy), 144, 192))
        shape = (n_xy, n_xy, int(np.clip(round(fov_z / s_z), 64, 128)))
    nx, ny, nz = (int(v) for v in shape)
    # Scanner-like origins: the FOV is centred near the table axis, the table sits somewhere along z.
    ox = round(-(nx - 1) * s_xy / 2.0 + float(rng.uniform(-25.0, 25.0)), 3)
    oy = round(-(ny - 1) * s_xy / 2.0 + float(rng.uniform(-30.0, 30.0)), 3)
    oz = round(float(rng.uniform(-450.0, -80.0)), 3)
    return (nx, ny, nz), (s_xy, s_xy, s_z), (ox, oy, oz)


# --------------------------------------------------------------------------------------------------------------
# Tubes (vessels, airways)
# --------------------------------------------------------------------------------------------------------------
_Segment = tuple[NDArray[np.float64], NDArray[np.float64], float, float]  # p0, p1, r0, r1 (relative mm)


def _render_segments(grid: _Grid, segments: Iterable[_Segment], out: BoolArray, extra: float = 0.0) -> None:
    """OR into ``out`` the tapered capsules of ``segments`` (radius + ``extra``)."""
    for p0, p1, r0, r1 in segments:
        ra, rb = r0 + extra, r1 + extra
        rmax = max(ra, rb)
        sl = grid.window(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
        if sl is None:
            continue
        xs, ys, zs = grid.sub(sl)
        d = (p1 - p0).astype(_F32)
        dd = float(d @ d) or 1.0
        ax, ay, az = float(p0[0]), float(p0[1]), float(p0[2])
        t = ((xs - ax) * d[0] + (ys - ay) * d[1] + (zs - az) * d[2]) / _F32(dd)
        np.clip(t, 0.0, 1.0, out=t)
        dist2 = (xs - ax - t * d[0]) ** 2 + (ys - ay - t * d[1]) ** 2 + (zs - az - t * d[2]) ** 2
        rad = _F32(ra) + _F32(rb - ra) * t
        out[sl] |= dist2 <= rad * rad


def _unit(v: NDArray[np.float64]) -> NDArray[np.float64]:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else np.array([1.0, 0.0, 0.0])


def _grow_tree(
    rng: np.random.Generator,
    start: NDArray[np.float64],
    direction: NDArray[np.float64],
    radius: float,
    length: float,
    min_radius: float,
    lateral: float,
    inside: BoolArray,
    grid: _Grid,
    max_segments: int,
    radius_ratio: tuple[float, float] = (0.66, 0.8),
    length_ratio: tuple[float, float] = (0.7, 0.9),
) -> list[_Segment]:
    """Random branching tube tree (breadth first) whose segments end inside ``inside``.

    Each segment forks into two children with a perturbed direction biased by ``lateral`` along x; a child whose
    end point would leave ``inside`` is re-aimed a few times and dropped if that fails. Branches stop below
    ``min_radius``; the tree stops at ``max_segments``.
    """

    def ends_inside(p: NDArray[np.float64]) -> bool:
        idx = grid.index_of(p)
        return idx is not None and bool(inside[idx])

    segments: list[_Segment] = []
    queue: deque[tuple[NDArray[np.float64], NDArray[np.float64], float, float]] = deque()
    for _ in range(6):
        u = _unit(direction + rng.normal(0.0, 0.3, 3))
        if ends_inside(start + u * length):
            queue.append((start, u, radius, length))
            break
    while queue and len(segments) < max_segments:
        p0, u, r, ln = queue.popleft()
        p1 = p0 + u * ln
        segments.append((p0, p1, r, r * float(rng.uniform(0.85, 0.95))))
        r_child = r * float(rng.uniform(*radius_ratio))
        if r_child < min_radius:
            continue
        for _ in range(2):
            ln_child = ln * float(rng.uniform(*length_ratio))
            for _ in range(4):
                w = _unit(u + rng.normal(0.0, 0.6, 3) + np.array([0.35 * lateral, 0.0, 0.0]))
                if ends_inside(p1 + w * ln_child):
                    queue.append((p1, w, r_child, ln_child))
                    break
    return segments


# --------------------------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Anatomy:
    volume: FloatArray  # HU, float32
    lung: BoolArray  # lung cavity (parenchyma + intrapulmonary vessels and airways)
    vessel: BoolArray  # intrapulmonary vessels
    airway: BoolArray  # airway wall + lumen


def _build_anatomy(grid: _Grid, rng: np.random.Generator) -> _Anatomy:
    nx, ny, nz = grid.shape
    sz = grid.spacing[2]
    gx, gy, gz = grid.x[:, None, None], grid.y[None, :, None], grid.z[None, None, :]
    px, py = grid.x[:, None], grid.y[None, :]  # 2D (in-plane) versions
    length_z = max((nz - 1) * sz, 1.0)
    t = gz / _F32(length_z)

    # Body size: adult chest, shrunk to fit a small field of view.
    fov_x = min(-float(grid.x[0]), float(grid.x[-1]))
    fov_y = min(-float(grid.y[0]), float(grid.y[-1]))
    a0 = min(float(rng.uniform(140.0, 170.0)), fov_x - 4.0)
    b0 = min(a0 * float(rng.uniform(0.62, 0.74)), fov_y - 4.0)
    k = min(a0 / 155.0, b0 / 105.0, 1.1)  # anatomy scale factor
    phase = rng.uniform(0.0, 2.0 * np.pi, 2)
    freq = float(rng.uniform(0.4, 0.9))
    a_z = _F32(a0) * (1.0 - 0.035 * (1.0 + np.sin(2 * np.pi * freq * t + phase[0]))).astype(_F32)
    b_z = _F32(b0) * (1.0 - 0.03 * (1.0 + np.sin(2 * np.pi * freq * t + phase[1]))).astype(_F32)

    vol = np.full(grid.shape, -1000.0, dtype=_F32)
    body = (gx / a_z) ** 2 + (gy / b_z) ** 2 < 1.0
    vol[body] = -100.0 + float(rng.uniform(-15.0, 15.0))
    fat_t = float(rng.uniform(7.0, 18.0)) * k
    ai, bi = a_z - _F32(fat_t), b_z - _F32(fat_t)
    muscle_hu = 45.0 + float(rng.uniform(-10.0, 10.0))
    vol[(gx / ai) ** 2 + (gy / bi) ** 2 < 1.0] = muscle_hu
    wall_t = float(rng.uniform(12.0, 16.0)) * k
    ac, bc = ai - _F32(wall_t), bi - _F32(wall_t)  # chest cavity (inside the ribs)
    ac_m, bc_m = float(ac.mean()), float(bc.mean())

    # Ribs: oval sections on an ellipse just outside the cavity, descending anteriorly, gap at the sternum.
    ar, br = ac + _F32(5.0 * k), bc + _F32(5.0 * k)
    q = np.sqrt((gx / ar) ** 2 + (gy / br) ** 2)
    ii, jj, kk = np.nonzero(np.abs(q - 1.0) < 0.12)
    xr, yr, zr = grid.x[ii], grid.y[jj], grid.z[kk]
    qr = q[ii, jj, kk]
    theta = np.arctan2(yr / br[0, 0, kk], xr / ar[0, 0, kk])
    dr = (qr - 1.0) * np.sqrt(xr**2 + yr**2) / np.maximum(qr, 1e-3)
    pitch = float(rng.uniform(24.0, 30.0)) * k
    drop = float(rng.uniform(30.0, 50.0)) * k
    z_off = -drop * (1.0 - np.sin(theta)) / 2.0
    dz = np.mod(zr - z_off - float(rng.uniform(0.0, pitch)) + pitch / 2.0, pitch) - pitch / 2.0
    rib = (dr / (4.0 * k)) ** 2 + (dz / (5.5 * k)) ** 2 < 1.0
    rib &= np.abs(theta + np.pi / 2) > 0.32  # sternal gap (costal cartilage)
    rib &= np.abs(theta - np.pi / 2) > 0.14  # joins the spine
    vol[ii[rib], jj[rib], kk[rib]] = 700.0 + float(rng.uniform(-60.0, 60.0))
    del q, ii, jj, kk

    # Mediastinum: fat, heart ellipsoid, aortas, oesophagus.
    ys = 0.40 * bc_m
    rvx, rvy = 19.0 * k, 16.0 * k
    med = ((px / (34.0 * k)) ** 2 + ((py + 0.2 * bc_m) / (0.72 * bc_m)) ** 2 < 1.0)[:, :, None]
    vol = np.where(med & (gy > -bc * 0.98), _F32(-85.0), vol)
    blood_hu = float(rng.uniform(35.0, 60.0))
    aorta_r = 12.0 * k
    d_ao = (px - 22.0 * k) ** 2 + (py - (ys - 14.0 * k)) ** 2 < aorta_r**2
    a_ao = (px - 6.0 * k) ** 2 + (py + 0.35 * bc_m) ** 2 < (14.0 * k) ** 2
    eso = (px + 3.0 * k) ** 2 + (py - (ys - rvy - 10.0 * k)) ** 2 < (7.0 * k) ** 2
    t_dia = float(rng.uniform(-0.05, 0.12))
    heart_c = (14.0 * k, -0.28 * bc_m, (t_dia + 0.22) * length_z)
    heart_r = (min(58.0 * k, 0.42 * ac_m), min(45.0 * k, 0.42 * bc_m), 52.0 * k)
    hq = ((gx - heart_c[0]) / heart_r[0]) ** 2 + ((gy - heart_c[1]) / heart_r[1]) ** 2
    hq = hq + ((gz - heart_c[2]) / heart_r[2]) ** 2
    a_ao3 = a_ao[:, :, None] & (gz > heart_c[2] + 0.5 * heart_r[2])
    vol = np.where(hq < 1.25, _F32(-90.0), vol)
    vol = np.where(hq < 1.0, _F32(blood_hu - 5.0), vol)
    vol = np.where(d_ao[:, :, None] | a_ao3, _F32(blood_hu), vol)
    vol = np.where(eso[:, :, None], _F32(35.0), vol)

    # Spine (2D section, discs modulated along z) and sternum, painted over the mediastinum.
    vb = ((px / rvx) ** 2 + ((py - ys) / rvy) ** 2)[:, :, None]
    disc_pitch = float(rng.uniform(24.0, 30.0)) * k
    disc = np.mod(gz - float(rng.uniform(0.0, disc_pitch)), disc_pitch) < 5.0 * k
    bone = np.where(vb < 0.72, _F32(250.0), _F32(650.0))
    vol = np.where(vb < 1.0, np.where(disc, _F32(90.0), bone), vol)
    canal_y = ys + rvy + 7.0 * k
    spinous = (np.abs(px) < 4.0 * k) & (py > canal_y) & (py < canal_y + 32.0 * k)
    pedicle = (np.abs(px) < 13.0 * k) & (py > ys + 0.5 * rvy) & (py < canal_y + 8.0 * k)
    canal = (px / (7.5 * k)) ** 2 + ((py - canal_y) / (7.0 * k)) ** 2 < 1.0
    post = ((spinous | pedicle) & ~canal)[:, :, None]
    vol = np.where(post, _F32(600.0), vol)
    vol = np.where(canal[:, :, None], _F32(20.0), vol)
    sternum = ((px / (14.0 * k)) ** 2 + ((py + bc_m + 3.0 * k) / (5.5 * k)) ** 2 < 1.0)[:, :, None] & (t > 0.25)
    vol = np.where(sternum, _F32(450.0), vol)

    # Lungs.
    t_apex = float(rng.uniform(0.95, 1.15))
    g = np.clip((t_apex - t) / 0.3, 0.0, 1.0) ** 0.6
    excl = (hq < 1.45) | a_ao3
    excl2d = (
        ((px - 22.0 * k) ** 2 + (py - (ys - 14.0 * k)) ** 2 < (aorta_r + 4.0 * k) ** 2)
        | ((np.abs(px) < rvx + 10.0 * k) & (py > ys - rvy - 18.0 * k))
        | ((px / (26.0 * k)) ** 2 + ((py + 0.2 * bc_m) / (0.75 * bc_m)) ** 2 < 1.0)
    )
    excl |= excl2d[:, :, None]
    cavity = (gx / ac) ** 2 + (gy / bc) ** 2 < 0.97
    lung = np.zeros(grid.shape, dtype=bool)
    lung_centres = []
    for side in (-1.0, 1.0):  # right lung at -x, left lung at +x (LPS)
        xc, yc = side * 0.42 * ac_m, 0.04 * bc_m
        ax0 = (0.36 if side < 0 else 0.33) * ac_m
        ay0 = 0.82 * bc_m
        lax = np.maximum(_F32(ax0) * g, 1e-3)
        lay = np.maximum(_F32(ay0) * np.sqrt(g), 1e-3)
        one = ((gx - _F32(xc)) / lax) ** 2 + ((gy - _F32(yc)) / lay) ** 2 < 1.0
        dome_t = t_dia + (0.04 if side < 0 else 0.0)
        dome = dome_t + 0.16 * np.clip(1.0 - ((px - xc) / ax0) ** 2 - ((py - yc) / ay0) ** 2, 0.0, 1.0)
        lung |= one & (t > dome[:, :, None])
        lung_centres.append((xc, yc, ax0, ay0))
    lung &= cavity & ~excl
    del excl, cavity, hq

    # Lung parenchyma: smooth texture (coarse noise, trilinear upsampling) + dependent (posterior) density.
    coarse = rng.standard_normal((max(nx // 6, 2), max(ny // 6, 2), max(nz // 3, 2))).astype(_F32)
    tex = ndimage.zoom(coarse, [n / c for n, c in zip(grid.shape, coarse.shape)], order=1, grid_mode=False)
    tex = tex[:nx, :ny, :nz]
    lung_hu = -865.0 + float(rng.uniform(-20.0, 20.0))
    grad = _F32(35.0 / max(bc_m, 1.0)) * gy
    vol = np.where(lung, _F32(lung_hu) + _F32(22.0) * tex + grad, vol).astype(_F32)

    # Airways: trachea from the top to the carina, main bronchi to each hilum, branching bronchi in the lungs.
    airway_segments: list[_Segment] = []
    y_tr = ys - rvy - 26.0 * k
    z_car = min((t_dia + 0.62) * length_z, length_z * 0.9)
    carina = np.array([0.0, y_tr, z_car])
    airway_segments.append((np.array([0.0, y_tr - 6.0 * k, length_z + 10.0]), carina, 8.0 * k, 7.5 * k))
    vessel_segments: list[_Segment] = []
    for side, (xc, yc, ax0, _ay0) in zip((-1.0, 1.0), lung_centres):
        hilum = np.array([xc - side * 0.55 * ax0, yc + 4.0 * k, z_car - 22.0 * k])
        airway_segments.append((carina, hilum, 5.5 * k, 5.0 * k))
        for _ in range(int(rng.integers(2, 4))):
            u = np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.6, 0.6), rng.uniform(-1.0, 0.6)])
            airway_segments += _grow_tree(rng, hilum, u, 4.0 * k, 28.0 * k, 1.6, side, lung, grid, 12)
        for _ in range(int(rng.integers(10, 14))):
            v_hilum = hilum + np.array([0.0, -8.0 * k, float(rng.uniform(-75.0, 55.0)) * k])
            u = np.array([side * rng.uniform(0.2, 1.0), rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)])
            r0 = float(rng.uniform(2.8, 4.0))
            length = float(rng.uniform(18.0, 28.0)) * k
            vessel_segments += _grow_tree(
                rng,
                v_hilum,
                u,
                r0,
                length,
                1.0,
                side,
                lung,
                grid,
                40,
                radius_ratio=(0.74, 0.86),
                length_ratio=(0.8, 0.95),
            )
    vessel = np.zeros(grid.shape, dtype=bool)
    _render_segments(grid, vessel_segments, vessel)
    vessel &= lung
    vol[vessel] = blood_hu + float(rng.uniform(-10.0, 0.0))
    wall_outer = np.zeros(grid.shape, dtype=bool)
    lumen = np.zeros(grid.shape, dtype=bool)
    thin = [(p0, p1, 0.75 * r0, 0.75 * r1) for p0, p1, r0, r1 in airway_segments]
    _render_segments(grid, airway_segments, wall_outer, extra=0.0)
    _render_segments(grid, thin, lumen, extra=0.0)
    wall_outer &= body
    lumen &= body
    vol[wall_outer] = 30.0
    vol[lumen] = -990.0
    vessel &= ~wall_outer
    return _Anatomy(volume=vol, lung=lung, vessel=vessel, airway=wall_outer)


# --------------------------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _LesionShape:
    """Union of ellipsoids ``||M_k (p - c - o_k)|| <= 1``; ``f`` is the min of those norms."""

    kind: str
    offsets: list[NDArray[np.float64]]
    matrices: list[NDArray[np.float64]]
    reach: float  # bound on the distance of any lesion point from the centre (mm)

    def evaluate(self, grid: _Grid, c: NDArray[np.float64], sl: tuple[slice, slice, slice]) -> FloatArray:
        xs, ys, zs = grid.sub(sl)
        f: FloatArray | None = None
        for o, m in zip(self.offsets, self.matrices):
            dx, dy, dz = xs - _F32(c[0] + o[0]), ys - _F32(c[1] + o[1]), zs - _F32(c[2] + o[2])
            acc = None
            for row in m.astype(_F32):
                comp = dx * row[0] + dy * row[1] + dz * row[2]
                acc = comp * comp if acc is None else acc + comp * comp
            assert acc is not None
            f = acc if f is None else np.minimum(f, acc)
        assert f is not None
        return np.sqrt(f)


def _rotation(rng: np.random.Generator, max_angle: float) -> NDArray[np.float64]:
    angles = rng.uniform(-max_angle, max_angle, 3)
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sample_shape(rng: np.random.Generator, kind: str, diameter: float) -> _LesionShape:
    radius = diameter / 2.0
    if kind == "round":
        s = radius * float(rng.uniform(0.92, 1.0))
        m = np.diag([1.0 / s, 1.0 / s, 1.0 / s])
        return _LesionShape(kind, [np.zeros(3)], [m], s)
    if kind == "lobulated":
        n_bumps = int(rng.integers(3, 7))
        frac = [float(rng.uniform(0.35, 0.55)) for _ in range(n_bumps)]
        dist = [float(rng.uniform(0.65, 0.85)) for _ in range(n_bumps)]
        main = radius / max(d + f for d, f in zip(dist, frac))
        offsets, mats = [np.zeros(3)], [np.eye(3) / main]
        for d, f in zip(dist, frac):
            offsets.append(_unit(rng.normal(size=3)) * d * main)
            mats.append(np.eye(3) / (f * main))
        return _LesionShape(kind, offsets, mats, radius)
    ratio1 = float(rng.uniform(1.4, 2.5))
    ratio2 = float(rng.uniform(1.0, ratio1))
    semi = np.array([radius, radius / ratio1, radius / ratio2])[rng.permutation(3)]
    rot = np.eye(3) if rng.random() < 0.5 else _rotation(rng, math.radians(25.0))
    return _LesionShape(kind, [np.zeros(3)], [np.diag(1.0 / semi) @ rot.T], radius)


@dataclass
class _Placed:
    sl: tuple[slice, slice, slice]
    mask: BoolArray
    f: FloatArray
    touches: str | None


_CROSS = ndimage.generate_binary_structure(3, 1)
_CORE_MIN = 0.4  # part-solid core: voxels with shape field f <= core fraction (>= this)


def _try_place(
    grid: _Grid,
    shape: _LesionShape,
    c: NDArray[np.float64],
    anat: _Anatomy,
    parenchyma: BoolArray,
    reserved: BoolArray,
    max_extent_mm: float = MAX_DIAMETER_MM,
) -> _Placed | None:
    """Rasterise ``shape`` at ``c``; ``None`` unless it is a valid, free, well-sized single component."""
    r = shape.reach
    sl = grid.window(c - r, c + r, pad=1)
    if sl is None:
        return None
    # The padded window must lie strictly inside the volume (lesion never touches the volume border).
    for n, lo, hi, a, sp in zip(grid.shape, c - r, c + r, (grid.x, grid.y, grid.z), grid.spacing):
        if math.ceil((lo - float(a[0])) / sp) - 1 < 1 or math.floor((hi - float(a[0])) / sp) + 1 > n - 2:
            return None
    f = shape.evaluate(grid, c, sl)
    m = f <= 1.0
    count = int(m.sum())
    if count < 2:
        return None
    if (m & ~parenchyma[sl]).any() or (m & reserved[sl]).any():
        return None
    extents = []
    for axis, sp in enumerate(grid.spacing):
        other = tuple(a for a in range(3) if a != axis)
        nz_idx = np.flatnonzero(m.any(axis=other))
        extents.append((int(nz_idx[-1]) - int(nz_idx[0]) + 1) * sp)
    in_plane = max(extents[0], extents[1])
    if not (MIN_DIAMETER_MM <= in_plane <= max_extent_mm) or extents[2] > max_extent_mm:
        return None
    if ndimage.label(m, structure=_CROSS)[1] != 1:
        return None
    ring = ndimage.binary_dilation(m, structure=_CROSS) & ~m
    touches: str | None = None
    if (ring & ~anat.lung[sl]).any():
        touches = "pleura"
    elif (ring & anat.vessel[sl]).any():
        touches = "vessel"
    return _Placed(sl, m, f, touches)


def _march(grid: _Grid, mask: BoolArray, p: NDArray[np.float64], u: NDArray[np.float64]) -> NDArray[np.float64]:
    """Last point inside ``mask`` walking from ``p`` along ``u`` in half-voxel steps."""
    step = 0.5 * min(grid.spacing)
    last = p
    for _ in range(400):
        q = last + u * step
        idx = grid.index_of(q)
        if idx is None or not mask[idx]:
            return last
        last = q
    return last


def _place_lesions(
    grid: _Grid,
    anat: _Anatomy,
    rng: np.random.Generator,
    n_lesions: int,
    lesion_mm: tuple[float, float] = DEFAULT_LESION_MM,
) -> list[tuple[int, str, _Placed]]:
    lo_all, hi_all = lesion_mm
    # accepted extents scale with the range (exactly MAX_DIAMETER_MM for the default range)
    max_extent = MAX_DIAMETER_MM * max(1.0, hi_all / DEFAULT_LESION_MM[1])
    parenchyma = anat.lung & ~anat.vessel & ~ndimage.binary_dilation(anat.airway, iterations=1)
    reserved = np.zeros(grid.shape, dtype=bool)
    candidates = np.flatnonzero(parenchyma)
    vessel_vox = np.flatnonzero(anat.vessel)
    placed: list[tuple[int, str, _Placed]] = []
    if candidates.size == 0:
        return placed
    for _ in range(n_lesions):
        class_id = int(rng.choice(3, p=[0.5, 0.25, 0.25]))
        kind = SHAPE_KINDS[int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
        want = rng.random()
        mode = "pleura" if want < 0.12 else ("vessel" if want < 0.22 else "free")
        if mode == "vessel" and vessel_vox.size == 0:
            mode = "free"
        lo = max(8.0, lo_all) if class_id == 2 else lo_all  # a part-solid lesion needs room for core and halo
        hi = max(hi_all, lo)
        result: _Placed | None = None
        for attempt in range(80):
            if attempt == 40:
                mode = "free"
            diameter = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
            if attempt >= 20:
                diameter = min(diameter, max(12.0, lo))  # small lungs (tiny test volumes): prefer what fits
            shape = _sample_shape(rng, kind, diameter)
            if mode == "free":
                p = np.array(np.unravel_index(int(rng.choice(candidates)), grid.shape), dtype=np.float64)
                c = np.array([grid.x[int(p[0])], grid.y[int(p[1])], grid.z[int(p[2])]], dtype=np.float64)
                c += rng.uniform(-0.5, 0.5, 3) * np.array(grid.spacing)
                result = _try_place(grid, shape, c, anat, parenchyma, reserved, max_extent)
                if result is not None and (
                    (class_id == 2 and not (result.f[result.mask] <= _CORE_MIN).any())
                    or (result.touches is not None and attempt < 60)  # keep touching lesions near ~20%
                ):
                    result = None
            else:
                pool = candidates if mode == "pleura" else vessel_vox
                mask = anat.lung if mode == "pleura" else anat.vessel
                p = np.array(np.unravel_index(int(rng.choice(pool)), grid.shape), dtype=np.float64)
                start = np.array([grid.x[int(p[0])], grid.y[int(p[1])], grid.z[int(p[2])]], dtype=np.float64)
                u = _unit(np.array([rng.normal(), rng.normal(), 0.4 * rng.normal()]))
                edge = _march(grid, mask, start, u)
                direction = -u if mode == "pleura" else u
                step = 0.5 * min(grid.spacing)
                for n_step in range(int(2.4 * shape.reach / step) + 4):
                    c = edge + direction * (n_step * step)
                    result = _try_place(grid, shape, c, anat, parenchyma, reserved, max_extent)
                    if result is not None:
                        break
                if result is not None and (
                    result.touches != mode or (class_id == 2 and not (result.f[result.mask] <= _CORE_MIN).any())
                ):
                    result = None
            if result is not None:
                break
        if result is None:
            continue
        sl = result.sl
        idx = [np.flatnonzero(result.mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
        box_sl = tuple(slice(max(s.start + int(i[0]) - 2, 0), s.start + int(i[-1]) + 3) for s, i in zip(sl, idx))
        reserved[box_sl] = True
        placed.append((class_id, kind, result))
    return placed


def _paint_lesion(vol: FloatArray, class_id: int, placed: _Placed, rng: np.random.Generator) -> None:
    m, f = placed.mask, placed.f
    centre_weight = (1.0 - np.clip(f, 0.0, 1.0))[m]
    solid = float(rng.uniform(0.0, 60.0))
    ggo = float(rng.uniform(-650.0, -450.0))
    if class_id == 0:
        values = solid - 15.0 + 25.0 * centre_weight
    elif class_id == 1:
        values = ggo - 40.0 + 90.0 * centre_weight
    else:
        core_frac = float(rng.uniform(_CORE_MIN, 0.6))
        values = np.where(f[m] <= core_frac, solid, ggo - 30.0 + 60.0 * centre_weight)
    sub = vol[placed.sl]
    sub[m] = values.astype(_F32)


# --------------------------------------------------------------------------------------------------------------
# Case generation
# --------------------------------------------------------------------------------------------------------------
def _case_id(index: int, width: int = 3) -> str:
    return f"case_{index:0{width}d}"


def generate_case(
    index: int,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    case_id: str | None = None,
    lesion_mm: tuple[float, float] = DEFAULT_LESION_MM,
) -> SyntheticCase:
    """Generate one synthetic chest-CT case in memory.

    Args:
        index: case index (0-based); case ``index`` of ``seed`` is the same whatever the dataset size.
        seed: non-negative dataset seed.
        shape: volume shape (X, Y, Z); ``None`` samples a plausible chest field of view per case
            (144-192 voxels in-plane for 280-350 mm, 64-128 slices).
        case_id: identifier, default ``case_{index:03d}``.
        lesion_mm: ``(low, high)`` range of the drawn lesion diameters, mm (log-uniform); the default is the
            built-in dataset's. Another range changes only the lesions (e.g. ``(15, 40)``: large ones).

    Returns:
        The case with its int16 HU volume, uint8 label mask, geometry and lesion ground truth.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    if shape is not None and (len(shape) != 3 or min(shape) < 16):
        raise ValueError(f"shape must be three sizes of at least 16 voxels, got {shape}")
    geo_rng = _rng(seed, index, 0)
    shp, spacing, origin = _sample_geometry(geo_rng, shape)
    centre_x = origin[0] + (shp[0] - 1) * spacing[0] / 2.0 + float(geo_rng.uniform(-8.0, 8.0))
    centre_y = origin[1] + (shp[1] - 1) * spacing[1] / 2.0 + float(geo_rng.uniform(-4.0, 12.0))
    noise_sigma = round(float(geo_rng.uniform(10.0, 40.0)), 2)
    study_date = (_dt.date(2015, 1, 1) + _dt.timedelta(days=int(geo_rng.integers(0, 3650)))).strftime("%Y%m%d")
    grid = _Grid(shp, spacing, origin, (centre_x, centre_y, origin[2]))

    anat = _build_anatomy(grid, _rng(seed, index, 1))
    lesion_rng = _rng(seed, index, 2)
    n_lesions = 0 if case_is_empty(seed, index) else int(lesion_rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
    placed = _place_lesions(grid, anat, lesion_rng, n_lesions, lesion_mm)

    vol = anat.volume
    label = np.zeros(shp, dtype=np.uint8)
    lesions: list[SyntheticLesion] = []
    sx, sy, sz = spacing
    for lesion_id, (class_id, kind, pl) in enumerate(placed, start=1):
        _paint_lesion(vol, class_id, pl, lesion_rng)
        label[pl.sl][pl.mask] = class_id + 1
        li, lj, lk = np.nonzero(pl.mask)
        gi, gj, gk = li + pl.sl[0].start, lj + pl.sl[1].start, lk + pl.sl[2].start
        vb = (int(gi.min()), int(gj.min()), int(gk.min()), int(gi.max()), int(gj.max()), int(gk.max()))
        box = (
            origin[0] + vb[0] * sx - sx / 2.0,
            origin[1] + vb[1] * sy - sy / 2.0,
            origin[2] + vb[2] * sz - sz / 2.0,
            origin[0] + vb[3] * sx + sx / 2.0,
            origin[1] + vb[4] * sy + sy / 2.0,
            origin[2] + vb[5] * sz + sz / 2.0,
        )
        centroid = (
            origin[0] + float(gi.mean()) * sx,
            origin[1] + float(gj.mean()) * sy,
            origin[2] + float(gk.mean()) * sz,
        )
        lesions.append(
            SyntheticLesion(
                lesion_id=lesion_id,
                class_id=class_id,
                shape_kind=kind,
                voxel_box=vb,
                box=tuple(round(v, 6) for v in box),  # type: ignore[arg-type]
                centroid=tuple(round(v, 6) for v in centroid),  # type: ignore[arg-type]
                voxel_count=int(pl.mask.sum()),
                touches=pl.touches,
            )
        )

    # Partial-volume blur, then noise (slightly correlated + white), round and clip to the 12-bit CT range.
    noise_rng = _rng(seed, index, 3)
    sigma_vox = [float(np.clip(0.9 / s, 0.3, 0.6)) for s in spacing]
    vol += noise_rng.standard_normal(shp, dtype=_F32) * _F32(noise_sigma * 1.2)
    vol = ndimage.gaussian_filter(vol, sigma=sigma_vox, truncate=3.0)
    vol += noise_rng.standard_normal(shp, dtype=_F32) * _F32(noise_sigma * 0.75)
    np.clip(vol, HU_MIN, HU_MAX, out=vol)
    image = np.rint(vol).astype(np.int16)

    return SyntheticCase(
        case_id=case_id or _case_id(index),
        index=index,
        seed=seed,
        image=image,
        label=label,
        spacing=spacing,
        origin=origin,
        lesions=lesions,
        descending=case_is_descending(seed, index),
        noise_sigma=noise_sigma,
        study_date=study_date,
    )


# --------------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------------
def _nifti(array: NDArray[Any], affine_ras: NDArray[np.float64], description: str) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine_ras)
    img.header.set_data_dtype(array.dtype)
    img.set_qform(affine_ras, code=1)
    img.set_sform(affine_ras, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode("ascii")[:79]
    return img


def write_case_nifti(case: SyntheticCase, image_path: Path | str, label_path: Path | str) -> None:
    """Write the case's CT (int16 HU) and label mask (uint8) as NIfTI with the RAS affine (qform/sform code 1)."""
    for path, arr, what in ((image_path, case.image, "CT HU"), (label_path, case.label, "label class id + 1")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        nib.save(_nifti(arr, case.affine_ras, f"medrpn synthetic phantom {what}"), str(path))


def _ds_str(value: float) -> str:
    """Format a decimal string (DS) of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def write_case_dicom(case: SyntheticCase, series_dir: Path | str) -> list[Path]:
    """Write the case as a CT Image Storage series, one Explicit VR Little Endian file per slice.

    Stored pixels are unsigned 12-bit (``HU + 1024``) with RescaleIntercept -1024 and RescaleSlope 1. Files are
    named ``IM_0000.dcm``... in InstanceNumber order; for :attr:`SyntheticCase.descending` cases the first file is
    the most superior slice (z decreasing with InstanceNumber), otherwise the most inferior.

    Args:
        case: the case to write.
        series_dir: destination folder (created).

    Returns:
        The written file paths in InstanceNumber order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, ExplicitVRLittleEndian

    series_dir = Path(series_dir)
    series_dir.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = case.shape
    sx, sy, sz = case.spacing
    ox, oy, oz = case.origin
    stored = (case.image.astype(np.int32) - RESCALE_INTERCEPT).astype("<u2")
    num = f"{case.index:03d}"
    study_time = f"{8 + case.index % 10:02d}{(case.index * 7) % 60:02d}00"
    order = list(range(nz))[::-1] if case.descending else list(range(nz))
    paths = []
    for n, kk in enumerate(order):
        sop_uid = UID(synthetic_uid(case.seed, case.index, "sop", kk))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "MEDRPN_SYNTH"
        ds = Dataset()
        ds.file_meta = meta
        # SOP common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = case.study_date
        ds.InstanceCreationTime = study_time
        # Patient (clearly synthetic)
        ds.PatientName = f"SYNTHETIC^CASE{num}"
        ds.PatientID = f"SYNTH-{num}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "Synthetic phantom generated by medrpn (no patient data)"
        # General study
        ds.StudyInstanceUID = case.study_uid
        ds.StudyDate = case.study_date
        ds.StudyTime = study_time
        ds.ReferringPhysicianName = ""
        ds.StudyID = f"S{num}"
        ds.AccessionNumber = f"SYN{case.seed % 10000:04d}{case.index % 100000:05d}"
        ds.StudyDescription = "Synthetic chest CT phantom (not patient data)"
        # General series
        ds.Modality = "CT"
        ds.SeriesInstanceUID = case.series_uid
        ds.SeriesNumber = 1
        ds.SeriesDate = case.study_date
        ds.SeriesTime = study_time
        ds.SeriesDescription = "SYNTHETIC chest CT lesion phantom"
        ds.BodyPartExamined = "CHEST"
        ds.PatientPosition = "HFS"
        # Frame of reference
        ds.FrameOfReferenceUID = case.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        # General equipment
        ds.Manufacturer = "medrpn"
        ds.ManufacturerModelName = "synthetic-chest-ct"
        ds.InstitutionName = "medrpn synthetic data"
        ds.SoftwareVersions = f"medrpn-synthetic {GENERATOR_VERSION}"
        # General image / acquisition
        ds.InstanceNumber = n + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = case.study_date
        ds.ContentTime = study_time
        ds.AcquisitionDate = case.study_date
        ds.AcquisitionTime = study_time
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.ImageComments = "SYNTHETIC PHANTOM - NOT FOR CLINICAL USE"
        # Image plane
        z = oz + kk * sz
        ds.ImagePositionPatient = [_ds_str(ox), _ds_str(oy), _ds_str(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [_ds_str(sy), _ds_str(sx)]
        ds.SliceThickness = _ds_str(sz)
        ds.SpacingBetweenSlices = _ds_str(sz)
        ds.SliceLocation = _ds_str(z)
        # CT image
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["-600", "40"]
        ds.WindowWidth = ["1500", "400"]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        # Image pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, kk].T).tobytes()
        path = series_dir / f"IM_{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------
def _split(cases: int, val_fraction: float, seed: int) -> set[int]:
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if val_fraction == 1.0:  # a held-out evaluation set: every case in "validation"
        return set(range(cases))
    n_val = round(cases * val_fraction)
    if val_fraction > 0 and cases >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, cases - 1) if cases >= 2 else 0
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5A11])).permutation(cases)
    return {int(i) for i in perm[:n_val]}


def _r(v: float) -> float:
    return round(float(v), 6)


def generate_dataset(
    out_dir: Path | str,
    *,
    cases: int = 20,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    val_fraction: float = 0.2,
    write_dicom: bool = True,
    progress: bool = False,
    lesion_mm: tuple[float, float] = DEFAULT_LESION_MM,
) -> SyntheticSummary:
    """Generate the synthetic chest-CT lesion dataset into ``out_dir`` (see the module docstring for the layout).

    Args:
        out_dir: output folder (created; existing files of the same names are overwritten).
        cases: number of cases.
        seed: non-negative seed; same seed gives byte-identical arrays and identical annotation files.
        shape: fixed volume shape (X, Y, Z) for every case, or ``None`` for a per-case plausible chest FOV.
        val_fraction: fraction of cases put in the datalist ``validation`` split (at least one when > 0 and
            there are two or more cases; never all of them).
        write_dicom: also write the DICOM series (``dicom/case_XXX``); without it the datalist has no ``dicom``.
        progress: show a tqdm progress bar over cases.
        lesion_mm: ``(low, high)`` lesion diameter range, mm (see :func:`generate_case`).

    Returns:
        A :class:`SyntheticSummary` of what was written.
    """
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if not MIN_DIAMETER_MM <= lesion_mm[0] <= lesion_mm[1]:
        raise ValueError(f"lesion_mm must be (low, high) with {MIN_DIAMETER_MM} <= low <= high, got {lesion_mm}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val_idx = _split(cases, val_fraction, seed)
    width = max(3, len(str(cases - 1)))

    from tqdm.auto import tqdm

    training: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    lesion_cases: list[dict[str, Any]] = []
    rows: list[list[str]] = []
    case_ids: list[str] = []
    for index in tqdm(range(cases), desc="synth", unit="case", disable=not progress):
        cid = _case_id(index, width)
        case = generate_case(index, seed=seed, shape=shape, case_id=cid, lesion_mm=lesion_mm)
        image_rel, label_rel, dicom_rel = f"nifti/{cid}.nii.gz", f"labels/{cid}_label.nii.gz", f"dicom/{cid}"
        write_case_nifti(case, out / image_rel, out / label_rel)
        if write_dicom:
            write_case_dicom(case, out / dicom_rel)
        split = "validation" if index in val_idx else "training"
        item: dict[str, Any] = {"image": image_rel}
        if write_dicom:
            item["dicom"] = dicom_rel
        item.update(
            {
                "label_mask": label_rel,
                "seriesuid": case.series_uid,
                "box": [[_r(v) for v in les.box_cccwhd] for les in case.lesions],
                "label": [les.class_id for les in case.lesions],
            }
        )
        (validation if split == "validation" else training).append(item)
        for les in case.lesions:
            rows.append([case.series_uid, *(f"{_r(v)!r}" for v in (*les.center, les.diameter_mm))])
        lesion_cases.append(
            {
                "case_id": cid,
                "index": index,
                "split": split,
                "seriesuid": case.series_uid,
                "studyuid": case.study_uid,
                "frame_of_reference_uid": case.frame_of_reference_uid,
                "image": image_rel,
                "label_mask": label_rel,
                "dicom": dicom_rel if write_dicom else None,
                "dicom_descending_z": case.descending,
                "shape": list(case.shape),
                "spacing": list(case.spacing),
                "origin": list(case.origin),
                "noise_sigma_hu": case.noise_sigma,
                "lesions": [
                    {
                        "id": les.lesion_id,
                        "class_id": les.class_id,
                        "class_name": les.class_name,
                        "shape": les.shape_kind,
                        "center": [_r(v) for v in les.center],
                        "centroid": list(les.centroid),
                        "box": list(les.box),
                        "box_cccwhd": [_r(v) for v in les.box_cccwhd],
                        "voxel_box": list(les.voxel_box),
                        "diameter_mm": _r(les.diameter_mm),
                        "touches": les.touches,
                        "voxel_count": les.voxel_count,
                    }
                    for les in case.lesions
                ],
            }
        )
        case_ids.append(cid)

    datalist = {
        "description": "medrpn synthetic chest-CT lesion phantom (no patient data)",
        "box_mode": "cccwhd",
        "coordinates": "world LPS mm",
        "classes": list(CLASS_NAMES),
        "training": training,
        "validation": validation,
    }
    lesions_doc = {
        "description": "medrpn synthetic chest-CT lesion phantom: full ground truth (world LPS mm)",
        "seed": seed,
        "coordinates": "world LPS mm",
        "box_mode": "xyzxyz",
        "classes": {str(i): n for i, n in enumerate(CLASS_NAMES)},
        "label_mask_value": "class_id + 1 (0 = background)",
        "cases": lesion_cases,
    }
    datalist_path, annotations_path, lesions_path = out / DATALIST_NAME, out / ANNOTATIONS_NAME, out / LESIONS_NAME
    datalist_path.write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
    lesions_path.write_text(json.dumps(lesions_doc, indent=2) + "\n", encoding="utf-8")
    with annotations_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        writer.writerows(rows)
    uids = "".join(f"{c['seriesuid']}\n" for c in lesion_cases)
    (out / SERIESUIDS_NAME).write_text(uids, encoding="utf-8")
    return SyntheticSummary(
        out_dir=out,
        datalist=datalist_path,
        annotations=annotations_path,
        lesions=lesions_path,
        case_ids=tuple(case_ids),
        training_ids=tuple(c["case_id"] for c in lesion_cases if c["split"] == "training"),
        validation_ids=tuple(c["case_id"] for c in lesion_cases if c["split"] == "validation"),
        num_lesions=len(rows),
        dicom=write_dicom,
    )


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medrpn synth",
        description="Generate the built-in synthetic chest-CT lesion dataset (NIfTI, DICOM, LUNA16 CSV, "
        "MONAI detection datalist). Synthetic phantoms only, no patient data.",
    )
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="fixed volume shape")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction (default 0.2)")
    p.add_argument("--no-dicom", action="store_true", help="skip the DICOM series")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--lesion-mm",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=DEFAULT_LESION_MM,
        help=f"lesion diameter range, mm (default {DEFAULT_LESION_MM[0]:g} {DEFAULT_LESION_MM[1]:g})",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point ``medrpn synth OUT --cases N --seed S [--shape X Y Z] [--no-dicom]``.

    Returns:
        The process exit code (0 on success, 2 on invalid arguments).
    """
    parser = _parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.cases < 1 or args.seed < 0 or (args.shape is not None and min(args.shape) < 16):
        parser.error("--cases must be >= 1, --seed >= 0 and every --shape size >= 16")
    if not 0.0 <= args.val_fraction <= 1.0:
        parser.error("--val-fraction must be in [0, 1] (1: every case in 'validation', a held-out set)")
    if not MIN_DIAMETER_MM <= args.lesion_mm[0] <= args.lesion_mm[1]:
        parser.error(f"--lesion-mm must be LOW HIGH with {MIN_DIAMETER_MM:g} <= LOW <= HIGH")
    summary = generate_dataset(
        args.out,
        cases=args.cases,
        seed=args.seed,
        shape=tuple(args.shape) if args.shape else None,
        val_fraction=args.val_fraction,
        write_dicom=not args.no_dicom,
        progress=not args.no_progress,
        lesion_mm=(float(args.lesion_mm[0]), float(args.lesion_mm[1])),
    )
    print(
        f"medrpn synth: wrote {summary.num_cases} cases ({len(summary.training_ids)} training, "
        f"{len(summary.validation_ids)} validation), {summary.num_lesions} lesions, "
        f"{'NIfTI + DICOM' if summary.dicom else 'NIfTI'} to {summary.out_dir}",
        file=sys.stdout,
    )
    return 0
