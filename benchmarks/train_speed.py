"""Training-step throughput on a CPU: float32 versus bfloat16 autocast, contiguous versus channels-last.

What it measures: full optimisation steps (forward, RPN + lesion-head losses, backward, AdamW step) of the model
and the data of a config (default ``configs/demo.yaml``), built by the Lightning CLI exactly as ``medrpn fit``
builds them (``run=False``), on the same prefetched training batches of the built-in synthetic data. Four
variants, each in a **fresh subprocess** so that oneDNN caches and allocator state do not leak between them:

- ``fp32`` — float32, contiguous tensors: the **reference**;
- ``fp32+cl`` — float32, channels-last conv weights and activations (``channels_last: true``);
- ``bf16`` — ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what ``--trainer.precision bf16-mixed`` does);
- ``bf16+cl`` — both.

Each subprocess runs ``--warmup`` steps, then ``--steps`` timed steps, ``--repeats`` times; the per-step median
of every repeat is kept, and the table shows the median over repeats and the speed-up against ``fp32`` measured
in the same invocation. bfloat16 is fast only where the CPU has native bf16 instructions (AVX512-BF16 / AMX).
Elsewhere oneDNN emulates it and a step of the demo takes minutes instead of seconds (a 2-core AVX2-only EPYC
had not finished 4 bf16 steps after 10 minutes, against 2 s per float32 step), so the ``bf16`` variants are
skipped, with a note, on such a CPU unless ``--force-bf16`` is given; ``--timeout`` bounds every variant's
process either way, and a variant that runs out of time shows as such in the table.

Usage::

    .venv/bin/python benchmarks/train_speed.py                      # demo config, 3 repeats
    .venv/bin/python benchmarks/train_speed.py --repeats 5 --steps 30
    .venv/bin/python benchmarks/train_speed.py --variants fp32 bf16 --force-bf16 --timeout 1800
    .venv/bin/python benchmarks/train_speed.py --variants fp32+cl -- --data.samples_per_scan=1   # CLI overrides
    .venv/bin/python benchmarks/train_speed.py --variants fp32+cl --compare -- --data.samples_per_scan=1  # both
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medrpn.inference.precision import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, tuple[bool, bool]] = {  # name -> (bf16 autocast, channels_last)
    "fp32": (False, False),
    "fp32+cl": (False, True),
    "bf16": (True, False),
    "bf16+cl": (True, True),
}


def select_variants(requested: list[str], *, native_bf16: bool, force_bf16: bool) -> list[str]:
    """The variants to time: the bf16 ones only where bfloat16 is native, or when forced.

    Args:
        requested: variant names, keys of :data:`VARIANTS`.
        native_bf16: whether the CPU has AVX512-BF16 or AMX (:func:`medrpn.inference.precision.cpu_has_native_bf16`).
        force_bf16: time the bf16 variants anyway.

    Returns:
        ``requested`` without the bf16 variants when they would be emulated; a note on stderr says what was skipped.
    """
    if native_bf16 or force_bf16:
        return list(requested)
    skipped = [v for v in requested if VARIANTS[v][0]]
    if skipped:
        print(
            f"skipping {', '.join(skipped)}: this CPU has no native bfloat16 (AVX512-BF16/AMX), where oneDNN emulates "
            "it at minutes per step of this model; --force-bf16 times them anyway",
            file=sys.stderr,
            flush=True,
        )
    return [v for v in requested if not VARIANTS[v][0]]


def _ensure_data() -> Path:
    from medrpn.data.synthetic import generate_dataset

    train = REPO / "data" / "synthetic"
    if not (train / "datalist.json").is_file():
        generate_dataset(train, cases=30, seed=0)
    return train / "datalist.json"


def worker(config: Path, variant: str, warmup: int, steps: int, repeats: int, overrides: list[str]) -> dict[str, Any]:
    """Build model + data with the CLI, time ``repeats`` x ``steps`` optimisation steps of one variant."""
    import torch

    from medrpn.anchors_planning import plan_for_training
    from medrpn.cli import MedrpnCLI
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.module import LesionDetectionModule

    bf16, channels_last = VARIANTS[variant]
    torch.manual_seed(0)
    cli = MedrpnCLI(
        LesionDetectionModule,
        LesionDataModule,
        run=False,
        args=[
            "--config",
            str(config),
            f"--data.datalist={_ensure_data()}",
            "--data.cache=none",
            f"--model.detector.init_args.channels_last={str(channels_last).lower()}",
            *overrides,
        ],
        parser_kwargs={"default_env": False},
    )
    module, dm = cli.model, cli.datamodule
    dm.setup("fit")
    plan_for_training(module, dm)  # `shapes: auto` -> planned anchors, as at fit start
    batches: list[dict[str, Any]] = []
    while len(batches) < warmup + steps:  # an epoch of the demo data is 12 batches: take several
        batches += list(itertools.islice(dm.train_dataloader(), warmup + steps - len(batches)))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.train()

    def step(batch: dict[str, Any]) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.compute_losses(batch)["loss"]
        loss.backward()
        opt.step()

    medians = []
    for _ in range(repeats):
        for b in batches[:warmup]:
            step(b)
        times = []
        for b in batches[warmup:]:
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    shape = tuple(batches[0]["image"].shape)
    return {"variant": variant, "medians": medians, "batch_shape": shape, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    """Run every variant in its own process and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each repeat")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats per variant (median reported)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--force-bf16",
        action="store_true",
        help="time the bf16 variants even where this CPU has no native bfloat16 (emulated: minutes per step)",
    )
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed to each variant's process")
    p.add_argument(
        "--compare",
        action="store_true",
        help="time every variant twice, with the config as is and with the overrides, in this one invocation",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="after `--`: Lightning CLI overrides of the config, as for medrpn fit")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.config, args.worker, args.warmup, args.steps, args.repeats, args.overrides)))
        return 0
    variants = select_variants(args.variants, native_bf16=cpu_has_native_bf16(), force_bf16=args.force_bf16)
    if not variants:
        print("nothing to time: every requested variant needs native bfloat16 (--force-bf16 times them)")
        return 1
    overrides_sets: list[list[str]] = [[], args.overrides] if args.overrides and args.compare else [args.overrides]
    runs = [(v, o) for v in variants for o in overrides_sets]  # --compare: as is, then with the overrides
    results: dict[str, dict[str, Any]] = {}
    timed_out: list[str] = []
    for v, overrides in runs:
        label = f"{v} + overrides" if overrides and args.compare else v
        cmd = [sys.executable, __file__, "--worker", v, "--config", str(args.config)]
        cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--repeats", str(args.repeats)]
        cmd += ["--", *overrides]
        try:
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, timeout=args.timeout).stdout
        except subprocess.TimeoutExpired:
            timed_out.append(label)
            print(f"{label}: not finished within --timeout {args.timeout:.0f} s", file=sys.stderr, flush=True)
            continue
        except subprocess.CalledProcessError as err:  # say why, e.g. a bad override, instead of a bare exit status
            tail = "\n".join(err.stderr.strip().splitlines()[-12:])
            print(f"{label}: the worker failed (exit status {err.returncode}):\n{tail}", file=sys.stderr, flush=True)
            return 1
        results[label] = json.loads(out.strip().splitlines()[-1])
        print(f"{label}: {[round(m, 3) for m in results[label]['medians']]} s/step", file=sys.stderr, flush=True)
    if not results:
        print(f"no variant finished within --timeout {args.timeout:.0f} s")
        return 1
    first = next(iter(results.values()))
    ref_label = "fp32" if "fp32" in results else next(iter(results))  # the reference of the ratio column
    ref = statistics.median(results[ref_label]["medians"])
    print(
        f"\n{args.config.name}{' ' + ' '.join(args.overrides) if args.overrides else ''}: batch "
        f"{first['batch_shape']}, {first['threads']} torch threads, {args.steps} timed steps x {args.repeats} repeats "
        "per variant\n"
    )
    print(f"| variant | s/step (median) | steps/s | speed-up vs {ref_label} |")
    print("|---|---:|---:|---:|")
    for label, r in results.items():
        med = statistics.median(r["medians"])
        print(f"| {label} | {med:.3f} | {1.0 / med:.2f} | {ref / med:.2f}x |")
    for label in timed_out:
        print(f"| {label} | not finished in {args.timeout:.0f} s | - | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
