"""3D Slicer markups file: one ROI (box) per finding, ``findings.mrk.json``.

The file follows Slicer's markups JSON schema v1.0.3 and the structure Slicer itself writes for an ROI node
(``vtkMRMLMarkupsROIJsonStorageNode``): ``type`` ``"ROI"``, ``roiType`` ``"Box"``, ``center``/``size``/
``orientation`` of the box and one control point at the centre. Coordinates are stored in **LPS** mm
(``"coordinateSystem": "LPS"``), so the numbers equal ``proposals.json``'s box centres; Slicer converts to its
internal RAS on load. ``orientation`` is the identity in the file's LPS frame (box axes along L, P, S). Drag the
file onto Slicer (or ``slicer.util.loadMarkups``) after loading the scan: every markup of the file becomes an ROI
node named like ``F1 solid 0.93``.

A 2D image's boxes get ``z`` = the image plane's LPS z (from a 4x4 affine, else 0) and a ``z`` size of the plane
thickness (the third affine column's norm, else 1 mm).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import numpy as np

from medrpn.inference.results import Finding, ScanResult
from medrpn.overlays.atomic import atomic_write_text

SLICER_MARKUPS_JSON: Final = "findings.mrk.json"
"""File name of the markups file."""

MARKUPS_SCHEMA: Final = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
"""``@schema`` of the markups file."""

_IDENTITY3: Final = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

_CLASS_COLOURS: Final = ((1.0, 0.3, 0.3), (1.0, 0.85, 0.2), (1.0, 0.55, 0.1), (0.4, 1.0, 1.0), (0.7, 0.5, 1.0))
"""Markup colour by class id (cycled)."""


def markup_name(finding: Finding) -> str:
    """Display name of a finding's ROI, e.g. ``"F1 solid 0.93"``.

    Args:
        finding: the finding.

    Returns:
        The name.
    """
    return f"F{finding.rank} {finding.class_name} {finding.score:.2f}"


def _description(finding: Finding, class_names: tuple[str, ...]) -> str:
    probs = ", ".join(
        f"{class_names[i] if i < len(class_names) else i}={p:.3f}" for i, p in enumerate(finding.class_probs)
    )
    return (
        f"rank {finding.rank}; score {finding.score:.3f}; class {finding.class_name}; "
        f"objectness {finding.objectness:.3f}; class probabilities: {probs}"
    )


def _plane_z(result: ScanResult) -> tuple[float, float]:
    """LPS z and thickness of a 2D image's plane."""
    a = np.asarray(result.affine_ras, dtype=np.float64)
    if a.shape == (4, 4):
        return float(a[2, 3]), float(np.linalg.norm(a[:3, 2])) or 1.0
    return 0.0, 1.0


def _roi(finding: Finding, result: ScanResult) -> dict[str, Any]:
    centre = [float(v) for v in finding.centre]
    size = [float(v) for v in finding.size]
    if len(centre) == 2:
        z, thickness = _plane_z(result)
        centre.append(z)
        size.append(thickness)
    colour = list(_CLASS_COLOURS[finding.label % len(_CLASS_COLOURS)]) if finding.label >= 0 else [0.4, 1.0, 1.0]
    description = _description(finding, tuple(result.class_names))
    return {
        "type": "ROI",
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "name": markup_name(finding),
        "description": description,
        "locked": True,
        "fixedNumberOfControlPoints": False,
        "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 1,
        "roiType": "Box",
        "center": centre,
        "orientation": list(_IDENTITY3),
        "size": size,
        "insideOut": False,
        "controlPoints": [
            {
                "id": "1",
                "label": f"F{finding.rank}",
                "description": description,
                "associatedNodeID": "",
                "position": centre,
                "orientation": list(_IDENTITY3),
                "selected": True,
                "locked": True,
                "visibility": True,
                "positionStatus": "defined",
            }
        ],
        "measurements": [],
        "display": {
            "visibility": True,
            "opacity": 1.0,
            "color": colour,
            "selectedColor": colour,
            "propertiesLabelVisibility": True,
            "pointLabelsVisibility": False,
            "textScale": 3.0,
            "handlesInteractive": False,
            "fillVisibility": False,
            "outlineVisibility": True,
            "outlineOpacity": 1.0,
        },
    }


def slicer_markups(result: ScanResult) -> dict[str, Any]:
    """The markups document of :func:`write_slicer_markups`.

    Args:
        result: the scan's findings.

    Returns:
        ``{"@schema": ..., "markups": [one ROI per finding, in rank order]}``.
    """
    findings = sorted(result.findings, key=lambda f: f.rank)
    return {"@schema": MARKUPS_SCHEMA, "markups": [_roi(f, result) for f in findings]}


def write_slicer_markups(result: ScanResult, out_dir: Path | str) -> Path:
    """Write ``out_dir/findings.mrk.json`` (atomic).

    Args:
        result: the scan's findings (LPS mm boxes).
        out_dir: the scan's output folder (created if needed).

    Returns:
        The written path.
    """
    text = json.dumps(slicer_markups(result), indent=4, allow_nan=False) + "\n"
    return atomic_write_text(Path(out_dir) / SLICER_MARKUPS_JSON, text)
