"""Choosing which labelled anchors (or RoIs) contribute to the loss: the class-imbalance control.

A 3D volume has hundreds of thousands of anchors and a handful of lesions: almost every anchor is
background. Training on all of them would teach the network to say "nothing here". Samplers pick a
fixed budget per image with at most a given fraction of positives:

- :class:`BalancedSampler` — Faster R-CNN's: ``batch_size_per_image`` anchors (default 256), up to
  ``positive_fraction`` (default 0.5) positives, the rest random negatives; ignored anchors (-1)
  are never sampled.
- :class:`HardNegativeSampler` — negatives drawn from those the network currently scores highest
  (MONAI's ``HardNegativeSampler``: a pool of ``pool_size`` x the needed number of top-scoring
  negatives, sampled at random), so training concentrates on confusing background such as vessels.

Both return boolean masks ``(N,)`` of sampled positives and negatives for one image.
"""

from __future__ import annotations

from typing import Protocol

import torch
from monai.apps.detection.utils.hard_negative_sampler import HardNegativeSampler as MonaiHardNegativeSampler
from torch import Tensor


class Sampler(Protocol):
    """Anything that picks positives and negatives among labelled samples."""

    def __call__(self, labels: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``labels (N,)`` in {-1, 0, 1} (and current scores ``(N,)``) -> (positive mask, negative mask)."""
        ...


class BalancedSampler:
    """Random sampling with a cap on the positive fraction.

    Args:
        batch_size_per_image: samples per image.
        positive_fraction: maximum fraction of positives; negatives fill the rest.
        generator: optional torch generator for reproducible sampling.
    """

    def __init__(
        self,
        *,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size_per_image < 1:
            raise ValueError(f"batch_size_per_image must be >= 1, got {batch_size_per_image}")
        if not 0.0 < positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in (0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.generator = generator

    def _pick(self, mask: Tensor, count: int) -> Tensor:
        idx = torch.nonzero(mask).squeeze(1)
        out = torch.zeros_like(mask)
        if count <= 0 or idx.numel() == 0:
            return out
        perm = torch.randperm(idx.numel(), generator=self.generator, device="cpu").to(idx.device)[:count]
        out[idx[perm]] = True
        return out

    @torch.no_grad()
    def __call__(self, labels: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sample one image.

        Args:
            labels: ``(N,)`` in {-1 ignore, 0 negative, >= 1 positive}.
            scores: unused (interface of :class:`Sampler`).

        Returns:
            Boolean ``(N,)`` masks of sampled positives and sampled negatives.
        """
        positive = labels >= 1
        negative = labels == 0
        num_pos = min(int(self.batch_size_per_image * self.positive_fraction), int(positive.sum()))
        num_neg = min(self.batch_size_per_image - num_pos, int(negative.sum()))
        return self._pick(positive, num_pos), self._pick(negative, num_neg)


class HardNegativeSampler:
    """Positives at random, negatives among the currently highest-scoring background (MONAI's sampler).

    Args:
        batch_size_per_image: samples per image.
        positive_fraction: fraction of positives; MONAI draws ``max(1, num_pos) * (1/fraction - 1)`` negatives.
        min_neg: minimum number of negatives per image.
        pool_size: negatives are drawn from the ``pool_size * num_neg`` top-scoring ones.
    """

    def __init__(
        self,
        *,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        min_neg: int = 16,
        pool_size: float = 10.0,
    ) -> None:
        if not 0.0 < positive_fraction < 1.0:
            raise ValueError(f"positive_fraction must be in (0, 1), got {positive_fraction}")
        self._impl = MonaiHardNegativeSampler(
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            min_neg=min_neg,
            pool_size=pool_size,
        )

    @torch.no_grad()
    def __call__(self, labels: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sample one image.

        Args:
            labels: ``(N,)`` in {-1, 0, 1}.
            scores: ``(N,)`` current objectness probabilities (required).

        Returns:
            Boolean ``(N,)`` masks of sampled positives and sampled negatives.

        Raises:
            ValueError: without ``scores``.
        """
        if scores is None:
            raise ValueError("HardNegativeSampler needs the current objectness scores")
        pos, neg = self._impl.select_samples_per_img(labels, scores.detach().float())
        return pos.bool(), neg.bool()
