"""Tests for :mod:`medrpn.ops.hessian`: closed-form eigenvalues, exact Hessians of polynomials, ball vs tube."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medrpn.ops.hessian import gaussian_derivative_kernels, hessian, hessian_shape_filters, symmetric_eigvalsh


def _grid(dims: int, n: int = 31) -> list[torch.Tensor]:
    axes = [torch.arange(n, dtype=torch.float64) - n // 2] * dims
    return list(torch.meshgrid(*axes, indexing="ij"))


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.7])
def test_kernels_are_exact_on_constants_ramps_and_parabolas(sigma: float) -> None:
    g, g1, g2 = gaussian_derivative_kernels(sigma)
    x = torch.arange(g.numel(), dtype=torch.float64) - (g.numel() - 1) // 2
    assert g.sum().item() == pytest.approx(1.0)
    assert (g1 * x).sum().item() == pytest.approx(1.0)  # correlating f(x) = x gives f' = 1
    assert g1.sum().item() == pytest.approx(0.0, abs=1e-12)
    assert g2.sum().item() == pytest.approx(0.0, abs=1e-12)  # constants have no curvature
    assert (g2 * x**2 / 2).sum().item() == pytest.approx(1.0)  # f = x^2 / 2 has f'' = 1
    assert (g2 * x).sum().item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_derivative_kernels(0.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_hessian_of_a_quadratic_is_its_coefficient_matrix(dims: int) -> None:
    coeffs = torch.tensor([[1.0, 0.5, -0.25], [0.5, 4.0, 0.75], [-0.25, 0.75, -2.0]], dtype=torch.float64)[:dims, :dims]
    x = _grid(dims)
    f = sum(0.5 * coeffs[i, j] * x[i] * x[j] for i in range(dims) for j in range(dims))
    h = hessian(f, [1.5, 0.8, 2.0][:dims])  # anisotropic smoothing does not change a quadratic's curvature
    centre = tuple([15] * dims)
    torch.testing.assert_close(h[centre], coeffs, atol=1e-9, rtol=0)
    assert h.shape == (*f.shape, dims, dims)


@pytest.mark.parametrize("dims", [2, 3])
def test_closed_form_eigenvalues_match_torch_on_hand_built_cases(dims: int) -> None:
    cases = [
        torch.eye(dims, dtype=torch.float64) * 3.0,  # triple root: p = 0
        torch.zeros(dims, dims, dtype=torch.float64),
        torch.diag(torch.tensor([-2.0, 5.0, 1.0][:dims], dtype=torch.float64)),
        torch.diag(torch.tensor([1.0, 1.0, -4.0][:dims], dtype=torch.float64)),  # double root
    ]
    for m in cases:  # repeated roots: acos costs about sqrt(eps) of accuracy
        torch.testing.assert_close(symmetric_eigvalsh(m), torch.linalg.eigvalsh(m), atol=1e-7, rtol=0)


def test_closed_form_eigenvalues_of_tiny_matrices_are_finite() -> None:
    # det(A - qI) / p^3 was 0 / 0 = nan once p^3 underflows (found by the property below); float32 Hessians of
    # nearly flat regions reach such entries much sooner than float64
    base = [[1.0, 2.0, 0.0], [2.0, 3.0, 0.5], [0.0, 0.5, 1.0]]
    for dtype, scales in ((torch.float64, (1e-110, 1e-160, 1e-200, 1e-310)), (torch.float32, (1e-14, 1e-20, 1e-40))):
        for scale in scales:
            m = torch.tensor(base, dtype=dtype) * scale
            got = symmetric_eigvalsh(m)
            assert torch.isfinite(got).all(), (dtype, scale, got)
            torch.testing.assert_close(got, torch.linalg.eigvalsh(m), atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    dims=st.sampled_from([2, 3]),
    values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=6, max_size=6),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_closed_form_eigenvalues_match_torch(dims: int, values: list[float], scale: float) -> None:
    m = torch.zeros(dims, dims, dtype=torch.float64)
    it = iter(values)
    for i in range(dims):
        for j in range(i, dims):
            m[i, j] = m[j, i] = next(it) * scale
    expected = torch.linalg.eigvalsh(m)
    got = symmetric_eigvalsh(m)
    tol = 1e-6 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)


def test_eigenvalues_reject_other_sizes() -> None:
    with pytest.raises(ValueError, match="2x2 or 3x3"):
        symmetric_eigvalsh(torch.zeros(4, 4))


@pytest.mark.parametrize("dims", [2, 3])
def test_dot_answers_on_balls_and_line_on_tubes(dims: int) -> None:
    x = _grid(dims)
    r2 = sum(c**2 for c in x)
    ball = (r2 <= 2.5**2).double() * 100.0
    tube = ((sum(c**2 for c in x[:-1])) <= 2.5**2).double() * 100.0  # along the last axis
    centre = tuple([15] * dims)
    spacing = [1.0] * dims
    ball_dot, ball_line = hessian_shape_filters(ball, [1.0, 1.5, 2.0], spacing)
    tube_dot, tube_line = hessian_shape_filters(tube, [1.0, 1.5, 2.0], spacing)
    assert ball_dot[centre] > 10.0 and tube_line[centre] > 10.0
    assert tube_dot[centre] < 1e-6 * ball_dot[centre]
    assert ball_line[centre] < 1e-6 * tube_line[centre]
    # maxima sit where the shapes are; far away everything is flat
    assert torch.nonzero(ball_dot == ball_dot.max())[0].tolist() == list(centre)
    corner = tuple([0] * dims)
    assert ball_dot[corner] == 0 and tube_line[corner] == 0


def test_dark_structures_need_bright_false() -> None:
    x = _grid(3)
    hole = -((sum(c**2 for c in x)) <= 2.5**2).double() * 100.0
    bright_dot, _ = hessian_shape_filters(hole, [1.5], [1.0, 1.0, 1.0])
    dark_dot, _ = hessian_shape_filters(hole, [1.5], [1.0, 1.0, 1.0], bright=False)
    assert bright_dot[15, 15, 15] == 0 and dark_dot[15, 15, 15] > 10.0


def test_spacing_makes_the_filter_physical() -> None:
    """A blob sampled on a 1 x 1 x 2 mm grid answers like the same blob on a 1 mm grid (sigma in mm, per axis)."""
    iso = torch.arange(33, dtype=torch.float64) - 16
    coarse_z = (torch.arange(17, dtype=torch.float64) - 8) * 2.0

    def blob(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return 100.0 * torch.exp(-(x**2 + y**2 + z**2) / (2 * 2.5**2))

    fine = blob(*torch.meshgrid(iso, iso, iso, indexing="ij"))
    coarse = blob(*torch.meshgrid(iso, iso, coarse_z, indexing="ij"))
    d_fine, _ = hessian_shape_filters(fine, [2.0], [1.0, 1.0, 1.0])
    d_coarse, _ = hessian_shape_filters(coarse, [2.0], [1.0, 1.0, 2.0])
    d_wrong, _ = hessian_shape_filters(coarse, [2.0], [1.0, 1.0, 1.0])  # spacing ignored: a flattened blob
    ref = float(d_fine[16, 16, 16])
    assert float(d_coarse[16, 16, 8]) == pytest.approx(ref, rel=0.05)
    assert abs(float(d_wrong[16, 16, 8]) - ref) > 0.2 * ref


def test_shape_filters_check_their_arguments() -> None:
    with pytest.raises(ValueError, match="spacing_mm"):
        hessian_shape_filters(torch.zeros(8, 8, 8), [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="sigmas_mm"):
        hessian_shape_filters(torch.zeros(8, 8, 8), [], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="2D or 3D"):
        hessian(torch.zeros(4, 4, 4, 4), [1.0] * 4)
