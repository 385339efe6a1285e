"""Both notebooks execute end to end (nbclient, a kernel running this venv's python) and are committed cleared.

The review notebook runs on a hand-built batch output folder of one synthetic case (findings = its lesions plus one
false positive, see :func:`tests.test_review.build_synthetic_batch`); its example cell accepts the top finding and
rejects the lowest one, and the export must carry them with the world coordinates of ``proposals.json``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from medrpn.inference.results import findings_from_json
from medrpn.overlays.tables import PROPOSALS_JSON
from tests.test_review import build_synthetic_batch, tree_hashes

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REVIEW_NB = NOTEBOOKS / "review_proposals.ipynb"
RPN_NB = NOTEBOOKS / "how_rpn_works.ipynb"
KERNEL_NAME = "medrpn-test-venv"
CELL_TIMEOUT = 300


def _kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    """A kernel manager whose only kernel runs ``sys.executable`` (this venv's python) with ipykernel."""
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "medrpn test venv",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    assert ksm.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def run_notebook(path: Path, tmp_path: Path, env: dict[str, str]) -> Any:
    """Execute a notebook in ``tmp_path`` with extra environment variables; returns the executed notebook."""
    nb = nbformat.read(path, as_version=4)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=CELL_TIMEOUT,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(work)}},
    )
    full_env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore", **env}
    client.execute(env=full_env)  # raises CellExecutionError on the first failing cell
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
    return nb


def _stdout(nb: Any) -> str:
    return "".join(out.get("text", "") for c in nb.cells for out in c.get("outputs", []) if out.get("name") == "stdout")


def _png_outputs(nb: Any) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


@pytest.mark.parametrize("path", [REVIEW_NB, RPN_NB], ids=lambda p: p.name)
def test_committed_notebooks_are_cleared(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for c in code:
        assert c.outputs == [], f"{path.name}: a code cell has outputs"
        assert c.execution_count is None, f"{path.name}: a code cell has an execution count"
    first = code[0].source
    if path == REVIEW_NB:
        for name in ("OUTPUT_DIR", "SCAN_ROOT", "MEDRPN_REVIEW_OUTPUT", "MEDRPN_REVIEW_SCANS", "MEDRPN_REVIEW_EXPORT"):
            assert name in first, f"{name} is not set in the first code cell"
        assert "runs" in first and "demo" in first and "heldout" in first


def test_review_notebook_executes_and_exports(tmp_path: Path) -> None:
    case = build_synthetic_batch(tmp_path)
    out = tmp_path / "infer"
    export = tmp_path / "review_export"
    before = tree_hashes(out)
    nb = run_notebook(
        REVIEW_NB,
        tmp_path,
        {
            "MEDRPN_REVIEW_OUTPUT": str(out),
            "MEDRPN_REVIEW_SCANS": str(tmp_path / "data"),  # the scan is in data/nifti: found in a sub-folder
            "MEDRPN_REVIEW_EXPORT": str(export),
        },
    )
    assert tree_hashes(out) == before, "the notebook modified the batch outputs"
    stdout = _stdout(nb)
    assert "1 scan(s)" in stdout and "scans not found" not in stdout
    assert '"format": "medrpn-review"' in stdout  # the exported JSON is printed
    assert _png_outputs(nb) >= 3  # the top finding + the static figures (no ipywidgets here)

    _, originals = findings_from_json(out / case.case_id / PROPOSALS_JSON)
    top = max(originals, key=lambda f: f.score)
    lowest = min(originals, key=lambda f: f.score)
    doc = json.loads((export / "review.json").read_text())
    assert doc["coordinate_system"] == "LPS" and "LPS" in doc["convention"]
    accepted = [r for r in doc["findings"] if r["decision"] == "accepted"]
    rejected = [r for r in doc["findings"] if r["decision"] == "rejected"]
    assert [(r["scan"], r["rank"]) for r in accepted] == [(case.case_id, top.rank)]
    assert [(r["scan"], r["rank"]) for r in rejected] == [(case.case_id, lowest.rank)]
    np.testing.assert_allclose(accepted[0]["box"], top.box, rtol=0, atol=1e-6)
    np.testing.assert_allclose(accepted[0]["centre"], top.centre, rtol=0, atol=1e-6)
    assert accepted[0]["score"] == pytest.approx(top.score, abs=1e-12)
    assert len(doc["findings"]) == len(originals)

    with (export / "review.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    (row,) = [r for r in rows if r["decision"] == "accepted"]
    assert (row["scan"], int(row["rank"])) == (case.case_id, top.rank)
    np.testing.assert_allclose([float(row[f"centre_{a}_lps_mm"]) for a in "xyz"], top.centre, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        [float(row[f"{a}_{m}_lps_mm"]) for m in ("min", "max") for a in "xyz"], top.box, rtol=0, atol=1e-6
    )
    assert [r["decision"] for r in rows if int(r["rank"]) == lowest.rank] == ["rejected"]


def test_how_rpn_works_notebook_executes(tmp_path: Path) -> None:
    nb = run_notebook(RPN_NB, tmp_path, {"MEDRPN_RPN_STEPS": "150"})
    stdout = _stdout(nb)
    assert "11520 anchors" in stdout
    assert "150 steps" in stdout
    assert "low-quality matches" in stdout and "after NMS" in stdout
    assert _png_outputs(nb) == 7
