"""Reconstruct from localisation files as a user meets them: the example field of view shipped in every
format, picked, described before training, trained, and written out in nm; validate finds bad columns and
unknown units in the files' headers and points at the spec's line."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
import zarr

from holly_hpc.experiment import freeze
from holly_hpc.io.localisations import load
from holly_hpc.io.localisations.writers import write_picasso
from holly_hpc.recon.geometry import principal_axes, random_rotations
from holly_hpc.recon.particles import load_particles
from holly_hpc.recon.smlm_field import main as write_example_files
from holly_hpc.runtime.task import run_task
from holly_hpc.spec import load_spec
from holly_hpc.sweep import expand

from .conftest import REPO

EXAMPLE = REPO / "jobspecs" / "data" / "npc-field"
FORMATS = ["thunderstorm.csv", "picasso.hdf5", "smap_sml.mat", "decode.csv"]


def test_the_shipped_field_is_the_same_in_every_format():
    truth = list(csv.DictReader((EXAMPLE / "truth.csv").open()))
    reference = load_particles({"path": str(EXAMPLE / FORMATS[0]), "pixel_size_nm": 8.0}, EXAMPLE)
    assert len(reference.points) == len(truth) == 36
    for name in FORMATS[1:]:
        other = load_particles({"path": str(EXAMPLE / name), "pixel_size_nm": 8.0}, EXAMPLE)
        assert [len(p) for p in other.points] == [len(p) for p in reference.points], name
        for a, b in zip(other.points, reference.points, strict=True):
            np.testing.assert_allclose(a, b, atol=0.02)  # ThunderSTORM writes 6 significant digits
        np.testing.assert_allclose(np.concatenate(other.precision), np.concatenate(reference.precision), atol=1e-3)


def test_the_example_files_are_what_the_script_writes(tmp_path):
    assert write_example_files([str(tmp_path)]) == 0
    for name in ["thunderstorm.csv", "decode.csv", "picasso.hdf5", "picasso.yaml", "truth.csv"]:
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name
    # scipy stamps a .mat file with the time it was written: compare what it holds.
    np.testing.assert_array_equal(load(tmp_path / "smap_sml.mat").xyz, load(EXAMPLE / "smap_sml.mat").xyz)


def _example_spec(tmp_path, **localisations):
    doc = yaml.safe_load((REPO / "jobspecs" / "reconstruct-localisations.yaml").read_text())
    doc["output_root"] = str(tmp_path / "runs")
    doc["model"].update(channels=[8, 16], hidden=16, num_points=24)
    doc["train"].update(steps=6, batch_size=4, log_every=3, checkpoint_every=6)
    doc["data"]["localisations"].update(path=str(tmp_path / "data" / "thunderstorm.csv"), **localisations)
    shutil.copytree(EXAMPLE, tmp_path / "data")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_spec(path)


def test_training_on_a_field_of_view_reports_the_data_and_writes_nm(tmp_path):
    spec = _example_spec(tmp_path)
    tasks = expand(spec)
    experiment = freeze(spec, tasks, tmp_path / "runs", f"sqlite:///{tmp_path / 'runs' / 'registry.sqlite'}")
    out = io.StringIO()
    result = run_task(experiment, 0, out=out)
    assert result.completed
    log = out.getvalue()
    assert "data: 1 file(s) read: thunderstorm.csv" in log
    assert "data: 3572 localisations, with precision, 2D" in log
    assert "data: picked 36 cluster(s); kept 36; dropped none" in log
    assert "data: 29 for training, 7 held out (eval_size 8 capped to a fifth of the particles)" in log
    assert "data: each image is 32 px x 8 nm = 256 nm across" in log
    assert log.index("data: picked") < log.index("step 3/6")  # said before training

    task_dir = experiment.task_dir(0)
    rows = list(csv.DictReader((task_dir / "data" / "picked.csv").open()))
    assert len(rows) == 36 and all(r["kept"] == "1" for r in rows)
    assert (task_dir / "data" / "picked.png").stat().st_size > 10_000
    summary = json.loads((task_dir / "data" / "summary.json").read_text())
    assert summary["particles_kept"] == 36 and summary["particles_held_out"] == 7
    assert summary["image_field_of_view_nm"] == 256.0 and 100 < summary["median_diameter_nm"] < 160

    metrics = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert metrics["nm_per_unit"] == 128.0  # 32 px x 8 nm spans the frame's [-1, 1]
    ply = (task_dir / "final" / "structure.ply").read_text().splitlines()
    assert "comment units nm" in ply
    in_nm = np.array([[float(v) for v in line.split()] for line in ply[ply.index("end_header") + 1 :]])
    group = zarr.open_group(str(task_dir / "outputs.zarr"), mode="r")
    np.testing.assert_allclose(in_nm, group["structure/points"][:] * 128.0, atol=1e-5)
    np.testing.assert_allclose(group["structure/points_nm"][:], in_nm, atol=1e-5)
    assert "# units nm" in (task_dir / "final" / "structure.obj").read_text()
    assert (task_dir / "final" / "views.png").stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(task_dir / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert "data/summary/text_summary" in events.Tags()["tensors"]


def test_the_source_carries_each_localisations_precision_in_frame_units(tmp_path):
    spec = _example_spec(tmp_path)
    from holly_hpc.recon.sources import make_source

    source = make_source(expand(spec)[0].config["data"], 1, torch.device("cpu"), spec.base_dir)
    assert source.precision.shape == source.weights.shape == source.points.shape[:2]
    assert torch.equal(source.precision > 0, source.weights > 0)  # a precision for every localisation, 0 in padding
    table = load(tmp_path / "data" / "thunderstorm.csv")
    lit = source.precision[source.weights > 0] * source.nm_per_unit
    np.testing.assert_allclose(
        np.sort(lit.numpy()), np.sort(table.precision[np.isin(np.arange(len(table)), _picked_rows(source))]), rtol=1e-5
    )
    assert lit.min() >= 3.0 and lit.max() <= 12.0  # the simulated 3-12 nm


def _picked_rows(source) -> np.ndarray:
    return np.flatnonzero(source.particles.files[0].picked.labels >= 0)


def test_views_are_on_the_principal_axes_with_a_scale_bar(tmp_path):
    spec = _example_spec(tmp_path)
    from holly_hpc.runtime.kinds import get_kind

    kind = get_kind("reconstruct")(expand(spec)[0].config, torch.device("cpu"), spec.base_dir)
    with torch.no_grad():  # a flat ring in a tilted plane: seen face-on in the first view whatever its tilt
        angles = torch.linspace(0, 2 * torch.pi, 25)[:-1]
        ring = torch.stack([0.4 * torch.cos(angles), 0.4 * torch.sin(angles), torch.zeros(24)], 1)
        kind.points.copy_(ring @ random_rotations(1, torch.Generator().manual_seed(1))[0].T)
    views = kind.orthogonal_views().mean(0)
    top = 12 + 2  # the column captions, then the grid's gutter

    def spread(panel: int) -> tuple[float, float]:
        """Std (px) of the lit pixels' rows and columns in a panel."""
        left = 2 + panel * (128 + 2)
        rows, cols = torch.nonzero(views[top : top + 128, left : left + 128] > 0.3, as_tuple=True)
        return rows.float().std().item(), cols.float().std().item()

    face_on, edge_on, other_edge = spread(0), spread(1), spread(2)
    assert min(face_on) > 10  # a ring of radius 0.4 x 64 px, face-on
    assert edge_on[0] < 2 and edge_on[1] > 10 and other_edge[0] < 2 and other_edge[1] > 10  # lines


def test_principal_axes_are_a_rotation_sorted_by_spread():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        points = torch.randn(50, 3, generator=g) * torch.tensor([3.0, 2.0, 0.5])
        points = points @ random_rotations(1, g)[0].T
        axes = principal_axes(points)
        assert torch.allclose(axes @ axes.T, torch.eye(3), atol=1e-5) and torch.det(axes) == pytest.approx(
            1.0, abs=1e-5
        )
        spread = ((points - points.mean(0)) @ axes.T).var(0)
        assert spread[0] >= spread[1] >= spread[2]
        assert torch.equal(principal_axes(points), axes)  # the same cloud, the same axes


# ------------------------------------------------------------------------------------------ validate
def _validate(cli, tmp_path, localisations: dict, files: dict):
    for name, writer in files.items():
        writer(tmp_path / name)
    doc = {
        "experiment": "v",
        "kind": "reconstruct",
        "data": {"source": "localisations", "localisations": localisations},
        "launch": {"cluster": "local"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out, err = cli("validate", path)
    return code, out + err, path.read_text().splitlines()


def _line_of(lines, key):
    return next(i for i, line in enumerate(lines, start=1) if line.strip().startswith(f"{key}:"))


def test_validate_reports_a_missing_column_at_its_key_naming_the_file(cli, tmp_path):
    copy = lambda p: shutil.copy(EXAMPLE / "thunderstorm.csv", p)  # noqa: E731
    code, text, lines = _validate(cli, tmp_path, {"path": "ts.csv", "columns": {"particle": "cell"}}, {"ts.csv": copy})
    assert code != 0
    assert f"spec.yaml:{_line_of(lines, 'particle')}" in text
    assert "ts.csv: particle: no column 'cell'; the columns are: id, frame, x [nm]" in text


def test_validate_reports_unknown_units_and_the_key_to_set(cli, tmp_path):
    def bare(p):
        p.write_text("x,y,particle\n1,2,0\n3,4,0\n5,6,0\n")

    code, text, lines = _validate(cli, tmp_path, {"path": "bare.csv"}, {"bare.csv": bare})
    assert code != 0
    # `units` is not in the spec: the problem points into its block (at its first key) and names the key.
    assert f"spec.yaml:{_line_of(lines, 'path')}:5: data.localisations.units:" in text
    assert "data.localisations.units" in text and "bare.csv: x: the units of column 'x' are not known" in text
    code, text, _ = _validate(cli, tmp_path, {"path": "bare.csv", "units": "nm"}, {})
    assert code == 0, text


def test_validate_reports_a_picasso_file_without_pixel_size(cli, tmp_path):
    def picasso(p):
        xy = np.random.default_rng(0).uniform(0, 1000, (20, 2))
        write_picasso(p, xy, np.full(20, 5.0), np.arange(20), 100.0, sidecar=False)

    code, text, _ = _validate(cli, tmp_path, {"path": "locs.hdf5"}, {"locs.hdf5": picasso})
    assert code != 0 and "locs.hdf5: Picasso stores x, y in camera pixels" in text and "camera_pixel_nm" in text
    code, text, _ = _validate(cli, tmp_path, {"path": "locs.hdf5", "camera_pixel_nm": 100.0}, {})
    assert code == 0, text


def test_validate_reports_a_pattern_that_matches_nothing(cli, tmp_path):
    code, text, lines = _validate(cli, tmp_path, {"path": "fovs/*.csv", "units": "nm"}, {})
    assert code != 0 and f"spec.yaml:{_line_of(lines, 'path')}" in text and "no file matches this pattern" in text
