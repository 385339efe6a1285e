"""Whole-scan tiling and merging with an oracle detector that boxes bright regions.

The oracle returns, for every patch/slice it is given, the voxel-edge bounding box of each connected
bright region — exactly what a perfect detector would. So the tests check only the tiling: offsets,
border handling, NMS across patches and slice linking.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pytest
import torch
from scipy import ndimage

from medrpn.inference.whole_scan import WholeScanConfig, _link_slices, detect_slices, detect_volume
from medrpn.modeling.structures import Detections, Proposals, RPNOutput


class BrightRegionDetector:
    """Stands in for LesionDetector: one detection per connected bright region of each input."""

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims
        self.rpn = SimpleNamespace(num_anchors=1)
        self.head = None
        self.calls = 0

    def eval(self) -> BrightRegionDetector:
        return self

    def features_and_proposals(self, images: torch.Tensor) -> tuple[list[torch.Tensor], RPNOutput]:
        self.calls += 1
        d = self.spatial_dims
        props = []
        for img in images:
            centre = img[img.shape[0] // 2].numpy()
            comps, _ = ndimage.label(centre > 0.5)
            boxes = [[s.start for s in sl] + [s.stop for s in sl] for sl in ndimage.find_objects(comps)]
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 2 * d)
            props.append(Proposals(b, torch.full((len(b),), 0.9), torch.zeros(len(b), dtype=torch.long)))
        n = int(np.prod(images.shape[2:]))
        out = RPNOutput(
            anchors=torch.zeros(n, 2 * d),
            num_anchors_per_level=[n],
            objectness_logits=torch.zeros(images.shape[0], n, 1),
            deltas=torch.zeros(images.shape[0], n, 2 * d),
            proposals=props,
            image_shape=tuple(images.shape[2:]),
        )
        return [torch.zeros(images.shape[0], 1, *images.shape[2:])], out

    def forward_from(
        self, features: list[torch.Tensor], out: RPNOutput, images: torch.Tensor | None = None
    ) -> list[Detections]:
        return [
            Detections(p.boxes, p.scores, torch.zeros(len(p), dtype=torch.long), p.scores[:, None], p.scores)
            for p in out.proposals
        ]


def _volume(cubes: list[tuple[int, int, int, int, int, int]], shape=(60, 50, 30)) -> torch.Tensor:  # type: ignore[no-untyped-def]
    v = torch.zeros(1, 1, *shape)
    for c in cubes:
        v[0, 0, c[0] : c[3], c[1] : c[4], c[2] : c[5]] = 1.0
    return v


@pytest.mark.parametrize(
    "cube",
    [
        (5, 5, 5, 10, 9, 8),  # inside the first patch only
        (28, 20, 10, 36, 27, 17),  # across the border between patches along x and y
        (50, 40, 22, 58, 48, 29),  # near the far corner (last patches are aligned to the end)
    ],
)
def test_sliding_window_finds_each_region_once_at_its_volume_coordinates(cube: tuple[int, ...]) -> None:
    det = BrightRegionDetector(3)
    result = detect_volume(det, _volume([cube]), WholeScanConfig(patch_size=(32, 32, 20), overlap=0.5))  # type: ignore[arg-type]
    assert det.calls > 1  # it really tiled
    np.testing.assert_allclose(result.detections.boxes.numpy(), [cube])
    assert len(result.proposals) == 1


def test_volume_smaller_than_the_patch_is_padded() -> None:
    det = BrightRegionDetector(3)
    cube = (3, 4, 2, 7, 9, 5)
    result = detect_volume(det, _volume([cube], shape=(20, 18, 10)), WholeScanConfig(patch_size=(32, 32, 20)))  # type: ignore[arg-type]
    np.testing.assert_allclose(result.detections.boxes.numpy(), [cube])


def test_flip_tta_boxes_come_back_unflipped() -> None:
    det = BrightRegionDetector(3)
    cube = (10, 12, 4, 17, 20, 9)
    cfg = WholeScanConfig(patch_size=(60, 50, 30), flip_tta=True)
    result = detect_volume(det, _volume([cube]), cfg)  # type: ignore[arg-type]
    np.testing.assert_allclose(result.detections.boxes.numpy(), [cube])  # three passes, merged to one box


class CornerArtefactDetector(BrightRegionDetector):
    """Also reports a confident box at the input's first corner: after unflipping, each view puts it elsewhere."""

    def forward_from(
        self, features: list[torch.Tensor], out: RPNOutput, images: torch.Tensor | None = None
    ) -> list[Detections]:
        dets = super().forward_from(features, out, images)
        corner = torch.tensor([[0.0] * self.spatial_dims + [4.0] * self.spatial_dims])
        one = torch.ones(1)
        return [
            Detections(
                torch.cat([corner, d.boxes]),
                torch.cat([0.95 * one, d.scores]),
                torch.cat([torch.zeros(1, dtype=torch.long), d.labels]),
                torch.cat([0.95 * one[:, None], d.class_probs]),
                torch.cat([0.95 * one, d.objectness]),
            )
            for d in dets
        ]


@pytest.mark.parametrize(("merge", "cube_first"), [("mean", True), ("max", False)])
def test_flip_fusion_by_mean_sinks_a_view_dependent_artefact(merge: Literal["max", "mean"], cube_first: bool) -> None:
    cube = (10, 12, 4, 17, 20, 9)
    cfg = WholeScanConfig(patch_size=(60, 50, 30), flip_tta=True, flip_merge=merge)
    result = detect_volume(CornerArtefactDetector(3), _volume([cube]), cfg)  # type: ignore[arg-type]
    top = result.detections.boxes[0].numpy()
    assert np.allclose(top, cube) == cube_first
    if merge == "mean":
        # the cube is seen by all three views (0.9 each); each unflipped artefact copy by one view only
        np.testing.assert_allclose(result.detections.scores.numpy(), [0.9, 0.95 / 3, 0.95 / 3, 0.95 / 3], rtol=1e-5)


def test_flip_tta_along_the_slice_axis_too() -> None:
    det = BrightRegionDetector(3)
    cube = (10, 12, 4, 17, 20, 9)
    cfg = WholeScanConfig(patch_size=(60, 50, 30), flip_tta=True, flip_axes=(0, 1, 2))
    result = detect_volume(det, _volume([cube]), cfg)  # type: ignore[arg-type]
    assert det.calls == 4
    np.testing.assert_allclose(result.detections.boxes.numpy(), [cube])
    np.testing.assert_allclose(result.detections.scores.numpy(), [0.9], rtol=1e-6)  # all four views agree


def test_flip_axes_are_checked() -> None:
    for bad in [(), (0, 0), (3,)]:
        with pytest.raises(ValueError, match="flip_axes"):
            WholeScanConfig(flip_axes=bad)
    cfg = WholeScanConfig(slice_batch=4, flip_tta=True, flip_axes=(0, 2))
    with pytest.raises(ValueError, match="2D model input"):
        detect_slices(BrightRegionDetector(2), _volume([]), cfg)  # type: ignore[arg-type]


def test_slice_detections_are_linked_into_3d_findings() -> None:
    det = BrightRegionDetector(2)
    cubes = [(5, 5, 3, 12, 10, 9), (30, 30, 15, 40, 44, 18)]
    result = detect_slices(det, _volume(cubes), WholeScanConfig(slice_batch=7), context=1)  # type: ignore[arg-type]
    got = sorted(result.detections.boxes.numpy().tolist())
    np.testing.assert_allclose(got, sorted([list(c) for c in cubes]))


def _slice_dets(boxes: list[list[float]], scores: list[float]) -> Detections:
    s = torch.tensor(scores, dtype=torch.float32)
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), s, torch.zeros(len(s), dtype=torch.long), s[:, None], s
    )


def test_noisy_or_ranks_a_finding_seen_on_several_slices_above_a_one_slice_look_alike() -> None:
    empty = _slice_dets([], [])
    # finding A on slices 0-2 (p = 0.6 each), look-alike B on slice 5 only (p = 0.9)
    per_slice = [_slice_dets([[0, 0, 10, 10]], [0.6])] * 3 + [empty, empty, _slice_dets([[30, 30, 40, 40]], [0.9])]
    by_max = _link_slices(per_slice, 0.3, slice_score="max")
    by_or = _link_slices(per_slice, 0.3, slice_score="noisy_or", top_k=3)
    by_or2 = _link_slices(per_slice, 0.3, slice_score="noisy_or", top_k=2)
    np.testing.assert_allclose(by_max.boxes.numpy(), [[0, 0, 0, 10, 10, 3], [30, 30, 5, 40, 40, 6]])
    np.testing.assert_allclose(by_max.scores.numpy(), [0.6, 0.9], rtol=1e-6)
    np.testing.assert_allclose(by_or.scores.numpy(), [1 - 0.4**3, 0.9], rtol=1e-6)
    np.testing.assert_allclose(by_or2.scores.numpy(), [1 - 0.4**2, 0.9], rtol=1e-6)


def test_noisy_or_keeps_near_certain_findings_apart() -> None:
    # float32 would round both to 1.0; three confident slices must still outrank two
    p = 1.0 - 1e-4
    per_slice = [_slice_dets([[0, 0, 10, 10], [30, 30, 40, 40]], [p, p])] * 2 + [_slice_dets([[0, 0, 10, 10]], [p])]
    linked = _link_slices(per_slice, 0.3, slice_score="noisy_or", top_k=3)
    assert linked.scores.dtype == torch.float64
    assert float(linked.scores[0]) > float(linked.scores[1]) > 0.9999


def test_whole_scan_config_rejects_an_unknown_slice_score() -> None:
    unknown: Any = "mean"  # not a valid Literal: the dataclass must reject it at run time
    with pytest.raises(ValueError, match="slice_score"):
        WholeScanConfig(slice_score=unknown)
    with pytest.raises(ValueError, match="slice_score_top_k"):
        WholeScanConfig(slice_score_top_k=0)
