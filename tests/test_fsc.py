"""Gold-standard FSC: the separable volume renderer against its reference, the shell sums against a plain
full-spectrum FSC and a grid-free one, the resolution search, and what the measure says about clouds that
agree, differ by noise, or have nothing in common."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.recon.fsc import (
    FscResult,
    fourier_shell_correlation,
    fsc_plot,
    gold_standard_fsc,
    points_to_volume,
    points_to_volume_reference,
    resolution_and_limit,
    resolution_at,
)
from holly_hpc.recon.geometry import random_rotations
from holly_hpc.runtime.plots import MARKER_COLOUR, PALETTE


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (conftest): the alignment's many small products oversubscribe."""


def _double_ring(n_sites: int = 32, diameter: float = 100.0, height: float = 50.0) -> torch.Tensor:
    """Two stacked rings of n_sites / 2 sites each (nm), a nuclear-pore-like test structure."""
    per = n_sites // 2
    angle = torch.arange(per, dtype=torch.float64) * 2 * math.pi / per
    ring = torch.stack([torch.cos(angle), torch.sin(angle), torch.zeros(per, dtype=torch.float64)], 1) * diameter / 2
    return torch.cat([ring + torch.tensor([0.0, 0.0, height / 2]), ring - torch.tensor([0.0, 0.0, height / 2])])


def _noisy_copy(sites: torch.Tensor, per_site: int, jitter_nm: float, generator: torch.Generator) -> torch.Tensor:
    points = sites.repeat_interleave(per_site, 0)
    return points + jitter_nm * torch.randn(points.shape, generator=generator, dtype=torch.float64)


def _asymmetric_cloud(n: int, seed: int) -> torch.Tensor:
    """Points around a widening helix with a side arm (nm): chiral, so no rotation lays it on its mirror
    image, and with no symmetry an alignment could slip along."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    turn = 3 * math.pi * t
    spine = torch.stack([80 * t - 40, (10 + 15 * t) * torch.cos(turn), (10 + 15 * t) * torch.sin(turn)], 1)
    points = spine + 2.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    arm = torch.arange(n) % 5 == 0
    points[arm] = torch.tensor([10.0, -30.0, 20.0]) + 6 * torch.randn(
        int(arm.sum()), 3, generator=g, dtype=torch.float64
    )
    return points


# --- rendering -------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 12),
    size=st.integers(3, 10),
    voxel=st.floats(0.5, 5.0),
    sigma_voxels=st.floats(0.3, 3.0),
    weighted=st.booleans(),
)
def test_separable_volume_matches_the_dense_reference(seed, n, size, voxel, sigma_voxels, weighted):
    g = torch.Generator().manual_seed(seed)
    points = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * size * voxel * 1.2
    weights = torch.rand(n, generator=g, dtype=torch.float64) * 2 if weighted else None
    centre = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * voxel
    args = (points, voxel, size, sigma_voxels * voxel)
    fast = points_to_volume(*args, weights=weights, centre=centre)
    ref = points_to_volume_reference(*args, weights=weights, centre=centre)
    assert fast.shape == ref.shape == (size, size, size) and fast.dtype == torch.float64
    assert (fast - ref).abs().max() < 1e-8


def test_volume_chunks_agree_with_one_pass():
    # More points than one chunk holds at this size: the chunked sum must equal the reference.
    import holly_hpc.recon.fsc as fsc_module

    g = torch.Generator().manual_seed(4)
    points = (torch.rand(300, 3, generator=g, dtype=torch.float64) - 0.5) * 16
    ref = points_to_volume_reference(points, 2.0, 10, 2.0)
    chunk_elements = fsc_module._CHUNK_ELEMENTS
    try:
        fsc_module._CHUNK_ELEMENTS = 7 * 100  # 7 points per chunk
        assert (points_to_volume(points, 2.0, 10, 2.0) - ref).abs().max() < 1e-10
    finally:
        fsc_module._CHUNK_ELEMENTS = chunk_elements


def test_volume_mass_is_the_number_of_points_times_weights():
    g = torch.Generator().manual_seed(1)
    points = (torch.rand(50, 3, generator=g, dtype=torch.float64) - 0.5) * 40  # within ±20 nm
    weights = torch.rand(50, generator=g, dtype=torch.float64) * 3
    for sigma in (2.0, 3.0, 4.0):  # voxel 2 nm, grid ±40 nm: every blob inside with > 4σ to spare
        assert float(points_to_volume(points, 2.0, 40, sigma).sum()) == pytest.approx(50, rel=1e-6)
        assert float(points_to_volume(points, 2.0, 40, sigma, weights=weights).sum()) == pytest.approx(
            float(weights.sum()), rel=1e-6
        )
    # Sampled at half a voxel, a Gaussian's sum over the voxels is no longer its mass (the module's caveat).
    assert float(points_to_volume(points, 2.0, 40, 1.0).sum()) == pytest.approx(50, rel=0.03)
    # A blob centred on the grid's face keeps about half its mass: normalised in space, not on the grid.
    face = torch.tensor([[32.0, 0.0, 0.0]])
    assert float(points_to_volume(face, 2.0, 32, 2.0).sum()) == pytest.approx(0.5, abs=0.01)
    # The grid is centred on `centre`: a point there lands on the middle voxels of an odd grid.
    volume = points_to_volume(torch.tensor([[5.0, -3.0, 1.0]]), 1.0, 9, 1.0, centre=torch.tensor([5.0, -3.0, 1.0]))
    assert torch.nonzero(volume == volume.max()).tolist() == [[4, 4, 4]]


def test_rendering_refuses_bad_input_clearly():
    good = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="empty"):
        points_to_volume(torch.zeros(0, 3), 1.0, 8, 1.0)
    with pytest.raises(ValueError, match="voxel_nm must be a finite positive"):
        points_to_volume(good, 0.0, 8, 1.0)
    with pytest.raises(ValueError, match="voxel_nm must be a finite positive"):
        points_to_volume(good, -2.0, 8, 1.0)
    with pytest.raises(ValueError, match="sigma_nm must be a finite positive"):
        points_to_volume(good, 1.0, 8, math.nan)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        points_to_volume(torch.zeros(4, 2), 1.0, 8, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        points_to_volume(torch.tensor([[0.0, math.inf, 0.0]]), 1.0, 8, 1.0)
    with pytest.raises(ValueError, match="one per point"):
        points_to_volume(good, 1.0, 8, 1.0, weights=torch.ones(3))
    with pytest.raises(ValueError, match="positive integer"):
        points_to_volume(good, 1.0, 0, 1.0)


# --- the FSC of volumes ----------------------------------------------------------------------------------


def _fsc_full_spectrum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The plain definition with fftn over the whole spectrum, shell by shell in a Python loop."""
    n = a.shape[0]
    fa, fb = torch.fft.fftn(a), torch.fft.fftn(b)
    k = torch.fft.fftfreq(n, dtype=torch.float64) * n
    shell = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2).round().long()
    out = []
    for s in range(n // 2 + 1):
        m = shell == s
        out.append((fa[m] * fb[m].conj()).real.sum() / torch.sqrt((fa[m].abs() ** 2).sum() * (fb[m].abs() ** 2).sum()))
    return torch.stack(out), torch.stack([(shell == s).sum() for s in range(n // 2 + 1)])


@pytest.mark.parametrize("n", [8, 9, 16])
def test_half_spectrum_shells_match_the_full_spectrum(n):
    g = torch.Generator().manual_seed(n)
    a = torch.rand(n, n, n, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.rand(n, n, n, generator=g, dtype=torch.float64)
    frequencies, fsc, counts = fourier_shell_correlation(a, b, voxel_nm=2.5)
    want, want_counts = _fsc_full_spectrum(a, b)
    assert torch.allclose(fsc, want, atol=1e-12)
    assert counts.tolist() == want_counts.tolist()
    assert counts[0] == 1  # DC alone
    assert torch.allclose(frequencies, torch.arange(n // 2 + 1, dtype=torch.float64) / (n * 2.5))
    # Symmetric in a and b, and blind to a scale of either.
    assert torch.allclose(fourier_shell_correlation(b, a, 2.5)[1], fsc, atol=1e-12)
    assert torch.allclose(fourier_shell_correlation(a, 3 * b, 2.5)[1], fsc, atol=1e-12)
    assert torch.allclose(fourier_shell_correlation(a, a, 2.5)[1], torch.ones(n // 2 + 1, dtype=torch.float64))


def test_empty_shells_are_nan_and_bad_volumes_are_refused():
    zero = torch.zeros(8, 8, 8, dtype=torch.float64)
    assert torch.isnan(fourier_shell_correlation(zero, zero, 1.0)[1]).all()
    with pytest.raises(ValueError, match="share one grid"):
        fourier_shell_correlation(zero, torch.zeros(8, 8, 9), 1.0)
    with pytest.raises(ValueError, match="cubic"):
        fourier_shell_correlation(torch.zeros(8, 8, 9), torch.zeros(8, 8, 9), 1.0)
    with pytest.raises(ValueError, match="voxel_nm must be a finite positive"):
        fourier_shell_correlation(zero, zero, 0.0)


def _direct_fsc(a: torch.Tensor, b: torch.Tensor, voxel: float, n: int) -> torch.Tensor:
    """The FSC of the point sets themselves, no grid and no blur: Σ_p exp(-2πi k·p) at the same Fourier
    voxels, the same shells."""
    k = torch.fft.fftfreq(n, dtype=torch.float64) * n
    k_half = torch.fft.rfftfreq(n, dtype=torch.float64) * n
    grid = torch.stack(torch.meshgrid(k, k, k_half, indexing="ij"), -1).reshape(-1, 3)
    shell = grid.norm(dim=1).round().long()
    keep = shell <= n // 2
    grid, shell = grid[keep], shell[keep]
    weight = torch.where((grid[:, 2] == 0) | (grid[:, 2] == n / 2), 1.0, 2.0).double()
    phase = -2 * math.pi * grid / (n * voxel)
    fa, fb = (torch.exp(1j * (p @ phase.T)).sum(0) for p in (a, b))
    total = lambda v: torch.bincount(shell, weights=weight * v, minlength=n // 2 + 1)  # noqa: E731
    return total((fa * fb.conj()).real) / torch.sqrt(total(fa.abs() ** 2) * total(fb.abs() ** 2))


def test_gridded_fsc_with_sigma_one_voxel_matches_the_grid_free_fsc():
    # The rendering blur is common to both volumes, so with sigma = one voxel (no aliasing to speak of, no
    # rounding trouble) the gridded FSC is the point sets' own FSC; far under a voxel it is not.
    g = torch.Generator().manual_seed(2)
    sites = _double_ring()
    a, b = _noisy_copy(sites, 12, 4.0, g), _noisy_copy(sites, 12, 4.0, g)
    voxel, n = 3.0, 40
    direct = _direct_fsc(a, b, voxel, n)

    def gridded(sigma: float) -> torch.Tensor:
        return fourier_shell_correlation(
            points_to_volume(a, voxel, n, sigma), points_to_volume(b, voxel, n, sigma), voxel
        )[1]

    assert (gridded(voxel)[1:] - direct[1:]).abs().max() < 0.03
    assert (gridded(0.2 * voxel)[1:] - direct[1:]).abs().max() > 0.1


# --- the resolution search -------------------------------------------------------------------------------


def test_resolution_interpolates_between_the_shells_around_the_crossing():
    f = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    c = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.0], dtype=torch.float64)
    crossing = 0.2 + (0.5 - 0.143) / (0.5 - 0.1) * 0.1
    assert resolution_and_limit(f, c) == (pytest.approx(1 / crossing), "none")
    assert resolution_at(f, c) == pytest.approx(1 / crossing)
    assert resolution_at(f, c, threshold=0.5) == pytest.approx(5.0)  # exactly on a shell: that shell
    # The first crossing counts, even if the curve comes back up.
    c2 = torch.tensor([1.0, 0.9, 0.1, 0.6, 0.0], dtype=torch.float64)
    assert resolution_at(f, c2) == pytest.approx(1 / (0.1 + (0.9 - 0.143) / 0.8 * 0.1))


def test_resolution_flags_nyquist_and_below_at_start():
    f = [0.0, 0.1, 0.2, 0.3, 0.4]
    assert resolution_and_limit(f, [1.0, 0.9, 0.8, 0.7, 0.6]) == (pytest.approx(2.5), "nyquist")
    assert resolution_and_limit(f, [1.0, 0.1, 0.05, 0.0, 0.0]) == (pytest.approx(10.0), "below_at_start")
    # The DC shell takes no part: a curve low at DC is judged from the first shell on.
    assert resolution_and_limit(f, [0.0, 0.9, 0.8, 0.7, 0.6]) == (pytest.approx(2.5), "nyquist")


def test_resolution_skips_non_finite_shells():
    f = [0.0, 0.1, 0.2, 0.3, 0.4]
    # A NaN shell (no power) and an inf one are stepped over; interpolation spans the gap.
    c = [1.0, 0.9, math.nan, math.inf, 0.0]
    assert resolution_at(f, c) == pytest.approx(1 / (0.1 + (0.9 - 0.143) / 0.9 * 0.3))
    assert resolution_and_limit(f, [1.0, 0.9, 0.8, math.nan, math.nan]) == (pytest.approx(5.0), "nyquist")
    with pytest.raises(ValueError, match="no shell"):
        resolution_at(f, [1.0, math.nan, math.nan, math.nan, math.nan])
    with pytest.raises(ValueError, match="4 frequencies for 5"):
        resolution_at(f[:4], c)
    with pytest.raises(ValueError, match="threshold must be finite"):
        resolution_at(f, c, threshold=math.nan)


# --- gold-standard FSC of point clouds -------------------------------------------------------------------


def test_identical_clouds_correlate_fully_and_are_nyquist_limited():
    g = torch.Generator().manual_seed(0)
    a = _noisy_copy(_double_ring(), 8, 3.0, g)
    result = gold_standard_fsc(a, a.clone())
    assert isinstance(result, FscResult)
    assert result.voxel_nm == pytest.approx(float(f"{float(torch.cdist(a, a).max()) / 48:.2g}"))
    assert result.sigma_nm == result.voxel_nm
    assert torch.allclose(result.fsc[1:], torch.ones_like(result.fsc[1:]), atol=1e-9)
    assert result.limited_by == "nyquist"
    assert result.resolution_nm == pytest.approx(result.nyquist_nm) == pytest.approx(2 * result.voxel_nm)
    assert result.scale == pytest.approx(1.0, abs=1e-9) and result.chamfer_nm < 1e-6 and result.rms_nm < 1e-6
    assert result.grid_size % 2 == 0 and result.counts.shape == result.fsc.shape == result.frequencies.shape
    assert all(math.isfinite(v) for v in result.summary().values())


def test_rotated_mirrored_copy_aligns_back_to_the_original():
    a = _asymmetric_cloud(300, seed=3)
    rotation = random_rotations(1, torch.Generator().manual_seed(5), dtype=torch.float64)[0]
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    b = (a @ (rotation @ mirror).T + torch.tensor([300.0, -120.0, 55.0]))[torch.randperm(300)]
    result = gold_standard_fsc(a, b)
    assert result.mirrored
    assert result.scale == pytest.approx(1.0, abs=1e-9)
    assert result.chamfer_nm < 1e-6
    assert torch.allclose(result.fsc[1:], torch.ones_like(result.fsc[1:]), atol=1e-6)
    assert result.limited_by == "nyquist"
    # The aligned copy lies on the original, in the original's frame.
    assert torch.cdist(result.aligned_b, a).min(dim=1).values.max() < 1e-6
    # Forbidding the mirror leaves a copy that cannot be laid on the original: far from Nyquist.
    proper_only = gold_standard_fsc(a, b, voxel_nm=result.voxel_nm, allow_mirror=False)
    assert not proper_only.mirrored
    assert proper_only.chamfer_nm > 2.0
    assert proper_only.resolution_nm > 3 * result.resolution_nm


def test_resolution_grows_with_the_jitter_of_two_independent_copies():
    # Two copies of a 100 nm double ring of 32 sites, 40 points a site, each point moved by N(0, s) nm.
    # Theory for many points per site: FSC = SNR / (1 + SNR) with SNR ≈ m·exp(-4π²s²k²) / (1 - exp(-4π²s²k²)),
    # so FSC = 0.143 near k = sqrt(ln(6m)) / (2πs), a resolution of ≈ 2.7·s nm for m = 40.
    sites = _double_ring()
    resolutions = {}
    for s in (2.0, 5.0, 10.0, 20.0):
        g = torch.Generator().manual_seed(11)
        a, b = _noisy_copy(sites, 40, s, g), _noisy_copy(sites, 40, s, g)
        result = gold_standard_fsc(a, b, voxel_nm=2.0)
        assert result.limited_by == "none", (s, result.resolution_nm)
        assert 0.95 < result.scale < 1.02  # the similarity scale of the final matching, reported, not applied
        resolutions[s] = result.resolution_nm
    values = list(resolutions.values())
    assert values == sorted(values) and len(set(values)) == 4, resolutions
    for s, r in resolutions.items():
        assert 1.8 * s < r < 3.5 * s, resolutions


def test_unrelated_clouds_correlate_only_in_the_lowest_shells():
    g = torch.Generator().manual_seed(8)

    def ball(n: int) -> torch.Tensor:
        direction = torch.randn(n, 3, generator=g, dtype=torch.float64)
        radius = 50 * torch.rand(n, 1, generator=g, dtype=torch.float64) ** (1 / 3)
        return direction / direction.norm(dim=1, keepdim=True) * radius

    result = gold_standard_fsc(ball(1000), ball(1000))
    beyond = result.fsc[8:]  # past the shells where the two balls' shared envelope shows
    assert beyond.abs().mean() < 0.08 and beyond.abs().max() < 0.3
    assert result.resolution_nm > 15.0  # the shared ball, not any structure; Nyquist is 4.2 nm
    assert result.chamfer_nm > 1.0


def test_gold_standard_refuses_bad_input_clearly():
    a = _asymmetric_cloud(50, seed=1)
    with pytest.raises(ValueError, match="points_a_nm is empty"):
        gold_standard_fsc(torch.zeros(0, 3), a)
    with pytest.raises(ValueError, match="points_b_nm is empty"):
        gold_standard_fsc(a, torch.zeros(0, 3))
    with pytest.raises(ValueError, match="at least 4"):
        gold_standard_fsc(a, a[:2])
    with pytest.raises(ValueError, match="voxel_nm must be a finite positive"):
        gold_standard_fsc(a, a, voxel_nm=0.0)
    with pytest.raises(ValueError, match="voxel_nm must be a finite positive"):
        gold_standard_fsc(a, a, voxel_nm=-1.0)
    with pytest.raises(ValueError, match="sigma_nm must be a finite positive"):
        gold_standard_fsc(a, a, sigma_nm=0.0)
    with pytest.raises(ValueError, match="max_grid"):
        gold_standard_fsc(a, a, voxel_nm=0.1, align=False)
    with pytest.raises(ValueError, match="no extent"):
        gold_standard_fsc(torch.ones(5, 3), torch.ones(5, 3), align=False)


def test_without_alignment_the_clouds_are_taken_as_registered():
    a = _asymmetric_cloud(200, seed=2) + 1000.0  # far from the origin: the grid follows a's centroid
    shifted = a + torch.tensor([6.0, 0.0, 0.0])
    same = gold_standard_fsc(a, a, align=False)
    moved = gold_standard_fsc(a, shifted, voxel_nm=same.voxel_nm, align=False)
    assert same.limited_by == "nyquist"
    assert torch.equal(moved.aligned_b, shifted)
    assert moved.resolution_nm > 2 * same.resolution_nm  # a 6 nm shift is a disagreement
    assert moved.chamfer_nm > 1.0


def test_fsc_plot_marks_the_resolution():
    f = torch.linspace(0, 0.25, 21, dtype=torch.float64)
    curve = torch.exp(-((f / 0.08) ** 2))
    resolution, limited_by = resolution_and_limit(f, curve)
    result = FscResult(
        resolution_nm=resolution,
        limited_by=limited_by,
        threshold=0.143,
        frequencies=f,
        fsc=curve,
        counts=torch.ones(21, dtype=torch.long),
        voxel_nm=2.0,
        sigma_nm=2.0,
        grid_size=40,
        scale=1.0,
        scale_applied=False,
        mirrored=False,
        aligned_b=torch.zeros(1, 3),
        chamfer_nm=0.0,
        rms_nm=0.0,
        n_a=1,
        n_b=1,
    )
    picture = fsc_plot(result)
    assert picture.shape == (3, 240, 360) and picture.dtype == torch.float32
    assert picture.min() >= 0 and picture.max() <= 1
    pixels = (picture.permute(1, 2, 0) * 255).round().long()
    marker = (pixels == torch.tensor(MARKER_COLOUR)).all(-1)
    curve_px = (pixels == torch.tensor(PALETTE[0])).all(-1)
    assert marker.any() and curve_px.any()
    # The marker column sits where the curve passes the threshold: 1/resolution along an axis from the
    # first shell (0.0125) to 0.25, inside the black box.
    black = (pixels == 0).all(-1)
    cols = torch.nonzero(black.float().mean(0) > 0.4).flatten()
    left, right = int(cols.min()), int(cols.max())
    expected = left + (1 / resolution - 0.0125) / (0.25 - 0.0125) * (right - left)
    marker_cols = torch.nonzero(marker[120:].any(0)).flatten().double()
    assert (marker_cols - expected).abs().max() <= 1.5
