"""Score detection results against LUNA16-style annotations: the ``medrpn froc`` command.

A user with their own annotated scans runs ``medrpn infer`` over them and then scores the output folder (or any
LUNA16 ``candidates.csv``, e.g. another system's) against an ``annotations.csv``::

    medrpn froc runs/review --annotations annotations.csv --out runs/review/froc

Inputs, all LUNA16 formats with **LPS world millimetres** (the coordinates ``candidates.csv`` is written in):

- **annotations** ``seriesuid,coordX,coordY,coordZ,diameter_mm``: the reference lesions, as spheres
  (``diameter_mm > 0``).
- **excluded** (optional, LUNA16's ``annotations_excluded.csv``, same columns): irrelevant findings; a candidate
  hitting one and no counted lesion is neither a true nor a false positive. A negative ``diameter_mm`` means
  10 mm, as in the LUNA16 evaluation script.
- **results**: a ``medrpn infer`` output folder (every ``*/proposals.json``; the scans it finished are the scans
  scored, including those without findings) or a ``candidates.csv`` (``seriesuid,coordX,coordY,coordZ,probability``).
- **scans** (optional, LUNA16's ``seriesuids.csv``: one id per line, an optional ``seriesuid`` header): the
  scans to score. Scans in it without results count as scans without candidates (a scan that failed is all
  misses, not left out). Without it the scans are those of a results folder, or for a ``candidates.csv`` the
  union of the ids in the candidates and the annotations — a scan without lesions and without candidates is then
  invisible, so pass the list for an exact false-positive rate.

Annotations and results of scans outside the scored set are ignored with a warning (e.g. the NIfTI scans of an
output folder that also holds the DICOM series the annotations name); results that match *none* of the scored
scans are an error (an id mismatch, which would otherwise score silently as zero). The scoring is
:mod:`medrpn.evaluation.froc`: the LUNA16 hit rule, sensitivity at 1/8-8 false positives per scan, the CPM,
a scan-bootstrap interval and the CPM per lesion-diameter band.

Scan ids are matched as strings: a ``medrpn infer`` scan id is the SeriesInstanceUID for DICOM input and the
file stem otherwise, so NIfTI/MHD files named ``<seriesuid>.nii.gz`` / ``<seriesuid>.mhd`` (LUNA16's naming)
match a LUNA16 ``annotations.csv`` directly.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from medrpn.evaluation.froc import (
    BootstrapInterval,
    DiameterBand,
    FROCResult,
    ScanCandidates,
    ScanLesions,
    bootstrap_cpm,
    compute_froc,
    drop_excluded,
    froc_by_diameter,
)
from medrpn.overlays.atomic import atomic_write_text

__all__ = [
    "EXCLUDED_DEFAULT_DIAMETER_MM",
    "LUNA16Report",
    "candidates_from_csv",
    "candidates_from_results",
    "evaluate_results",
    "froc_main",
    "read_annotations",
    "read_scan_list",
]

logger = logging.getLogger(__name__)

EXCLUDED_DEFAULT_DIAMETER_MM: Final = 10.0
"""Diameter given to an excluded finding whose ``diameter_mm`` is negative (the LUNA16 evaluation script's rule)."""

ANNOTATION_COLUMNS: Final = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
CANDIDATE_COLUMNS: Final = ("seriesuid", "coordX", "coordY", "coordZ", "probability")


def _read_rows(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV with the required ``columns``; clear errors naming the file."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing} (header: {reader.fieldnames})")
            return [(n, row) for n, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from exc


def _floats(path: Path, line: int, row: Mapping[str, str], keys: Sequence[str]) -> list[float]:
    try:
        vals = [float(row[k]) for k in keys]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}, line {line}: not a number in {[row.get(k) for k in keys]}") from exc
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{path}, line {line}: non-finite value in {vals}")
    return vals


def read_annotations(path: Path | str, *, excluded: bool = False) -> dict[str, ScanLesions]:
    """Read a LUNA16 ``annotations.csv`` (or ``annotations_excluded.csv``).

    Args:
        path: the CSV (``seriesuid,coordX,coordY,coordZ,diameter_mm``, LPS mm).
        excluded: the file lists excluded findings: a negative diameter becomes
            :data:`EXCLUDED_DEFAULT_DIAMETER_MM`. Otherwise every diameter must be ``> 0``.

    Returns:
        seriesuid -> its lesions (centres ``(M, 3)``, diameters ``(M,)``), in file order.

    Raises:
        ValueError: unreadable file, missing columns, non-numeric or non-finite values, a diameter ``<= 0``
            (of ``0`` for excluded findings); the message names the file and line.
    """
    p = Path(path)
    by_scan: dict[str, list[list[float]]] = {}
    for line, row in _read_rows(p, ANNOTATION_COLUMNS):
        x, y, z, d = _floats(p, line, row, ANNOTATION_COLUMNS[1:])
        if excluded and d < 0:
            d = EXCLUDED_DEFAULT_DIAMETER_MM
        if d <= 0:
            raise ValueError(f"{p}, line {line}: diameter_mm must be > 0, got {d:g}")
        uid = (row["seriesuid"] or "").strip()
        if not uid:
            raise ValueError(f"{p}, line {line}: empty seriesuid")
        by_scan.setdefault(uid, []).append([x, y, z, d])
    out = {}
    for uid, rows in by_scan.items():
        arr = np.asarray(rows, dtype=np.float64)
        out[uid] = ScanLesions(uid, arr[:, :3], arr[:, 3])
    return out


def read_scan_list(path: Path | str) -> list[str]:
    """Read a scan list (LUNA16 ``seriesuids.csv``): one id per line, first column, optional ``seriesuid`` header.

    Args:
        path: the file.

    Returns:
        The ids in file order.

    Raises:
        ValueError: unreadable file, no ids, or a repeated id.
    """
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and r[0].strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{p}: cannot read: {exc}") from exc
    ids = [r[0].strip() for r in rows]
    if ids and ids[0].lower() == "seriesuid":
        ids = ids[1:]
    if not ids:
        raise ValueError(f"{p}: no scan ids")
    seen: set[str] = set()
    for uid in ids:
        if uid in seen:
            raise ValueError(f"{p}: scan id {uid!r} listed twice")
        seen.add(uid)
    return ids


def _group_candidates(rows: Sequence[tuple[str, list[float]]]) -> dict[str, ScanCandidates]:
    by_scan: dict[str, list[list[float]]] = {}
    for uid, vals in rows:
        by_scan.setdefault(uid, []).append(vals)
    out = {}
    for uid, vs in by_scan.items():
        arr = np.asarray(vs, dtype=np.float64).reshape(-1, 4)
        out[uid] = ScanCandidates(uid, arr[:, :3], arr[:, 3])
    return out


def candidates_from_csv(path: Path | str) -> dict[str, ScanCandidates]:
    """Read a LUNA16 ``candidates.csv`` (``seriesuid,coordX,coordY,coordZ,probability``, LPS mm).

    Args:
        path: the CSV (``medrpn infer`` writes one in its output root).

    Returns:
        seriesuid -> its candidates (only scans with at least one row appear).

    Raises:
        ValueError: unreadable file, missing columns, non-numeric, non-finite or negative values (an empty
            ``coordZ`` — a 2D result — is an error too: the annotations are 3D).
    """
    p = Path(path)
    rows = []
    for line, row in _read_rows(p, CANDIDATE_COLUMNS):
        vals = _floats(p, line, row, CANDIDATE_COLUMNS[1:])
        if vals[3] < 0:
            raise ValueError(f"{p}, line {line}: negative probability {vals[3]:g} (probabilities, not logits)")
        rows.append(((row["seriesuid"] or "").strip(), vals))
    return _group_candidates(rows)


def candidates_from_results(folder: Path | str) -> tuple[list[str], dict[str, ScanCandidates]]:
    """Candidates of a ``medrpn infer`` output folder: the box centres and scores of every ``proposals.json``.

    Args:
        folder: the batch output folder.

    Returns:
        ``(scan_ids, candidates)``: the ids of every finished scan (sorted by folder), and each scan's candidates
        (scans without findings get an empty entry).

    Raises:
        ValueError: the folder has no readable ``proposals.json``, two scans share an id, or findings are 2D.
    """
    from medrpn.overlays.tables import collect_proposals

    files = collect_proposals(folder)
    if not files:
        raise ValueError(f"{folder}: no proposals.json found (not a medrpn infer output folder, or nothing finished)")
    ids: list[str] = []
    out: dict[str, ScanCandidates] = {}
    for pf in files:
        uid = pf.scan_id
        if uid in out:
            raise ValueError(f"{pf.path}: scan id {uid!r} also in another proposals.json of {folder}")
        if pf.findings and len(pf.findings[0].box) != 6:
            raise ValueError(f"{pf.path}: 2D findings; LUNA16 scoring needs 3D boxes")
        centres = np.asarray([f.centre for f in pf.findings], dtype=np.float64).reshape(-1, 3)
        scores = np.asarray([f.score for f in pf.findings], dtype=np.float64)
        ids.append(uid)
        out[uid] = ScanCandidates(uid, centres, scores)
    return ids, out


@dataclass(frozen=True)
class LUNA16Report:
    """The score of one set of results.

    Attributes:
        froc: FROC curve, sensitivities at the LUNA16 rates and the CPM.
        interval: scan-bootstrap interval of the CPM.
        bands: FROC per lesion-diameter band (lesions of other bands excluded).
        scan_ids: the scans scored.
        scans_without_results: scans of the list that had no results (counted as no candidates).
        ignored_annotation_scans: scans with annotations that were not scored.
        ignored_result_scans: scans with results that were not scored.
    """

    froc: FROCResult
    interval: BootstrapInterval
    bands: tuple[DiameterBand, ...]
    scan_ids: tuple[str, ...]
    scans_without_results: tuple[str, ...] = ()
    ignored_annotation_scans: tuple[str, ...] = ()
    ignored_result_scans: tuple[str, ...] = ()

    def markdown(self, title: str = "FROC") -> str:
        """The report as Markdown: counts, the FROC table, the interval and the size bands."""
        f = self.froc
        lines = [
            f"# {title}",
            "",
            f"{f.num_scans} scans, {f.num_lesions} lesions, {f.num_candidates} candidates "
            "(LUNA16 hit rule: a candidate hits a lesion when its centre lies within the lesion's radius; "
            "world LPS mm).",
            "",
            "| FP/scan | " + " | ".join(f"{r:g}" for r in f.fp_rates) + " | **CPM** |",
            "|---" * (len(f.fp_rates) + 2) + "|",
            "| sensitivity | " + " | ".join(f"{s:.3f}" for s in f.sensitivities) + f" | **{f.cpm:.3f}** |",
            "",
            f"CPM {self.interval}; maximum sensitivity {f.max_sensitivity:.3f}.",
            "",
            "| lesion diameter (mm) | lesions | CPM |",
            "|---|---:|---:|",
        ]
        for b in self.bands:
            lines.append(f"| {b.label} | {b.num_lesions} | {'—' if b.froc is None else f'{b.froc.cpm:.3f}'} |")
        if self.scans_without_results:
            lines += ["", f"{len(self.scans_without_results)} listed scans had no results (scored as no candidates)."]
        if self.ignored_annotation_scans:
            lines += ["", f"Annotations of {len(self.ignored_annotation_scans)} scans outside the scored set ignored."]
        if self.ignored_result_scans:
            lines += ["", f"Results of {len(self.ignored_result_scans)} scans outside the scored set ignored."]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (operating points, CPM and interval, bands, counts, the scans scored)."""
        return {
            "coordinates": "world LPS mm",
            "hit_rule": "LUNA16: candidate centre within the lesion radius",
            "num_scans": self.froc.num_scans,
            "num_lesions": self.froc.num_lesions,
            "num_candidates": self.froc.num_candidates,
            "sensitivity": {f"{r:g}": float(s) for r, s in zip(self.froc.fp_rates, self.froc.sensitivities)},
            "cpm": self.froc.cpm,
            "cpm_interval": {
                "low": self.interval.low,
                "high": self.interval.high,
                "level": self.interval.level,
                "resamples": self.interval.resamples,
            },
            "max_sensitivity": self.froc.max_sensitivity,
            "bands": [
                {
                    "label": b.label,
                    "low_mm": b.low,
                    "high_mm": None if math.isinf(b.high) else b.high,
                    "num_lesions": b.num_lesions,
                    "cpm": None if b.froc is None else b.froc.cpm,
                }
                for b in self.bands
            ],
            "scan_ids": list(self.scan_ids),
            "scans_without_results": list(self.scans_without_results),
            "ignored_annotation_scans": list(self.ignored_annotation_scans),
            "ignored_result_scans": list(self.ignored_result_scans),
        }


def _examples(ids: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def evaluate_results(
    candidates: Mapping[str, ScanCandidates],
    annotations: Mapping[str, ScanLesions],
    scan_ids: Sequence[str],
    *,
    excluded: Mapping[str, ScanLesions] | None = None,
    band_edges_mm: Sequence[float] = (0.0, 5.0, 10.0, math.inf),
    resamples: int = 1000,
    seed: int = 0,
) -> LUNA16Report:
    """Score candidates against annotations over a set of scans (LUNA16 rule).

    Args:
        candidates: seriesuid -> candidates; scans of ``scan_ids`` missing here have none; entries of other scans
            are ignored (listed in the report), unless no scored scan has an entry (an id mismatch: an error).
        annotations: seriesuid -> lesions; scans of ``scan_ids`` missing here have none; entries of other scans
            are ignored (listed in the report).
        scan_ids: the scans scored (each counts in the false positives per scan).
        excluded: seriesuid -> excluded findings (LUNA16's irrelevant findings), optional.
        band_edges_mm: lesion-diameter band edges of the per-size CPM.
        resamples: bootstrap resamples of the CPM interval (>= 10).
        seed: bootstrap seed.

    Returns:
        The :class:`LUNA16Report`.

    Raises:
        ValueError: no scans, a repeated scan id, candidates only for scans outside ``scan_ids`` (an id
            mismatch), no lesion in the scored scans, or the errors of :func:`~medrpn.evaluation.froc.compute_froc`.
    """
    ids = list(scan_ids)
    if not ids:
        raise ValueError("no scans to score")
    if len(set(ids)) != len(ids):
        raise ValueError("repeated scan ids in the scan list")
    known = set(ids)
    stray = sorted(set(candidates) - known)
    if stray and not known & set(candidates):
        raise ValueError(
            f"results for {len(stray)} scans ({_examples(stray)}) but none for the {len(ids)} scored scans "
            f"({_examples(ids)}). Check the scan list, or that result and annotation ids are the same "
            "(medrpn infer names a scan by its SeriesInstanceUID, else by its file stem)"
        )
    if stray:
        logger.warning("ignoring the results of %d scans that are not scored (%s)", len(stray), _examples(stray))
    ignored = sorted(set(annotations) - known)
    if ignored:
        logger.warning(
            "ignoring the annotations of %d scans that are not scored (%s)", len(ignored), _examples(ignored)
        )
    if not any(len(annotations[i]) for i in ids if i in annotations):
        raise ValueError(
            f"no annotated lesion in the {len(ids)} scored scans ({_examples(ids)}); annotation ids are "
            f"{_examples(sorted(annotations))}: do the ids match?"
        )
    missing = tuple(i for i in ids if i not in candidates)
    empty = np.zeros((0, 3))
    cands = [candidates[i] if i in candidates else ScanCandidates(i, empty, np.zeros(0)) for i in ids]
    lesions = [annotations[i] if i in annotations else ScanLesions(i, empty, np.zeros(0)) for i in ids]
    if excluded:
        cands = [
            drop_excluded(c, les, excluded[c.scan_id]) if c.scan_id in excluded else c for c, les in zip(cands, lesions)
        ]
    froc = compute_froc(cands, lesions)
    interval = bootstrap_cpm(cands, lesions, resamples=resamples, seed=seed)
    bands = tuple(froc_by_diameter(cands, lesions, edges=band_edges_mm))
    return LUNA16Report(
        froc=froc,
        interval=interval,
        bands=bands,
        scan_ids=tuple(ids),
        scans_without_results=missing,
        ignored_annotation_scans=tuple(ignored),
        ignored_result_scans=tuple(stray),
    )


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``medrpn froc``."""
    p = argparse.ArgumentParser(
        prog="medrpn froc",
        description=(
            "Score detection results against LUNA16-style annotations (world LPS mm): FROC sensitivity at 1/8-8 "
            "false positives per scan, CPM with a scan-bootstrap interval, CPM per lesion size. RESULTS is a "
            "medrpn infer output folder or a candidates.csv."
        ),
    )
    p.add_argument("results", type=Path, help="medrpn infer output folder, or a LUNA16 candidates.csv")
    p.add_argument("--annotations", type=Path, required=True, help="annotations.csv (seriesuid,coordX..,diameter_mm)")
    p.add_argument("--excluded", type=Path, help="annotations_excluded.csv: findings neither hit nor false positive")
    p.add_argument("--scans", type=Path, help="seriesuids.csv: the scans to score (default: see the docs)")
    p.add_argument("--out", type=Path, help="write froc.md, froc.json and froc.png into this folder")
    p.add_argument("--bands", type=float, nargs="*", default=[5.0, 10.0], help="diameter band edges, mm (5 10)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CPM interval (1000)")
    p.add_argument("--title", default="FROC", help="report and figure title")
    return p


def froc_main(argv: Sequence[str] | None = None) -> int:
    """``medrpn froc``: print the report, optionally write it (Markdown, JSON, PNG) atomically; 0 on success.

    Bad input (unreadable or malformed files, id mismatches) prints one error naming the file and returns 2.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.bootstrap < 10:
            raise ValueError(f"--bootstrap must be >= 10, got {args.bootstrap}")
        edges = [0.0, *sorted(float(e) for e in args.bands), math.inf]
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError(f"--bands must be distinct positive diameters, got {args.bands}")
        annotations = read_annotations(args.annotations)
        excluded = read_annotations(args.excluded, excluded=True) if args.excluded else None
        if args.results.is_dir():
            result_ids, candidates = candidates_from_results(args.results)
        elif args.results.is_file():
            candidates = candidates_from_csv(args.results)
            result_ids = sorted(set(candidates) | set(annotations))
        else:
            raise ValueError(f"{args.results}: no such folder or file")
        scan_ids = read_scan_list(args.scans) if args.scans else result_ids
        report = evaluate_results(
            candidates, annotations, scan_ids, excluded=excluded, band_edges_mm=edges, resamples=args.bootstrap
        )
    except ValueError as exc:
        print(f"medrpn froc: error: {exc}", file=sys.stderr)
        return 2
    if args.results.is_file() and not args.scans:
        logger.warning(
            "scored the %d scans named in the candidates or annotations; pass --scans for scans with neither",
            len(scan_ids),
        )
    if report.scans_without_results:
        logger.warning(
            "%d listed scans have no results and count as scans without candidates (%s)",
            len(report.scans_without_results),
            _examples(report.scans_without_results),
        )
    text = report.markdown(args.title)
    print(text, end="")
    if args.out is not None:
        from medrpn.evaluation.plots import plot_froc

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "froc.md", text)
        atomic_write_text(out / "froc.json", json.dumps(report.as_dict(), indent=2) + "\n")
        plot_froc(report.froc, out / "froc.png", title=args.title, label=args.results.name or "results")
        print(f"written: {out / 'froc.md'}, {out / 'froc.json'}, {out / 'froc.png'}")
    return 0
