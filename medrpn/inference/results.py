"""What whole-scan inference produces for one scan, in world coordinates: the input of every overlay writer.

Every box here is a **world box in LPS millimetres**, MONAI ``StandardMode`` (``xyzxyz``; ``xyxy``
for a 2D image), see :mod:`medrpn.geometry`. The source grid (``affine_ras``, ``spatial_shape``) is
the grid of the scan as loaded from disk (before any resampling), so overlays land on the original
voxels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medrpn.geometry import CONVENTION_NOTE, WORLD_SPACE

DEFAULT_CLASS_NAMES: tuple[str, ...] = ("solid", "ground-glass", "part-solid")
"""Lesion class names of the built-in synthetic dataset (class id = index)."""


@dataclass(frozen=True)
class Finding:
    """One suspicious region.

    Attributes:
        rank: 1-based rank by decreasing score within the scan.
        box: ``2*D`` floats, LPS mm, ``[x0, y0, z0, x1, y1, z1]``.
        score: detection score in [0, 1] (lesion-class probability; objectness in RPN-only mode).
        label: 0-based lesion class id.
        class_name: name of ``label``.
        class_probs: probability of every foreground lesion class.
        objectness: RPN objectness of the proposal the finding came from.
    """

    rank: int
    box: tuple[float, ...]
    score: float
    label: int
    class_name: str
    class_probs: tuple[float, ...]
    objectness: float

    @property
    def centre(self) -> tuple[float, ...]:
        """Box centre, LPS mm."""
        d = len(self.box) // 2
        return tuple((self.box[a] + self.box[a + d]) / 2 for a in range(d))

    @property
    def size(self) -> tuple[float, ...]:
        """Box extent per axis, mm."""
        d = len(self.box) // 2
        return tuple(self.box[a + d] - self.box[a] for a in range(d))

    @property
    def diameter_mm(self) -> float:
        """Longest in-plane (x/y) extent, mm — the LUNA16 notion of a nodule diameter."""
        s = self.size
        return float(max(s[0], s[1]))


@dataclass
class ScanResult:
    """Findings of one scan plus what writers need to place them on the source images.

    Attributes:
        scan_id: SeriesInstanceUID for DICOM, else the file stem; never a patient name.
        source: path of the scan (file, or series folder).
        source_format: ``"dicom"``, ``"nifti"``, ``"mhd"``, ``"mha"`` or ``"nrrd"``.
        affine_ras: ``(D+1, D+1)`` RAS voxel-to-world affine of the source grid (MONAI convention).
        spatial_shape: ``D`` sizes of the source grid.
        findings: sorted by rank.
        class_names: name of every lesion class id.
        objectness_map: optional ``spatial_shape`` float32 heatmap in [0, 1] on the source grid.
        dicom_files: for DICOM input, the source instance files in slice order ``k = 0..Z-1``.
        sop_instance_uids: for DICOM input, their SOPInstanceUIDs in the same order.
        series_uid: for DICOM input, the SeriesInstanceUID.
        model: short description of the model/checkpoint that produced the findings.
        extra: how the findings were computed (``precision``: ``"bf16"`` or ``"float32"``, ``tta``), written
            to ``proposals.json`` as ``"inference"``.
    """

    scan_id: str
    source: str
    source_format: str
    affine_ras: np.ndarray
    spatial_shape: tuple[int, ...]
    findings: list[Finding]
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    objectness_map: np.ndarray | None = None
    dicom_files: tuple[str, ...] = ()
    sop_instance_uids: tuple[str, ...] = ()
    series_uid: str | None = None
    model: str = "medrpn"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.spatial_shape)

    def to_json_dict(self) -> dict[str, Any]:
        """The ``proposals.json`` content (MONAI-bundle-compatible ``box``/``label``/``label_scores`` keys)."""
        boxes = [list(f.box) for f in self.findings]
        return {
            "scan_id": self.scan_id,
            "source": self.source,
            "source_format": self.source_format,
            "coordinate_system": WORLD_SPACE,
            "box_mode": "xyzxyz" if self.spatial_dims == 3 else "xyxy",
            "convention": CONVENTION_NOTE,
            "class_names": list(self.class_names),
            "model": self.model,
            # MONAI detection bundle fields
            "box": boxes,
            "label": [f.label for f in self.findings],
            "label_scores": [f.score for f in self.findings],
            "findings": [
                {**asdict(f), "box": list(f.box), "class_probs": list(f.class_probs), "centre": list(f.centre)}
                for f in self.findings
            ],
            "spatial_shape": list(self.spatial_shape),
            "affine_ras": np.asarray(self.affine_ras, dtype=float).tolist(),
            **({"series_uid": self.series_uid} if self.series_uid else {}),
            **({"inference": dict(self.extra)} if self.extra else {}),
        }


def findings_from_json(path: Path | str) -> tuple[dict[str, Any], list[Finding]]:
    """Read a ``proposals.json`` back.

    Args:
        path: the file.

    Returns:
        The whole document and its findings.
    """
    doc = json.loads(Path(path).read_text())
    findings = [
        Finding(
            rank=int(f["rank"]),
            box=tuple(float(v) for v in f["box"]),
            score=float(f["score"]),
            label=int(f["label"]),
            class_name=str(f["class_name"]),
            class_probs=tuple(float(v) for v in f["class_probs"]),
            objectness=float(f["objectness"]),
        )
        for f in doc["findings"]
    ]
    return doc, findings


def make_findings(
    boxes_world: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_probs: np.ndarray,
    objectness: np.ndarray,
    class_names: Sequence[str],
) -> list[Finding]:
    """Build ranked findings from arrays.

    Args:
        boxes_world: ``(M, 2*D)`` LPS mm.
        scores: ``(M,)``.
        labels: ``(M,)`` class ids.
        class_probs: ``(M, C)``.
        objectness: ``(M,)``.
        class_names: ``C`` names.

    Returns:
        Findings sorted by decreasing score, ranks from 1.
    """
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    out = []
    for rank, i in enumerate(order, start=1):
        label = int(labels[i])
        out.append(
            Finding(
                rank=rank,
                box=tuple(float(v) for v in boxes_world[i]),
                score=float(scores[i]),
                label=label,
                class_name=class_names[label] if 0 <= label < len(class_names) else str(label),
                class_probs=tuple(float(v) for v in np.atleast_1d(class_probs[i])),
                objectness=float(objectness[i]),
            )
        )
    return out
