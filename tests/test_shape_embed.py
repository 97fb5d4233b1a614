"""Shape embedding from contour distance matrices (holly_hpc.embed.shape): contours from masks, arc-length
resampling, the invariances of the distance matrix, the start-and-direction-invariant loss against its
loop oracle, classical MDS, region properties and the DistanceMatrixAutoEncoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.draw import disk, ellipse

from holly_hpc.embed.models import reconstruction_loss
from holly_hpc.embed.shape import (
    REGION_PROPERTIES,
    DistanceMatrixAutoEncoder,
    classical_mds,
    contour_distance_matrix,
    cyclic_permutations,
    cyclic_variants,
    distance_matrix,
    invariant_mse,
    invariant_mse_reference,
    largest_contour,
    matrix_penalties,
    region_properties,
    resample_contour,
    rigid_rmsd,
    scale_normalised,
    signed_area,
)

WIDTH = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded_torch")


def ellipse_contour(a: float, b: float, points: int = 1000, angle: float = 0.0) -> np.ndarray:
    """(points, 2) on the ellipse of semi-axes a (rows) and b (cols) rotated by angle, counter-clockwise."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    xy = np.stack([a * np.cos(t), b * np.sin(t)], axis=1)
    c, s = np.cos(angle), np.sin(angle)
    return xy @ np.array([[c, s], [-s, c]]) + 50.0


def ellipse_mask(a: float, b: float, angle: float = 0.0, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[ellipse(size / 2, size / 2, a, b, shape=mask.shape, rotation=angle)] = 1
    return mask


def polyline_length(points: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(np.concatenate([points, points[:1]]), axis=0), axis=1).sum())


def random_matrices(seed: int, batch: int, n: int) -> torch.Tensor:
    return torch.rand(batch, n, n, generator=torch.Generator().manual_seed(seed))


def rotation(angle: float, reflect: bool = False) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]]) @ np.diag([1.0, -1.0 if reflect else 1.0])


point_sets = st.tuples(st.integers(3, 20), st.integers(0, 2**31 - 1)).map(
    lambda args: np.random.default_rng(args[1]).uniform(-100, 100, size=(args[0], 2))
)


# ----------------------------------------------------------------------------------------------------
# Distance matrices and their invariances


@settings(max_examples=30, deadline=None)
@given(
    points=point_sets,
    angle=st.floats(0, 2 * np.pi),
    shift=st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)),
    reflect=st.booleans(),
)
def test_distance_matrix_is_invariant_to_rigid_motion_and_reflection(points, angle, shift, reflect):
    moved = points @ rotation(angle, reflect).T + np.array(shift)
    original = distance_matrix(points)
    np.testing.assert_allclose(distance_matrix(moved), original, atol=1e-9 * (1 + np.abs(moved).max()))
    assert np.all(np.diag(original) == 0) and np.array_equal(original, original.T)


@settings(max_examples=30, deadline=None)
@given(points=point_sets, factor=st.floats(1e-3, 1e3))
def test_scale_normalisation_removes_size(points, factor):
    normalised, scale = scale_normalised(distance_matrix(points))
    scaled, scaled_scale = scale_normalised(distance_matrix(factor * points))
    np.testing.assert_allclose(scaled, normalised, rtol=1e-9, atol=1e-12)
    assert scaled_scale == pytest.approx(factor * scale, rel=1e-9)
    n = len(points)
    assert normalised.sum() / (n * (n - 1)) == pytest.approx(1.0)


def test_torch_distance_matrix_matches_numpy_and_has_finite_gradients():
    points = torch.randn(3, 10, 2, dtype=torch.float64)
    points[:, 4] = points[:, 3]  # a repeated point: sqrt's gradient at 0 must not give NaN
    points.requires_grad_(True)
    matrix = distance_matrix(points)
    assert matrix.shape == (3, 10, 10)
    np.testing.assert_allclose(matrix[1].detach().numpy(), distance_matrix(points[1].detach().numpy()), atol=1e-12)
    assert torch.all(matrix.diagonal(dim1=-2, dim2=-1) == 0)
    matrix.sum().backward()
    assert torch.isfinite(points.grad).all() and points.grad.abs().sum() > 0


def test_contour_distance_matrix_of_masks_of_different_sizes():
    small, small_scale = contour_distance_matrix(ellipse_mask(12, 6, size=40), 48)
    large, large_scale = contour_distance_matrix(ellipse_mask(24, 12, size=64), 48)
    raw, one = contour_distance_matrix(ellipse_mask(24, 12, size=64), 48, normalise_scale=False)
    assert small.dtype == np.float32 and small.shape == (48, 48) and one == 1.0
    assert large_scale == pytest.approx(2 * small_scale, rel=0.05)
    np.testing.assert_allclose(raw / large_scale, large, rtol=1e-6)
    # Same shape at two sizes: pixelation differs, the normalised matrices nearly agree...
    same = invariant_mse(torch.from_numpy(small)[None], torch.from_numpy(large)[None]).item()
    # ...much more than those of a different shape (a disc).
    disc, _ = contour_distance_matrix(ellipse_mask(18, 18, size=64), 48)
    different = invariant_mse(torch.from_numpy(disc)[None], torch.from_numpy(large)[None]).item()
    assert same < 0.002 and different > 20 * same, (same, different)


# ----------------------------------------------------------------------------------------------------
# Contours from masks


def test_largest_contour_of_a_disc_is_about_its_circumference():
    # Marching squares on a binary image steps at 0° and 45° only; such a staircase overestimates a
    # smooth curve's length by (8 / π)(√2 - 1) ≈ 5.5% on average over directions.
    for radius in (10, 20, 30):
        mask = np.zeros((80, 80), dtype=bool)
        mask[disk((40, 40), radius)] = True
        contour = largest_contour(mask)
        ratio = polyline_length(contour) / (2 * np.pi * radius)
        assert 1.0 < ratio < 1.07, (radius, ratio)
        np.testing.assert_allclose(contour.mean(0), [40, 40], atol=0.5)
        assert not np.array_equal(contour[0], contour[-1])  # the closing duplicate is dropped


def test_largest_contour_picks_the_largest_blob():
    mask = np.zeros((80, 80), dtype=np.uint8)
    mask[disk((15, 15), 6)] = 1
    mask[disk((50, 55), 15)] = 3  # any positive value is foreground
    contour = largest_contour(mask)
    np.testing.assert_allclose(contour.mean(0), [50, 55], atol=0.5)


def test_largest_contour_closes_around_objects_on_the_border():
    mask = np.zeros((30, 40), dtype=bool)
    mask[0:10, 0:20] = True  # touches the top and left edges
    contour = largest_contour(mask)
    np.testing.assert_allclose(contour.min(0), [-0.5, -0.5])
    np.testing.assert_allclose(contour.max(0), [9.5, 19.5])
    # The 10 x 20 rectangle with its four corners cut by half-pixel triangles (4 x 1/8).
    assert abs(signed_area(contour)) == pytest.approx(200 - 0.5)


def test_largest_contour_rejects_empty_and_non_2d_masks():
    with pytest.raises(ValueError, match="mask is empty"):
        largest_contour(np.zeros((10, 10)))
    with pytest.raises(ValueError):
        largest_contour(np.ones((2, 10, 10)))


# ----------------------------------------------------------------------------------------------------
# Resampling


def test_resampling_a_square_gives_corners_and_midpoints_counter_clockwise():
    square = np.array([[0.0, 0.0], [0.0, 4.0], [4.0, 4.0], [4.0, 0.0]])  # clockwise as displayed
    assert signed_area(square) < 0
    points = resample_contour(square, 8)
    expected = np.array([[0, 0], [2, 0], [4, 0], [4, 2], [4, 4], [2, 4], [0, 4], [0, 2]], dtype=float)
    np.testing.assert_allclose(points, expected, atol=1e-12)
    assert signed_area(points) > 0
    np.testing.assert_allclose(resample_contour(expected[::2], 8), expected, atol=1e-12)  # already CCW
    with pytest.raises(ValueError):
        resample_contour(square, 2)


def test_resampled_points_are_equally_spaced_in_arc_length():
    # On a circle equal arcs give equal chords...
    circle = ellipse_contour(20, 20, points=5000)
    points = resample_contour(np.roll(circle, 1234, axis=0), 50)
    steps = np.linalg.norm(np.diff(np.concatenate([points, points[:1]]), axis=0), axis=1)
    assert steps.std() / steps.mean() < 1e-6
    np.testing.assert_allclose(points[0], circle[-1234])  # np.roll moves element -k to the front
    # ...and on a 10 x 30 rectangle, perimeter 80, 16 points from mid-side fall every 5 along the sides,
    # corners included, whatever the input's vertices (here: many, unevenly spaced).
    t = np.sort(np.concatenate([np.random.default_rng(0).uniform(0, 80, 300), [0, 10, 40, 50]]))
    t = np.concatenate([[5.0], t[t > 5], t[t < 5]])
    down = np.select([t < 10, t < 40, t < 50], [t, 10 + 0 * t, 50 - t], 0 * t)
    side = np.select([t < 10, t < 40, t < 50], [0 * t, t - 10, 30 + 0 * t], 80 - t)
    rectangle = np.stack([down, side], axis=1)  # down, right, up, left: counter-clockwise as displayed
    assert signed_area(rectangle) == pytest.approx(300)
    clockwise = np.roll(rectangle[::-1], 1, axis=0)  # the same start, the other way round
    for contour in (rectangle, clockwise):
        points = resample_contour(contour, 16)
        steps = np.linalg.norm(np.diff(np.concatenate([points, points[:1]]), axis=0), axis=1)
        np.testing.assert_allclose(steps, 5.0, atol=1e-9)
        np.testing.assert_allclose(points[:4], [[5, 0], [10, 0], [10, 5], [10, 10]], atol=1e-9)


def test_start_index_and_direction_only_reindex_the_matrix():
    n = 64
    contour = ellipse_contour(30, 12)
    base = distance_matrix(resample_contour(contour, n))
    spacing = polyline_length(contour) / n
    # The same closed polyline from another start: its resampled points sit on the same curve, shifted
    # in arc length by δ <= spacing / 2 from the best-aligned original points. Moving two points by at
    # most δ each changes their distance by at most 2δ <= spacing, so the MSE is at most spacing².
    for variant in (np.roll(contour, 37, axis=0), np.roll(contour, 290, axis=0), np.roll(contour[::-1], 437, axis=0)):
        matrix = distance_matrix(resample_contour(variant, n))
        error = invariant_mse(torch.from_numpy(matrix)[None], torch.from_numpy(base)[None]).item()
        plain = float(((matrix - base) ** 2).mean())  # without the invariance
        assert error <= spacing**2 and plain > 10 * error, (error, plain, spacing**2)
    # Reversed input is resampled counter-clockwise again, from contour[-1]: one input point (1/1000 of
    # the perimeter) from the original start, so even the plain MSE is small.
    matrix = distance_matrix(resample_contour(contour[::-1], n))
    np.testing.assert_allclose(resample_contour(contour[::-1], n)[0], contour[-1])
    assert float(((matrix - base) ** 2).mean()) <= (polyline_length(contour) / 1000) ** 2
    # A mirror image runs the other way once resampled counter-clockwise: it is base read backwards from
    # the same start, exactly the reflection k = 0.
    mirrored = distance_matrix(resample_contour(contour * [1, -1], n))
    assert invariant_mse(torch.from_numpy(mirrored)[None], torch.from_numpy(base)[None]).item() < 1e-20
    index = cyclic_permutations(n)[n]
    np.testing.assert_allclose(mirrored, base[np.ix_(index, index)], atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# The invariant loss


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), n=st.integers(3, 12))
def test_invariant_mse_agrees_with_the_loop_oracle(seed, batch, n):
    pred, target = random_matrices(seed, batch, n), random_matrices(seed + 1, batch, n)
    fast = invariant_mse(pred, target)
    assert fast.shape == (batch,)
    torch.testing.assert_close(fast, invariant_mse_reference(pred, target), atol=1e-6, rtol=0)
    all_variants = (pred[:, None] - cyclic_variants(target)).pow(2).mean(dim=(-2, -1)).amin(dim=1)
    torch.testing.assert_close(fast, all_variants, atol=1e-6, rtol=0)
    # A target that is a noisy re-indexing of pred: the oracle's minimum is a clear one.
    k = seed % (2 * n)
    noisy = cyclic_variants(pred)[:, k] + 0.01 * random_matrices(seed + 2, batch, n)
    torch.testing.assert_close(invariant_mse(pred, noisy), invariant_mse_reference(pred, noisy), atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 40), k=st.integers(0, 79))
def test_invariant_mse_is_zero_for_any_shift_or_reflection(seed, n, k):
    k %= 2 * n
    target = random_matrices(seed, 2, n)  # need not be symmetric: P D P^T is exact for any D
    index = cyclic_permutations(n)[k]
    reindexed = target[:, index[:, None], index[None, :]]
    torch.testing.assert_close(reindexed, cyclic_variants(target)[:, k])
    assert torch.equal(invariant_mse(reindexed, target), torch.zeros(2))


def test_cyclic_variants_are_rolls_and_flips():
    target = random_matrices(3, 2, 6)
    variants = cyclic_variants(target)
    assert variants.shape == (2, 12, 6, 6)
    torch.testing.assert_close(variants[:, 2], torch.roll(target, shifts=(-2, -2), dims=(1, 2)))
    torch.testing.assert_close(variants[:, 6 + 5], target.flip(1, 2))  # i -> 5 - i
    torch.testing.assert_close(variants[:, 6 + 1], torch.roll(target.flip(1, 2), shifts=(2, 2), dims=(1, 2)))  # 1 - i
    # 2N distinct re-indexings of a matrix with no symmetry.
    assert len(torch.unique(variants[0].flatten(1), dim=0)) == 12


def test_invariant_mse_is_positive_for_a_different_shape():
    def matrix(contour):
        return torch.from_numpy(scale_normalised(distance_matrix(resample_contour(contour, 64)))[0])[None]

    reference = matrix(ellipse_contour(30, 12))
    restarted = invariant_mse(matrix(np.roll(ellipse_contour(30, 12), 290, axis=0)), reference).item()
    rounder = invariant_mse(matrix(ellipse_contour(30, 20)), reference).item()
    assert rounder > 0.01 and rounder > 20 * restarted, (rounder, restarted)


def test_invariant_mse_gradient_is_that_of_the_best_variant():
    target = random_matrices(0, 2, 8)
    pred = (cyclic_variants(target)[:, 5] + 0.1 * random_matrices(1, 2, 8)).requires_grad_(True)
    invariant_mse(pred, target).sum().backward()
    expected = 2 * (pred.detach() - cyclic_variants(target)[:, 5]) / 64
    torch.testing.assert_close(pred.grad, expected)


def test_matrix_penalties():
    points = torch.randn(4, 16, 2)
    true = matrix_penalties(distance_matrix(points))
    assert set(true) == {"diagonal", "symmetry", "nonnegative"}
    assert all(torch.equal(value, torch.tensor(0.0)) for value in true.values())
    perturbed = distance_matrix(points) + 0.1 * torch.randn(4, 16, 16) - 0.5 * torch.eye(16)
    perturbed[:, 0, 1] = -1.0
    penalties = matrix_penalties(perturbed)
    assert all(value > 0 for value in penalties.values()), penalties
    torch.testing.assert_close(penalties["diagonal"], perturbed.diagonal(dim1=1, dim2=2).pow(2).mean())
    assert penalties["nonnegative"] >= 1.0 / (4 * 16 * 16)


# ----------------------------------------------------------------------------------------------------
# Classical MDS and rigid RMSD


shapes = st.one_of(
    st.tuples(st.floats(1, 100), st.floats(0.05, 1), st.integers(3, 60), st.floats(0, np.pi)).map(
        lambda args: ellipse_contour(args[0], args[0] * args[1], args[2], args[3])
    ),
    st.tuples(st.integers(3, 40), st.integers(0, 2**31 - 1), st.floats(0.01, 1000)).map(
        lambda args: args[2] * np.random.default_rng(args[1]).uniform(-1, 1, size=(args[0], 2))
    ),
)


@settings(max_examples=30, deadline=None)
@given(points=shapes)
def test_mds_recovers_the_points_up_to_rigid_motion(points):
    size = np.abs(points - points.mean(0)).max()
    recovered = classical_mds(distance_matrix(points))
    assert recovered.shape == (len(points), 2)
    assert rigid_rmsd(recovered, points) < 1e-6 * size
    batched = classical_mds(torch.from_numpy(distance_matrix(points))[None].repeat(2, 1, 1))
    assert batched.shape == (2, len(points), 2) and batched.dtype == torch.float64
    assert rigid_rmsd(batched[1].numpy(), points) < 1e-6 * size


def test_mds_of_a_noisy_asymmetric_matrix_is_close():
    points = resample_contour(ellipse_contour(20, 8), 32)
    noisy = distance_matrix(points) + 0.05 * np.random.default_rng(0).standard_normal((32, 32))
    recovered = classical_mds(noisy)
    assert rigid_rmsd(recovered, points) < 0.1


def test_rigid_rmsd():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(20, 2))
    rotated = points @ rotation(1.1).T + [3.0, -2.0]
    mirrored = points @ rotation(0.4, reflect=True).T
    assert rigid_rmsd(rotated, points, allow_reflection=False) < 1e-12
    assert rigid_rmsd(mirrored, points) < 1e-12
    assert rigid_rmsd(mirrored, points, allow_reflection=False) > 0.1  # a random point set is chiral
    noise = 0.01 * rng.normal(size=points.shape)
    noise -= noise.mean(0)
    assert rigid_rmsd(points + noise, points) == pytest.approx(np.sqrt((noise**2).sum(1).mean()), rel=0.05)
    with pytest.raises(ValueError):
        rigid_rmsd(points, points[:5])


# ----------------------------------------------------------------------------------------------------
# Region properties


def test_region_properties_of_an_ellipse():
    a, b = 30, 15
    mask = np.zeros((100, 100), dtype=np.uint8)
    mask[ellipse(50, 45, a, b, shape=mask.shape, rotation=0.3)] = 1
    mask[disk((90, 90), 4)] = 1  # a smaller component, ignored
    props = dict(zip(REGION_PROPERTIES, region_properties(mask), strict=True))
    assert region_properties(mask).dtype == np.float64 and len(props) == 6
    assert props["area"] == pytest.approx(np.pi * a * b, rel=0.02)
    assert props["eccentricity"] == pytest.approx(np.sqrt(1 - b**2 / a**2), abs=0.03)
    assert props["major_axis_length"] == pytest.approx(2 * a, rel=0.02)
    assert props["minor_axis_length"] == pytest.approx(2 * b, rel=0.03)
    ramanujan = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
    assert props["perimeter"] == pytest.approx(ramanujan, rel=0.05)
    assert props["solidity"] > 0.97
    with pytest.raises(ValueError, match="mask is empty"):
        region_properties(np.zeros((10, 10)))


# ----------------------------------------------------------------------------------------------------
# The model


def ellipse_matrices(count: int, n: int, seed: int = 0) -> torch.Tensor:
    """(count, 1, n, n) scale-normalised matrices of ellipse masks of eccentricity 0 to 0.97, rotated
    at random (the contour's start point moves with the rotation)."""
    rng = np.random.default_rng(seed)
    ratios = np.linspace(0.25, 1.0, count)
    matrices = [contour_distance_matrix(ellipse_mask(26, 26 * r, rng.uniform(0, np.pi)), n)[0] for r in ratios]
    return torch.from_numpy(np.stack(matrices))[:, None]


@pytest.mark.parametrize("n", [32, 64])
def test_model_shapes_and_gradients(n):
    model = DistanceMatrixAutoEncoder(n, latent_dim=6, width=WIDTH)
    x = ellipse_matrices(3, n)
    out = model(x)
    assert out["reconstruction"].shape == (3, 1, n, n) and out["embedding"].shape == (3, 6)
    assert model.in_channels == 1 and model.image_size == n and model.embedding_dim == 6
    assert set(out["loss_terms"]) == {"recon", "diagonal", "symmetry", "nonnegative"} and out["stats"] == {}
    model.loss(x, out).backward()
    first_conv = model.encoder.stem[0].weight.grad
    assert first_conv is not None and first_conv.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        contours = model.decode_contours(out["embedding"])
    assert contours.shape == (3, n, 2) and torch.isfinite(contours).all()
    with pytest.raises(ValueError):
        model(torch.rand(2, 1, n, n + 1))


def test_model_loss_is_invariant_recon_plus_weighted_penalties():
    model = DistanceMatrixAutoEncoder(
        32, 4, width=WIDTH, diagonal_weight=0.5, symmetry_weight=2.0, nonnegative_weight=3.0
    )
    assert model.loss_weights == {"diagonal": 0.5, "symmetry": 2.0, "nonnegative": 3.0}
    x = ellipse_matrices(4, 32)
    out = model(x)
    reconstruction = out["reconstruction"][:, 0]
    penalties = matrix_penalties(reconstruction)
    expected = (
        invariant_mse(reconstruction, x[:, 0]).mean()
        + 0.5 * penalties["diagonal"]
        + 2.0 * penalties["symmetry"]
        + 3.0 * penalties["nonnegative"]
    )
    torch.testing.assert_close(model.loss(x, out), expected)
    torch.testing.assert_close(out["loss_terms"]["recon"], invariant_mse(reconstruction, x[:, 0]).mean())
    # Not the base class's plain MSE: that would be at least as large.
    assert invariant_mse(reconstruction, x[:, 0]).mean() <= reconstruction_loss(reconstruction, x[:, 0])


def test_model_loss_ignores_where_each_target_contour_starts():
    model = DistanceMatrixAutoEncoder(32, 4, width=WIDTH)
    x = ellipse_matrices(5, 32)
    out = model(x)
    choice = torch.tensor([3, 40, 17, 63, 0])  # a different shift or reflection per image
    reindexed = cyclic_variants(x[:, 0])[torch.arange(5), choice][:, None]
    assert not torch.allclose(reindexed, x)
    torch.testing.assert_close(model.loss(reindexed, out), model.loss(x, out), atol=1e-6, rtol=1e-6)
    plain = reconstruction_loss(out["reconstruction"], reindexed) - reconstruction_loss(out["reconstruction"], x)
    assert plain.abs() > 1e-3  # the plain MSE would have changed


def test_a_short_training_run_learns_the_shapes():
    torch.manual_seed(0)
    x = ellipse_matrices(16, 32, seed=1)
    model = DistanceMatrixAutoEncoder(32, latent_dim=8, width=8)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        optimiser.zero_grad()
        out = model(x)
        loss = model.loss(x, out)
        loss.backward()
        optimiser.step()
        losses.append(out["loss_terms"]["recon"].item())
    final = sum(losses[-3:]) / 3
    assert final < 0.05 * losses[0], losses
    # ...and it reconstructs each ellipse, not one shape for all: the best single training matrix,
    # aligned to each target, does worse.
    targets = x[:, 0]
    one_for_all = min(invariant_mse(candidate.expand_as(targets), targets).mean().item() for candidate in targets)
    assert final < 0.7 * one_for_all, (final, one_for_all)
