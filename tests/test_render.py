"""The fast separable renderer against the plain reference, and the renderer's physical meaning."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.recon.geometry import random_rotations
from holly_hpc.recon.render import render_images, render_images_reference
from holly_hpc.recon.simulate import batch_generator, load_structure, simulate_batch


def _scene(seed: int, batch: int, n: int, dtype):
    g = torch.Generator().manual_seed(seed)
    points = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 1.4 - 0.7).to(dtype)
    rotations = random_rotations(batch, g, dtype=dtype)
    translations = ((torch.rand(batch, 2, generator=g, dtype=torch.float64) - 0.5) * 0.4).to(dtype)
    return points, rotations, translations


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    size=st.integers(8, 40),
    n=st.integers(1, 60),
    sigma=st.floats(0.5, 4.0),
    batch=st.integers(1, 4),
)
def test_fast_matches_reference_float64(seed, size, n, sigma, batch):
    points, rotations, translations = _scene(seed, batch, n, torch.float64)
    fast = render_images(points, rotations, sigma, size, translations)
    ref = render_images_reference(points, rotations, sigma, size, translations)
    assert fast.shape == ref.shape == (batch, size, size)
    assert torch.allclose(fast, ref, atol=1e-12, rtol=1e-10)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    height=st.integers(8, 40),
    width=st.integers(8, 40),
    n=st.integers(1, 30),
    sigma=st.floats(0.5, 4.0),
)
def test_non_square_fast_matches_reference_and_widens_the_square_frame(seed, height, width, n, sigma):
    points, rotations, translations = _scene(seed, 2, n, torch.float64)
    fast = render_images(points, rotations, sigma, (height, width), translations)
    ref = render_images_reference(points, rotations, sigma, [height, width], translations)
    assert fast.shape == (2, height, width)
    assert torch.allclose(fast, ref, atol=1e-12, rtol=1e-10)
    # Pixels are square and [-1, 1] spans the shorter side: the image is the square one of that side with
    # extra columns (or rows) of field of view, the central ones equal to it where the sides differ by an
    # even number of pixels.
    short = min(height, width)
    if (height - width) % 2 == 0:
        square = render_images(points, rotations, sigma, short, translations)
        top, left = (height - short) // 2, (width - short) // 2
        assert torch.allclose(fast[:, top : top + short, left : left + short], square, atol=1e-12)


def test_fast_matches_reference_float32_to_1e5():
    points, rotations, translations = _scene(3, 8, 200, torch.float32)
    sigma = torch.tensor([0.8, 1.0, 1.5, 2.0, 2.5, 3.0, 1.2, 0.6])  # one sigma per image
    fast = render_images(points, rotations, sigma, 32, translations)
    ref = render_images_reference(points, rotations, sigma, 32, translations)
    assert (fast - ref).abs().max().item() < 1e-5


def test_one_sigma_per_blob_matches_reference_and_widens_only_that_blob():
    # Real tables carry each localisation's precision: the renderer draws every blob at its own sigma.
    points, rotations, translations = _scene(5, 3, 40, torch.float64)
    g = torch.Generator().manual_seed(2)
    sigma = 0.6 + 3 * torch.rand(3, 40, generator=g, dtype=torch.float64)
    fast = render_images(points, rotations, sigma, 24, translations)
    ref = render_images_reference(points, rotations, sigma, 24, translations)
    assert torch.allclose(fast, ref, atol=1e-12)
    one = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    eye = torch.eye(3).expand(1, 3, 3)
    sharp = render_images(one, eye, torch.tensor([[1.0, 1.0]]), 32)[0]
    wide = render_images(one, eye, torch.tensor([[1.0, 3.0]]), 32)[0]
    assert wide[8, 24].item() < 0.5 * sharp[8, 24].item()  # the second blob (top right) is wider, so lower
    assert wide[16, 16].item() == pytest.approx(sharp[16, 16].item(), rel=0.02)  # the first one is unchanged


def test_each_blob_has_unit_mass_and_lands_where_projected():
    rotations = torch.eye(3).expand(1, 3, 3)
    point = torch.tensor([[0.25, -0.5, 0.3]])  # x right, y up, z dropped
    image = render_images(point, rotations, 1.5, 64)[0]
    assert image.sum().item() == pytest.approx(1.0, abs=1e-4)
    row, col = divmod(int(image.argmax()), 64)
    # x=0.25 -> column (0.25+1)/2*64 = 40 (centre of pixel 39.5..40.5); y=-0.5 -> row (1+0.5)/2*64 = 48
    assert col in (39, 40) and row in (47, 48)
    # A blob half outside the image loses half its mass, as on a camera.
    edge = render_images(torch.tensor([[1.0, 0.0, 0.0]]), rotations, 1.5, 64)[0]
    assert edge.sum().item() == pytest.approx(0.5, abs=1e-3)


def test_gradients_reach_points_rotations_translations_and_sigma():
    points, rotations, translations = _scene(5, 2, 20, torch.float64)
    points.requires_grad_(True)
    six = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    from holly_hpc.recon.geometry import rotation_from_6d

    translations.requires_grad_(True)
    sigma = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    target = render_images(*_scene(6, 2, 20, torch.float64)[:2], 1.5, 24)
    loss = (render_images(points, rotation_from_6d(six), sigma, 24, translations) - target).pow(2).sum()
    loss.backward()
    for t in (points, six, translations, sigma):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda p: render_images(p, rotations.detach(), 1.5, 8), (points.detach()[:3].clone().requires_grad_(True),)
    )


def test_fast_path_never_builds_a_points_by_pixels_tensor():
    """Memory is O(B·N·(H+W)): a 64-image batch of 5,000 points at 256² would need 84 GB dense."""
    points, rotations, _ = _scene(1, 64, 5000, torch.float32)
    image = render_images(points, rotations, 1.0, 256)
    assert image.shape == (64, 256, 256)
    assert image.sum(dim=(1, 2)).mean().item() == pytest.approx(5000, rel=0.01)


def test_simulated_batches_are_a_function_of_seed_and_step():
    structure = load_structure("torus", 50, 0.7)
    a = simulate_batch(structure, 4, 16, 1.0, 0.1, batch_generator(3, 10), torch.device("cpu"))
    b = simulate_batch(structure, 4, 16, 1.0, 0.1, batch_generator(3, 10), torch.device("cpu"))
    c = simulate_batch(structure, 4, 16, 1.0, 0.1, batch_generator(3, 11), torch.device("cpu"))
    assert torch.equal(a["images"], b["images"]) and not torch.equal(a["images"], c["images"])
    assert a["translations"].abs().max() <= 0.1
    assert math.isclose(structure.points.norm(dim=1).max().item(), 0.7, rel_tol=1e-6)


def test_obj_structures_and_symmetry_choice(tmp_path):
    from holly_hpc.io.mesh import read_obj_vertices, write_obj

    torus = load_structure("torus", 30, 0.7)
    write_obj(tmp_path / "t.obj", torus.points.numpy())
    assert torch.allclose(torch.from_numpy(read_obj_vertices(tmp_path / "t.obj")).float(), torus.points, atol=1e-5)
    as_obj = load_structure("t.obj", 0, 0.7, base_dir=tmp_path)
    assert as_obj.symmetry == "none" and as_obj.points.shape == (30, 3)
    assert load_structure("t.obj", 0, 0.7, base_dir=tmp_path, symmetry="axial").symmetry == "axial"
    assert torus.symmetry == "axial"
    assert torch.allclose(as_obj.points, torus.points, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.7, 1.4, 3.0, 6.0, 10.0])
def test_fast_and_reference_gradients_agree_including_points_near_borders(sigma):
    g = torch.Generator().manual_seed(int(sigma * 10))
    # Half the points sit at or beyond the image border, where blobs are cut off.
    inner = torch.rand(10, 3, generator=g, dtype=torch.float64) * 1.2 - 0.6
    border = torch.tensor(
        [[1.0, 0.2, 0.1], [-0.98, -0.99, 0.0], [0.3, 1.05, -0.2], [0.0, -1.0, 0.5], [1.1, 1.1, 0.0]],
        dtype=torch.float64,
    )
    rotations = random_rotations(3, g, dtype=torch.float64)
    weights = torch.rand(3, 15, generator=g, dtype=torch.float64)
    target = torch.rand(3, 20, 20, generator=g, dtype=torch.float64)
    grads = []
    for render in (render_images, render_images_reference):
        points = torch.cat((inner, border)).requires_grad_(True)
        translations = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
        w = weights.clone().requires_grad_(True)
        image = render(points, rotations, sigma, 20, translations, w)
        ((image - target) ** 2).sum().backward()
        grads.append((image.detach(), points.grad, translations.grad, w.grad))
    for fast, ref in zip(*grads, strict=True):
        assert torch.allclose(fast, ref, rtol=1e-9, atol=1e-12)
