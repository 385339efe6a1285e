"""MONAI pipelines for training, validation and prediction, with boxes that follow the image.

Box flow: datalists hold **world boxes** (LPS mm, StandardMode). Orientation and spacing change only
the image and its affine — world boxes are invariant — so :class:`WorldBoxToImaged` converts them to
voxel-edge **image boxes** once, with the final affine (see :mod:`medrpn.geometry`). After that,
crops, flips, 90-degree rotations and zoom are MONAI's detection box transforms, which move image and
boxes together. Predictions go back to the world with :func:`medrpn.geometry.image_to_world_boxes` and
the affine of the preprocessed image.

Pipelines:

- :func:`preprocessing` (deterministic, cached by the datamodule): load -> orientation (RAS axes) ->
  resample to ``spacing_mm`` -> intensity preset -> optional Hessian shape channels
  (:class:`HessianFeaturesd`) -> world boxes to image boxes.
- :func:`train_augmentation` (random): 3D — pad to the patch size, positive/negative balanced patch
  sampling (scans without lesions give random patches), optionally a simulated thick-slice acquisition
  (:class:`RandThickSlicesd`), flips, in-plane 90-degree rotations, zoom, clip boxes to the patch;
  2D — :class:`RandSliceSampled` draws axial slices (lesion slices and others, optionally with
  ``slice_context`` neighbours on each side as extra channels, "2.5D"),
  then the same 2D augmentations.

Intensity presets: ``"ct"`` — clip HU to a window and scale to [0, 1]; ``"mr"`` — z-score over the
body (voxels above 5% of the robust maximum), clipped to [-5, 5]; ``"none"``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.apps.detection.transforms.dictionary import (
    ClipBoxToImaged,
    RandCropBoxByPosNegLabeld,
    RandFlipBoxd,
    RandRotateBox90d,
    RandZoomBoxd,
)
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandomizableTransform,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medrpn.data.errors import InvalidImageError, ScanError
from medrpn.geometry import world_to_image_boxes
from medrpn.ops.hessian import hessian_shape_filters

IntensityPreset = Literal["ct", "mr", "none"]


class BoxOutsideImageError(ScanError):
    """A ground-truth box lies entirely outside its image (wrong coordinates or wrong image)."""


class LoadScand(MapTransform):
    """Load a scan with :func:`medrpn.data.io.load_scan` (DICOM series/file, NIfTI, MHD/MHA, NRRD).

    Args:
        keys: keys holding paths; replaced by ``MetaTensor`` ``(1, X, Y[, Z])`` with RAS affines.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from medrpn.data.io import load_scan

        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_scan(d[key])
        return d


class WorldBoxToImaged(MapTransform):
    """World boxes (LPS mm) -> voxel-edge image boxes of the reference image, using its affine.

    Boxes partly outside the image are clipped to it; a box entirely outside raises
    :class:`BoxOutsideImageError` naming the scan.

    Args:
        box_keys: keys of ``(M, 2*D)`` world boxes.
        label_keys: keys of per-box arrays filtered together with the boxes.
        box_ref_image_key: key of the image the boxes belong to.
    """

    def __init__(
        self,
        box_keys: KeysCollection,
        label_keys: KeysCollection,
        box_ref_image_key: str,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(box_keys, allow_missing_keys)
        self.label_keys: tuple[Hashable, ...] = (
            (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)  # type: ignore[arg-type]
        )
        self.ref = box_ref_image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.ref]
        spatial = [int(s) for s in image.shape[1:]]
        dims = len(spatial)
        source = str(image.meta.get("filename_or_obj", "image")) if isinstance(image, MetaTensor) else "image"
        for key in self.key_iterator(d):
            world = np.asarray(d[key], dtype=np.float64).reshape(-1, 2 * dims)
            boxes = world_to_image_boxes(world, np.asarray(image.affine)).float()
            size = torch.tensor(spatial, dtype=torch.float32)
            inside = (boxes[:, dims:] > 0).all(dim=1) & (boxes[:, :dims] < size).all(dim=1)
            if not bool(inside.all()):
                bad = world[~inside.numpy()][0].round(2).tolist()
                raise BoxOutsideImageError(source, f"box {bad} (LPS mm) lies entirely outside the image")
            boxes = torch.minimum(torch.clamp(boxes, min=0.0), size.repeat(2))
            d[key] = boxes
            for lk in self.label_keys:
                if lk in d:
                    d[lk] = torch.as_tensor(np.asarray(d[lk]), dtype=torch.long).reshape(-1)
        return d


class NormalizeOverBodyd(MapTransform):
    """MR intensity: z-score over the body (voxels above 5% of the 99.5th percentile), clipped to [-5, 5]."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = torch.as_tensor(img).float()
            top = torch.quantile(arr.flatten()[:: max(1, arr.numel() // 1_000_000)], 0.995)
            body = arr > 0.05 * top
            if int(body.sum()) < 2:
                raise InvalidImageError(str(getattr(img, "meta", {}).get("filename_or_obj", key)), "no body voxels")
            mean, std = arr[body].mean(), arr[body].std().clamp(min=1e-6)
            out = ((arr - mean) / std).clamp(-5.0, 5.0)
            d[key] = MetaTensor(out, meta=img.meta, affine=img.affine) if isinstance(img, MetaTensor) else out
        return d


def hessian_channels(
    image: torch.Tensor,
    sigmas_mm: Sequence[float],
    spacing_mm: Sequence[float],
    gain: float = 20.0,
    max_value: float = 10.0,
    bright: bool = True,
) -> torch.Tensor:
    """The two shape channels of :class:`HessianFeaturesd` for one image channel.

    Args:
        image: ``(X, Y, Z)`` (3D) or ``(X, Y)`` (2D) intensity-normalised image.
        sigmas_mm: Gaussian scales in mm.
        spacing_mm: the image's spacing per axis.
        gain: scale of the responses.
        max_value: upper clip.
        bright: bright structures (CT) or dark ones.

    Returns:
        ``(2, *spatial)``: ``gain * dot`` and ``gain * line``, clipped to ``[0, max_value]``.
    """
    dot, line = hessian_shape_filters(image, tuple(sigmas_mm), list(spacing_mm), bright=bright)
    return torch.stack([dot, line]).mul_(gain).clamp_(0.0, max_value)


class HessianFeaturesd(MapTransform):
    """Append Hessian blob ("dot") and tube ("line") channels to an image (:mod:`medrpn.ops.hessian`).

    A 3 mm nodule and a 3 mm vessel cross-section look alike on a slice and differ in shape through the volume:
    the dot filter answers on balls and not on tubes, the line filter the other way round. Computed once per scan
    on the resampled, intensity-normalised image (so cached with it), with ``sigmas_mm`` converted per axis from
    the image's own spacing; a 3D volume gets the 3D filters (also when a 2D model reads it slice by slice), a 2D
    image the 2D ones. The output is ``(C + 2, *spatial)``: the input channels, then ``gain * dot`` and
    ``gain * line`` of the first input channel (both >= 0, clipped to ``max_value``).

    Args:
        keys: image keys.
        sigmas_mm: Gaussian scales in mm (maximum response over them); about lesion radius / sqrt(3) for the blob
            filter, so ``(1.0, 2.0)`` covers lesions of about 3-7 mm diameter best and larger ones still answer.
        gain: scale of the responses (in normalised-intensity units; 20 puts a solid 5 mm nodule of a
            ``[-1000, 400]`` HU window near 1).
        max_value: upper clip of the scaled responses.
        bright: structures brighter than their surroundings (CT nodules and vessels; ``False``: dark ones).
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigmas_mm: Sequence[float],
        gain: float = 20.0,
        max_value: float = 10.0,
        bright: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not sigmas_mm or any(not float(s) > 0 for s in sigmas_mm):
            raise ValueError(f"hessian sigmas must be positive millimetres, got {list(sigmas_mm)}")
        if not gain > 0 or not max_value > 0:
            raise ValueError(f"hessian gain and max_value must be > 0, got {gain} and {max_value}")
        self.sigmas_mm = tuple(float(s) for s in sigmas_mm)
        self.gain = float(gain)
        self.max_value = float(max_value)
        self.bright = bright

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = torch.as_tensor(img).float()
            dims = arr.ndim - 1
            affine = img.affine if isinstance(img, MetaTensor) else torch.eye(dims + 1)
            spacing = [float(v) for v in affine_to_spacing(torch.as_tensor(affine, dtype=torch.float64), r=dims)]
            feats = hessian_channels(arr[0], self.sigmas_mm, spacing, self.gain, self.max_value, self.bright)
            out = torch.cat([arr, feats.to(arr.dtype)], dim=0)
            d[key] = MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out  # meta holds the affine
        return d


def intensity_transform(
    preset: IntensityPreset, keys: KeysCollection = "image", ct_window: Sequence[float] = (-1000.0, 500.0)
) -> MapTransform | None:
    """The intensity preset as a MONAI transform (``None`` for ``"none"``).

    Args:
        preset: ``"ct"``, ``"mr"`` or ``"none"``.
        keys: image keys.
        ct_window: HU range mapped to [0, 1] for CT (values outside are clipped).

    Raises:
        ValueError: unknown preset or an empty window.
    """
    if preset == "ct":
        lo, hi = float(ct_window[0]), float(ct_window[1])
        if not lo < hi:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {list(ct_window)}")
        return ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if preset == "mr":
        return NormalizeOverBodyd(keys)
    if preset == "none":
        return None
    raise ValueError(f"intensity preset must be 'ct', 'mr' or 'none', got {preset!r}")


def preprocessing(
    *,
    spacing_mm: Sequence[float] | None,
    intensity: IntensityPreset = "ct",
    ct_window: Sequence[float] = (-1000.0, 500.0),
    orientation: str | None = "RAS",
    with_boxes: bool = True,
    load: bool = True,
    hessian_sigmas_mm: Sequence[float] = (),
    hessian_gain: float = 20.0,
) -> Compose:
    """Deterministic part of every pipeline (cacheable).

    Args:
        spacing_mm: target voxel spacing per axis (``None``: keep the scan's spacing).
        intensity: intensity preset.
        ct_window: HU window of the CT preset.
        orientation: axis codes to reorient to (``None``: keep).
        with_boxes: convert ``box`` (world) to image coordinates and ``label`` to a tensor.
        load: start with :class:`LoadScand` (``False`` when ``image`` is already a MetaTensor).
        hessian_sigmas_mm: scales of :class:`HessianFeaturesd` (empty: no shape channels).
        hessian_gain: its ``gain``.

    Returns:
        A MONAI ``Compose`` over dictionaries with keys ``image`` (and ``box``, ``label``).
    """
    ts: list[Any] = []
    if load:
        ts.append(LoadScand("image"))
    ts.append(EnsureTyped("image", dtype=torch.float32, track_meta=True))
    if orientation:
        ts.append(Orientationd("image", axcodes=orientation, labels=None))
    if spacing_mm is not None:
        ts.append(Spacingd("image", pixdim=tuple(float(s) for s in spacing_mm), mode="bilinear", padding_mode="border"))
    t = intensity_transform(intensity, "image", ct_window)
    if t is not None:
        ts.append(t)
    if hessian_sigmas_mm:
        ts.append(HessianFeaturesd("image", hessian_sigmas_mm, gain=hessian_gain))
    if with_boxes:
        ts.append(WorldBoxToImaged("box", "label", "image"))
    return Compose(ts)


class RandCropBoxesd(RandomizableTransform, MapTransform):
    """Positive/negative balanced patch sampling that also accepts scans without lesions.

    With boxes: MONAI's ``RandCropBoxByPosNegLabeld`` (a positive patch contains a whole box when it
    fits). Without boxes: random patches (``RandSpatialCropSamplesd``). The image must already be at
    least ``patch_size`` (pad first). Returns a list of patches, or one dict when ``num_samples == 1``
    (so it can follow a transform that already returned a list, as in the 2D pipeline).

    Args:
        patch_size: ``D`` ints.
        num_samples: patches per scan.
        positive_fraction: probability that a patch is centred to contain a lesion.
    """

    def __init__(self, patch_size: Sequence[int], num_samples: int, positive_fraction: float) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, ["image", "box", "label"])
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        pos, neg = positive_fraction, 1.0 - positive_fraction
        self.with_boxes = RandCropBoxByPosNegLabeld(
            image_keys="image",
            box_keys="box",
            label_keys="label",
            spatial_size=list(patch_size),
            whole_box=True,
            num_samples=num_samples,
            pos=pos if pos > 0 else 1e-6,
            neg=neg,
        )
        self.without_boxes = RandSpatialCropSamplesd(
            "image", roi_size=list(patch_size), num_samples=num_samples, random_size=False
        )

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandCropBoxesd:
        super().set_random_state(seed, state)
        self.with_boxes.set_random_state(seed, self.R)
        self.without_boxes.set_random_state(seed, self.R)
        return self

    def __call__(  # type: ignore[override]
        self, data: Mapping[Hashable, Any]
    ) -> list[dict[Hashable, Any]] | dict[Hashable, Any]:
        """Crop ``num_samples`` patches (a single dict when ``num_samples == 1``)."""
        d = dict(data)
        out = self.without_boxes(d) if len(d["box"]) == 0 else self.with_boxes(d)
        # private copies: the crops are views of the input, which may be a cached scan (copy_cache=False)
        patches = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in o.items()} for o in out]
        return patches[0] if len(patches) == 1 else patches


class RandSliceSampled(RandomizableTransform, MapTransform):
    """2D training samples from a 3D volume: axial slices along the last axis, with 2.5D context.

    A slice is positive when it crosses a box (its centre ``k + 0.5`` lies within the box's z range);
    its 2D boxes are the in-plane extents of those boxes. ``positive_fraction`` of the samples are
    positive slices when the scan has lesions; the rest are random slices. With ``context = k`` the
    ``k`` neighbours on each side become extra channels (edges replicated): ``(2k + 1, X, Y)``.

    Args:
        num_samples: slices per scan.
        positive_fraction: share of lesion slices.
        context: neighbouring slices on each side.
    """

    def __init__(self, num_samples: int, positive_fraction: float = 0.5, context: int = 0) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, ["image", "box", "label"])
        self.num_samples = num_samples
        self.positive_fraction = positive_fraction
        self.context = context

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:  # type: ignore[override]
        d = dict(data)
        image, boxes, labels = d["image"], torch.as_tensor(d["box"]), torch.as_tensor(d["label"])
        depth = int(image.shape[-1])
        centres = torch.arange(depth, dtype=torch.float32) + 0.5
        covers = (boxes[:, None, 2] <= centres[None]) & (boxes[:, None, 5] > centres[None])  # (M, Z)
        positive_slices = torch.nonzero(covers.any(dim=0)).squeeze(1).tolist()
        out = []
        for _ in range(self.num_samples):
            if positive_slices and self.R.rand() < self.positive_fraction:
                k = int(positive_slices[self.R.randint(len(positive_slices))])
            else:
                k = int(self.R.randint(depth))
            out.append(slice_sample(d, k, self.context, covers[:, k], boxes, labels))
        return out


def slice_with_context(volume: torch.Tensor, k: int, context: int) -> torch.Tensor:
    """Axial slice ``k`` of a volume with ``context`` neighbours per side of its image as channels.

    Edge slices are replicated. Shared by 2D training (:class:`RandSliceSampled`) and 2D whole-scan
    inference, so both feed the network the same input.

    Args:
        volume: ``(X, Y, Z)``, or ``(C, X, Y, Z)`` whose channel 0 is the image and channels ``1..C-1`` are
            per-voxel features (e.g. :class:`HessianFeaturesd`), taken at slice ``k`` only.
        k: slice index.
        context: neighbouring slices per side.

    Returns:
        ``(2 * context + 1 + C - 1, X, Y)``: the image's slices ``k - context .. k + context``, then the features.
    """
    if volume.ndim == 3:
        volume = volume[None]
    depth = int(volume.shape[-1])
    idx = [min(max(k + o, 0), depth - 1) for o in range(-context, context + 1)]
    image = volume[0][..., idx].permute(2, 0, 1)
    if volume.shape[0] == 1:
        return image
    return torch.cat([image, volume[1:, ..., k]], dim=0)


def slice_sample(
    d: Mapping[Hashable, Any], k: int, context: int, box_mask: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
) -> dict[Hashable, Any]:
    """One 2D sample: slice ``k`` with ``context`` neighbours as channels and the in-plane boxes crossing it.

    Args:
        d: the 3D item (``image`` ``(C, X, Y, Z)``, channel 0 the image, others features).
        k: slice index.
        context: neighbours per side.
        box_mask: ``(M,)`` which boxes cross slice ``k``.
        boxes: ``(M, 6)`` image boxes.
        labels: ``(M,)``.

    Returns:
        A 2D item: ``image`` ``(2*context + C, X, Y)``, ``box`` ``(M_k, 4)``, ``label`` ``(M_k,)``, ``slice_index``.
    """
    arr = slice_with_context(torch.as_tensor(d["image"]), k, context).contiguous()
    b = boxes[box_mask]
    item = {key: v for key, v in d.items() if key not in ("image", "box", "label")}
    item.update(
        image=MetaTensor(arr),
        box=torch.cat([b[:, 0:2], b[:, 3:5]], dim=1),
        label=labels[box_mask],
        slice_index=k,
    )
    return item


def simulate_thick_slices(volume: torch.Tensor, thickness: float, phase: float = 0.0) -> torch.Tensor:
    """A thicker-slice acquisition of ``volume`` along its last axis, interpolated back onto the same grid.

    Models what a thick-slice series looks like after :func:`preprocessing` resamples it (linearly) to the network's
    spacing: each acquired slice is the mean of the signal over a slab ``thickness`` voxels thick (voxel ``i``
    spanning ``[i - 0.5, i + 0.5)``, edges replicated), slab centres lie ``thickness`` apart starting at
    ``phase * thickness``, and every voxel gets the linear interpolation of its two neighbouring slabs. Partial
    volume along z (a 4 mm nodule spread over a 5 mm slice loses contrast) and the lower noise of a thick slab both
    follow. ``thickness = 1, phase = 0`` returns the input.

    Written here because MONAI has no slice-thickness transform (its ``RandSimulateLowResolution`` zooms all axes
    with one factor and knows no slab profile).

    Args:
        volume: ``(..., Z)`` tensor.
        thickness: slab thickness and slice distance in voxels of the last axis (``>= 1``).
        phase: offset of the first slab centre, a fraction of ``thickness`` in ``[0, 1)``.

    Returns:
        A tensor like ``volume`` (same shape and dtype).
    """
    if not thickness >= 1.0:
        raise ValueError(f"thickness must be >= 1 voxel, got {thickness}")
    z = volume.shape[-1]
    x = volume.double()  # the slab means are differences of a running sum: float32 would lose ~1e-5 of the signal
    pad = math.ceil(thickness) + 2
    xp = torch.cat([x[..., :1].expand(*x.shape[:-1], pad), x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    integral = torch.cat([torch.zeros_like(xp[..., :1]), torch.cumsum(xp, dim=-1)], dim=-1)  # at voxel edges

    def cumulative(pos: torch.Tensor) -> torch.Tensor:
        u = pos + 0.5 + pad  # in edge units of xp
        j = torch.floor(u).clamp(0, xp.shape[-1] - 1)
        ji = j.long()
        return integral[..., ji] + (u - j) * xp[..., ji]

    first = phase * thickness - thickness  # one slab before the first voxel for the interpolation
    n = math.ceil((z - 1 - first) / thickness) + 2
    centres = first + thickness * torch.arange(n, dtype=torch.float64, device=x.device)
    half = thickness / 2.0
    slabs = (cumulative(centres + half) - cumulative(centres - half)) / thickness  # (..., n)
    pos = (torch.arange(z, dtype=torch.float64, device=x.device) - first) / thickness
    idx = torch.floor(pos).clamp(0, n - 2).long()
    w = pos - idx.double()
    out = slabs[..., idx] * (1.0 - w) + slabs[..., idx + 1] * w
    return out.to(volume.dtype)


class RandThickSlicesd(RandomizableTransform, MapTransform):
    """Randomly turn a 3D training patch into what a thick-slice scan of it would look like.

    With probability ``prob`` the first image channel becomes :func:`simulate_thick_slices` of itself along the
    last (axial, after RAS orientation) axis, with a slice thickness drawn uniformly from ``thickness_mm`` (in mm,
    converted with the patch's own spacing; thicknesses under one voxel leave the patch unchanged) and a random
    slab phase. The Hessian shape channels (the last two, when ``hessian_sigmas_mm`` is set) are recomputed from the
    degraded channel, as :func:`preprocessing` computes them from a thick-slice scan at inference. Boxes stay: the
    lesion is where it was, only its image is blurred along z.

    Why: the built-in data has 1.5-3.5 mm slices and a model trained on it lost a third of its CPM on the same
    scans resampled to 5 mm slices (README: scans unlike the training data).

    Args:
        keys: image keys (``(C, X, Y, Z)`` MetaTensors).
        prob: probability per patch.
        thickness_mm: ``(low, high)`` slice thickness range, mm.
        hessian_sigmas_mm: the scales of the Hessian channels the image carries (empty: it carries none).
        hessian_gain: their gain.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float,
        thickness_mm: Sequence[float] = (3.0, 6.0),
        hessian_sigmas_mm: Sequence[float] = (),
        hessian_gain: float = 20.0,
        allow_missing_keys: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        lo, hi = (float(v) for v in thickness_mm)
        if not 0.0 < lo <= hi:
            raise ValueError(f"thickness_mm must be (low, high) with 0 < low <= high, got {list(thickness_mm)}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.thickness_mm = (lo, hi)
        self.hessian_sigmas_mm = tuple(float(v) for v in hessian_sigmas_mm)
        self.hessian_gain = float(hessian_gain)
        self._thickness = lo
        self._phase = 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._thickness = float(self.R.uniform(*self.thickness_mm))
            self._phase = float(self.R.uniform(0.0, 1.0))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            arr = torch.as_tensor(img)
            if arr.ndim != 4:
                raise ValueError(f"RandThickSlicesd needs (C, X, Y, Z) images, got shape {tuple(arr.shape)}")
            affine = img.affine if isinstance(img, MetaTensor) else torch.eye(4)
            spacing = [float(v) for v in affine_to_spacing(torch.as_tensor(affine, dtype=torch.float64), r=3)]
            thickness = self._thickness / spacing[2]
            if thickness <= 1.0:
                continue
            out = arr.clone()
            out[0] = simulate_thick_slices(arr[0], thickness, self._phase)
            if self.hessian_sigmas_mm:
                out[-2:] = hessian_channels(out[0].float(), self.hessian_sigmas_mm, spacing, self.hessian_gain).to(
                    out.dtype
                )
            d[key] = MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out
        return d


def train_augmentation(
    *,
    spatial_dims: int,
    patch_size: Sequence[int],
    samples_per_scan: int = 4,
    positive_fraction: float = 0.5,
    slice_context: int = 0,
    flip_prob: float = 0.5,
    rot90_prob: float = 0.5,
    zoom_prob: float = 0.2,
    thick_slice_prob: float = 0.0,
    thick_slice_mm: Sequence[float] = (3.0, 6.0),
    hessian_sigmas_mm: Sequence[float] = (),
    hessian_gain: float = 20.0,
) -> Compose:
    """Random part of the training pipeline (runs every epoch on the cached volumes).

    Args:
        spatial_dims: 3 for volume patches, 2 for slices sampled from volumes.
        patch_size: ``spatial_dims`` ints.
        samples_per_scan: patches (3D) or slices (2D) drawn per scan per epoch.
        positive_fraction: share of samples that contain a lesion.
        slice_context: 2D only: neighbouring slices per side as extra channels.
        flip_prob: probability of a flip, per axis.
        rot90_prob: probability of an in-plane 90-degree rotation (square in-plane patches keep their size).
        zoom_prob: probability of a random zoom in [0.85, 1.15] (size kept).
        thick_slice_prob: 3D only: probability of :class:`RandThickSlicesd` per patch (0: off).
        thick_slice_mm: its slice-thickness range, mm.
        hessian_sigmas_mm: the Hessian channels the cached images carry (recomputed after a thick-slice draw).
        hessian_gain: their gain.

    Returns:
        A Compose that turns one cached item into a list of ``samples_per_scan`` samples.
    """
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size needs {spatial_dims} values, got {list(patch_size)}")
    ts: list[Any] = []
    if spatial_dims == 2:
        ts.append(RandSliceSampled(samples_per_scan, positive_fraction, slice_context))
        ts.append(SpatialPadd("image", spatial_size=list(patch_size), method="end"))
        ts.append(RandCropBoxesd(patch_size, 1, positive_fraction=1.0))
    else:
        ts.append(SpatialPadd("image", spatial_size=list(patch_size), method="end"))
        ts.append(RandCropBoxesd(patch_size, samples_per_scan, positive_fraction))
        if thick_slice_prob > 0:
            thick = RandThickSlicesd("image", thick_slice_prob, thick_slice_mm, hessian_sigmas_mm, hessian_gain)
            ts.append(thick)
    for axis in range(spatial_dims):
        ts.append(RandFlipBoxd("image", "box", "image", prob=flip_prob, spatial_axis=axis))
    if patch_size[0] == patch_size[1]:
        ts.append(RandRotateBox90d("image", "box", "image", prob=rot90_prob, max_k=3, spatial_axes=(0, 1)))
    ts.append(RandZoomBoxd("image", "box", "image", prob=zoom_prob, min_zoom=0.85, max_zoom=1.15, keep_size=True))
    ts.append(ClipBoxToImaged(box_keys="box", label_keys="label", box_ref_image_keys="image", remove_empty=True))
    return Compose(ts)
