"""``LesionDataModule``: datalist -> cached, preprocessed scans -> training samples / whole validation scans.

- **Splits** come from a MONAI detection datalist (``training``/``validation``/``test`` keys; a missing
  ``test`` falls back to ``validation``); ``image_field`` picks which path of an item to load
  (``"image"`` — e.g. NIfTI — or ``"dicom"`` for the synthetic dataset's DICOM series).
- **Caching**: the deterministic preprocessing (decode DICOM/NIfTI, reorient, resample, intensity,
  world -> image boxes) runs once per scan; ``cache="memory"`` keeps the results in RAM (MONAI
  ``CacheDataset``), ``cache="disk"`` in ``cache_dir`` across runs (MONAI ``PersistentDataset``), so
  epochs after the first never decode a DICOM file again. Only the random augmentation runs per epoch.
- **Determinism**: MONAI's DataLoader seeds every worker's transforms from the torch seed, which
  ``seed_everything`` (the CLI's ``seed_everything``) fixes.
- **Batches**: training batches stack ``image`` ``(B, C, *patch)`` and keep ``box``/``label`` as
  per-sample lists; validation/test/predict batches hold one whole preprocessed scan with its affine.

Heavy work happens in :meth:`setup`, never in ``__init__``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import pytorch_lightning as pl
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.data import DataLoader as MonaiDataLoader
from monai.transforms import Compose

from medrpn.data.datalists import CaseRecord, read_monai_datalist
from medrpn.data.transforms import IntensityPreset, preprocessing, train_augmentation

if TYPE_CHECKING:
    from medrpn.inference.checkpoint import InferenceModel

CacheMode = Literal["memory", "disk", "none"]


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor (MetaTensor meta differs in length between scans and must not be collated)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def detection_collate(batch: Sequence[Any]) -> dict[str, Any]:
    """Stack images, keep boxes and labels per sample (flattens lists of patches per scan).

    Args:
        batch: dicts with ``image`` ``(C, *spatial)``, ``box`` ``(M_i, 2*D)``, ``label`` ``(M_i,)``; or lists of them.

    Returns:
        ``{"image": (B, C, *spatial), "box": [..], "label": [..], "case_id": [..], "meta": [..]}``.
    """
    items: list[dict[str, Any]] = []
    for b in batch:
        items.extend(b if isinstance(b, list) else [b])
    images = torch.stack([_plain(i["image"]).float() for i in items])
    return {
        "image": images,
        "box": [torch.as_tensor(i["box"]).float().reshape(-1, 2 * (images.ndim - 2)) for i in items],
        "label": [torch.as_tensor(i["label"]).long().reshape(-1) for i in items],
        "case_id": [str(i.get("case_id", "")) for i in items],
    }


def scan_collate(batch: Sequence[Any]) -> dict[str, Any]:
    """Whole-scan batches (one scan each): image, image boxes, world boxes, labels, affine and source."""
    if len(batch) != 1:
        raise ValueError(f"whole-scan batches hold exactly one scan, got {len(batch)}")
    item = batch[0]
    image = item["image"]
    return {
        "image": _plain(image).float()[None],
        "affine": torch.as_tensor(image.affine, dtype=torch.float64),
        "box": torch.as_tensor(item.get("box", torch.zeros(0))).float(),
        "world_box": torch.as_tensor(item.get("world_box", torch.zeros(0)), dtype=torch.float64),
        "label": torch.as_tensor(item.get("label", torch.zeros(0))).long().reshape(-1),
        "case_id": str(item.get("case_id", "")),
        "source": str(image.meta.get("filename_or_obj", "")),
    }


class LesionDataModule(pl.LightningDataModule):
    """Scans and lesion boxes from a MONAI detection datalist.

    Args:
        datalist: the datalist JSON (world LPS mm boxes, ``cccwhd``).
        spatial_dims: 3 (volume patches) or 2 (axial slices sampled from volumes; 2D images).
        spacing_mm: voxel spacing the network works at (3 values; 2D uses the first two in-plane).
        intensity: ``"ct"``, ``"mr"`` or ``"none"``.
        ct_window: HU window of the CT preset.
        orientation: axis codes scans are reoriented to.
        patch_size: training patch (``spatial_dims`` ints).
        samples_per_scan: patches/slices drawn per scan per epoch.
        positive_fraction: share of samples containing a lesion.
        slice_context: 2D only: neighbouring slices per side as extra channels (2.5D).
        hessian_sigmas_mm: scales (mm) of the Hessian blob/tube channels appended to the image
            (:class:`~medrpn.data.transforms.HessianFeaturesd`; empty: none). The two channels (dot, line) are each
            the maximum over the scales, so the network input grows by 2 channels whatever their number.
        hessian_gain: scale of those channels.
        thick_slice_prob: 3D training: probability that a patch is turned into a simulated thick-slice acquisition
            (:class:`~medrpn.data.transforms.RandThickSlicesd`, robustness to thicker series than the training
            scans); 0 turns it off.
        thick_slice_mm: its slice-thickness range ``(low, high)``, mm.
        batch_size: scans per training batch (each gives ``samples_per_scan`` samples).
        num_workers: DataLoader worker processes.
        cache: ``"memory"``, ``"disk"`` or ``"none"``.
        cache_dir: folder of the disk cache.
        image_field: datalist key of the path to load (``"image"`` or ``"dicom"``).
        train_key: split used for training.
        val_key: split used for validation.
        test_key: split used for testing (falls back to ``val_key``).
        augment: random flips/rotations/zoom in training.
        limit_val_scans: use only the first N validation scans (None: all).
        predict_inputs: folders/files of scans for ``predict`` (DICOM series, NIfTI, MHD/MHA, NRRD; recursive).
        predict_output: output root of ``predict`` (linked from ``--prediction_writer.output_dir`` by the CLI).
        predict_overwrite: redo scans whose outputs already exist.
    """

    def __init__(
        self,
        *,
        datalist: str,
        spatial_dims: int = 3,
        spacing_mm: Sequence[float] = (1.5, 1.5, 1.5),
        intensity: IntensityPreset = "ct",
        ct_window: Sequence[float] = (-1000.0, 500.0),
        orientation: str = "RAS",
        patch_size: Sequence[int] = (96, 96, 64),
        samples_per_scan: int = 4,
        positive_fraction: float = 0.5,
        slice_context: int = 0,
        hessian_sigmas_mm: Sequence[float] = (),
        hessian_gain: float = 20.0,
        thick_slice_prob: float = 0.0,
        thick_slice_mm: Sequence[float] = (3.0, 6.0),
        batch_size: int = 2,
        num_workers: int = 0,
        cache: CacheMode = "memory",
        cache_dir: str | None = None,
        image_field: str = "image",
        train_key: str = "training",
        val_key: str = "validation",
        test_key: str = "test",
        augment: bool = True,
        limit_val_scans: int | None = None,
        predict_inputs: Sequence[str] = (),
        predict_output: str | None = None,
        predict_overwrite: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(spacing_mm) != 3:
            raise ValueError(f"spacing_mm needs 3 values (x, y, z in mm), got {list(spacing_mm)}")
        if len(patch_size) != spatial_dims:
            raise ValueError(f"patch_size needs {spatial_dims} values, got {list(patch_size)}")
        if any(not float(v) > 0 for v in hessian_sigmas_mm) or not float(hessian_gain) > 0:
            raise ValueError(
                f"hessian_sigmas_mm must be positive mm and hessian_gain > 0, got {list(hessian_sigmas_mm)} and "
                f"{hessian_gain}"
            )
        if not 0.0 <= float(thick_slice_prob) <= 1.0:
            raise ValueError(f"thick_slice_prob must be in [0, 1], got {thick_slice_prob}")
        if len(thick_slice_mm) != 2 or not 0.0 < float(thick_slice_mm[0]) <= float(thick_slice_mm[1]):
            raise ValueError(f"thick_slice_mm must be (low, high) mm with 0 < low <= high, got {list(thick_slice_mm)}")
        if cache not in ("memory", "disk", "none"):
            raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")
        self.save_hyperparameters()
        self.datalist = datalist
        self.spatial_dims = spatial_dims
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.intensity: IntensityPreset = intensity
        self.ct_window = tuple(float(v) for v in ct_window)
        self.orientation = orientation
        self.patch_size = tuple(int(s) for s in patch_size)
        self.samples_per_scan = samples_per_scan
        self.positive_fraction = positive_fraction
        self.slice_context = slice_context
        self.hessian_sigmas_mm = tuple(float(s) for s in hessian_sigmas_mm)
        self.hessian_gain = float(hessian_gain)
        self.thick_slice_prob = float(thick_slice_prob)
        self.thick_slice_mm = (float(thick_slice_mm[0]), float(thick_slice_mm[1]))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache: CacheMode = cache
        self.cache_dir = cache_dir
        self.image_field = image_field
        self.keys = {"fit": train_key, "validate": val_key, "test": test_key}
        self.augment = augment
        self.limit_val_scans = limit_val_scans
        self.predict_inputs = [str(p) for p in predict_inputs]
        self.predict_output = predict_output
        self.predict_overwrite = predict_overwrite
        self._datasets: dict[str, Any] = {}

    @classmethod
    def for_model(cls, model: InferenceModel, *, datalist: str, **kwargs: Any) -> LesionDataModule:
        """A datamodule that preprocesses exactly as ``model`` was trained (to evaluate a checkpoint on a datalist).

        Args:
            model: a loaded checkpoint (:func:`medrpn.inference.checkpoint.load_inference_model`).
            datalist: the datalist JSON.
            **kwargs: any other constructor argument (``patch_size``, ``cache``, ``val_key``...; validation scans
                are whole volumes for 2D models too, so ``spatial_dims`` may stay 3).

        Returns:
            The datamodule, with the model's spacing, intensity preset, CT window, orientation, 2.5D context and
            Hessian channels.
        """
        return cls(
            datalist=datalist,
            spacing_mm=model.spacing_mm,
            intensity=cast(IntensityPreset, model.intensity),
            ct_window=model.ct_window,
            orientation=model.orientation,
            slice_context=model.slice_context,
            hessian_sigmas_mm=model.hessian_sigmas_mm,
            hessian_gain=model.hessian_gain,
            **kwargs,
        )

    @property
    def in_channels(self) -> int:
        """Channels of the network input (``2 * slice_context + 1`` in 2D, 1 in 3D; +2 with Hessian channels)."""
        image = 2 * self.slice_context + 1 if self.spatial_dims == 2 else 1
        return image + (2 if self.hessian_sigmas_mm else 0)

    def preprocessing(self, with_boxes: bool = True, load: bool = True) -> Compose:
        """The deterministic preprocessing of this datamodule (shared with inference)."""
        return preprocessing(
            spacing_mm=self.spacing_mm,
            intensity=self.intensity,
            ct_window=self.ct_window,
            orientation=self.orientation,
            with_boxes=with_boxes,
            load=load,
            hessian_sigmas_mm=self.hessian_sigmas_mm,
            hessian_gain=self.hessian_gain,
        )

    def records(self, split: str) -> list[CaseRecord]:
        """Records of a split (``"training"``...), with the configured ``image_field`` as the path."""
        key = split
        try:
            recs = read_monai_datalist(self.datalist, key)
        except Exception:
            if split == self.keys["test"]:
                recs = read_monai_datalist(self.datalist, self.keys["validate"])
            else:
                raise
        if self.image_field != "image":
            base = Path(self.datalist).parent
            for r in recs:
                alt = r.extra.get(self.image_field)
                if alt is None:
                    raise ValueError(f"{self.datalist}: item {r.case_id} has no {self.image_field!r} field")
                r.image = alt if Path(alt).is_absolute() else str(base / alt)
        return recs

    def _items(self, split: str) -> list[dict[str, Any]]:
        items = []
        for r in self.records(split):
            item = r.to_item()
            item["world_box"] = r.boxes.copy()
            items.append(item)
        return items

    def _cached(self, items: list[dict[str, Any]], transform: Compose, name: str, copy_cache: bool = True) -> Dataset:
        """A dataset that runs ``transform``'s deterministic head once per scan.

        ``copy_cache=False`` skips ``CacheDataset``'s deep copy of the whole cached scan before every random
        pass. Only for the training split, whose first random transform (:class:`RandCropBoxesd`,
        :class:`RandSliceSampled`) reads the cached scan without changing it and hands on private copies of the
        patch: the copy of a 3-channel scan was ~0.1 s of every training sample, 40% of a step's data time.
        """
        if self.cache == "memory":
            return CacheDataset(
                items,
                transform=transform,
                cache_rate=1.0,
                num_workers=max(self.num_workers, 1),
                copy_cache=copy_cache,
            )
        if self.cache == "disk":
            folder = Path(self.cache_dir or Path(self.datalist).parent / ".medrpn_cache") / name
            folder.mkdir(parents=True, exist_ok=True)
            return PersistentDataset(items, transform=transform, cache_dir=folder)
        return Dataset(items, transform=transform)

    def setup(self, stage: str | None = None) -> None:
        """Build (and cache) the datasets of ``stage``."""
        pre = self.preprocessing()
        if stage in ("fit", None) and "train" not in self._datasets:
            aug = train_augmentation(
                spatial_dims=self.spatial_dims,
                patch_size=self.patch_size,
                samples_per_scan=self.samples_per_scan,
                positive_fraction=self.positive_fraction,
                slice_context=self.slice_context,
                flip_prob=0.5 if self.augment else 0.0,
                rot90_prob=0.5 if self.augment else 0.0,
                zoom_prob=0.2 if self.augment else 0.0,
                thick_slice_prob=self.thick_slice_prob if self.augment and self.spatial_dims == 3 else 0.0,
                thick_slice_mm=self.thick_slice_mm,
                hessian_sigmas_mm=self.hessian_sigmas_mm,
                hessian_gain=self.hessian_gain,
            )
            transform = Compose([*pre.transforms, *aug.transforms])
            self._datasets["train"] = self._cached(self._items(self.keys["fit"]), transform, "train", copy_cache=False)
        if stage in ("fit", "validate", None) and "val" not in self._datasets:
            items = self._items(self.keys["validate"])
            if self.limit_val_scans is not None:
                items = items[: self.limit_val_scans]
            self._datasets["val"] = self._cached(items, pre, "val")
        if stage == "test" and "test" not in self._datasets:
            self._datasets["test"] = self._cached(self._items(self.keys["test"]), pre, "test")
        if stage == "predict":
            self._datasets["predict"] = self._predict_dataset()

    def _predict_dataset(self) -> torch.utils.data.Dataset:
        """Scans found under ``predict_inputs`` (finished ones skipped unless ``predict_overwrite``)."""
        from medrpn.inference.batch import PreprocessingSpec, ScanFailure, plan_batch

        if not self.predict_inputs or self.predict_output is None:
            raise ValueError("predict needs --data.predict_inputs [DIR, ...] and --prediction_writer.output_dir OUT")
        plan = plan_batch(self.predict_inputs, self.predict_output, overwrite=self.predict_overwrite)
        spec = PreprocessingSpec(
            spacing_mm=self.spacing_mm,
            intensity=self.intensity,
            ct_window=self.ct_window,
            orientation=self.orientation,
            hessian_sigmas_mm=self.hessian_sigmas_mm,
            hessian_gain=self.hessian_gain,
        )
        failures = [ScanFailure(src, reason) for src, reason in plan.failures]
        return _PredictDataset([*failures, *plan.todo], spec)

    def train_dataloader(self) -> MonaiDataLoader:
        """Random patches/slices, ``batch_size * samples_per_scan`` per batch."""
        return MonaiDataLoader(
            self._datasets["train"],
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=detection_collate,
            persistent_workers=self.num_workers > 0,
        )

    def _scan_loader(self, name: str) -> MonaiDataLoader:
        return MonaiDataLoader(
            self._datasets[name], batch_size=1, shuffle=False, num_workers=self.num_workers, collate_fn=scan_collate
        )

    def val_dataloader(self) -> MonaiDataLoader:
        """Whole preprocessed validation scans, one per batch."""
        return self._scan_loader("val")

    def test_dataloader(self) -> MonaiDataLoader:
        """Whole preprocessed test scans, one per batch."""
        return self._scan_loader("test")

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        """One loaded scan (or a discovery failure) per batch; Lightning shards it across devices."""
        return torch.utils.data.DataLoader(
            self._datasets["predict"], batch_size=1, shuffle=False, num_workers=self.num_workers, collate_fn=_first
        )


def _first(batch: Sequence[Any]) -> Any:
    return batch[0]


class _PredictDataset(torch.utils.data.Dataset):
    """Loads and preprocesses one planned scan per item (errors become ``ScanFailure`` rows, never raise)."""

    def __init__(self, items: Sequence[Any], spec: Any) -> None:
        self.items = list(items)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        from medrpn.inference.batch import PlannedScan, try_prepare_scan

        item = self.items[index]
        return try_prepare_scan(item, self.spec) if isinstance(item, PlannedScan) else item
