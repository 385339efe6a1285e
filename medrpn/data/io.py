"""Finding and loading scans: DICOM series/files, NIfTI, MetaImage (MHD/MHA) and NRRD.

Two entry points:

- :func:`discover_scans` walks files/folders, recognises NIfTI/MHD/MHA/NRRD files by suffix and DICOM files by
  content (headers only), groups DICOM instances into series and returns a :class:`DiscoveryResult`: the scans
  found (:class:`ScanSource`), the files that could not be read (``problems``, as
  :class:`~medrpn.data.errors.ScanError`) and the files deliberately left out (``skipped``: text files, SR/SEG
  objects, localizers...). It never raises for one bad file.
- :func:`load_scan` loads one scan (a :class:`ScanSource`, a folder holding exactly one series, or a file) into a
  channel-first float32 :class:`monai.data.MetaTensor`: ``(1, X, Y, Z)`` for volumes, ``(1, X, Y)`` for 2D images
  (CR/DX, a single CT/MR slice), with ``.affine`` the 4x4 **RAS** voxel-index -> world-mm matrix exactly as MONAI's
  ``NibabelReader`` gives it (the centre of voxel ``(i, j, k)`` is at ``affine @ [i, j, k, 1]``; for 2D images the
  third column is the slice normal, so ``k = 0``).

Index conventions for DICOM: ``i`` = column index, ``j`` = row index (so the array is ``pixel_array.T``), ``k`` =
slice index ordered along the slice normal ``n = row_direction x column_direction`` (ImageOrientationPatient), by
the ImagePositionPatient projected on ``n`` (never by file name or InstanceNumber). The LPS affine is
``[row_dir * PixelSpacing[1], col_dir * PixelSpacing[0], step, IPP_0]`` and the RAS affine is
``diag(-1, -1, 1, 1) @ LPS``; hence a DICOM series gives the same array and affine as nibabel gives for a NIfTI
written from the same data and geometry. For a gantry-tilted CT the slice step is not parallel to ``n``: the
affine is then sheared (exact, non-orthogonal) and a warning is logged.

Metadata set on every loaded MetaTensor (all JSON-serialisable; the same keys for every format so that MONAI's
collate sees uniform dicts):

- ``filename_or_obj``: the file, or for a DICOM series the folder holding its slices (``str``).
- ``scan_id``: SeriesInstanceUID for DICOM (the :class:`ScanSource` id when one was given), else the file stem.
- ``source_format``: ``"dicom" | "nifti" | "mhd" | "mha" | "nrrd"``.
- ``modality``: DICOM Modality (MHD ``Modality`` mapped to CT/MR/PT/US when present), else ``"unknown"``.
- ``spacing``: per spatial axis, mm (the affine's column norms; for DICOM series the measured slice step).
- ``original_affine``: the RAS affine as a nested list; ``affine`` itself lives in ``MetaTensor.affine``.
- ``space``: ``"RAS"``; ``spatial_shape``: list of ints; ``original_channel_dim``: ``"no_channel"``.
- ``series_uid``, ``study_uid``, ``frame_of_reference_uid``: DICOM UIDs (``""`` for other formats).
- ``sop_instance_uids``: SOPInstanceUID of the instance holding each slice, in array order ``k = 0..Z-1``
  (one entry for a 2D image; a multi-frame instance repeats its UID); ``[]`` for other formats.
- ``frame_numbers``: 1-based frame number inside that instance for each ``k`` (all 1 for single-frame instances;
  use as ReferencedFrameNumber only for multi-frame instances); ``[]`` for other formats.
- ``source_files``: the file holding each slice, in array order (DICOM), else ``[path]`` (plus the MHD data file).
- ``sop_class_uid`` and ``photometric_interpretation`` (DICOM, ``""`` otherwise). MONOCHROME1 images (some CR/DX)
  are **not** inverted: the values are the stored values after the modality LUT.

The per-slice lists (:data:`PER_SLICE_META_KEYS`) have a scan-dependent length, so MONAI's default collate
(``list_data_collate``) cannot batch them across scans: drop them from ``meta`` (keep them per case, e.g. for SEG/SR
export) before batching. ``spacing``/``original_affine`` describe the image as loaded; after resampling use
``MetaTensor.affine``/``pixdim``.

No patient identifier (PatientName, PatientID, birth date...) is ever read into metadata or logs.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813
import torch
from monai.data import ImageReader, MetaTensor, NibabelReader
from monai.transforms import LoadImage
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple
from pydicom.dataset import Dataset
from pydicom.uid import UID, UID_dictionary

from medrpn.data.errors import (
    CorruptScanError,
    EmptyInputError,
    InvalidImageError,
    MixedSeriesError,
    ScanError,
    ScanNotFoundError,
    SeriesGeometryError,
    UnsupportedFormatError,
)

__all__ = [
    "DICOM_SUFFIXES",
    "ITK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "PER_SLICE_META_KEYS",
    "DiscoveryResult",
    "ScanKind",
    "ScanSource",
    "SimpleITKReader",
    "SkippedFile",
    "discover_scans",
    "load_scan",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
"""Suffixes loaded with MONAI's ``NibabelReader`` (matched case-insensitively)."""
ITK_SUFFIXES: tuple[str, ...] = (".mhd", ".mha", ".nrrd")
"""Suffixes loaded with :class:`SimpleITKReader` (matched case-insensitively)."""
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".dic", ".ima", ".dc3")
"""Suffixes that make a file that is not valid DICOM a *problem* rather than a silently skipped file."""

PER_SLICE_META_KEYS: tuple[str, ...] = ("sop_instance_uids", "frame_numbers", "source_files")
"""Meta keys holding one entry per slice (length varies between scans; not collatable by MONAI's default collate)."""

_FORMAT_BY_SUFFIX: dict[str, str] = {".nii.gz": "nifti", ".nii": "nifti", ".mhd": "mhd", ".mha": "mha", ".nrrd": "nrrd"}
_FORMAT_NAMES: dict[str, str] = {"nifti": "NIfTI", "mhd": "MetaImage (.mhd)", "mha": "MetaImage (.mha)", "nrrd": "NRRD"}
_MHD_MODALITIES: dict[str, str] = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_PET": "PT", "MET_MOD_US": "US"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_IOP_TOLERANCE = 1e-3  # max abs difference between direction cosines treated as "the same orientation"
_SPACING_ABS_TOL = 0.01  # mm
_SPACING_REL_TOL = 0.01  # fraction of the expected slice spacing
_MAJORITY_FRACTION = 0.8  # a series "of mostly one orientation": at least this fraction shares it

ScanKind = Literal["dicom_series", "dicom_file", "file"]


# --------------------------------------------------------------------------------------------------------------
# Public data structures
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanSource:
    """One loadable scan found by :func:`discover_scans`.

    Attributes:
        kind: ``"dicom_series"`` (several single-frame instances stacked into a volume), ``"dicom_file"`` (one
            instance: a 2D single-frame image such as CR/DX, or a multi-frame enhanced CT/MR volume) or ``"file"``
            (NIfTI / MHD / MHA / NRRD).
        scan_id: SeriesInstanceUID for DICOM (suffixed ``_<n>`` when one series holds several separately loaded
            instances, e.g. two DX views), the file stem otherwise (``"ct"`` for ``ct.nii.gz``).
        paths: the files of the scan; for a DICOM series sorted along the slice normal, for an ``.mhd`` the header
            first then its data file.
        description: human-readable summary (modality, SeriesDescription, size); no patient identifiers.
        modality: DICOM Modality, ``"unknown"`` for other formats.
        source_format: ``"dicom" | "nifti" | "mhd" | "mha" | "nrrd"``.
        series_uid: SeriesInstanceUID (``""`` for non-DICOM).
    """

    kind: ScanKind
    scan_id: str
    paths: tuple[Path, ...]
    description: str = ""
    modality: str = "unknown"
    source_format: str = "dicom"
    series_uid: str = ""


@dataclass(frozen=True)
class SkippedFile:
    """A file deliberately left out during discovery (not an error).

    Attributes:
        path: the file.
        reason: why it was left out (not an image, non-image DICOM object, localizer, duplicate instance, ...).
    """

    path: Path
    reason: str


@dataclass
class DiscoveryResult:
    """What :func:`discover_scans` found.

    Attributes:
        scans: loadable scans, in the order their first file was met during the (sorted) walk.
        problems: one :class:`~medrpn.data.errors.ScanError` per file or path that could not be read, with reasons.
        skipped: files left out on purpose (non-image files, SR/SEG/PR objects, localizers, duplicates).
    """

    scans: list[ScanSource] = field(default_factory=list)
    problems: list[ScanError] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def summary(self) -> str:
        """Return a multi-line, log-friendly summary (no patient identifiers).

        Returns:
            One line per scan and per problem, preceded by a count line.
        """
        lines = [f"{len(self.scans)} scan(s), {len(self.problems)} problem(s), {len(self.skipped)} skipped file(s)"]
        lines += [f"  scan {s.scan_id} [{s.kind}]: {s.description}" for s in self.scans]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# SimpleITK-backed MONAI reader
# --------------------------------------------------------------------------------------------------------------
class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` backed by SimpleITK, for ``.mhd``/``.mha``/``.nrrd``/``.nii``/``.nii.gz`` files.

    Why: MONAI's own ``ITKReader`` needs the heavy ``itk`` package (hundreds of MB of wrapped C++), while SimpleITK
    is a medrpn dependency anyway. This reader mirrors ``ITKReader``'s output: the array is transposed from
    SimpleITK's ``(z, y, x)`` to ``(x, y, z)`` (``(x, y, z, C)`` for vector pixels) and the metadata holds
    ``affine``/``original_affine`` (ITK's LPS direction/spacing/origin converted to RAS, like ``NibabelReader``),
    ``spatial_shape``, ``spacing``, ``space``, ``original_channel_dim`` and the image's string metadata (keys not
    starting with ``ITK_``). One deliberate difference: the affine is always 4x4 (a 2D image is embedded at
    ``k = 0`` with a unit third axis), matching ``NibabelReader`` and the medrpn convention.

    Usable as ``monai.transforms.LoadImage(reader=SimpleITKReader())``.

    Args:
        channel_dim: the channel dimension of the input image (sets ``original_channel_dim``). ``None``: no channel
            for scalar images, ``-1`` for vector images (like ``ITKReader``).
        reverse_indexing: keep SimpleITK's ``(z, y, x)`` array order (the metadata is unaffected), like ITKReader.
        affine_lps_to_ras: convert the affine from ITK's LPS to RAS (default ``True``, consistent with
            ``NibabelReader``); ``False`` keeps the LPS affine and sets ``space`` to ``"LPS"``.
        kwargs: extra arguments for ``SimpleITK.ReadImage`` (e.g. ``outputPixelType``).
    """

    suffixes: tuple[str, ...] = (*ITK_SUFFIXES, *NIFTI_SUFFIXES)

    def __init__(
        self,
        channel_dim: str | int | None = None,
        reverse_indexing: bool = False,
        affine_lps_to_ras: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.kwargs = kwargs
        self.channel_dim: float | int | str | None = float("nan") if channel_dim == "no_channel" else channel_dim
        self.reverse_indexing = reverse_indexing
        self.affine_lps_to_ras = affine_lps_to_ras

    def verify_suffix(self, filename: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> bool:
        """Return whether every given file name ends with a supported suffix (case-insensitive).

        Args:
            filename: a file name or a sequence of file names.

        Returns:
            ``True`` if all names end with one of :attr:`suffixes`.
        """
        names = ensure_tuple(filename)
        return len(names) > 0 and all(str(name).lower().endswith(self.suffixes) for name in names)

    def read(
        self, data: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], **kwargs: Any
    ) -> sitk.Image | list[sitk.Image]:
        """Read one or several image files with ``SimpleITK.ReadImage``.

        Args:
            data: a file name or a sequence of file names (stacked as channels by :meth:`get_data`).
            kwargs: extra ``SimpleITK.ReadImage`` arguments, overriding the constructor's.

        Returns:
            A ``SimpleITK.Image`` or, for several names, a list of them.

        Raises:
            ValueError: a directory was given (use :func:`load_scan` for DICOM folders).
            RuntimeError: SimpleITK could not read a file.
        """
        kwargs_ = {**self.kwargs, **kwargs}
        names = ensure_tuple(data)
        images = []
        for name in names:
            if Path(name).is_dir():
                raise ValueError(f"{name}: SimpleITKReader reads files, not folders (use medrpn.data.io.load_scan)")
            images.append(sitk.ReadImage(str(name), **kwargs_))
        return images if len(names) > 1 else images[0]

    def get_data(self, img: sitk.Image | Sequence[sitk.Image]) -> tuple[np.ndarray, dict[str, Any]]:
        """Extract the array and metadata from image(s) returned by :meth:`read`.

        Args:
            img: a ``SimpleITK.Image`` or a sequence of them (stacked on a new first axis, or concatenated along
                ``original_channel_dim`` when that is set; affines and shapes must agree).

        Returns:
            ``(array, meta)``: array ``(X, Y[, Z])`` for scalar images, ``(X, Y[, Z], C)`` for vector images
            (reversed order with ``reverse_indexing``), ``(N, ...)`` when several images were read; ``meta`` with
            ``affine``, ``original_affine`` (4x4 float64), ``spatial_shape``, ``spacing``, ``space``,
            ``original_channel_dim`` and the image's own string metadata.
        """
        arrays: list[np.ndarray] = []
        merged: dict[str, Any] = {}
        images = [img] if isinstance(img, sitk.Image) else list(img)  # not ensure_tuple: an Image is iterable
        for image in images:
            data = self._get_array_data(image)
            header = self._get_meta_dict(image)
            header[MetaKeys.ORIGINAL_AFFINE] = self._get_affine(image)
            header[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPATIAL_SHAPE] = self._get_spatial_shape(image)
            if self.channel_dim is None:
                n_spatial = len(header[MetaKeys.SPATIAL_SHAPE])
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if data.ndim == n_spatial else -1
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            _merge_compatible_meta(header, merged)
            arrays.append(data)
        return _stack_arrays(arrays, merged), merged

    @staticmethod
    def _get_meta_dict(image: sitk.Image) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for key in image.GetMetaDataKeys():
            if not key.startswith("ITK_"):
                meta[key] = image.GetMetaData(key)
        meta["spacing"] = np.asarray(image.GetSpacing(), dtype=np.float64)
        return meta

    def _get_affine(self, image: sitk.Image) -> np.ndarray:
        dim = image.GetDimension()
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
        spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
        origin = np.asarray(image.GetOrigin(), dtype=np.float64)
        sr = min(dim, 3)
        affine = np.eye(4)
        affine[:sr, :sr] = direction[:sr, :sr] @ np.diag(spacing[:sr])
        affine[:sr, 3] = origin[:sr]
        return _LPS_TO_RAS @ affine if self.affine_lps_to_ras else affine

    def _get_spatial_shape(self, image: sitk.Image) -> np.ndarray:
        size = list(image.GetSize())
        sr = max(min(image.GetDimension(), 3), 1)
        if isinstance(self.channel_dim, int):
            size.pop(self.channel_dim)
        return np.asarray(size[:sr])

    def _get_array_data(self, image: sitk.Image) -> np.ndarray:
        array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, C)
        if image.GetNumberOfComponentsPerPixel() == 1:
            return array if self.reverse_indexing else array.T
        return array if self.reverse_indexing else np.moveaxis(array.T, 0, -1)


def _merge_compatible_meta(header: dict[str, Any], merged: dict[str, Any]) -> None:
    """Copy ``header`` into an empty ``merged`` dict, or check that affines/shapes agree (like MONAI's readers)."""
    if not merged:
        merged.update(header)
        return
    for key in (MetaKeys.AFFINE, MetaKeys.SPATIAL_SHAPE):
        if not np.allclose(header[key], merged[key]):
            raise RuntimeError(f"{key} of all images must be the same for channel-wise stacking")


def _stack_arrays(arrays: list[np.ndarray], meta: dict[str, Any]) -> np.ndarray:
    """Stack several arrays like MONAI's readers: concatenate along a channel dim, or stack on a new first axis."""
    if len(arrays) == 1:
        return arrays[0]
    channel_dim = meta.get(MetaKeys.ORIGINAL_CHANNEL_DIM)
    if isinstance(channel_dim, int) and not isinstance(channel_dim, bool):
        return np.concatenate(arrays, axis=channel_dim)
    meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
    return np.stack(arrays, axis=0)


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------
def _format_of(path: Path) -> str | None:
    """Return the non-DICOM format recognised from the suffix (``"nifti"``, ``"mhd"``, ...) or ``None``."""
    name = path.name.lower()
    for suffix, fmt in _FORMAT_BY_SUFFIX.items():
        if name.endswith(suffix):
            return fmt
    return None


def _file_stem(path: Path) -> str:
    """``ct.nii.gz`` -> ``ct``; ``ct.mhd`` -> ``ct``."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *ITK_SUFFIXES, *DICOM_SUFFIXES):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return path.stem


def _mm(value: float) -> str:
    """Format a length for messages: at least one decimal, at most three (``5.0``, ``2.5``, ``0.625``)."""
    text = f"{value:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _vec(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _mhd_data_files(header: Path) -> list[Path]:
    """Data files an ``.mhd`` header claims: its ``ElementDataFile`` (or LIST) plus same-stem ``.raw``/``.zraw``."""
    claimed = [header.with_suffix(".raw"), header.with_suffix(".zraw")]
    try:
        with open(header, encoding="latin-1") as fh:
            lines = fh.read(1 << 16).splitlines()
    except OSError:
        return claimed
    for index, line in enumerate(lines):
        key, _, value = line.partition("=")
        if key.strip() != "ElementDataFile":
            continue
        value = value.strip()
        if value.upper().startswith("LIST"):
            claimed += [header.parent / name.strip() for name in lines[index + 1 :] if name.strip()]
        elif value and value.upper() != "LOCAL" and "%" not in value:
            claimed.insert(0, header.parent / value)
        break
    return claimed


def _mhd_primary_data_file(header: Path) -> Path | None:
    """The single data file named by an ``.mhd`` (``None`` for LOCAL/LIST/pattern headers)."""
    try:
        with open(header, encoding="latin-1") as fh:
            for line in fh.read(1 << 16).splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "ElementDataFile":
                    value = value.strip()
                    if value and value.upper() not in ("LOCAL",) and not value.upper().startswith("LIST"):
                        return None if "%" in value else header.parent / value
                    return None
    except OSError:
        return None
    return None


def _check_file_header(path: Path, fmt: str) -> None:
    """Cheap header-only readability check of a NIfTI/MHD/MHA/NRRD file (raises :class:`CorruptScanError`)."""
    try:
        if fmt == "nifti":
            import nibabel as nib

            nib.load(str(path))  # lazy: parses the header only
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
    except Exception as exc:
        raise CorruptScanError(path, f"unreadable {_FORMAT_NAMES[fmt]} header ({_describe_exception(exc)})") from exc
    if fmt == "mhd":
        data_file = _mhd_primary_data_file(path)
        if data_file is not None and not data_file.exists():
            raise CorruptScanError(path, f"the data file {data_file.name} named by ElementDataFile is missing")


# --------------------------------------------------------------------------------------------------------------
# DICOM header reading / classification
# --------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _DicomHeader:
    """A DICOM instance's header as read during discovery (no pixel data)."""

    path: Path
    ds: Dataset
    iop: np.ndarray | None  # (6,) row direction then column direction, or None
    ipp: np.ndarray | None  # (3,) or None

    @property
    def series_uid(self) -> str:
        return str(self.ds.get("SeriesInstanceUID", "") or "")

    @property
    def n_frames(self) -> int:
        return _number_of_frames(self.ds)


def _number_of_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _looks_like_raw_dicom(head: bytes) -> bool:
    """Whether a file without the 128-byte preamble starts like a DICOM data set (group 0002 or 0008 tag)."""
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be == 0x0008


def _has_dicom_suffix(path: Path) -> bool:
    return path.name.lower().endswith(DICOM_SUFFIXES)


def _read_dicom(path: Path, *, header_only: bool) -> tuple[Dataset, int, int] | None:
    """Read a DICOM file recognised by content.

    Args:
        path: the file.
        header_only: stop before the pixel data (discovery) instead of reading everything.

    Returns:
        ``(dataset, pixel_data_offset, file_size)`` (the offset is where the stop happened for ``header_only``,
        else the file size), or ``None`` when the file is not DICOM (no "DICM" marker and no SOPClassUID after a
        forced parse).

    Raises:
        CorruptScanError: the file carries the DICM marker (or a DICOM suffix) but cannot be parsed.
    """
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            head = fp.read(132)
            has_preamble = len(head) == 132 and head[128:132] == b"DICM"
            if not has_preamble and not _looks_like_raw_dicom(head):
                if _has_dicom_suffix(path):
                    raise CorruptScanError(
                        path, f"named like DICOM but not DICOM (no 'DICM' marker, {size} bytes; corrupt or truncated)"
                    )
                return None
            fp.seek(0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(fp, stop_before_pixels=header_only, force=not has_preamble)
                offset = fp.tell() if header_only else size
            except Exception as exc:
                if has_preamble or _has_dicom_suffix(path):
                    raise CorruptScanError(
                        path, f"DICOM header cannot be parsed ({_describe_exception(exc)}); corrupt or truncated"
                    ) from exc
                return None
    except OSError as exc:
        raise CorruptScanError(path, f"cannot read file ({_describe_exception(exc)})") from exc
    if "SOPClassUID" not in ds:
        if has_preamble or _has_dicom_suffix(path):
            raise CorruptScanError(path, "DICOM header has no SOPClassUID; corrupt or truncated")
        return None
    _ensure_transfer_syntax(ds)
    return ds, offset, size


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give preamble-less (raw) data sets the transfer syntax they were parsed with, so pixels can be decoded."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = True, True
    if implicit:
        syntax = pydicom.uid.ImplicitVRLittleEndian
    else:
        syntax = pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    if file_meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


def _sop_class_name(ds: Dataset) -> str:
    uid = UID(str(ds.get("SOPClassUID", "")))
    return uid.name if uid in UID_dictionary else f"SOP class {uid}"


def _is_known_non_image(ds: Dataset) -> bool:
    """Known SOP class that is not an image storage class (SR, KO, PR, SEG, RT*, DICOMDIR, ...)."""
    uid = UID(str(ds.get("SOPClassUID", "")))
    return uid in UID_dictionary and "Image Storage" not in uid.name


def _is_known_image(ds: Dataset) -> bool:
    uid = UID(str(ds.get("SOPClassUID", "")))
    return uid in UID_dictionary and "Image Storage" in uid.name


def _expected_pixel_bytes(ds: Dataset) -> int | None:
    try:
        bits = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.BitsAllocated)
            * _number_of_frames(ds)
        )
    except (AttributeError, TypeError, ValueError):
        return None
    return (bits + 7) // 8


def _check_pixel_length(path: Path, ds: Dataset, offset: int, size: int) -> None:
    """Detect truncated pixel data from the header alone (uncompressed transfer syntaxes only).

    Raises:
        CorruptScanError: no pixel data at all, or fewer bytes left in the file than Rows x Columns x frames needs.
    """
    if offset >= size:
        raise CorruptScanError(path, "image instance without pixel data (file truncated?)")
    ts = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    if ts.is_compressed or ts.is_deflated:
        return
    expected = _expected_pixel_bytes(ds)
    if expected is None:
        return
    element_header = 8 if ts.is_implicit_VR else 12
    available = size - offset - element_header
    if available < expected:
        raise CorruptScanError(
            path,
            f"truncated DICOM: pixel data needs {expected} bytes ({int(ds.Rows)}x{int(ds.Columns)}, "
            f"{_number_of_frames(ds)} frame(s), {int(ds.BitsAllocated)} bits) but only {max(available, 0)} remain",
        )


def _float_list(ds: Dataset | None, keyword: str, length: int, path: Path) -> np.ndarray | None:
    """A numeric multi-valued attribute as a float array, ``None`` if absent; malformed -> CorruptScanError."""
    if ds is None or keyword not in ds or ds[keyword].value is None or ds[keyword].VM == 0:
        return None
    try:
        values = np.asarray([float(v) for v in ensure_tuple(ds[keyword].value)], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CorruptScanError(path, f"malformed {keyword} {ds[keyword].value!r}") from exc
    if values.shape != (length,) or not np.all(np.isfinite(values)):
        raise CorruptScanError(path, f"malformed {keyword} {ds[keyword].value!r} (expected {length} numbers)")
    return values


def _header_geometry(ds: Dataset, path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """ImageOrientationPatient / ImagePositionPatient of a single-frame instance (top level or shared groups)."""
    iop = _float_list(ds, "ImageOrientationPatient", 6, path)
    ipp = _float_list(ds, "ImagePositionPatient", 3, path)
    return iop, ipp


def _classify_dicom(path: Path) -> _DicomHeader | SkippedFile | None:
    """Read a DICOM header and decide whether it is a loadable image instance.

    Returns:
        A :class:`_DicomHeader` for image instances, a :class:`SkippedFile` for non-image DICOM objects, ``None``
        for files that are not DICOM.

    Raises:
        CorruptScanError: DICOM that cannot be parsed, lacks mandatory image attributes or is truncated.
    """
    read = _read_dicom(path, header_only=True)
    if read is None:
        return None
    ds, offset, size = read
    has_pixels_module = "Rows" in ds and "Columns" in ds
    if _is_known_non_image(ds) or (not has_pixels_module and not _is_known_image(ds)):
        return SkippedFile(path, f"non-image DICOM object ({_sop_class_name(ds)})")
    if not has_pixels_module:
        raise CorruptScanError(path, f"{_sop_class_name(ds)} without Rows/Columns (header truncated?)")
    _check_pixel_length(path, ds, offset, size)
    iop, ipp = _header_geometry(ds, path)
    return _DicomHeader(path=path, ds=ds, iop=iop, ipp=ipp)


# --------------------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------------------
def _walk(folder: Path, recursive: bool, problems: list[ScanError]) -> list[Path]:
    files: list[Path] = []
    if not recursive:
        try:
            return sorted(p for p in folder.iterdir() if p.is_file())
        except OSError as exc:
            problems.append(CorruptScanError(folder, f"cannot list folder ({_describe_exception(exc)})"))
            return files

    def on_error(exc: OSError) -> None:
        problems.append(CorruptScanError(exc.filename or folder, f"cannot list folder ({_describe_exception(exc)})"))

    for root, dirnames, filenames in os.walk(folder, onerror=on_error):
        dirnames.sort()
        files.extend(Path(root) / name for name in sorted(filenames))
    return files


def _cluster_orientations(iops: Sequence[np.ndarray]) -> list[list[int]]:
    """Group indices of (6,) orientation vectors that agree within ``_IOP_TOLERANCE``; largest group first."""
    groups: list[tuple[np.ndarray, list[int]]] = []
    for index, iop in enumerate(iops):
        for reference, members in groups:
            if float(np.max(np.abs(iop - reference))) <= _IOP_TOLERANCE:
                members.append(index)
                break
        else:
            groups.append((iop, [index]))
    return sorted((members for _, members in groups), key=len, reverse=True)


def _normal(iop: np.ndarray) -> np.ndarray:
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    return normal / norm if norm > 0 else normal


def _is_localizer(ds: Dataset) -> bool:
    image_type = ds.get("ImageType")
    if image_type is None:
        return False
    return any("LOCALIZER" in str(value).upper() for value in ensure_tuple(image_type))


def _series_description(headers: Sequence[_DicomHeader], kind: str) -> str:
    ds = headers[0].ds
    modality = str(ds.get("Modality", "") or "unknown")
    text = f"{modality} {_sop_class_name(ds)}"
    if ds.get("SeriesNumber") is not None:
        text += f", series #{ds.SeriesNumber}"
    if ds.get("SeriesDescription"):
        text += f" '{ds.SeriesDescription}'"
    size = f"{int(ds.Columns)}x{int(ds.Rows)}"
    if kind == "dicom_series":
        text += f", {len(headers)} slices of {size}"
    elif headers[0].n_frames > 1:
        text += f", {headers[0].n_frames} frames of {size}"
    else:
        text += f", 2D {size}"
    return text


def _group_dicom(headers: list[_DicomHeader], skipped: list[SkippedFile]) -> list[tuple[Path, ScanSource]]:
    """Group image instances into scans. Returns ``(first path met, scan)`` pairs for ordering."""
    seen_sop: dict[str, Path] = {}
    series: dict[str, list[_DicomHeader]] = {}
    for header in headers:
        sop = str(header.ds.get("SOPInstanceUID", "") or "")
        if sop and sop in seen_sop:
            skipped.append(SkippedFile(header.path, f"duplicate of {seen_sop[sop]} (same SOPInstanceUID)"))
            continue
        if sop:
            seen_sop[sop] = header.path
        if _is_localizer(header.ds):
            skipped.append(SkippedFile(header.path, "localizer (ImageType contains LOCALIZER)"))
            continue
        key = header.series_uid or f"no-series-uid:{header.path}"
        series.setdefault(key, []).append(header)

    out: list[tuple[Path, ScanSource]] = []
    for members in series.values():
        first_path = members[0].path
        series_uid = members[0].series_uid
        modality = str(members[0].ds.get("Modality", "") or "unknown")
        stackable = [h for h in members if h.n_frames == 1 and h.iop is not None and h.ipp is not None]
        singles = [h for h in members if h not in stackable]
        if len(stackable) > 1:
            clusters = _cluster_orientations([h.iop for h in stackable if h.iop is not None])
            majority = clusters[0]
            if len(clusters) > 1 and len(majority) >= 2 and len(majority) >= _MAJORITY_FRACTION * len(stackable):
                keep = set(majority)
                reference = stackable[majority[0]].iop
                assert reference is not None
                for index, header in enumerate(stackable):
                    if index not in keep:
                        assert header.iop is not None
                        reason = (
                            f"orientation {_vec(header.iop)} differs from the {len(majority)} of "
                            f"{len(stackable)} slices of series {series_uid} with {_vec(reference)} (localizer?)"
                        )
                        logger.warning("dropped %s: %s", header.path, reason)
                        skipped.append(SkippedFile(header.path, reason))
                stackable = [stackable[i] for i in sorted(keep)]
            if len(clusters) == 1 or len(stackable) == len(majority):
                assert stackable[0].iop is not None
                normal = _normal(stackable[0].iop)
                stackable.sort(key=lambda h: float(np.dot(h.ipp, normal)) if h.ipp is not None else 0.0)
        if len(stackable) == 1:
            singles.insert(0, stackable[0])
            stackable = []
        if stackable:
            scan_id = series_uid or str(stackable[0].ds.get("SOPInstanceUID", "") or _file_stem(first_path))
            source = ScanSource(
                kind="dicom_series",
                scan_id=scan_id,
                paths=tuple(h.path for h in stackable),
                description=_series_description(stackable, "dicom_series"),
                modality=modality,
                source_format="dicom",
                series_uid=series_uid,
            )
            out.append((first_path, source))
        singles.sort(key=lambda h: (_instance_number(h.ds), str(h.path)))
        for number, header in enumerate(singles, start=1):
            base = series_uid or str(header.ds.get("SOPInstanceUID", "") or _file_stem(header.path))
            scan_id = base if (len(singles) == 1 and not stackable) else f"{base}_{number}"
            source = ScanSource(
                kind="dicom_file",
                scan_id=scan_id,
                paths=(header.path,),
                description=_series_description([header], "dicom_file"),
                modality=modality,
                source_format="dicom",
                series_uid=series_uid,
            )
            out.append((header.path, source))
    return out


def _instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def discover_scans(
    paths: Sequence[Path | str] | Path | str,
    *,
    recursive: bool = True,
) -> DiscoveryResult:
    """Find every scan under the given files/folders, reading headers only.

    NIfTI/MHD/MHA/NRRD files are recognised by suffix (an ``.mhd`` claims its ``ElementDataFile`` and same-stem
    ``.raw``/``.zraw``), DICOM files by content (128-byte preamble + ``DICM``, or a forced parse that yields a
    SOPClassUID for preamble-less files). DICOM image instances are grouped by SeriesInstanceUID (several series in
    one folder give several scans); duplicates (same SOPInstanceUID), localizers (ImageType LOCALIZER) and slices
    whose orientation differs from a >= 80 % majority of their series are dropped and listed in ``skipped``
    (the orientation outliers are also logged). Instances without ImagePositionPatient/ImageOrientationPatient
    (CR/DX/US...) and multi-frame instances become one ``"dicom_file"`` scan each; a series of single-frame slices
    with geometry becomes a ``"dicom_series"`` whose paths are sorted along the slice normal.

    Never raises for a bad file: unreadable, truncated or missing paths are returned in ``problems``.

    Args:
        paths: files and/or folders (a single path is accepted too).
        recursive: descend into sub-folders.

    Returns:
        The scans, the problems and the skipped files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    result = DiscoveryResult()
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            result.problems.append(ScanNotFoundError(path, "does not exist"))
        elif path.is_dir():
            files.extend(_walk(path, recursive, result.problems))
        else:
            files.append(path)

    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    files = list(unique.values())
    order = {path.resolve(): index for index, path in enumerate(files)}

    claimed: dict[Path, Path] = {}
    for path in files:
        if _format_of(path) == "mhd":
            for partner in _mhd_data_files(path):
                claimed.setdefault(partner.resolve(), path)

    found: list[tuple[Path, ScanSource]] = []
    dicom_headers: list[_DicomHeader] = []
    for path in files:
        if path.resolve() in claimed:
            continue
        fmt = _format_of(path)
        try:
            if fmt is not None:
                _check_file_header(path, fmt)
                members: tuple[Path, ...] = (path,)
                if fmt == "mhd":
                    data_file = _mhd_primary_data_file(path)
                    members = (path, data_file) if data_file is not None else (path,)
                source = ScanSource(
                    kind="file",
                    scan_id=_file_stem(path),
                    paths=members,
                    description=f"{_FORMAT_NAMES[fmt]} file {path.name}",
                    modality="unknown",
                    source_format=fmt,
                )
                found.append((path, source))
                continue
            classified = _classify_dicom(path)
        except ScanError as exc:
            result.problems.append(exc)
            continue
        except MemoryError:
            raise
        except Exception as exc:  # never let one odd file stop a discovery run
            result.problems.append(CorruptScanError(path, f"cannot be read ({_describe_exception(exc)})"))
            continue
        if classified is None:
            result.skipped.append(SkippedFile(path, "not a recognised image file"))
        elif isinstance(classified, SkippedFile):
            result.skipped.append(classified)
        else:
            dicom_headers.append(classified)

    found += _group_dicom(dicom_headers, result.skipped)
    found.sort(key=lambda item: order.get(item[0].resolve(), len(order)))
    result.scans = [source for _, source in found]
    return result


# --------------------------------------------------------------------------------------------------------------
# Loading: validation and metadata
# --------------------------------------------------------------------------------------------------------------
def _validate(array: torch.Tensor, path: str | Path, content: bool = True) -> None:
    """Reject zero-size, non-finite and constant images.

    Args:
        array: the image tensor, any shape.
        path: the file (or folder) named in the error.
        content: also check values (NaN/inf, constant); ``False`` checks only the size.

    Raises:
        InvalidImageError: zero-size, NaN/inf values, or a constant image.
    """
    shape = tuple(array.shape)
    if array.numel() == 0:
        raise InvalidImageError(path, f"zero-size image (array shape {shape})")
    if not content:
        return
    if array.is_floating_point():
        finite = torch.isfinite(array)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(array).sum())
            n_inf = int(torch.isinf(array).sum())
            raise InvalidImageError(
                path, f"image contains {n_nan} NaN and {n_inf} infinite value(s) out of {array.numel()} voxels"
            )
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise InvalidImageError(path, f"constant image: all {array.numel()} voxels equal {low:g} (shape {shape})")


def _base_meta(path: str | Path, scan_id: str, source_format: str, modality: str) -> dict[str, Any]:
    return {
        "filename_or_obj": str(path),
        "scan_id": scan_id,
        "source_format": source_format,
        "modality": modality or "unknown",
        "series_uid": "",
        "study_uid": "",
        "frame_of_reference_uid": "",
        "sop_instance_uids": [],
        "frame_numbers": [],
        "source_files": [str(path)],
        "sop_class_uid": "",
        "photometric_interpretation": "",
    }


def _finalize(
    array: torch.Tensor, affine_ras: np.ndarray, meta: dict[str, Any], path: str | Path, validate: bool = True
) -> MetaTensor:
    """Validate and wrap a channel-first array into a MetaTensor with the project's metadata keys.

    Args:
        array: ``(1, X, Y[, Z])`` tensor.
        affine_ras: ``(4, 4)`` RAS voxel -> world-mm matrix.
        meta: the format-specific keys (from :func:`_base_meta`, updated).
        path: named in validation errors.

    Returns:
        The float32 MetaTensor ``(1, X, Y[, Z])`` with ``.affine`` = ``affine_ras`` (float64).
    """
    _validate(array, path, content=validate)
    n_spatial = array.ndim - 1
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    meta = dict(meta)
    meta["spacing"] = [float(v) for v in np.linalg.norm(affine_ras[:3, :n_spatial], axis=0)]
    meta[MetaKeys.ORIGINAL_AFFINE] = affine_ras.tolist()
    meta[MetaKeys.SPACE] = str(SpaceKeys.RAS.value)
    meta[MetaKeys.SPATIAL_SHAPE] = [int(v) for v in array.shape[1:]]
    meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
    data = array.to(torch.float32).contiguous()
    return MetaTensor(data, affine=torch.as_tensor(affine_ras, dtype=torch.float64), meta=meta)


@functools.lru_cache(maxsize=1)
def _monai_loader() -> LoadImage:
    return LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)


def _load_with_monai(path: Path, fmt: str, scan_id: str | None, validate: bool) -> MetaTensor:
    """Load a NIfTI (``NibabelReader``) or MHD/MHA/NRRD (:class:`SimpleITKReader`) file."""
    reader: ImageReader = NibabelReader() if fmt == "nifti" else SimpleITKReader()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = _monai_loader()(str(path), reader=reader)
    except MemoryError:
        raise
    except Exception as exc:
        raise CorruptScanError(path, f"cannot read {_FORMAT_NAMES[fmt]} file ({_describe_exception(exc)})") from exc
    if not isinstance(image, MetaTensor):
        raise CorruptScanError(path, f"MONAI LoadImage returned {type(image).__name__}, not a MetaTensor")
    tensor = image.as_tensor()
    if tensor.numel() == 0:
        raise InvalidImageError(path, f"zero-size image (array shape {tuple(tensor.shape)})")
    if tensor.ndim not in (3, 4):
        raise UnsupportedFormatError(
            path, f"image with {tensor.ndim - 1} spatial dims (shape {tuple(tensor.shape)}); medrpn expects 2 or 3"
        )
    if tensor.shape[0] != 1:
        raise UnsupportedFormatError(
            path,
            f"image has {tensor.shape[0]} channels/time points (channel-first shape {tuple(tensor.shape)}); "
            "medrpn expects a single-channel image",
        )
    affine = np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)
    if affine.shape != (4, 4):  # defensive: MONAI readers give 4x4 for 3D; embed smaller affines
        full = np.eye(4)
        n = affine.shape[0] - 1
        full[:n, :n] = affine[:n, :n]
        full[:n, 3] = affine[:n, n]
        affine = full
    modality = "unknown"
    mhd_modality = image.meta.get("Modality")
    if isinstance(mhd_modality, str):
        modality = _MHD_MODALITIES.get(mhd_modality.strip(), "unknown")
    meta = _base_meta(path, scan_id or _file_stem(path), fmt, modality)
    if fmt == "mhd":
        data_file = _mhd_primary_data_file(path)
        if data_file is not None:
            meta["source_files"] = [str(path), str(data_file)]
    return _finalize(tensor, affine, meta, path, validate)


# --------------------------------------------------------------------------------------------------------------
# Loading: DICOM
# --------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Plane:
    """One 2D frame with its geometry and rescale, from a single-frame instance or one frame of a multi-frame one."""

    path: Path
    label: str  # for messages: file name, plus " frame N" for multi-frame
    iop: np.ndarray  # (6,)
    ipp: np.ndarray  # (3,)
    pixel_spacing: tuple[float, float]  # (row spacing = along j, column spacing = along i)
    rows: int
    cols: int
    slope: float
    intercept: float
    sop_uid: str
    frame_number: int  # 1-based
    pixels: Callable[[], np.ndarray]  # -> (rows, cols) stored values
    thickness: float | None = None


def _read_full_dicom(path: Path) -> Dataset:
    read = _read_dicom(path, header_only=False)
    if read is None:
        raise UnsupportedFormatError(
            path,
            f"unsupported file type: not NIfTI ({', '.join(NIFTI_SUFFIXES)}), MetaImage/NRRD "
            f"({', '.join(ITK_SUFFIXES)}) or DICOM (no 'DICM' marker, no DICOM header)",
        )
    ds = read[0]
    has_pixels_module = "Rows" in ds and "Columns" in ds
    if _is_known_non_image(ds) or (not has_pixels_module and not _is_known_image(ds)):
        raise UnsupportedFormatError(path, f"DICOM object without an image to load ({_sop_class_name(ds)})")
    if not has_pixels_module:
        raise CorruptScanError(path, f"{_sop_class_name(ds)} without Rows/Columns (header truncated?)")
    if not any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise CorruptScanError(path, "image instance without pixel data (file truncated?)")
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    expected = _expected_pixel_bytes(ds)
    if "PixelData" in ds and not ts.is_compressed and expected is not None:
        available = len(ds.PixelData or b"")
        if available < expected:
            raise CorruptScanError(
                path,
                f"truncated DICOM: pixel data needs {expected} bytes ({int(ds.Rows)}x{int(ds.Columns)}, "
                f"{_number_of_frames(ds)} frame(s), {int(ds.BitsAllocated)} bits) but only {available} are present",
            )
    return ds


def _decode_with_simpleitk(path: Path) -> np.ndarray:
    """Decode a single-frame DICOM with SimpleITK/GDCM (JPEG, JPEG 2000, RLE...). GDCM applies the rescale."""
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    return array.reshape(array.shape[-2:]) if array.ndim == 3 and array.shape[0] == 1 else array


def _decode_pixels(ds: Dataset, path: Path) -> tuple[np.ndarray, bool]:
    """Decode the pixel data of an instance.

    Returns:
        ``(array, already_rescaled)``: ``(rows, cols)`` or ``(frames, rows, cols)`` stored values, and whether the
        modality rescale was already applied (SimpleITK/GDCM fallback for compressed data pydicom cannot decode).

    Raises:
        UnsupportedFormatError: colour (SamplesPerPixel > 1) data.
        CorruptScanError: the pixel data cannot be decoded (truncated, missing decoder...).
    """
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise UnsupportedFormatError(
            path,
            f"colour image (SamplesPerPixel={samples}, {ds.get('PhotometricInterpretation', '?')}); "
            "medrpn expects greyscale",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array), False
    except MemoryError:
        raise
    except Exception as exc:
        ts = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
        if ts.is_compressed and _number_of_frames(ds) == 1:
            try:
                return _decode_with_simpleitk(path), True
            except Exception:
                pass
        raise CorruptScanError(
            path,
            f"cannot decode pixel data (truncated/corrupt, or transfer syntax {ts.name} needs a decoder "
            f"plugin): {_describe_exception(exc)}",
        ) from exc


def _rescale_of(item: Dataset | None, fallback: Dataset, path: Path) -> tuple[float, float]:
    """RescaleSlope/RescaleIntercept from ``item`` (a functional group) or ``fallback`` (top level); (1, 0) if none."""
    for source in (item, fallback):
        if source is not None and "RescaleSlope" in source and source.RescaleSlope is not None:
            try:
                slope = float(source.RescaleSlope)
                intercept = float(source.get("RescaleIntercept", 0.0) or 0.0)
            except (TypeError, ValueError) as exc:
                raise CorruptScanError(path, f"malformed RescaleSlope/RescaleIntercept ({exc})") from exc
            if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
                raise CorruptScanError(path, f"invalid RescaleSlope {slope} / RescaleIntercept {intercept}")
            return slope, intercept
    return 1.0, 0.0


def _pixel_spacing(ds: Dataset | None, fallback: Dataset, path: Path) -> tuple[float, float] | None:
    for source in (ds, fallback):
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            values = _float_list(source, keyword, 2, path)
            if values is not None:
                if np.any(values <= 0):
                    raise CorruptScanError(path, f"non-positive {keyword} {_vec(values)}")
                return float(values[0]), float(values[1])
    return None


def _thickness(ds: Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = ds.get(keyword)
        try:
            if value is not None and float(value) > 0:
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _functional_group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` for ``frame`` from PerFrame- or SharedFunctionalGroupsSequence."""
    for container, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(container)
        if groups is not None and len(groups) > index:
            value = groups[index].get(sequence)
            if value is not None and len(value) > 0:
                item: Dataset = value[0]
                return item
    return None


def _planes_of_single_frame(path: Path, ds: Dataset) -> _Plane:
    iop, ipp = _header_geometry(ds, path)
    if iop is None or ipp is None:
        named = (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop))
        missing = " and ".join(keyword for keyword, value in named if value is None)
        raise SeriesGeometryError(path, f"slice without {missing}; it cannot be placed in a volume")
    spacing = _pixel_spacing(None, ds, path)
    if spacing is None:
        raise CorruptScanError(path, "slice without PixelSpacing; it cannot be placed in a volume")
    slope, intercept = _rescale_of(None, ds, path)
    return _Plane(
        path=path,
        label=path.name,
        iop=iop,
        ipp=ipp,
        pixel_spacing=spacing,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        slope=slope,
        intercept=intercept,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        frame_number=1,
        pixels=functools.partial(_single_frame_pixels, ds, path),
        thickness=_thickness(ds),
    )


def _single_frame_pixels(ds: Dataset, path: Path) -> np.ndarray:
    array, rescaled = _decode_pixels(ds, path)
    if array.ndim != 2:
        raise CorruptScanError(path, f"expected one 2D frame, decoded an array of shape {array.shape}")
    if rescaled:  # the GDCM fallback already applied the rescale: undo it so _stack applies it uniformly
        slope, intercept = _rescale_of(None, ds, path)
        return (array.astype(np.float64) - intercept) / slope
    return array


def _check_orientation(iop: np.ndarray, where: Path, label: str) -> None:
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(np.dot(row, col)) > 1e-2:
        raise SeriesGeometryError(
            where, f"{label}: ImageOrientationPatient {_vec(iop)} is not two orthonormal direction cosines"
        )


def _stack_planes(planes: list[_Plane], where: Path) -> tuple[list[_Plane], np.ndarray]:
    """Sort planes along the slice normal, check the grid is regular and build the LPS affine.

    Args:
        planes: the frames of one series or one multi-frame instance (at least one).
        where: the folder/file named in errors.

    Returns:
        ``(sorted planes, lps_affine)`` with ``lps_affine`` the ``(4, 4)`` LPS voxel -> world-mm matrix.

    Raises:
        SeriesGeometryError: mixed orientations, differing sizes/pixel spacings, duplicate positions, missing
            slices / uneven spacing, or positions not on a line.
    """
    clusters = _cluster_orientations([p.iop for p in planes])
    if len(clusters) > 1:
        parts = [
            f"{len(members)} with {_vec(planes[members[0]].iop)} (e.g. {planes[members[0]].label})"
            for members in clusters[:3]
        ]
        raise SeriesGeometryError(
            where,
            f"mixed slice orientations (ImageOrientationPatient) in one series of {len(planes)} slices: "
            f"{'; '.join(parts)}{'; ...' if len(clusters) > 3 else ''}. Cannot stack them into one volume "
            "(localizer or several acquisitions in one series?)",
        )
    for attribute in ("rows", "cols", "pixel_spacing"):
        values = {getattr(p, attribute) for p in planes}
        if len(values) > 1:
            first = planes[0]
            other = next(p for p in planes if getattr(p, attribute) != getattr(first, attribute))
            name = {"rows": "Rows", "cols": "Columns", "pixel_spacing": "PixelSpacing"}[attribute]
            raise SeriesGeometryError(
                where,
                f"slices differ in {name}: {getattr(first, attribute)} ({first.label}) vs "
                f"{getattr(other, attribute)} ({other.label})",
            )
    iop = planes[0].iop
    _check_orientation(iop, where, planes[0].label)
    row_dir = iop[:3] / np.linalg.norm(iop[:3])
    col_dir = iop[3:] / np.linalg.norm(iop[3:])
    normal = _normal(iop)
    positions = np.asarray([float(np.dot(p.ipp, normal)) for p in planes])
    order = np.argsort(positions, kind="stable")
    planes = [planes[i] for i in order]
    z = positions[order]
    n = len(planes)
    if n >= 2:
        diffs = np.diff(z)
        duplicate = np.flatnonzero(diffs < _SPACING_ABS_TOL)
        if duplicate.size:
            i = int(duplicate[0])
            raise SeriesGeometryError(
                where,
                f"{duplicate.size} duplicated slice position(s) among {n} slices, first at z={_mm(z[i])} mm along "
                f"the slice normal ({planes[i].label}, {planes[i + 1].label}); the series may hold several "
                "acquisitions/echoes/phases or duplicated files",
            )
        expected = float(np.median(diffs)) if diffs.size >= 3 else float(np.min(diffs))
        tolerance = max(_SPACING_ABS_TOL, _SPACING_REL_TOL * expected)
        bad = np.flatnonzero(np.abs(diffs - expected) > tolerance)
        if bad.size:
            i = int(bad[0])
            gap = float(diffs[i])
            ratio = gap / expected
            if ratio > 1.5 and abs(ratio - round(ratio)) < 0.1:
                missing = round(ratio) - 1
                hint = f"{missing} missing slice{'s' if missing > 1 else ''}?"
            else:
                hint = "uneven slice spacing"
            raise SeriesGeometryError(
                where,
                f"slice gap of {_mm(gap)} mm between z={_mm(z[i])} and z={_mm(z[i + 1])} "
                f"({planes[i].label}, {planes[i + 1].label}), expected {_mm(expected)} mm ({hint}); "
                f"{bad.size} irregular gap(s) among {n} slices; z is the position in mm along the slice normal",
            )
        first_ipp, last_ipp = planes[0].ipp, planes[-1].ipp
        step = (last_ipp - first_ipp) / (n - 1)
        predicted = first_ipp[None, :] + np.arange(n)[:, None] * step[None, :]
        offsets = np.linalg.norm(np.stack([p.ipp for p in planes]) - predicted, axis=1)
        inplane_tol = max(_SPACING_ABS_TOL, 0.1 * min(planes[0].pixel_spacing))
        worst = int(np.argmax(offsets))
        if offsets[worst] > inplane_tol:
            raise SeriesGeometryError(
                where,
                f"slice positions are not on a straight line: {planes[worst].label} at "
                f"{_vec(planes[worst].ipp)} is {_mm(float(offsets[worst]))} mm off the line through the first and "
                f"last slices (variable table offset or tilt?)",
            )
        cos_tilt = float(np.clip(np.dot(step, normal) / np.linalg.norm(step), -1.0, 1.0))
        tilt = float(np.degrees(np.arccos(cos_tilt)))
        if tilt > 0.05:
            logger.warning(
                "%s: slices are sheared by %.2f degrees (gantry tilt); the affine is non-orthogonal", where, tilt
            )
    else:
        step = normal * (planes[0].thickness or 1.0)
    row_spacing, col_spacing = planes[0].pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i (column index) moves along the row direction
    lps[:3, 1] = col_dir * row_spacing  # j (row index) moves along the column direction
    lps[:3, 2] = step
    lps[:3, 3] = planes[0].ipp
    return planes, lps


def _assemble(planes: list[_Plane]) -> np.ndarray:
    """Decode and rescale the sorted planes into an ``(X, Y, Z)`` float32 array (X = Columns, Y = Rows)."""
    volume = np.empty((planes[0].cols, planes[0].rows, len(planes)), dtype=np.float32)
    for k, plane in enumerate(planes):
        pixels = plane.pixels()
        if pixels.shape != (plane.rows, plane.cols):
            raise CorruptScanError(
                plane.path, f"{plane.label}: decoded shape {pixels.shape}, header says {plane.rows}x{plane.cols}"
            )
        volume[:, :, k] = (pixels.astype(np.float64) * plane.slope + plane.intercept).T
    return volume


def _dicom_meta(ds: Dataset, path: Path, scan_id: str | None, planes: Sequence[_Plane] | None = None) -> dict[str, Any]:
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    meta = _base_meta(path, scan_id or series_uid or _file_stem(path), "dicom", str(ds.get("Modality", "") or ""))
    meta["series_uid"] = series_uid
    meta["study_uid"] = str(ds.get("StudyInstanceUID", "") or "")
    meta["frame_of_reference_uid"] = str(ds.get("FrameOfReferenceUID", "") or "")
    meta["sop_class_uid"] = str(ds.get("SOPClassUID", "") or "")
    meta["photometric_interpretation"] = str(ds.get("PhotometricInterpretation", "") or "")
    if planes is None:
        meta["sop_instance_uids"] = [str(ds.get("SOPInstanceUID", "") or "")]
        meta["frame_numbers"] = [1]
        meta["source_files"] = [str(path)]
    else:
        meta["sop_instance_uids"] = [p.sop_uid for p in planes]
        meta["frame_numbers"] = [p.frame_number for p in planes]
        meta["source_files"] = [str(p.path) for p in planes]
    return meta


def _load_dicom_series(paths: Sequence[Path], scan_id: str | None, validate: bool) -> MetaTensor:
    """Load single-frame instances of one series into ``(1, X, Y, Z)``."""
    paths = [Path(p) for p in paths]
    where = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path(".")
    datasets: list[Dataset] = []
    planes: list[_Plane] = []
    for path in paths:
        if not path.exists():
            raise ScanNotFoundError(path, "does not exist")
        ds = _read_full_dicom(path)
        if _number_of_frames(ds) > 1:
            raise UnsupportedFormatError(path, "multi-frame instance inside a multi-file series; load it on its own")
        datasets.append(ds)
        planes.append(_planes_of_single_frame(path, ds))
    series_uids = sorted({str(ds.get("SeriesInstanceUID", "") or "") for ds in datasets})
    if len(series_uids) > 1:
        raise MixedSeriesError(where, series_uids)
    planes, lps = _stack_planes(planes, where)
    volume = _assemble(planes)
    first_ds = datasets[paths.index(planes[0].path)]
    meta = _dicom_meta(first_ds, where, scan_id, planes)
    return _finalize(torch.from_numpy(volume)[None], _LPS_TO_RAS @ lps, meta, where, validate)


def _load_multiframe(path: Path, ds: Dataset, scan_id: str | None, validate: bool) -> MetaTensor:
    """Load an enhanced (multi-frame) CT/MR instance into ``(1, X, Y, Z)`` using its functional groups."""
    n_frames = _number_of_frames(ds)
    decoded: list[np.ndarray] = []

    def frame_pixels(index: int) -> np.ndarray:
        if not decoded:
            array, rescaled = _decode_pixels(ds, path)
            if rescaled or array.ndim != 3 or array.shape[0] != n_frames:
                raise CorruptScanError(
                    path, f"decoded pixel data of shape {array.shape}, expected ({n_frames}, {ds.Rows}, {ds.Columns})"
                )
            decoded.append(array)
        return decoded[0][index]

    planes: list[_Plane] = []
    for index in range(n_frames):
        position = _functional_group_item(ds, index, "PlanePositionSequence")
        orientation = _functional_group_item(ds, index, "PlaneOrientationSequence")
        ipp = _float_list(position, "ImagePositionPatient", 3, path)
        iop = _float_list(orientation, "ImageOrientationPatient", 6, path)
        if iop is None:
            iop = _float_list(ds, "ImageOrientationPatient", 6, path)
        if ipp is None or iop is None:
            raise UnsupportedFormatError(
                path,
                f"multi-frame instance ({n_frames} frames) without PlanePositionSequence/PlaneOrientationSequence for "
                f"frame {index + 1}; only enhanced multi-frame volumes with per-frame geometry are supported",
            )
        measures = _functional_group_item(ds, index, "PixelMeasuresSequence")
        spacing = _pixel_spacing(measures, ds, path)
        if spacing is None:
            raise CorruptScanError(path, f"frame {index + 1} has no PixelSpacing (PixelMeasuresSequence)")
        slope, intercept = _rescale_of(_functional_group_item(ds, index, "PixelValueTransformationSequence"), ds, path)
        thickness = None
        if measures is not None and measures.get("SliceThickness") is not None:
            thickness = float(measures.SliceThickness) or None
        planes.append(
            _Plane(
                path=path,
                label=f"{path.name} frame {index + 1}",
                iop=iop,
                ipp=ipp,
                pixel_spacing=spacing,
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                slope=slope,
                intercept=intercept,
                sop_uid=str(ds.get("SOPInstanceUID", "")),
                frame_number=index + 1,
                pixels=functools.partial(frame_pixels, index),
                thickness=thickness,
            )
        )
    planes, lps = _stack_planes(planes, path)
    volume = _assemble(planes)
    meta = _dicom_meta(ds, path, scan_id, planes)
    return _finalize(torch.from_numpy(volume)[None], _LPS_TO_RAS @ lps, meta, path, validate)


def _load_single_frame_2d(path: Path, ds: Dataset, scan_id: str | None, validate: bool) -> MetaTensor:
    """Load a single-frame instance (CR/DX, or one CT/MR slice) into ``(1, X, Y)``.

    With ImageOrientationPatient/ImagePositionPatient the affine places the slice in patient space (third column:
    the slice normal times SpacingBetweenSlices/SliceThickness, else 1 mm). Projection images (CR/DX) have no
    patient-space geometry: the LPS direction is the identity and the origin 0 (ITK's convention), spacing from
    PixelSpacing, else ImagerPixelSpacing, else 1 mm.
    """
    array, rescaled = _decode_pixels(ds, path)
    if array.ndim != 2:
        raise CorruptScanError(path, f"expected one 2D frame, decoded an array of shape {array.shape}")
    slope, intercept = (1.0, 0.0) if rescaled else _rescale_of(None, ds, path)
    if not rescaled and "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        from pydicom.pixels import apply_modality_lut

        image = np.asarray(apply_modality_lut(array, ds), dtype=np.float64)
    else:
        image = array.astype(np.float64) * slope + intercept
    spacing = _pixel_spacing(None, ds, path) or (1.0, 1.0)
    iop, ipp = _header_geometry(ds, path)
    lps = np.eye(4)
    if iop is not None and ipp is not None:
        _check_orientation(iop, path, path.name)
        lps[:3, 0] = iop[:3] / np.linalg.norm(iop[:3]) * spacing[1]
        lps[:3, 1] = iop[3:] / np.linalg.norm(iop[3:]) * spacing[0]
        lps[:3, 2] = _normal(iop) * (_thickness(ds) or 1.0)
        lps[:3, 3] = ipp
    else:
        lps[0, 0], lps[1, 1] = spacing[1], spacing[0]
    tensor = torch.from_numpy(np.ascontiguousarray(image.T, dtype=np.float32))[None]
    return _finalize(tensor, _LPS_TO_RAS @ lps, _dicom_meta(ds, path, scan_id), path, validate)


def _load_dicom_file(path: Path, scan_id: str | None, validate: bool) -> MetaTensor:
    ds = _read_full_dicom(path)
    if _number_of_frames(ds) > 1:
        return _load_multiframe(path, ds, scan_id, validate)
    return _load_single_frame_2d(path, ds, scan_id, validate)


# --------------------------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------------------------
def _load_file(path: Path, scan_id: str | None, validate: bool) -> MetaTensor:
    fmt = _format_of(path)
    if fmt is not None:
        return _load_with_monai(path, fmt, scan_id, validate)
    return _load_dicom_file(path, scan_id, validate)


def _load_folder(folder: Path, validate: bool) -> MetaTensor:
    found = discover_scans([folder], recursive=True)
    if len(found.scans) > 1:
        raise MixedSeriesError(folder, [s.scan_id for s in found.scans])
    if not found.scans:
        reason = "no readable scan found"
        if found.problems:
            reason += f"; {len(found.problems)} file(s) could not be read, first: {found.problems[0]}"
        elif found.skipped:
            reason += f" ({len(found.skipped)} non-image file(s) skipped)"
        else:
            reason += " (folder is empty)"
        raise EmptyInputError(folder, reason)
    if found.problems:  # a slice of the series may be among the unreadable files: refuse to load a partial scan
        raise found.problems[0]
    return _load_source(found.scans[0], validate)


def _load_source(source: ScanSource, validate: bool) -> MetaTensor:
    if not source.paths:
        raise EmptyInputError(source.scan_id, "ScanSource without paths")
    if source.kind == "dicom_series":
        return _load_dicom_series(source.paths, source.scan_id, validate)
    path = Path(source.paths[0])
    if not path.exists():
        raise ScanNotFoundError(path, "does not exist")
    if source.kind == "dicom_file":
        return _load_dicom_file(path, source.scan_id, validate)
    return _load_file(path, source.scan_id, validate)


def load_scan(source: ScanSource | Path | str, *, validate: bool = True) -> MetaTensor:
    """Load one scan into a channel-first float32 MetaTensor with a RAS affine.

    Accepts a :class:`ScanSource` from :func:`discover_scans`, a folder holding exactly one scan (typically one
    DICOM series; searched recursively), a single DICOM file (single-frame -> 2D, enhanced multi-frame -> volume),
    or a ``.nii``/``.nii.gz`` (MONAI ``LoadImage`` + ``NibabelReader``) / ``.mhd``/``.mha``/``.nrrd`` (``LoadImage``
    + :class:`SimpleITKReader`) file. DICOM pixel values get RescaleSlope/RescaleIntercept applied per slice/frame
    (HU for CT). See the module docstring for index/affine conventions and the metadata keys.

    Args:
        source: what to load.
        validate: reject NaN/inf and constant images (:class:`InvalidImageError`). Pass ``False`` for label masks,
            which may legitimately be all zero; zero-size images are rejected either way.

    Returns:
        ``(1, X, Y, Z)`` for volumes or ``(1, X, Y)`` for 2D images, float32, ``.affine`` the ``(4, 4)`` float64
        RAS voxel-index -> world-mm matrix.

    Raises:
        ScanNotFoundError: the path does not exist.
        EmptyInputError: a folder without any readable scan.
        MixedSeriesError: a folder with more than one series/scan.
        SeriesGeometryError: slices that do not form a regular grid (gaps, duplicates, mixed orientations...).
        CorruptScanError: unreadable/truncated files (the original exception is chained).
        InvalidImageError: zero-size images; NaN/inf or constant images when ``validate`` is true.
        UnsupportedFormatError: unknown file types, colour or multi-channel images, non-image DICOM objects.
    """
    try:
        if isinstance(source, ScanSource):
            return _load_source(source, validate)
        path = Path(source).expanduser()
        if not path.exists():
            raise ScanNotFoundError(path, "does not exist")
        if path.is_dir():
            return _load_folder(path, validate)
        return _load_file(path, None, validate)
    except ScanError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # any pydicom/SimpleITK/nibabel/numpy surprise: name the input
        where: str | Path = source.scan_id if isinstance(source, ScanSource) else source
        if isinstance(source, ScanSource) and source.paths:
            where = source.paths[0]
        raise CorruptScanError(where, f"cannot be loaded ({_describe_exception(exc)})") from exc
