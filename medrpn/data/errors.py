"""Exceptions raised while discovering and loading scans.

Every exception derives from :class:`ScanError`, carries the offending ``path`` (the file or folder the problem
is about) and a human-readable ``reason``, and renders as ``"{path}: {reason}"`` so that a log line or a batch
report always names the file. None of them ever contains patient identifiers (PatientName, PatientID, ...).

Which condition raises which exception (see :mod:`medrpn.data.io`):

- :class:`ScanNotFoundError`: the path given to ``load_scan``/``discover_scans`` does not exist.
- :class:`CorruptScanError`: a file cannot be read or decoded: truncated NIfTI/DICOM/MHD, a DICOM header that
  does not parse, pixel data shorter than Rows x Columns x frames, a compressed transfer syntax nobody can decode,
  missing mandatory DICOM attributes, or any other pydicom/SimpleITK/nibabel exception (wrapped, original chained).
- :class:`EmptyInputError`: a folder (or list of paths) holds no readable scan at all.
- :class:`MixedSeriesError`: a path expected to hold exactly one scan holds several (e.g. a folder with two DICOM
  series); ``series_uids`` lists the SeriesInstanceUIDs (scan ids for non-DICOM files) found.
- :class:`SeriesGeometryError`: a DICOM series (or the frames of a multi-frame instance) cannot be stacked into a
  regular grid: missing slices / uneven slice spacing, duplicated slice positions, mixed orientations, differing
  Rows/Columns/PixelSpacing, inconsistent in-plane offsets. The reason quotes the numbers (positions in mm along the
  slice normal, the expected spacing, the estimated number of missing slices).
- :class:`InvalidImageError`: the decoded image is unusable: zero-size, NaN/inf voxels, or constant.
- :class:`UnsupportedFormatError`: the file is neither NIfTI/MHD/MHA/NRRD (by suffix) nor DICOM (by content), or it
  is an image medrpn does not handle (colour/RGB, several channels or time points, non-image DICOM such as SR/SEG).

All exceptions pickle cleanly (so they survive ``torch.utils.data.DataLoader`` worker processes).
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import Any

__all__ = [
    "CorruptScanError",
    "EmptyInputError",
    "InvalidImageError",
    "MixedSeriesError",
    "ScanError",
    "ScanNotFoundError",
    "SeriesGeometryError",
    "UnsupportedFormatError",
]


class ScanError(Exception):
    """Base class of every scan discovery/loading error.

    Args:
        path: the file or folder the problem is about (stored as ``str``).
        reason: what is wrong, in words a radiographer or engineer can act on.

    Attributes:
        path: the offending file or folder, as a string.
        reason: the problem description, without the path.
    """

    def __init__(self, path: str | PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.path, self.reason))


class ScanNotFoundError(ScanError):
    """The given path does not exist."""


class CorruptScanError(ScanError):
    """The file exists but cannot be read: truncated, unparsable header, undecodable pixel data, ..."""


class EmptyInputError(ScanError):
    """A folder (or a list of paths) contains no readable scan."""


class MixedSeriesError(ScanError):
    """A path expected to hold exactly one scan holds several.

    Args:
        path: the folder (or file) that was expected to hold one series.
        series_uids: the SeriesInstanceUIDs (or, for non-DICOM files, scan ids) found there.
        reason: optional override of the generated reason.

    Attributes:
        series_uids: tuple of the SeriesInstanceUIDs / scan ids found.
    """

    def __init__(self, path: str | PathLike[str], series_uids: Sequence[str], reason: str | None = None) -> None:
        self.series_uids = tuple(str(uid) for uid in series_uids)
        if reason is None:
            reason = (
                f"holds {len(self.series_uids)} series/scans but exactly one was expected; pass one of them "
                f"(see medrpn.data.io.discover_scans): {', '.join(self.series_uids)}"
            )
        super().__init__(path, reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.path, self.series_uids, self.reason))


class SeriesGeometryError(ScanError):
    """Slices of a series do not form a regular grid (gaps, duplicates, mixed orientations or sizes)."""


class InvalidImageError(ScanError):
    """The decoded image is unusable: zero-size, NaN/inf values, or constant."""


class UnsupportedFormatError(ScanError):
    """The file format (or image type) is not handled by medrpn."""
