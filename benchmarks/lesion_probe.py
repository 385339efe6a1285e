"""Where a trained 3D model loses each lesion: the RPN's objectness against the lesion head's verdict.

Usage::

    python benchmarks/lesion_probe.py --checkpoint runs/demo/checkpoints/best.ckpt \
        --datalist data/heldout40/datalist.json --out runs/probe.csv [--max-diameter 5]

For every ground-truth lesion of the datalist's split, a patch of ``--patch`` voxels centred on the lesion (shifted
inside the scan where needed) is preprocessed exactly as the checkpoint was trained (spacing, window, Hessian
channels: :meth:`~medrpn.data.datamodule.LesionDataModule.for_model`) and run through the detector once:

- ``rpn_objectness``: the highest objectness of the anchors whose centre lies within the lesion's radius (the
  LUNA16 hit rule, radius = half the in-plane long axis), ``nan`` when no anchor centre does (a lesion smaller
  than the finest level's cell can fall between them); ``rpn_rank``: how many anchors of the whole patch score
  higher (0 = the patch's best).
- ``proposal_distance_r``: distance from the lesion centre to the nearest proposal centre, in lesion radii.
- ``head_lesion_prob`` / ``head_class``: the lesion head's lesion probability (``1 - p(background)``, the score
  the FROC ranks) and most probable class when it is fed the lesion's **exact ground-truth box** as its RoI.

A lesion with a high ``rpn_objectness`` but a low ``head_lesion_prob`` is found by the RPN and rejected by the
head; one with neither is not seen at all. The script prints the medians per lesion-size band and writes one CSV
row per lesion. It explains a model's misses; it is not a metric (``benchmarks/train_synthetic.py`` is).
Only 3D models (a 2D model's findings are linked across slices, so one patch does not show what it sees).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LesionProbe:
    """What the detector makes of one ground-truth lesion (see the module docstring)."""

    case_id: str
    lesion: int
    diameter_mm: float
    label: int
    rpn_objectness: float
    rpn_rank: int
    proposal_distance_r: float
    head_lesion_prob: float
    head_class: int


def _patch_bounds(centre: torch.Tensor, shape: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = (centre.floor().long() - patch // 2).clamp(min=0)
    lo = torch.minimum(lo, (shape - patch).clamp(min=0))
    return lo, torch.minimum(lo + patch, shape)


def probe_checkpoint(
    checkpoint: Path, datalist: Path, *, split: str = "validation", patch: tuple[int, int, int] = (96, 96, 64)
) -> list[LesionProbe]:
    """Probe every ground-truth lesion of ``datalist``'s ``split`` with the model of ``checkpoint``.

    Args:
        checkpoint: a 3D medrpn checkpoint.
        datalist: MONAI detection datalist JSON (boxes in world LPS mm).
        split: the datalist key to read.
        patch: patch size in voxels of the model's grid.

    Returns:
        One :class:`LesionProbe` per lesion.
    """
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.evaluation.froc import lesion_diameters_from_boxes
    from medrpn.geometry import world_to_image_boxes
    from medrpn.inference.checkpoint import load_inference_model
    from medrpn.inference.precision import inference_autocast
    from medrpn.modeling.detector import padded_shape
    from medrpn.modeling.structures import objectness_probability

    model = load_inference_model(checkpoint)
    detector = model.detector.eval()
    if detector.spatial_dims != 3:
        raise ValueError(f"{checkpoint}: a {detector.spatial_dims}D model; the probe reads 3D models only")
    if detector.head is None:
        raise ValueError(f"{checkpoint}: an RPN-only model has no lesion head to probe")
    if tuple(padded_shape(patch, detector.strides)) != tuple(patch):
        raise ValueError(f"patch {tuple(patch)} must be a multiple of the coarsest stride {detector.strides[-1]}")
    dm = LesionDataModule.for_model(model, datalist=str(datalist), patch_size=(32, 32, 32), cache="none", val_key=split)
    dm.setup("validate")
    size = torch.tensor(patch)
    rows: list[LesionProbe] = []
    for batch in dm.val_dataloader():
        image = batch["image"]
        world = batch["world_box"].reshape(-1, 6)
        if len(world) == 0:
            continue
        affine = batch["affine"].double()
        spacing = affine[:3, :3].norm(dim=0).float()  # mm per voxel along each array axis
        boxes = world_to_image_boxes(world.double(), affine).float()
        labels = batch["label"].reshape(-1)
        diameters = lesion_diameters_from_boxes(world)  # the FROC's own rule: the in-plane long axis
        shape = torch.tensor(image.shape[2:])
        for i, box in enumerate(boxes):
            diameter = float(diameters[i])
            centre = (box[:3] + box[3:]) / 2
            lo, hi = _patch_bounds(centre, shape, size)
            crop = image[:, :, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            short = [int(p - c) for p, c in zip(size, crop.shape[2:])]
            if any(short):  # a scan smaller than the patch: pad at the far end, as whole-scan inference does
                crop = F.pad(crop, [v for n in reversed(short) for v in (0, n)], mode="replicate")
            local = torch.cat([box[:3] - lo, box[3:] - lo])[None]
            with torch.no_grad(), inference_autocast("auto", "cpu"):
                features, out = detector.features_and_proposals(crop)
                logits, _ = detector.head(features, [local], detector.strides, crop)
            objectness = objectness_probability(out.objectness_logits.float())[0]
            anchor_centres = (out.anchors[:, :3] + out.anchors[:, 3:]) / 2
            local_centre = (local[0, :3] + local[0, 3:]) / 2
            inside = ((anchor_centres - local_centre) * spacing).norm(dim=1) <= diameter / 2
            best = float(objectness[inside].max()) if bool(inside.any()) else math.nan
            rank = int((objectness > best).sum()) if not math.isnan(best) else -1
            props = out.proposals[0].boxes
            if len(props):
                pc = (props[:, :3] + props[:, 3:]) / 2
                dist = float(((pc - local_centre) * spacing).norm(dim=1).min()) / (diameter / 2)
            else:
                dist = math.inf
            probs = torch.softmax(logits.float(), dim=1)[0]
            rows.append(
                LesionProbe(
                    case_id=str(batch["case_id"]),
                    lesion=i,
                    diameter_mm=round(diameter, 2),
                    label=int(labels[i]),
                    rpn_objectness=round(best, 4),
                    rpn_rank=rank,
                    proposal_distance_r=round(dist, 2),
                    head_lesion_prob=round(float(1.0 - probs[0]), 4),
                    head_class=int(probs[1:].argmax()),
                )
            )
    return rows


def summarise(rows: list[LesionProbe]) -> str:
    """Counts and medians per lesion-diameter band (the validation report's bands), as a Markdown table."""
    from medrpn.evaluation.froc import DiameterBand
    from medrpn.module import DIAMETER_BANDS_MM

    lines = [
        "| band | lesions | RPN objectness >= 0.9 | head lesion prob >= 0.5 | both | median head lesion prob |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for low, high in itertools.pairwise(DIAMETER_BANDS_MM):
        sel = [r for r in rows if low <= r.diameter_mm < high]
        if not sel:
            continue
        rpn = [r.rpn_objectness >= 0.9 for r in sel]  # nan compares False
        head = [r.head_lesion_prob >= 0.5 for r in sel]
        name = DiameterBand(low=low, high=high, num_lesions=len(sel), froc=None).label + " mm"
        lines.append(
            f"| {name} | {len(sel)} | {sum(rpn)} | {sum(head)} | {sum(x and y for x, y in zip(rpn, head))} "
            f"| {np.median([r.head_lesion_prob for r in sel]):.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--datalist", default=str(ROOT / "data" / "heldout40" / "datalist.json"), type=Path)
    p.add_argument("--split", default="validation", help="datalist key (default: validation)")
    p.add_argument("--patch", type=int, nargs=3, default=(96, 96, 64), help="patch size in voxels")
    p.add_argument("--max-diameter", type=float, default=math.inf, help="probe lesions below this diameter only")
    p.add_argument("--out", type=Path, default=None, help="CSV, one row per lesion")
    args = p.parse_args(argv)
    for path in (args.checkpoint, args.datalist):
        if not path.is_file():
            hint = " (benchmarks/train_synthetic.py --heldout-cases 40 writes data/heldout40)"
            hint = hint if path == args.datalist else ""
            print(f"error: {path} does not exist{hint}", file=sys.stderr)
            return 2
    rows = probe_checkpoint(args.checkpoint, args.datalist, split=args.split, patch=tuple(args.patch))
    rows = [r for r in rows if r.diameter_mm < args.max_diameter]
    print(summarise(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["case_id"])
            writer.writeheader()
            for r in rows:
                writer.writerow(asdict(r))
        tmp.replace(args.out)
        print(f"wrote {args.out} ({len(rows)} lesions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
