"""3D Slicer markups: valid JSON in Slicer's ROI layout, one box per finding, LPS centre/size of the boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medrpn.overlays.slicer import MARKUPS_SCHEMA, write_slicer_markups
from tests.overlays.test_tables import (
    AFFINE_RAS_3D,
    RANGES_3D,
    SCORES_3D,
    make_result_2d,
    make_result_3d,
    ranges_by_rank,
    voxel_centre_world,
)

_NUM3 = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
_NUM9 = {"type": "array", "items": {"type": "number"}, "minItems": 9, "maxItems": 9}

# The parts of Slicer's markups-schema-v1.0.3 that an ROI file exercises (types, enums and array lengths).
ROI_SCHEMA = {
    "type": "object",
    "required": ["@schema", "markups"],
    "properties": {
        "@schema": {"type": "string"},
        "markups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"enum": ["Fiducial", "Line", "Angle", "Curve", "ClosedCurve", "Plane", "ROI"]},
                    "name": {"type": "string"},
                    "coordinateSystem": {"enum": ["LPS", "RAS"]},
                    "coordinateUnits": {"enum": ["mm", "um"]},
                    "locked": {"type": "boolean"},
                    "fixedNumberOfControlPoints": {"type": "boolean"},
                    "labelFormat": {"type": "string"},
                    "roiType": {"type": "string"},
                    "center": _NUM3,
                    "size": _NUM3,
                    "orientation": _NUM9,
                    "controlPoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "label": {"type": "string"},
                                "description": {"type": "string"},
                                "associatedNodeID": {"type": "string"},
                                "position": _NUM3,
                                "orientation": _NUM9,
                                "selected": {"type": "boolean"},
                                "locked": {"type": "boolean"},
                                "visibility": {"type": "boolean"},
                                "positionStatus": {"enum": ["undefined", "preview", "defined"]},
                            },
                        },
                    },
                    "measurements": {"type": "array"},
                    "display": {
                        "type": "object",
                        "properties": {
                            "visibility": {"type": "boolean"},
                            "opacity": {"type": "number", "minimum": 0, "maximum": 1},
                            "color": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
                            "textScale": {"type": "number", "minimum": 0},
                        },
                    },
                },
            },
        },
    },
}


def test_markups_file_structure_and_boxes(tmp_path: Path) -> None:
    res = make_result_3d()
    path = write_slicer_markups(res, tmp_path)
    assert path == tmp_path / "findings.mrk.json"
    doc = json.loads(path.read_text())
    assert doc["@schema"] == MARKUPS_SCHEMA
    assert doc["@schema"].endswith("markups-schema-v1.0.3.json#")
    markups = doc["markups"]
    assert len(markups) == len(res.findings) == 3
    by_rank = ranges_by_rank(RANGES_3D, SCORES_3D)
    spacing = np.array([0.7, 0.9, 2.5])
    for m, f in zip(markups, res.findings):
        assert m["type"] == "ROI" and m["roiType"] == "Box"
        assert m["coordinateSystem"] == "LPS" and m["coordinateUnits"] == "mm"
        assert m["orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        assert np.allclose(m["center"], f.centre) and np.allclose(m["size"], f.size)
        rr = by_rank[f.rank]
        assert np.allclose(m["center"], voxel_centre_world(rr, AFFINE_RAS_3D))
        assert np.allclose(m["size"], [(b - a + 1) * s for (a, b), s in zip(rr, spacing)])
        assert len(m["controlPoints"]) == 1
        cp = m["controlPoints"][0]
        assert np.allclose(cp["position"], m["center"]) and cp["positionStatus"] == "defined"
        assert f"{f.score:.3f}" in cp["description"] and f.class_name in cp["description"]
        assert "objectness" in cp["description"]
    assert markups[0]["name"] == "F1 solid 0.93"
    assert markups[1]["name"] == "F2 ground-glass 0.71"


def test_markups_validate_against_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for res in (make_result_3d(), make_result_2d()):
        doc = json.loads(write_slicer_markups(res, tmp_path / res.scan_id).read_text())
        jsonschema.validate(doc, ROI_SCHEMA)


def test_2d_and_empty(tmp_path: Path) -> None:
    res = make_result_2d()
    doc = json.loads(write_slicer_markups(res, tmp_path).read_text())
    assert len(doc["markups"]) == 2
    for m, f in zip(doc["markups"], res.findings):
        assert np.allclose(m["center"], [*f.centre, 0.0])
        assert np.allclose(m["size"], [*f.size, 1.0])
    res.findings = []
    doc = json.loads(write_slicer_markups(res, tmp_path / "empty").read_text())
    assert doc["markups"] == []
