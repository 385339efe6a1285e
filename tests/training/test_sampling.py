"""Balanced and hard-negative sampling."""

from __future__ import annotations

import pytest
import torch

from medrpn.training.sampling import BalancedSampler, HardNegativeSampler


def test_balanced_caps_positives_and_fills_with_negatives() -> None:
    labels = torch.tensor([1] * 300 + [0] * 1000 + [-1] * 50)
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
    assert int(pos.sum()) == 128 and int(neg.sum()) == 128
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert not (pos & neg).any()


def test_balanced_with_few_positives_takes_them_all() -> None:
    labels = torch.tensor([1] * 3 + [0] * 1000 + [-1] * 10)
    pos, neg = BalancedSampler(batch_size_per_image=256, positive_fraction=0.5)(labels)
    assert int(pos.sum()) == 3 and int(neg.sum()) == 253
    assert not neg[-10:].any()  # ignored anchors are never sampled


def test_balanced_without_anything() -> None:
    labels = torch.full((20,), -1)
    pos, neg = BalancedSampler()(labels)
    assert not pos.any() and not neg.any()


def test_balanced_is_reproducible_with_a_generator() -> None:
    labels = torch.tensor([1] * 50 + [0] * 500)
    a = BalancedSampler(batch_size_per_image=32, generator=torch.Generator().manual_seed(3))(labels)
    b = BalancedSampler(batch_size_per_image=32, generator=torch.Generator().manual_seed(3))(labels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hard_negatives_come_from_the_top_scores() -> None:
    labels = torch.tensor([1] * 2 + [0] * 1000)
    scores = torch.zeros(1002)
    scores[500:520] = 0.9  # the hard negatives
    pos, neg = HardNegativeSampler(batch_size_per_image=8, positive_fraction=0.5, min_neg=1, pool_size=1.0)(
        labels, scores
    )
    assert int(pos.sum()) == 2
    idx = torch.nonzero(neg).squeeze(1)
    assert len(idx) == 2 and ((idx >= 500) & (idx < 520)).all()


def test_hard_negative_needs_scores() -> None:
    with pytest.raises(ValueError, match="scores"):
        HardNegativeSampler()(torch.tensor([1, 0]))


def test_invalid_fraction() -> None:
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedSampler(positive_fraction=0.0)
