"""Review PNGs (radiological display, boxes on the right voxels) and the batch index.html."""

from __future__ import annotations

import html
import re
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medrpn.geometry import voxel_to_world
from medrpn.overlays.images import (
    IndexScan,
    canonical_grid,
    index_entries,
    view_plane,
    write_index_html,
    write_review_images,
)
from medrpn.overlays.nifti import write_nifti_overlays
from medrpn.overlays.slicer import write_slicer_markups
from medrpn.overlays.tables import write_proposals_json
from tests.overlays.test_tables import (
    AFFINE_RAS_2D,
    AFFINE_RAS_3D,
    RANGES_3D,
    SCORES_3D,
    SHAPE_2D,
    SHAPE_3D,
    make_result_2d,
    make_result_3d,
    ranges_by_rank,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _ct(shape: tuple[int, ...]) -> np.ndarray:
    img = np.full(shape, -800.0, dtype=np.float32)
    for rr in RANGES_3D:
        img[tuple(slice(a, b + 1) for a, b in rr)] = 40.0
    return img


def _world_grid(affine_ras: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``(*shape, D)`` LPS coordinates of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, len(shape))
    return voxel_to_world(idx.astype(float), affine_ras).numpy().reshape(*shape, len(shape))


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_review_images_3d(tmp_path: Path) -> None:
    res = make_result_3d()
    out = write_review_images(res, _ct(SHAPE_3D), tmp_path)
    names = [im.path.name for im in out]
    assert names == [f"finding_0{r}_{v}.png" for r in (1, 2, 3) for v in ("axial", "coronal", "sagittal")]
    for im in out:
        assert im.path.parent == tmp_path
        _assert_png(im.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporaries
    # a rerun with fewer findings removes the stale PNGs; a channel dim is accepted
    out2 = write_review_images(res, _ct(SHAPE_3D)[None], tmp_path, top_k=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(im.path.name for im in out2)
    assert len(out2) == 3
    with pytest.raises(ValueError, match="shape"):
        write_review_images(res, np.zeros((4, 4, 4)), tmp_path)


def test_review_images_2d(tmp_path: Path) -> None:
    res = make_result_2d()
    image = np.random.default_rng(0).normal(0, 50, SHAPE_2D).astype(np.float32)
    out = write_review_images(res, image, tmp_path, window=None)
    assert [im.path.name for im in out] == ["finding_01_image.png", "finding_02_image.png"]
    assert [im.view for im in out] == ["image", "image"]
    for im in out:
        _assert_png(im.path)


def test_radiological_orientation_and_aspect() -> None:
    """Axial: patient's right (smaller LPS x) left, anterior (smaller LPS y) top; coronal/sagittal: superior top."""
    world = _world_grid(AFFINE_RAS_3D, SHAPE_3D)
    grid_x = canonical_grid(world[..., 0], AFFINE_RAS_3D)
    grid_y = canonical_grid(world[..., 1], AFFINE_RAS_3D)
    grid_z = canonical_grid(world[..., 2], AFFINE_RAS_3D)
    assert np.allclose(grid_x.spacing, [0.7, 0.9, 2.5])
    box = make_result_3d().findings[0].box

    def shown(grid, view):  # displayed pixels with row 0 at the top of the picture
        p = view_plane(grid, box, view)
        return p, (p.pixels if p.origin == "upper" else p.pixels[::-1])

    p, x = shown(grid_x, "axial")
    _, y = shown(grid_y, "axial")
    assert np.all(np.diff(x, axis=1) > 0)  # left -> right = patient's right -> left
    assert np.all(np.diff(y, axis=0) > 0)  # top -> bottom = anterior -> posterior
    assert p.aspect == pytest.approx(0.9 / 0.7)
    p, x = shown(grid_x, "coronal")
    _, z = shown(grid_z, "coronal")
    assert np.all(np.diff(x, axis=1) > 0) and np.all(np.diff(z, axis=0) < 0)  # superior at the top
    assert p.aspect == pytest.approx(2.5 / 0.7)
    p, y = shown(grid_y, "sagittal")
    _, z = shown(grid_z, "sagittal")
    assert np.all(np.diff(y, axis=1) > 0) and np.all(np.diff(z, axis=0) < 0)  # anterior left, superior top
    assert p.aspect == pytest.approx(2.5 / 0.9)


def test_box_drawn_on_its_voxels_and_crop() -> None:
    res = make_result_3d()
    (i0, i1), (j0, j1), (k0, k1) = ranges_by_rank(RANGES_3D, SCORES_3D)[1]
    grid = canonical_grid(_ct(SHAPE_3D), AFFINE_RAS_3D)
    n_j = SHAPE_3D[1]
    # source axis 1 is flipped in the display grid: voxel j -> n_j - 1 - j
    p = view_plane(grid, res.findings[0].box, "axial")
    assert p.box == pytest.approx((i0, n_j - 1 - j1, i1 + 1, n_j - j0))
    assert p.slice_index == (k0 + k1 + 1) // 2
    h0, v0, h1, v1 = p.crop
    assert (h1 - h0) * 0.7 >= min(40.0, SHAPE_3D[0] * 0.7) - 1e-6
    assert (v1 - v0) * 0.9 >= min(40.0, SHAPE_3D[1] * 0.9) - 1e-6
    assert h0 <= i0 and h1 >= i1 + 1
    # the box interior of the displayed crop holds the lesion's HU
    e = p.extent
    cols = np.arange(e[0], e[1]) + 0.5
    rows = np.arange(e[3], e[2]) + 0.5  # origin upper: top = smaller index
    inside = (cols[None, :] > p.box[0]) & (cols[None, :] < p.box[2])
    inside = inside & (rows[:, None] > p.box[1]) & (rows[:, None] < p.box[3])
    assert np.all(p.pixels[inside] == 40.0)
    # 2D
    g2 = canonical_grid(np.zeros(SHAPE_2D, np.float32), AFFINE_RAS_2D)
    p2 = view_plane(g2, make_result_2d().findings[1].box, "image")
    assert p2.box == pytest.approx((5, 20, 15, 30)) and p2.slice_index == -1


def _batch(tmp_path: Path) -> tuple[Path, list[IndexScan]]:
    root = tmp_path / "out"
    evil = make_result_3d("<script>alert(1)</script>")
    evil.findings = evil.findings[:2]
    r3, r2 = make_result_3d("1.2.840.99.3"), make_result_2d("chest_01")
    for folder, res, image in (
        (root / "scan_a", evil, _ct(SHAPE_3D)),
        (root / "sub dir" / "scan#b", r3, _ct(SHAPE_3D)),
        (root / "scan_c", r2, np.zeros(SHAPE_2D, np.float32)),
    ):
        write_review_images(res, image, folder, top_k=2)
        write_nifti_overlays(res, folder)
        write_slicer_markups(res, folder)
        write_proposals_json(res, folder)
    return root, index_entries(root)


def test_index_html(tmp_path: Path) -> None:
    root, entries = _batch(tmp_path)
    assert len(entries) == 3
    failures = [("in/bad <b>scan</b>", 'no pixel data & "<img src=x onerror=alert(1)>"')]
    path = write_index_html(root, entries, root / "index.html", failures=failures)
    text = path.read_text()
    # escaping: no live markup from data
    assert "<script>" not in text and "<b>scan</b>" not in text and "<img src=x" not in text
    assert html.escape("<script>alert(1)</script>") in text
    assert html.escape('"<img src=x onerror=alert(1)>"') in text
    # findings sorted by score across the batch
    table = text.split('id="findings"')[1].split("</table>")[0]
    scores = [float(s) for s in re.findall(r'<tr><td class="num">\d+</td><td class="num">([0-9.]+)</td>', table)]
    assert len(scores) == 2 + 3 + 2
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(0.93)
    # every link is relative and exists; the PNGs and proposals are linked
    links = re.findall(r'(?:href|src)="([^"#][^"]*)"', text)
    assert links
    for link in links:
        rel = urllib.parse.unquote(html.unescape(link))
        assert not rel.startswith("/") and "://" not in rel
        assert (path.parent / rel).is_file(), rel
    targets = {urllib.parse.unquote(html.unescape(link)) for link in links}
    assert "sub dir/scan#b/finding_01_sagittal.png" in targets
    assert "scan_c/finding_02_image.png" in targets
    assert "scan_a/proposals.json" in targets and "scan_a/findings.mrk.json" in targets
    assert "in/bad" in text.split('id="failures"')[1]
    # a moved output folder still works: links do not depend on absolute paths
    assert str(tmp_path) not in text


def test_index_html_empty(tmp_path: Path) -> None:
    path = write_index_html(tmp_path, index_entries(tmp_path), tmp_path / "index.html")
    text = path.read_text()
    assert "no findings" in text and "no scans" in text and "None." in text
