"""Reconstruct on picked particles with per-particle refinement, the likelihood, symmetry and the gold-standard
FSC: the files a user gets, exact resume across the phase changes, and the spec problems validate reports."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import yaml
import zarr

from holly_hpc.experiment import freeze
from holly_hpc.recon.reconstruct import ReconstructTask
from holly_hpc.recon.smlm_particles import preset, write_particles, write_truth
from holly_hpc.runtime.checkpoint import latest_checkpoint, load_checkpoint
from holly_hpc.runtime.task import run_task
from holly_hpc.spec import load_spec
from holly_hpc.spec_yaml import SpecError
from holly_hpc.sweep import expand


def _write_data(tmp_path, particles=40):
    sim = preset("nup107", particles=particles, seed=3)
    write_particles(tmp_path / "particles.csv", sim)
    write_truth(tmp_path, sim)


def _doc(tmp_path, name, **changes):
    doc = {
        "experiment": name,
        "kind": "reconstruct",
        "seed": 2,
        "output_root": str(tmp_path / "runs"),
        "device": "cpu",
        "data": {
            "source": "localisations",
            "image_size": 32,
            "sigma": [3.0, 1.0],
            "eval_size": 8,
            "localisations": {
                "path": "particles.csv",
                "pixel_size_nm": 8.0,
                "truth": {"sites": "truth_sites.csv", "poses": "truth_poses.csv", "symmetry": "D8"},
            },
        },
        "model": {"channels": [8, 16], "hidden": 16, "num_points": 32, "init": "gaussian", "init_scale": 0.3},
        "train": {
            "steps": 30,
            "batch_size": 8,
            "loss": "likelihood",
            "log_every": 10,
            "checkpoint_every": 30,
            "respawn_every": 10,
            "refine": {"start": 0, "grid": 200, "search": 0.3, "regrid_every": 10},
        },
        "launch": {"cluster": "local"},
    }
    for section, values in changes.items():
        for key, value in values.items():
            target = doc[section]
            *path, last = key.split(".")
            for part in path:
                target = target.setdefault(part, {})
            target[last] = value
    return doc


def _experiment(tmp_path, name, **changes):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_doc(tmp_path, name, **changes), sort_keys=False))
    spec = load_spec(path)
    return freeze(spec, expand(spec), tmp_path / "runs", f"sqlite:///{tmp_path / 'runs' / 'registry.sqlite'}")


@pytest.fixture
def data(tmp_path):
    _write_data(tmp_path)
    return tmp_path


def test_refinement_writes_the_quality_a_user_can_trust_without_truth(data, cli):
    path = data / "fsc.yaml"
    path.write_text(yaml.safe_dump(_doc(data, "fsc", model={"symmetry": "C8"}), sort_keys=False))
    code, out, err = cli("submit", path, "--wait")  # as a user runs it: a local job, the registry
    assert code == 0, out + err
    (task_dir,) = (data / "runs" / "fsc" / "tasks").iterdir()
    final = task_dir / "final"
    for name in ("report.md", "fsc.png", "symmetry.png", "structure.ply", "structure_half1.ply", "structure_half2.ply"):
        assert (final / name).is_file(), name
    metrics = json.loads((final / "metrics.json").read_text())
    assert 0 < metrics["fsc_resolution_nm"] < 200
    assert metrics["symmetry_n"] == 8  # imposed: detected about the imposed axis
    assert metrics["radius_nm"] > 0 and metrics["rings"] in (1.0, 2.0)
    for key in ("structure_error", "rot_err_median_deg", "axis_err_median_deg", "nll_per_localisation"):
        assert np.isfinite(metrics[key]), key
    report = (final / "report.md").read_text()
    assert "gold-standard FSC 0.143" in report and "40 (median" in report
    code, log, _ = cli("logs", data / "runs" / "fsc", "--task", "0")
    assert "resolution (gold-standard FSC 0.143" in log  # the report is printed at the end of the log
    # The structure holds num_points points in nm; the halves are independent fits.
    ply = (final / "structure.ply").read_text()
    assert "element vertex 32" in ply and "units nm" in ply
    assert (final / "structure_half1.ply").read_text() != (final / "structure_half2.ply").read_text()
    # TensorBoard has the FSC curve and the symmetry spectrum of the end, and the refined poses are in zarr.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(task_dir / "tb"), size_guidance={"images": 0})
    ea.Reload()
    assert {"quality/fsc", "quality/symmetry"} <= set(ea.Tags()["images"])
    group = zarr.open_group(str(task_dir / "outputs.zarr"), mode="r")
    assert group["refine/rotations"].shape == (40, 3, 3) and group["structure/half1"].shape == (32, 3)
    # The registry holds it, so a sweep on real data can be ranked by resolution (as the README shows).
    code, out, err = cli("runs", data / "runs" / "fsc", "--sort", "metric:fsc_resolution_nm")
    assert code == 0, err
    assert "fsc_resolution_nm" in out and f"{metrics['fsc_resolution_nm']:.4g}"[:4] in out


def test_resume_is_exact_across_the_search_the_symmetrising_and_regrids(data):
    whole = _experiment(data, "whole", model={"symmetry": "C8"}, train={"checkpoint_every": 5})
    cut = _experiment(data, "cut", model={"symmetry": "C8"}, train={"checkpoint_every": 5})
    assert run_task(whole, 0, out=io.StringIO()).completed
    assert not run_task(cut, 0, stop_after_step=12, out=io.StringIO()).completed  # after the search (9)
    assert run_task(cut, 0, out=io.StringIO()).completed
    a = load_checkpoint(latest_checkpoint(whole.task_dir(0) / "checkpoints"))["kind"]["refinement"]
    b = load_checkpoint(latest_checkpoint(cut.task_dir(0) / "checkpoints"))["kind"]["refinement"]
    assert a["symmetry"] == b["symmetry"] == "C8"
    for key in ("units", "six", "shifts"):
        for x, y in zip(a[key], b[key], strict=True):
            assert torch.equal(x, y), key


def test_cnn_phase_with_the_likelihood_then_refinement_from_its_poses(data):
    experiment = _experiment(data, "cnn", train={"refine.start": 0.5, "refine.init": "cnn", "refine.fsc": False})
    out = io.StringIO()
    assert run_task(experiment, 0, out=out).completed
    metrics = json.loads((experiment.task_dir(0) / "final" / "metrics.json").read_text())
    assert "fsc_resolution_nm" not in metrics and np.isfinite(metrics["nll_per_localisation"])
    assert "phase 2" in out.getvalue()  # the log says which phase a step was in


def test_refinement_off_keeps_the_cnn_and_the_image_loss(data):
    experiment = _experiment(data, "plain", train={"loss": "l2", "refine.start": "off"})
    assert run_task(experiment, 0, out=io.StringIO()).completed
    metrics = json.loads((experiment.task_dir(0) / "final" / "metrics.json").read_text())
    assert "eval_loss" in metrics and "nll_per_localisation" not in metrics
    assert "symmetry_n" in metrics  # detected on the CNN's structure too


def test_stray_points_of_the_cnn_phase_come_back_into_the_frame(data):
    doc = _doc(data, "stray", train={"refine.start": "off", "loss": "l2"})
    path = data / "stray.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = load_spec(path)
    task = ReconstructTask(spec.task_config({}), torch.device("cpu"), spec.base_dir)
    with torch.no_grad():
        task.points[0] = torch.tensor([1.6, 0.0, 0.0])
        task.points[1] = torch.tensor([0.0, -1.2, 0.4])
    inside = task.points.detach()[2:].clone()
    task._respawn_strays()
    assert task.points.detach().norm(dim=-1).max() <= 1.0
    assert torch.equal(task.points.detach()[2:], inside)  # the others stay
    assert task.respawned == 2


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"model": {"symmetry": "C8", "num_points": 30}}, "model.num_points", "multiple of 8"),
        ({"data": {"source": "simulate"}, "train": {"refine.start": 0.5}}, "train.refine.start", "localisations"),
        ({"data": {"source": "simulate"}, "train": {"refine.start": "auto"}}, "train.loss", "localisations"),
        ({"train": {"refine.init": "cnn"}}, "train.refine.init", "start > 0"),
        ({"data": {"localisations.truth.sites": "nowhere.csv"}}, "data.localisations.truth.sites", "nowhere.csv"),
        ({"model": {"symmetry": "E8"}}, "model.symmetry", "E8"),
    ],
)
def test_validate_names_the_key_of_a_method_problem(data, changes, key, words):
    path = data / "bad.yaml"
    path.write_text(yaml.safe_dump(_doc(data, "bad", **changes), sort_keys=False))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert key in message and words in message, message


def test_the_default_loss_is_the_likelihood_for_tables_and_the_image_loss_for_images():
    from holly_hpc.recon.reconstruct import loss_kind

    assert loss_kind({"train": {"loss": "auto"}, "data": {"source": "localisations"}}) == "likelihood"
    assert loss_kind({"train": {"loss": "auto"}, "data": {"source": "simulate"}}) == "l2"
    assert loss_kind({"train": {"loss": "l1"}, "data": {"source": "localisations"}}) == "l1"
