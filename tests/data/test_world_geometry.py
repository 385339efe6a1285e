"""Acceptance: a synthetic case loaded from NIfTI and from DICOM gives the same array and world positions;
planted lesions map to the right voxel and back within half a voxel, for both formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Orientation

from medrpn.data.io import load_scan
from medrpn.data.synthetic import SyntheticCase, generate_case, write_case_dicom, write_case_nifti
from medrpn.geometry import voxel_to_world, world_to_voxel


@pytest.fixture(scope="module", params=[0, 2, 3])
def case_files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticCase, Path]:
    # cases 0, 2, 3 of seed 5 all have lesions; case 2 stores its DICOM slices in descending z
    case = generate_case(request.param, seed=5, shape=(64, 56, 24))
    root = tmp_path_factory.mktemp(f"case{request.param}")
    write_case_nifti(case, root / "ct.nii.gz", root / "label.nii.gz")
    write_case_dicom(case, root / "dicom")
    return case, root


def test_nifti_and_dicom_agree_after_orientation(case_files: tuple[SyntheticCase, Path]) -> None:
    _case, root = case_files
    nii = Orientation(axcodes="RAS")(load_scan(root / "ct.nii.gz"))
    dcm = Orientation(axcodes="RAS")(load_scan(root / "dicom"))
    assert nii.shape == dcm.shape
    np.testing.assert_allclose(np.asarray(nii), np.asarray(dcm), atol=0.5)  # HU (DICOM stores integers)
    np.testing.assert_allclose(np.asarray(nii.affine), np.asarray(dcm.affine), atol=1e-3)
    # far corner in world coordinates agrees too
    corner = torch.tensor([[s - 1 for s in nii.shape[1:]]], dtype=torch.float64)
    np.testing.assert_allclose(voxel_to_world(corner, nii.affine), voxel_to_world(corner, dcm.affine), atol=1e-3)


@pytest.mark.parametrize("source", ["ct.nii.gz", "dicom"])
def test_planted_lesions_land_on_their_voxels(case_files: tuple[SyntheticCase, Path], source: str) -> None:
    case, root = case_files
    assert case.lesions
    image = load_scan(root / source)
    label = np.asarray(case.label)  # (X, Y, Z) in the loader's axis order (column, row, slice)
    for lesion in case.lesions:
        centroid = torch.tensor([lesion.centroid], dtype=torch.float64)
        idx = world_to_voxel(centroid, image.affine)[0].numpy()
        # the centroid of the lesion's voxels lies inside its voxel box, and the nearest voxel carries its label
        i0, j0, k0, i1, j1, k1 = lesion.voxel_box
        assert (idx >= np.array([i0, j0, k0]) - 0.5).all() and (idx <= np.array([i1, j1, k1]) + 0.5).all()
        # world -> voxel -> world round trip
        back = voxel_to_world(torch.tensor([np.round(idx)]), image.affine)[0].numpy()
        spacing = np.asarray(case.spacing)
        assert (np.abs(back - centroid[0].numpy()) <= spacing / 2 + 1e-6).all()
        # the world box corners map onto the voxel box edges (voxel-edge convention: +-0.5 voxel)
        lo = world_to_voxel(torch.tensor([lesion.box[:3]]), image.affine)[0].numpy()
        hi = world_to_voxel(torch.tensor([lesion.box[3:]]), image.affine)[0].numpy()
        np.testing.assert_allclose(np.minimum(lo, hi), np.array([i0, j0, k0]) - 0.5, atol=1e-3)
        np.testing.assert_allclose(np.maximum(lo, hi), np.array([i1, j1, k1]) + 0.5, atol=1e-3)
        assert label[tuple(np.round(idx).astype(int))] in (0, lesion.class_id + 1)
        assert (label[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] == lesion.class_id + 1).any()
