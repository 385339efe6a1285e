"""Speed of the Hessian blob/tube channels (:mod:`medrpn.ops.hessian`) against the obvious implementation.

What it measures: the per-scan cost of ``data.hessian_sigmas_mm`` (paid once per scan when the datamodule caches it,
and once per scan in batch inference), on a volume of the size of a 1.5 mm chest CT (default 200 x 200 x 160), for
each scale count given. Two implementations, timed in the same process on the same volume:

- ``reference``: the straightforward version: separable Gaussian-derivative ``F.conv3d`` passes with 1D kernels
  (one chain of three per Hessian entry, no shared passes), the ``(X, Y, Z, 3, 3)`` Hessian stacked, then
  ``torch.linalg.eigvalsh``;
- ``medrpn``: :func:`medrpn.ops.hessian.hessian_shape_filters` (shifted-view sums with the smoothing of the last
  axis shared between entries, closed-form eigenvalues on the distinct entries).

Both give the same dot/line responses (checked: maximum difference printed). Median of ``--repeats`` runs after one
warm-up; the ratio is reference / medrpn in the same invocation.

Usage::

    .venv/bin/python benchmarks/hessian_speed.py                       # 2 scales, 200 x 200 x 160, 5 repeats
    .venv/bin/python benchmarks/hessian_speed.py --sigmas 1.0 2.0 3.0 --shape 256 256 200
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from medrpn.ops.hessian import gaussian_derivative_kernels, hessian_shape_filters


def _conv_axis_reference(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    r = (kernel.numel() - 1) // 2
    shape = [1, 1, 1, 1, 1]
    shape[2 + axis] = kernel.numel()
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
    return F.conv3d(F.pad(x, pad, mode="replicate"), kernel.to(x.dtype).view(shape))


def reference_shape_filters(
    image: torch.Tensor, sigmas_mm: Sequence[float], spacing_mm: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same responses as :func:`hessian_shape_filters` (3D, bright), the obvious way."""
    dot = torch.zeros_like(image)
    line = torch.zeros_like(image)
    for s in sigmas_mm:
        kernels = [gaussian_derivative_kernels(s / float(v)) for v in spacing_mm]
        x = image[None, None]
        h = torch.empty((*image.shape, 3, 3), dtype=image.dtype)
        for i in range(3):
            for j in range(i, 3):
                orders = [0, 0, 0]
                orders[i] += 1
                orders[j] += 1
                y = x
                for ax in range(3):
                    y = _conv_axis_reference(y, kernels[ax][orders[ax]], ax)
                h[..., i, j] = h[..., j, i] = y[0, 0] * s**2 / (float(spacing_mm[i]) * float(spacing_mm[j]))
        ev = torch.linalg.eigvalsh(h)
        l1, l2, l3 = ev[..., 0], ev[..., 1], ev[..., 2]
        neg1 = (-l1).clamp(min=1e-12)
        d = torch.where(l3 < 0, l3**2 / neg1, torch.zeros_like(l3))
        ln = torch.where(l2 < 0, (-l2) * ((-l2) - (-l3).clamp(min=0)) / neg1, torch.zeros_like(l2))
        dot = torch.maximum(dot, d)
        line = torch.maximum(line, ln.clamp(min=0))
    return dot, line


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Time both implementations and print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[200, 200, 160])
    p.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5])
    p.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    # smooth random structure plus noise, so that every eigenvalue-sign branch occurs
    volume = torch.rand(tuple(args.shape), generator=gen)
    volume = F.avg_pool3d(volume[None, None], 5, 1, 2)[0, 0] + 0.05 * torch.rand(tuple(args.shape), generator=gen)

    ours = hessian_shape_filters(volume, args.sigmas, args.spacing)
    ref = reference_shape_filters(volume, args.sigmas, args.spacing)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
    scale = max(float(r.abs().max()) for r in ref)
    t_ref = _median_seconds(lambda: reference_shape_filters(volume, args.sigmas, args.spacing), args.repeats)
    t_ours = _median_seconds(lambda: hessian_shape_filters(volume, args.sigmas, args.spacing), args.repeats)
    voxels = volume.numel() / 1e6
    print(
        f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}; volume {tuple(args.shape)} "
        f"({voxels:.1f} M voxels), {len(args.sigmas)} scales {args.sigmas} mm, median of {args.repeats}\n"
    )
    print("| implementation | s/scan | vs reference |")
    print("|---|---:|---:|")
    print(f"| reference (conv3d + linalg.eigvalsh) | {t_ref:.2f} | 1.00x |")
    print(f"| medrpn.ops.hessian | {t_ours:.2f} | {t_ref / t_ours:.1f}x |")
    print(f"\nmax |difference| {diff:.2e} (responses up to {scale:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
