"""DICOM overlays of one scan's findings: a BINARY SEG, a TID 1500 Comprehensive 3D SR and a GSPS.

All three objects are built with highdicom from the **headers** of the source CT instances (read with
pydicom, pixel data is never loaded) and land in the source study as new series:

* ``seg.dcm`` — :class:`highdicom.seg.Segmentation` (BINARY; dicom3tools' 2022 ``dciodvfy`` does not know
  the LABELMAP SOP class), **one segment per finding**, the finding's box filled on the source grid.
  Empty frames are omitted. Frames are matched to source slices by their ImagePositionPatient, which
  is copied verbatim from the source instance, so every frame references the CT slice it lies on
  whatever order highdicom sorts the frames in.
* ``sr.dcm`` — :class:`highdicom.sr.Comprehensive3DSR` holding a TID 1500 Measurement Report. TID 1410/1411
  allow exactly **one** region reference per measurement group, so every finding gets up to two groups
  sharing one tracking identifier (UID + ``"Finding N"``):

  - a *planar* group (TID 1410) whose region is the box outline on the axial plane through the box
    centre, a closed POLYGON SCOORD3D in LPS mm;
  - a *volumetric* group (TID 1411) referencing the finding's SEG segment (only when a SEG is written).

  Both carry the detection score as a ``Probability`` measurement (UCUM ``1``, no units), the lesion
  class as a qualitative evaluation (private coding scheme ``99MEDRPN``), finding type SCT "Lesion" and
  finding category SCT "Morphologically abnormal structure".
* ``gsps.dcm`` — :class:`highdicom.pr.GrayscaleSoftcopyPresentationState` referencing every source slice
  (so its lung window applies to the whole series) with one graphic annotation per slice that shows a
  finding: a closed 5-point POLYLINE in PIXEL units per box plus a text label ``"#rank p=score class"``.

Which voxels a box covers: voxel ``i`` is covered when its centre lies in the box (``lo <= i + 0.5 < hi``
in voxel-edge image coordinates, see :mod:`medrpn.geometry`); along the slice axis the actual
ImagePositionPatient of every slice is used. A box thinner than a voxel still covers the voxel holding
its centre; a box entirely outside the grid is an error.

A scan **without findings** gets no SEG (a Segmentation needs at least one segment; the returned
``seg`` path is ``None``), an SR whose only group (TID 1501) states "CAD Processing and Findings Summary:
All algorithms succeeded; without findings", and a GSPS with the lung window and a ``"medrpn: no
findings"`` text on every slice.

The SEG and GSPS copy the source's BodyPartExamined; the GSPS also its Laterality, or an empty (unknown)
Laterality when the source has no BodyPartExamined (dciodvfy requires one or the other). Only UIDs are
logged, never patient or study attributes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from medrpn import __version__
from medrpn.geometry import world_to_image_boxes, world_to_voxel
from medrpn.inference.results import Finding, ScanResult
from medrpn.overlays.atomic import atomic_path

__all__ = [
    "GSPS_FILENAME",
    "LUNG_WINDOW",
    "SEG_FILENAME",
    "SR_FILENAME",
    "DicomOutputs",
    "write_dicom_objects",
]

logger = logging.getLogger(__name__)

SEG_FILENAME = "seg.dcm"
SR_FILENAME = "sr.dcm"
GSPS_FILENAME = "gsps.dcm"

LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
"""(centre/level, width) of the GSPS VOI window, HU."""

PRIVATE_SCHEME = "99MEDRPN"
"""Private coding scheme designator of the lesion-class codes."""

_LESION_CLASS_NAME = hd.sr.CodedConcept(value="LESIONCLASS", scheme_designator=PRIVATE_SCHEME, meaning="Lesion class")
_FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
_FINDING_TYPE = codes.SCT.Lesion
_EPS = 1e-6
_POS_TOL_VOXELS = 0.5


@dataclass(frozen=True)
class DicomOutputs:
    """Paths of the written DICOM objects.

    Attributes:
        seg: the BINARY Segmentation, ``None`` when the scan has no findings (a SEG needs a segment).
        sr: the Comprehensive 3D SR (TID 1500 Measurement Report).
        gsps: the Grayscale Softcopy Presentation State.
    """

    seg: Path | None
    sr: Path
    gsps: Path


@dataclass(frozen=True)
class _Footprint:
    """Where one finding lies on the source grid.

    Attributes:
        columns: ``(i0, i1)`` covered column (array axis 0) voxel range, end exclusive.
        rows: ``(j0, j1)`` covered row (array axis 1) voxel range, end exclusive.
        slices: covered slice indices ``k``, ascending.
        pixel_box: ``(x0, y0, x1, y1)`` the box in DICOM PIXEL units (x = column, y = row; the top-left
            corner of the top-left pixel is ``(0, 0)``), clipped to the image.
    """

    columns: tuple[int, int]
    rows: tuple[int, int]
    slices: tuple[int, ...]
    pixel_box: tuple[float, float, float, float]


def _covered_range(lo: float, hi: float, size: int, what: str) -> tuple[int, int]:
    """Voxel index range ``[a, b)`` whose centres lie in ``[lo, hi)`` (voxel-edge coordinates), clipped."""
    if hi <= 0.0 or lo >= size:
        raise ValueError(f"box lies outside the grid along the {what} axis ([{lo:.3f}, {hi:.3f}) vs [0, {size}))")
    a = max(math.ceil(lo - 0.5 - _EPS), 0)
    b = min(math.ceil(hi - 0.5 - _EPS), size)
    if b <= a:  # thinner than a voxel: the voxel holding the (clipped) centre
        centre = min(max((lo + hi) / 2.0, 0.0), size - _EPS)
        a = math.floor(centre)
        b = a + 1
    return a, b


def _footprint(finding: Finding, affine_ras: np.ndarray, shape: tuple[int, ...], slice_pos: np.ndarray) -> _Footprint:
    """Source-grid footprint of a finding.

    Args:
        finding: the finding (LPS mm box).
        affine_ras: RAS voxel-to-world affine of the source grid.
        shape: ``(X, Y, Z)`` = (columns, rows, slices).
        slice_pos: ``(Z,)`` continuous slice-axis voxel coordinate of every slice's actual position.

    Returns:
        The footprint.
    """
    img = world_to_image_boxes(np.asarray([finding.box], dtype=np.float64), affine_ras)[0].tolist()
    cols = _covered_range(img[0], img[3], shape[0], "column")
    rows = _covered_range(img[1], img[4], shape[1], "row")
    lo_k, hi_k = img[2], img[5]
    centres = slice_pos + 0.5
    covered = np.nonzero((centres >= lo_k - _EPS) & (centres < hi_k - _EPS))[0]
    if covered.size == 0:
        if hi_k <= centres.min() - 0.5 or lo_k >= centres.max() + 0.5:
            raise ValueError(f"box lies outside the grid along the slice axis ([{lo_k:.3f}, {hi_k:.3f}))")
        covered = np.asarray([int(np.argmin(np.abs(centres - (lo_k + hi_k) / 2.0)))])
    x0, x1 = min(max(img[0], 0.0), shape[0]), min(max(img[3], 0.0), shape[0])
    y0, y1 = min(max(img[1], 0.0), shape[1]), min(max(img[4], 0.0), shape[1])
    # a box thinner than a pixel (after clipping) is drawn as its covered pixel
    if x1 - x0 < 1e-3:
        x0, x1 = float(cols[0]), float(cols[1])
    if y1 - y0 < 1e-3:
        y0, y1 = float(rows[0]), float(rows[1])
    return _Footprint(
        columns=cols,
        rows=rows,
        slices=tuple(int(k) for k in covered),
        pixel_box=(float(x0), float(y0), float(x1), float(y1)),
    )


def _read_sources(result: ScanResult) -> list[Dataset]:
    """Read the source headers and check they are the single-frame series described by ``result``."""
    if not result.dicom_files:
        raise ValueError(
            f"scan {result.scan_id!r} has no source DICOM files (source format {result.source_format!r}): "
            "DICOM SEG/SR/GSPS can only be written for DICOM-sourced scans"
        )
    if len(result.spatial_shape) != 3:
        raise ValueError(f"scan {result.scan_id!r}: DICOM objects need a 3D grid, got shape {result.spatial_shape}")
    n_cols, n_rows, n_slices = (int(s) for s in result.spatial_shape)
    if len(result.dicom_files) != n_slices:
        raise ValueError(
            f"scan {result.scan_id!r}: {len(result.dicom_files)} source files for {n_slices} slices "
            "(only series of single-frame instances are supported)"
        )
    datasets: list[Dataset] = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in result.dicom_files]
    first = datasets[0]
    for k, ds in enumerate(datasets):
        if ds.SeriesInstanceUID != first.SeriesInstanceUID:
            raise ValueError(f"scan {result.scan_id!r}: source file {k} belongs to another series")
        if int(ds.Rows) != n_rows or int(ds.Columns) != n_cols:
            raise ValueError(
                f"scan {result.scan_id!r}: source file {k} is {ds.Columns}x{ds.Rows} (columns x rows), "
                f"the grid {n_cols}x{n_rows}"
            )
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"scan {result.scan_id!r}: multi-frame source instances are not supported")
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise ValueError(f"scan {result.scan_id!r}: source file {k} has no image plane geometry")
    if result.sop_instance_uids and tuple(result.sop_instance_uids) != tuple(ds.SOPInstanceUID for ds in datasets):
        raise ValueError(f"scan {result.scan_id!r}: sop_instance_uids do not match the source files")
    if result.series_uid and result.series_uid != first.SeriesInstanceUID:
        raise ValueError(f"scan {result.scan_id!r}: series_uid does not match the source files")
    return datasets


def _slice_positions(result: ScanResult, datasets: Sequence[Dataset]) -> np.ndarray:
    """Continuous slice-axis voxel coordinate of every source slice, checked against the affine.

    Array axis 0 of the grid must run along the DICOM rows (column index, ``PixelSpacing[1]`` apart),
    axis 1 down the columns (row index, ``PixelSpacing[0]`` apart), and slice ``k`` must lie at voxel
    ``(0, 0, ~k)``.

    Raises:
        ValueError: if the affine is not the grid of these files (transposed, other spacing) or the files
            are not in slice order.
    """
    affine = np.asarray(result.affine_ras, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    first = datasets[0]
    iop = np.asarray([float(v) for v in first.ImageOrientationPatient], dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    for axis, expected_step in ((0, iop[:3] * col_spacing), (1, iop[3:] * row_spacing)):
        if np.linalg.norm(lps[:3, axis] - expected_step) > 1e-3 * np.linalg.norm(expected_step) + 1e-4:
            raise ValueError(
                f"scan {result.scan_id!r}: affine_ras axis {axis} ({np.round(lps[:3, axis], 4).tolist()} mm LPS) "
                f"does not match the DICOM orientation/spacing ({np.round(expected_step, 4).tolist()})"
            )
    ipp = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in datasets], dtype=np.float64)
    vox = world_to_voxel(ipp, affine).numpy()
    expected = np.zeros_like(vox)
    expected[:, 2] = np.arange(len(datasets))
    dev = np.abs(vox - expected)
    if float(dev.max()) >= _POS_TOL_VOXELS:
        k = int(np.argmax(dev.max(axis=1)))
        raise ValueError(
            f"scan {result.scan_id!r}: source slice {k} lies at voxel {np.round(vox[k], 2).tolist()}, "
            f"expected [0, 0, {k}]: dicom_files are not in slice order or affine_ras is not their grid"
        )
    return vox[:, 2]


def _segment_label(f: Finding) -> str:
    return f"Finding {f.rank} ({f.class_name}, p={f.score:.2f})"[:64]


def _text_label(f: Finding) -> str:
    return f"#{f.rank} p={f.score:.2f} {f.class_name}"


def _class_code(f: Finding) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=f"C{f.label}", scheme_designator=PRIVATE_SCHEME, meaning=f.class_name[:64] or "?")


def _build_seg(
    result: ScanResult,
    sources: Sequence[Dataset],
    footprints: Sequence[_Footprint],
    tracking_uids: Sequence[str],
    *,
    manufacturer: str,
    series_number: int,
) -> hd.seg.Segmentation:
    """BINARY SEG with one segment per finding; frames only on the slices a finding covers."""
    planes = sorted({k for fp in footprints for k in fp.slices})
    plane_index = {k: n for n, k in enumerate(planes)}
    n_rows, n_cols = int(sources[0].Rows), int(sources[0].Columns)
    mask = np.zeros((len(planes), n_rows, n_cols, len(footprints)), dtype=np.uint8)
    for s, fp in enumerate(footprints):
        (i0, i1), (j0, j1) = fp.columns, fp.rows
        for k in fp.slices:
            mask[plane_index[k], j0:j1, i0:i1, s] = 1
    # positions copied verbatim from the source slices: highdicom matches each plane to its source
    # instance by position (exactly), whatever order it then sorts the frames in
    positions = [
        hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            image_position=[float(v) for v in sources[k].ImagePositionPatient],
        )
        for k in planes
    ]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medrpn",
        family=codes.cid7162.ArtificialIntelligence,
        version=__version__,
        source=manufacturer,
        parameters={"model": result.model[:1000]} if result.model else None,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s + 1,
            segment_label=_segment_label(f),
            segmented_property_category=_FINDING_CATEGORY,
            segmented_property_type=_FINDING_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uids[s],
            tracking_id=f"Finding {f.rank}",
        )
        for s, f in enumerate(result.findings)
    ]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="medrpn",
        software_versions=__version__,
        device_serial_number="0",
        content_description="medrpn lesion proposals",
        content_label="MEDRPN",
        plane_positions=positions,
        omit_empty_frames=True,
        series_description="medrpn findings (SEG)",
    )


def _private_scheme() -> CodingSchemeIdentificationItem:
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name="medrpn lesion classes", responsible_organization="medrpn"
    )


def _copy_series_anatomy(target: Dataset, source: Dataset, *, laterality: bool) -> None:
    """Copy the General Series BodyPartExamined (and Laterality) of the source series into a new series.

    Args:
        target: the new SEG or GSPS.
        source: a source instance.
        laterality: also handle Laterality (Type 2C, required for a paired body part). Without a
            BodyPartExamined nobody can tell whether the part is paired, so it is then sent empty
            ("unknown", as PS3.3 C.7.3.1 allows). Not for a SEG: dciodvfy rejects any Laterality there
            (the Segmentation IOD expects Frame Laterality in the Frame Anatomy functional group instead).
    """
    if source.get("BodyPartExamined"):
        target.BodyPartExamined = source.BodyPartExamined
    if not laterality:
        return
    if source.get("Laterality"):
        target.Laterality = source.Laterality
    elif not source.get("BodyPartExamined"):
        target.Laterality = ""


def _algorithm_id(result: ScanResult) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name="medrpn", version=__version__, parameters=[result.model[:1000]] if result.model else None
    )


class _GroupContent(TypedDict):
    tracking_identifier: hd.sr.TrackingIdentifier
    finding_type: Code
    finding_category: Code
    algorithm_id: hd.sr.AlgorithmIdentification
    measurements: list[hd.sr.Measurement]
    qualitative_evaluations: list[hd.sr.QualitativeEvaluation]


def _group_content(result: ScanResult, f: Finding, tracking_uid: str) -> _GroupContent:
    """Fresh content items (never shared between groups) common to a finding's measurement groups."""
    return {
        "tracking_identifier": hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"Finding {f.rank}"),
        "finding_type": _FINDING_TYPE,
        "finding_category": _FINDING_CATEGORY,
        "algorithm_id": _algorithm_id(result),
        "measurements": [hd.sr.Measurement(name=codes.DCM.Probability, value=float(f.score), unit=codes.UCUM.NoUnits)],
        "qualitative_evaluations": [hd.sr.QualitativeEvaluation(name=_LESION_CLASS_NAME, value=_class_code(f))],
    }


def _build_sr(
    result: ScanResult,
    sources: Sequence[Dataset],
    seg: hd.seg.Segmentation | None,
    tracking_uids: Sequence[str],
    *,
    manufacturer: str,
    series_number: int,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report: a planar (polygon) and, with a SEG, a volumetric (segment) group per finding."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["medrpn", manufacturer]),
        name="medrpn",
        manufacturer_name=manufacturer,
        model_name="medrpn",
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    frame_of_reference = sources[0].FrameOfReferenceUID
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for s, f in enumerate(result.findings):
        x0, y0, z0, x1, y1, z1 = (float(v) for v in f.box)
        zc = (z0 + z1) / 2.0
        polygon = np.asarray([[x0, y0, zc], [x1, y0, zc], [x1, y1, zc], [x0, y1, zc], [x0, y0, zc]], dtype=np.float64)
        region = hd.sr.ImageRegion3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
            graphic_data=polygon,
            frame_of_reference_uid=frame_of_reference,
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=region, **_group_content(result, f, tracking_uids[s])
            )
        )
        if seg is not None:
            segment = hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=s + 1,
                source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID),
            )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=segment, **_group_content(result, f, tracking_uids[s])
                )
            )
    if not result.findings:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="No findings"),
                algorithm_id=_algorithm_id(result),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=codes.DCM.CADProcessingAndFindingsSummary,
                        value=codes.DCM.AllAlgorithmsSucceededWithoutFindings,
                    )
                ],
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    evidence: list[Dataset] = [*sources, *([seg] if seg is not None else [])]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        series_description="medrpn findings (SR)",
        coding_schemes=[_private_scheme()] if result.findings else None,
    )


def _text_box(anchor: tuple[float, float, float, float], text: str, n_cols: int, n_rows: int) -> tuple[float, ...]:
    """Pixel bounding box for a label: above the box if there is room, else below; inside the image."""
    x0, y0, _, y1 = anchor
    height = float(min(max(8.0, n_rows * 0.04), n_rows / 2.0))
    width = float(min(n_cols, max(height, 0.6 * height * len(text))))
    left = min(max(x0, 0.0), n_cols - width)
    if y0 - height >= 0.0:
        top = y0 - height
    elif y1 + height <= n_rows:
        top = y1
    else:
        top = 0.0
    return (left, top, left + width, top + height)


def _build_gsps(
    result: ScanResult,
    sources: Sequence[Dataset],
    footprints: Sequence[_Footprint],
    tracking_uids: Sequence[str],
    *,
    manufacturer: str,
    series_number: int,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """GSPS: lung window on the whole series, one annotation (boxes + labels) per slice with findings."""
    n_rows, n_cols = int(sources[0].Rows), int(sources[0].Columns)
    layer = hd.pr.GraphicLayer(
        layer_name="MEDRPN",
        order=1,
        description="medrpn lesion proposals",
        display_color=hd.color.CIELabColor(90.0, -5.0, 85.0),  # yellow
    )
    groups = [
        hd.pr.GraphicGroup(graphic_group_id=s + 1, label=f"Finding {f.rank}") for s, f in enumerate(result.findings)
    ]
    per_slice: dict[int, tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]] = {}
    for s, (f, fp) in enumerate(zip(result.findings, footprints, strict=True)):
        x0, y0, x1, y1 = fp.pixel_box
        outline = np.asarray([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
        tracking_id, tracking_uid = f"Finding {f.rank}", tracking_uids[s]
        text = _text_label(f)
        for k in fp.slices:
            objects, texts = per_slice.setdefault(k, ([], []))
            objects.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=outline,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    graphic_group=groups[s],
                    tracking_id=tracking_id,
                    tracking_uid=tracking_uid,
                )
            )
            texts.append(
                hd.pr.TextObject(
                    text_value=text,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    bounding_box=_text_box(fp.pixel_box, text, n_cols, n_rows),  # type: ignore[arg-type]
                    text_justification=hd.pr.TextJustificationValues.LEFT,
                    graphic_group=groups[s],
                    tracking_id=tracking_id,
                    tracking_uid=tracking_uid,
                )
            )
    annotations = [
        hd.pr.GraphicAnnotation(
            referenced_images=[sources[k]], graphic_layer=layer, graphic_objects=objects, text_objects=texts
        )
        for k, (objects, texts) in sorted(per_slice.items())
    ]
    if not result.findings:
        text = "medrpn: no findings"
        annotations = [
            hd.pr.GraphicAnnotation(
                referenced_images=[ds],
                graphic_layer=layer,
                text_objects=[
                    hd.pr.TextObject(
                        text_value=text,
                        units=hd.pr.AnnotationUnitsValues.PIXEL,
                        bounding_box=_text_box((0.0, 0.0, 0.0, 0.0), text, n_cols, n_rows),  # type: ignore[arg-type]
                        text_justification=hd.pr.TextJustificationValues.LEFT,
                    )
                ],
            )
            for ds in sources
        ]
    centre, width = LUNG_WINDOW
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=sources,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="medrpn",
        software_versions=__version__,
        device_serial_number="0",
        content_label="MEDRPN",
        content_description="medrpn lesion proposals",
        graphic_annotations=annotations,
        graphic_layers=[layer],
        graphic_groups=groups or None,
        voi_lut_transformations=[
            hd.pr.SoftcopyVOILUTTransformation(window_center=centre, window_width=width, window_explanation="LUNG")
        ],
        series_description="medrpn findings (GSPS)",
    )


def _save(ds: Dataset, path: Path) -> Path:
    with atomic_path(path) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    return path


def write_dicom_objects(
    result: ScanResult, out_dir: Path, *, manufacturer: str = "medrpn", series_number_base: int = 900
) -> DicomOutputs:
    """Write a scan's findings as DICOM SEG, Comprehensive 3D SR and GSPS next to each other.

    The three objects are built in memory first and only then written, each atomically, so invalid input
    fails before anything is written. Without findings no SEG is written, and a ``seg.dcm`` left in
    ``out_dir`` by an earlier run is removed (it would contradict the new SR).

    Args:
        result: findings of a DICOM-sourced scan (``dicom_files`` in slice order ``k = 0..Z-1``).
        out_dir: destination folder (``seg.dcm``, ``sr.dcm``, ``gsps.dcm``); created if needed.
        manufacturer: Manufacturer of the new series.
        series_number_base: SeriesNumber of the SEG; the SR and GSPS get the next two numbers.

    Returns:
        The written paths (``seg`` is ``None`` for a scan without findings).

    Raises:
        ValueError: the scan has no source DICOM files, the files do not match the result's grid, or a
            finding lies entirely outside the grid.
    """
    sources = _read_sources(result)
    slice_pos = _slice_positions(result, sources)
    affine = np.asarray(result.affine_ras, dtype=np.float64)
    footprints = []
    for f in result.findings:
        try:
            footprints.append(_footprint(f, affine, tuple(result.spatial_shape), slice_pos))
        except ValueError as e:
            raise ValueError(f"scan {result.scan_id!r}, finding {f.rank}: {e}") from e
    # one tracking UID per finding, shared by its SEG segment, SR groups and GSPS graphics
    uids = [str(hd.UID()) for _ in footprints]

    seg = None
    if result.findings:
        seg = _build_seg(result, sources, footprints, uids, manufacturer=manufacturer, series_number=series_number_base)
        _copy_series_anatomy(seg, sources[0], laterality=False)
    sr = _build_sr(result, sources, seg, uids, manufacturer=manufacturer, series_number=series_number_base + 1)
    gsps = _build_gsps(
        result, sources, footprints, uids, manufacturer=manufacturer, series_number=series_number_base + 2
    )
    _copy_series_anatomy(gsps, sources[0], laterality=True)

    out = Path(out_dir)
    seg_path = _save(seg, out / SEG_FILENAME) if seg is not None else None
    if seg is None:
        (out / SEG_FILENAME).unlink(missing_ok=True)
    sr_path = _save(sr, out / SR_FILENAME)
    gsps_path = _save(gsps, out / GSPS_FILENAME)
    logger.info(
        "wrote DICOM objects for series %s: SEG %s, SR %s, GSPS %s",
        sources[0].SeriesInstanceUID,
        seg.SOPInstanceUID if seg is not None else None,
        sr.SOPInstanceUID,
        gsps.SOPInstanceUID,
    )
    return DicomOutputs(seg=seg_path, sr=sr_path, gsps=gsps_path)
