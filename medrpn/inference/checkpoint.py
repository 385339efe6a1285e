"""Loading a trained model for inference from its checkpoint alone, without unpickling code.

A medrpn checkpoint (written by :class:`medrpn.module.LesionDetectionModule`) holds, besides
Lightning's ``state_dict``, a ``medrpn_inference`` entry of plain data: the detector's construction
spec, the preprocessing the training data went through (spacing, orientation, intensity preset,
2.5D context), the whole-scan tiling settings and the lesion class names. The file is read with
``torch.load(weights_only=True)``, which accepts only tensors and plain containers: a checkpoint
that smuggles arbitrary Python objects is refused with :class:`CheckpointError` instead of run.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from medrpn.data.errors import ScanError
from medrpn.inference.whole_scan import WholeScanConfig
from medrpn.modeling.detector import LesionDetector


class CheckpointError(ScanError):
    """A checkpoint is missing, unreadable, not a medrpn checkpoint, or refused as unsafe."""


@dataclass
class InferenceModel:
    """A detector ready for inference and everything needed to prepare its input.

    Attributes:
        detector: the network, in eval mode.
        spacing_mm: voxel spacing the network works at (x, y, z).
        intensity: intensity preset (``"ct"``, ``"mr"``, ``"none"``).
        ct_window: HU window of the CT preset.
        orientation: axis codes scans are reoriented to.
        slice_context: 2D models: neighbouring slices per side.
        whole_scan: tiling/merging settings.
        class_names: lesion class names.
        source: the checkpoint path.
        hessian_sigmas_mm: scales of the Hessian blob/tube input channels (empty: none).
        hessian_gain: their scale.
    """

    detector: LesionDetector
    spacing_mm: tuple[float, ...]
    intensity: str
    ct_window: tuple[float, ...]
    orientation: str
    slice_context: int
    whole_scan: WholeScanConfig
    class_names: tuple[str, ...]
    source: str
    hessian_sigmas_mm: tuple[float, ...] = ()
    hessian_gain: float = 20.0

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return self.detector.spatial_dims

    def describe(self) -> str:
        """One line for logs and output files."""
        kind = "RPN-only" if self.detector.rpn_only else "two-stage"
        return f"medrpn {self.spatial_dims}D {kind} detector from {Path(self.source).name}"


def _known_fields(cls: type[Any], values: dict[str, Any]) -> Any:
    """Build a settings dataclass, ignoring keys it does not know (checkpoints from other versions)."""
    names = {f.name for f in fields(cls)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    return cls(**kept)


def load_inference_model(path: Path | str, map_location: str | torch.device = "cpu") -> InferenceModel:
    """Load a checkpoint safely (``weights_only=True``) and rebuild the detector from its spec.

    Args:
        path: the ``.ckpt`` file.
        map_location: device to load tensors to.

    Returns:
        :class:`InferenceModel` in eval mode.

    Raises:
        CheckpointError: missing file, unsafe or corrupt content, or no medrpn inference entry.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "checkpoint file not found")
    try:
        ckpt: Any = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            p, f"refused: the checkpoint contains Python objects that are not plain data ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:  # truncated zip, wrong format...
        raise CheckpointError(p, f"cannot read the checkpoint: {type(e).__name__}: {e}") from e
    info = ckpt.get("medrpn_inference") if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or "detector" not in info or "state_dict" not in ckpt:
        raise CheckpointError(p, "not a medrpn checkpoint (no 'medrpn_inference' entry)")
    try:
        detector = LesionDetector.from_spec(info["detector"])
        state = {k[len("detector.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("detector.")}
        detector.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(p, f"the stored detector does not match its weights: {e}") from e
    detector.eval().to(map_location)
    pre = info.get("preprocessing", {})
    return InferenceModel(
        detector=detector,
        spacing_mm=tuple(float(s) for s in pre.get("spacing_mm", (1.5, 1.5, 1.5))),
        intensity=str(pre.get("intensity", "ct")),
        ct_window=tuple(float(v) for v in pre.get("ct_window", (-1000.0, 500.0))),
        orientation=str(pre.get("orientation", "RAS")),
        slice_context=int(pre.get("slice_context", 0)),
        hessian_sigmas_mm=tuple(float(s) for s in pre.get("hessian_sigmas_mm", ())),
        hessian_gain=float(pre.get("hessian_gain", 20.0)),
        whole_scan=_known_fields(WholeScanConfig, info.get("inference", {})),
        class_names=tuple(info.get("class_names", ())) or ("lesion",),
        source=str(p),
    )
