"""End-to-end speed and memory of batch inference (``run_batch``) on one CT-sized volume.

What it measures: one synthetic CT-like volume of **512 x 512 x 300** voxels (0.7 x 0.7 x 1.0 mm, int16 HU, a
chest-like phantom with a few spherical nodules) written as NIfTI into a temporary input folder, processed by
:func:`medrpn.inference.batch.run_batch` with a model built as ``configs/demo.yaml`` describes (random weights,
unless ``--checkpoint`` gives a trained one). Each run happens in a **fresh subprocess** that reports its stage
timings (load, preprocess, detect, postprocess = world conversion + heatmap resampling, write = PNGs, NIfTI,
markups, proposals.json; "tables" = candidates.csv/failures.csv/index.html), its total wall time and its peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The median over ``--repeats`` runs is printed
as a Markdown table together with the targets (< 60 s, < 6 GB), for every inference precision of
``--precisions`` (default ``32 auto``: float32, the reference, and bfloat16 autocast where the CPU has it natively;
runs interleaved, ratios against the first in the same run). When a target is missed, the stage table and the
functions that took the most time (cProfile of the first run) are printed: the profile is reported, not hidden.

Usage::

    .venv/bin/python benchmarks/infer_speed.py                 # median of 3 runs
    .venv/bin/python benchmarks/infer_speed.py --repeats 1 --checkpoint runs/demo/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 60.0
TARGET_RSS_GB = 6.0
STAGES = ("load", "preprocess", "detect", "postprocess", "write", "tables")


# ------------------------------------------------------------------------------------------------ phantom
def write_phantom(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> None:
    """A chest-like HU phantom: air, elliptical body, two lungs, a spine, a few solid nodules, noise.

    Args:
        path: the ``.nii.gz`` to write.
        shape: ``(X, Y, Z)`` voxels.
        spacing: mm per axis.
        seed: noise seed.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    sx, sy, sz = spacing
    x = (np.arange(nx) - (nx - 1) / 2) * sx  # mm from the centre (LPS x: patient left)
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    z = (np.arange(nz) - (nz - 1) / 2) * sz
    xx, yy = np.meshgrid(x, y, indexing="ij")
    nodules = [  # (centre LPS mm relative to the volume centre, radius mm)
        ((-70.0, -10.0, 20.0), 4.0),
        ((65.0, 15.0, -40.0), 7.0),
        ((80.0, -30.0, 60.0), 10.0),
        ((-55.0, 35.0, -80.0), 3.0),
    ]
    volume = np.empty(shape, dtype=np.int16)
    for k in range(nz):
        zk = z[k]
        taper = 1.0 - 0.15 * (zk / (z[-1] + 1e-6)) ** 2
        body = (xx / (160.0 * taper)) ** 2 + (yy / (115.0 * taper)) ** 2 <= 1.0
        sl = np.where(body, 40.0, -1000.0)
        for side in (-1.0, 1.0):
            lung = ((xx - side * 70.0) / 55.0) ** 2 + ((yy + 5.0) / 75.0) ** 2 <= 1.0 - (zk / 170.0) ** 2
            sl[lung] = -850.0
        spine = (xx / 18.0) ** 2 + ((yy - 75.0) / 18.0) ** 2 <= 1.0
        sl[spine] = 450.0
        for (cx, cy, cz), r in nodules:
            if abs(zk - cz) < r:
                rr = np.sqrt(r * r - (zk - cz) ** 2)
                sl[(xx - cx) ** 2 + (yy - cy) ** 2 <= rr * rr] = 30.0
        sl += rng.normal(0.0, 20.0, size=sl.shape)
        volume[:, :, k] = np.clip(np.rint(sl), -1024, 3071).astype(np.int16)
    lps = np.diag([sx, sy, sz, 1.0])
    lps[:3, 3] = [-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -200.0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    img = nib.Nifti1Image(volume, ras)
    img.set_qform(ras, code=1)
    img.set_sform(ras, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


# -------------------------------------------------------------------------------------------------- model
def _init_args(node: dict[str, Any]) -> dict[str, Any]:
    return dict(node.get("init_args", node))


def write_demo_checkpoint(path: Path, config: Path | None) -> str:
    """Write a random-weight checkpoint of the model of ``configs/demo.yaml`` (or the documented fallback).

    Args:
        path: the ``.ckpt`` to write.
        config: the YAML config, or ``None``/missing for the fallback (3D ``ResNetFPN`` "small", 3 levels,
            1.5 mm, patch 96 x 96 x 64).

    Returns:
        A one-line description of the model.
    """
    import torch

    from medrpn.inference.whole_scan import WholeScanConfig
    from medrpn.modeling.anchors import AnchorGenerator
    from medrpn.modeling.backbone import ResNetFPN
    from medrpn.modeling.detector import HeadConfig, LesionDetector, RPNConfig
    from medrpn.module import LesionDetectionModule, PreprocessingConfig

    torch.manual_seed(0)
    if config is not None and config.is_file():
        import yaml

        cfg = yaml.safe_load(config.read_text())
        det = _init_args(cfg["model"]["detector"])
        data = cfg.get("data", {})
        detector = LesionDetector(
            backbone=ResNetFPN(**_init_args(det["backbone"])),
            anchor_generator=AnchorGenerator(**_init_args(det["anchor_generator"])),
            num_classes=int(det.get("num_classes", 3)),
            rpn=RPNConfig(**det.get("rpn", {})),
            head=HeadConfig(**det.get("head", {})),
            rpn_only=bool(det.get("rpn_only", False)),
            channels_last=bool(det.get("channels_last", False)),
        )
        inference = WholeScanConfig(**cfg["model"].get("inference", {}))
        pre = PreprocessingConfig(
            spacing_mm=tuple(data.get("spacing_mm", (1.5, 1.5, 1.5))),
            intensity=data.get("intensity", "ct"),
            ct_window=tuple(data.get("ct_window", (-1000.0, 500.0))),
            orientation=data.get("orientation", "RAS"),
            slice_context=int(data.get("slice_context", 0)),
            hessian_sigmas_mm=tuple(float(v) for v in data.get("hessian_sigmas_mm", ())),
            hessian_gain=float(data.get("hessian_gain", 20.0)),
        )
        names = tuple(cfg["model"].get("class_names", ("solid", "ground-glass", "part-solid")))
        what = f"{config.name} (random weights)"
    else:
        spacing = (1.5, 1.5, 1.5)
        detector = LesionDetector(
            backbone=ResNetFPN(spatial_dims=3, variant="small", return_stages=(1, 2, 3)),
            anchor_generator=AnchorGenerator(
                spatial_dims=3,
                sizes=None,
                shapes=[[[6.0] * 3, [10.0] * 3], [[16.0] * 3, [22.0] * 3], [[30.0] * 3, [40.0] * 3]],
                spacing_mm=spacing,
            ),
            num_classes=3,
        )
        inference = WholeScanConfig(patch_size=(96, 96, 64))
        pre = PreprocessingConfig(spacing_mm=spacing)
        names = ("solid", "ground-glass", "part-solid")
        what = "fallback ResNetFPN small, 3 levels (random weights)"
    module = LesionDetectionModule(
        detector=detector, inference=inference, preprocessing=pre, class_names=names, froc_plot=False
    )
    ckpt: dict[str, Any] = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return what


# ------------------------------------------------------------------------------------------------- worker
def worker(
    checkpoint: Path, input_dir: Path, output: Path, result_json: Path, profile: bool, precision: str = "auto"
) -> None:
    """One measured run (in its own process): load the model, ``run_batch``, report timings and peak RSS."""
    from medrpn.inference.batch import run_batch
    from medrpn.inference.checkpoint import load_inference_model
    from medrpn.inference.precision import as_inference_precision, dtype_name, resolve_inference_dtype

    model = load_inference_model(checkpoint)
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    report = run_batch(model, [input_dir], output, precision=as_inference_precision(precision), progress=False)
    if profiler is not None:
        profiler.disable()
    total = time.perf_counter() - t0
    if report.failures or len(report.processed) != 1:
        raise SystemExit(f"benchmark run failed: {report.failures}")
    stages = dict(report.processed[0].timings)
    stages["tables"] = max(total - sum(stages.values()), 0.0)
    top = ""
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(15)
        top = buf.getvalue()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    result_json.write_text(
        json.dumps(
            {
                "stages": stages,
                "total": total,
                "peak_rss_gb": rss_kb / 1024**2,
                "findings": report.processed[0].num_findings,
                "threads": int(__import__("torch").get_num_threads()),
                "precision": dtype_name(resolve_inference_dtype(precision, "cpu")),
                "profile": top,
            }
        )
    )


# ------------------------------------------------------------------------------------------------- driver
def _run_once(
    checkpoint: Path, input_dir: Path, work: Path, index: int, profile: bool, precision: str = "auto"
) -> dict[str, Any]:
    out = work / f"out_{precision}_{index}"
    result = work / f"result_{precision}_{index}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--checkpoint",
        str(checkpoint),
        "--input-dir",
        str(input_dir),
        "--output",
        str(out),
        "--result",
        str(result),
        "--precision",
        precision,
    ]
    if profile:
        cmd.append("--profile")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env)
    return dict(json.loads(result.read_text()))


def _table(runs: list[dict[str, Any]], shape: tuple[int, ...], spacing: tuple[float, ...], model: str) -> str:
    med = {s: statistics.median(r["stages"].get(s, 0.0) for r in runs) for s in STAGES}
    total = statistics.median(r["total"] for r in runs)
    rss = statistics.median(r["peak_rss_gb"] for r in runs)
    lines = [
        f"**run_batch on one {' x '.join(map(str, shape))} volume ({' x '.join(f'{s:g}' for s in spacing)} mm), "
        f"{model}; median of {len(runs)} run(s), {runs[0]['threads']} torch thread(s), "
        f"{runs[0]['findings']} finding(s)**",
        "",
        "| stage | seconds | share |",
        "|---|---:|---:|",
    ]
    for s in STAGES:
        lines.append(f"| {s} | {med[s]:.1f} | {100 * med[s] / total:.0f}% |")
    lines += [
        f"| **total** | **{total:.1f}** | 100% |",
        f"| **peak RSS** | **{rss:.2f} GB** | |",
        "",
        f"targets: total < {TARGET_SECONDS:.0f} s: {'met' if total < TARGET_SECONDS else 'MISSED'}; "
        f"peak RSS < {TARGET_RSS_GB:.0f} GB: {'met' if rss < TARGET_RSS_GB else 'MISSED'}",
        "all runs (total s / peak GB): " + ", ".join(f"{r['total']:.1f} / {r['peak_rss_gb']:.2f}" for r in runs),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Benchmark entry point (also the worker entry point with ``--worker``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--checkpoint", type=Path, help="trained checkpoint (default: demo model, random weights)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="model config")
    parser.add_argument("--repeats", type=int, default=3, help="runs (median reported)")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0), metavar=("SX", "SY", "SZ"))
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["32", "auto"],
        choices=("auto", "32", "bf16"),
        help="inference precisions to compare, runs interleaved (default: 32 auto; the first is the reference)",
    )
    parser.add_argument("--no-profile", action="store_true", help="do not profile the first run")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", choices=("auto", "32", "bf16"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.checkpoint, args.input_dir, args.output, args.result, args.profile, args.precision)
        return 0

    shape = tuple(int(v) for v in args.shape)
    spacing = tuple(float(v) for v in args.spacing)
    with tempfile.TemporaryDirectory(prefix="medrpn_bench_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        input_dir = work / "input"
        t0 = time.perf_counter()
        write_phantom(
            input_dir / "phantom.nii.gz", (shape[0], shape[1], shape[2]), (spacing[0], spacing[1], spacing[2])
        )
        print(f"phantom written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.checkpoint is not None:
            checkpoint, model = args.checkpoint, f"checkpoint {args.checkpoint.name}"
        else:
            checkpoint = work / "demo_random.ckpt"
            model = write_demo_checkpoint(checkpoint, args.config)
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in args.precisions}
        for i in range(max(args.repeats, 1)):
            for p in args.precisions:  # interleaved, so that a slow spell of the machine hits every variant
                first = i == 0 and p == args.precisions[0] and not args.no_profile
                runs[p].append(_run_once(checkpoint, input_dir, work, i, profile=first, precision=p))
                r = runs[p][-1]
                print(f"run {i + 1}, precision {p}: {r['total']:.1f} s, {r['peak_rss_gb']:.2f} GB", file=sys.stderr)
        ref = args.precisions[0]
        ref_detect = statistics.median(r["stages"]["detect"] for r in runs[ref])
        ref_total = statistics.median(r["total"] for r in runs[ref])
        for p, prs in runs.items():
            print(f"\n### precision {p} (network in {prs[0]['precision']})\n")
            print(_table(prs, shape, spacing, model))
            detect = statistics.median(r["stages"]["detect"] for r in prs)
            total = statistics.median(r["total"] for r in prs)
            print(
                f"against precision {ref} in the same run: detect {detect:.1f} s vs {ref_detect:.1f} s "
                f"({ref_detect / detect:.2f}x), total {total:.1f} s vs {ref_total:.1f} s ({ref_total / total:.2f}x)"
            )
            rss = statistics.median(r["peak_rss_gb"] for r in prs)
            if (total >= TARGET_SECONDS or rss >= TARGET_RSS_GB) and prs[0]["profile"]:
                print("\nTarget missed: where the time goes (cProfile of run 1, by own time):\n")
                print("```")
                print(prs[0]["profile"].strip())
                print("```")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
