"""Whole-scan inference, shared by validation and batch inference.

- **3D** (:func:`detect_volume`): overlapping patches (sliding window) over the preprocessed volume;
  each patch's detections are shifted to volume coordinates, detections cut by a patch border that a
  neighbouring patch sees whole are dropped, and the rest are merged with class-agnostic NMS. RPN
  proposals are merged the same way (for proposal-recall metrics) and an objectness heatmap is
  stitched by maximum.
- **2D** (:func:`detect_slices`): slice by slice along the last axis (with ``slice_context``
  neighbours as channels), then detections on consecutive slices that overlap in-plane
  (IoU >= ``link_iou``) are linked into one 3D finding: the union of the in-plane boxes, the z range
  of the linked slices, the best slice's class probabilities, and a score from the slices' lesion
  probabilities: ``noisy_or`` (default) ``1 - prod(1 - p)`` over the ``slice_score_top_k`` best slices, so
  that evidence seen on several neighbouring slices outranks a look-alike seen on one slice (a vessel
  cross-section, noise), or ``max``, the best slice's probability.
- Optional flip test-time augmentation: every patch/slice is also run flipped along each of
  ``flip_axes`` (in-plane by default); boxes are flipped back and the views are fused
  (``flip_merge="mean"``, the default: :func:`medrpn.inference.fusion.fuse_views` averages each finding's
  score over all views, so a look-alike only one view produced sinks) or merged by NMS (``"max"``: the best
  view's box and score).

Everything is in voxel-edge image coordinates of the preprocessed volume; callers convert to world
millimetres with :func:`medrpn.geometry.image_to_world_boxes` and the volume's affine.

Shapes: volume ``(1, C, X, Y, Z)``; boxes ``(M, 6)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from monai.data.box_utils import box_iou
from torch import Tensor

from medrpn.data.transforms import slice_with_context
from medrpn.inference.fusion import fuse_views
from medrpn.modeling.detector import LesionDetector
from medrpn.modeling.structures import Detections, Proposals, objectness_probability
from medrpn.ops.nms import nms


@dataclass(frozen=True)
class WholeScanConfig:
    """How a whole scan is tiled and merged.

    Attributes:
        patch_size: 3D patch size in voxels (3D models); ignored in 2D.
        overlap: fraction of overlap between neighbouring patches.
        merge_iou: NMS IoU when merging detections across patches / flips.
        max_detections: detections kept per scan.
        max_proposals: RPN proposals kept per scan (for recall metrics).
        flip_tta: also run flipped along each of ``flip_axes`` (one extra pass per axis).
        flip_axes: spatial axes the flips run along: ``(0, 1)`` in-plane (default), ``(0, 1, 2)`` adds the
            slice axis for 3D models. 2D models (slices, 2D images) only take axes 0 and 1.
        flip_merge: how the flipped views are combined: ``"mean"`` (weighted box fusion, score averaged over
            the views) or ``"max"`` (NMS over the views' detections, best score wins).
        slice_batch: slices per forward pass in 2D.
        link_iou: in-plane IoU that links 2D detections on neighbouring slices.
        slice_score: 2D only, how a linked finding is scored from its slices: ``"noisy_or"``
            (``1 - prod(1 - p)`` over its ``slice_score_top_k`` most probable slices) or ``"max"``.
            Noisy-OR scores are kept in float64: slice probabilities near 1 would round to ties in float32.
        slice_score_top_k: slices combined by ``"noisy_or"``.
        heatmap: compute the objectness heatmap.
    """

    patch_size: tuple[int, ...] | None = None
    overlap: float = 0.25
    merge_iou: float = 0.3
    max_detections: int = 100
    max_proposals: int = 300
    flip_tta: bool = False
    flip_axes: tuple[int, ...] = (0, 1)
    flip_merge: Literal["max", "mean"] = "mean"
    slice_batch: int = 8
    link_iou: float = 0.3
    slice_score: Literal["max", "noisy_or"] = "noisy_or"
    slice_score_top_k: int = 3
    heatmap: bool = False

    def __post_init__(self) -> None:
        if (
            not self.flip_axes
            or len(set(self.flip_axes)) != len(self.flip_axes)
            or not set(self.flip_axes) <= {0, 1, 2}
        ):
            raise ValueError(f"flip_axes must be distinct axes among 0, 1, 2, got {self.flip_axes!r}")
        if self.flip_merge not in ("max", "mean"):
            raise ValueError(f"flip_merge must be 'max' or 'mean', got {self.flip_merge!r}")
        if self.slice_score not in ("max", "noisy_or"):
            raise ValueError(f"slice_score must be 'max' or 'noisy_or', got {self.slice_score!r}")
        if self.slice_score_top_k < 1:
            raise ValueError(f"slice_score_top_k must be >= 1, got {self.slice_score_top_k}")


@dataclass
class ScanDetections:
    """Whole-scan output in image coordinates of the preprocessed volume.

    Attributes:
        detections: final findings, sorted by score (3D boxes).
        proposals: RPN proposals, sorted by objectness (3D boxes).
        heatmap: ``(X, Y, Z)`` objectness probability, or ``None``.
    """

    detections: Detections
    proposals: Proposals
    heatmap: Tensor | None


def _starts(size: int, patch: int, overlap: float) -> list[int]:
    if size <= patch:
        return [0]
    step = max(1, round(patch * (1.0 - overlap)))
    starts = list(range(0, size - patch, step))
    starts.append(size - patch)
    return sorted(set(starts))


def _flip_boxes(boxes: Tensor, axis: int, size: int) -> Tensor:
    d = boxes.shape[1] // 2
    out = boxes.clone()
    out[:, axis] = size - boxes[:, axis + d]
    out[:, axis + d] = size - boxes[:, axis]
    return out


def _flip_axes(config: WholeScanConfig, spatial_dims: int) -> list[int]:
    """The flip axes of ``config`` for a ``spatial_dims`` model input (none without ``flip_tta``)."""
    if not config.flip_tta:
        return []
    if max(config.flip_axes) >= spatial_dims:
        raise ValueError(
            f"flip_axes {config.flip_axes} do not fit a {spatial_dims}D model input (axes 0..{spatial_dims - 1})"
        )
    return list(config.flip_axes)


def _heatmap(detector: LesionDetector, images: Tensor) -> tuple[list[Detections], list[Proposals], Tensor | None]:
    """Run the detector once; also return proposals and the finest-level objectness map upsampled."""
    features, out = detector.features_and_proposals(images)
    dets = detector.forward_from(features, out, images)
    grid = features[0].shape[2:]
    a = detector.rpn.num_anchors
    n0 = out.num_anchors_per_level[0]
    prob = objectness_probability(out.objectness_logits[:, :n0].float())  # (B, n0)
    prob = prob.reshape(images.shape[0], *grid, a).amax(dim=-1)[:, None]
    mode = "trilinear" if len(grid) == 3 else "bilinear"
    heat = F.interpolate(prob, size=tuple(images.shape[2:]), mode=mode, align_corners=False)[:, 0]
    return dets, out.proposals, heat


def _run(
    detector: LesionDetector,
    images: Tensor,
    flip_axes: Sequence[int],
    want_heatmap: bool,
    flip_merge: Literal["max", "mean"],
    merge_iou: float,
) -> tuple[list[Detections], list[Proposals], Tensor | None]:
    """Detections/proposals for a batch, combined over flips (flip axes are spatial axes).

    With ``flip_merge="mean"`` the views are fused per image (:func:`fuse_views` at ``merge_iou``); with
    ``"max"`` they are concatenated for the caller's NMS. Proposals are always concatenated.
    """
    dets, props, heat = _heatmap(detector, images) if want_heatmap else (*_plain(detector, images), None)
    views: list[list[Detections]] = [[d] for d in dets]
    for axis in flip_axes:
        size = images.shape[2 + axis]
        fdets, fprops = _plain(detector, torch.flip(images, dims=[2 + axis]))
        for i in range(len(dets)):
            fd = fdets[i]
            views[i].append(
                Detections(_flip_boxes(fd.boxes, axis, size), fd.scores, fd.labels, fd.class_probs, fd.objectness)
            )
            fp = fprops[i]
            props[i] = _cat_props([props[i], Proposals(_flip_boxes(fp.boxes, axis, size), fp.scores, fp.levels)])
    if flip_axes:
        # the head's threshold applies to the fused score too (a one-view finding drops to a fraction of its score)
        min_score = detector.head.score_threshold if detector.head is not None else 0.0
        dets = [fuse_views(v, merge_iou, min_score) if flip_merge == "mean" else _cat_dets(v) for v in views]
    return dets, props, heat


def _plain(detector: LesionDetector, images: Tensor) -> tuple[list[Detections], list[Proposals]]:
    features, out = detector.features_and_proposals(images)
    return detector.forward_from(features, out, images), out.proposals


def _cat_dets(parts: Sequence[Detections]) -> Detections:
    return Detections(
        torch.cat([p.boxes for p in parts]),
        torch.cat([p.scores for p in parts]),
        torch.cat([p.labels for p in parts]),
        torch.cat([p.class_probs for p in parts]),
        torch.cat([p.objectness for p in parts]),
    )


def _cat_props(parts: Sequence[Proposals]) -> Proposals:
    return Proposals(
        torch.cat([p.boxes for p in parts]), torch.cat([p.scores for p in parts]), torch.cat([p.levels for p in parts])
    )


def _select_dets(d: Detections, idx: Tensor) -> Detections:
    return Detections(d.boxes[idx], d.scores[idx], d.labels[idx], d.class_probs[idx], d.objectness[idx])


def _nms_dets(d: Detections, iou: float, k: int) -> Detections:
    return _select_dets(d, nms(d.boxes, d.scores, iou, k))


def _nms_props(p: Proposals, iou: float, k: int) -> Proposals:
    keep = nms(p.boxes, p.scores, iou, k)
    return Proposals(p.boxes[keep], p.scores[keep], p.levels[keep])


def _interior_mask(
    boxes: Tensor, start: Sequence[int], patch: Sequence[int], size: Sequence[int], overlap_vox: Sequence[int]
) -> Tensor:
    """Drop boxes cut by a patch border that a neighbouring patch sees whole.

    A box touching an interior border (within half a voxel of a patch edge that has a neighbour on that side)
    is probably truncated there; when it is smaller than the overlap along that axis, the neighbouring patch
    contains it entirely, so the truncated copy is dropped before NMS (it would otherwise compete with the
    whole one). Larger boxes are kept: no patch holds them whole.
    """
    d = len(start)
    keep = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    extent = boxes[:, d:] - boxes[:, :d]
    for a in range(d):
        fits = extent[:, a] < overlap_vox[a]
        if start[a] > 0:
            keep &= ~((boxes[:, a] <= 0.5) & fits)
        if start[a] + patch[a] < size[a]:
            keep &= ~((boxes[:, a + d] >= patch[a] - 0.5) & fits)
    return keep


@torch.no_grad()
def detect_volume(
    detector: LesionDetector,
    volume: Tensor,
    config: WholeScanConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ScanDetections:
    """Sliding-window detection over a preprocessed 3D volume.

    Args:
        detector: a 3D detector (eval mode is set here).
        volume: ``(1, C, X, Y, Z)``.
        config: tiling/merging settings (``patch_size`` required).
        progress: called after each patch with ``(patches done, patches in total)``.

    Returns:
        :class:`ScanDetections` in volume image coordinates.
    """
    detector.eval()
    if volume.ndim != 5 or volume.shape[0] != 1:
        raise ValueError(f"expected a (1, C, X, Y, Z) volume, got {tuple(volume.shape)}")
    size = [int(s) for s in volume.shape[2:]]
    patch = [int(p) for p in (config.patch_size or size)]
    padded = [max(s, p) for s, p in zip(size, patch)]
    if padded != size:
        pad: list[int] = []
        for s, p in reversed(list(zip(size, padded))):
            pad += [0, p - s]
        volume = F.pad(volume, pad, mode="replicate")
    axis_starts = [_starts(s, p, config.overlap) for s, p in zip(padded, patch)]
    starts = list(itertools.product(*axis_starts))
    # smallest overlap between neighbouring patches per axis (the last patch is aligned to the end)
    overlap_vox = [
        min((p - (b - a) for a, b in itertools.pairwise(st_)), default=p) for st_, p in zip(axis_starts, patch)
    ]
    flip_axes = _flip_axes(config, 3)
    all_dets, all_props = [], []
    heat = torch.zeros(padded, device=volume.device) if config.heatmap else None
    for n_done, st in enumerate(starts, start=1):
        sl = tuple(slice(s, s + p) for s, p in zip(st, patch))
        crop = volume[(slice(None), slice(None), *sl)]
        dets, props, h = _run(detector, crop, flip_axes, config.heatmap, config.flip_merge, config.merge_iou)
        offset = torch.tensor(list(st) * 2, dtype=torch.float32, device=volume.device)
        dd, pp = dets[0], props[0]
        keep = _interior_mask(dd.boxes, st, patch, padded, overlap_vox)
        all_dets.append(
            Detections(
                dd.boxes[keep] + offset, dd.scores[keep], dd.labels[keep], dd.class_probs[keep], dd.objectness[keep]
            )
        )
        keep_p = _interior_mask(pp.boxes, st, patch, padded, overlap_vox)
        all_props.append(Proposals(pp.boxes[keep_p] + offset, pp.scores[keep_p], pp.levels[keep_p]))
        if heat is not None and h is not None:
            heat[sl] = torch.maximum(heat[sl], h[0])
        if progress is not None:
            progress(n_done, len(starts))
    merged = _nms_dets(_cat_dets(all_dets), config.merge_iou, config.max_detections)
    merged_props = _nms_props(_cat_props(all_props), 0.5, config.max_proposals)
    limit = torch.tensor(size * 2, dtype=torch.float32, device=volume.device)
    lo = torch.zeros_like(limit)
    merged.boxes = torch.minimum(torch.maximum(merged.boxes, lo), limit)
    merged_props.boxes = torch.minimum(torch.maximum(merged_props.boxes, lo), limit)
    if heat is not None:
        heat = heat[tuple(slice(0, s) for s in size)]
    return ScanDetections(merged, merged_props, heat)


def _link_slices(
    per_slice: Sequence[Detections],
    link_iou: float,
    max_gap: int = 1,
    slice_score: Literal["max", "noisy_or"] = "max",
    top_k: int = 3,
) -> Detections:
    """Link 2D detections on neighbouring slices into 3D findings (see module docstring)."""
    tracks: list[dict] = []
    for k, det in enumerate(per_slice):
        order = torch.argsort(det.scores, descending=True, stable=True).tolist()
        used: set[int] = set()
        for i in order:
            box = det.boxes[i]
            best, best_iou = None, link_iou
            for t_idx, t in enumerate(tracks):
                if t_idx in used or k - t["last"] > max_gap + 1 or t["last"] == k:
                    continue
                iou = float(torch.as_tensor(box_iou(box[None], t["last_box"][None]))[0, 0])
                if iou >= best_iou:
                    best, best_iou = t_idx, iou
            if best is None:
                tracks.append(
                    {
                        "first": k,
                        "last": k,
                        "last_box": box,
                        "union": box.clone(),
                        "best": (det, i),
                        "scores": [det.scores[i]],
                    }
                )
                used.add(len(tracks) - 1)
            else:
                t = tracks[best]
                t["last"], t["last_box"] = k, box
                t["union"] = torch.cat([torch.minimum(t["union"][:2], box[:2]), torch.maximum(t["union"][2:], box[2:])])
                if float(det.scores[i]) > float(t["best"][0].scores[t["best"][1]]):
                    t["best"] = (det, i)
                t["scores"].append(det.scores[i])
                used.add(best)
    if not tracks:
        ref = per_slice[0] if per_slice else None
        c = ref.class_probs.shape[1] if ref is not None else 1
        return Detections.empty(3, c)
    boxes, scores, labels, probs, obj = [], [], [], [], []
    for t in tracks:
        det, i = t["best"]
        u = t["union"]
        boxes.append(
            torch.stack([u[0], u[1], torch.tensor(float(t["first"])), u[2], u[3], torch.tensor(float(t["last"] + 1))])
        )
        if slice_score == "noisy_or":
            probs_k = torch.stack(t["scores"]).double().clamp(0.0, 1.0).topk(min(top_k, len(t["scores"]))).values
            scores.append(-torch.expm1(torch.log1p(-probs_k).sum()))
        else:
            scores.append(det.scores[i])
        labels.append(det.labels[i])
        probs.append(det.class_probs[i])
        obj.append(det.objectness[i])
    return Detections(
        torch.stack(boxes).float(), torch.stack(scores), torch.stack(labels), torch.stack(probs), torch.stack(obj)
    )


@torch.no_grad()
def detect_slices(
    detector: LesionDetector,
    volume: Tensor,
    config: WholeScanConfig,
    context: int = 0,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ScanDetections:
    """Slice-by-slice 2D detection over a preprocessed volume, linked into 3D findings.

    Args:
        detector: a 2D detector whose input has ``2 * context + C`` channels.
        volume: ``(1, C, X, Y, Z)``: the image, then ``C - 1`` feature channels (see
            :func:`medrpn.data.transforms.slice_with_context`).
        config: settings (``slice_batch``, ``link_iou``, ``flip_tta``, ``max_detections``...).
        context: neighbouring slices per side.
        progress: called after each batch of slices with ``(slices done, slices in total)``.

    Returns:
        :class:`ScanDetections` with 3D boxes in volume image coordinates.
    """
    detector.eval()
    depth = int(volume.shape[-1])
    flip_axes = _flip_axes(config, 2)
    per_slice: list[Detections] = []
    prop_parts: list[Proposals] = []
    heat = torch.zeros(tuple(volume.shape[2:]), device=volume.device) if config.heatmap else None
    for s in range(0, depth, config.slice_batch):
        ks = list(range(s, min(depth, s + config.slice_batch)))
        batch = torch.stack([slice_with_context(volume[0], k, context) for k in ks])
        dets, props, h = _run(detector, batch, flip_axes, config.heatmap, config.flip_merge, config.merge_iou)
        for j, k in enumerate(ks):
            per_slice.append(_nms_dets(dets[j], config.merge_iou, config.max_detections))
            p = props[j]
            z0 = torch.full((len(p), 1), float(k), device=volume.device)
            prop_parts.append(Proposals(torch.cat([p.boxes[:, :2], z0, p.boxes[:, 2:], z0 + 1], 1), p.scores, p.levels))
            if heat is not None and h is not None:
                heat[..., k] = h[j]
        if progress is not None:
            progress(ks[-1] + 1, depth)
    linked = _link_slices(per_slice, config.link_iou, slice_score=config.slice_score, top_k=config.slice_score_top_k)
    order = torch.argsort(linked.scores, descending=True, stable=True)[: config.max_detections]
    merged_props = (
        _nms_props(_cat_props(prop_parts), 0.5, config.max_proposals)
        if prop_parts
        else Proposals(torch.zeros(0, 6), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    )
    return ScanDetections(_select_dets(linked, order), merged_props, heat)


def detect_scan(
    detector: LesionDetector,
    volume: Tensor,
    config: WholeScanConfig,
    context: int = 0,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> ScanDetections:
    """Dispatch to :func:`detect_volume` (3D detector) or :func:`detect_slices` (2D detector).

    Args:
        detector: the model.
        volume: ``(1, C, X, Y, Z)`` preprocessed volume (or ``(1, C, X, Y)`` for a 2D image).
        config: tiling/merging settings.
        context: 2D only, neighbouring slices per side.
        progress: called after each patch (3D) / batch of slices (2D) with ``(done, total)``.

    Returns:
        :class:`ScanDetections` (3D boxes for volumes, 2D boxes for 2D images).
    """
    if detector.spatial_dims == 3:
        return detect_volume(detector, volume, config, progress=progress)
    if volume.ndim == 4:  # a genuine 2D image
        flips = _flip_axes(config, 2)
        dets, props, heat = _run(detector.eval(), volume, flips, config.heatmap, config.flip_merge, config.merge_iou)
        d = _nms_dets(dets[0], config.merge_iou, config.max_detections)
        if progress is not None:
            progress(1, 1)
        return ScanDetections(d, _nms_props(props[0], 0.5, config.max_proposals), None if heat is None else heat[0])
    return detect_slices(detector, volume, config, context, progress=progress)


ScanDetector = Callable[[Tensor], ScanDetections]
