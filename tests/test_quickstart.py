"""The README's quickstart, as a newcomer runs it: submit (non-blocking), watch status, open TensorBoard."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, env_for_subprocess, holly_hpc_exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _submit_and_wait(tmp_path: Path, name: str, timeout: int) -> Path:
    """Run `holly-hpc submit jobspecs/<name>.yaml --wait` from a copy of jobspecs/ in tmp_path, as the README
    shows it; return the experiment's one task folder."""
    shutil.copytree(REPO / "jobspecs", tmp_path / "jobspecs")
    done = subprocess.run(
        [*holly_hpc_exe(), "submit", f"jobspecs/{name}.yaml", "--wait"],
        cwd=tmp_path,
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (task_dir,) = (tmp_path / "runs" / name).glob("tasks/*")
    return task_dir


@pytest.mark.slow
def test_quickstart_reaches_under_10_degrees_and_shows_in_tensorboard(tmp_path):
    shutil.copytree(REPO / "jobspecs", tmp_path / "jobspecs")
    env = env_for_subprocess()
    started = time.time()
    submit = subprocess.run(
        [*holly_hpc_exe(), "submit", "jobspecs/quickstart.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert submit.returncode == 0, submit.stderr
    root = tmp_path / "runs" / "quickstart-torus"
    assert f"outputs:     {root}" in submit.stdout
    assert time.time() - started < 60, "submit must return without waiting for the task"

    deadline = started + 600  # the bound: under 10 minutes on 2 CPU cores
    while True:
        status = subprocess.run(
            [*holly_hpc_exe(), "status", "runs/quickstart-torus"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        state = status.stdout.splitlines()[1].split()[2]
        if state in ("succeeded", "failed", "cancelled") or time.time() > deadline:
            break
        time.sleep(3)
    assert state == "succeeded", status.stdout
    (metrics_file,) = root.glob("tasks/*/final/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["step"] == 1000
    assert metrics["rot_err_median_deg"] < 10.0, metrics

    # The README's TensorBoard command serves the task's run with its scalars.
    port = _free_port()
    tb = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("tensorboard")),
            "--logdir",
            "runs/quickstart-torus/tasks",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        runs, until = [], time.time() + 60
        while time.time() < until:
            try:
                runs = _get_json(f"http://127.0.0.1:{port}/data/runs")
                if runs:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        task_run = f"{metrics_file.parent.parent.name}/tb"
        assert runs == [task_run]
        tags = _get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
        assert {"train/loss", "eval/rot_err_median_deg"} <= set(tags[task_run])
    finally:
        tb.terminate()
        tb.wait(10)


@pytest.mark.slow
def test_reconstruct_cpu_spec_reaches_the_readme_structure_error(tmp_path):
    """jobspecs/reconstruct-torus-cpu.yaml, as the README quotes it: Chamfer/diameter <= 0.05."""
    task_dir = _submit_and_wait(tmp_path, "reconstruct-torus-cpu", timeout=1200)
    metrics = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert metrics["step"] == 4000
    assert metrics["structure_error"] <= 0.05, metrics
    assert metrics["rot_err_median_deg"] < 10, metrics


@pytest.mark.slow
def test_reconstruct_localisations_spec_picks_the_field_and_writes_a_structure_in_nm(tmp_path):
    """jobspecs/reconstruct-localisations.yaml: the shipped ThunderSTORM field of 36 NPC-like particles
    (radius 50 nm, rings 60 nm apart) is picked and reconstructed; the structure comes out in nm, at the
    particles' scale (a check without ground truth: its median radius about its centre)."""
    task_dir = _submit_and_wait(tmp_path, "reconstruct-localisations", timeout=900)
    metrics = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert metrics["step"] == 1500 and metrics["nm_per_unit"] == 128.0
    summary = json.loads((task_dir / "data" / "summary.json").read_text())
    assert summary["clusters_found"] == summary["particles_kept"] == 36
    ply = (task_dir / "final" / "structure.ply").read_text().splitlines()
    points = np.array([[float(v) for v in line.split()] for line in ply[ply.index("end_header") + 1 :]])
    radius = np.median(np.linalg.norm(points - points.mean(axis=0), axis=1))
    assert 35 < radius < 75, radius


@pytest.mark.slow
def test_reconstruct_npc_realistic_spec_finds_the_pore_without_imposing_its_symmetry(tmp_path):
    """jobspecs/reconstruct-npc-realistic.yaml: ~300 Nup107-like DNA-PAINT particles (2D, 50% labelling),
    no symmetry imposed. The issue's targets: 8-fold detected (power at 8 over the mean of 3..12 above 3),
    radius and ring spacing within 10% of the truth (50 and 60 nm), structure error <= 0.05, gold-standard
    FSC resolution <= 20 nm; and a report a user can read."""
    task_dir = _submit_and_wait(tmp_path, "reconstruct-npc-realistic", timeout=1500)
    metrics = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert metrics["symmetry_n"] == 8 and metrics["symmetry_power_ratio"] > 3, metrics
    assert abs(metrics["radius_nm"] - 50) <= 5 and abs(metrics["ring_spacing_nm"] - 60) <= 6, metrics
    assert metrics["structure_error"] <= 0.05, metrics
    assert metrics["fsc_resolution_nm"] <= 20, metrics
    assert metrics["rot_err_median_deg"] < 10, metrics  # measured: 6.5 (modulo D8 and the rings' mirror plane)
    report = (task_dir / "final" / "report.md").read_text()
    assert "particles used: 300" in report and "8-fold" in report and "two rings" in report


@pytest.mark.slow
def test_reconstruct_asymmetric_cpu_spec_reaches_the_readme_figures(tmp_path):
    """jobspecs/reconstruct-asymmetric-cpu.yaml: four pose hypotheses recover an asymmetric structure."""
    task_dir = _submit_and_wait(tmp_path, "reconstruct-asymmetric-cpu", timeout=1500)
    metrics = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert metrics["structure_error"] <= 0.05, metrics
    assert metrics["rot_err_median_deg"] < 30, metrics


@pytest.mark.slow
def test_reconstruct_teapot_cpu_spec_half_the_poses_sit_in_the_image_equivalent_flip(tmp_path):
    """jobspecs/reconstruct-teapot-cpu.yaml: a mirror-symmetric shape is recovered, its points stay in the
    frame, and about half the images take the pose that gives the same picture (R and M·R·Q): the strict
    median calls them wrong, the flip-aware one does not (the README's figures)."""
    import zarr

    task_dir = _submit_and_wait(tmp_path, "reconstruct-teapot-cpu", timeout=1500)
    metrics = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert metrics["structure_error"] <= 0.05, metrics  # measured: 0.030
    assert metrics["rot_err_median_deg"] < 20, metrics  # measured: 10.5
    assert metrics["rot_err_strict_median_deg"] > metrics["rot_err_median_deg"] + 15, metrics  # measured: 42.9
    assert 0.3 < metrics["rot_flipped_share"] < 0.7, metrics  # measured: 0.52
    points = zarr.open_group(str(task_dir / "outputs.zarr"), mode="r")["structure/points"][:]
    assert float(np.linalg.norm(points, axis=1).max()) <= 1.0  # no point left the image


@pytest.mark.slow
def test_embed_vqvae_spec_beats_the_pca_baseline_within_15_minutes(tmp_path):
    """jobspecs/embed-vqvae.yaml on CPU: finishes within the issue's 15 minutes, embeds all 2,000 cells,
    and both readouts beat PCA of the raw pixels at their own dimension, as the README quotes."""
    import zarr

    task_dir = _submit_and_wait(tmp_path, "embed-vqvae", timeout=900)
    metrics = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert metrics["step"] == 800
    for prefix, baseline in (("eval", "baseline"), ("features", "features_baseline")):
        scores = {
            c: (metrics[f"{prefix}_{c}_balanced_accuracy"], metrics[f"{baseline}_{c}_balanced_accuracy"])
            for c in ("logreg", "forest")
        }
        assert all(ours > base for ours, base in scores.values()), (prefix, scores)
        assert scores["logreg"][0] > scores["logreg"][1] + 0.05, (prefix, scores)  # measured: +0.11 and +0.33
    assert metrics["features_logreg_balanced_accuracy"] > 0.9, metrics  # measured: 0.978
    assert metrics["eval_perplexity"] > 8, metrics  # the grid uses many codes, not a handful
    group = zarr.open_group(str(task_dir / "outputs.zarr"), mode="r")
    assert sum(group[f"embeddings/{s}/embedding"].shape[0] for s in ("train", "val", "test")) == 2000
    report = json.loads((task_dir / "final" / "eval.json").read_text())
    assert report["images"] == 2000 and report["embedding"]["baseline"]["name"] == "pca128"


@pytest.mark.slow
def test_embed_ssl_spec_beats_the_pca_baseline_with_every_probe_within_15_minutes(tmp_path):
    """jobspecs/embed-ssl.yaml on CPU: SimCLR finishes within the issue's 15 minutes, embeds all 1,000 cells,
    writes the views it learned from, and both readouts beat PCA of the raw pixels with every probe."""
    task_dir = _submit_and_wait(tmp_path, "embed-ssl", timeout=900)
    metrics = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert metrics["step"] == 600
    for prefix, baseline in (("eval", "baseline"), ("features", "features_baseline")):
        for probe in ("logreg", "knn", "forest"):
            ours, base = (
                metrics[f"{prefix}_{probe}_balanced_accuracy"],
                metrics[f"{baseline}_{probe}_balanced_accuracy"],
            )
            assert ours > base + 0.1, (prefix, probe, ours, base)  # measured: 0.997-0.999 against 0.65-0.83
        assert metrics[f"{prefix}_knn_balanced_accuracy"] > 0.95, metrics  # measured: 0.997
    assert (task_dir / "final" / "inputs_and_views.png").stat().st_size > 0
    report = json.loads((task_dir / "final" / "eval.json").read_text())
    assert report["images"] == 1000 and report["split"]["name"] == "stratified"


@pytest.mark.slow
def test_infogan_cells_spec_runs_within_15_minutes_and_its_codes_carry_information(tmp_path):
    """jobspecs/infogan-cells.yaml on CPU: finishes within the issue's 15 minutes; the categorical code's MI
    bound is near its maximum log 3 and, as a clustering of the real cells, finds their three stages far above
    chance; traversals, GIFs, samples and the generator are written."""
    import zarr

    task_dir = _submit_and_wait(tmp_path, "infogan-cells", timeout=900)
    metrics = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert metrics["mi_cat0"] > 0.95 * metrics["mi_cat0_max"], metrics
    assert metrics["diversity_ratio"] > 0.5, metrics  # no collapse
    assert metrics["cluster_chance"] == pytest.approx(1 / 3) and metrics["cluster_images"] == 1500
    assert metrics["cluster_accuracy_all"] > 2 * metrics["cluster_chance"], metrics
    names = sorted(p.name for p in (task_dir / "final" / "traversals").iterdir())
    assert names == ["cat0.png", "cont0.gif", "cont0.png", "cont1.gif", "cont1.png"]
    assert zarr.open_group(str(task_dir / "outputs.zarr"), mode="r")["samples/images"].shape == (64, 2, 32, 32)
    sample = subprocess.run(
        [*holly_hpc_exe(), "sample", str(task_dir), "--n", "16", "--code", "cat0=1", "--output", "cells.png"],
        cwd=tmp_path,
        env=env_for_subprocess(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert sample.returncode == 0 and (tmp_path / "cells.png").stat().st_size > 0, sample.stderr
