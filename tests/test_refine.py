"""Per-particle pose refinement: pose searches, halves, re-spawned points, symmetrising a free structure."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.recon.geometry import random_rotations, rotation_from_6d
from holly_hpc.recon.likelihood import count_images
from holly_hpc.recon.metrics import chamfer
from holly_hpc.recon.refine import STRAY, Particles, Refinement, RefineOptions, six_from_rotations, split_halves
from holly_hpc.recon.render import project
from holly_hpc.recon.simulate import asymmetric_points
from holly_hpc.recon.symmetry import expand

SIZE = 32


def options(**changes) -> RefineOptions:
    base = {"start": 0.0, "init": "grid", "grid": 2000, "search": 0.2, "regrid_every": 100, "pose_lr": 0.01}
    base |= {"shift_lr": 0.005, "points_lr": 0.005, "background": 0.05, "fsc": False, "respawn_every": 100}
    return RefineOptions(**{**base, **changes})


def particles_of(points: torch.Tensor, rotations: torch.Tensor, seed: int = 0, noise: float = 0.01) -> Particles:
    g = torch.Generator().manual_seed(seed)
    locs = project(points, rotations, None) + noise * torch.randn(len(rotations), len(points), 2, generator=g)
    mask = torch.ones(locs.shape[:2])
    return Particles(locs, mask, None, count_images(locs, mask, SIZE))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_six_parameters_give_back_the_rotation(seed):
    r = random_rotations(5, torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.allclose(rotation_from_6d(six_from_rotations(r)), r, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 500), seed=st.integers(0, 1000))
def test_halves_are_disjoint_cover_everything_and_are_fixed_by_the_seed(n, seed):
    a, b = split_halves(n, seed)
    assert len(set(a.tolist()) & set(b.tolist())) == 0
    assert sorted(a.tolist() + b.tolist()) == list(range(n))
    assert abs(len(a) - len(b)) <= 1
    again = split_halves(n, seed)
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])


def test_grid_search_then_refinement_recovers_the_poses_of_a_known_structure():
    points = asymmetric_points(40).float() * 0.35
    truth = random_rotations(24, torch.Generator().manual_seed(1))
    data = particles_of(points, truth)
    ref = Refinement(options(), points, 24, "none", 0)
    best_possible = ref.nll(0, data, 0.5, SIZE).mean()  # identity poses: wrong, a baseline
    moved = ref.search_poses(data, 1.0, SIZE, only_better=False)
    assert moved == 1.0
    after_search = ref.nll(0, data, 0.5, SIZE).mean()
    optimiser = torch.optim.Adam([ref.six[0], ref.shifts[0]], lr=0.01)
    for _ in range(150):
        loss = ref.loss(data, 0.5, SIZE, "likelihood", searching=False)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    refined = ref.nll(0, data, 0.5, SIZE).mean()
    with torch.no_grad():
        ref.six[0].copy_(six_from_rotations(truth))
    at_truth = ref.nll(0, data, 0.5, SIZE).mean()
    assert refined < after_search < best_possible
    assert refined < at_truth + 0.05  # as likely as the true poses (a mirror in depth is as likely)
    # The projections of the refined poses are the particles'.
    assert (project(points, ref.rotations(0).detach(), ref.shifts[0].detach()) - data.locs).norm(dim=-1).median() < 0.03


def test_regrid_only_moves_particles_that_it_improves():
    points = asymmetric_points(40).float() * 0.35
    truth = random_rotations(10, torch.Generator().manual_seed(2))
    data = particles_of(points, truth)
    ref = Refinement(options(), points, 10, "none", 0)
    with torch.no_grad():
        ref.six[0].copy_(six_from_rotations(truth))
        ref.six[0][:3] = six_from_rotations(random_rotations(3, torch.Generator().manual_seed(9)))
    before = ref.nll(0, data, 0.5, SIZE)
    ref.search_poses(data, 0.5, SIZE, only_better=True)
    after = ref.nll(0, data, 0.5, SIZE)
    assert (after <= before + 1e-6).all()
    assert (after[:3] < before[:3] - 0.1).all()  # the three wrong ones moved to better grid poses
    assert torch.allclose(after[3:], before[3:])  # the right ones stayed exactly


def test_stray_and_starved_points_are_respawned_with_fresh_optimiser_state():
    points = asymmetric_points(30).float() * 0.35
    truth = random_rotations(8, torch.Generator().manual_seed(3))
    data = particles_of(points, truth)
    unit = points.clone()
    unit[0] = torch.tensor([1.5, 0.0, 0.0])  # outside the frame
    unit[1] = torch.tensor([0.0, 0.0, 0.95])  # inside, but no localisation is near it in any view
    ref = Refinement(options(), unit, 8, "none", 0)
    with torch.no_grad():
        ref.six[0].copy_(six_from_rotations(truth))
    optimiser = torch.optim.Adam(ref.parameter_groups())
    ref.loss(data, 0.5, SIZE, "likelihood", searching=False).backward()
    optimiser.step()
    moved = ref.respawn(data, 0.5, SIZE, step=100, optimizer=optimiser)
    assert moved >= 2
    new = ref.units[0].detach()
    assert new.norm(dim=-1).max() < STRAY
    assert torch.cdist(new[:2], points[2:]).min(dim=1).values.max() < 0.15  # next to points that are used
    state = optimiser.state[ref.units[0]]
    assert state["exp_avg"][0].abs().sum() == 0 and state["exp_avg_sq"][1].abs().sum() == 0
    assert state["exp_avg"][5].abs().sum() > 0  # the others keep theirs


def test_symmetrising_keeps_what_the_particles_see_and_survives_a_state_round_trip():
    angles = torch.arange(8) * 2 * torch.pi / 8
    ring = torch.stack((0.4 * angles.cos(), 0.4 * angles.sin(), torch.zeros(8)), 1)
    sites = torch.cat((ring + torch.tensor([0, 0, 0.2]), ring - torch.tensor([0, 0, 0.2])))
    turn = random_rotations(1, torch.Generator().manual_seed(4))[0]
    free = sites @ turn.T  # the free structure sits in a frame of its own
    truth = random_rotations(6, torch.Generator().manual_seed(5))
    ref = Refinement(options(fsc=True), free, 6, "none", 0)
    with torch.no_grad():
        for i in range(3):
            ref.six[i].copy_(six_from_rotations(truth[ref.index(i)] @ turn.T))
    before = [project(ref.points(i), ref.rotations(i), None).detach() for i in range(3)]
    ref.symmetrise("C8", 2)
    assert ref.units[0].shape == (2, 3) and ref.symmetry == "C8"
    for i in range(3):
        after = project(ref.points(i), ref.rotations(i), None).detach()
        assert chamfer(after, before[i]).max().item() < 0.01
    # The whole structure is the two rings again, about z now (turned about z by an arbitrary angle).
    full = expand(ref.units[0].detach(), "C8")
    assert torch.allclose(full[:, :2].norm(dim=1), torch.full((16,), 0.4), atol=1e-3)
    assert torch.allclose(full[:, 2].abs(), torch.full((16,), 0.2), atol=1e-3)
    assert (torch.cdist(full, full) + torch.eye(16)).min() > 0.1  # 16 distinct sites, none doubled
    state = ref.state()
    fresh = Refinement(options(fsc=True), free, 6, "none", 0)
    fresh.load_state(state)
    assert fresh.symmetry == "C8" and fresh.units[0].shape == (2, 3)
    assert torch.equal(fresh.rotations(2), ref.rotations(2))
