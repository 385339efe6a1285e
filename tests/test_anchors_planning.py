"""Anchor planning: coverage analysis by hand, plans never worse than the baseline, ``anchors: auto``, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import medrpn.anchors_planning as ap
from medrpn.anchors_planning import (
    analyze_anchors,
    anchors_main,
    apply_anchor_shapes,
    best_rescaled_iou,
    grid_iou,
    lesion_sizes_from_records,
    level_rule,
    plan_anchors,
    plan_for_training,
    restore_planned_anchors,
    shape_iou,
    uncovered_reason,
)
from medrpn.data.datalists import CaseRecord
from medrpn.modeling.anchors import AnchorGenerator
from medrpn.modeling.backbone import ResNetFPN
from medrpn.modeling.detector import LesionDetector

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
DEMO_SHAPES_MM = [
    [[5.0, 5.0, 5.0], [8.0, 8.0, 8.0]],
    [[12.0, 12.0, 12.0], [16.0, 16.0, 16.0]],
    [[24.0, 24.0, 24.0], [32.0, 32.0, 32.0]],
]
STRIDES = [2, 4, 8]


def _cubes(*sizes: float) -> list[list[float]]:
    return [[float(s)] * 3 for s in sizes]


# ------------------------------------------------------------------------------------------ hand-built coverage
HAND_GEN = AnchorGenerator(spatial_dims=3, shapes=[_cubes(4), _cubes(8)])  # voxels, level 0: 4^3, level 1: 8^3
HAND_LESIONS = np.array([[4, 4, 4], [6, 6, 6], [2, 2, 2], [16, 4, 4]], dtype=float)
# best shape IoUs: 4^3 -> 1 (4^3 anchor); 6^3 -> 216/512 (8^3 anchor; 64/216 with 4^3); 2^3 -> 8/64 = 0.125;
# 16x4x4 -> 64/256 = 0.25 with 4^3 (8^3: 128/(256+512-128) = 0.2)
HAND_BEST = [1.0, 216 / 512, 0.125, 0.25]


@pytest.mark.parametrize(
    ("threshold", "coverage"), [(0.4, 2 / 4), (0.5, 1 / 4), (0.43, 1 / 4), (0.2, 3 / 4), (0.125, 4 / 4)]
)
def test_hand_built_coverage(threshold: float, coverage: float) -> None:
    ids = ["cube4", "cube6", "cube2", "rod16"]
    rep = analyze_anchors(HAND_LESIONS, ids, HAND_GEN, [2, 4], [1.0, 1.0, 1.0], threshold)
    np.testing.assert_allclose(rep.best_iou, HAND_BEST)
    assert rep.best_level.tolist() == [0, 1, 0, 0]
    assert rep.coverage == pytest.approx(coverage)
    assert rep.mean_best_iou == pytest.approx(np.mean(HAND_BEST))
    assert {u.lesion_id for u in rep.uncovered} == {i for i, b in zip(ids, HAND_BEST) if b < threshold}


def test_uncovered_reasons_and_mm_conversion() -> None:
    # mm at 2 mm spacing: the same lesions as HAND_LESIONS in voxels, plus a large one (20^3 voxels)
    lesions_mm = np.concatenate([HAND_LESIONS, [[20, 20, 20]]]) * 2.0
    rep = analyze_anchors(lesions_mm, list("abcde"), HAND_GEN, [2, 4], [2.0, 2.0, 2.0], 0.5)
    np.testing.assert_allclose(rep.sizes_vox, lesions_mm / 2.0)
    assert rep.reasons == [None, "shape mismatch", "too small", "too elongated", "too large"]
    assert rep.reason_counts == {"too small": 1, "too large": 1, "too elongated": 1, "shape mismatch": 1}
    assert [u.lesion_id for u in rep.uncovered] == ["e", "c", "d", "b"]  # worst IoU first
    # at 0.4 the 6^3 cube is covered
    rep4 = analyze_anchors(lesions_mm, list("abcde"), HAND_GEN, [2, 4], [2.0, 2.0, 2.0], 0.4)
    assert rep4.reasons[1] is None
    assert rep4.coverage == pytest.approx(2 / 5)


def test_reason_definitions_are_precise() -> None:
    anchors = np.array(_cubes(4, 8))
    assert uncovered_reason([4, 3, 2], anchors, 0.5) == "too small"  # <= the smallest extent on every axis
    assert uncovered_reason([8, 9, 30], anchors, 0.5) == "too large"  # >= the largest extent on every axis
    assert uncovered_reason([2, 2, 30], anchors, 0.5) == "too elongated"
    assert uncovered_reason([5.5, 5.5, 5.5], anchors, 0.5) == "shape mismatch"
    # 2D: an h/w = 2 anchor covers an elongated lesion that squares cannot
    sq = np.array([[4.0, 4.0]])
    assert uncovered_reason([3.0, 12.0], sq, 0.5) == "too elongated"
    assert best_rescaled_iou([3.0, 12.0], np.array([[2.0, 8.0]])) == pytest.approx(1.0)


def test_grid_iou_is_the_lower_bound() -> None:
    sizes = np.array([[4.0, 4.0, 4.0], [6.0, 3.0, 5.0]])
    anchors = np.array(_cubes(4, 8))
    np.testing.assert_allclose(grid_iou(sizes, anchors, [0, 0, 0]), shape_iou(sizes, anchors))
    # a 4^3 lesion one voxel off a 4^3 anchor along every axis: 3^3 / (64 + 64 - 27)
    assert grid_iou(sizes[:1], anchors[:1], [1, 1, 1])[0, 0] == pytest.approx(27 / 101)
    assert np.all(grid_iou(sizes, anchors, [1, 2, 1]) <= shape_iou(sizes, anchors) + 1e-12)
    rep = analyze_anchors(sizes, ["a", "b"], HAND_GEN, [2, 4], [1.0] * 3, 0.5)
    assert np.all(rep.grid_iou_min <= rep.best_iou + 1e-12)


@settings(max_examples=25, deadline=None)
@given(
    size=st.lists(st.floats(0.5, 40.0), min_size=3, max_size=3),
    anchor=st.lists(st.floats(0.5, 40.0), min_size=3, max_size=3),
)
def test_best_rescaled_iou_is_exact(size: list[float], anchor: list[float]) -> None:
    exact = best_rescaled_iou(size, np.array([anchor]))
    scales = np.geomspace(1e-3, 1e3, 20001)
    dense = shape_iou(np.array([size]), scales[:, None] * np.array(anchor)[None]).max()
    assert dense <= exact + 1e-9
    assert exact <= dense + 2e-3


def test_report_outputs(tmp_path: Path) -> None:
    rep = analyze_anchors(HAND_LESIONS, ["a", "b", "c", "d"], HAND_GEN, [2, 4], [1.0] * 3, 0.5)
    md = rep.to_markdown()
    assert "| level | stride |" in md and "| c | 2×2×2 |" in md and "too elongated" in md
    data = json.loads(rep.write_json(tmp_path / "r.json").read_text())
    assert data["coverage"] == pytest.approx(0.25) and data["lesions"][2]["reason"] == "too small"
    png = rep.write_histogram(tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "r.json"]  # no temporary files left
    empty = analyze_anchors(np.zeros((0, 3)), [], HAND_GEN, [2, 4], [1.0] * 3, 0.5)
    assert np.isnan(empty.coverage) and empty.to_dict()["coverage"] is None
    empty.write_histogram(tmp_path / "empty.png")


def test_level_rule_windows() -> None:
    strides = np.array([[2.0] * 3, [4.0] * 3, [8.0] * 3])
    shapes = np.array(_cubes(1.0, 3.0, 6.0, 24.0, 48.0, 200.0))
    allowed = level_rule(shapes, strides)
    # cells at strides 2/4/8: 1 -> 0.5 (finest takes smaller); 3 -> 1.5 on level 0 only; 6 -> 3/1.5 on 0 and 1;
    # 24 -> 12/6/3 everywhere; 48 -> 24/12/6 on 1 and 2; 200 -> coarsest takes larger
    assert allowed.tolist() == [
        [True, False, False],
        [True, False, False],
        [True, True, False],
        [True, True, True],
        [False, True, True],
        [False, False, True],
    ]
    # a gap between windows (strides 1 and 100): the nearest window
    gap = level_rule(np.array([[20.0, 20.0], [100.0, 100.0]]), [1, 100])
    assert gap.tolist() == [[True, False], [False, True]]


# ------------------------------------------------------------------------------------------ planning
def _demo_baseline() -> AnchorGenerator:
    return AnchorGenerator(spatial_dims=3, shapes=DEMO_SHAPES_MM, spacing_mm=[2.0, 2.0, 2.0])


def _faster_rcnn_baseline() -> AnchorGenerator:
    return AnchorGenerator(
        spatial_dims=2,
        spacing_mm=[1.0, 1.0],
        sizes=[[4.0, 6.0, 8.0], [10.0, 14.0, 18.0], [22.0, 28.0, 36.0]],
        aspect_ratios=[0.5, 1.0, 2.0],
    )


def _score(gen: AnchorGenerator, sizes_vox: np.ndarray, spacing: list[float], thr: float) -> tuple[float, float]:
    rep = analyze_anchors(
        sizes_vox * np.array(spacing), [str(i) for i in range(len(sizes_vox))], gen, STRIDES, spacing, thr
    )
    return rep.coverage, rep.mean_best_iou


lesion_sets = st.integers(0, 2**31 - 1).flatmap(
    lambda seed: st.tuples(st.just(seed), st.integers(1, 40), st.floats(0.0, 0.6), st.floats(0.3, 3.0))
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=lesion_sets, spatial_dims=st.sampled_from([2, 3]), thr=st.sampled_from([0.3, 0.4, 0.5, 0.7]))
def test_plan_is_never_worse_than_the_baseline(
    params: tuple[int, int, float, float], spatial_dims: int, thr: float
) -> None:
    seed, n, elongation, log_median = params
    rng = np.random.default_rng(seed)
    base_size = np.exp(rng.normal(log_median, 0.8, (n, 1)))
    sizes = np.clip(base_size * np.exp(rng.normal(0.0, elongation, (n, spatial_dims))), 0.3, 200.0)
    if spatial_dims == 3:
        baseline, spacing, per_level = _demo_baseline(), [2.0, 2.0, 2.0], 2
    else:
        baseline, spacing, per_level = _faster_rcnn_baseline(), [1.0, 1.0], 9
    plan = plan_anchors(sizes, STRIDES, per_level, thr, spacing_mm=spacing, baseline=baseline)
    gen = plan.generator()
    assert gen.num_anchors_per_location() == [per_level] * 3 and gen.spacing_mm == tuple(spacing)
    cov, iou = _score(gen, sizes, spacing, thr)
    b_cov, b_iou = _score(baseline, sizes, spacing, thr)
    assert cov == pytest.approx(plan.coverage) and iou == pytest.approx(plan.mean_iou)
    assert plan.baseline_coverage == pytest.approx(b_cov)
    assert cov > b_cov or (cov == b_cov and iou >= b_iou - 1e-12)
    torch.testing.assert_close(  # mm output and voxel output agree
        torch.cat(gen.voxel_shapes()), torch.tensor(plan.shapes_vox, dtype=torch.float32).reshape(-1, spatial_dims)
    )


def test_plan_covers_what_the_baseline_misses_and_is_anisotropic() -> None:
    rng = np.random.default_rng(0)
    small = np.exp(rng.uniform(np.log(1.5), np.log(3.0), (30, 1))) * np.ones((1, 3))
    flat = np.array([[16.0, 16.0, 4.0]]) * np.exp(rng.normal(0, 0.05, (30, 3)))  # thin along z
    sizes = np.concatenate([small, flat])
    base = _demo_baseline()
    plan = plan_anchors(sizes, STRIDES, 2, 0.4, spacing_mm=[2.0, 2.0, 2.0], baseline=base)
    assert plan.baseline_coverage is not None and plan.baseline_coverage < 0.7
    assert plan.coverage == 1.0 and not plan.used_baseline
    vox = np.array([s for level in plan.shapes_vox for s in level])
    assert np.any(vox[:, 2] < 0.5 * vox[:, 0])  # a flat anchor was planned
    assert plan.shapes_mm is not None
    np.testing.assert_allclose(np.array(plan.shapes_mm).reshape(-1, 3), vox * 2.0, rtol=1e-5, atol=2e-3)
    # planned shapes respect the level rule (or are the baseline's on their own level)
    for lvl, level in enumerate(plan.shapes_vox):
        ok = level_rule(np.array(level), STRIDES)[:, lvl]
        assert ok.all()


def test_plan_returns_the_baseline_when_it_is_already_optimal() -> None:
    base = _demo_baseline()
    sizes = np.array(DEMO_SHAPES_MM).reshape(-1, 3) / 2.0  # every anchor is a lesion: IoU 1 everywhere
    plan = plan_anchors(sizes, STRIDES, 2, 0.5, spacing_mm=[2.0, 2.0, 2.0], baseline=base)
    assert plan.used_baseline and plan.coverage == 1.0 and plan.mean_iou == pytest.approx(1.0)
    assert sorted(map(tuple, np.array(plan.shapes).reshape(-1, 3).tolist())) == sorted(
        map(tuple, np.array(DEMO_SHAPES_MM).reshape(-1, 3).tolist())
    )


def test_plan_falls_back_to_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the search ends below the baseline, the baseline's exact shapes come back."""

    def worst(self: ap._Planner, slots: list[list[int]], **_: object) -> list[list[int]]:
        c = int(np.argmin(self.pool.iou.sum(axis=0)))
        return [[c] * self.A for _ in range(self.L)]

    monkeypatch.setattr(ap._Planner, "refine", worst)
    sizes = np.exp(np.random.default_rng(1).uniform(np.log(2), np.log(12), (50, 3)))
    plan = plan_anchors(sizes, STRIDES, 2, 0.4, spacing_mm=[2.0, 2.0, 2.0], baseline=_demo_baseline())
    assert plan.used_baseline
    assert plan.shapes == DEMO_SHAPES_MM
    assert plan.coverage == pytest.approx(plan.baseline_coverage)


def test_plan_without_spacing_is_in_voxels_and_budget_can_grow() -> None:
    sizes = np.exp(np.random.default_rng(2).uniform(np.log(2), np.log(20), (200, 2)))
    plan2 = plan_anchors(sizes, [[2, 2], [4, 4]], 2, 0.5)
    plan4 = plan_anchors(sizes, [[2, 2], [4, 4]], 4, 0.5)
    assert plan2.shapes_mm is None and plan2.spacing_mm is None and plan2.shapes == plan2.shapes_vox
    assert plan4.coverage >= plan2.coverage
    assert len(plan4.shapes[0]) == 4
    with pytest.raises(ValueError, match="no lesions"):
        plan_anchors(np.zeros((0, 2)), [2, 4], 2, 0.5)
    with pytest.raises(ValueError, match="positive"):
        plan_anchors(np.array([[1.0, 0.0]]), [2, 4], 2, 0.5)


def test_planning_1000_lesions_beats_the_baseline() -> None:
    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(np.log(1.5), np.log(15.0), (1000, 1))) * np.exp(rng.normal(0, 0.25, (1000, 3)))
    plan = plan_anchors(sizes, STRIDES, 2, 0.4, spacing_mm=[2.0, 2.0, 2.0], baseline=_demo_baseline())
    assert plan.baseline_coverage is not None and plan.coverage > plan.baseline_coverage


def test_yaml_snippet_parses() -> None:
    sizes = np.exp(np.random.default_rng(3).uniform(np.log(2), np.log(12), (40, 3)))
    plan = plan_anchors(sizes, STRIDES, 2, 0.4, spacing_mm=[2.0, 2.0, 2.0], baseline=_demo_baseline())
    nested = yaml.safe_load(plan.yaml_snippet())
    ag = nested["model"]["detector"]["init_args"]["anchor_generator"]
    assert ag["class_path"] == "medrpn.modeling.anchors.AnchorGenerator"
    assert ag["init_args"] == plan.init_args()
    flat = yaml.safe_load(plan.yaml_snippet(nested=False))
    assert flat == plan.init_args()
    assert AnchorGenerator(**flat).spec["shapes"] == plan.shapes


# ------------------------------------------------------------------------------------------ anchors: auto
def test_auto_generator_placeholders_and_replace_shapes() -> None:
    gen = AnchorGenerator(spatial_dims=3, shapes="auto", num_levels=3, anchors_per_location=2, spacing_mm=[2, 2, 3])
    assert gen.needs_planning and gen.num_levels == 3 and gen.num_anchors_per_location() == [2, 2, 2]
    assert gen.spec["shapes"] == "auto" and gen.spec["num_levels"] == 3 and gen.spec["anchors_per_location"] == 2
    vox = torch.cat(gen.voxel_shapes())
    torch.testing.assert_close(vox[:, 0], vox[:, 2])  # placeholders are cubes in voxels
    assert torch.all(vox[2:, 0] > vox[:-2, 0])
    rebuilt = AnchorGenerator(**gen.spec)
    assert rebuilt.needs_planning
    anchors_before, _ = gen.anchors_for([[2, 2, 2]] * 3, [[2, 2, 2], [4, 4, 4], [8, 8, 8]])
    new = [_cubes(4, 6), _cubes(10, 14), _cubes(20, 30)]
    gen.replace_shapes(new)
    assert not gen.needs_planning and gen.spec == {"spatial_dims": 3, "shapes": new, "spacing_mm": [2.0, 2.0, 3.0]}
    anchors_after, _ = gen.anchors_for([[2, 2, 2]] * 3, [[2, 2, 2], [4, 4, 4], [8, 8, 8]])
    assert not torch.equal(anchors_before, anchors_after)  # the cache was cleared
    torch.testing.assert_close(gen.voxel_shapes()[0][0], torch.tensor([2.0, 2.0, 4 / 3]))
    with pytest.raises(ValueError, match="keep 3 levels of 2"):
        gen.replace_shapes(new[:2])
    with pytest.raises(ValueError, match="keep 3 levels of 2"):
        gen.replace_shapes([_cubes(4), _cubes(10), _cubes(20)])
    with pytest.raises(ValueError, match="positive finite"):
        gen.replace_shapes([[[4.0, 4.0], [6.0, 6.0]]] * 3)
    with pytest.raises(ValueError, match="num_levels and anchors_per_location"):
        AnchorGenerator(spatial_dims=3, shapes="auto", num_levels=3)
    with pytest.raises(ValueError, match="'auto'"):
        AnchorGenerator(spatial_dims=3, shapes="automatic", num_levels=3, anchors_per_location=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="anchors_per_location=3"):
        AnchorGenerator(spatial_dims=3, shapes=[_cubes(4, 6)], anchors_per_location=3)


def _auto_detector() -> LesionDetector:
    backbone = ResNetFPN(spatial_dims=3, variant="tiny", stage_strides=(1, 2, 2, 2), return_stages=(1, 2, 3))
    gen = AnchorGenerator(spatial_dims=3, shapes="auto", num_levels=3, anchors_per_location=2, spacing_mm=[2, 2, 2])
    return LesionDetector(backbone=backbone, anchor_generator=gen, rpn_only=True)


def test_auto_round_trip_through_spec_and_checkpoint(tmp_path: Path) -> None:
    detector = _auto_detector()
    assert detector.strides == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    sizes = np.exp(np.random.default_rng(4).uniform(np.log(1.5), np.log(15), (60, 3)))
    gen = detector.rpn.anchor_generator
    plan = plan_anchors(sizes, detector.strides, 2, 0.4, spacing_mm=gen.spacing_mm, baseline=gen)
    apply_anchor_shapes(detector, plan.shapes)
    assert not gen.needs_planning and detector.spec["anchor_generator"]["shapes"] == plan.shapes
    planned = [v.clone() for v in gen.voxel_shapes()]

    rebuilt = LesionDetector.from_spec(detector.spec)
    for a, b in zip(rebuilt.rpn.anchor_generator.voxel_shapes(), planned):
        torch.testing.assert_close(a, b)

    ckpt = {"state_dict": detector.state_dict(), "medrpn_inference": {"format": 1, "detector": detector.spec}}
    torch.save(ckpt, tmp_path / "model.ckpt")
    loaded = torch.load(tmp_path / "model.ckpt", weights_only=True)
    from_ckpt = LesionDetector.from_spec(loaded["medrpn_inference"]["detector"])
    from_ckpt.load_state_dict(loaded["state_dict"])
    assert not from_ckpt.rpn.anchor_generator.needs_planning
    for a, b in zip(from_ckpt.rpn.anchor_generator.voxel_shapes(), planned):
        torch.testing.assert_close(a, b)

    # a model rebuilt from the `auto` config gets the planned anchors back from the checkpoint
    fresh = _auto_detector()
    assert restore_planned_anchors(fresh, loaded)
    for a, b in zip(fresh.rpn.anchor_generator.voxel_shapes(), planned):
        torch.testing.assert_close(a, b)
    assert not restore_planned_anchors(fresh, loaded)  # already there


def test_lesion_sizes_follow_orientation_and_2d_in_plane() -> None:
    boxes = np.array([[0.0, 0.0, 0.0, 10.0, 20.0, 30.0], [5.0, 5.0, 5.0, 6.0, 9.0, 7.0]])
    rec = CaseRecord("c0", "img.nii.gz", boxes, np.zeros(2, dtype=np.int64))
    empty = CaseRecord("c1", "img.nii.gz", np.zeros((0, 6)), np.zeros(0, dtype=np.int64))
    sizes, ids = lesion_sizes_from_records([rec, empty], 3, "RAS")
    np.testing.assert_allclose(sizes, [[10, 20, 30], [1, 4, 2]])
    assert ids == ["c0#0", "c0#1"]
    sizes_sra, _ = lesion_sizes_from_records([rec], 3, "SRA")
    np.testing.assert_allclose(sizes_sra, [[30, 10, 20], [2, 1, 4]])
    sizes_2d, _ = lesion_sizes_from_records([rec], 2, "RAS")
    np.testing.assert_allclose(sizes_2d, [[10, 20], [1, 4]])
    degenerate = CaseRecord("c2", "i", np.array([[0.0, 0, 0, 0, 1, 1]]), np.zeros(1, dtype=np.int64))
    with pytest.warns(UserWarning, match="degenerate"):
        assert lesion_sizes_from_records([degenerate], 3)[0].shape == (0, 3)


# ------------------------------------------------------------------------------------------ training + CLI
@pytest.fixture(scope="module")
def tiny_datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medrpn.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("anchors_synth")
    generate_dataset(out, cases=4, seed=3, shape=(64, 64, 32), val_fraction=0.25, write_dicom=False)
    return out / "datalist.json"


def _cli(*args: str):  # type: ignore[no-untyped-def]
    from medrpn.cli import MedrpnCLI
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.module import LesionDetectionModule

    return MedrpnCLI(
        LesionDetectionModule,
        LesionDataModule,
        run=False,
        args=["--config", str(DEMO), "--trainer.logger", "false", *args],
        parser_kwargs={"default_env": False},
    )


def test_plan_for_training_with_auto_config(tiny_datalist: Path) -> None:
    prefix = "--model.detector.init_args.anchor_generator.init_args."
    cli = _cli(
        f"--data.datalist={tiny_datalist}",
        f"{prefix}shapes=auto",
        f"{prefix}num_levels=3",
        f"{prefix}anchors_per_location=2",
    )
    module, dm = cli.model, cli.datamodule
    gen = module.detector.rpn.anchor_generator
    assert gen.needs_planning
    plan = plan_for_training(module, dm)
    assert plan is not None and not gen.needs_planning
    assert plan.num_lesions == sum(len(r.boxes) for r in dm.records("training"))
    assert plan.positive_iou == module.rpn_cfg.positive_iou == _demo_positive_iou()
    assert module.detector.spec["anchor_generator"]["shapes"] == plan.shapes == gen.spec["shapes"]
    assert plan.coverage >= (plan.baseline_coverage or 0.0)
    assert plan_for_training(module, dm) is None  # planned already


def _demo_positive_iou() -> float:
    """The RPN positive IoU configured in configs/demo.yaml (the threshold coverage is measured at)."""
    import yaml

    return float(yaml.safe_load(DEMO.read_text())["model"]["rpn_training"]["positive_iou"])


def test_cli_analyze_and_plan(tiny_datalist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "anchors"
    assert (
        anchors_main(["analyze", "--config", str(DEMO), "--data.datalist", str(tiny_datalist), "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "## Anchor coverage" in text and "| level | stride |" in text
    report = json.loads((out / "anchor_report.json").read_text())
    assert report["num_lesions"] > 0 and report["positive_iou"] == _demo_positive_iou()
    assert (out / "anchor_sizes.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "anchor_report.md").exists()

    assert anchors_main(["plan", "--config", str(DEMO), f"--data.datalist={tiny_datalist}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # the demo config plans its anchors (shapes: auto), so "before" is the auto placeholders
    assert "coverage before (configured anchors)" in text or "coverage before (auto placeholders)" in text
    assert "coverage after" in text
    snippet = out / "anchors_plan.yaml"
    assert "anchor_generator:" in text and snippet.read_text() in text
    plan = json.loads((out / "anchors_plan.json").read_text())
    assert plan["coverage"] >= plan["baseline_coverage"]
    # the snippet works as a second --config
    cli = _cli("--config", str(snippet), f"--data.datalist={tiny_datalist}")
    np.testing.assert_allclose(cli.model.detector.rpn.anchor_generator.spec["shapes"], plan["shapes_mm"], rtol=1e-6)

    assert (
        anchors_main(
            ["plan", "--config", str(DEMO), f"--data.datalist={tiny_datalist}", "--budget", "3", "--out", str(out)]
        )
        == 0
    )
    capsys.readouterr()
    plan3 = json.loads((out / "anchors_plan.json").read_text())
    assert [len(level) for level in plan3["shapes_mm"]] == [3, 3, 3]
    assert plan3["coverage"] >= plan["coverage"]


@pytest.mark.parametrize("with_baseline", [False, True])
def test_budget_beyond_the_data_is_filled_with_distinct_shapes(with_baseline: bool) -> None:
    """Slots nothing improves take the level's baseline shapes / filler cubes, never near-duplicates."""
    sizes = np.array([[3.0, 3.0, 3.0], [3.0001, 3.0, 3.0], [5.0, 5.0, 4.0]])
    baseline = _demo_baseline() if with_baseline else None
    plan = plan_anchors(sizes, STRIDES, 4, 0.5, spacing_mm=[2.0, 2.0, 2.0], baseline=baseline)
    assert plan.coverage == 1.0
    for level in plan.shapes_vox:
        assert len(level) == 4 and len({tuple(np.round(s, 2)) for s in level}) == 4
    if with_baseline:
        assert [s for s in plan.shapes[2] if s in ([24.0] * 3, [32.0] * 3)] == [[24.0] * 3, [32.0] * 3]
