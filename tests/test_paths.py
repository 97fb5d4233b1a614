"""One resolver for the paths a spec names (`~` expanded, relative to the spec's folder, absolute kept) and one
check for "a built-in shape or an existing OBJ file with an extent", used by the pose and reconstruct kinds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.experiment import resolved_container
from holly_hpc.io import resolve_path
from holly_hpc.io.mesh import write_obj
from holly_hpc.recon.simulate import BUILTIN_SHAPES, BUILTIN_SYMMETRY, load_structure, structure_problem
from holly_hpc.recon.sources import make_source
from holly_hpc.runtime.kinds import get_kind
from holly_hpc.spec import SpecError, load_spec
from holly_hpc.sweep import expand

from .test_reconstruct import _spec, _write_fits

SHAPES = "torus, npc, tetrahedron, asymmetric, teapot"
CPU = torch.device("cpu")


def _cloud(n: int = 60) -> np.ndarray:
    return load_structure("npc", n, 0.5).points.double().numpy()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """HOME in a folder of its own (not the spec's) holding x.obj, an OBJ of 60 points."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    write_obj(folder / "x.obj", _cloud())
    return folder


def _problems(make) -> str:
    with pytest.raises(SpecError) as info:
        make()
    return str(info.value)


# ---------------------------------------------------------------------------------------- resolver
_part = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="-_."), min_size=1, max_size=8)
_parts = st.lists(_part.filter(lambda p: p not in (".", "..")), min_size=1, max_size=4)


@settings(max_examples=100, deadline=None)
@given(parts=_parts, base=_parts)
def test_absolute_paths_are_kept_and_relative_ones_join_the_base(parts, base):
    absolute, base_dir = Path("/", *parts), Path("/", *base)
    assert resolve_path(absolute, base_dir) == absolute
    assert resolve_path(str(absolute), base_dir) == absolute
    assert resolve_path(Path(*parts), base_dir) == base_dir / Path(*parts)


def test_tilde_is_the_home_folder(home, tmp_path):
    assert resolve_path("~/x.obj", tmp_path / "spec") == home / "x.obj"
    assert resolve_path("~", tmp_path / "spec") == home


# --------------------------------------------------------------------------------------- ~ in specs
def test_pose_structure_from_home(home, write_spec):
    spec = load_spec(write_spec({"data": {"structure": "~/x.obj", "num_points": 60}}))
    kind = get_kind("pose")(expand(spec)[0].config, CPU, spec.base_dir)
    assert torch.allclose(kind.points, load_structure(str(home / "x.obj"), 60, kind.config["data"]["radius"]).points)


def test_reconstruct_simulated_structure_and_initial_points_from_home(home, tmp_path):
    spec = _spec(tmp_path, data={"simulate": {"structure": "~/x.obj", "num_points": 60}}, model={"init": "~/x.obj"})
    config = expand(spec)[0].config
    kind = get_kind("reconstruct")(config, CPU, spec.base_dir)
    radius = config["data"]["simulate"]["radius"]
    assert torch.allclose(kind.source.ground_truth.points, load_structure(str(home / "x.obj"), 60, radius).points)
    assert torch.allclose(kind.points.detach(), torch.from_numpy(_cloud()).float(), atol=1e-5)


def test_reconstruct_fits_folders_from_home(home, tmp_path):
    images = torch.rand(20, 24, 24) + 0.01
    _write_fits(home / "raw", images)
    spec = _spec(tmp_path, data={"source": "fits", "fits": {"folder": "~/raw"}, "eval_size": 4})
    source = make_source(expand(spec)[0].config["data"], 3, CPU, spec.base_dir)
    assert torch.allclose(source.eval_batch(0.0)["images"], images[16:])

    _write_fits(home / "s1", images)
    _write_fits(home / "s4", images * 4)
    folders = {"1.0": "~/s1", "4.0": "~/s4"}
    spec = _spec(tmp_path, name="per-sigma", data={"source": "fits", "fits": {"folders": folders}, "eval_size": 4})
    source = make_source(expand(spec)[0].config["data"], 3, CPU, spec.base_dir)
    assert torch.allclose(source.eval_batch(3.5)["images"], images[16:] * 4)


def test_missing_files_under_home_are_named_by_their_real_path(home, write_spec, tmp_path):
    text = _problems(lambda: load_spec(write_spec({"data": {"structure": "~/nothere.obj"}})))
    assert (
        f"data.structure: expected a built-in shape ({SHAPES}) or an existing OBJ file, but {home}/nothere.obj" in text
    )
    text = _problems(lambda: _spec(tmp_path, data={"source": "fits", "fits": {"folder": "~/nowhere"}}))
    assert f"data.fits.folder: expected an existing folder of FITS images, but {home}/nowhere does not exist" in text


def test_container_image_from_home_and_from_the_spec_folder(home, write_spec, tmp_path):
    spec = load_spec(write_spec({"container": {"image": "~/holly.sif"}}))
    assert resolved_container(spec)["image"] == str(home / "holly.sif")
    spec = load_spec(write_spec({"container": {"image": "images/../holly.sif"}}, name="rel.yaml"))
    assert resolved_container(spec)["image"] == str(tmp_path / "holly.sif")  # normalised
    (tmp_path / "v2.sif").write_text("")
    (tmp_path / "current.sif").symlink_to(tmp_path / "v2.sif")
    spec = load_spec(write_spec({"container": {"image": str(tmp_path / "current.sif")}}, name="abs.yaml"))
    assert resolved_container(spec)["image"] == str(tmp_path / "current.sif")  # an absolute link is kept


# ----------------------------------------------------------------------- relative: the spec's folder
@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The working directory, away from the specs in tmp_path, holding a shapes/x.obj that must not be read."""
    cwd = tmp_path / "elsewhere"
    (cwd / "shapes").mkdir(parents=True)
    (cwd / "shapes" / "x.obj").write_text("v 1 2 3\n")  # one point: refused if it were read
    (tmp_path / "shapes").mkdir()
    write_obj(tmp_path / "shapes" / "x.obj", _cloud())
    monkeypatch.chdir(cwd)
    return cwd


def test_relative_paths_are_from_the_spec_folder_not_the_working_directory(elsewhere, write_spec, tmp_path):
    assert Path.cwd() == elsewhere and Path(write_spec()).parent == tmp_path
    spec = load_spec(write_spec({"data": {"structure": "shapes/x.obj", "num_points": 60}}))
    get_kind("pose")(expand(spec)[0].config, CPU, spec.base_dir)

    spec = _spec(tmp_path, data={"simulate": {"structure": "shapes/x.obj"}}, model={"init": "shapes/x.obj"})
    kind = get_kind("reconstruct")(expand(spec)[0].config, CPU, spec.base_dir)
    assert torch.allclose(kind.points.detach(), torch.from_numpy(_cloud()).float(), atol=1e-5)


def test_load_structure_without_a_base_is_from_the_working_directory(elsewhere):
    with pytest.raises(ValueError, match="expected a point cloud with an extent"):
        load_structure("shapes/x.obj", 10, 0.5)


# -------------------------------------------------------------------------------------- the one check
def test_builtin_sets_are_kept_per_kind():
    assert set(BUILTIN_SYMMETRY) == set(BUILTIN_SHAPES)
    assert structure_problem("torus", Path("/nowhere"), BUILTIN_SYMMETRY) is None
    assert structure_problem("cube", Path("/nowhere"), ("cube", "gaussian"), "x") is None
    assert "/nowhere/cube does not exist" in structure_problem("cube", Path("/nowhere"), BUILTIN_SHAPES)
    assert "/nowhere/torus does not exist" in structure_problem("torus", Path("/nowhere"), ("cube", "gaussian"))


def test_missing_obj_gives_each_key_its_message(write_spec, tmp_path):
    missing = tmp_path / "missing.obj"
    text = _problems(lambda: load_spec(write_spec({"data": {"structure": "missing.obj"}})))
    assert (
        f"data.structure: expected a built-in shape ({SHAPES}) or an existing OBJ file, but {missing} does not exist"
        in text
    )
    text = _problems(lambda: _spec(tmp_path, data={"simulate": {"structure": "missing.obj"}}))
    assert (
        f"data.simulate.structure: expected an existing OBJ file or a built-in shape ({SHAPES}), "
        f"but {missing} does not exist"
    ) in text
    text = _problems(lambda: _spec(tmp_path, name="init", model={"init": "missing.obj"}))
    assert (
        f"model.init: expected an existing OBJ file, 'cube', 'gaussian' or 'poisson', but {missing} does not exist"
        in text
    )


def test_one_point_obj_is_refused_alike_in_both_kinds(write_spec, tmp_path):
    one = tmp_path / "one.obj"
    one.write_text("v 1 2 3\n")
    said = f"{one}: expected a point cloud with an extent, but all 1 vertices lie at (1, 2, 3)"
    assert f"data.structure: {said}" in _problems(lambda: load_spec(write_spec({"data": {"structure": "one.obj"}})))
    assert f"data.simulate.structure: {said}" in _problems(
        lambda: _spec(tmp_path, data={"simulate": {"structure": "one.obj"}})
    )
    assert f"model.init: {said}" in _problems(lambda: _spec(tmp_path, name="init", model={"init": "one.obj"}))
    for builtins in (BUILTIN_SYMMETRY, BUILTIN_SHAPES, ("cube", "gaussian")):
        assert structure_problem("one.obj", tmp_path, builtins) == said


def test_unreadable_obj_is_the_readers_complaint(tmp_path):
    (tmp_path / "dir.obj").mkdir()
    assert structure_problem("dir.obj", tmp_path, BUILTIN_SHAPES).startswith(
        f"{tmp_path}/dir.obj: cannot read OBJ file"
    )
    if os.geteuid() != 0:  # root reads every file
        (tmp_path / "locked.obj").write_text("v 0 0 0\nv 1 1 1\n")
        (tmp_path / "locked.obj").chmod(0)
        assert "cannot read OBJ file" in structure_problem("locked.obj", tmp_path, BUILTIN_SHAPES)
