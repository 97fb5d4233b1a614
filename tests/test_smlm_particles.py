"""Simulated picked SMLM particles: the structures' geometry, the statistics a simulation promises (labelling,
repeats, blinking, precision, background, orientations), the table read back through the localisation
reader, and the shipped nup107 examples being exactly what the script writes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.io.localisations import load, read_localisations
from holly_hpc.recon.smlm_particles import (
    MIN_LOCALISATIONS,
    PRESETS,
    main,
    preset,
    simulate_particles,
    structure_sites,
    write_particles,
    write_truth,
)

from .conftest import REPO

EXAMPLES = REPO / "jobspecs" / "data" / "nup107"
NPC = structure_sites("npc")


def _angles(points):
    return np.degrees(np.arctan2(points[:, 1], points[:, 0])) % 360


def _turn(a, b):
    """The angle from b to a in degrees, in [-180, 180)."""
    return (np.asarray(a) - np.asarray(b) + 180) % 360 - 180


def _observed_sites(sim):
    """(particle, site) pairs with at least one localisation."""
    signal = ~sim.is_background
    return {(int(p), int(s)) for p, s in zip(sim.particle[signal], sim.site[signal], strict=True)}


# ---------------------------------------------------------------------------------------------- structures
def test_npc_is_a_double_ring_of_eight_corners_with_two_copies_each():
    sites = structure_sites("npc")
    assert sites.shape == (32, 3) and sites.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(sites[:, :2], axis=1), 50.0)
    assert sorted(set(np.round(sites[:, 2], 9))) == [-30.0, 30.0]  # 60 nm apart
    np.testing.assert_allclose(sites.mean(axis=0), 0, atol=1e-12)
    for z in (-30.0, 30.0):
        ring = sites[np.isclose(sites[:, 2], z)]
        assert len(ring) == 16
        corners = ring.reshape(8, 2, 3)
        np.testing.assert_allclose(_turn(_angles(corners.mean(axis=1)), np.arange(8) * 45.0), 0, atol=1e-9)  # 8-fold
        gaps = np.linalg.norm(corners[:, 0] - corners[:, 1], axis=1)
        np.testing.assert_allclose(gaps, 2 * 50 * math.sin(6 / 50), rtol=1e-12)  # 12 nm along the ring
    assert structure_sites("npc", corners=6, copies=3).shape == (36, 3)


def test_ring_offset_turns_the_second_ring_only():
    plain, turned = structure_sites("npc"), structure_sites("npc", ring_offset_deg=22.5)
    lower, upper = plain[:, 2] < 0, plain[:, 2] > 0
    np.testing.assert_allclose(turned[lower], plain[lower], atol=1e-12)
    np.testing.assert_allclose(_turn(_angles(turned[upper]), _angles(plain[upper])), 22.5, atol=1e-9)


def test_centriole_is_nine_blades_at_its_radius():
    sites = structure_sites("centriole")
    assert sites.shape == (45, 3)
    np.testing.assert_allclose(np.linalg.norm(sites[:, :2], axis=1), 100.0)
    blades = sites.reshape(9, 5, 3)  # blade by blade
    np.testing.assert_allclose(_turn(_angles(blades[:, 0]), np.arange(9) * 40.0), 0, atol=1e-9)  # 9-fold
    np.testing.assert_allclose(blades[:, :, :2], np.broadcast_to(blades[:, :1, :2], (9, 5, 2)), atol=1e-9)
    np.testing.assert_allclose(sorted(set(np.round(sites[:, 2], 9))), np.linspace(-75, 75, 5))  # 150 nm long


def test_tetrahedron_has_equal_edges_and_sites_inside_them():
    sites = structure_sites("tetrahedron")
    assert sites.shape == (4 + 6 * 2, 3)
    vertices = sites[:4]
    edges = [np.linalg.norm(vertices[i] - vertices[j]) for i in range(4) for j in range(i + 1, 4)]
    np.testing.assert_allclose(edges, 100.0)
    np.testing.assert_allclose(sites.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(vertices[0, :2], 0, atol=1e-12)  # a vertex up the 3-fold axis z
    distances = np.linalg.norm(sites[:, None] - sites[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    np.testing.assert_allclose(distances.min(axis=1), 100 / 3)  # edges cut into thirds
    assert structure_sites("tetrahedron", edge_nm=50, sites_per_edge=0).shape == (4, 3)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: structure_sites("ribosome"), "ribosome"),
        (lambda: structure_sites("npc", radius=40), "radius"),
        (lambda: structure_sites("npc", corners=0), "corners"),
        (lambda: structure_sites("centriole", radius_nm=-1), "radius_nm"),
        (lambda: structure_sites("tetrahedron", sites_per_edge=1.5), "sites_per_edge"),
        (lambda: simulate_particles(NPC, mode="palm"), "mode"),
        (lambda: simulate_particles(NPC, labelling=1.5), "labelling"),
        (lambda: simulate_particles(NPC, labelling=0), "labelling"),
        (lambda: simulate_particles(NPC, orientation="bottom"), "orientation"),
        (lambda: simulate_particles(NPC, precision_nm=(5, 2)), "precision_nm"),
        (lambda: simulate_particles(NPC, background=1.0), "background"),
        (lambda: simulate_particles(NPC, particles=0), "particles"),
        (lambda: simulate_particles(NPC, mode="storm", repeats=0.5), "repeats"),
        (lambda: simulate_particles(np.zeros((4, 2))), "sites"),
        (lambda: preset("nup999"), "nup999"),
        (lambda: preset("nup107", mode="smfish"), "mode"),
        (lambda: preset("nup107", particle=3), "particle"),
    ],
)
def test_bad_names_and_parameters_are_refused_by_name(call, named):
    with pytest.raises(ValueError, match=named):
        call()


# ---------------------------------------------------------------------------------------------- simulation
def test_labelling_efficiency_is_recovered_from_the_localisations():
    sim = simulate_particles(NPC, particles=400, labelling=0.3, seed=1)
    assert sim.particles + sim.dropped == 400
    assert abs(sim.present.mean() - 0.3) < 0.015  # 12,800 sites
    observed = len(_observed_sites(sim)) / sim.present.size
    assert abs(observed - 0.3 * (1 - math.exp(-6))) < 0.015  # a labelled site is missed only with P(0 events)
    assert _observed_sites(sim) <= {(int(p), int(s)) for p, s in zip(*np.nonzero(sim.present), strict=True)}


def test_dnapaint_gives_the_configured_repeats_and_storm_fewer_localisations_per_site():
    per_site = {}
    for mode, repeats in [("dnapaint", 6.0), ("dnapaint", 10.0), ("storm", None)]:
        sim = simulate_particles(NPC, particles=300, mode=mode, repeats=repeats, seed=2)
        per_site[mode, repeats] = (~sim.is_background).sum() / sim.present.sum()
    assert abs(per_site["dnapaint", 6.0] - 6.0) < 0.15
    assert abs(per_site["dnapaint", 10.0] - 10.0) < 0.25
    assert abs(per_site["storm", None] - 2 * 2) < 0.2  # 2 events on average, each 1 + Poisson(1) blinks
    assert per_site["storm", None] < per_site["dnapaint", 6.0]


def test_storm_bursts_are_runs_of_consecutive_frames_at_one_site():
    sim = simulate_particles(NPC, particles=50, mode="storm", seed=3)
    signal = ~sim.is_background
    follows = (np.diff(sim.frame) == 1) & (np.diff(sim.particle) == 0) & signal[1:] & signal[:-1]
    assert follows.mean() > 0.3  # blinks of one event come in consecutive frames
    assert (sim.site[1:][follows] == sim.site[:-1][follows]).mean() > 0.95
    dnapaint = simulate_particles(NPC, particles=50, seed=3)
    assert ((np.diff(dnapaint.frame) == 1) & (np.diff(dnapaint.particle) == 0)).mean() < 0.05


def test_precision_is_per_localisation_and_within_the_range():
    sim = simulate_particles(NPC, particles=100, precision_nm=(4.0, 9.0), linker_nm=0.0, radius_jitter=0.0, seed=4)
    assert sim.precision.min() >= 4.0 and sim.precision.max() <= 9.0
    assert len(np.unique(sim.precision)) == len(sim.precision)  # drawn per localisation
    assert abs(sim.precision.mean() - 6.5) < 0.1
    # Without linker or jitter a signal localisation is off its site by its precision alone (z 2.5x worse).
    signal = ~sim.is_background
    truth = np.einsum("nij,nj->ni", sim.rotations[sim.particle[signal]], sim.sites[sim.site[signal]]) + np.column_stack(
        [sim.centres[sim.particle[signal]], np.zeros(signal.sum())]
    )
    z_scores = (sim.xyz[signal] - truth) / (sim.precision[signal, None] * np.array([1.0, 1.0, 2.5]))
    np.testing.assert_allclose(z_scores.std(axis=0), 1.0, atol=0.03)


@pytest.mark.parametrize("fraction", [0.03, 0.1])
def test_background_is_the_configured_share_and_fills_the_box(fraction):
    sim = simulate_particles(NPC, particles=300, background=fraction, seed=5)
    assert abs(sim.is_background.mean() - fraction) < 0.2 * fraction + 0.003
    half = sim.metadata["box_half_nm"]
    assert half == pytest.approx(np.linalg.norm([50, 30]) * 1.05 + 30)
    stray = sim.xyz[sim.is_background]  # uniform over the box about the pick's origin (+ precision)
    assert np.abs(stray[:, :2]).max() < half + 5 * 12
    assert abs(stray[:, 0].mean()) < 0.1 * half and np.abs(stray[:, :2]).mean() > 0.4 * half
    assert (sim.site[sim.is_background] == -1).all() and (sim.site[~sim.is_background] >= 0).all()


def test_orientations_top_and_side_keep_the_axis_near_the_view_or_the_plane():
    tilt = {}
    for kind in ("uniform", "top", "side", "envelope"):
        sim = simulate_particles(NPC, particles=2000, orientation=kind, seed=6)
        identity = np.broadcast_to(np.eye(3), (2000, 3, 3))
        np.testing.assert_allclose(sim.rotations @ sim.rotations.transpose(0, 2, 1), identity, atol=1e-9)
        np.testing.assert_allclose(np.linalg.det(sim.rotations), 1.0, atol=1e-9)
        tilt[kind] = np.abs(sim.rotations[:, 2, 2])  # |cos| of the axis' angle to the view direction
    assert abs(tilt["uniform"].mean() - 0.5) < 0.05  # Haar: |cos| of the axis' tilt is uniform on [0, 1]
    assert np.median(tilt["top"]) > math.cos(math.radians(25)) and tilt["top"].mean() > 0.9
    assert np.median(tilt["side"]) < math.sin(math.radians(25)) and tilt["side"].mean() < 0.25
    top_ish = (tilt["envelope"] > math.cos(math.radians(30))).mean()
    assert 0.58 < top_ish < 0.68  # 60% top (95% of them within 30°), 40% uniform (13% of them): 0.63


def test_radius_jitter_and_centring_error_are_as_configured():
    sim = simulate_particles(NPC, particles=400, radius_jitter=0.1, centring_nm=8.0, seed=7)
    assert sim.scales.min() >= 0.9 and sim.scales.max() <= 1.1 and sim.scales.std() > 0.05
    assert abs(sim.centres.std() - 8.0) < 0.8 and np.abs(sim.centres.mean(axis=0)).max() < 1.6
    fixed = simulate_particles(NPC, particles=20, radius_jitter=0.0, centring_nm=0.0, seed=7)
    assert (fixed.scales == 1).all() and (fixed.centres == 0).all()


def test_sparse_particles_are_dropped_counted_and_the_rest_renumbered():
    sim = simulate_particles(NPC, particles=200, labelling=0.02, repeats=2, background=0.0, seed=8)
    assert sim.dropped > 100 and sim.particles == 200 - sim.dropped == sim.metadata["particles"] - sim.dropped
    assert sim.counts().min() >= MIN_LOCALISATIONS
    np.testing.assert_array_equal(np.unique(sim.particle), np.arange(sim.particles))
    assert len(sim.present) == len(sim.scales) == len(sim.centres) == sim.particles


def test_a_seed_gives_the_same_particles():
    a, b = (simulate_particles(NPC, particles=30, mode="storm", seed=9) for _ in range(2))
    for name in ("xyz", "precision", "particle", "frame", "site", "rotations", "centres", "scales", "present"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    c = simulate_particles(NPC, particles=30, mode="storm", seed=10)
    assert len(c.xyz) != len(a.xyz) or not np.array_equal(c.xyz, a.xyz)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    labelling=st.floats(0.05, 1.0),
    mode=st.sampled_from(["dnapaint", "storm"]),
    particles=st.integers(1, 12),
    structure=st.sampled_from(["npc", "centriole", "tetrahedron"]),
)
def test_any_simulation_is_consistent(seed, labelling, mode, particles, structure):
    sim = simulate_particles(structure_sites(structure), particles=particles, mode=mode, labelling=labelling, seed=seed)
    n, kept = len(sim.xyz), sim.particles
    assert kept + sim.dropped == particles
    for column in (sim.precision, sim.particle, sim.frame, sim.is_background, sim.site):
        assert len(column) == n
    np.testing.assert_array_equal(np.unique(sim.particle), np.arange(kept))  # ids contiguous from 0
    assert (np.diff(sim.particle) >= 0).all()  # sorted by particle...
    same = np.diff(sim.particle) == 0
    assert (np.diff(sim.frame)[same] >= 0).all()  # ...then frame
    assert ((sim.precision >= 3.0) & (sim.precision <= 12.0)).all()
    assert kept == 0 or sim.counts().min() >= MIN_LOCALISATIONS
    assert sim.rotations.shape == (kept, 3, 3) and sim.centres.shape == (kept, 2) and sim.scales.shape == (kept,)
    assert sim.present.shape == (kept, len(sim.sites))
    signal = ~sim.is_background
    assert sim.present[sim.particle[signal], sim.site[signal]].all()  # only labelled sites are localised
    assert np.isfinite(sim.xyz).all() and sim.xyz.shape == (n, 3)


# ------------------------------------------------------------------------------------------------ presets
def test_nup107_looks_like_real_data_in_both_modes():
    dnapaint, storm = preset("nup107"), preset("nup107", mode="storm")
    assert dnapaint.mode == "dnapaint" and storm.mode == "storm"
    assert dnapaint.particles == storm.particles == 300
    assert dnapaint.sites.shape == (32, 3) and dnapaint.metadata["labelling"] == 0.5
    assert dnapaint.metadata["repeats"] == 6 and storm.metadata["repeats"] == 2
    assert 30 <= np.median(dnapaint.counts()) <= 180  # like picked Nup107 DNA-PAINT data
    assert 20 <= np.median(storm.counts()) < np.median(dnapaint.counts())
    assert dnapaint.metadata["preset"] == "nup107" and dnapaint.metadata["structure"] == "npc"


@pytest.mark.parametrize("name", ["centriole", "tetrahedron"])
def test_the_other_presets_simulate_about_two_hundred_particles(name):
    sim = preset(name, seed=1)
    assert sim.particles + sim.dropped == PRESETS[name]["simulation"]["particles"] == 200
    assert sim.dropped == 0 and np.median(sim.counts()) >= 30
    assert preset(name, particles=5).particles == 5


# ------------------------------------------------------------------------------------------------ writers
def test_the_table_reads_back_with_ids_nm_and_precision(tmp_path):
    sim = simulate_particles(NPC, particles=40, seed=11)
    path = write_particles(tmp_path / "particles.csv", sim)
    assert path.read_text().splitlines()[0] == "particle,frame,x [nm],y [nm],precision [nm]"
    locs = load(path)
    assert locs.format == "table" and not locs.has_z
    table = read_localisations(path)
    assert sorted(table.particles) == list(range(40)) and not table.has_z and table.dropped == []
    for pid, points in table.particles.items():
        rows = sim.particle == pid
        np.testing.assert_allclose(points, sim.xyz[rows, :2], atol=0.005 + 1e-9)  # nm, 2 decimals
        np.testing.assert_allclose(table.precision[pid], sim.precision[rows], atol=0.005 + 1e-9)
    sim3d = simulate_particles(NPC, particles=10, project=False, seed=11)
    table3d = read_localisations(write_particles(tmp_path / "3d.csv", sim3d))
    assert table3d.has_z and len(table3d.particles) == 10
    np.testing.assert_allclose(np.concatenate(list(table3d.particles.values())), sim3d.xyz, atol=0.005 + 1e-9)


def test_truth_files_hold_the_sites_and_poses(tmp_path):
    sim = simulate_particles(NPC, particles=12, seed=12)
    sites_path, poses_path = write_truth(tmp_path / "truth", sim)
    sites = np.array([[float(v) for v in row.values()] for row in csv.DictReader(sites_path.open())])
    np.testing.assert_allclose(sites, sim.sites, atol=5e-5)
    poses = list(csv.DictReader(poses_path.open()))
    assert [int(row["particle"]) for row in poses] == list(range(12))
    rotations = np.array([[float(row[f"r{i}{j}"]) for i in range(3) for j in range(3)] for row in poses])
    np.testing.assert_allclose(rotations.reshape(-1, 3, 3), sim.rotations, atol=5e-7)
    np.testing.assert_allclose([[float(r["cx [nm]"]), float(r["cy [nm]"])] for r in poses], sim.centres, atol=5e-3)
    np.testing.assert_allclose([float(r["scale"]) for r in poses], sim.scales, atol=5e-5)


@pytest.mark.parametrize("mode", ["dnapaint", "storm"])
def test_the_shipped_nup107_data_is_what_the_script_writes(tmp_path, mode, capsys):
    argv = [str(tmp_path / mode), "--preset", "nup107", "--mode", mode, "--particles", "300", "--seed", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "particles.csv" in printed and "median" in printed and "background" in printed
    for name in ("particles.csv", "truth_sites.csv", "truth_poses.csv"):
        assert (tmp_path / mode / name).read_bytes() == (EXAMPLES / mode / name).read_bytes(), f"{mode}/{name}"
    shipped = EXAMPLES / mode / "particles.csv"
    assert shipped.stat().st_size < 1.5e6
    table = read_localisations(shipped)
    assert len(table.particles) == 300
    assert 30 <= np.median(list(table.counts().values())) <= 180
