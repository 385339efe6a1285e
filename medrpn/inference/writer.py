"""Lightning prediction writer: the same per-scan outputs as ``medrpn infer``, written from ``Trainer.predict``.

Contract with the producer of the predictions (``LesionDetectionModule.predict_step`` and the datamodule's
``predict_dataloader``):

- ``predict_dataloader`` yields **one scan per batch**: a :class:`~medrpn.inference.batch.LoadedScan` (or a
  :class:`~medrpn.inference.batch.ScanFailure` when it could not be loaded). Build the items with
  :func:`~medrpn.inference.batch.plan_batch` (discovery, folder names, skipping finished scans, refusing an
  output folder inside an input) and :func:`~medrpn.inference.batch.try_prepare_scan` with
  ``PreprocessingSpec(...)`` of the model's preprocessing, in a ``Dataset.__getitem__`` (so DataLoader workers
  load and preprocess the next scans while the current one computes), with ``batch_size=1`` and a module-level
  ``collate_fn`` returning ``items[0]`` (default collation must not touch the MetaTensors' per-slice meta).
  Discovery failures of the plan (``plan.failures``) can be yielded as ``ScanFailure`` items so that they reach
  ``failures.csv``. ``LoadedScan``, ``ScanFailure`` and ``ScanPrediction`` define ``.to(device)``, so Lightning's
  batch transfer moves them whole (only the network input goes to the device) instead of traversing their frozen
  fields.
- ``predict_step(batch, batch_idx)`` returns ``predict_scan(self, batch)`` — a
  :class:`~medrpn.inference.batch.ScanPrediction` — for a ``LoadedScan``, catching any exception into a
  ``ScanFailure(batch.scan.relative_source, describe_exception(exc))``, and passes a ``ScanFailure`` through.
  A list of those objects, or ``None`` (nothing to write), is accepted too.

This writer then calls :func:`~medrpn.inference.batch.write_scan_outputs` for every ``ScanPrediction`` (the very
function ``medrpn infer`` uses) into ``output_dir / prediction.folder``, keeps the failures, and at the end of
the epoch — after a barrier, on global rank 0 only — rebuilds ``candidates.csv``, ``failures.csv`` (the failures
of every rank) and ``index.html`` from the output folder with :func:`~medrpn.inference.batch.finalize_batch`.

With several devices Lightning gives each rank a disjoint shard of the predict dataset (its
``UnrepeatedDistributedSamplerWrapper``), so each scan is computed and written by exactly one rank. Call
``trainer.predict(..., return_predictions=False)``: the predictions hold whole source images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from medrpn.inference.batch import ScanFailure, ScanPrediction, describe_exception, finalize_batch, write_scan_outputs
from medrpn.overlays.tables import PROPOSALS_JSON

__all__ = ["ScanPredictionWriter"]

logger = logging.getLogger(__name__)


class ScanPredictionWriter(BasePredictionWriter):
    """Writes each predicted scan's review outputs as soon as its batch ends (``write_interval="batch"``).

    Args:
        output_dir: the output root (one folder per scan, plus ``candidates.csv``/``failures.csv``/``index.html``).
        overwrite: rewrite a scan folder that already holds a ``proposals.json``; otherwise it is kept as is.

    Attributes:
        written: scan folders written by this rank in the current epoch.
        kept: scan folders left untouched because they were already finished.
        failures: ``(source, reason)`` collected by this rank in the current epoch.
    """

    def __init__(self, *, output_dir: str | None = None, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        # None: no output configured (the CLI adds this callback to every run; only `predict` needs it)
        self.output_dir = Path(output_dir or ".").expanduser()
        self.configured = output_dir is not None
        self.overwrite = overwrite
        self.written: list[Path] = []
        self.kept: list[Path] = []
        self.failures: list[tuple[str, str]] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the per-epoch bookkeeping.

        Raises:
            ValueError: no ``output_dir`` was given.
        """
        if not self.configured:
            raise ValueError("prediction needs an output folder: pass --prediction_writer.output_dir OUT")
        self.written, self.kept, self.failures = [], [], []

    def _write_one(self, item: ScanPrediction | ScanFailure | None) -> None:
        if item is None:
            return
        if isinstance(item, ScanFailure):
            self.failures.append(item.as_row())
            return
        if not isinstance(item, ScanPrediction):
            raise TypeError(
                f"ScanPredictionWriter expects ScanPrediction/ScanFailure predictions, got {type(item).__name__}"
            )
        folder = self.output_dir / item.folder
        if not self.overwrite and (folder / PROPOSALS_JSON).is_file():
            self.kept.append(folder)
            return
        try:
            write_scan_outputs(item, folder)
        except Exception as exc:  # one scan's writing problem must not stop the epoch
            logger.warning("scan %s (%s): writing failed: %s", item.result.scan_id, item.result.source, exc)
            self.failures.append((item.result.source, describe_exception(exc)))
            return
        self.written.append(folder)
        result = item.result
        logger.info("scan %s (%s): %d finding(s) -> %s", result.scan_id, result.source, len(result.findings), folder)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Write the scan(s) of one predict batch.

        Args:
            trainer: the trainer.
            pl_module: the module.
            prediction: a :class:`ScanPrediction`, a :class:`ScanFailure`, ``None``, or a list of them.
            batch_indices: dataset indices of the batch (unused).
            batch: the batch (unused).
            batch_idx: batch index (unused).
            dataloader_idx: dataloader index (unused).
        """
        items = prediction if isinstance(prediction, list | tuple) else [prediction]
        for item in items:
            self._write_one(item)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Barrier, gather every rank's failures, and rebuild the batch tables and index on rank 0."""
        trainer.strategy.barrier("medrpn_prediction_writer")
        failures = list(self.failures)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, failures)
            failures = [row for part in gathered for row in (part or [])]
        if trainer.is_global_zero:
            finalize_batch(self.output_dir, failures)
        trainer.strategy.barrier("medrpn_prediction_writer_done")
