"""Anchor trade-off on the built-in synthetic data: shape-IoU coverage vs RPN recall for three anchor sets.

Variants, each trained RPN-only (``--model.detector.init_args.rpn_only true``) with the same config, seed,
data order and budget (``--minutes`` of wall clock via ``--trainer.max_time``, or ``--max-steps``):

- ``default``: the anchors of the config (``configs/demo.yaml``: 2 per level);
- ``planned``: :func:`medrpn.anchors_planning.plan_anchors` from the training split, same budget;
- ``planned xF``: planned with ``F`` times the budget (``--budget-factor``, default 2).

For each: coverage (shape IoU >= the config's RPN positive IoU) on the training and validation lesions,
the training time and steps, then whole-scan validation as in ``medrpn validate`` and the **RPN recall at
100 proposals** on the validation split (IoU >= 0.1 as the module logs it, and at 0.3 / 0.5, which are
more sensitive to the anchor shapes). Prints a Markdown table and writes ``report.md`` / ``report.json``
into ``--out``.

Usage::

    python benchmarks/anchor_tradeoff.py                       # 3 x 4 min on data/synthetic (30 cases)
    python benchmarks/anchor_tradeoff.py --max-steps 5 --cases 4 --shape 64 64 32 --out runs/anchor_smoke

``data/synthetic`` is generated (30 cases, seed 0, as ``make demo``) when missing; ``--cases N`` instead
generates ``N`` cases into ``OUT/data``. Other ``--section.key=value`` options go to the config parser.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the regular package of this checkout, whatever the install looks like
    sys.path.insert(0, str(ROOT))


def _datalist(args: argparse.Namespace, out: Path) -> Path:
    from medrpn.data.synthetic import generate_dataset

    if args.cases is not None:
        folder = out / "data"
        if not (folder / "datalist.json").is_file():
            shape = tuple(args.shape) if args.shape else None
            generate_dataset(folder, cases=args.cases, seed=args.seed, shape=shape, write_dicom=False)
        return folder / "datalist.json"
    path = Path(args.datalist)
    if not path.is_file():
        generate_dataset(path.parent, cases=30, seed=0)
    return path


def _cli(config: str, overrides: list[str]) -> Any:
    from medrpn.cli import MedrpnCLI
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.module import LesionDetectionModule

    argv = sys.argv
    sys.argv = argv[:1]
    try:
        return MedrpnCLI(
            LesionDetectionModule,
            LesionDataModule,
            run=False,
            args=["--config", config, *overrides],
            parser_kwargs={"default_env": False},
        )
    finally:
        sys.argv = argv


def _coverage(gen: Any, sizes_vox: np.ndarray, spacing: np.ndarray, strides: Any, thr: float) -> tuple[float, float]:
    from medrpn.anchors_planning import analyze_anchors

    if len(sizes_vox) == 0:
        return float("nan"), float("nan")
    rep = analyze_anchors(sizes_vox * spacing, [str(i) for i in range(len(sizes_vox))], gen, strides, spacing, thr)
    return rep.coverage, rep.mean_best_iou


def run(args: argparse.Namespace, extra: list[str]) -> list[dict[str, Any]]:
    """Train and evaluate the three variants; returns one result row per variant."""
    import pytorch_lightning as pl

    from medrpn.anchors_planning import lesion_sizes_from_records, plan_anchors
    from medrpn.evaluation.metrics import proposal_recall

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datalist = _datalist(args, out)
    limit = (
        [f"--trainer.max_steps={args.max_steps}"]
        if args.max_steps is not None
        else [f"--trainer.max_time=00:{int(args.minutes) // 60:02d}:{int(args.minutes) % 60:02d}:00"]
    )
    common = [
        f"--data.datalist={datalist}",
        "--model.detector.init_args.rpn_only=true",
        "--trainer.logger=false",
        "--trainer.max_epochs=-1",
        "--trainer.check_val_every_n_epoch=100000",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--checkpoint.save_top_k=0",
        "--checkpoint.save_last=false",
        f"--seed_everything={args.seed}",
        *limit,
        *extra,
    ]

    base = _cli(args.config, [*common, f"--trainer.default_root_dir={out / 'default'}"])
    dm = base.datamodule
    det = base.model.detector
    gen0 = det.rpn.anchor_generator
    d = det.spatial_dims
    spacing = np.asarray(dm.spacing_mm[:d], dtype=np.float64)
    thr = float(base.model.rpn_cfg.positive_iou)
    train_mm, _ = lesion_sizes_from_records(dm.records(dm.keys["fit"]), d, dm.orientation)
    val_mm, _ = lesion_sizes_from_records(dm.records(dm.keys["validate"]), d, dm.orientation)
    train_vox, val_vox = train_mm / spacing, val_mm / spacing
    per_level = gen0.num_anchors_per_location()[0]
    out_spacing = gen0.spacing_mm if gen0.spacing_mm is not None else spacing

    variants: list[tuple[str, list[str]]] = [("default", [])]
    for name, budget in (("planned", per_level), (f"planned x{args.budget_factor}", per_level * args.budget_factor)):
        plan = plan_anchors(train_vox, det.strides, budget, thr, spacing_mm=out_spacing, baseline=gen0)
        snippet = out / f"anchors_{budget}_per_level.yaml"
        snippet.write_text(plan.yaml_snippet())
        print(f"{name}: {plan.summary()}\n{plan.yaml_snippet(nested=False)}", flush=True)
        variants.append((name, ["--config", str(snippet)]))

    print("preparing the data cache (shared by every variant) ...", flush=True)
    t0 = time.perf_counter()
    dm.setup("fit")
    print(f"  {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for name, more in variants:
        folder = out / name.replace(" ", "_")
        cli = base if not more else _cli(args.config, [*common, *more, f"--trainer.default_root_dir={folder}"])
        module, trainer = cli.model, cli.trainer
        gen = module.detector.rpn.anchor_generator
        tr_cov, tr_iou = _coverage(gen, train_vox, spacing, module.detector.strides, thr)
        va_cov, va_iou = _coverage(gen, val_vox, spacing, module.detector.strides, thr)
        print(f"== {name}: {gen.num_anchors_per_location()[0]} anchors per level, training ...", flush=True)
        pl.seed_everything(args.seed)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        train_s = time.perf_counter() - t0
        steps = int(trainer.global_step)
        pl.seed_everything(args.seed)
        t0 = time.perf_counter()
        trainer.validate(module, datamodule=dm, verbose=False)
        val_s = time.perf_counter() - t0
        outputs = module._gather()
        props = [o["proposals"] for o in outputs]
        gts = [o["gt"] for o in outputs]
        recall = {
            iou: proposal_recall(props, gts, ks=(100,), iou_threshold=iou)[100] if sum(map(len, gts)) else float("nan")
            for iou in (0.1, 0.3, 0.5)
        }
        row = {
            "variant": name,
            "positive_iou": thr,
            "anchors_per_level": gen.num_anchors_per_location()[0],
            "shapes": gen.spec["shapes"],
            "train_coverage": tr_cov,
            "train_mean_iou": tr_iou,
            "val_coverage": va_cov,
            "val_mean_iou": va_iou,
            "steps": steps,
            "train_seconds": train_s,
            "val_seconds": val_s,
            "recall100_iou0.1": float(recall[0.1]),
            "recall100_iou0.3": float(recall[0.3]),
            "recall100_iou0.5": float(recall[0.5]),
            "module_rpn_recall@100": module.last_metrics.get("rpn_recall@100"),
        }
        print(json.dumps({k: v for k, v in row.items() if k != "shapes"}), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the results."""
    thr = rows[0]["positive_iou"] if rows else float("nan")
    lines = [
        f"coverage: shape IoU >= {thr:g} (the config's RPN positive IoU); recall: validation split, top 100 "
        "proposals per scan",
        "",
        "| anchors | per level | train cov. | val cov. | val mean IoU | steps | train time (s) | "
        "recall@100 IoU≥0.1 | IoU≥0.3 | IoU≥0.5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['anchors_per_level']} | {r['train_coverage']:.3f} | {r['val_coverage']:.3f} | "
            f"{r['val_mean_iou']:.3f} | {r['steps']} | {r['train_seconds']:.0f} | {r['recall100_iou0.1']:.3f} | "
            f"{r['recall100_iou0.3']:.3f} | {r['recall100_iou0.5']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the variants, print and write the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--datalist", default=str(ROOT / "data" / "synthetic" / "datalist.json"))
    parser.add_argument("--cases", type=int, default=None, help="generate N cases into OUT/data instead")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="volume shape of generated cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=int, default=4, help="training wall clock per variant (default 4)")
    parser.add_argument("--max-steps", type=int, default=None, help="train this many steps instead of --minutes")
    parser.add_argument("--budget-factor", type=int, default=2, help="budget multiplier of the third variant")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=str(ROOT / "runs" / "anchor_tradeoff"))
    args, extra = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args, extra)
    md = table(rows)
    budget = f"{args.max_steps} steps" if args.max_steps is not None else f"{args.minutes} min"
    header = (
        f"# Anchor trade-off ({Path(args.config).name}, RPN-only, {budget} per variant)\n\n"
        f"{platform.platform()}, torch {torch.__version__}, {args.threads} threads, total "
        f"{time.perf_counter() - t0:.0f} s\n\n"
    )
    print("\n" + header + md)
    out = Path(args.out)
    (out / "report.md").write_text(header + md + "\n")
    (out / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwrote {out / 'report.md'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
