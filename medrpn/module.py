"""``LesionDetectionModule``: the LightningModule that trains and validates a :class:`LesionDetector`.

Training: RPN loss (matching + sampling + objectness/box terms) and, unless the detector is
RPN-only, the lesion head's loss on RoIs sampled from the detached proposals plus the ground truth.
Every loss term is logged by name (``train/loss_rpn_objectness``, ``train/loss_rpn_box``,
``train/loss_head_class``, ``train/loss_head_box``, ``train/loss``).

Validation runs on whole scans with the same code as batch inference
(:func:`medrpn.inference.whole_scan.detect_scan`), converts detections to world millimetres, and
reports: FROC sensitivity at 1/8..8 false positives per scan and CPM (LUNA16 centre-in-radius hit
rule), AP@0.1 and mAP over IoU 0.1-0.5, RPN proposal recall at 10/50/100/300, and for the lesion
head per-class AP and a class confusion matrix. A FROC curve PNG is written into the run's log
folder at every validation, and the table is printed at the end of ``validate``/``test``.

The module keeps, in its hyperparameters, everything inference needs (preprocessing, tiling,
class names), and :meth:`on_save_checkpoint` also stores it as plain data under
``medrpn_inference`` so a checkpoint can be loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_utilities.core.rank_zero import rank_zero_info
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable

from medrpn.evaluation.froc import (
    BootstrapInterval,
    DiameterBand,
    FROCResult,
    ScanCandidates,
    ScanLesions,
    bootstrap_cpm,
    compute_froc,
    froc_by_diameter,
)
from medrpn.evaluation.metrics import class_confusion, detection_map, per_class_ap, proposal_recall
from medrpn.evaluation.plots import plot_froc
from medrpn.geometry import image_to_world_boxes
from medrpn.inference.whole_scan import ScanDetections, WholeScanConfig, detect_scan
from medrpn.modeling.detector import LesionDetector
from medrpn.training.lesion_map import LESION_MAP_LOSSES, LesionMapLoss, lesion_map_loss, lesion_map_targets
from medrpn.training.losses import BOX_LOSSES, BoxLoss, RPNLoss
from medrpn.training.matching import AnchorMatcher, ATSSMatcher, IoUMatcher
from medrpn.training.roi_targets import CentreRule, RoISampler, lesion_head_loss
from medrpn.training.sampling import BalancedSampler, HardNegativeSampler, Sampler


@dataclass(frozen=True)
class RPNTrainingConfig:
    """How RPN targets are assigned (Faster R-CNN 2D defaults; 3D configs loosen the thresholds).

    Attributes:
        matcher: ``"iou"`` (thresholds + ignore band + low-quality matches) or ``"atss"`` (MONAI).
        positive_iou: IoU >= this is positive.
        negative_iou: IoU < this is negative (between: ignored).
        min_positives_per_box: ``"iou"`` matcher: each box's ``k`` best anchors are positive too (0: only its
            best, Faster R-CNN's low-quality match). Gives small lesions at least ``k`` positives, where the
            thresholds give a 3 mm lesion one (see :class:`~medrpn.training.matching.IoUMatcher`).
        atss_candidates: ATSS candidates per level and anchor shape.
        anchors_per_image: anchors sampled per image.
        positive_fraction: maximum fraction of positives among them.
        hard_negatives: sample negatives among the highest-scoring ones (MONAI's HardNegativeSampler).
        box_loss: ``"smooth_l1"`` or ``"giou"``.
        objectness_weight: weight of ``loss_rpn_objectness``.
        box_weight: weight of ``loss_rpn_box``.
    """

    matcher: Literal["iou", "atss"] = "iou"
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    min_positives_per_box: int = 0
    atss_candidates: int = 4
    anchors_per_image: int = 256
    positive_fraction: float = 0.5
    hard_negatives: bool = False
    box_loss: BoxLoss = "smooth_l1"
    objectness_weight: float = 1.0
    box_weight: float = 1.0


@dataclass(frozen=True)
class HeadTrainingConfig:
    """How RoIs are sampled for the lesion head (Faster R-CNN 2D: 512 RoIs, 25% positives at IoU >= 0.5).

    Attributes:
        positive_iou: IoU >= this: the lesion's class.
        negative_iou: IoU < this: background (default: ``positive_iou``).
        rois_per_image: RoIs sampled per image.
        positive_fraction: maximum fraction of positives.
        class_weight: weight of ``loss_head_class``.
        box_weight: weight of ``loss_head_box``.
        centre_rule: RoIs below ``positive_iou`` whose centre lies inside a lesion: ``"iou"`` (IoU decides),
            ``"ignore"`` (never background) or ``"positive"`` (positives of that lesion); see
            :class:`~medrpn.training.roi_targets.RoISampler`.
        box_loss: ``"smooth_l1"`` on the encoded deltas (Faster R-CNN) or ``"giou"`` on the decoded boxes; see
            :func:`~medrpn.training.roi_targets.lesion_head_loss`.
    """

    positive_iou: float = 0.5
    negative_iou: float | None = None
    rois_per_image: int = 512
    positive_fraction: float = 0.25
    class_weight: float = 1.0
    box_weight: float = 1.0
    centre_rule: CentreRule = "iou"
    box_loss: BoxLoss = "smooth_l1"

    def __post_init__(self) -> None:
        if self.box_loss not in BOX_LOSSES:
            raise ValueError(f"head_training.box_loss must be one of {BOX_LOSSES}, got {self.box_loss!r}")


@dataclass(frozen=True)
class LesionMapTrainingConfig:
    """Dense lesion supervision (only for a detector built with ``lesion_map: true``).

    Attributes:
        weight: weight of ``loss_lesion_map``.
        loss: ``"lesion_balanced"`` (every lesion weighs the same) or ``"bce_dice"`` (see
            :mod:`medrpn.training.lesion_map`).
        dice_weight: weight of the soft-Dice part of ``"bce_dice"``.
    """

    weight: float = 1.0
    loss: LesionMapLoss = "bce_dice"
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LESION_MAP_LOSSES:
            raise ValueError(f"lesion_map_training.loss must be one of {LESION_MAP_LOSSES}, got {self.loss!r}")
        if self.weight < 0 or self.dice_weight < 0:
            raise ValueError(
                f"lesion_map_training weights must be >= 0, got weight={self.weight}, dice_weight={self.dice_weight}"
            )


def check_input_channels(detector: LesionDetector, datamodule: Any) -> None:
    """Refuse data whose channel count differs from what the detector's backbone reads, naming the setting to change.

    Args:
        detector: the model.
        datamodule: anything with an ``in_channels`` int (``LesionDataModule``); other objects are not checked.

    Raises:
        ValueError: the counts differ (e.g. ``data.hessian_sigmas_mm`` or ``data.slice_context`` changed without the
            backbone's ``in_channels``), instead of a shape error deep in the first convolution.
    """
    expected = getattr(datamodule, "in_channels", None)
    if isinstance(expected, int) and expected != detector.in_channels:
        raise ValueError(
            f"the data gives {expected} input channels but the detector's backbone reads {detector.in_channels}: "
            f"set model.detector.init_args.backbone.init_args.in_channels={expected} "
            "(2.5D slices: 2 * slice_context + 1; Hessian channels: +2)"
        )


@dataclass(frozen=True)
class PreprocessingConfig:
    """What inference must do to a scan before the network sees it (stored in checkpoints).

    Usually linked from the datamodule by the CLI, so training and inference cannot disagree.
    """

    spacing_mm: tuple[float, ...] = (1.5, 1.5, 1.5)
    intensity: Literal["ct", "mr", "none"] = "ct"
    ct_window: tuple[float, ...] = (-1000.0, 500.0)
    orientation: str = "RAS"
    slice_context: int = 0
    hessian_sigmas_mm: tuple[float, ...] = ()
    hessian_gain: float = 20.0


RPN_TRAINING_DEFAULT = RPNTrainingConfig()
HEAD_TRAINING_DEFAULT = HeadTrainingConfig()
LESION_MAP_TRAINING_DEFAULT = LesionMapTrainingConfig()
PREPROCESSING_DEFAULT = PreprocessingConfig()
WHOLE_SCAN_DEFAULT = WholeScanConfig()


def _coerce(cls: type[Any], value: Any) -> Any:
    """A dataclass instance from ``None`` (defaults), a dict (from a checkpoint) or an instance."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    return value


def _plain_data(value: Any) -> Any:
    """Dataclasses, tuples and paths -> dicts, lists and strings (recursively)."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain_data(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_data(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None or isinstance(value, torch.Tensor):
        return value
    return str(value)


class LesionDetectionModule(pl.LightningModule):
    """Trains and validates a lesion detector.

    Args:
        detector: the model (injected; the CLI builds it from the config).
        optimizer: optimizer factory (``OptimizerCallable``).
        lr_scheduler: optional scheduler factory.
        rpn_training: RPN target assignment.
        head_training: lesion-head RoI sampling.
        lesion_map_training: dense lesion loss of a detector with a lesion map (ignored otherwise).
        inference: whole-scan tiling/merging used by validation and batch inference.
        preprocessing: preprocessing inference must apply (linked from the datamodule).
        class_names: name of every lesion class id (``len == detector.num_classes`` unless RPN-only).
        recall_ks: proposal counts of the recall metric.
        froc_plot: write a FROC PNG into the log folder at every validation.
    """

    def __init__(
        self,
        *,
        detector: LesionDetector,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        rpn_training: RPNTrainingConfig = RPN_TRAINING_DEFAULT,
        head_training: HeadTrainingConfig = HEAD_TRAINING_DEFAULT,
        lesion_map_training: LesionMapTrainingConfig = LESION_MAP_TRAINING_DEFAULT,
        inference: WholeScanConfig = WHOLE_SCAN_DEFAULT,
        preprocessing: PreprocessingConfig = PREPROCESSING_DEFAULT,
        class_names: Sequence[str] = ("solid", "ground-glass", "part-solid"),
        recall_ks: Sequence[int] = (10, 50, 100, 300),
        froc_plot: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["detector", "optimizer", "lr_scheduler"])
        self.detector = detector
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.rpn_cfg = _coerce(RPNTrainingConfig, rpn_training)
        self.head_cfg = _coerce(HeadTrainingConfig, head_training)
        self.lesion_map_cfg = _coerce(LesionMapTrainingConfig, lesion_map_training)
        self.inference_cfg = _coerce(WholeScanConfig, inference)
        self.preprocessing_cfg = _coerce(PreprocessingConfig, preprocessing)
        if not detector.rpn_only and len(class_names) != detector.num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names but the detector has {detector.num_classes} lesion classes"
            )
        self.class_names = list(class_names) if not detector.rpn_only else ["lesion"]
        self.recall_ks = tuple(int(k) for k in recall_ks)
        self.froc_plot = froc_plot
        self.rpn_loss = RPNLoss(
            matcher=self._matcher(),
            sampler=self._sampler(),
            box_loss=self.rpn_cfg.box_loss,
            objectness_weight=self.rpn_cfg.objectness_weight,
            box_weight=self.rpn_cfg.box_weight,
        )
        self.roi_sampler = RoISampler(
            positive_iou=self.head_cfg.positive_iou,
            negative_iou=self.head_cfg.negative_iou,
            rois_per_image=self.head_cfg.rois_per_image,
            positive_fraction=self.head_cfg.positive_fraction,
            centre_rule=self.head_cfg.centre_rule,
        )
        self._val_outputs: list[dict[str, Any]] = []
        self.last_froc: FROCResult | None = None
        self.last_metrics: dict[str, float] = {}

    def _matcher(self) -> AnchorMatcher:
        c = self.rpn_cfg
        if c.matcher == "atss":
            return ATSSMatcher(num_candidates=c.atss_candidates)
        if c.matcher != "iou":
            raise ValueError(f"rpn_training.matcher must be 'iou' or 'atss', got {c.matcher!r}")
        return IoUMatcher(
            positive_threshold=c.positive_iou,
            negative_threshold=c.negative_iou,
            min_positives_per_box=c.min_positives_per_box,
        )

    def _sampler(self) -> Sampler:
        c = self.rpn_cfg
        if c.hard_negatives:
            return HardNegativeSampler(batch_size_per_image=c.anchors_per_image, positive_fraction=c.positive_fraction)
        return BalancedSampler(batch_size_per_image=c.anchors_per_image, positive_fraction=c.positive_fraction)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        """Check the input channels against the data; before fitting, plan ``anchors: auto`` from the training split.

        Raises:
            ValueError: see :func:`check_input_channels`.
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        check_input_channels(self.detector, datamodule)
        if stage != "fit" or datamodule is None:
            return
        from medrpn.anchors_planning import plan_for_training

        plan = plan_for_training(self, datamodule)
        if plan is not None:
            rank_zero_info(f"anchors planned from the training split:\n{plan.yaml_snippet()}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reinstall anchor shapes planned at fit time (a model built from an ``auto`` config has placeholders)."""
        from medrpn.anchors_planning import restore_planned_anchors

        restore_planned_anchors(self.detector, checkpoint)

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """All named loss terms of a training batch and their sum under ``"loss"``.

        Args:
            batch: ``image`` ``(B, C, *patch)``; ``box``: list of ``(M_b, 2*D)`` image boxes;
                ``label``: list of ``(M_b,)`` class ids.

        Returns:
            Loss terms by name.
        """
        images = batch["image"]
        gt_boxes = [b.to(images.device) for b in batch["box"]]
        gt_labels = [lab.to(images.device) for lab in batch["label"]]
        features, out = self.detector.features_and_proposals(images)
        terms = self.rpn_loss(out, gt_boxes, self.detector.rpn.box_coder, self.detector.rpn.num_anchors).as_dict()
        if self.detector.head is not None:
            targets = self.roi_sampler([p.detach() for p in out.proposals], gt_boxes, gt_labels)
            logits, deltas = self.detector.head(features, [t.rois for t in targets], self.detector.strides, images)
            head = lesion_head_loss(
                logits,
                deltas,
                targets,
                self.detector.head.box_coder,
                box_loss=self.head_cfg.box_loss,
                class_weight=self.head_cfg.class_weight,
                box_weight=self.head_cfg.box_weight,
            )
            terms.update(head.as_dict())
        if self.detector.lesion_map_head is not None and self.lesion_map_cfg.weight > 0:
            logits_map = self.detector.lesion_map_logits(features)
            target_map = lesion_map_targets(gt_boxes, logits_map.shape[2:], self.detector.strides[0], images.device)
            terms["loss_lesion_map"] = self.lesion_map_cfg.weight * lesion_map_loss(
                logits_map, target_map, kind=self.lesion_map_cfg.loss, dice_weight=self.lesion_map_cfg.dice_weight
            )
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One optimisation step; logs every loss term."""
        terms = self.compute_losses(batch)
        bs = int(batch["image"].shape[0])
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=bs, prog_bar=False)
        self.log("loss", terms["loss"].detach(), prog_bar=True, batch_size=bs, logger=False)
        return terms["loss"]

    def configure_optimizers(self) -> Any:
        """Optimizer (and scheduler) from the injected factories."""
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "epoch"}}

    # ------------------------------------------------------------------ validation
    def detect(self, volume: torch.Tensor) -> ScanDetections:
        """Whole-scan detection with this module's inference settings (see :func:`detect_scan`)."""
        return detect_scan(self.detector, volume, self.inference_cfg, context=self.preprocessing_cfg.slice_context)

    def _eval_step(self, batch: dict[str, Any]) -> None:
        was_training = self.detector.training
        result = self.detect(batch["image"])
        self.detector.train(was_training)
        affine = batch["affine"].cpu()
        dets = result.detections
        world = image_to_world_boxes(dets.boxes.cpu().double(), affine).numpy()
        props_world = image_to_world_boxes(result.proposals.boxes.cpu().double(), affine).numpy()
        gt_world = batch["world_box"].cpu().numpy().reshape(-1, world.shape[1] if world.size else 6)
        self._val_outputs.append(
            {
                "case_id": batch["case_id"] or batch["source"],
                "boxes": world,
                "scores": dets.scores.cpu().numpy(),
                "labels": dets.labels.cpu().numpy(),
                "proposals": props_world,
                "gt": gt_world,
                "gt_labels": batch["label"].cpu().numpy(),
            }
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Detect on one whole scan and keep the results for the epoch metrics."""
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Same as validation, on the test split."""
        self._eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        """Reset the collected outputs."""
        self._val_outputs = []

    def on_test_epoch_start(self) -> None:
        """Reset the collected outputs."""
        self._val_outputs = []

    def on_validation_epoch_end(self) -> None:
        """Compute and log FROC/CPM, AP, recall and class metrics."""
        self._finish_epoch("val")

    def on_test_epoch_end(self) -> None:
        """Compute and log the test metrics."""
        self._finish_epoch("test")

    def _gather(self) -> list[dict[str, Any]]:
        outputs = self._val_outputs
        if self.trainer is not None and self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, outputs)
            outputs = [o for part in gathered for o in part]
        seen: dict[str, dict[str, Any]] = {}
        for o in outputs:  # a distributed sampler may repeat scans to even out ranks
            seen.setdefault(o["case_id"], o)
        return list(seen.values())

    def _finish_epoch(self, prefix: str) -> None:
        outputs = self._gather()
        metrics = evaluate_scans(outputs, self.class_names, self.recall_ks)
        self.last_metrics = metrics.scalars
        self.last_froc = metrics.froc
        if metrics.scalars:
            self.log_dict(
                {f"{prefix}/{k}": v for k, v in metrics.scalars.items()}, sync_dist=False, rank_zero_only=True
            )
        if metrics.froc is None:
            rank_zero_info(f"{prefix}: no lesions in the {prefix} scans; FROC/CPM undefined")
            return
        if self.trainer is not None and self.trainer.is_global_zero:
            log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            if self.froc_plot and not self.trainer.sanity_checking:
                step = self.trainer.global_step
                plot_froc(
                    metrics.froc, log_dir / "froc" / f"{prefix}_froc_step{step:06d}.png", title=f"FROC ({prefix})"
                )
            if self.trainer.state.fn in ("validate", "test"):
                rank_zero_info(metrics.report(prefix))

    # ------------------------------------------------------------------ prediction
    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """Whole-scan prediction of one loaded scan, with the same code as ``medrpn infer``.

        Args:
            batch: a ``LoadedScan`` (or a ``ScanFailure`` from discovery/loading, passed through).

        Returns:
            A ``ScanPrediction`` for :class:`medrpn.inference.writer.ScanPredictionWriter`, or a ``ScanFailure``.
        """
        from medrpn.inference.batch import ScanFailure, describe_exception, predict_scan

        if isinstance(batch, ScanFailure):
            return batch
        try:
            return predict_scan(self, batch)
        except Exception as exc:  # one bad scan must not stop the batch: it becomes a failures.csv row
            return ScanFailure(batch.scan.relative_source, describe_exception(exc))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what inference needs as plain data (readable with ``weights_only=True``)."""
        checkpoint["medrpn_inference"] = {
            "format": 1,
            "detector": self.detector.spec,
            "preprocessing": asdict(self.preprocessing_cfg),
            "inference": asdict(self.inference_cfg),
            "class_names": list(self.class_names),
            "spatial_dims": self.detector.spatial_dims,
        }
        # dataclasses -> dicts, so the whole file loads with torch.load(weights_only=True)
        checkpoint["hyper_parameters"] = _plain_data(dict(checkpoint.get("hyper_parameters", {})))


DIAMETER_BANDS_MM: tuple[float, ...] = (0.0, 5.0, 10.0, math.inf)
"""Lesion-diameter bands (mm) of the per-size CPM in :class:`ScanMetrics`: under 5, 5-10 and 10 mm or more."""


@dataclass
class ScanMetrics:
    """Epoch metrics over whole scans.

    Attributes:
        scalars: flat metrics (``cpm``, its bootstrap bounds ``cpm_ci_low``/``cpm_ci_high``, ``sens@Rfp``,
            AP, proposal recall, per-class AP).
        froc: the FROC over all lesions (``None`` without lesions).
        confusion: lesion-class confusion matrix of matched detections (``None`` for one class).
        class_names: lesion class names.
        cpm_interval: 95% bootstrap interval of the CPM over scans.
        diameter_bands: CPM per lesion-diameter band (:data:`DIAMETER_BANDS_MM`).
    """

    scalars: dict[str, float]
    froc: FROCResult | None
    confusion: np.ndarray | None
    class_names: list[str]
    cpm_interval: BootstrapInterval | None = None
    diameter_bands: list[DiameterBand] = field(default_factory=list)

    def report(self, prefix: str) -> str:
        """A human-readable report: FROC table, detection and recall metrics, confusion matrix."""
        lines = [f"== {prefix} ({len(self.class_names)} lesion classes) ==", ""]
        if self.froc is not None:
            lines += [self.froc.table(), ""]
        if self.cpm_interval is not None:
            lines += [f"CPM {self.cpm_interval} over {self.froc.num_scans if self.froc else '?'} scans", ""]
        if self.diameter_bands:
            lines.append("CPM by lesion diameter (lesions of the other bands excluded, LUNA16 rule):")
            for band in self.diameter_bands:
                cpm = "   -" if band.froc is None else f"{band.froc.cpm:.3f}"
                lines.append(f"{band.label + ' mm':>14}: {cpm}  ({band.num_lesions} lesions)")
            lines.append("")
        for k, v in self.scalars.items():
            if not k.startswith("sens@"):
                lines.append(f"{k:>24}: {v:.4f}")
        if self.confusion is not None:
            names = [*self.class_names, "FP/missed"]
            lines += ["", "confusion (rows: true class + FP row; columns: predicted class + missed):"]
            lines.append(" " * 14 + "".join(f"{n[:12]:>13}" for n in names))
            for n, row in zip(names, self.confusion):
                lines.append(f"{n[:12]:>14}" + "".join(f"{int(v):>13d}" for v in row))
        return "\n".join(lines)


def evaluate_scans(
    outputs: Sequence[dict[str, Any]], class_names: Sequence[str], recall_ks: Sequence[int]
) -> ScanMetrics:
    """Metrics over whole scans (world mm boxes).

    Args:
        outputs: per scan ``case_id``, ``boxes`` ``(K, 2D)``, ``scores``, ``labels``, ``proposals`` (sorted),
            ``gt`` ``(M, 2D)``, ``gt_labels``.
        class_names: lesion class names.
        recall_ks: proposal counts for recall.

    Returns:
        :class:`ScanMetrics` (FROC ``None`` when there is no lesion at all).
    """
    if not outputs or sum(len(o["gt"]) for o in outputs) == 0:
        return ScanMetrics({}, None, None, list(class_names))
    cands = [ScanCandidates.from_boxes(o["case_id"], o["boxes"], np.clip(o["scores"], 0, None)) for o in outputs]
    lesions = [ScanLesions.from_boxes(o["case_id"], o["gt"]) for o in outputs]
    froc = compute_froc(cands, lesions)
    interval = bootstrap_cpm(cands, lesions, resamples=1000, seed=0)
    bands = froc_by_diameter(cands, lesions, edges=DIAMETER_BANDS_MM)
    scalars: dict[str, float] = {"cpm": float(froc.cpm), "cpm_ci_low": interval.low, "cpm_ci_high": interval.high}
    for rate, sens in zip(froc.fp_rates, froc.sensitivities):
        scalars[f"sens@{rate:g}fp"] = float(sens)
    maps = detection_map([o["boxes"] for o in outputs], [o["scores"] for o in outputs], [o["gt"] for o in outputs])
    scalars.update({k: float(v) for k, v in maps.items()})
    recall = proposal_recall(
        [o["proposals"] for o in outputs], [o["gt"] for o in outputs], ks=recall_ks, iou_threshold=0.1
    )
    scalars.update({f"rpn_recall@{k}": float(v) for k, v in recall.items()})
    confusion = None
    if len(class_names) > 1:
        pcap = per_class_ap(
            [o["boxes"] for o in outputs],
            [o["labels"] for o in outputs],
            [o["scores"] for o in outputs],
            [o["gt"] for o in outputs],
            [o["gt_labels"] for o in outputs],
            num_classes=len(class_names),
            iou_threshold=0.1,
            class_names=list(class_names),
        )
        scalars.update({f"AP@0.1/{k}": float(v) for k, v in pcap.items() if not math.isnan(v)})
        confusion = class_confusion(
            [o["boxes"] for o in outputs],
            [o["labels"] for o in outputs],
            [o["gt"] for o in outputs],
            [o["gt_labels"] for o in outputs],
            len(class_names),
            pred_scores=[o["scores"] for o in outputs],
            score_threshold=0.5,
            iou_threshold=0.1,
        )
    return ScanMetrics(scalars, froc, confusion, list(class_names), interval, bands)
