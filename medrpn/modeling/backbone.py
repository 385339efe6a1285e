"""Backbone + feature pyramid for 2D and 3D, from MONAI blocks (no torchvision).

A ResNet-style encoder of MONAI ``UnetResBlock`` stages (conv-norm-act twice with a residual
connection; the first block of a stage may stride, per axis) feeds MONAI's
``FeaturePyramidNetwork``, which adds a top-down pathway so every returned level has
``fpn_channels`` channels. Fine levels (small stride) serve small lesions, coarse levels large ones.

Why not MONAI's ``resnet_fpn_feature_extractor``/``BackboneWithFPN``: they import torchvision,
which medrpn does not depend on.

``input_unshuffle=r`` puts MONAI's ``pixelunshuffle`` (space-to-depth, as YOLOv5's "Focus" or TResNet's stem)
in front of the first stage: every ``r x r (x r)`` block of input voxels becomes ``r^D`` channels of one voxel,
so nothing is lost, and the first stage's convolutions run on ``r^D`` times fewer voxels. A full-resolution
stage is a quarter of a 3D training step on a CPU (a 3 -> 8 -> 8-channel residual block on the
demo's 64 x 64 x 48 patches: 0.47 of 1.8 s per float32 step on a 2-core AVX2 CPU), because its few channels
keep oneDNN's kernels memory-bound.

Shapes: input ``(B, C_in, X, Y)`` in 2D or ``(B, C_in, X, Y, Z)`` in 3D; output level ``l`` is
``(B, fpn_channels, ceil(X / s_l0), ...)`` with per-axis stride ``s_l`` reported by :attr:`strides`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from monai.networks.utils import pixelunshuffle
from torch import Tensor, nn
from torch.nn import functional as F

VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "tiny": {"channels": (8, 16, 32, 48), "blocks_per_stage": (1, 1, 1, 1)},
    "small": {"channels": (16, 32, 64, 96), "blocks_per_stage": (1, 1, 2, 2)},
    "base": {"channels": (32, 64, 128, 256), "blocks_per_stage": (1, 2, 3, 3)},
    "large": {"channels": (48, 96, 192, 384), "blocks_per_stage": (2, 3, 4, 4)},
}
"""Encoder sizes: ``small`` is the CPU default; ``base``/``large`` for a GPU."""


def _per_axis(value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * spatial_dims
    if len(value) != spatial_dims:
        raise ValueError(f"expected {spatial_dims} per-axis values, got {list(value)}")
    return tuple(int(v) for v in value)


class ResNetFPN(nn.Module):
    """ResNet-style encoder with an FPN on top.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for a CT; ``2k+1`` for 2.5D slices).
        variant: encoder size, a key of :data:`VARIANTS`.
        channels: per-stage channels (overrides the variant).
        blocks_per_stage: residual blocks per stage (overrides the variant).
        stage_strides: stride of the first block of each stage, an int or a per-axis tuple (e.g.
            ``[2, 2, 1]`` to keep a coarse slice axis at full resolution).
        return_stages: stage indices whose outputs feed the FPN (each becomes one level).
        fpn_channels: channels of every FPN level.
        norm: MONAI norm name, e.g. ``"instance"``, ``"batch"`` or ``["group", {"num_groups": 8}]``.
        input_unshuffle: space-to-depth factor applied to the input before the first stage (1: none; 2: the
            first stage sees ``in_channels * 2^D`` channels at half resolution, and every stride doubles). An input
            size that is not a multiple of it is zero-padded at the far end first (no shift of the voxel grid;
            the grid is ``ceil(size / r)``, as after a strided convolution).
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int = 1,
        variant: str = "small",
        channels: Sequence[int] | None = None,
        blocks_per_stage: Sequence[int] | None = None,
        stage_strides: Sequence[int | Sequence[int]] = (2, 2, 2, 2),
        return_stages: Sequence[int] = (1, 2, 3),
        fpn_channels: int = 64,
        norm: str | tuple | list = "instance",
        input_unshuffle: int = 1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown backbone variant {variant!r}; choose from {sorted(VARIANTS)}")
        chans = tuple(channels) if channels is not None else VARIANTS[variant]["channels"]
        blocks = tuple(blocks_per_stage) if blocks_per_stage is not None else VARIANTS[variant]["blocks_per_stage"]
        if not (len(chans) == len(blocks) == len(stage_strides)):
            raise ValueError(
                f"channels ({len(chans)}), blocks_per_stage ({len(blocks)}) and stage_strides "
                f"({len(stage_strides)}) need one entry per stage"
            )
        if not return_stages or any(not 0 <= s < len(chans) for s in return_stages):
            raise ValueError(f"return_stages must index the {len(chans)} stages, got {list(return_stages)}")
        if input_unshuffle < 1:
            raise ValueError(f"input_unshuffle must be a positive integer, got {input_unshuffle}")
        norm_name = tuple(norm) if isinstance(norm, list) else norm
        self.spec: dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "in_channels": in_channels,
            "variant": variant,
            "channels": list(chans),
            "blocks_per_stage": list(blocks),
            "stage_strides": [s if isinstance(s, int) else list(s) for s in stage_strides],
            "return_stages": list(return_stages),
            "fpn_channels": fpn_channels,
            "norm": list(norm) if isinstance(norm, tuple | list) else norm,
            "input_unshuffle": input_unshuffle,
        }
        """Plain-data constructor arguments (rebuild with ``ResNetFPN(**spec)``; stored in checkpoints)."""
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.return_stages = tuple(int(s) for s in return_stages)
        self.input_unshuffle = input_unshuffle
        self.stages = nn.ModuleList()
        cum = (input_unshuffle,) * spatial_dims
        self._stage_strides: list[tuple[int, ...]] = []
        prev = in_channels * input_unshuffle**spatial_dims
        for c, n, s in zip(chans, blocks, stage_strides):
            stride = _per_axis(s, spatial_dims)
            layers = [UnetResBlock(spatial_dims, prev, c, kernel_size=3, stride=stride, norm_name=norm_name)]
            layers += [
                UnetResBlock(spatial_dims, c, c, kernel_size=3, stride=1, norm_name=norm_name) for _ in range(n - 1)
            ]
            self.stages.append(nn.Sequential(*layers))
            cum = tuple(a * b for a, b in zip(cum, stride))
            self._stage_strides.append(cum)
            prev = c
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=spatial_dims,
            in_channels_list=[chans[s] for s in self.return_stages],
            out_channels=fpn_channels,
        )
        self.out_channels = fpn_channels

    @property
    def strides(self) -> list[tuple[int, ...]]:
        """Per returned level, the per-axis stride with respect to the input."""
        return [self._stage_strides[s] for s in self.return_stages]

    @property
    def num_levels(self) -> int:
        """Number of FPN levels returned."""
        return len(self.return_stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Encode and build the pyramid.

        Args:
            x: ``(B, C_in, X, Y)`` in 2D or ``(B, C_in, X, Y, Z)`` in 3D.

        Returns:
            Per level ``(B, fpn_channels, *grid_l)``, finest first.
        """
        if (r := self.input_unshuffle) > 1:
            pad = [(-n) % r for n in x.shape[2:]]
            if any(pad):  # F.pad lists the last axis first: (before, after) pairs
                x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])
            x = pixelunshuffle(x, self.spatial_dims, r)
        feats: OrderedDict[str, Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.return_stages:
                feats[str(i)] = x
        return list(self.fpn(feats).values())
