"""Benchmark medrpn.ops.nms against MONAI's non_max_suppression on sparse random 2D and 3D boxes.

Boxes have centres uniform in a 512^2 image / 512^3 volume, sizes uniform in [4, 48] per axis and uniform random
scores (fixed seed). For every (dims, N) both implementations run in the same process on the same input, their
outputs are checked to be identical, and the medians of the wall-clock times are printed as a Markdown table.

Usage::

    python benchmarks/nms.py                 # 1k / 4k / 8k boxes, 2D and 3D, IoU threshold 0.5
    python benchmarks/nms.py --quick         # small smoke run
    python benchmarks/nms.py --iou 0.3 --sizes 2000 16000 --repeats 9
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.data.box_utils import non_max_suppression

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrpn.ops.nms import nms


def sparse_boxes(n: int, dims: int, seed: int = 0, extent: float = 512.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sparse boxes and scores.

    Args:
        n: number of boxes.
        dims: 2 or 3.
        seed: generator seed.
        extent: image / volume side length.

    Returns:
        tuple[Tensor[N, 4] in 2D or Tensor[N, 6] in 3D, Tensor[N]]: float32 ``StandardMode`` boxes and scores.
    """
    g = torch.Generator().manual_seed(seed + 1000 * dims + n)
    centres = torch.rand(n, dims, generator=g) * extent
    sizes = 4 + torch.rand(n, dims, generator=g) * 44
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    return boxes, torch.rand(n, generator=g)


def timed(fn: Callable[[], torch.Tensor], repeats: int, warmup: bool) -> tuple[float, torch.Tensor]:
    """Median wall-clock time of ``repeats`` calls (after one untimed call if ``warmup``), and the last result."""
    times = []
    out = fn() if warmup else torch.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iou", type=float, default=0.5, help="IoU threshold (default 0.5)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 8000], help="numbers of boxes")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3], help="spatial dims")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of medrpn's nms (median reported)")
    parser.add_argument(
        "--monai-repeats",
        type=int,
        default=None,
        help="timed runs of MONAI's NMS (default: 3 up to 2,000 boxes, 1 above: it takes seconds at 8k)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 and 1,000 boxes, 1 MONAI run")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [200, 1000]
        args.monai_repeats = 1

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"IoU threshold {args.iou}, boxes: centres uniform in 512^D, sizes 4-48, uniform scores"
    )
    print()
    print("| dims | N | kept | MONAI median s (runs) | medrpn median s (runs) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    all_same = True
    for dims in args.dims:
        for n in args.sizes:
            boxes, scores = sparse_boxes(n, dims)
            monai_runs = args.monai_repeats if args.monai_repeats is not None else (3 if n <= 2000 else 1)
            t_monai, ref = timed(lambda b=boxes, s=scores: non_max_suppression(b, s, args.iou), monai_runs, False)
            t_ours, ours = timed(lambda b=boxes, s=scores: nms(b, s, args.iou), args.repeats, True)
            same = torch.equal(ours, ref)
            all_same &= same
            flag = "" if same else " **MISMATCH**"
            monai_cell = f"{t_monai:.3f} ({monai_runs})"
            ours_cell = f"{t_ours:.4f} ({args.repeats})"
            print(f"| {dims}D | {n} | {ours.numel()}{flag} | {monai_cell} | {ours_cell} | {t_monai / t_ours:.0f}x |")
    print()
    print("Outputs identical to MONAI: " + ("yes, in every configuration" if all_same else "NO"))
    print(
        "MONAI is timed on fewer runs above 2,000 boxes (run counts in parentheses; it is the slow one); "
        "medrpn gets one untimed warm-up call first. Timings on a shared machine vary with its load."
    )
    return 0 if all_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
