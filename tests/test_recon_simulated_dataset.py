"""Simulated data as HOLLy made it: several fluorophores per site (max_spawn), and a fixed, finite training set
visited in epochs, with validation and test sets of their own (built directly: no spec keys)."""

from __future__ import annotations

import math

import pytest
import torch

from holly_hpc.recon.geometry import geodesic_angle_deg
from holly_hpc.recon.simulate import (
    DATASET_CHUNK,
    LocalisationNoise,
    batch_generator,
    fixed_items,
    load_structure,
    noisy_points,
    simulate_batch,
)
from holly_hpc.recon.sources import SimulatedSource

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------- max_spawn
def test_each_site_spawns_a_binomial_number_of_extra_fluorophores():
    n, batch, k, p, spread = 300, 40, 3, 0.3, 0.05
    points = torch.zeros(n, 3)
    noise = LocalisationNoise(wobble=0.02, spawn=p, spawn_spread=spread, max_spawn=k)
    out, weights = noisy_points(points, batch, noise, torch.Generator().manual_seed(0))
    assert out.shape == (batch, n * (1 + k), 3) and weights.shape == (batch, n * (1 + k))
    assert noise.points_per_image(n) == n * (1 + k)
    assert torch.equal(weights[:, :n], torch.ones(batch, n))  # no dropout: every site is there
    counts = weights[:, n:].reshape(batch, k, n).sum(1)  # extras of each site in each image
    assert set(counts.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert counts.mean().item() == pytest.approx(k * p, abs=0.02)  # Binomial(K, p): mean Kp
    assert counts.var().item() == pytest.approx(k * p * (1 - p), rel=0.05)  # ... and variance Kp(1-p)
    # Each extra lies spawn_spread (Gaussian std) from its own site, wobble included.
    sites = out[:, :n]
    extras = out[:, n:].reshape(batch, k, n, 3)
    assert (extras - sites[:, None]).std().item() == pytest.approx(spread, rel=0.03)
    assert (extras[:, 0] - extras[:, 1]).std().item() == pytest.approx(spread * math.sqrt(2), rel=0.03)


def test_max_spawn_one_draws_what_a_single_spawn_did_and_zero_spawns_none():
    points = torch.randn(50, 3)
    noise = LocalisationNoise(wobble=0.01, dropout=0.2, spawn=0.4, spawn_spread=0.03)
    assert noise.max_spawn == 1
    out, weights = noisy_points(points, 6, noise, torch.Generator().manual_seed(4))
    # The draws of the single-spawn model, written out: wobble, dropout, one extra per site.
    g = torch.Generator().manual_seed(4)
    sites = points + 0.01 * torch.randn(6, 50, 3, generator=g)
    kept = (torch.rand(6, 50, generator=g) >= 0.2).float()
    extra = sites + 0.03 * torch.randn(6, 50, 3, generator=g)
    spawned = (torch.rand(6, 50, generator=g) < 0.4).float()
    assert torch.equal(out, torch.cat((sites, extra), 1)) and torch.equal(weights, torch.cat((kept, spawned), 1))
    none, w = noisy_points(points, 6, LocalisationNoise(dropout=0.1, spawn=0.5, max_spawn=0), torch.Generator())
    assert none.shape == (6, 50, 3) and w.shape == (6, 50)
    assert not LocalisationNoise(spawn=0.5, max_spawn=0).active
    with pytest.raises(ValueError, match="max_spawn"):
        LocalisationNoise(spawn=0.5, max_spawn=-1)


def test_simulated_images_carry_the_extra_mass():
    structure = load_structure("torus", 40, 0.5)
    noise = LocalisationNoise(spawn=1.0, spawn_spread=0.01, max_spawn=4)  # every extra present: 5 blobs a site
    plain = simulate_batch(structure, 4, 32, 1.0, 0.0, batch_generator(0, 0), CPU)
    many = simulate_batch(structure, 4, 32, 1.0, 0.0, batch_generator(0, 0), CPU, noise)
    assert torch.equal(plain["rotations"], many["rotations"])  # the poses are drawn first, as before
    ratio = many["images"].sum((1, 2)) / plain["images"].sum((1, 2))
    assert ratio.tolist() == pytest.approx([5.0] * 4, rel=1e-3)


# ------------------------------------------------------------------------------------- fixed dataset
def _data(**simulate) -> dict:
    sim = {
        "structure": "torus",
        "num_points": 24,
        "radius": 0.6,
        "wobble": 0.02,
        "dropout": 0.1,
        "spawn": 0.2,
        "spawn_spread": 0.02,
        **simulate,
    }
    return {"image_size": 16, "max_translation": 0.1, "eval_size": 12, "augment_in_plane": False, "simulate": sim}


def _source(seed=3, augment=False, **simulate) -> SimulatedSource:
    data = _data(**simulate)
    data["augment_in_plane"] = augment
    return SimulatedSource(data, seed, CPU, base_dir=None)


def test_without_a_dataset_size_the_stream_is_as_before():
    source = _source()
    assert source.dataset_size == 0 and source.items is None and source.report_lines == ()
    batch = source.train_batch(17, 8, 1.5)
    expected = simulate_batch(
        source.ground_truth, 8, 16, 1.5, 0.1, batch_generator(3, 17), CPU, LocalisationNoise(0.02, 0.1, 0.2, 0.02)
    )
    assert all(torch.equal(batch[k], expected[k]) for k in expected)
    assert source.eval_batch(1.5)["images"].shape == (12, 16, 16)  # validation falls back on data.eval_size
    with pytest.raises(ValueError, match="test_size"):
        source.test_batch(1.5)
    with pytest.raises(ValueError, match="dataset_size"):
        source.train_items(0, 8)


def test_every_epoch_visits_every_training_item_exactly_once_in_a_new_order():
    n, b = 50, 8  # 50 is no multiple of 8: batches straddle epochs
    source = _source(dataset_size=n)
    positions = torch.cat([source.train_items(step, b) for step in range(25)])  # 200 positions: 4 epochs
    epochs = positions.reshape(4, n)
    for order in epochs:
        assert sorted(order.tolist()) == list(range(n))
    assert len({tuple(order.tolist()) for order in epochs}) == 4  # reshuffled every epoch
    assert source.epoch(25, b) == 4.0 and source.epoch(3, b) == pytest.approx(0.48)
    # A pure function of (seed, step): another source, asked out of order, picks the same items.
    again = _source(dataset_size=n)
    assert torch.equal(again.train_items(24, b), source.train_items(24, b))
    assert torch.equal(again.train_items(2, b), positions[16:24])
    assert not torch.equal(_source(seed=4, dataset_size=n).train_items(0, 32), source.train_items(0, 32))


def test_a_training_item_is_the_same_image_every_time_it_is_seen():
    n = 30
    source = _source(dataset_size=n)
    first, second = source.train_items(0, n), source.train_items(1, n)  # epochs 0 and 1, whole
    a, b = source.train_batch(0, n, 1.2), source.train_batch(1, n, 1.2)
    where = torch.argsort(second)[first]  # the position in epoch 1 of each item of epoch 0
    assert torch.equal(a["images"], b["images"][where]) and torch.equal(a["rotations"], b["rotations"][where])
    assert torch.equal(a["rotations"], source.items.rotations[first])
    # The noise is fixed per item too: its own points, not the structure's.
    assert source.items.points.shape == (n, 24 * 2, 3) and source.items.weights.shape == (n, 48)
    # With in-plane augmentation an item comes back spun about the view axis only: R' = Rz R.
    spun = _source(dataset_size=n, augment=True)
    c, d = spun.train_batch(0, n, 1.2), spun.train_batch(1, n, 1.2)
    rel = d["rotations"][where] @ c["rotations"].transpose(1, 2)
    assert torch.allclose(rel[:, 2], torch.tensor([0.0, 0.0, 1.0]).expand(n, 3), atol=1e-5)
    assert geodesic_angle_deg(c["rotations"], d["rotations"][where]).min() > 0.01
    assert torch.equal(c["translations"], d["translations"][where])


def test_validation_and_test_sets_are_disjoint_from_the_training_set_and_each_other():
    source = _source(dataset_size=200, validation_size=20, test_size=15)
    val, test = source.eval_batch(1.0), source.test_batch(1.0)
    assert val["images"].shape == (20, 16, 16) and test["images"].shape == (15, 16, 16)
    train = source.items.rotations
    for held in (val["rotations"], test["rotations"]):
        angles = geodesic_angle_deg(held[:, None].expand(-1, len(train), 3, 3), train[None].expand(len(held), -1, 3, 3))
        assert angles.min() > 0.05  # no held-out pose is a training pose
    assert geodesic_angle_deg(val["rotations"][:15], test["rotations"]).min() > 0.05
    # Fixed sets: the same images at every call.
    assert torch.equal(source.test_batch(1.0)["images"], test["images"])
    assert torch.equal(source.eval_batch(1.0)["images"], val["images"])
    assert source.report_lines == (
        "data: a fixed simulated set of 200 images (poses and noise fixed by seed 3), in a new order every epoch",
        "data: 20 simulated images held out for validation, 15 for the test at the end",
    )


def test_item_i_depends_on_the_seed_and_i_alone():
    structure = load_structure("torus", 10, 0.6)
    noise = LocalisationNoise(0.02, 0.1, 0.3, 0.02, max_spawn=2)
    small = fixed_items(structure, DATASET_CHUNK + 10, 0.1, 5, noise)
    large = fixed_items(structure, DATASET_CHUNK + 300, 0.1, 5, noise)
    assert len(small) == DATASET_CHUNK + 10 and small.points.shape == (DATASET_CHUNK + 10, 30, 3)
    for field in ("rotations", "translations", "points", "weights"):
        assert torch.equal(getattr(small, field), getattr(large, field)[: DATASET_CHUNK + 10]), field
    assert not torch.equal(fixed_items(structure, 10, 0.1, 6, noise).rotations, small.rotations[:10])
    # Without noise the items share the structure's points.
    plain = fixed_items(structure, 7, 0.1, 5)
    assert plain.weights is None and plain.points is structure.points
    assert plain.take(torch.tensor([3, 1])).rotations.shape == (2, 3, 3)


def test_batches_of_a_fixed_set_are_the_same_after_a_restart():
    """What resume needs: a new source (a restarted task) gives the batch of any step bit for bit."""
    a = _source(dataset_size=64, max_spawn=3, spawn=0.3)
    for step in (0, 1, 5, 40):  # the order cache fills and empties on the way
        a.train_batch(step, 16, 1.0)
    b = _source(dataset_size=64, max_spawn=3, spawn=0.3)
    for step in (41, 7):
        x, y = a.train_batch(step, 16, 1.0), b.train_batch(step, 16, 1.0)
        assert all(torch.equal(x[k], y[k]) for k in x)
