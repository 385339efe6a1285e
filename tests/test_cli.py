"""The `medrpn` command: configs parse, a short training smoke run, and DDP with two CPU processes."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import medrpn.cli
from medrpn.cli import MedrpnCLI, main, resolve_precision
from medrpn.data.datamodule import LesionDataModule
from medrpn.data.synthetic import generate_dataset
from medrpn.inference.checkpoint import load_inference_model
from medrpn.module import LesionDetectionModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_builds_model_and_data(config: Path) -> None:
    cli = MedrpnCLI(
        LesionDetectionModule,
        LesionDataModule,
        run=False,
        args=["--config", str(config), "--trainer.logger", "false"],
        parser_kwargs={"default_env": False},
    )
    model, data = cli.model, cli.datamodule
    assert isinstance(model, LesionDetectionModule) and isinstance(data, LesionDataModule)
    # linked preprocessing reaches the model, so checkpoints carry it
    assert tuple(model.preprocessing_cfg.spacing_mm) == tuple(data.spacing_mm)
    assert model.preprocessing_cfg.slice_context == data.slice_context
    assert model.detector.spatial_dims == data.spatial_dims
    assert model.detector.in_channels == data.in_channels


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_falls_back_to_float32_without_native_support(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(medrpn.cli, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision, reason = resolve_precision("bf16-mixed", "auto")
    assert (precision, reason is None) == (("bf16-mixed", True) if native else ("32-true", False))
    assert resolve_precision("bf16-mixed", "gpu") == ("bf16-mixed", None)  # GPUs are left alone
    assert resolve_precision("32-true", "cpu") == ("32-true", None)
    cli = MedrpnCLI(
        LesionDetectionModule,
        LesionDataModule,
        run=False,
        args=["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger", "false"],
        parser_kwargs={"default_env": False},
    )
    assert str(cli.trainer.precision) == ("bf16-mixed" if native else "32-true")


def test_usage_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "synth" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def _tiny_args(tmp_path: Path, datalist: Path) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        f"--data.datalist={datalist}",
        "--data.patch_size=[32,32,24]",
        "--data.samples_per_scan=2",
        "--data.batch_size=2",
        "--data.augment=false",
        "--model.inference.patch_size=[48,48,32]",
        f"--trainer.default_root_dir={tmp_path}/run",
        f"--checkpoint.dirpath={tmp_path}/ckpt",
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}/logs",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1",
    ]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, cases=4, seed=3, shape=(64, 64, 32), val_fraction=0.25, write_dicom=False)
    return out / "datalist.json"


@pytest.mark.slow
def test_fit_smoke_losses_decrease_and_proposals_are_well_formed(tmp_path: Path, tiny_data: Path) -> None:
    args = [*_tiny_args(tmp_path, tiny_data), "--trainer.max_steps=40", "--trainer.check_val_every_n_epoch=1000"]
    assert main(["fit", *args]) == 0
    rows = list(csv.DictReader((tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 30
    assert all(math.isfinite(v) for v in losses)
    for key in ("train/loss_rpn_objectness", "train/loss_rpn_box", "train/loss_head_class", "train/loss_head_box"):
        assert any(r.get(key) for r in rows), f"{key} not logged"
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first, f"loss did not decrease: {first:.3f} -> {last:.3f}"

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    model = load_inference_model(ckpt)  # weights_only=True round trip
    assert model.hessian_sigmas_mm == (1.0, 2.0)  # the demo's shape channels travel with the checkpoint
    dm = LesionDataModule.for_model(model, datalist=str(tiny_data), patch_size=(32, 32, 24))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    from medrpn.inference.whole_scan import detect_scan

    result = detect_scan(model.detector, batch["image"], model.whole_scan)
    size = torch.tensor(batch["image"].shape[2:], dtype=torch.float32)
    for boxes, scores in (
        (result.proposals.boxes, result.proposals.scores),
        (result.detections.boxes, result.detections.scores),
    ):
        assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
        assert (boxes[:, 3:] >= boxes[:, :3]).all()
        assert (boxes[:, :3] >= 0).all() and (boxes[:, 3:] <= size).all()
        assert ((scores >= 0) & (scores <= 1)).all()
    assert (result.detections.scores[:-1] >= result.detections.scores[1:]).all()

    # `medrpn predict` (Lightning + prediction writer) and `medrpn infer` write the same findings
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(sorted((tiny_data.parent / "nifti").glob("*.nii.gz"))[0], scans)
    out_predict, out_infer = tmp_path / "predicted", tmp_path / "inferred"
    predict_args = [
        *_tiny_args(tmp_path, tiny_data),
        f"--ckpt_path={ckpt}",
        f"--data.predict_inputs=[{scans}]",
        f"--prediction_writer.output_dir={out_predict}",
        "--trainer.precision=32-true",  # as `medrpn infer --precision 32` below; the demo config trains in bf16-mixed
    ]
    assert main(["predict", *predict_args]) == 0
    assert (
        main(
            [
                *("infer", "--checkpoint", str(ckpt), "--input", str(scans), "--output", str(out_infer)),
                *("--no-progress", "--precision", "32"),
            ]
        )
        == 0
    )
    predicted = sorted(p.relative_to(out_predict) for p in out_predict.rglob("proposals.json"))
    inferred = sorted(p.relative_to(out_infer) for p in out_infer.rglob("proposals.json"))
    assert predicted == inferred and len(predicted) == 1
    for rel in predicted:
        a = json.loads((out_predict / rel).read_text())
        b = json.loads((out_infer / rel).read_text())
        np.testing.assert_allclose(a["box"], b["box"], atol=1e-4)
        np.testing.assert_allclose(a["label_scores"], b["label_scores"], atol=1e-5)
        assert a["inference"] == b["inference"] == {"precision": "float32", "tta": False}
    assert (out_predict / "candidates.csv").read_text() == (out_infer / "candidates.csv").read_text()


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path, tiny_data: Path) -> None:
    args = [
        *_tiny_args(tmp_path, tiny_data),
        "--trainer.max_steps=3",
        "--trainer.check_val_every_n_epoch=1000",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--data.cache=none",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "medrpn.cli", "fit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size: 2" in proc.stderr or "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
