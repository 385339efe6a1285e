"""Batch inference over folders of scans, writing overlays for radiologist review (``medrpn infer``).

One scan goes through four steps, each a public function so that the Lightning prediction path
(:class:`medrpn.inference.writer.ScanPredictionWriter`) runs exactly the same code:

1. :func:`prepare_scan` — load the scan (:func:`medrpn.data.io.load_scan`: HU on the **source grid**) and
   preprocess it with the model's settings (:func:`medrpn.data.transforms.preprocessing`: orientation, spacing,
   intensity) -> :class:`LoadedScan`. :func:`try_prepare_scan` returns a :class:`ScanFailure` instead of raising
   (for datasets / DataLoader workers).
2. :func:`predict_scan` — whole-scan detection (:func:`medrpn.inference.whole_scan.detect_scan`) on the
   preprocessed volume, detections -> LPS world boxes through the **preprocessed** affine -> ranked findings,
   objectness heatmap resampled onto the source grid (:func:`medrpn.inference.resample.resample_to_grid`)
   -> :class:`ScanPrediction` (a :class:`~medrpn.inference.results.ScanResult` plus the source HU image).
3. :func:`write_scan_outputs` — the scan's folder: review PNGs, ``findings_labels.nii.gz`` /
   ``objectness.nii.gz``, ``findings.mrk.json``, DICOM SEG/SR/GSPS (DICOM series sources only) and, **last**,
   ``proposals.json``, whose presence marks the scan finished.
4. :func:`finalize_batch` — rebuild ``candidates.csv``, ``failures.csv`` and ``index.html`` from the output
   folder (so scans finished by earlier runs are included), atomically.

:func:`run_batch` plans the batch (:func:`plan_batch`: discovery, output-folder names, skip finished scans,
refuse an output folder inside an input), then processes the scans one by one while a background thread loads
and preprocesses the next one, and never lets one scan's exception stop the batch. :func:`infer_main` is the
``medrpn infer`` command.

Output layout::

    OUT/index.html  OUT/candidates.csv  OUT/failures.csv
    OUT/<scan folder>/proposals.json, finding_01_axial.png ..., findings_labels.nii.gz, objectness.nii.gz,
                      findings.mrk.json, seg.dcm, sr.dcm, gsps.dcm

Scan folders are named from the sanitised scan id (SeriesInstanceUID for DICOM, else the file stem; see
:func:`scan_folder_name`), never from patient attributes; logs name scans by scan id and source path only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol, cast

import numpy as np
import torch
from monai.data import MetaTensor
from tqdm import tqdm

from medrpn.data.errors import ScanError
from medrpn.data.io import ScanSource, discover_scans, load_scan
from medrpn.data.transforms import IntensityPreset, preprocessing
from medrpn.geometry import affine_for_dims, image_to_world_boxes
from medrpn.inference.checkpoint import CheckpointError, InferenceModel, load_inference_model
from medrpn.inference.precision import (
    INFERENCE_PRECISIONS,
    InferencePrecision,
    as_inference_precision,
    cpu_has_native_bf16,
    dtype_name,
    inference_autocast,
    resolve_inference_dtype,
)
from medrpn.inference.resample import resample_to_grid
from medrpn.inference.results import ScanResult, make_findings
from medrpn.inference.whole_scan import WholeScanConfig, detect_scan
from medrpn.modeling.detector import LesionDetector
from medrpn.overlays.dicom import LUNG_WINDOW, write_dicom_objects
from medrpn.overlays.images import index_entries, write_index_html, write_review_images
from medrpn.overlays.nifti import write_nifti_overlays
from medrpn.overlays.slicer import write_slicer_markups
from medrpn.overlays.tables import (
    CANDIDATES_CSV,
    FAILURES_CSV,
    PROPOSALS_JSON,
    collect_candidates,
    write_candidates_csv,
    write_failures_csv,
    write_proposals_json,
)

__all__ = [
    "INDEX_HTML",
    "BatchPlan",
    "BatchReport",
    "LoadedScan",
    "OutputLocationError",
    "PlannedScan",
    "PreprocessingSpec",
    "ProcessedScan",
    "ScanFailure",
    "ScanPrediction",
    "as_inference_model",
    "check_output_location",
    "describe_exception",
    "finalize_batch",
    "infer_main",
    "plan_batch",
    "predict_scan",
    "prepare_scan",
    "process_scan",
    "run_batch",
    "scan_folder_name",
    "try_prepare_scan",
    "write_scan_outputs",
]

logger = logging.getLogger(__name__)

INDEX_HTML: Final = "index.html"
"""File name of the batch review page (in the output root)."""

FOLDER_NAME_MAX: Final = 80
"""Longest scan-folder name (characters)."""

_RESERVED_FOLDER_NAMES: Final = frozenset(
    {INDEX_HTML, CANDIDATES_CSV, FAILURES_CSV}
    | {"con", "prn", "aux", "nul"}
    | {f"com{i}" for i in range(10)}
    | {f"lpt{i}" for i in range(10)}
)
"""Names a scan folder must not take (batch files of the output root, Windows device names)."""


class OutputLocationError(ValueError):
    """The output folder is, contains or lies inside an input folder (medrpn never writes into its inputs)."""


# --------------------------------------------------------------------------------------------------------------
# Data passed between the steps
# --------------------------------------------------------------------------------------------------------------
class ModelLike(Protocol):
    """What :func:`as_inference_model` accepts besides an :class:`InferenceModel`.

    ``LesionDetectionModule`` satisfies it: a ``detector``, its ``preprocessing_cfg``
    (``spacing_mm``, ``intensity``, ``ct_window``, ``orientation``, ``slice_context``), its ``inference_cfg``
    (:class:`WholeScanConfig`) and its ``class_names``. An optional ``checkpoint_path`` attribute names the model
    in the outputs (``ScanResult.model``); otherwise the class name is used.
    """

    @property
    def detector(self) -> LesionDetector: ...

    @property
    def preprocessing_cfg(self) -> Any: ...

    @property
    def inference_cfg(self) -> WholeScanConfig: ...

    @property
    def class_names(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class PreprocessingSpec:
    """The model's preprocessing, as plain data (picklable: safe to hand to DataLoader workers).

    Attributes:
        spacing_mm: voxel spacing the network works at, per axis (a 2D image uses the first two).
        intensity: ``"ct"``, ``"mr"`` or ``"none"``.
        ct_window: HU window of the CT preset.
        orientation: axis codes (a 2D image uses the first two).
        hessian_sigmas_mm: scales of the Hessian blob/tube channels (empty: none).
        hessian_gain: their scale.
    """

    spacing_mm: tuple[float, ...]
    intensity: str
    ct_window: tuple[float, ...]
    orientation: str
    hessian_sigmas_mm: tuple[float, ...] = ()
    hessian_gain: float = 20.0

    @classmethod
    def from_model(cls, model_like: InferenceModel | ModelLike) -> PreprocessingSpec:
        """The spec of an :class:`InferenceModel` or a ``LesionDetectionModule``-like object.

        Args:
            model_like: the model.

        Returns:
            Its preprocessing.
        """
        model = as_inference_model(model_like)
        return cls(
            spacing_mm=tuple(float(s) for s in model.spacing_mm),
            intensity=str(model.intensity),
            ct_window=tuple(float(v) for v in model.ct_window),
            orientation=str(model.orientation),
            hessian_sigmas_mm=tuple(float(s) for s in model.hessian_sigmas_mm),
            hessian_gain=float(model.hessian_gain),
        )

    def transform(self, spatial_dims: int) -> Any:
        """The MONAI ``Compose`` for an image with ``spatial_dims`` axes (over dicts with key ``image``).

        Args:
            spatial_dims: 2 or 3.

        Returns:
            :func:`medrpn.data.transforms.preprocessing` without loading and without boxes.
        """
        spacing = self.spacing_mm[:spatial_dims] if self.spacing_mm else None
        if spacing is not None and len(spacing) < spatial_dims:
            spacing = tuple(spacing) + (spacing[-1],) * (spatial_dims - len(spacing))
        return preprocessing(
            spacing_mm=spacing,
            intensity=cast(IntensityPreset, self.intensity),
            ct_window=self.ct_window,
            orientation=self.orientation[:spatial_dims] or None,
            with_boxes=False,
            load=False,
            hessian_sigmas_mm=self.hessian_sigmas_mm,
            hessian_gain=self.hessian_gain,
        )


@dataclass(frozen=True)
class PlannedScan:
    """One scan of a batch and where its outputs go.

    Attributes:
        source: the scan as discovered.
        input_root: the ``--input`` folder it was found under (a file input: its folder).
        relative_source: the scan's path relative to ``input_root`` (POSIX separators): the file, or for a DICOM
            series the folder of its slices (``"."`` when that is the input folder itself).
        folder: name of its output folder (see :func:`scan_folder_name`).
    """

    source: ScanSource
    input_root: Path
    relative_source: str
    folder: str


@dataclass
class BatchPlan:
    """What :func:`plan_batch` decided.

    Attributes:
        todo: scans to process, in discovery order.
        finished: scans whose ``proposals.json`` already exists (skipped unless ``overwrite``).
        failures: ``(source, reason)`` of inputs that could not even be discovered (unreadable files...).
        skipped_files: number of files left out on purpose (text files, non-image DICOM objects...).
    """

    todo: list[PlannedScan] = field(default_factory=list)
    finished: list[PlannedScan] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_files: int = 0


@dataclass
class LoadedScan:
    """A scan loaded and preprocessed for one model (output of :func:`prepare_scan`).

    Attributes:
        scan: the planned scan.
        image: ``(1, *source_shape)`` float32 MetaTensor on the source grid (HU for CT) with the loader's meta.
        network_input: ``(1, *shape)`` preprocessed MetaTensor; its ``.affine`` maps its voxels to RAS mm.
        source_affine: ``(4, 4)`` RAS affine of the source grid (a copy taken before preprocessing).
        timings: seconds spent in ``load`` and ``preprocess``.
    """

    scan: PlannedScan
    image: MetaTensor
    network_input: MetaTensor
    source_affine: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    def to(self, device: torch.device | str, **kwargs: Any) -> LoadedScan:
        """A copy whose ``network_input`` is on ``device`` (the source image stays on the CPU).

        Lightning's batch transfer calls this (an object with ``.to`` is moved as a whole instead of being
        traversed field by field, which frozen fields such as :class:`ScanSource` would not allow).

        Args:
            device: target device.
            kwargs: ignored (``non_blocking``...).

        Returns:
            The moved scan.
        """
        return replace(self, network_input=cast(MetaTensor, self.network_input.to(device)))


@dataclass
class ScanPrediction:
    """Everything needed to write one scan's outputs: the unit passed from ``predict_step`` to the writer.

    Produced by :func:`predict_scan`; consumed by :func:`write_scan_outputs` (the batch runner and
    :class:`medrpn.inference.writer.ScanPredictionWriter` both call it).

    Attributes:
        result: the findings in LPS world mm, the source grid, DICOM references, heatmap on the source grid.
        image: the scan on the source grid, ``result.spatial_shape`` float32 (HU for CT), for the review PNGs.
        folder: name of the scan's output folder (relative to the output root).
        window: review-image display window ``(level, width)``; ``None`` (percentile range) for non-CT.
        timings: seconds per stage (``load``, ``preprocess``, ``detect``, ``postprocess``; the writer adds
            ``write``).
    """

    result: ScanResult
    image: np.ndarray
    folder: str
    window: tuple[float, float] | None
    timings: dict[str, float] = field(default_factory=dict)

    def to(self, device: torch.device | str, **kwargs: Any) -> ScanPrediction:
        """Itself (everything is NumPy on the CPU); lets Lightning move predictions without traversing them.

        Args:
            device: ignored.
            kwargs: ignored.

        Returns:
            ``self``.
        """
        return self


@dataclass(frozen=True)
class ScanFailure:
    """A scan that could not be processed: one row of ``failures.csv``.

    Attributes:
        source: the scan's path relative to its input root (or the path as found).
        reason: ``"ExceptionType: message"``.
    """

    source: str
    reason: str

    def as_row(self) -> tuple[str, str]:
        """``(source, reason)``."""
        return (self.source, self.reason)

    def to(self, device: torch.device | str, **kwargs: Any) -> ScanFailure:
        """Itself (lets Lightning's batch transfer pass failures through unchanged).

        Args:
            device: ignored.
            kwargs: ignored.

        Returns:
            ``self``.
        """
        return self


@dataclass(frozen=True)
class ProcessedScan:
    """A scan processed by :func:`run_batch`.

    Attributes:
        source: path relative to its input root.
        scan_id: SeriesInstanceUID or file stem.
        folder: its output folder.
        num_findings: number of findings written.
        timings: seconds per stage (``load``, ``preprocess``, ``detect``, ``postprocess``, ``write``).
    """

    source: str
    scan_id: str
    folder: Path
    num_findings: int
    timings: dict[str, float]


@dataclass
class BatchReport:
    """Outcome of :func:`run_batch`.

    Attributes:
        output: the output root.
        processed: scans processed in this run.
        skipped: sources (relative to their input root) skipped because they were already finished.
        failures: ``(source, reason)`` of every scan or file that failed in this run.
        index_html: the review page.
        candidates_csv: LUNA16 candidates of every finished scan in the output root.
        failures_csv: the failures of this run.
    """

    output: Path
    processed: list[ProcessedScan] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    index_html: Path | None = None
    candidates_csv: Path | None = None
    failures_csv: Path | None = None

    @property
    def num_findings(self) -> int:
        """Findings written in this run."""
        return sum(p.num_findings for p in self.processed)

    def summary(self) -> str:
        """A few human-readable lines (scan ids and relative paths only)."""
        lines = [
            f"medrpn infer: {len(self.processed)} scan(s) processed ({self.num_findings} finding(s)), "
            f"{len(self.skipped)} skipped (already finished), {len(self.failures)} failed"
        ]
        lines += [f"  FAILED {source}: {reason.splitlines()[0] if reason else ''}" for source, reason in self.failures]
        if self.candidates_csv is not None:
            lines.append(f"candidates: {self.candidates_csv}")
        if self.failures_csv is not None:
            lines.append(f"failures:   {self.failures_csv}")
        if self.index_html is not None:
            lines.append(f"review:     {self.index_html}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------
def describe_exception(exc: BaseException) -> str:
    """``"ExceptionType: message"`` (just the type when the message is empty).

    Args:
        exc: the exception.

    Returns:
        The failure reason.
    """
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def as_inference_model(model_like: InferenceModel | ModelLike) -> InferenceModel:
    """An :class:`InferenceModel` view of a model (the same detector object, no copy).

    Args:
        model_like: an :class:`InferenceModel`, or an object with ``detector``, ``preprocessing_cfg``,
            ``inference_cfg`` and ``class_names`` (``LesionDetectionModule``).

    Returns:
        The inference model.

    Raises:
        TypeError: when ``model_like`` is neither.
    """
    if isinstance(model_like, InferenceModel):
        return model_like
    try:
        detector = model_like.detector
        pre = model_like.preprocessing_cfg
        config = model_like.inference_cfg
        names = tuple(str(n) for n in model_like.class_names)
    except AttributeError as e:
        raise TypeError(
            f"expected an InferenceModel or a LesionDetectionModule-like object, got {type(model_like).__name__}: {e}"
        ) from e
    return InferenceModel(
        detector=detector,
        spacing_mm=tuple(float(s) for s in pre.spacing_mm),
        intensity=str(pre.intensity),
        ct_window=tuple(float(v) for v in pre.ct_window),
        orientation=str(pre.orientation),
        slice_context=int(pre.slice_context),
        hessian_sigmas_mm=tuple(float(s) for s in getattr(pre, "hessian_sigmas_mm", ())),
        hessian_gain=float(getattr(pre, "hessian_gain", 20.0)),
        whole_scan=config,
        class_names=names or ("lesion",),
        source=str(getattr(model_like, "checkpoint_path", None) or type(model_like).__name__),
    )


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def scan_folder_name(scan_id: str, *, suffix: str = "", max_length: int = FOLDER_NAME_MAX) -> str:
    """A safe output-folder name from a scan id.

    Only ``[A-Za-z0-9._-]`` are kept (runs of anything else become ``_``), ``..`` runs collapse to one dot,
    leading/trailing dots, dashes and underscores are stripped (no hidden folders, no ``..``), names of the
    output root's own files and Windows device names get a ``scan_`` prefix, an empty result becomes ``scan``,
    and long names are cut and completed with a hash of the full id so that they stay distinct.

    Args:
        scan_id: SeriesInstanceUID or file stem (may be hostile: ``../../etc``).
        suffix: appended after a ``-`` (a disambiguating hash); counted in ``max_length``.
        max_length: longest result.

    Returns:
        The folder name: never empty, no path separator, no leading dot, at most ``max_length`` characters.
    """
    text = unicodedata.normalize("NFKD", str(scan_id)).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = text.strip("._-")
    if not text:
        text = "scan"
    if text.lower() in _RESERVED_FOLDER_NAMES or text.split(".")[0].lower() in _RESERVED_FOLDER_NAMES:
        text = f"scan_{text}"
    tail = f"-{suffix}" if suffix else ""
    room = max(max_length - len(tail), 12)
    if len(text) > room:
        text = text[: room - 9].rstrip("._-") + "-" + _short_hash(str(scan_id))
    return text + tail


def _relative(path: Path | str, root: Path) -> str:
    p = Path(path)
    try:
        rel = os.path.relpath(p.resolve(), root.resolve())
    except ValueError:  # another drive (Windows)
        return str(p)
    if rel.startswith(".."):
        return str(p)
    return Path(rel).as_posix()


def _source_path(source: ScanSource) -> Path:
    """The file of a scan, or the folder of a DICOM series."""
    if source.kind == "dicom_series" and source.paths:
        return Path(os.path.commonpath([str(Path(p).parent) for p in source.paths]))
    return Path(source.paths[0]) if source.paths else Path(source.scan_id)


def _input_root(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_location(inputs: Sequence[Path | str], output: Path | str) -> None:
    """Refuse an output folder that is an input folder, lies inside one, or contains one.

    Paths are compared after resolving symlinks. A file input only forbids the output from being that file
    or containing it.

    Args:
        inputs: the input folders/files.
        output: the output folder (need not exist).

    Raises:
        OutputLocationError: with a message naming both folders (or the output, when it is an existing file).
    """
    out = Path(output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputLocationError(f"output {output} exists and is not a folder")
    for raw in inputs:
        inp = Path(raw).expanduser()
        resolved = inp.resolve()
        if inp.is_dir() and _is_within(out, resolved):
            what = "is the input folder" if out == resolved else "lies inside the input folder"
            raise OutputLocationError(
                f"output folder {output} {what} {raw}: medrpn never writes into its inputs; "
                "choose an output folder outside every --input"
            )
        if _is_within(resolved, out):
            raise OutputLocationError(
                f"input {raw} lies inside the output folder {output}: choose an output folder that does not "
                "contain any --input"
            )


def _folder_owner(folder: Path) -> tuple[str, str] | None:
    """``(scan_id, source)`` of the finished scan in ``folder``, if any."""
    path = folder / PROPOSALS_JSON
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return str(doc.get("scan_id", "")), str(doc.get("source", ""))
    except (OSError, ValueError, AttributeError):
        return ("", "")


def _assign_folders(entries: Sequence[tuple[ScanSource, Path, str]], output: Path) -> list[str]:
    """Output-folder names: the sanitised scan id, plus a hash of the source path when that is ambiguous.

    A name is ambiguous when several scans of the batch share it (compared case-insensitively) or when the
    folder already holds the finished result of another scan (an earlier batch). Deterministic: the same inputs
    and output give the same names.
    """
    bases = [scan_folder_name(src.scan_id) for src, _, _ in entries]
    counts: dict[str, int] = {}
    for b in bases:
        counts[b.lower()] = counts.get(b.lower(), 0) + 1
    names: list[str] = []
    for (src, _root, rel), base in zip(entries, bases):
        name = base
        owner = _folder_owner(output / base)
        if counts[base.lower()] > 1 or (owner is not None and owner != (src.scan_id, rel)):
            name = scan_folder_name(src.scan_id, suffix=_short_hash(rel))
        names.append(name)
    # identical relative paths under different inputs: fall back to the absolute path
    seen: dict[str, int] = {}
    for n in names:
        seen[n.lower()] = seen.get(n.lower(), 0) + 1
    for i, ((src, _root, _rel), n) in enumerate(zip(entries, names)):
        if seen[n.lower()] > 1:
            names[i] = scan_folder_name(src.scan_id, suffix=_short_hash(str(_source_path(src).resolve())))
    return names


def plan_batch(inputs: Sequence[Path | str], output: Path | str, *, overwrite: bool = False) -> BatchPlan:
    """Discover the scans of every input and decide what to do with each.

    Args:
        inputs: folders (searched recursively) and/or files.
        output: the output root.
        overwrite: plan finished scans again instead of skipping them.

    Returns:
        The plan; discovery problems (unreadable files, missing inputs, an input without any scan) are
        ``failures``.

    Raises:
        OutputLocationError: see :func:`check_output_location`.
    """
    out = Path(output).expanduser()
    check_output_location(inputs, out)
    plan = BatchPlan()
    entries: list[tuple[ScanSource, Path, str]] = []
    seen: set[tuple[str, ...]] = set()
    for raw in inputs:
        inp = Path(raw).expanduser()
        root = _input_root(inp)
        found = discover_scans([inp])
        plan.skipped_files += len(found.skipped)
        for problem in found.problems:
            plan.failures.append((_relative(problem.path, root), describe_exception(problem)))
        for skipped in found.skipped:
            logger.debug("skipped %s: %s", _relative(skipped.path, root), skipped.reason)
        if not found.scans and not found.problems:
            plan.failures.append((str(raw), f"EmptyInputError: {raw}: no readable scan found"))
        for src in found.scans:
            key = tuple(sorted(str(Path(p).resolve()) for p in src.paths))
            if key in seen:  # the same scan reached through two inputs
                continue
            seen.add(key)
            entries.append((src, root, _relative(_source_path(src), root) or "."))
    for (src, root, rel), folder in zip(entries, _assign_folders(entries, out)):
        planned = PlannedScan(source=src, input_root=root, relative_source=rel, folder=folder)
        if not overwrite and (out / folder / PROPOSALS_JSON).is_file():
            plan.finished.append(planned)
        else:
            plan.todo.append(planned)
    return plan


def _review_window(modality: str, intensity: str) -> tuple[float, float] | None:
    """Lung window for CT (or unknown modality with a CT model), percentile range otherwise."""
    m = (modality or "").upper()
    if m == "CT" or (m in ("", "UNKNOWN") and intensity == "ct"):
        return LUNG_WINDOW
    return None


# --------------------------------------------------------------------------------------------------------------
# The four steps
# --------------------------------------------------------------------------------------------------------------
def prepare_scan(scan: PlannedScan, spec: PreprocessingSpec) -> LoadedScan:
    """Load a scan and preprocess it (step 1).

    Args:
        scan: the planned scan.
        spec: the model's preprocessing (:meth:`PreprocessingSpec.from_model`).

    Returns:
        The loaded scan.

    Raises:
        ScanError: unreadable scan (see :func:`medrpn.data.io.load_scan`); anything the transforms raise.
    """
    t0 = time.perf_counter()
    image = load_scan(scan.source)
    t1 = time.perf_counter()
    source_affine = torch.as_tensor(image.affine).detach().cpu().numpy().astype(np.float64)
    spatial_dims = image.ndim - 1
    pre = spec.transform(spatial_dims)({"image": image})["image"]
    if not isinstance(pre, MetaTensor):  # pragma: no cover - MONAI always returns MetaTensors here
        pre = MetaTensor(pre, affine=torch.as_tensor(image.affine))
    t2 = time.perf_counter()
    return LoadedScan(
        scan=scan,
        image=image,
        network_input=pre,
        source_affine=source_affine,
        timings={"load": t1 - t0, "preprocess": t2 - t1},
    )


def try_prepare_scan(scan: PlannedScan, spec: PreprocessingSpec) -> LoadedScan | ScanFailure:
    """:func:`prepare_scan` that returns a :class:`ScanFailure` instead of raising (for datasets/workers).

    Args:
        scan: the planned scan.
        spec: the model's preprocessing.

    Returns:
        The loaded scan, or the failure.
    """
    try:
        return prepare_scan(scan, spec)
    except Exception as exc:  # one bad scan must not stop a batch
        logger.warning("scan %s (%s) failed to load: %s", scan.source.scan_id, scan.relative_source, exc)
        return ScanFailure(scan.relative_source, describe_exception(exc))


def _plain(t: Any) -> torch.Tensor:
    return t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)


def predict_scan(
    model_like: InferenceModel | ModelLike,
    loaded: LoadedScan,
    *,
    tta: bool = False,
    precision: InferencePrecision | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ScanPrediction:
    """Detect lesions in a loaded scan and express them on the source grid (step 2).

    The preprocessed volume is handed to :func:`detect_scan` as a ``(1, C, *spatial)`` MetaTensor carrying the
    preprocessed affine; detections (voxel-edge image boxes of that grid) become LPS world boxes with
    :func:`medrpn.geometry.image_to_world_boxes` and that affine; the objectness heatmap is resampled onto the
    source grid.

    Args:
        model_like: an :class:`InferenceModel` or a ``LesionDetectionModule`` (see :func:`as_inference_model`).
        loaded: the output of :func:`prepare_scan`.
        tta: flip test-time augmentation.
        precision: ``"auto"`` (bfloat16 autocast where the hardware has it natively, else float32), ``"32"`` or
            ``"bf16"`` (:mod:`medrpn.inference.precision`); ``None`` leaves the autocast state of the caller as
            it is (the Lightning prediction path, where the trainer's ``precision`` decides).
        progress: called with ``(done, total)`` after each patch / slice batch.

    Returns:
        The prediction, ready for :func:`write_scan_outputs`.

    Raises:
        ValueError: a 3D model given a 2D image, or a detector/input channel mismatch.
    """
    model = as_inference_model(model_like)
    scan = loaded.scan
    net = loaded.network_input
    spatial = tuple(int(s) for s in net.shape[1:])
    dims = len(spatial)
    if dims == 2 and model.spatial_dims == 3:
        raise ValueError(
            f"{scan.relative_source} is a 2D image ({spatial[0]} x {spatial[1]}) but {model.describe()} is a 3D "
            "model: use a 2D model for radiographs"
        )
    if dims not in (2, 3):
        raise ValueError(f"{scan.relative_source}: unexpected image shape {tuple(net.shape)}")
    t0 = time.perf_counter()
    detector = model.detector
    device = next(detector.parameters()).device
    x = _plain(net).float()
    if dims == 2:  # a genuine 2D image: replicate it over the 2.5D context channels (then its feature channels)
        features = x[1:]
        x = torch.cat([x[:1].expand(detector.in_channels - len(features), *spatial), features], dim=0)
    elif detector.spatial_dims == 3 and detector.in_channels != x.shape[0]:
        raise ValueError(f"the detector expects {detector.in_channels} input channels, the scan has {x.shape[0]}")
    pre_affine = torch.as_tensor(net.affine, dtype=torch.float64).clone()
    volume = MetaTensor(
        x[None].contiguous().to(device),
        affine=pre_affine,
        meta={"scan_id": scan.source.scan_id, "filename_or_obj": scan.relative_source},
    )
    config = replace(model.whole_scan, flip_tta=tta, heatmap=True)
    with torch.no_grad(), ExitStack() as stack:
        if precision is None:
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
        else:
            dtype = stack.enter_context(inference_autocast(precision, device))
        found = detect_scan(detector, volume, config, context=model.slice_context, progress=progress)
    t1 = time.perf_counter()

    dets = found.detections
    boxes = _plain(dets.boxes).detach().cpu().to(torch.float64).reshape(-1, 2 * dims)
    world = image_to_world_boxes(boxes, affine_for_dims(pre_affine, dims)).numpy()
    findings = make_findings(
        world,
        _plain(dets.scores).detach().cpu().numpy(),
        _plain(dets.labels).detach().cpu().numpy(),
        _plain(dets.class_probs).detach().cpu().numpy().reshape(len(world), -1),
        _plain(dets.objectness).detach().cpu().numpy(),
        model.class_names,
    )
    source_shape = tuple(int(s) for s in loaded.image.shape[1:])
    heat_src = None
    if found.heatmap is not None:
        heat = _plain(found.heatmap).detach().cpu().float().numpy()
        heat_src = resample_to_grid(heat, pre_affine.numpy(), loaded.source_affine, source_shape, "linear")
        np.clip(heat_src, 0.0, 1.0, out=heat_src)
    meta = loaded.image.meta
    source_format = str(meta.get("source_format", scan.source.source_format))
    is_dicom = source_format == "dicom"
    result = ScanResult(
        scan_id=scan.source.scan_id,
        source=scan.relative_source,
        source_format=source_format,
        affine_ras=loaded.source_affine,
        spatial_shape=source_shape,
        findings=findings,
        class_names=tuple(model.class_names),
        objectness_map=heat_src,
        dicom_files=tuple(str(p) for p in meta.get("source_files", ())) if is_dicom else (),
        sop_instance_uids=tuple(str(u) for u in meta.get("sop_instance_uids", ())) if is_dicom else (),
        series_uid=str(meta.get("series_uid", "") or "") or None,
        model=model.describe(),
        extra={"precision": dtype_name(dtype), "tta": tta},
    )
    image = _plain(loaded.image)[0].numpy()
    t2 = time.perf_counter()
    timings = {**loaded.timings, "detect": t1 - t0, "postprocess": t2 - t1}
    window = _review_window(str(meta.get("modality", scan.source.modality)), model.intensity)
    return ScanPrediction(result=result, image=image, folder=scan.folder, window=window, timings=timings)


def _dicom_objects_possible(result: ScanResult) -> str | None:
    """``None`` when SEG/SR/GSPS can be written for this scan, else why not."""
    if result.source_format != "dicom" or not result.dicom_files:
        return "not a DICOM source"
    if result.spatial_dims != 3:
        return "a 2D DICOM image (SEG/SR/GSPS are written for CT/MR series)"
    if len(set(result.dicom_files)) != int(result.spatial_shape[2]):
        return "a multi-frame DICOM instance (only series of single-frame instances are supported)"
    return None


def write_scan_outputs(prediction: ScanPrediction, out_dir: Path | str) -> Path:
    """Write one scan's output folder (step 3); ``proposals.json`` last.

    An existing ``proposals.json`` is removed first, so an interrupted rewrite never looks finished.

    Args:
        prediction: the scan's prediction.
        out_dir: the scan's output folder (created if needed).

    Returns:
        The written ``proposals.json``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PROPOSALS_JSON).unlink(missing_ok=True)
    result = prediction.result
    write_review_images(result, prediction.image, out, window=prediction.window)
    write_nifti_overlays(result, out)
    write_slicer_markups(result, out)
    why_not = _dicom_objects_possible(result)
    if why_not is None:
        write_dicom_objects(result, out)
    elif result.source_format == "dicom":
        logger.info("scan %s: no DICOM SEG/SR/GSPS: %s", result.scan_id, why_not)
    path = write_proposals_json(result, out)
    prediction.timings["write"] = time.perf_counter() - t0
    return path


def finalize_batch(output: Path | str, failures: Sequence[tuple[str, str]]) -> tuple[Path, Path, Path]:
    """(Re)write ``candidates.csv`` (every finished scan below ``output``), ``failures.csv`` and ``index.html``.

    Args:
        output: the output root.
        failures: ``(source, reason)`` of this run.

    Returns:
        ``(candidates.csv, failures.csv, index.html)``.
    """
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    candidates = write_candidates_csv(collect_candidates(root), root / CANDIDATES_CSV)
    failures_csv = write_failures_csv(list(failures), root / FAILURES_CSV)
    index = write_index_html(root, index_entries(root), root / INDEX_HTML, failures=list(failures))
    return candidates, failures_csv, index


def process_scan(
    model: InferenceModel,
    source: ScanSource,
    out_dir: Path,
    *,
    input_root: Path | None,
    tta: bool,
    precision: InferencePrecision = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Load, detect and write one scan (steps 1-3, without prefetching).

    Args:
        model: the model.
        source: the scan.
        out_dir: its output folder.
        input_root: the input folder it came from (``ScanResult.source`` is relative to it); ``None`` stores the
            path as discovered.
        tta: flip test-time augmentation.
        precision: network precision (see :func:`predict_scan`).
        progress: per-patch/slice-batch callback ``(done, total)``.

    Returns:
        The scan's result (as written to ``proposals.json``).
    """
    path = _source_path(source)
    rel = _relative(path, input_root) if input_root is not None else str(path)
    planned = PlannedScan(
        source=source, input_root=input_root or path.parent, relative_source=rel, folder=Path(out_dir).name
    )
    loaded = prepare_scan(planned, PreprocessingSpec.from_model(model))
    prediction = predict_scan(model, loaded, tta=tta, precision=precision, progress=progress)
    write_scan_outputs(prediction, out_dir)
    return prediction.result


# --------------------------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------------------------
@contextmanager
def _scan_bar(enabled: bool, position: int, label: str) -> Iterator[Callable[[int, int], None]]:
    bar = tqdm(total=None, desc=label, unit="step", leave=False, disable=not enabled, position=position)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def run_batch(
    model: InferenceModel,
    inputs: Sequence[Path],
    output: Path,
    *,
    overwrite: bool = False,
    tta: bool = False,
    precision: InferencePrecision = "auto",
    progress: bool = True,
) -> BatchReport:
    """Batch inference: every scan under ``inputs`` -> one folder per scan under ``output``, plus batch tables.

    The next scan is loaded and preprocessed in a background thread while the current one is detected and
    written. Any exception for one scan is recorded in ``failures`` (``"ExceptionType: message"``) and the batch
    goes on. Scans whose ``proposals.json`` exists are skipped unless ``overwrite``. At the end
    ``candidates.csv`` (all finished scans, including skipped ones), ``failures.csv`` and ``index.html`` are
    rewritten atomically. Nothing is ever written inside an input folder.

    Args:
        model: the model (:func:`medrpn.inference.checkpoint.load_inference_model`).
        inputs: folders and/or files.
        output: the output root (created).
        overwrite: redo finished scans.
        tta: flip test-time augmentation.
        precision: network precision (see :func:`predict_scan`); ``"auto"`` = bfloat16 autocast where native.
        progress: show tqdm bars (scans; patches/slices of the current scan).

    Returns:
        The report.

    Raises:
        OutputLocationError: the output folder is, lies inside or contains an input.
    """
    out = Path(output).expanduser()
    plan = plan_batch(inputs, out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    report = BatchReport(output=out)
    report.failures.extend(plan.failures)
    report.skipped.extend(p.relative_source for p in plan.finished)
    for p in plan.finished:
        logger.info("scan %s (%s): already finished, skipped", p.source.scan_id, p.relative_source)
    spec = PreprocessingSpec.from_model(model)
    todo = plan.todo
    overall = tqdm(total=len(todo), desc="scans", unit="scan", disable=not progress, position=0)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medrpn-prefetch") as pool:
        future: Future[LoadedScan] | None = pool.submit(prepare_scan, todo[0], spec) if todo else None
        for index, planned in enumerate(todo):
            sid, rel = planned.source.scan_id, planned.relative_source
            loaded: LoadedScan | None = None
            try:
                assert future is not None
                loaded = future.result()
            except Exception as exc:
                logger.warning("scan %s (%s) failed to load: %s", sid, rel, exc)
                report.failures.append((rel, describe_exception(exc)))
            finally:
                future = pool.submit(prepare_scan, todo[index + 1], spec) if index + 1 < len(todo) else None
            if loaded is not None:
                try:
                    with _scan_bar(progress, 1, f"{sid[-24:]}") as callback:
                        prediction = predict_scan(model, loaded, tta=tta, precision=precision, progress=callback)
                    del loaded
                    folder = out / planned.folder
                    write_scan_outputs(prediction, folder)
                    n = len(prediction.result.findings)
                    report.processed.append(ProcessedScan(rel, sid, folder, n, dict(prediction.timings)))
                    logger.info(
                        "scan %s (%s): %d finding(s) in %.1f s -> %s",
                        sid,
                        rel,
                        n,
                        sum(prediction.timings.values()),
                        folder,
                    )
                    del prediction
                except Exception as exc:
                    logger.warning("scan %s (%s) failed: %s", sid, rel, describe_exception(exc))
                    report.failures.append((rel, describe_exception(exc)))
            overall.update(1)
    overall.close()
    report.candidates_csv, report.failures_csv, report.index_html = finalize_batch(out, report.failures)
    return report


# --------------------------------------------------------------------------------------------------------------
# medrpn infer
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``medrpn infer`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="medrpn infer",
        description=(
            "Batch inference over folders of scans (DICOM series/files, NIfTI, MHD/MHA, NRRD): one output folder "
            "per scan with review PNGs, NIfTI label map and heatmap, 3D Slicer markups, DICOM SEG/SR/GSPS (DICOM "
            "series) and proposals.json; candidates.csv, failures.csv and index.html in the output root. "
            "Proposals for radiologist review, not a diagnosis."
        ),
    )
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="trained medrpn checkpoint (.ckpt)")
    parser.add_argument(
        "--input",
        required=True,
        action="append",
        metavar="DIR",
        help="folder (searched recursively) or file to process; repeatable",
    )
    parser.add_argument("--output", required=True, metavar="OUT", help="output folder (outside every --input)")
    parser.add_argument("--overwrite", action="store_true", help="redo scans that already have results")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation (slower)")
    parser.add_argument("--allow-failures", action="store_true", help="exit with status 0 even when some scans failed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default: cpu)")
    parser.add_argument(
        "--precision",
        choices=INFERENCE_PRECISIONS,
        default="auto",
        help="network precision: auto (default) = bfloat16 autocast where the CPU/GPU has native bfloat16 "
        "(2.1x faster on an AVX512-BF16 CPU, same held-out CPM), else float32; 32 or bf16 force one",
    )
    return parser


def _error(message: str) -> int:
    print(f"medrpn infer: error: {message}", file=sys.stderr)
    return 2


def infer_main(argv: Sequence[str] | None = None) -> int:
    """The ``medrpn infer`` command.

    Args:
        argv: arguments after ``infer`` (``None``: ``sys.argv[1:]``).

    Returns:
        0 on success (or with ``--allow-failures``), 1 when a scan failed, 2 for usage errors, a refused output
        folder, and a missing, corrupt or refused checkpoint.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied module otherwise
    inputs = [Path(p).expanduser() for p in args.input]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        return _error(f"input not found: {', '.join(missing)}")
    output = Path(args.output).expanduser()
    try:
        check_output_location(inputs, output)
    except OutputLocationError as exc:
        return _error(str(exc))
    if args.device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda requested but CUDA is not available")
    try:
        model = load_inference_model(args.checkpoint, map_location=args.device)
    except CheckpointError as exc:
        return _error(str(exc))
    logger.info("%s; inputs: %s; output: %s", model.describe(), ", ".join(map(str, inputs)), output)
    dtype = resolve_inference_dtype(args.precision, args.device)
    shown = "bfloat16 autocast" if dtype == torch.bfloat16 else "float32"
    logger.info("network precision: %s (--precision %s)", shown, args.precision)
    if args.precision == "bf16" and args.device == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "--precision bf16 on a CPU without native bfloat16 (AVX512-BF16/AMX): it is emulated and slower than "
            "float32 here; --precision auto picks float32 on such CPUs"
        )
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            report = run_batch(
                model,
                inputs,
                output,
                overwrite=args.overwrite,
                tta=args.tta,
                precision=as_inference_precision(args.precision),
                progress=not args.no_progress,
            )
    except OutputLocationError as exc:
        return _error(str(exc))
    except ScanError as exc:  # pragma: no cover - run_batch records per-scan errors itself
        return _error(str(exc))
    print(report.summary())
    if report.failures and not args.allow_failures:
        return 1
    return 0
