"""Per-scan ``proposals.json`` and the batch-level tables: LUNA16 ``candidates.csv`` and ``failures.csv``.

Layout written by the batch runner (this module only fixes the file names it reads back)::

    OUTPUT_ROOT/<scan folder>/proposals.json    one per finished scan (:func:`write_proposals_json`)
    OUTPUT_ROOT/candidates.csv                  every finding of every scan (:func:`write_candidates_csv`)
    OUTPUT_ROOT/failures.csv                    scans that could not be processed (:func:`write_failures_csv`)

``candidates.csv`` follows the LUNA16 candidates format: ``seriesuid,coordX,coordY,coordZ,probability`` with the
box centre in **LPS** world millimetres (the coordinates LUNA16 uses) and ``seriesuid`` = ``ScanResult.scan_id``.
For a 2D image ``coordZ`` is left empty. :func:`collect_candidates` rebuilds the rows from the ``proposals.json``
files found below an output root, so a rerun that skipped already finished scans still lists all of them.

Every file is written atomically (:mod:`medrpn.overlays.atomic`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from medrpn.inference.results import Finding, ScanResult, findings_from_json
from medrpn.overlays.atomic import atomic_write_text

logger = logging.getLogger(__name__)

PROPOSALS_JSON: Final = "proposals.json"
"""File name of the per-scan proposals document."""

CANDIDATES_CSV: Final = "candidates.csv"
"""Suggested file name of the batch-level candidates table (in the output root)."""

FAILURES_CSV: Final = "failures.csv"
"""Suggested file name of the batch-level failures table (in the output root)."""

CANDIDATES_HEADER: Final = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
"""Columns of ``candidates.csv`` (LUNA16)."""

FAILURES_HEADER: Final = ("source", "reason")
"""Columns of ``failures.csv``."""


@dataclass(frozen=True)
class Candidate:
    """One row of ``candidates.csv``.

    Attributes:
        seriesuid: the scan id (SeriesInstanceUID for DICOM, else the file stem).
        coord_x: box centre x, LPS mm (column ``coordX``).
        coord_y: box centre y, LPS mm (column ``coordY``).
        coord_z: box centre z, LPS mm (column ``coordZ``); ``None`` for a 2D image.
        probability: the finding's score.
    """

    seriesuid: str
    coord_x: float
    coord_y: float
    coord_z: float | None
    probability: float

    @classmethod
    def from_finding(cls, scan_id: str, finding: Finding) -> Candidate:
        """The candidate row of one finding.

        Args:
            scan_id: the scan's id (``seriesuid``).
            finding: a finding with a ``2*D`` LPS box.

        Returns:
            Its row.
        """
        c = finding.centre
        return cls(scan_id, float(c[0]), float(c[1]), float(c[2]) if len(c) > 2 else None, float(finding.score))


@dataclass(frozen=True)
class ProposalsFile:
    """A ``proposals.json`` read back from disk.

    Attributes:
        path: the file.
        doc: the whole JSON document (see ``ScanResult.to_json_dict``).
        findings: its findings, in rank order.
    """

    path: Path
    doc: dict[str, Any]
    findings: list[Finding]

    @property
    def scan_id(self) -> str:
        """``doc["scan_id"]``."""
        return str(self.doc.get("scan_id", ""))

    @property
    def source(self) -> str:
        """``doc["source"]`` (as the batch runner stored it)."""
        return str(self.doc.get("source", ""))

    @property
    def spatial_dims(self) -> int:
        """2 or 3 (from ``spatial_shape``, else from the box length)."""
        shape = self.doc.get("spatial_shape")
        if shape:
            return len(shape)
        return len(self.findings[0].box) // 2 if self.findings else 3


def write_proposals_json(result: ScanResult, out_dir: Path | str) -> Path:
    """Write ``out_dir/proposals.json`` = ``result.to_json_dict()`` (indented, atomic).

    Args:
        result: the scan's findings.
        out_dir: the scan's output folder (created if needed).

    Returns:
        The written path.
    """
    path = Path(out_dir) / PROPOSALS_JSON
    text = json.dumps(result.to_json_dict(), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def collect_proposals(output_root: Path | str) -> list[ProposalsFile]:
    """Read every ``proposals.json`` below ``output_root`` (any depth), sorted by path.

    Unreadable files (not JSON, missing keys) are skipped with a warning, never raised: one damaged file must not
    stop the batch tables from being rebuilt.

    Args:
        output_root: the batch output folder.

    Returns:
        One entry per readable file.
    """
    root = Path(output_root)
    out: list[ProposalsFile] = []
    if not root.is_dir():
        return out
    for path in sorted(root.rglob(PROPOSALS_JSON)):
        if not path.is_file():
            continue
        try:
            doc, findings = findings_from_json(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("skipping unreadable %s: %s", path, exc)
            continue
        out.append(ProposalsFile(path=path, doc=doc, findings=sorted(findings, key=lambda f: f.rank)))
    return out


def collect_candidates(output_root: Path | str) -> list[Candidate]:
    """Candidate rows of every scan that has a ``proposals.json`` below ``output_root``.

    Args:
        output_root: the batch output folder.

    Returns:
        Rows ordered by proposals file path, then rank.
    """
    rows: list[Candidate] = []
    for pf in collect_proposals(output_root):
        rows.extend(Candidate.from_finding(pf.scan_id, f) for f in pf.findings)
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if not math.isfinite(v):
        raise ValueError(f"non-finite value {v!r} in candidates")
    return repr(float(v))


def _to_csv(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_candidates_csv(rows_or_results: Iterable[Candidate | ScanResult], path: Path | str) -> Path:
    """Write a LUNA16 ``candidates.csv`` (atomic).

    Args:
        rows_or_results: candidate rows and/or whole :class:`ScanResult` s (expanded to one row per finding, in
            rank order), in the order they should appear.
        path: destination file.

    Returns:
        The written path.
    """
    rows: list[Candidate] = []
    for item in rows_or_results:
        if isinstance(item, ScanResult):
            rows.extend(Candidate.from_finding(item.scan_id, f) for f in item.findings)
        else:
            rows.append(item)
    text = _to_csv(
        CANDIDATES_HEADER,
        ([r.seriesuid, _fmt(r.coord_x), _fmt(r.coord_y), _fmt(r.coord_z), _fmt(r.probability)] for r in rows),
    )
    return atomic_write_text(path, text)


def read_candidates_csv(path: Path | str) -> list[Candidate]:
    """Read a ``candidates.csv`` (ours or LUNA16's).

    Args:
        path: the file.

    Returns:
        Its rows; an empty ``coordZ`` gives ``None``.

    Raises:
        ValueError: when the header lacks one of :data:`CANDIDATES_HEADER`.
    """
    with Path(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CANDIDATES_HEADER if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}")
        return [
            Candidate(
                seriesuid=row["seriesuid"],
                coord_x=float(row["coordX"]),
                coord_y=float(row["coordY"]),
                coord_z=float(row["coordZ"]) if row["coordZ"] not in (None, "") else None,
                probability=float(row["probability"]),
            )
            for row in reader
        ]


def write_failures_csv(failures: Sequence[tuple[str, str]], path: Path | str) -> Path:
    """Write ``failures.csv`` with header ``source,reason`` (atomic; header only when there are none).

    Args:
        failures: ``(source, reason)`` pairs; newlines in reasons are kept (CSV-quoted).
        path: destination file.

    Returns:
        The written path.
    """
    return atomic_write_text(path, _to_csv(FAILURES_HEADER, ([str(s), str(r)] for s, r in failures)))


def read_failures_csv(path: Path | str) -> list[tuple[str, str]]:
    """Read a ``failures.csv`` back; a missing file gives ``[]``.

    Args:
        path: the file.

    Returns:
        ``(source, reason)`` pairs.
    """
    p = Path(path)
    if not p.is_file():
        return []
    with p.open(newline="", encoding="utf-8") as fh:
        return [(row["source"], row["reason"]) for row in csv.DictReader(fh)]
