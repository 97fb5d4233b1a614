"""The localisation likelihood: the exact form against its definition, the grid form against the exact one."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.recon.geometry import (
    factored_rotations,
    factored_so3_grid,
    geodesic_angle_deg,
    random_rotations,
    so3_grid,
)
from holly_hpc.recon.likelihood import (
    count_images,
    factored_grid_scores,
    grid_scores,
    localisation_nll,
    marginal_nll,
    spun_counts,
)


def nll_reference(points, rotations, shifts, locs, mask, blur, precision, background, area=4.0):
    """The definition, one localisation at a time in float64."""
    out = []
    for p in range(locs.shape[0]):
        mu = (points.double() @ rotations[p].double().T)[:, :2]
        if shifts is not None:
            mu = mu + shifts[p].double()
        total, count = 0.0, 0
        for loc in range(locs.shape[1]):
            if mask[p, loc] == 0:
                continue
            var = blur**2 + (0.0 if precision is None else float(precision[p, loc]) ** 2)
            d2 = ((locs[p, loc].double() - mu) ** 2).sum(-1)
            mix = (torch.exp(-d2 / (2 * var)) / (2 * math.pi * var)).mean()
            total += math.log((1 - background) * float(mix) + background / area)
            count += 1
        out.append(-total / count)
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 12), particles=st.integers(1, 4), blur=st.floats(0.01, 0.2))
def test_nll_matches_its_definition(seed, k, particles, blur):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(k, 3, generator=g, dtype=torch.float64) - 0.5
    rotations = random_rotations(particles, g, dtype=torch.float64)
    shifts = (torch.rand(particles, 2, generator=g, dtype=torch.float64) - 0.5) * 0.1
    locs = torch.rand(particles, 7, 2, generator=g, dtype=torch.float64) - 0.5
    mask = (torch.rand(particles, 7, generator=g) > 0.3).double()
    mask[:, 0] = 1
    precision = torch.rand(particles, 7, generator=g, dtype=torch.float64) * 0.05
    got = localisation_nll(points, rotations, shifts, locs, mask, blur, precision, 0.05)
    want = nll_reference(points, rotations, shifts, locs, mask, blur, precision, 0.05)
    assert torch.allclose(got, want, atol=1e-9)


def test_the_true_pose_is_the_most_likely_and_padding_does_not_count():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(20, 3, generator=g) * 0.3
    truth = random_rotations(1, g)
    locs = ((points @ truth[0].T)[:, :2] + 0.01 * torch.randn(20, 2, generator=g))[None]
    mask = torch.ones(1, 20)
    others = random_rotations(50, g)
    at_truth = localisation_nll(points, truth, None, locs, mask, 0.02)
    elsewhere = localisation_nll(points, others, None, locs.expand(50, -1, -1), mask.expand(50, -1), 0.02)
    assert (elsewhere > at_truth).all()
    padded = torch.cat((locs, torch.full((1, 5, 2), 9.0)), 1)
    assert torch.allclose(
        localisation_nll(points, truth, None, padded, torch.cat((mask, torch.zeros(1, 5)), 1), 0.02), at_truth
    )


def test_background_keeps_a_far_localisation_from_dominating():
    points = torch.zeros(1, 3)
    eye = torch.eye(3)[None]
    locs = torch.tensor([[[0.0, 0.0], [0.9, 0.9]]])
    mask = torch.ones(1, 2)
    with_bg = localisation_nll(points, eye, None, locs, mask, 0.02, background=0.05)
    tiny_bg = localisation_nll(points, eye, None, locs, mask, 0.02, background=1e-30)
    assert with_bg.item() < 10 < tiny_bg.item()


def test_counts_land_in_the_renderers_pixels():
    locs = torch.tensor([[[-0.99, 0.99], [0.99, -0.99], [0.0, 0.0], [2.0, 0.0]]])
    counts = count_images(locs, torch.ones(1, 4), 4).reshape(1, 4, 4)
    assert counts[0, 0, 0] == 1  # top left: x = -1, y = +1
    assert counts[0, 3, 3] == 1
    assert counts[0, 2, 2] == 1  # (0, 0) is the corner of pixel (2, 2)
    assert counts.sum() == 3  # the one outside the frame is not counted


def test_grid_scores_rank_rotations_like_the_exact_likelihood():
    """At a fine pixel grid the image form is the exact log-likelihood up to a constant per particle."""
    g = torch.Generator().manual_seed(3)
    points = torch.randn(30, 3, generator=g) * 0.25
    truth = random_rotations(4, g)
    locs = (points[None] @ truth.transpose(1, 2))[..., :2] + 0.02 * torch.randn(4, 30, 2, generator=g)
    mask = torch.ones(4, 30)
    grid = so3_grid(64)
    size, blur_px = 128, 4.0
    scores = grid_scores(points, grid, count_images(locs, mask, size), blur_px, size, background=0.05)
    exact = torch.stack(
        [
            -localisation_nll(
                points, grid, None, locs[p].expand(64, -1, -1), mask[p].expand(64, -1), blur_px * 2 / size
            )
            * 30
            for p in range(4)
        ]
    )
    for p in range(4):
        shifted = scores[p] - scores[p].mean() - (exact[p] - exact[p].mean())
        assert shifted.abs().max() < 0.05 * (exact[p].max() - exact[p].min())
        assert scores[p].argmax() == exact[p].argmax()


def test_marginal_nll_is_between_the_best_and_the_average_pose():
    scores = torch.tensor([[-10.0, -20.0, -30.0]])
    m = marginal_nll(scores, torch.tensor([10.0]))
    assert 1.0 < m.item() < 2.0
    assert m.item() == pytest.approx(-(torch.logsumexp(scores, 1) - math.log(3)).item() / 10)


def test_factored_grid_covers_so3_evenly_with_proper_rotations():
    views, angles = factored_so3_grid(4000, dtype=torch.float64)
    grid = factored_rotations(views, angles)
    assert abs(len(grid) - 4000) < 200
    assert torch.allclose(torch.linalg.det(grid), torch.ones(len(grid), dtype=torch.float64))
    assert torch.allclose(grid @ grid.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(grid), atol=1e-12)
    probes = random_rotations(300, torch.Generator().manual_seed(0), dtype=torch.float64)
    nearest = torch.stack([geodesic_angle_deg(r.expand_as(grid), grid).min() for r in probes])
    assert nearest.max() < 20 and nearest.median() < 12  # spacing (8π²/4000)^(1/3) ≈ 15.5°


def test_factored_scores_equal_the_plain_grid_scores_of_the_same_rotations():
    """Turning the particles instead of rendering every rotation: the same scores up to pixel binning."""
    g = torch.Generator().manual_seed(4)
    points = torch.randn(25, 3, generator=g) * 0.25
    views, angles = factored_so3_grid(300)
    grid = factored_rotations(views, angles)
    truth = grid[torch.tensor([7, 150, 222])]
    locs = (points[None] @ truth.transpose(1, 2))[..., :2] + 0.01 * torch.randn(3, 25, 2, generator=g)
    mask = torch.ones(3, 25)
    size, blur = 128, 4.0
    plain = grid_scores(points, grid, count_images(locs, mask, size), blur, size)
    fast = factored_grid_scores(points, views, spun_counts(locs, mask, angles, size), blur, size)
    assert fast.shape == plain.shape
    for p in range(3):
        spread = plain[p].max() - plain[p].min()
        gap = (fast[p] - plain[p]).abs()
        assert gap.max() < 0.05 * spread and gap.mean() < 0.01 * spread  # binning turned vs unturned counts
        assert fast[p].argmax() == plain[p].argmax()
