"""Detection quality on the built-in synthetic data: train a config for a fixed CPU budget, then FROC/CPM held out.

Usage::

    python benchmarks/train_synthetic.py --config configs/demo.yaml --minutes 15 --out runs/bench3d
    python benchmarks/train_synthetic.py --config configs/rpn2d_slices.yaml --minutes 15 --out runs/bench2d

Steps: generate ``data/synthetic`` (30 cases, seed 0) and ``data/heldout`` (10 cases, seed 1, never seen in
training or validation) if missing; ``medrpn fit`` with ``--trainer.max_time`` (wall clock, validation
included); load the best checkpoint (by validation CPM; ``last.ckpt`` if validation never ran) with
``weights_only=True``; run whole-scan inference on every held-out scan exactly as ``medrpn infer`` does
(same preprocessing and tiling from the checkpoint); print the FROC table (sensitivity at 1/8..8 FP per
scan, CPM with its scan-bootstrap 95% interval, CPM per lesion-diameter band, AP, recall@K) and write
``froc.png``, ``report.md`` and every scan's detections (``detections.pt``) into ``--out``. ``--heldout-cases 40``
evaluates on ``data/heldout40`` instead (its first 10 scans are ``data/heldout``) and writes ``froc_heldout40.png`` /
``report_heldout40.md`` / ``detections_heldout40.pt``; with ``--skip-training`` it re-scores an existing run,
and ``--tta 01`` (or ``012``) evaluates with flip test-time augmentation (views fused by score averaging;
reports suffixed ``_tta01``).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from medrpn.module import ScanMetrics

ROOT = Path(__file__).resolve().parents[1]


def _ensure_data(root: Path, heldout_cases: int = 10) -> tuple[Path, Path]:
    from medrpn.data.synthetic import generate_dataset

    train = root / "data" / "synthetic"
    # case i of a seed does not depend on the dataset size: data/heldout40 starts with the 10 scans of data/heldout
    held = root / "data" / ("heldout" if heldout_cases == 10 else f"heldout{heldout_cases}")
    if not (train / "datalist.json").is_file():
        generate_dataset(train, cases=30, seed=0)
    if not (held / "datalist.json").is_file():
        generate_dataset(held, cases=heldout_cases, seed=1, val_fraction=1.0, write_dicom=heldout_cases == 10)
    return train / "datalist.json", held / "datalist.json"


def evaluate_checkpoint(
    ckpt: Path,
    datalist: Path,
    split: str = "validation",
    tta_axes: tuple[int, ...] = (),
    precision: str = "auto",
    dump: Path | None = None,
) -> tuple[ScanMetrics, float, int]:
    """Whole-scan inference with a checkpoint's own settings and the epoch metrics of the module.

    ``tta_axes`` (e.g. ``(0, 1)``) turns on flip test-time augmentation along those axes, fused as the
    checkpoint's ``inference.flip_merge`` says (default ``"mean"``). ``precision`` is the network precision of
    ``medrpn infer --precision`` (``"auto"``: bfloat16 autocast where the CPU has it natively). ``dump``: also
    save every scan's detections, proposals and ground truth (world mm, LPS, StandardMode boxes) there with
    ``torch.save`` (tensors; ``torch.load(..., weights_only=True)`` reads it), written atomically, for per-lesion
    analysis without running the model again.
    """
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.geometry import image_to_world_boxes
    from medrpn.inference.checkpoint import load_inference_model
    from medrpn.inference.precision import inference_autocast
    from medrpn.inference.whole_scan import detect_scan
    from medrpn.module import evaluate_scans

    model = load_inference_model(ckpt)
    if tta_axes:
        model = replace(model, whole_scan=replace(model.whole_scan, flip_tta=True, flip_axes=tta_axes))
    dm = LesionDataModule.for_model(model, datalist=str(datalist), patch_size=(32, 32, 32), cache="none", val_key=split)
    dm.setup("validate")
    outputs = []
    start = time.perf_counter()
    for batch in dm.val_dataloader():
        with torch.no_grad(), inference_autocast(precision, "cpu"):
            res = detect_scan(model.detector, batch["image"], model.whole_scan, context=model.slice_context)
        affine = batch["affine"]
        outputs.append(
            {
                "case_id": batch["case_id"],
                "boxes": image_to_world_boxes(res.detections.boxes.double(), affine).numpy(),
                "scores": res.detections.scores.numpy(),
                "labels": res.detections.labels.numpy(),
                "proposals": image_to_world_boxes(res.proposals.boxes.double(), affine).numpy(),
                "gt": batch["world_box"].numpy(),
                "gt_labels": batch["label"].numpy(),
            }
        )
    seconds = time.perf_counter() - start
    if dump is not None:
        from medrpn.overlays.atomic import atomic_path

        # tensors and plain strings only, so that torch.load(..., weights_only=True) reads it back
        plain = [{k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in o.items()} for o in outputs]
        with atomic_path(dump) as tmp:
            torch.save(plain, tmp)
    names = list(model.class_names)
    return evaluate_scans(outputs, names, (10, 50, 100, 300)), seconds, len(outputs)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on held-out scans, report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget (validation included)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench3d"))
    p.add_argument("--skip-training", action="store_true", help="evaluate the existing checkpoint in --out")
    p.add_argument(
        "--heldout-cases",
        type=int,
        default=10,
        help="held-out scans (seed 1; default 10 = data/heldout); more give a tighter CPM interval, e.g. 40 -> "
        "data/heldout40 and report_heldout40.md (the README's figures)",
    )
    p.add_argument(
        "--tta",
        default="",
        help="flip test-time augmentation at evaluation along these axes, e.g. 01 (in-plane) or 012; "
        "reports get a _tta01 / _tta012 suffix",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "32", "bf16"),
        help="network precision at evaluation, as `medrpn infer --precision` (default auto: bfloat16 where native)",
    )
    p.add_argument("extra", nargs="*", help="extra `medrpn fit` overrides, e.g. --trainer.max_epochs=80")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.heldout_cases < 1:
        p.error(f"--heldout-cases must be >= 1, got {args.heldout_cases}")
    train_list, held_list = _ensure_data(ROOT, args.heldout_cases)
    suffix = "" if args.heldout_cases == 10 else f"_heldout{args.heldout_cases}"
    if args.tta and not set(args.tta) <= set("012"):
        p.error(f"--tta takes axis digits among 0, 1, 2, e.g. 01, got {args.tta!r}")
    tta_axes = tuple(int(c) for c in args.tta)
    if tta_axes:
        suffix += f"_tta{args.tta}"
    ckpt_dir = out / "checkpoints"
    train_seconds = float("nan")
    if not args.skip_training:
        minutes = int(args.minutes)
        seconds = round((args.minutes - minutes) * 60)
        cmd = [
            sys.executable,
            "-m",
            "medrpn.cli",
            "fit",
            "--config",
            args.config,
            f"--data.datalist={train_list}",
            f"--trainer.default_root_dir={out}",
            f"--trainer.max_time=00:00:{minutes:02d}:{seconds:02d}",
            f"--checkpoint.dirpath={ckpt_dir}",
            "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
            f"--trainer.logger.save_dir={out}",
            *args.extra,
        ]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        train_seconds = time.perf_counter() - start
    ckpt = ckpt_dir / "best.ckpt"
    if not ckpt.is_file():
        ckpt = ckpt_dir / "last.ckpt"
    metrics, infer_seconds, n_scans = evaluate_checkpoint(
        ckpt, held_list, tta_axes=tta_axes, precision=args.precision, dump=out / f"detections{suffix}.pt"
    )
    from medrpn.evaluation.plots import plot_froc
    from medrpn.inference.precision import dtype_name, resolve_inference_dtype

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"
    lines = [
        f"# {Path(args.config).name} on held-out synthetic scans",
        "",
        f"- checkpoint: `{ckpt}`",
        (
            f"- training wall time: {train_seconds / 60:.1f} min (budget {args.minutes:g} min) on {machine}"
            if not args.skip_training
            else f"- training: not run here (--skip-training); evaluated on {machine}"
        ),
        f"- held-out scans: {n_scans} ({held_list.parent.name}); "
        f"whole-scan inference {infer_seconds / max(n_scans, 1):.1f} s/scan"
        + (f" with flip test-time augmentation along axes {args.tta}" if tta_axes else "")
        + f", network precision {dtype_name(resolve_inference_dtype(args.precision, 'cpu'))}",
        "",
    ]
    if metrics.froc is not None:
        lines += [metrics.froc.table(), ""]
        plot_froc(metrics.froc, out / f"froc{suffix}.png", title=f"FROC, held-out synthetic ({Path(args.config).stem})")
    if metrics.cpm_interval is not None:
        lines += [f"CPM {metrics.cpm_interval}", ""]
    if metrics.diameter_bands:
        lines += ["| lesion diameter | lesions | CPM |", "|---|---:|---:|"]
        for band in metrics.diameter_bands:
            cpm = "-" if band.froc is None else f"{band.froc.cpm:.3f}"
            lines.append(f"| {band.label} mm | {band.num_lesions} | {cpm} |")
        lines.append("")
    lines += [f"| {k} | {v:.3f} |" for k, v in metrics.scalars.items() if not k.startswith("sens@")]
    report = "\n".join(lines)
    (out / f"report{suffix}.md").write_text(report + "\n")
    print(report)
    print(metrics.report("held-out"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
