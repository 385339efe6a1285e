"""Annotation formats -> one internal form: :class:`CaseRecord` with world boxes in LPS mm.

Supported inputs (all converted to ``StandardMode`` world boxes, LPS millimetres, see
:mod:`medrpn.geometry`):

- **MONAI detection datalist JSON** (as MONAI's LUNA16 bundle uses): ``{"training": [{"image": ...,
  "box": [[cx, cy, cz, w, h, d], ...], "label": [...]}, ...], "validation": [...]}``, boxes ``cccwhd``
  in world LPS mm, image paths relative to the datalist's folder (or ``base_dir``).
- **LUNA16 ``annotations.csv``** (``seriesuid, coordX, coordY, coordZ, diameter_mm``, LPS mm): each
  nodule becomes a cube of side ``diameter_mm`` centred on its coordinates, class 0.
- **Lesion label masks**: one box per connected component (26-connectivity in 3D, 8 in 2D) of every
  label value; the box is the world extent of the component's voxels (voxel ``i`` spans
  ``[i, i+1)``); lesion class id = label value - 1.

Errors name the file and the problem (:class:`medrpn.data.errors.AnnotationError`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medrpn.data.errors import ScanError
from medrpn.geometry import cccwhd_to_standard, image_to_world_boxes, standard_to_cccwhd


class AnnotationError(ScanError):
    """An annotation file is malformed: missing keys, wrong box length, non-finite or inverted boxes."""


@dataclass
class CaseRecord:
    """One scan and its lesions.

    Attributes:
        case_id: identifier (series UID, file stem or datalist id).
        image: path of the scan (NIfTI/MHD/NRRD file, DICOM file or DICOM series folder).
        boxes: ``(M, 2*D)`` float64 world boxes, LPS mm, StandardMode (``M`` may be 0).
        labels: ``(M,)`` int64 0-based lesion class ids.
        extra: any other datalist fields (kept for round trips).
    """

    case_id: str
    image: str
    boxes: np.ndarray
    labels: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def to_item(self) -> dict[str, Any]:
        """The dictionary a MONAI dataset consumes: ``image``, ``box`` (world, StandardMode), ``label``, ``case_id``."""
        return {
            "image": self.image,
            "box": self.boxes.astype(np.float32),
            "label": self.labels.astype(np.int64),
            "case_id": self.case_id,
        }


def _check_boxes(boxes: np.ndarray, path: Path, where: str) -> np.ndarray:
    if boxes.size == 0:
        return boxes.reshape(0, boxes.shape[1] if boxes.ndim == 2 and boxes.shape[1] in (4, 6) else 6)
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 6):
        raise AnnotationError(path, f"{where}: boxes must have 4 (2D) or 6 (3D) values each, got shape {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise AnnotationError(path, f"{where}: boxes contain NaN or infinite values")
    return boxes


def read_monai_datalist(
    path: Path | str, key: str = "training", base_dir: Path | str | None = None
) -> list[CaseRecord]:
    """Read one split of a MONAI detection datalist.

    Args:
        path: the JSON file.
        key: the split (``"training"``, ``"validation"``, ``"test"``...).
        base_dir: folder image paths are relative to (default: the JSON's folder).

    Returns:
        Records with ``cccwhd`` boxes converted to StandardMode.

    Raises:
        AnnotationError: unreadable JSON, unknown split, malformed items.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnnotationError(p, f"cannot read the datalist: {e}") from e
    if key not in doc:
        raise AnnotationError(p, f"no split {key!r} (available: {sorted(k for k in doc if isinstance(doc[k], list))})")
    base = Path(base_dir) if base_dir is not None else p.parent
    records = []
    for n, item in enumerate(doc[key]):
        where = f"{key}[{n}]"
        if "image" not in item:
            raise AnnotationError(p, f"{where} has no 'image'")
        boxes = _check_boxes(np.asarray(item.get("box", []), dtype=np.float64), p, where)
        labels = np.asarray(item.get("label", [0] * len(boxes)), dtype=np.int64).reshape(-1)
        if len(labels) != len(boxes):
            raise AnnotationError(p, f"{where}: {len(boxes)} boxes but {len(labels)} labels")
        if (boxes[:, boxes.shape[1] // 2 :] <= 0).any():
            raise AnnotationError(p, f"{where}: box sizes (w, h, d) must be positive")
        image = item["image"]
        image_path = image if Path(image).is_absolute() else str(base / image)
        case_id = str(item.get("seriesuid") or item.get("case_id") or Path(image).name.split(".")[0])
        extra = {k: v for k, v in item.items() if k not in ("image", "box", "label")}
        records.append(CaseRecord(case_id, image_path, cccwhd_to_standard(boxes).numpy(), labels, extra))
    return records


def write_monai_datalist(splits: Mapping[str, Sequence[CaseRecord]], path: Path | str) -> Path:
    """Write records as a MONAI detection datalist (``cccwhd``, LPS mm).

    Args:
        splits: split name -> records.
        path: output JSON.

    Returns:
        The path written.
    """
    from medrpn.overlays.atomic import atomic_write_text

    doc: dict[str, Any] = {"box_mode": "cccwhd", "coordinates": "world LPS mm"}
    for name, records in splits.items():
        doc[name] = [
            {
                **r.extra,
                "image": r.image,
                "box": standard_to_cccwhd(r.boxes).tolist() if len(r.boxes) else [],
                "label": r.labels.tolist(),
            }
            for r in records
        ]
    return atomic_write_text(path, json.dumps(doc, indent=2))


def read_luna16_csv(path: Path | str, images: Mapping[str, str] | Path | str) -> list[CaseRecord]:
    """Read a LUNA16 ``annotations.csv``.

    Args:
        path: the CSV (``seriesuid,coordX,coordY,coordZ,diameter_mm``).
        images: seriesuid -> image path, or a folder holding ``<seriesuid>.mhd``/``.nii.gz`` files.
            Scans listed in the mapping/folder without a row become records without lesions.

    Returns:
        One record per scan, nodules as cubes of side ``diameter_mm`` with class 0.

    Raises:
        AnnotationError: missing columns, non-numeric values, non-positive diameters, unknown series.
    """
    p = Path(path)
    if isinstance(images, Mapping):
        image_of = dict(images)
    else:
        folder = Path(images)
        image_of = {}
        for f in sorted(folder.iterdir()):
            for suffix in (".mhd", ".mha", ".nii.gz", ".nii", ".nrrd"):
                if f.name.endswith(suffix):
                    image_of[f.name[: -len(suffix)]] = str(f)
    rows: dict[str, list[list[float]]] = {uid: [] for uid in image_of}
    try:
        with p.open(newline="") as fh:
            reader = csv.DictReader(fh)
            needed = {"seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"}
            if reader.fieldnames is None or not needed <= set(reader.fieldnames):
                raise AnnotationError(p, f"needs the columns {sorted(needed)}, got {reader.fieldnames}")
            for n, row in enumerate(reader, start=2):
                try:
                    vals = [float(row[k]) for k in ("coordX", "coordY", "coordZ", "diameter_mm")]
                except ValueError as e:
                    raise AnnotationError(p, f"line {n}: {e}") from e
                if not np.isfinite(vals).all() or vals[3] <= 0:
                    raise AnnotationError(p, f"line {n}: coordinates must be finite and diameter_mm > 0")
                uid = row["seriesuid"]
                if uid not in rows:
                    raise AnnotationError(p, f"line {n}: no image for seriesuid {uid}")
                rows[uid].append(vals)
    except OSError as e:
        raise AnnotationError(p, f"cannot read: {e}") from e
    out = []
    for uid, nodules in rows.items():
        arr = np.asarray(nodules, dtype=np.float64).reshape(-1, 4)
        cccwhd = np.concatenate([arr[:, :3], np.repeat(arr[:, 3:4], 3, axis=1)], axis=1)
        boxes = cccwhd_to_standard(cccwhd).numpy() if len(arr) else np.zeros((0, 6))
        out.append(CaseRecord(uid, image_of[uid], boxes, np.zeros(len(arr), dtype=np.int64)))
    return out


def boxes_from_label_mask(mask: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World boxes of the connected components of every label of a lesion mask.

    Args:
        mask: ``(X, Y)`` or ``(X, Y, Z)`` integer label map (0 = background, value = class id + 1); a
            leading channel of size 1 is accepted.
        affine_ras: RAS voxel-to-world affine of the mask (MONAI convention).

    Returns:
        ``(M, 2*D)`` world boxes (LPS mm) and ``(M,)`` class ids, ordered by label then component.
    """
    m = np.asarray(mask)
    if m.ndim in (3, 4) and m.shape[0] == 1 and m.ndim - 1 == np.asarray(affine_ras).shape[0] - 1:
        m = m[0]
    d = m.ndim
    structure = np.ones((3,) * d, dtype=bool)
    boxes, labels = [], []
    for value in np.unique(m):
        if value <= 0:
            continue
        components, _count = ndimage.label(m == value, structure=structure)
        for sl in ndimage.find_objects(components):
            if sl is None:
                continue
            lo = [s.start for s in sl]
            hi = [s.stop for s in sl]
            boxes.append(lo + hi)
            labels.append(int(value) - 1)
    if not boxes:
        return np.zeros((0, 2 * d)), np.zeros(0, dtype=np.int64)
    world = image_to_world_boxes(np.asarray(boxes, dtype=np.float64), affine_ras).numpy()
    return world, np.asarray(labels, dtype=np.int64)


def read_label_masks(pairs: Sequence[tuple[str, str]]) -> list[CaseRecord]:
    """Records from ``(image, label mask)`` path pairs (masks loaded with their own affine).

    Args:
        pairs: image path and label-mask path per case.

    Returns:
        One record per case with the mask's component boxes.
    """
    from monai.data import NibabelReader
    from monai.transforms import LoadImage

    from medrpn.data.io import SimpleITKReader

    out = []
    for image, mask_path in pairs:
        reader = NibabelReader() if str(mask_path).endswith((".nii", ".nii.gz")) else SimpleITKReader()
        try:
            mask = LoadImage(reader=reader, image_only=True, ensure_channel_first=True)(mask_path)
        except Exception as e:  # any reader failure becomes a named, explained error
            raise AnnotationError(mask_path, f"cannot read the label mask: {e}") from e
        boxes, labels = boxes_from_label_mask(np.asarray(mask[0]).round().astype(np.int64), np.asarray(mask.affine))
        out.append(CaseRecord(Path(image).name.split(".")[0], image, boxes, labels, {"label_mask": mask_path}))
    return out
