"""How the detector holds up on scans unlike its training data: held-out scans re-stored, re-sampled and noisier.

Usage::

    python benchmarks/domain_shift.py --checkpoint runs/demo/checkpoints/best.ckpt --out runs/shift --cases 20

The held-out synthetic scans (``data/heldout40``, seed 1, never trained on; generated if missing) are written
again in several variants, each in its own folder, **with the world geometry unchanged** (so the same LPS
``annotations.csv`` is the reference for all of them), files named ``<seriesuid>.<ext>`` as LUNA16 does:

==================  ===================================================================================
variant             what changes
==================  ===================================================================================
``reference``       NIfTI as generated (axial, RAS-stored)
``flipped_mhd``     MHD/RAW with the x and z array axes reversed (direction ``diag(-1, 1, -1)``)
``sagittal_nrrd``   NRRD with the array axes permuted to (z, y, x) storage (a non-axial direction matrix)
``thin_0.7mm``      resampled (linear) to 0.7 x 0.7 x 1.0 mm, a modern thin-slice grid
``thick_5mm``       resampled (linear) to 5 mm slices, in-plane unchanged: small lesions lose contrast
``noise_+25hu``     extra white Gaussian noise, sigma 25 HU (a sharper kernel / lower dose)
``offset_+40hu``    every voxel +40 HU (a miscalibrated scanner); the lung window moves with it
``large_lesions``   other scans: 20 new held-out cases (seed 1) whose lesions are drawn from 15-40 mm
                    (``medrpn synth --lesion-mm 15 40``; the training lesions are 3.2-27 mm), NIfTI
==================  ===================================================================================

Each variant runs through ``medrpn infer``'s own code (:func:`medrpn.inference.batch.run_batch`, the checkpoint's
settings, ``--precision auto``) and is scored with ``medrpn froc``'s code
(:func:`medrpn.evaluation.luna16.evaluate_results`): CPM with its scan-bootstrap interval, CPM per lesion size,
seconds per scan. For the variants that only re-store the same voxels it also reports how far each reference
finding's world centre moved (median and maximum over the findings matched by rank-order nearest centre): the
geometry check of "a lesion at known world coordinates comes out at the same world coordinates", run end to end.
Writes ``report.md`` and ``report.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813
import torch

ROOT = Path(__file__).resolve().parents[1]

Variant = Callable[[sitk.Image, np.random.Generator], sitk.Image]


def _with_array(like: sitk.Image, array_zyx: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(like.GetSpacing())
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
    return img


def flip_axes(img: sitk.Image, axes: tuple[int, ...]) -> sitk.Image:
    """Reverse the storage order of array axes ``axes`` (ITK order x, y, z) keeping every voxel's world position."""
    arr = sitk.GetArrayFromImage(img)
    size = np.asarray(img.GetSize())
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    index0 = np.zeros(3)
    for a in axes:
        arr = np.flip(arr, axis=2 - a)
        index0[a] = size[a] - 1
        direction[:, a] *= -1.0
    origin = np.asarray(img.TransformContinuousIndexToPhysicalPoint(index0.tolist()))
    return _with_array(img, np.ascontiguousarray(arr), origin, direction)


def permute_to_zyx(img: sitk.Image) -> sitk.Image:
    """Store the volume with its x and z array axes swapped (world geometry unchanged)."""
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)[:, [2, 1, 0]]
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    sp = img.GetSpacing()
    out.SetSpacing((sp[2], sp[1], sp[0]))
    out.SetOrigin(img.GetOrigin())
    out.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
    return out


def resample(img: sitk.Image, spacing: tuple[float | None, float | None, float | None]) -> sitk.Image:
    """Linear resampling to ``spacing`` (``None`` keeps an axis) over the same physical extent."""
    old_sp = np.asarray(img.GetSpacing())
    new_sp = np.asarray([o if s is None else s for o, s in zip(old_sp, spacing)])
    extent = old_sp * np.asarray(img.GetSize())
    size = [max(1, round(e / s)) for e, s in zip(extent, new_sp)]
    # keep the grid centred: the first new voxel centre sits half a new voxel inside the old grid's edge
    start = -0.5 + 0.5 * new_sp / old_sp
    origin = img.TransformContinuousIndexToPhysicalPoint(start.tolist())
    out = sitk.Resample(
        sitk.Cast(img, sitk.sitkFloat32),
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        new_sp.tolist(),
        img.GetDirection(),
        -1024.0,
    )
    return sitk.Cast(sitk.Round(out), sitk.sitkInt16)


def add_noise(img: sitk.Image, rng: np.random.Generator, sigma: float) -> sitk.Image:
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr += rng.normal(0.0, sigma, arr.shape).astype(np.float32)
    out = sitk.GetImageFromArray(np.clip(np.round(arr), -1024, 3071).astype(np.int16))
    out.CopyInformation(img)
    return out


def add_offset(img: sitk.Image, hu: float) -> sitk.Image:
    arr = sitk.GetArrayFromImage(img).astype(np.int32) + int(hu)
    out = sitk.GetImageFromArray(np.clip(arr, -1024, 3071).astype(np.int16))
    out.CopyInformation(img)
    return out


VARIANTS: dict[str, tuple[str, Variant]] = {
    "reference": (".nii.gz", lambda im, rng: im),
    "flipped_mhd": (".mhd", lambda im, rng: flip_axes(im, (0, 2))),
    "sagittal_nrrd": (".nrrd", lambda im, rng: permute_to_zyx(im)),
    "thin_0.7mm": (".nii.gz", lambda im, rng: resample(im, (0.7, 0.7, 1.0))),
    "thick_5mm": (".nii.gz", lambda im, rng: resample(im, (None, None, 5.0))),
    "noise_+25hu": (".nii.gz", lambda im, rng: add_noise(im, rng, 25.0)),
    "offset_+40hu": (".nii.gz", lambda im, rng: add_offset(im, 40.0)),
}
SAME_VOXELS = ("flipped_mhd", "sagittal_nrrd")
# variants that are other scans (their own held-out set and annotations), not transformations of the reference scans
DATASETS: dict[str, tuple[str, tuple[float, float]]] = {"large_lesions": ("heldout_large", (15.0, 40.0))}


def _write_variant(name: str, cases: list[dict], src_root: Path, dst: Path, seed: int) -> None:
    ext, fn = VARIANTS[name]
    dst.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases):
        target = dst / f"{case['seriesuid']}{ext}"
        if target.is_file():
            continue
        img = sitk.ReadImage(str(src_root / case["image"]))
        out = fn(img, np.random.default_rng([seed, i]))
        if ext == ".mhd":  # header + .raw: written in place (a rerun rewrites a half-written pair)
            sitk.WriteImage(out, str(target))
            continue
        tmp = target.with_name(".tmp_" + target.name)
        sitk.WriteImage(out, str(tmp), useCompression=True)
        tmp.replace(target)


def _centre_shift(ref: dict, other: dict) -> tuple[float, float]:
    """Median / max distance (mm) from each reference finding to the nearest finding of the other run, same scan."""
    dists = []
    for uid, c in ref.items():
        o = other.get(uid)
        if o is None or not len(c.centres) or not len(o.centres):
            continue
        top = c.centres[:10]
        d = np.linalg.norm(top[:, None, :] - o.centres[None, :, :], axis=-1).min(axis=1)
        dists.extend(d.tolist())
    return (float(np.median(dists)), float(np.max(dists))) if dists else (float("nan"), float("nan"))


def main(argv: list[str] | None = None) -> int:
    from medrpn.data.synthetic import DEFAULT_LESION_MM, generate_dataset
    from medrpn.evaluation.luna16 import candidates_from_results, evaluate_results, read_annotations
    from medrpn.inference.batch import run_batch
    from medrpn.inference.checkpoint import load_inference_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "domain_shift")
    ap.add_argument("--cases", type=int, default=20, help="first N scans of data/heldout40 (default 20)")
    ap.add_argument("--variants", nargs="*", default=[*VARIANTS, *DATASETS], choices=[*VARIANTS, *DATASETS])
    ap.add_argument("--tta", action="store_true", help="flip test-time augmentation, as make demo infers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    def held_out(folder: str, lesion_mm: tuple[float, float] | None = None) -> tuple[Path, list[dict], list[str], dict]:
        held = ROOT / "data" / folder
        if not (held / "datalist.json").is_file():
            n, mm = (40, DEFAULT_LESION_MM) if lesion_mm is None else (args.cases, lesion_mm)
            generate_dataset(held, cases=n, seed=1, val_fraction=1.0, write_dicom=False, lesion_mm=mm)
        cases = json.loads((held / "datalist.json").read_text())["validation"][: args.cases]
        uids = [c["seriesuid"] for c in cases]
        annotations = {u: v for u, v in read_annotations(held / "annotations.csv").items() if u in set(uids)}
        return held, cases, uids, annotations

    model = load_inference_model(args.checkpoint)
    rows = []
    found: dict[str, dict] = {}
    counts = {}
    for name in args.variants:
        folder, lesion_mm = DATASETS.get(name, ("heldout40", None))
        held, cases, uids, annotations = held_out(folder, lesion_mm)
        counts[name] = (len(uids), sum(len(v) for v in annotations.values()))
        scans = args.out / "scans" / name
        _write_variant("reference" if name in DATASETS else name, cases, held, scans, args.seed)
        results = args.out / "results" / name
        t0 = time.perf_counter()
        report = run_batch(model, [scans], results, tta=args.tta, progress=False)
        secs = (time.perf_counter() - t0) / max(1, len(cases) - len(report.skipped))
        _, cands = candidates_from_results(results)
        found[name] = cands
        ev = evaluate_results(cands, annotations, uids)
        bands = {b.label: (None if b.froc is None else round(b.froc.cpm, 3)) for b in ev.bands}
        row = {
            "variant": name,
            "scans": counts[name][0],
            "lesions": counts[name][1],
            "cpm": round(ev.froc.cpm, 3),
            "ci": [round(ev.interval.low, 3), round(ev.interval.high, 3)],
            "bands": bands,
            "failures": len(report.failures),
            "s_per_scan": round(secs, 1) if len(report.skipped) < len(cases) else None,
        }
        if name in SAME_VOXELS and "reference" in found:
            row["centre_shift_mm"] = [round(v, 3) for v in _centre_shift(found["reference"], cands)]
        rows.append(row)
        print(json.dumps(row), flush=True)

    lines = [
        f"# Domain shift: {args.checkpoint}",
        "",
        f"{args.cases} held-out scans per variant, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {'flip TTA' if args.tta else 'one view'}, precision auto.",
        "",
        "| variant | scans / lesions | CPM (95% CI) | < 5 mm | 5-10 mm | >= 10 mm | failures | s/scan "
        "| centre shift median / max (mm) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = list(r["bands"].values())
        shift = r.get("centre_shift_mm")
        lines.append(
            f"| {r['variant']} | {r['scans']} / {r['lesions']} | {r['cpm']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) | "
            + " | ".join("—" if v is None else f"{v:.3f}" for v in b)
            + f" | {r['failures']} | {r['s_per_scan']} | {'' if shift is None else f'{shift[0]} / {shift[1]}'} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text)
    (args.out / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
