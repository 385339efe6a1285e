"""Fixtures for batch inference: tiny real checkpoints, an input folder of synthetic scans, and an oracle detector.

- :func:`write_checkpoint` saves a real (untrained) tiny :class:`LesionDetector` exactly the way
  ``LesionDetectionModule.on_save_checkpoint`` does (``state_dict`` with the ``detector.`` prefix plus the
  ``medrpn_inference`` entry), so the tests load it through :func:`load_inference_model`.
- ``input_dir`` holds three synthetic chest-CT cases with lesions — one as a DICOM series (stored in descending z
  order), one as NIfTI, one as MHD (converted from a NIfTI with SimpleITK) — plus a truncated ``.nii.gz`` and a
  ``notes.txt``.
- :class:`Oracle` replaces ``medrpn.inference.batch.detect_scan``: it returns the ground-truth lesion boxes
  converted with :func:`world_to_image_boxes` and the *preprocessed* affine it receives (and a heatmap that is 1
  inside them), so every conversion downstream (preprocessed grid -> world -> each output format) is checked.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from medrpn.data.synthetic import SyntheticCase, case_is_descending, case_is_empty, generate_case, write_case_dicom
from medrpn.data.synthetic import write_case_nifti as _write_case_nifti
from medrpn.geometry import world_to_image_boxes
from medrpn.inference.whole_scan import ScanDetections, WholeScanConfig
from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.backbone import ResNetFPN
from medrpn.modeling.detector import HeadConfig, LesionDetector, RPNConfig
from medrpn.modeling.structures import Detections, Proposals
from medrpn.module import LesionDetectionModule, PreprocessingConfig

CLASS_NAMES = ("solid", "ground-glass", "part-solid")
SHAPE = (64, 64, 32)
SEED = 0
MODEL_SPACING = (4.0, 4.0, 4.0)
"""Coarse on purpose: the preprocessed grid differs clearly from the source grid (about 2.1 x 2.1 x 2.6 mm)."""


# ----------------------------------------------------------------------------------------------- checkpoints
def make_detector(spatial_dims: int = 3, in_channels: int = 1, spacing_mm: tuple[float, ...] = MODEL_SPACING):
    """A tiny real detector: ``ResNetFPN`` variant "tiny", 2 FPN levels, anchors in mm."""
    d = spatial_dims
    backbone = ResNetFPN(spatial_dims=d, in_channels=in_channels, variant="tiny", return_stages=(1, 2), fpn_channels=16)
    anchors = AnchorGenerator(
        spatial_dims=d,
        sizes=None,
        shapes=[[[8.0] * d, [14.0] * d], [[20.0] * d, [32.0] * d]],
        spacing_mm=spacing_mm[:d],
    )
    return LesionDetector(
        backbone=backbone,
        anchor_generator=anchors,
        num_classes=len(CLASS_NAMES),
        rpn=RPNConfig(pre_nms_top_k_test=200, post_nms_top_k_test=50),
        head=HeadConfig(roi_size=3, representation_size=32, max_detections=5),
    )


def write_checkpoint(
    path: Path,
    detector: LesionDetector,
    *,
    spacing_mm: tuple[float, ...] = MODEL_SPACING,
    patch_size: tuple[int, ...] | None = None,
    extra: dict[str, Any] | None = None,
    hessian_sigmas_mm: tuple[float, ...] = (),
) -> Path:
    """Save ``detector`` the way ``LesionDetectionModule.on_save_checkpoint`` does (Lightning-style dict)."""
    module = LesionDetectionModule(
        detector=detector,
        inference=WholeScanConfig(patch_size=patch_size, max_detections=5, max_proposals=20),
        preprocessing=PreprocessingConfig(
            spacing_mm=tuple(spacing_mm),
            intensity="ct",
            ct_window=(-1000.0, 400.0),
            hessian_sigmas_mm=hessian_sigmas_mm,
        ),
        class_names=CLASS_NAMES,
        froc_plot=False,
    )
    ckpt: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
    }
    module.on_save_checkpoint(ckpt)
    ckpt.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="session")
def ckpt_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3D checkpoint (one 48 x 48 x 32 patch covers a whole preprocessed test scan)."""
    torch.manual_seed(0)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny3d.ckpt", make_detector(3), patch_size=(48, 48, 32))


@pytest.fixture(scope="session")
def ckpt_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2D checkpoint (1 mm in-plane spacing)."""
    torch.manual_seed(0)
    det = make_detector(2, spacing_mm=(1.0, 1.0))
    return write_checkpoint(tmp_path_factory.mktemp("ckpt2d") / "tiny2d.ckpt", det, spacing_mm=(1.0, 1.0, 1.0))


# --------------------------------------------------------------------------------------------------- inputs
def _indices_with_lesions(count: int, *, descending_first: bool) -> list[int]:
    chosen: list[int] = []
    index = 0
    while len(chosen) < count:
        if not case_is_empty(SEED, index) and (chosen or not descending_first or case_is_descending(SEED, index)):
            chosen.append(index)
        index += 1
    return chosen


@dataclass(frozen=True)
class Inputs:
    """The input folder and what it holds."""

    root: Path
    cases: dict[str, SyntheticCase]  # scan_id -> case
    formats: dict[str, str]  # scan_id -> "dicom" | "nifti" | "mhd"
    sources: dict[str, str]  # scan_id -> path relative to root
    corrupt: str  # relative path of the truncated NIfTI


def write_mhd_from_nifti(nifti: Path, mhd: Path) -> Path:
    """Convert with SimpleITK (geometry carried over: LPS direction, spacing, origin)."""
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(mhd))
    return mhd


def build_inputs(root: Path, scratch: Path) -> Inputs:
    """Write the standard input folder into ``root`` (``scratch`` holds intermediates outside it)."""
    i_dicom, i_nifti, i_mhd = _indices_with_lesions(3, descending_first=True)
    cases: dict[str, SyntheticCase] = {}
    formats: dict[str, str] = {}
    sources: dict[str, str] = {}
    c = generate_case(i_dicom, SEED, shape=SHAPE)
    assert c.descending
    write_case_dicom(c, root / "dicom" / c.case_id)
    cases[c.series_uid], formats[c.series_uid], sources[c.series_uid] = c, "dicom", f"dicom/{c.case_id}"
    c = generate_case(i_nifti, SEED, shape=SHAPE)
    _write_case_nifti(c, root / "nifti" / f"{c.case_id}.nii.gz", scratch / f"{c.case_id}_label.nii.gz")
    cases[c.case_id], formats[c.case_id], sources[c.case_id] = c, "nifti", f"nifti/{c.case_id}.nii.gz"
    c = generate_case(i_mhd, SEED, shape=SHAPE)
    tmp_nii = scratch / f"{c.case_id}.nii.gz"
    _write_case_nifti(c, tmp_nii, scratch / f"{c.case_id}_label.nii.gz")
    (root / "mhd").mkdir(parents=True, exist_ok=True)
    write_mhd_from_nifti(tmp_nii, root / "mhd" / f"{c.case_id}.mhd")
    cases[c.case_id], formats[c.case_id], sources[c.case_id] = c, "mhd", f"mhd/{c.case_id}.mhd"
    # a truncated NIfTI and a text file
    broken = root / "broken" / "corrupt.nii.gz"
    broken.parent.mkdir(parents=True, exist_ok=True)
    data = tmp_nii.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("reading notes, not a scan\n")
    return Inputs(root=root, cases=cases, formats=formats, sources=sources, corrupt="broken/corrupt.nii.gz")


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """The shared, read-only input folder (never write into it)."""
    base = tmp_path_factory.mktemp("inputs")
    scratch = tmp_path_factory.mktemp("scratch")
    return build_inputs(base / "scans", scratch)


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root`` (relative POSIX path -> hex digest), plus the folder list."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[Path(dirpath, name).relative_to(root).as_posix() + "/"] = "dir"
        for name in filenames:
            p = Path(dirpath, name)
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_dx(path: Path, shape: tuple[int, int] = (100, 80), spacing: float = 0.5) -> Path:
    """A 2D DX image (``shape`` = columns x rows) with a bright square."""
    image = np.full(shape, 200, dtype=np.uint16)
    image[30:50, 20:40] = 3000
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "SECRET"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape[1], shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
    ds.ImagerPixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
    ds.PixelData = np.ascontiguousarray(image.T).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------- oracle
class Oracle:
    """Stand-in for ``detect_scan`` returning the ground truth of the scan it is given.

    Attributes:
        cases: scan_id -> case.
        calls: ``(scan_id, preprocessed affine, spatial shape)`` per call.
    """

    def __init__(self, cases: dict[str, SyntheticCase]) -> None:
        self.cases = cases
        self.calls: list[tuple[str, np.ndarray, tuple[int, ...]]] = []

    @staticmethod
    def score(rank_index: int) -> float:
        """Score of the ``rank_index``-th lesion (distinct, decreasing: rank = lesion order)."""
        return 0.9 - 0.1 * rank_index

    def __call__(
        self,
        detector: Any,
        volume: Any,
        config: WholeScanConfig,
        context: int = 0,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> ScanDetections:
        assert isinstance(volume, MetaTensor), "batch inference must hand detect_scan the preprocessed MetaTensor"
        assert config.heatmap
        scan_id = str(volume.meta["scan_id"])
        affine = np.asarray(volume.affine, dtype=np.float64)
        spatial = tuple(int(s) for s in volume.shape[2:])
        self.calls.append((scan_id, affine, spatial))
        lesions = self.cases[scan_id].lesions
        world = np.asarray([les.box for les in lesions], dtype=np.float64).reshape(-1, 6)
        boxes = world_to_image_boxes(world, affine).float()
        n = len(lesions)
        scores = torch.tensor([self.score(i) for i in range(n)], dtype=torch.float32)
        labels = torch.tensor([les.class_id for les in lesions], dtype=torch.long)
        probs = torch.full((n, len(CLASS_NAMES)), 0.05)
        probs[torch.arange(n), labels] = scores
        heat = torch.zeros(spatial)
        centres = [torch.arange(s, dtype=torch.float32) + 0.5 for s in spatial]
        for b in boxes:
            inside = [(c >= b[a]) & (c < b[a + 3]) for a, c in enumerate(centres)]
            heat[inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]] = 1.0
        if progress is not None:
            progress(1, 1)
        dets = Detections(boxes, scores, labels, probs, scores.clone())
        props = Proposals(boxes.clone(), scores.clone(), torch.zeros(n, dtype=torch.long))
        return ScanDetections(dets, props, heat)


@pytest.fixture
def oracle(inputs: Inputs, monkeypatch: pytest.MonkeyPatch) -> Iterator[Oracle]:
    """Patch ``medrpn.inference.batch.detect_scan`` with the :class:`Oracle` for one test."""
    o = Oracle(inputs.cases)
    monkeypatch.setattr("medrpn.inference.batch.detect_scan", o)
    yield o
