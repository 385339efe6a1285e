"""``LesionDataModule``: training samples come from the cache without changing it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.data import CacheDataset, MetaTensor

from medrpn.data.datamodule import LesionDataModule
from medrpn.data.synthetic import generate_dataset


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, cases=3, seed=5, shape=(48, 48, 24), val_fraction=0.34, write_dicom=False)
    return out / "datalist.json"


@pytest.mark.parametrize(("spatial_dims", "patch"), [(3, (32, 32, 16)), (2, (32, 32))])
def test_training_samples_leave_the_cached_scans_unchanged(datalist: Path, spatial_dims: int, patch: tuple) -> None:
    # the training split skips CacheDataset's per-sample deep copy of the scan (copy_cache=False): the
    # augmentation must neither write into the cached tensors nor grow their transform history
    dm = LesionDataModule(
        datalist=str(datalist),
        spatial_dims=spatial_dims,
        patch_size=patch,
        spacing_mm=(1.5, 1.5, 1.5) if spatial_dims == 3 else (1.5, 1.5, 2.0),
        samples_per_scan=2,
        positive_fraction=0.5,
        hessian_sigmas_mm=[1.0],
        thick_slice_prob=1.0 if spatial_dims == 3 else 0.0,  # every 3D patch degraded: still no write into the cache
        cache="memory",
    )
    dm.setup("fit")
    dataset = dm._datasets["train"]
    assert isinstance(dataset, CacheDataset) and not dataset.copy_cache
    cached = [dict(item) for item in dataset._cache]
    before = [
        (item["image"].clone(), len(item["image"].applied_operations), item["image"].affine.clone()) for item in cached
    ]
    boxes_before = [torch.as_tensor(item["box"]).clone() for item in cached]
    loader = dm.train_dataloader()
    for _ in range(3):  # epochs
        for batch in loader:
            batch["image"].mul_(0.0)  # a consumer writing into its batch must not reach the cache either
    for item, (image, n_ops, affine), boxes in zip(dataset._cache, before, boxes_before):
        assert isinstance(item["image"], MetaTensor)
        assert torch.equal(item["image"], image)
        assert len(item["image"].applied_operations) == n_ops
        assert torch.equal(item["image"].affine, affine)
        assert torch.equal(torch.as_tensor(item["box"]), boxes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"thick_slice_prob": 1.5}, "thick_slice_prob"), ({"thick_slice_mm": (6.0, 3.0)}, "thick_slice_mm")],
)
def test_thick_slice_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LesionDataModule(datalist="unused.json", patch_size=(32, 32, 16), **kwargs)
