"""Fixture writers for medrpn.data.io tests: a tiny HU volume with a non-trivial LPS geometry, written as NIfTI
(nibabel), MHD/MHA/NRRD (SimpleITK), a DICOM series (pydicom, one file per slice), an enhanced multi-frame DICOM
and a 2D DX image, all into ``tmp_path``.

Geometry conventions (what the loader must reproduce): ``lps`` is the 4x4 LPS voxel-index -> world-mm matrix whose
columns are the i (DICOM column index), j (row index) and k (slice index) steps and whose last column is the centre
of voxel (0, 0, 0); the expected loaded affine is ``diag(-1, -1, 1, 1) @ lps``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SHAPE = (6, 5, 4)  # (X, Y, Z)
SPACING = (0.7, 0.9, 2.5)  # mm along i, j, k
ORIGIN = (-120.5, 30.25, 15.0)  # LPS mm, centre of voxel (0, 0, 0)


def _rotation(z_deg: float, x_deg: float) -> np.ndarray:
    a, b = np.deg2rad(z_deg), np.deg2rad(x_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    return rz @ rx


DIRECTIONS: dict[str, np.ndarray] = {
    # columns: LPS directions of the i, j, k axes (right-handed, so DICOM can represent them)
    "oblique": _rotation(20.0, 15.0),
    # i towards patient Right, j towards Posterior, k towards Inferior: slices stacked head -> feet
    "flipped": np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]),
}


@dataclass(frozen=True)
class Geometry:
    """A voxel grid in LPS space."""

    name: str
    direction: np.ndarray  # (3, 3), columns = i, j, k directions (LPS)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    shape: tuple[int, int, int]

    @property
    def lps(self) -> np.ndarray:
        affine = np.eye(4)
        affine[:3, :3] = self.direction @ np.diag(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    @property
    def ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.lps


def make_volume(shape: Sequence[int] = SHAPE) -> np.ndarray:
    """A float32 HU volume ``(X, Y, Z)`` with a unique, even value per voxel in [-1000, ...)."""
    x, y, z = shape
    index = np.arange(x * y * z).reshape((z, y, x)).T  # i fastest
    return (-1000.0 + 10.0 * index).astype(np.float32)


@pytest.fixture(params=sorted(DIRECTIONS))
def geometry(request: pytest.FixtureRequest) -> Geometry:
    """The test geometry, once per direction ("flipped", "oblique")."""
    return Geometry(request.param, DIRECTIONS[request.param], SPACING, ORIGIN, SHAPE)


@pytest.fixture
def volume() -> np.ndarray:
    """The HU volume ``(X, Y, Z)`` used by every writer."""
    return make_volume()


# ---------------------------------------------------------------------------------------------------------------
# NIfTI / ITK writers
# ---------------------------------------------------------------------------------------------------------------
def write_nifti(path: Path, array: np.ndarray, ras_affine: np.ndarray) -> Path:
    """Write ``array`` (any shape) with ``ras_affine`` as NIfTI-1 (sform and qform set)."""
    image = nib.Nifti1Image(np.asarray(array), ras_affine)
    image.set_qform(ras_affine, code=1)
    image.set_sform(ras_affine, code=1)
    nib.save(image, str(path))
    return path


def write_itk(path: Path, array: np.ndarray, geometry: Geometry) -> Path:
    """Write ``array`` ``(X, Y, Z)`` with ``geometry`` via SimpleITK (format from the suffix)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))
    image.SetSpacing([float(s) for s in geometry.spacing])
    image.SetOrigin([float(o) for o in geometry.origin])
    image.SetDirection([float(d) for d in geometry.direction.flatten()])
    sitk.WriteImage(image, str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# DICOM writers
# ---------------------------------------------------------------------------------------------------------------
def _base_dataset(sop_class: str, modality: str, series_uid: str, study_uid: str, for_uid: str) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.Modality = modality
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "SECRET-ID-42"
    ds.SeriesNumber = 3
    ds.SeriesDescription = "test series"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _ds_str(values: Sequence[float]) -> list[str]:
    return [f"{float(v):.10g}" for v in values]


@dataclass
class DicomSeries:
    """A written series: folder, files in slice order k = 0..Z-1, UIDs."""

    folder: Path
    files_by_k: list[Path]
    series_uid: str
    study_uid: str
    sop_uids_by_k: list[str]


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    geometry: Geometry,
    *,
    slopes: Sequence[float] | None = None,
    intercepts: Sequence[float] | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    skip_k: Sequence[int] = (),
    iop_override: dict[int, Sequence[float]] | None = None,
    ipp_shift_per_slice: Sequence[float] = (0.0, 0.0, 0.0),
    image_type: dict[int, list[str]] | None = None,
    seed: int = 0,
    prefix: str = "",
) -> DicomSeries:
    """Write one file per slice, in *descending* k order, with shuffled file names and reversed InstanceNumbers.

    ``slopes``/``intercepts`` are per slice (default 1/-1024); stored = (HU - intercept) / slope as int16.
    """
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = volume.shape
    slopes = list(slopes) if slopes is not None else [1.0] * nz
    intercepts = list(intercepts) if intercepts is not None else [-1024.0] * nz
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    for_uid = generate_uid()
    lps = geometry.lps
    row_dir = geometry.direction[:, 0]
    col_dir = geometry.direction[:, 1]
    names = [f"{prefix}IM{n:04d}" + (".dcm" if n % 2 else "") for n in random.Random(seed).sample(range(1000), nz)]
    files: dict[int, Path] = {}
    sops: dict[int, str] = {}
    for k in reversed(range(nz)):
        if k in skip_k:
            continue
        ds = _base_dataset(CT_IMAGE_STORAGE, "CT", series_uid, study_uid, for_uid)
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = _ds_str([geometry.spacing[1], geometry.spacing[0]])  # [row spacing (j), column spacing (i)]
        iop = list(row_dir) + list(col_dir)
        if iop_override and k in iop_override:
            iop = list(iop_override[k])
        ds.ImageOrientationPatient = _ds_str(iop)
        ipp = lps[:3, 3] + lps[:3, 2] * k + np.asarray(ipp_shift_per_slice) * k
        ds.ImagePositionPatient = _ds_str(ipp)
        ds.SliceThickness = f"{geometry.spacing[2]:g}"
        ds.InstanceNumber = nz - k  # deliberately reversed
        if image_type and k in image_type:
            ds.ImageType = image_type[k]
        ds.RescaleSlope = f"{slopes[k]:g}"
        ds.RescaleIntercept = f"{intercepts[k]:g}"
        stored = np.round((volume[:, :, k].astype(np.float64) - intercepts[k]) / slopes[k]).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(stored.T).tobytes()  # (Rows, Columns) = (j, i)
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        files[k] = path
        sops[k] = str(ds.SOPInstanceUID)
    ks = sorted(files)
    return DicomSeries(folder, [files[k] for k in ks], series_uid, study_uid, [sops[k] for k in ks])


def write_multiframe(path: Path, volume: np.ndarray, geometry: Geometry, *, seed: int = 1) -> list[int]:
    """Write an Enhanced CT multi-frame instance whose frames are stored in shuffled slice order.

    Returns:
        ``frame_of_k``: the 1-based frame number holding slice k.
    """
    nx, ny, nz = volume.shape
    order = random.Random(seed).sample(range(nz), nz)  # frame f (0-based) holds slice order[f]
    ds = _base_dataset(ENHANCED_CT_IMAGE_STORAGE, "CT", generate_uid(), generate_uid(), generate_uid())
    ds.Rows, ds.Columns = ny, nx
    ds.NumberOfFrames = nz
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = _ds_str([geometry.spacing[1], geometry.spacing[0]])
    measures.SliceThickness = f"{geometry.spacing[2]:g}"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = _ds_str(list(geometry.direction[:, 0]) + list(geometry.direction[:, 1]))
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    frames = []
    for f, k in enumerate(order):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = _ds_str(geometry.lps[:3, 3] + geometry.lps[:3, 2] * k)
        item.PlanePositionSequence = DicomSequence([position])
        transform = Dataset()
        slope, intercept = (2.0, -1000.0) if f % 2 else (1.0, -1024.0)
        transform.RescaleSlope = f"{slope:g}"
        transform.RescaleIntercept = f"{intercept:g}"
        transform.RescaleType = "HU"
        item.PixelValueTransformationSequence = DicomSequence([transform])
        per_frame.append(item)
        stored = np.round((volume[:, :, k].astype(np.float64) - intercept) / slope).astype(np.int16)
        frames.append(np.ascontiguousarray(stored.T))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    frame_of_k = [0] * nz
    for f, k in enumerate(order):
        frame_of_k[k] = f + 1
    return frame_of_k


def write_dx(
    path: Path,
    image: np.ndarray,
    *,
    pixel_spacing: tuple[float, float] = (0.15, 0.2),
    slope: float = 1.0,
    intercept: float = 0.0,
    sop_class: str = DX_IMAGE_STORAGE,
    modality: str = "DX",
    series_uid: str | None = None,
) -> Dataset:
    """Write a 2D single-frame projection image; ``image`` is ``(X, Y)`` = (columns, rows) in output units."""
    nx, ny = image.shape
    ds = _base_dataset(sop_class, modality, series_uid or generate_uid(), generate_uid(), generate_uid())
    del ds.FrameOfReferenceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = ny, nx
    ds.ImagerPixelSpacing = _ds_str(pixel_spacing)
    ds.PixelSpacing = _ds_str(pixel_spacing)
    ds.PixelRepresentation = 0
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    stored = np.round((image.astype(np.float64) - intercept) / slope).astype(np.uint16)
    ds.PixelData = np.ascontiguousarray(stored.T).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def truncate(path: Path, fraction: float = 0.5, destination: Path | None = None) -> Path:
    """Keep only the first ``fraction`` of the bytes of ``path`` (in place, or into ``destination``)."""
    data = path.read_bytes()
    target = destination or path
    target.write_bytes(data[: int(len(data) * fraction)])
    return target
