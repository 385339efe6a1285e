"""The Lightning prediction writer writes exactly what ``run_batch`` writes, through ``Trainer.predict``.

A tiny LightningModule stands in for ``LesionDetectionModule.predict_step``: it calls the shared
:func:`predict_scan` on the :class:`LoadedScan` batches of a small predict dataset built with the shared
:func:`plan_batch` / :func:`try_prepare_scan`, exactly as the writer's module docstring asks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from medrpn.inference.batch import (
    BatchPlan,
    LoadedScan,
    PreprocessingSpec,
    ScanFailure,
    ScanPrediction,
    describe_exception,
    plan_batch,
    predict_scan,
    run_batch,
    try_prepare_scan,
)
from medrpn.inference.checkpoint import InferenceModel, load_inference_model
from medrpn.inference.writer import ScanPredictionWriter
from medrpn.module import PreprocessingConfig

from .conftest import Inputs, Oracle


class TinyPredictModule(pl.LightningModule):
    """What ``LesionDetectionModule.predict_step`` has to do, on a module with the same attributes."""

    def __init__(self, model: InferenceModel) -> None:
        super().__init__()
        self.detector = model.detector
        self.preprocessing_cfg = PreprocessingConfig(
            spacing_mm=tuple(model.spacing_mm),
            intensity=model.intensity,  # type: ignore[arg-type]
            ct_window=tuple(model.ct_window),
            orientation=model.orientation,
            slice_context=model.slice_context,
        )
        self.inference_cfg = model.whole_scan
        self.class_names = list(model.class_names)
        self.checkpoint_path = model.source

    def predict_step(self, batch: LoadedScan | ScanFailure, batch_idx: int) -> ScanPrediction | ScanFailure:
        if isinstance(batch, ScanFailure):
            return batch
        try:
            return predict_scan(self, batch)
        except Exception as exc:
            return ScanFailure(batch.scan.relative_source, describe_exception(exc))


class PredictScans(Dataset):
    """One planned scan (loaded and preprocessed here, i.e. in DataLoader workers) or failure per item."""

    def __init__(self, plan: BatchPlan, spec: PreprocessingSpec) -> None:
        self.items: list[Any] = [*plan.todo, *(ScanFailure(s, r) for s, r in plan.failures)]
        self.spec = spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> LoadedScan | ScanFailure:
        item = self.items[index]
        return item if isinstance(item, ScanFailure) else try_prepare_scan(item, self.spec)


def first_item(items: list[Any]) -> Any:
    return items[0]


def _predict(module: TinyPredictModule, inputs: Inputs, out: Path, *, overwrite: bool = False) -> list[Any]:
    writer = ScanPredictionWriter(output_dir=str(out), overwrite=overwrite)
    plan = plan_batch([inputs.root], out, overwrite=True)  # the writer itself decides what to keep
    loader = DataLoader(PredictScans(plan, PreprocessingSpec.from_model(module)), batch_size=1, collate_fn=first_item)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    predictions = trainer.predict(module, dataloaders=loader)
    assert predictions is not None
    return [writer, *predictions]


def test_writer_matches_run_batch(inputs: Inputs, ckpt_3d: Path, oracle: Oracle, tmp_path: Path) -> None:
    model = load_inference_model(ckpt_3d)
    ref = tmp_path / "batch"
    # float32 as the Lightning path here (no trainer autocast), so that proposals.json records the same precision
    report = run_batch(model, [inputs.root], ref, precision="32", progress=False)
    out = tmp_path / "lightning"
    writer, *predictions = _predict(TinyPredictModule(model), inputs, out)
    assert sum(isinstance(p, ScanPrediction) for p in predictions) == len(inputs.cases)
    assert sum(isinstance(p, ScanFailure) for p in predictions) == 1
    assert len(writer.written) == len(inputs.cases)

    for name in ("candidates.csv", "failures.csv", "index.html"):
        assert (out / name).read_text() == (ref / name).read_text(), name
    ref_folders = sorted(p.name for p in ref.iterdir() if p.is_dir())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ref_folders
    assert sorted(p.folder.name for p in report.processed) == ref_folders
    for folder in ref_folders:
        a, b = ref / folder, out / folder
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for name in ("proposals.json", "findings.mrk.json"):
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())
        for name in ("findings_labels.nii.gz", "objectness.nii.gz"):
            ia, ib = nib.load(str(a / name)), nib.load(str(b / name))
            assert isinstance(ia, nib.Nifti1Image) and isinstance(ib, nib.Nifti1Image)
            np.testing.assert_array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
            np.testing.assert_array_equal(ia.affine, ib.affine)


def test_writer_keeps_finished_scans_unless_overwrite(
    inputs: Inputs, ckpt_3d: Path, oracle: Oracle, tmp_path: Path
) -> None:
    module = TinyPredictModule(load_inference_model(ckpt_3d))
    out = tmp_path / "out"
    writer, *_ = _predict(module, inputs, out)
    assert len(writer.written) == len(inputs.cases)
    proposals = sorted(out.glob("*/proposals.json"))
    mtimes = [p.stat().st_mtime_ns for p in proposals]
    writer2, *_ = _predict(module, inputs, out)
    assert writer2.written == [] and len(writer2.kept) == len(proposals)
    assert [p.stat().st_mtime_ns for p in proposals] == mtimes
    assert len(writer2.failures) == 1  # the corrupt file is reported again
    writer3, *_ = _predict(module, inputs, out, overwrite=True)
    assert len(writer3.written) == len(proposals)
    assert [p.stat().st_mtime_ns for p in proposals] != mtimes


def test_writer_rejects_unknown_predictions(tmp_path: Path) -> None:
    writer = ScanPredictionWriter(output_dir=str(tmp_path))
    with pytest.raises(TypeError, match="ScanPrediction"):
        writer.write_on_batch_end(None, None, {"boxes": []}, None, None, 0, 0)  # type: ignore[arg-type]
