"""Boxes follow the image through spacing, orientation, flip, crop, rotation and zoom.

Each test plants a bright cube at known voxels, gives its world box, runs the transform, and checks
the box against a hand-computed expectation and against where the cube went.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.apps.detection.transforms.dictionary import RandFlipBoxd, RandRotateBox90d, RandZoomBoxd
from monai.data import MetaTensor

from medrpn.data.transforms import (
    BoxOutsideImageError,
    HessianFeaturesd,
    RandCropBoxesd,
    RandSliceSampled,
    RandThickSlicesd,
    WorldBoxToImaged,
    hessian_channels,
    preprocessing,
    simulate_thick_slices,
    slice_with_context,
    train_augmentation,
)
from medrpn.geometry import image_to_world_boxes


def _lps_to_ras(lps: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _volume(
    shape=(20, 18, 16),
    spacing=(1.0, 1.0, 1.0),
    origin=(-10.0, 20.0, 5.0),
    flips=(1, 1, 1),
    cube=((4, 8), (6, 9), (3, 7)),
):  # type: ignore[no-untyped-def]
    arr = torch.zeros((1, *shape))
    arr[0, cube[0][0] : cube[0][1], cube[1][0] : cube[1][1], cube[2][0] : cube[2][1]] = 1.0
    lps = np.eye(4)
    for a in range(3):
        lps[a, a] = spacing[a] * flips[a]
        lps[a, 3] = origin[a]
    img = MetaTensor(arr, affine=torch.as_tensor(_lps_to_ras(lps)), meta={"filename_or_obj": "planted.nii.gz"})
    vox_box = torch.tensor(
        [[cube[0][0], cube[1][0], cube[2][0], cube[0][1], cube[1][1], cube[2][1]]], dtype=torch.float64
    )
    world = image_to_world_boxes(vox_box, img.affine).numpy()
    return img, world


def _cube_box(image: torch.Tensor, thr: float = 0.5) -> np.ndarray:
    """Voxel-edge bounding box of the bright voxels."""
    idx = np.argwhere(np.asarray(image[0]) > thr)
    return np.concatenate([idx.min(0), idx.max(0) + 1]).astype(float)


def _item(img: MetaTensor, world: np.ndarray) -> dict:
    return {"image": img, "box": world.astype(np.float32), "label": np.array([1])}


def test_world_box_to_image_hand_computed() -> None:
    # 2 mm voxels, x axis flipped (+i towards the patient's right): voxels 4..7 along i
    img, world = _volume(spacing=(2.0, 1.0, 3.0), flips=(-1, 1, 1))
    out = WorldBoxToImaged("box", "label", "image")(_item(img, world))
    np.testing.assert_allclose(out["box"].numpy(), [[4, 6, 3, 8, 9, 7]], atol=1e-4)
    assert out["label"].tolist() == [1]


def test_spacing_and_orientation_move_the_box_with_the_cube() -> None:
    img, world = _volume(spacing=(1.0, 1.0, 1.0), flips=(1, -1, 1))
    pre = preprocessing(spacing_mm=(2.0, 2.0, 2.0), intensity="none", orientation="RAS", load=False)
    out = pre(_item(img, world))
    box = out["box"].numpy()[0]
    # RAS orientation flips the LPS-stored x (and un-flips y); 2 mm voxels halve the extents: 4x3x4 -> 2x1.5x2
    np.testing.assert_allclose(box[3:] - box[:3], [2.0, 1.5, 2.0], atol=1e-4)
    # the resampled cube (bilinear) lies within the box widened by one voxel
    cube = _cube_box(out["image"], thr=0.25)
    assert (cube[:3] >= np.floor(box[:3]) - 1).all() and (cube[3:] <= np.ceil(box[3:]) + 1).all()
    # and the box maps back to the original world box exactly
    np.testing.assert_allclose(image_to_world_boxes(box[None], out["image"].affine).numpy(), world, atol=1e-4)


def test_flip_hand_computed() -> None:
    img, world = _volume()
    d = WorldBoxToImaged("box", "label", "image")(_item(img, world))
    out = RandFlipBoxd("image", "box", "image", prob=1.0, spatial_axis=0)(d)
    # width 20: [4, 8) -> [20 - 8, 20 - 4) = [12, 16)
    np.testing.assert_allclose(out["box"].numpy()[0], [12, 6, 3, 16, 9, 7])
    np.testing.assert_allclose(_cube_box(out["image"]), [12, 6, 3, 16, 9, 7])


def test_rot90_hand_computed() -> None:
    img, world = _volume()
    d = WorldBoxToImaged("box", "label", "image")(_item(img, world))
    t = RandRotateBox90d("image", "box", "image", prob=1.0, max_k=1, spatial_axes=(0, 1))
    out = t(d)
    np.testing.assert_allclose(out["box"].numpy()[0], _cube_box(out["image"]), atol=1e-4)
    # a 90-degree turn in the (x, y) plane swaps the extents along x and y: 4 x 3 -> 3 x 4
    b = out["box"].numpy()[0]
    np.testing.assert_allclose(b[3:] - b[:3], [3, 4, 4])


def test_zoom_scales_the_box_with_the_cube() -> None:
    img, world = _volume(shape=(24, 24, 16), cube=((8, 16), (8, 16), (4, 12)))
    d = WorldBoxToImaged("box", "label", "image")(_item(img, world))
    out = RandZoomBoxd("image", "box", "image", prob=1.0, min_zoom=1.5, max_zoom=1.5, keep_size=False, mode="nearest")(
        d
    )
    np.testing.assert_allclose(out["box"].numpy()[0], [12, 12, 6, 24, 24, 18], atol=1e-4)  # coordinates x 1.5
    np.testing.assert_allclose(_cube_box(out["image"]), [12, 12, 6, 24, 24, 18], atol=1.0)


def test_crop_patches_contain_the_box_where_the_cube_is() -> None:
    img, world = _volume(shape=(40, 40, 20), cube=((20, 24), (10, 13), (5, 9)))
    d = WorldBoxToImaged("box", "label", "image")(_item(img, world))
    crop = RandCropBoxesd((16, 16, 12), num_samples=4, positive_fraction=1.0)
    crop.set_random_state(0)
    patches = crop(d)
    assert isinstance(patches, list) and len(patches) == 4
    for p in patches:
        assert p["image"].shape[1:] == (16, 16, 12)
        assert len(p["box"]) == 1  # positive patches contain the whole box
        np.testing.assert_allclose(p["box"].numpy()[0], _cube_box(p["image"]))


@pytest.mark.parametrize("with_lesion", [True, False])
def test_crops_are_private_copies_of_the_scan(with_lesion: bool) -> None:
    # the training cache hands its scans to the crop without copying them (copy_cache=False)
    img, world = _volume(shape=(40, 40, 20), cube=((20, 24), (10, 13), (5, 9)))
    d = WorldBoxToImaged("box", "label", "image")(_item(img, world))
    if not with_lesion:
        d = {**d, "box": torch.zeros(0, 6), "label": torch.zeros(0, dtype=torch.long)}
    scan = d["image"].clone()
    for p in RandCropBoxesd((16, 16, 12), num_samples=3, positive_fraction=1.0)(d):
        assert p["image"].untyped_storage().data_ptr() != d["image"].untyped_storage().data_ptr()
        p["image"].fill_(-7.0)
    assert torch.equal(d["image"], scan)


def test_scans_without_lesions_give_random_patches() -> None:
    img, _ = _volume(shape=(30, 30, 20))
    d = {"image": img, "box": torch.zeros(0, 6), "label": torch.zeros(0, dtype=torch.long)}
    patches = RandCropBoxesd((16, 16, 12), num_samples=2, positive_fraction=0.5)(d)
    assert [p["image"].shape[1:] for p in patches] == [(16, 16, 12)] * 2


def test_slices_carry_in_plane_boxes_and_context_channels() -> None:
    img, world = _volume(shape=(20, 18, 16), cube=((4, 8), (6, 9), (3, 7)))
    d = WorldBoxToImaged("box", "label", "image")(_item(img, world))
    t = RandSliceSampled(num_samples=6, positive_fraction=1.0, context=1)
    t.set_random_state(1)
    for s in t(d):
        assert s["image"].shape == (3, 20, 18)
        assert 3 <= s["slice_index"] < 7  # only slices the cube crosses
        np.testing.assert_allclose(s["box"].numpy()[0], [4, 6, 8, 9])
        assert float(s["image"][1].max()) == 1.0  # the centre channel is the sampled slice


def test_box_outside_the_image_names_the_scan() -> None:
    img, world = _volume()
    world = world + np.array([500.0, 0, 0, 500.0, 0, 0])
    with pytest.raises(BoxOutsideImageError, match=r"planted\.nii\.gz: box .* lies entirely outside the image"):
        WorldBoxToImaged("box", "label", "image")(_item(img, world))


def test_hessian_channels_follow_the_image_and_its_spacing() -> None:
    img, _ = _volume(shape=(24, 24, 12), spacing=(1.0, 1.0, 2.0), cube=((10, 14), (10, 14), (5, 7)))
    out = HessianFeaturesd("image", sigmas_mm=[1.5], gain=5.0)({"image": img})["image"]
    assert isinstance(out, MetaTensor) and out.shape == (3, 24, 24, 12)
    torch.testing.assert_close(out.affine, img.affine)
    torch.testing.assert_close(out[:1], img.as_tensor())  # the image is kept as channel 0
    dot, line = out[1], out[2]
    assert (dot >= 0).all() and (line >= 0).all() and float(dot.max()) <= 10.0
    # a 4 x 4 x 4 mm cube (2 slices at 2 mm) is a blob: the dot response peaks at its centre
    peak = np.unravel_index(int(dot.argmax()), dot.shape)
    assert 11 <= peak[0] <= 12 and 11 <= peak[1] <= 12 and 5 <= peak[2] <= 6
    # flipping the image flips the channels (shape responses do not depend on the direction of an axis)
    flipped = HessianFeaturesd("image", sigmas_mm=[1.5], gain=5.0)(
        {"image": MetaTensor(img.flip(1), affine=img.affine)}
    )
    torch.testing.assert_close(flipped["image"][1:].flip(1), out[1:], atol=1e-5, rtol=1e-5)


def test_hessian_channels_of_a_2d_image_and_argument_checks() -> None:
    arr = torch.zeros(1, 32, 32)
    arr[0, 14:18, 14:18] = 1.0
    out = HessianFeaturesd("image", sigmas_mm=[1.0, 2.0])({"image": MetaTensor(arr, affine=torch.eye(3))})["image"]
    assert out.shape == (3, 32, 32) and float(out[1, 15:17, 15:17].min()) > 0
    with pytest.raises(ValueError, match="sigmas"):
        HessianFeaturesd("image", sigmas_mm=[])
    with pytest.raises(ValueError, match="gain"):
        HessianFeaturesd("image", sigmas_mm=[1.0], gain=0.0)


def test_preprocessing_appends_hessian_channels_and_slices_keep_them() -> None:
    img, world = _volume(shape=(20, 18, 16), cube=((4, 8), (6, 9), (3, 7)))
    d = preprocessing(spacing_mm=None, intensity="none", orientation=None, load=False, hessian_sigmas_mm=[1.0])(
        _item(img, world)
    )
    assert d["image"].shape == (3, 20, 18, 16)
    np.testing.assert_allclose(d["box"].numpy()[0], [4, 6, 3, 8, 9, 7])
    x = slice_with_context(torch.as_tensor(d["image"]), 5, 1)
    assert x.shape == (5, 20, 18)  # slices 4, 5, 6 of the image, then dot and line of slice 5
    torch.testing.assert_close(x[:3], torch.as_tensor(d["image"])[0, ..., 4:7].permute(2, 0, 1))
    torch.testing.assert_close(x[3:], torch.as_tensor(d["image"])[1:, ..., 5])
    t = RandSliceSampled(num_samples=2, positive_fraction=1.0, context=1)
    t.set_random_state(0)
    assert all(s["image"].shape == (5, 20, 18) for s in t(d))


def test_thick_slices_hand_computed() -> None:
    """Thickness 2, phase 0: slabs centred on z = 0, 2, 4... average [c - 1, c + 1] (half of each edge voxel)."""
    x = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    # slab(2) = (0.5 * 0 + 1 + 0.5 * 1) / 2 = 0.75, slab(4) = (0.5 * 1 + 0 + 0) / 2 = 0.25, the others 0
    expected = torch.tensor([[0.0, 0.375, 0.75, 0.5, 0.25, 0.125, 0.0]])
    torch.testing.assert_close(simulate_thick_slices(x, 2.0, 0.0), expected)
    torch.testing.assert_close(simulate_thick_slices(x, 1.0, 0.0), x)  # one-voxel slabs on the voxels
    with pytest.raises(ValueError, match="thickness"):
        simulate_thick_slices(x, 0.5)


@settings(max_examples=40, deadline=None)
@given(st.floats(1.0, 6.0), st.floats(0.0, 0.999), st.integers(8, 40))
def test_thick_slices_keep_constants_and_lose_peak_contrast(thickness: float, phase: float, z: int) -> None:
    const = torch.full((2, 3, z), 7.0)
    torch.testing.assert_close(simulate_thick_slices(const, thickness, phase), const)
    spike = torch.zeros(1, z)
    spike[0, z // 2] = 1.0
    out = simulate_thick_slices(spike, thickness, phase)
    assert out.shape == spike.shape and out.dtype == spike.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 / thickness + 1e-5  # a slab holds 1/t of it


def _patch(spacing: float = 1.5) -> tuple[MetaTensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    img = torch.rand((1, 16, 16, 12), generator=gen)
    img[0, 6:9, 6:9, 5:7] += 2.0  # a small bright blob
    affine = torch.diag(torch.tensor([spacing, spacing, spacing, 1.0], dtype=torch.float64))
    feats = hessian_channels(img[0], (1.0, 2.0), [spacing] * 3)
    return MetaTensor(torch.cat([img, feats]), affine=affine), torch.tensor([[5.0, 5.0, 4.0, 10.0, 10.0, 8.0]])


def test_rand_thick_slices_blurs_z_and_recomputes_the_hessian_channels() -> None:
    img, box = _patch()
    t = RandThickSlicesd("image", prob=1.0, thickness_mm=(4.5, 4.5), hessian_sigmas_mm=(1.0, 2.0))
    t.set_random_state(3)
    out = t({"image": img, "box": box.clone()})
    new = torch.as_tensor(out["image"])
    assert new.shape == img.shape and isinstance(out["image"], MetaTensor)
    torch.testing.assert_close(out["box"], box)  # the lesion stays where it is
    expected0 = simulate_thick_slices(torch.as_tensor(img)[0], 3.0, t._phase)
    torch.testing.assert_close(new[0], expected0)
    torch.testing.assert_close(new[1:], hessian_channels(expected0, (1.0, 2.0), [1.5] * 3))
    assert float(new[0, 6:9, 6:9, 5:7].mean()) < float(torch.as_tensor(img)[0, 6:9, 6:9, 5:7].mean())
    torch.testing.assert_close(
        torch.as_tensor(img)[1:], hessian_channels(torch.as_tensor(img)[0], (1.0, 2.0), [1.5] * 3)
    )


def test_rand_thick_slices_leaves_thin_or_undrawn_patches_alone() -> None:
    img, _ = _patch(spacing=5.0)
    thin = RandThickSlicesd("image", prob=1.0, thickness_mm=(3.0, 4.0), hessian_sigmas_mm=(1.0, 2.0))
    torch.testing.assert_close(torch.as_tensor(thin({"image": img})["image"]), torch.as_tensor(img))
    off = RandThickSlicesd("image", prob=0.0)
    torch.testing.assert_close(torch.as_tensor(off({"image": img})["image"]), torch.as_tensor(img))
    with pytest.raises(ValueError, match="thickness_mm"):
        RandThickSlicesd("image", prob=0.5, thickness_mm=(4.0, 3.0))
    with pytest.raises(ValueError, match="prob"):
        RandThickSlicesd("image", prob=1.5)


def test_train_augmentation_places_thick_slices_after_the_crop() -> None:
    names = [type(t).__name__ for t in train_augmentation(spatial_dims=3, patch_size=(8, 8, 8)).transforms]
    assert "RandThickSlicesd" not in names
    names = [
        type(t).__name__
        for t in train_augmentation(spatial_dims=3, patch_size=(8, 8, 8), thick_slice_prob=0.3).transforms
    ]
    assert names.index("RandThickSlicesd") == names.index("RandCropBoxesd") + 1
