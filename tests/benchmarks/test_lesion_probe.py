"""``benchmarks/lesion_probe.py`` on a tiny real checkpoint and generated scans: one row per lesion, sane values."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from medrpn.data.synthetic import generate_dataset
from tests.benchmarks import load_benchmark
from tests.inference.conftest import make_detector, write_checkpoint


@pytest.fixture(scope="module")
def probe() -> ModuleType:
    return load_benchmark("lesion_probe")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe_data")
    generate_dataset(out, cases=3, seed=4, shape=(64, 64, 32), val_fraction=0.67, write_dicom=False)
    return out / "datalist.json"


def test_one_row_per_lesion_with_valid_values(probe: ModuleType, data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt", make_detector(3), patch_size=(48, 48, 32))
    expected = sum(len(item["box"]) for item in json.loads(data.read_text())["validation"])
    assert expected > 0
    out = tmp_path / "probe.csv"
    assert (
        probe.main(["--checkpoint", str(ckpt), "--datalist", str(data), "--patch", "32", "32", "16", "--out", str(out)])
        == 0
    )
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == expected
    for row in rows:
        assert float(row["diameter_mm"]) > 0
        assert 0.0 <= float(row["head_lesion_prob"]) <= 1.0
        assert int(row["head_class"]) in (0, 1, 2)
        objectness = float(row["rpn_objectness"])
        assert math.isnan(objectness) or 0.0 <= objectness <= 1.0
        assert (int(row["rpn_rank"]) == -1) == math.isnan(objectness)


def test_summary_counts_per_band(probe: ModuleType) -> None:
    row = probe.LesionProbe
    rows = [
        row("a", 0, 3.5, 0, 0.95, 0, 0.2, 0.1, 0),  # found by the RPN, rejected by the head
        row("a", 1, 4.0, 0, math.nan, -1, 9.0, 0.8, 0),  # no anchor centre inside, head says lesion
        row("b", 0, 12.0, 1, 0.99, 0, 0.1, 0.9, 1),
    ]
    table = probe.summarise(rows)
    assert "| < 5 mm | 2 | 1 | 1 | 0 | 0.450 |" in table
    assert "| >= 10 mm | 1 | 1 | 1 | 1 | 0.900 |" in table
    assert "5-10 mm" not in table  # empty bands are left out


def test_missing_checkpoint_is_a_clear_error(
    probe: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert probe.main(["--checkpoint", str(tmp_path / "nope.ckpt"), "--datalist", str(tmp_path / "x.json")]) == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err


def test_patch_larger_than_the_scan_is_padded(probe: ModuleType, data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt", make_detector(3), patch_size=(48, 48, 32))
    rows = probe.probe_checkpoint(ckpt, data, patch=(96, 96, 64))  # the preprocessed test scans are ~34 x 34 x 21
    assert rows and all(0.0 <= r.head_lesion_prob <= 1.0 for r in rows)


def test_patch_must_fit_the_strides(probe: ModuleType, data: Path, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "tiny.ckpt", make_detector(3), patch_size=(48, 48, 32))
    with pytest.raises(ValueError, match="multiple of the coarsest stride"):
        probe.probe_checkpoint(ckpt, data, patch=(30, 30, 30))
