"""Particle picking on simulated fields of view that look like real ones: sparse labelling (50%), repeated
and imprecise localisations, background, random 3D orientations; plus the clusters a picker must drop
(cut by the edge, two particles merged, a lone blinking dye)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from holly_hpc.recon.picking import PickingOptions, pick_particles, picked_picture, write_picked_csv
from holly_hpc.recon.smlm_field import simulate_field


def _match(picked, centres):
    """For each kept cluster, the nearest true centre's index and its distance."""
    kept = np.array([[c.x_nm, c.y_nm] for c in picked.kept])
    distances = np.linalg.norm(kept[:, None] - centres[None], axis=2)
    return distances.argmin(axis=1), distances.min(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["dbscan", "hdbscan"])
def test_picking_finds_every_simulated_particle_once(seed, method):
    field = simulate_field(particles=64, seed=seed)
    picked = pick_particles(field.xyz[:, :2], PickingOptions(method=method))
    assert abs(len(picked.kept) - 64) <= 0.05 * 64
    nearest, _ = _match(picked, field.centres)
    assert len(set(nearest.tolist())) == len(nearest)  # no particle split in two, none picked twice
    # Centres: each cluster's centre is its particle's centre as the localisations show it (with half the
    # sites unlabelled the structure's own centre is not observable), within 10 nm.
    observed = np.array([field.xyz[field.particle == k, :2].mean(axis=0) for k in range(64)])
    kept = np.array([[c.x_nm, c.y_nm] for c in picked.kept])
    # HDBSCAN leaves a particle's sparsest piece out when it is more than eps_nm from the rest: 20 nm there.
    tolerance = 10.0 if method == "dbscan" else 20.0
    assert np.linalg.norm(kept - observed[nearest], axis=1).max() < tolerance


def test_fully_labelled_particles_are_centred_on_the_structure():
    field = simulate_field(particles=36, labelling=1.0, seed=4)
    picked = pick_particles(field.xyz[:, :2], PickingOptions())
    assert len(picked.kept) == 36
    _, distances = _match(picked, field.centres)
    assert distances.max() < 10.0


def test_clusters_that_are_not_one_whole_particle_are_dropped():
    field = simulate_field(particles=16, seed=5)  # 4 x 4 particles 500 nm apart, with background
    xy, owner = field.xyz[:, :2], field.particle
    # Cut the field through the first column of particles: the edge of the field now cuts those.
    edge_x = np.sort(field.centres[:, 0])[:4].mean()
    inside = xy[:, 0] >= edge_x
    xy, owner = xy[inside], owner[inside]
    # Two touching particles (centres 130 nm apart) merge into one cluster; a lone dye blinks 8 times; both inside the field.
    rng = np.random.default_rng(0)
    top = field.centres[:, 1].max() + 250
    angles = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    ring = np.column_stack([np.cos(angles), np.sin(angles)]) * 50
    pair_centre = np.array([field.centres[:, 0].mean(), top])
    pair = np.concatenate([ring + pair_centre, ring + pair_centre + [130, 0]]) + rng.normal(0, 5, (120, 2))
    dye = np.array([field.centres[:, 0].mean() - 300, top]) + rng.normal(0, 5, (8, 2))
    picked = pick_particles(np.concatenate([xy, pair, dye]), PickingOptions())
    reasons = picked.dropped_by_reason()
    assert len(picked.kept) == 12  # the other three columns
    assert reasons["large"] == 1  # the pair
    # The four cut particles (dropped as cut, or as too few when little of one is left) and the dye.
    assert reasons["edge"] >= 2 and sum(reasons.values()) == 1 + 4 + 1
    assert all(c.localisations >= 15 and 30 <= c.diameter_nm <= 180 for c in picked.kept)
    assert set(np.unique(picked.labels)) == {-1} | {c.particle for c in picked.kept}


def test_without_background_the_outermost_particles_count_as_cut():
    # The field's edge is where its localisations end: with no background there, the outer particles touch
    # it and are dropped (conservatively); edge_nm: 0 keeps them.
    field = simulate_field(particles=16, background=0.0, seed=7)
    assert len(pick_particles(field.xyz[:, :2], PickingOptions()).kept) < 16
    assert len(pick_particles(field.xyz[:, :2], PickingOptions(edge_nm=0.0)).kept) == 16


def test_picked_csv_and_picture(tmp_path):
    field = simulate_field(particles=9, seed=6)
    picked = pick_particles(field.xyz[:, :2], PickingOptions())
    path = write_picked_csv(tmp_path / "picked.csv", picked, "field.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(picked.clusters)
    assert list(rows[0]) == ["particle", "x [nm]", "y [nm]", "localisations", "diameter [nm]", "kept", "reason", "file"]
    assert sum(int(r["kept"]) for r in rows) == len(picked.kept) and rows[0]["file"] == "field.csv"
    picture = picked_picture(field.xyz[:, :2], picked)
    assert max(picture.size) == 1024
    pixels = np.asarray(picture)
    assert ((pixels[..., 1] > 150) & (pixels[..., 0] < 50)).sum() > 100  # green circles drawn


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown picking method 'kmeans'"):
        pick_particles(np.zeros((10, 2)), PickingOptions(method="kmeans"))
