"""Whole-scan epoch metrics of the LightningModule (:func:`medrpn.module.evaluate_scans`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medrpn.module import DIAMETER_BANDS_MM, evaluate_scans


def _box(c: tuple[float, float, float], d: float) -> list[float]:
    return [c[0] - d / 2, c[1] - d / 2, c[2] - d / 2, c[0] + d / 2, c[1] + d / 2, c[2] + d / 2]


def _outputs() -> list[dict[str, object]]:
    """Scan a: a 4 mm lesion (found at 0.6, below an FP of scan b at 0.8) and a 12 mm lesion (found at 0.95).

    Scan b: no lesion, one FP at 0.8.
    """
    gt_a = np.array([_box((0, 0, 0), 4.0), _box((40, 0, 0), 12.0)])
    det_a = np.array([_box((40, 0, 0), 11.0), _box((0.5, 0, 0), 4.0)])
    return [
        {
            "case_id": "a",
            "boxes": det_a,
            "scores": np.array([0.95, 0.6]),
            "labels": np.array([0, 0]),
            "proposals": det_a,
            "gt": gt_a,
            "gt_labels": np.array([0, 0]),
        },
        {
            "case_id": "b",
            "boxes": np.array([_box((0, 0, 0), 5.0)]),
            "scores": np.array([0.8]),
            "labels": np.array([0]),
            "proposals": np.array([_box((0, 0, 0), 5.0)]),
            "gt": np.zeros((0, 6)),
            "gt_labels": np.zeros((0,), dtype=np.int64),
        },
    ]


def test_evaluate_scans_reports_interval_and_diameter_bands() -> None:
    m = evaluate_scans(_outputs(), ["solid", "ground-glass"], (1, 10))
    assert m.froc is not None and m.cpm_interval is not None
    # overall: 12 mm at 0.95 (1/2 sens at 0 FP), 0.8 FP (1/2 FP/scan), 4 mm at 0.6 -> 0.5 at 1/8, 1/4; 1 from 1/2
    np.testing.assert_allclose(m.froc.sensitivities, [0.5, 0.5, 1, 1, 1, 1, 1])
    assert m.scalars["cpm"] == pytest.approx(6 / 7)
    assert m.scalars["cpm_ci_low"] <= m.scalars["cpm"] <= m.scalars["cpm_ci_high"]
    assert [b.num_lesions for b in m.diameter_bands] == [1, 0, 1]
    assert len(m.diameter_bands) == len(DIAMETER_BANDS_MM) - 1
    small, mid, large = m.diameter_bands
    assert small.froc is not None and large.froc is not None and mid.froc is None
    assert small.froc.cpm == pytest.approx(5 / 7)  # 0 at 1/8 and 1/4 (after the FP), 1 from 1/2 FP/scan
    assert large.froc.cpm == pytest.approx(1.0)
    text = m.report("held-out")
    assert "95% CI" in text
    assert "< 5 mm: 0.714  (1 lesions)" in text
    assert "5-10 mm:    -  (0 lesions)" in text


def test_evaluate_scans_without_lesions_has_no_froc() -> None:
    outs = [_outputs()[1]]
    m = evaluate_scans(outs, ["solid"], (1,))
    assert m.froc is None and m.cpm_interval is None and m.diameter_bands == []


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("lesion_map", [False, True])
def test_compute_losses_names_every_term_and_the_lesion_map_loss_trains_it(spatial_dims: int, lesion_map: bool) -> None:
    import torch

    from medrpn.modeling.anchors import AnchorGenerator
    from medrpn.modeling.backbone import ResNetFPN
    from medrpn.modeling.detector import HeadConfig, LesionDetector, RPNConfig
    from medrpn.module import LesionDetectionModule, LesionMapTrainingConfig

    d = spatial_dims
    torch.manual_seed(0)
    det = LesionDetector(
        backbone=ResNetFPN(spatial_dims=d, variant="tiny", return_stages=(1, 2), fpn_channels=8),
        anchor_generator=AnchorGenerator(spatial_dims=d, shapes=[[[6.0] * d], [[12.0] * d]], spacing_mm=[2.0] * d),
        num_classes=1,
        rpn=RPNConfig(pre_nms_top_k_train=50, post_nms_top_k_train=20),
        head=HeadConfig(roi_size=3, representation_size=16),
        lesion_map=lesion_map,
    )
    module = LesionDetectionModule(
        detector=det, class_names=["lesion"], lesion_map_training=LesionMapTrainingConfig(weight=2.0)
    )
    batch = {
        "image": torch.randn(2, 1, *([32] * d)),
        "box": [torch.tensor([[8.0] * d + [14.0] * d]), torch.zeros(0, 2 * d)],
        "label": [torch.tensor([0]), torch.zeros(0, dtype=torch.long)],
    }
    terms = module.compute_losses(batch)
    expected = {"loss_rpn_objectness", "loss_rpn_box", "loss_head_class", "loss_head_box", "loss"}
    assert set(terms) == expected | ({"loss_lesion_map"} if lesion_map else set())
    assert torch.isfinite(terms["loss"])
    torch.testing.assert_close(terms["loss"], sum(v for k, v in terms.items() if k != "loss"))
    if lesion_map:
        terms["loss_lesion_map"].backward()
        assert det.lesion_map_head is not None
        assert det.lesion_map_head.weight.grad is not None and det.lesion_map_head.weight.grad.abs().sum() > 0
        # the dense loss reaches the shared backbone, which is its purpose
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in det.backbone.parameters())


def test_lesion_map_training_config_is_checked() -> None:
    from medrpn.module import LesionMapTrainingConfig

    with pytest.raises(ValueError, match="loss must be one of"):
        LesionMapTrainingConfig(loss="dice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        LesionMapTrainingConfig(weight=-1.0)


def test_rpn_training_min_positives_reaches_the_matcher() -> None:
    from medrpn.modeling.anchors import AnchorGenerator
    from medrpn.modeling.backbone import ResNetFPN
    from medrpn.modeling.detector import LesionDetector
    from medrpn.module import LesionDetectionModule, RPNTrainingConfig
    from medrpn.training.matching import IoUMatcher

    det = LesionDetector(
        backbone=ResNetFPN(spatial_dims=3, variant="tiny", return_stages=(1,), fpn_channels=8),
        anchor_generator=AnchorGenerator(spatial_dims=3, shapes=[[[6.0] * 3]], spacing_mm=[2.0] * 3),
        num_classes=1,
    )
    rpn_training = RPNTrainingConfig(positive_iou=0.2, negative_iou=0.05, min_positives_per_box=6)
    module = LesionDetectionModule(detector=det, class_names=["lesion"], rpn_training=rpn_training)
    matcher = module.rpn_loss.matcher
    assert isinstance(matcher, IoUMatcher)
    assert (matcher.min_positives_per_box, matcher.positive_threshold) == (6, 0.2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_input_channels_of_data_and_backbone_must_agree(spatial_dims: int, tmp_path: Path) -> None:
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.modeling.anchors import AnchorGenerator
    from medrpn.modeling.backbone import ResNetFPN
    from medrpn.modeling.detector import LesionDetector
    from medrpn.module import check_input_channels

    d = spatial_dims
    det = LesionDetector(
        backbone=ResNetFPN(spatial_dims=d, in_channels=3, variant="tiny", return_stages=(1, 2), fpn_channels=8),
        anchor_generator=AnchorGenerator(spatial_dims=d, shapes=[[[6.0] * d], [[12.0] * d]], spacing_mm=[2.0] * d),
        num_classes=1,
    )
    patch = [32] * d
    matching = {"hessian_sigmas_mm": [1.0, 2.0]} if d == 3 else {"slice_context": 1}
    dm = LesionDataModule(datalist=str(tmp_path / "unused.json"), spatial_dims=d, patch_size=patch, **matching)
    assert dm.in_channels == 3
    check_input_channels(det, dm)
    check_input_channels(det, None)  # no datamodule (a plain dataloader): nothing to check
    plain = LesionDataModule(datalist=str(tmp_path / "unused.json"), spatial_dims=d, patch_size=patch)
    with pytest.raises(ValueError, match="in_channels=1"):
        check_input_channels(det, plain)
    with pytest.raises(ValueError, match="hessian_sigmas_mm must be positive"):
        LesionDataModule(datalist="unused.json", spatial_dims=d, patch_size=patch, hessian_sigmas_mm=[0.0])
