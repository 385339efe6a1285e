"""Inference precision: resolution of ``auto``, the autocast region, and what batch inference records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medrpn.inference.precision as precision_mod
from medrpn.data.io import discover_scans
from medrpn.inference.batch import build_parser, process_scan
from medrpn.inference.checkpoint import load_inference_model
from medrpn.inference.precision import (
    INFERENCE_PRECISIONS,
    InferencePrecision,
    as_inference_precision,
    dtype_name,
    inference_autocast,
    resolve_inference_dtype,
)
from tests.inference.conftest import Inputs


def test_forced_precisions_ignore_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: False)
    assert resolve_inference_dtype("32", "cpu") == torch.float32
    assert resolve_inference_dtype("bf16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_auto_uses_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: native)
    assert resolve_inference_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert resolve_inference_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="inference precision must be one of auto, 32, bf16, got 'fp16'"):
        resolve_inference_dtype("fp16", "cpu")
    assert INFERENCE_PRECISIONS == ("auto", "32", "bf16")
    assert [as_inference_precision(p) for p in INFERENCE_PRECISIONS] == list(INFERENCE_PRECISIONS)
    with pytest.raises(ValueError, match="got 'float32'"):
        as_inference_precision("float32")
    assert dtype_name(torch.bfloat16) == "bf16" and dtype_name(torch.float32) == "float32"


def test_autocast_region_and_float32_inside_an_enclosing_autocast() -> None:
    conv = torch.nn.Conv3d(2, 4, 3)
    x = torch.randn(1, 2, 6, 6, 6)
    with inference_autocast("bf16", "cpu") as dtype:
        assert dtype == torch.bfloat16
        assert conv(x).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    # a Lightning trainer's bf16 autocast around a run that asked for float32 does not leak into it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with inference_autocast("32", "cpu") as dtype:
            assert dtype == torch.float32
            assert conv(x).dtype == torch.float32
        assert conv(x).dtype == torch.bfloat16


def test_infer_parser_precision_option() -> None:
    parser = build_parser()
    base = ["--checkpoint", "m.ckpt", "--input", "in", "--output", "out"]
    assert parser.parse_args(base).precision == "auto"
    assert parser.parse_args([*base, "--precision", "32"]).precision == "32"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--precision", "fp16"])


def test_infer_logs_the_precision_and_warns_about_emulated_bf16(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, ckpt_3d: Path, tmp_path: Path
) -> None:
    import logging

    import medrpn.inference.batch as batch

    monkeypatch.setattr(batch, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: False)
    empty = tmp_path / "in"
    empty.mkdir()
    base = ["--checkpoint", str(ckpt_3d), "--input", str(empty), "--no-progress"]
    with caplog.at_level(logging.INFO, logger="medrpn.inference.batch"):
        batch.infer_main([*base, "--output", str(tmp_path / "a")])
        assert "network precision: float32 (--precision auto)" in caplog.text
        assert "emulated" not in caplog.text
        batch.infer_main([*base, "--output", str(tmp_path / "b"), "--precision", "bf16"])
    assert "network precision: bfloat16 autocast (--precision bf16)" in caplog.text
    assert "emulated and slower than float32" in caplog.text


def test_bf16_and_float32_scan_results_agree_and_are_recorded(inputs: Inputs, ckpt_3d: Path, tmp_path: Path) -> None:
    """The same scan in both precisions: the precision is written to proposals.json; the top findings agree."""
    model = load_inference_model(ckpt_3d)
    nifti = next(inputs.root / rel for sid, rel in inputs.sources.items() if inputs.formats[sid] == "nifti")
    source = discover_scans([nifti]).scans[0]
    results = {}
    both: tuple[InferencePrecision, ...] = ("32", "bf16")
    for p in both:
        res = process_scan(model, source, tmp_path / p, input_root=inputs.root, tta=False, precision=p)
        doc = json.loads((tmp_path / p / "proposals.json").read_text())
        assert doc["inference"] == {"precision": "float32" if p == "32" else "bf16", "tta": False}
        assert doc["box_mode"] == "xyzxyz" and doc["coordinate_system"].startswith("LPS")
        results[p] = res
    f32, b16 = results["32"].findings, results["bf16"].findings
    assert f32 and b16
    # bfloat16 rounds the feature maps only: every float32 finding among the top 3 is found in bfloat16 too, the
    # same box to a fraction of a voxel (4 mm) and nearly the same score (random weights: scores nearly tie, so the
    # ranks may swap; the boxes are matched, not the ranks)
    b16_boxes = np.array([f.box for f in b16])
    for f in f32[:3]:
        dist = np.abs(b16_boxes - np.asarray(f.box)).max(axis=1)
        match = b16[int(dist.argmin())]
        assert dist.min() < 1.0 and abs(match.score - f.score) < 0.02
