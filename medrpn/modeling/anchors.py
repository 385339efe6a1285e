"""Fixed anchor boxes over FPN levels, in 2D and 3D, specified in millimetres or voxels.

Anchors are constants of the model, never learned: the network predicts offsets relative to them.

An anchor set is given per FPN level, either

- as **scales x aspect ratios** (MONAI's/torchvision's form): ``sizes[l]`` lists the edge lengths of
  the square/cube of equal area/volume, and every ratio reshapes each size at constant area/volume.
  2D ratios are ``h / w`` (extent along axis 1 over axis 0); 3D ratios are pairs ``(h / w, d / w)``,
  exactly MONAI's ``AnchorGenerator`` convention. The 2D default is the Faster R-CNN set of
  3 scales x 3 ratios (0.5, 1, 2) = 9 anchors per cell; or
- as explicit **per-axis shapes**: ``shapes[l]`` is a list of ``D``-tuples of extents, which is the
  natural form for anisotropic 3D lesions (e.g. ``[12, 12, 8]`` mm).

With ``spacing_mm`` set, sizes and shapes are millimetres and are divided per axis by the voxel
spacing of the network input, so anisotropic spacing gives the right voxel extents; without it they
are voxels.

**Where anchor centres sit.** In medrpn's voxel-edge image convention (voxel ``i`` spans ``[i, i+1)``,
see :mod:`medrpn.geometry`), the feature-map cell ``c`` of a level with stride ``s`` covers input
voxels ``[c*s, (c+1)*s)`` and its anchors are centred at ``(c + 0.5) * s`` — the centre of the cell's
receptive field. (MONAI >= 1.6 puts them at ``c*s + s // 2``: identical for even strides, half a voxel
off for stride 1 and odd strides.)

Why subclass instead of using MONAI's ``AnchorGenerator`` as is: it rounds anchor corners to whole
voxels (a 5-voxel anchor becomes 4 wide) and takes sizes in voxels only; medrpn keeps exact
fractional extents, which matters for small lesions at coarse spacing, and converts millimetres.
It stays a MONAI ``AnchorGenerator`` (same ``cell_anchors``, ``num_anchors_per_location``,
``grid_anchors`` and anchor order), so MONAI utilities that take one accept it.

**Anchors planned from the data** (``shapes: auto``): with ``shapes="auto"`` plus ``num_levels`` and
``anchors_per_location``, the generator starts with placeholder shapes (a geometric progression of cubes,
see :func:`placeholder_shapes`) so the detector and its shared RPN head can be built before the data is
read, and reports :attr:`AnchorGenerator.needs_planning`. :func:`medrpn.anchors_planning.plan_for_training`
then plans shapes from the training boxes and installs them with :meth:`AnchorGenerator.replace_shapes`,
which also rewrites :attr:`AnchorGenerator.spec` to the explicit shapes, so checkpoints store the planned
anchors and a model rebuilt from the spec gets them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from monai.apps.detection.utils.anchor_utils import AnchorGenerator as MonaiAnchorGenerator
from torch import Tensor, nn

FASTER_RCNN_ASPECT_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)
"""The Faster R-CNN paper's ratios (h / w)."""


def anchor_shapes_from_scales(
    sizes: Sequence[float], aspect_ratios: Sequence[float] | Sequence[Sequence[float]], spatial_dims: int
) -> list[list[float]]:
    """Per-axis anchor extents from scales x aspect ratios (MONAI's convention, unrounded).

    Anchors are ordered ratio-major, size-minor, as in MONAI's ``AnchorGenerator.generate_anchors``.

    Args:
        sizes: edge lengths of the equal-area square (2D) or equal-volume cube (3D).
        aspect_ratios: 2D: floats ``h / w``; 3D: pairs ``(h / w, d / w)``.
        spatial_dims: 2 or 3.

    Returns:
        ``len(aspect_ratios) * len(sizes)`` lists of ``spatial_dims`` extents.

    Raises:
        ValueError: when the ratios do not fit ``spatial_dims`` or a value is not positive.
    """
    shapes: list[list[float]] = []
    for ratio in aspect_ratios:
        if spatial_dims == 2:
            if isinstance(ratio, Sequence):
                raise ValueError(f"2D aspect ratios are floats (h / w), got {ratio!r}")
            r = float(ratio)
            if r <= 0:
                raise ValueError(f"aspect ratios must be positive, got {r}")
            factors = [1.0 / r**0.5, r**0.5]
        else:
            if not isinstance(ratio, Sequence) or len(ratio) != 2:
                raise ValueError(f"3D aspect ratios are pairs (h / w, d / w), got {ratio!r}")
            rh, rd = float(ratio[0]), float(ratio[1])
            if rh <= 0 or rd <= 0:
                raise ValueError(f"aspect ratios must be positive, got {ratio!r}")
            area = (rh * rd) ** (1.0 / 3.0)
            factors = [1.0 / area, rh / area, rd / area]
        for size in sizes:
            if size <= 0:
                raise ValueError(f"anchor sizes must be positive, got {size}")
            shapes.append([f * float(size) for f in factors])
    return shapes


AUTO_SHAPES = "auto"
"""The ``shapes`` value that asks for anchors planned from the training data."""


def placeholder_shapes(
    num_levels: int, anchors_per_location: int, spatial_dims: int, spacing_mm: Sequence[float] | None = None
) -> list[list[list[float]]]:
    """Placeholder anchors of an ``auto`` generator: cubes in voxels, a geometric progression over levels.

    Anchor ``j`` of level ``l`` is a cube of ``4 * 2 ** (l + j / anchors_per_location)`` voxels (so levels
    double like the usual FPN strides), expressed in millimetres when ``spacing_mm`` is given.

    Args:
        num_levels: FPN levels ``L``.
        anchors_per_location: anchors per cell ``A``.
        spatial_dims: 2 or 3.
        spacing_mm: voxel spacing per axis, or None for voxel units.

    Returns:
        ``L`` lists of ``A`` lists of ``spatial_dims`` extents.
    """
    scale = [1.0] * spatial_dims if spacing_mm is None else [float(s) for s in spacing_mm]
    return [
        [[4.0 * 2.0 ** (level + j / anchors_per_location) * s for s in scale] for j in range(anchors_per_location)]
        for level in range(num_levels)
    ]


class AnchorGenerator(MonaiAnchorGenerator):
    """Anchor boxes for every cell of every FPN level.

    Args:
        spatial_dims: 2 or 3.
        sizes: per level, the scales (see module docstring). Ignored when ``shapes`` is given.
        aspect_ratios: shared by all levels: 2D floats ``h / w``, 3D pairs ``(h / w, d / w)``.
        shapes: per level, explicit per-axis extents (overrides ``sizes``/``aspect_ratios``); or ``"auto"``:
            placeholder shapes until :meth:`replace_shapes` installs shapes planned from the data.
        spacing_mm: voxel spacing of the network input per axis; when set, sizes/shapes are in mm.
        num_levels: number of FPN levels; required with ``shapes="auto"``, otherwise checked if given.
        anchors_per_location: anchors per cell; required with ``shapes="auto"``, otherwise checked if given.

    Every level must have the same number of anchors per cell (the RPN head is shared by all levels).

    Example:
        >>> gen = AnchorGenerator(spatial_dims=2, sizes=[[32.0, 64.0, 128.0]])
        >>> gen.num_anchors_per_location()
        [9]
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 2,
        sizes: Sequence[Sequence[float]] | None = ((32.0, 64.0, 128.0),),
        aspect_ratios: Sequence[float] | Sequence[Sequence[float]] | None = FASTER_RCNN_ASPECT_RATIOS,
        shapes: Sequence[Sequence[Sequence[float]]] | Literal["auto"] | None = None,
        spacing_mm: Sequence[float] | None = None,
        num_levels: int | None = None,
        anchors_per_location: int | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.indexing = "ij"
        if spacing_mm is not None and (len(spacing_mm) != spatial_dims or any(s <= 0 for s in spacing_mm)):
            raise ValueError(f"spacing_mm needs {spatial_dims} positive values, got {list(spacing_mm)}")
        self.spacing_mm = None if spacing_mm is None else tuple(float(s) for s in spacing_mm)

        auto = isinstance(shapes, str)
        if auto:
            if shapes != AUTO_SHAPES:
                raise ValueError(f"shapes must be per-level lists of extents or {AUTO_SHAPES!r}, got {shapes!r}")
            if num_levels is None or anchors_per_location is None or num_levels < 1 or anchors_per_location < 1:
                raise ValueError(
                    f"shapes={AUTO_SHAPES!r} needs positive num_levels and anchors_per_location, got "
                    f"num_levels={num_levels}, anchors_per_location={anchors_per_location}"
                )
            level_shapes = placeholder_shapes(num_levels, anchors_per_location, spatial_dims, self.spacing_mm)
        elif shapes is not None:
            level_shapes = [[[float(v) for v in shape] for shape in level] for level in shapes]
        elif sizes is not None:
            if aspect_ratios is None:
                aspect_ratios = FASTER_RCNN_ASPECT_RATIOS if spatial_dims == 2 else ((1.0, 1.0),)
            level_shapes = [anchor_shapes_from_scales(level, aspect_ratios, spatial_dims) for level in sizes]
        else:
            raise ValueError("give anchor `sizes` (with `aspect_ratios`) or explicit `shapes`")
        if not level_shapes or any(len(level) == 0 for level in level_shapes):
            raise ValueError("every FPN level needs at least one anchor")
        for level in level_shapes:
            for shape in level:
                if len(shape) != spatial_dims or any(v <= 0 for v in shape):
                    raise ValueError(f"anchor shape {shape} must have {spatial_dims} positive extents")
        if len({len(level) for level in level_shapes}) != 1:
            raise ValueError(
                "every FPN level needs the same number of anchors per cell (the RPN head is shared), got "
                f"{[len(level) for level in level_shapes]}"
            )
        if num_levels is not None and num_levels != len(level_shapes):
            raise ValueError(f"num_levels={num_levels} but the anchor shapes define {len(level_shapes)} levels")
        if anchors_per_location is not None and anchors_per_location != len(level_shapes[0]):
            raise ValueError(
                f"anchors_per_location={anchors_per_location} but the anchor shapes have {len(level_shapes[0])} "
                "anchors per cell"
            )
        self.shapes_mm_or_vox = level_shapes
        self.needs_planning = auto
        """True while the shapes are ``auto`` placeholders (until :meth:`replace_shapes`)."""
        self.spec: dict[str, Any] = {
            "spatial_dims": spatial_dims,
            "shapes": level_shapes,
            "spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
        }
        """Plain-data constructor arguments (explicit shapes, or ``"auto"`` before planning; stored in checkpoints)."""
        if auto:
            self.spec.update(shapes=AUTO_SHAPES, num_levels=num_levels, anchors_per_location=anchors_per_location)
        self.cell_anchors = [self._cell_anchors(level) for level in level_shapes]
        self._cache: dict[tuple, tuple[Tensor, list[int]]] = {}

    def replace_shapes(self, shapes_mm_or_vox: Sequence[Sequence[Sequence[float]]]) -> None:
        """Swap the fixed anchors for new ones with the same levels and anchors per cell (e.g. planned ones).

        The new shapes are in the generator's units (mm when ``spacing_mm`` is set, else voxels).
        :attr:`spec` becomes the explicit shapes and :attr:`needs_planning` False, so checkpoints store the
        new anchors and a generator rebuilt from the spec has them. Objects that copied :attr:`spec`
        earlier (e.g. ``LesionDetector.spec``) must be refreshed by the caller
        (:func:`medrpn.anchors_planning.apply_anchor_shapes` does it for a detector).

        Args:
            shapes_mm_or_vox: ``num_levels`` lists of ``A`` lists of ``spatial_dims`` positive extents.

        Raises:
            ValueError: when the number of levels, of anchors per level or of extents differs, or an extent
                is not positive and finite.
        """
        level_shapes = [[[float(v) for v in shape] for shape in level] for level in shapes_mm_or_vox]
        count = len(self.shapes_mm_or_vox[0])
        if len(level_shapes) != self.num_levels or any(len(level) != count for level in level_shapes):
            raise ValueError(
                f"replacement anchors must keep {self.num_levels} levels of {count} anchors each, got "
                f"{[len(level) for level in level_shapes]}"
            )
        for level in level_shapes:
            for shape in level:
                if len(shape) != self.spatial_dims or not all(0 < v < float("inf") for v in shape):
                    raise ValueError(f"anchor shape {shape} must have {self.spatial_dims} positive finite extents")
        device = self.cell_anchors[0].device
        self.shapes_mm_or_vox = level_shapes
        self.cell_anchors = [self._cell_anchors(level).to(device) for level in level_shapes]
        self._cache.clear()
        self.needs_planning = False
        self.spec = {
            "spatial_dims": self.spatial_dims,
            "shapes": [[list(shape) for shape in level] for level in level_shapes],
            "spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
        }

    @property
    def num_levels(self) -> int:
        """Number of FPN levels the anchors are defined for."""
        return len(self.cell_anchors)

    def voxel_shapes(self) -> list[Tensor]:
        """Per level, ``(A, D)`` anchor extents in voxels of the network input."""
        return [c[:, self.spatial_dims :] - c[:, : self.spatial_dims] for c in self.cell_anchors]

    def _cell_anchors(self, level: Sequence[Sequence[float]]) -> Tensor:
        extents = torch.tensor(level, dtype=torch.float32)
        if self.spacing_mm is not None:
            extents = extents / torch.tensor(self.spacing_mm, dtype=torch.float32)
        half = extents / 2.0
        return torch.cat([-half, half], dim=1)  # (A, 2*D), zero-centred, not rounded

    def grid_anchors(self, grid_sizes: list[list[int]], strides: list[list[Tensor]]) -> list[Tensor]:
        """Anchors of every level, cell-major and anchor-minor (MONAI's order).

        Args:
            grid_sizes: per level, the ``D`` feature-map sizes.
            strides: per level, the ``D`` strides (ints or 0-dim tensors).

        Returns:
            Per level ``(prod(grid) * A, 2*D)`` float anchors in image coordinates, centred at
            ``(c + 0.5) * stride``.
        """
        if not (len(grid_sizes) == len(strides) == len(self.cell_anchors)):
            raise ValueError(
                f"anchors are defined for {len(self.cell_anchors)} FPN levels, got {len(grid_sizes)} feature maps"
            )
        out = []
        for size, stride, base in zip(grid_sizes, strides, self.cell_anchors):
            centres = [
                (torch.arange(int(size[a]), dtype=torch.float32, device=base.device) + 0.5) * float(stride[a])
                for a in range(self.spatial_dims)
            ]
            mesh = torch.meshgrid(centres, indexing="ij")
            shifts = torch.stack([m.reshape(-1) for m in mesh] * 2, dim=1)  # (G, 2*D)
            out.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 2 * self.spatial_dims))
        return out

    def anchors_for(
        self,
        grid_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, list[int]]:
        """All anchors of an image, concatenated over levels (cached per grid).

        Args:
            grid_sizes: per level, the ``D`` feature-map sizes.
            strides: per level, the ``D`` integer strides of the level relative to the input.
            device: device of the result.
            dtype: dtype of the result.

        Returns:
            ``(N, 2*D)`` anchors and the number of anchors per level.
        """
        key = (tuple(map(tuple, grid_sizes)), tuple(map(tuple, strides)), str(device), dtype)
        if key not in self._cache:
            self.set_cell_anchors(torch.float32, torch.device(device))
            per_level = self.grid_anchors(
                [list(map(int, g)) for g in grid_sizes], [[torch.tensor(s) for s in st] for st in strides]
            )
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[key] = (torch.cat(per_level).to(dtype), [int(p.shape[0]) for p in per_level])
        anchors, counts = self._cache[key]
        return anchors, list(counts)
