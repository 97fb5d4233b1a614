"""Spec loading and validation: every error names file:line:col and the key path, all at once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from holly_hpc.kind_names import KINDS
from holly_hpc.runtime import kinds
from holly_hpc.schema_walk import apply_defaults, load_schema
from holly_hpc.spec import KIND_NAMES, SpecError, load_spec, sweepable_paths
from holly_hpc.spec_yaml import format_path

from .conftest import REPO

BAD = """\
experiment: bad one
kind: pose
seeed: 3
data:
  structure: torus
  image_size: 4
  sigma: -1
train:
  lrr: 0.1
  steps: "many"
launch:
  cluster: slurmm
"""


def problems_of(path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value).splitlines()


def test_all_errors_listed_with_file_line_column_and_key_path(write_spec):
    path = write_spec(raw=BAD)
    lines = problems_of(path)
    assert lines == [
        f'{path}:1:13: experiment: expected a string matching ^[A-Za-z0-9][A-Za-z0-9._-]{{0,99}}$, got a string ("bad one")',
        f"{path}:3:1: seeed: unknown key 'seeed'; did you mean 'seed'?",
        f"{path}:6:15: data.image_size: expected a value >= 8, got 4",
        f"{path}:7:10: data.sigma: expected a value > 0, got -1",
        f"{path}:9:3: train.lrr: unknown key 'lrr'; did you mean 'lr'?",
        f'{path}:10:10: train.steps: expected an integer, got a string ("many")',
        f'{path}:12:12: launch.cluster: expected one of "local", "debug", "slurm", got a string ("slurmm")',
    ]


def test_unknown_key_without_close_match_lists_allowed_keys(write_spec):
    path = write_spec({"model": {"zzz": 1}})
    (line,) = problems_of(path)
    assert "model.zzz: unknown key 'zzz'; allowed keys: channels, hidden" in line


def test_missing_required_key_is_reported_at_top(write_spec):
    path = write_spec(raw="kind: pose\n")
    (line,) = problems_of(path)
    assert line == f"{path}:1:1: 'experiment' is required but missing"


def test_duplicate_keys_are_errors(write_spec):
    path = write_spec(raw="experiment: a\nkind: pose\ntrain:\n  lr: 0.1\n  lr: 0.2\n")
    (line,) = problems_of(path)
    assert line == f"{path}:5:3: train.lr: duplicate key (first set on line 4)"


def test_yaml_syntax_error_has_position(write_spec):
    path = write_spec(raw="experiment: a\nkind: pose\ndata: [1,\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:4:1: data[1]: invalid YAML:")  # where the parser was, as a key path


def test_yaml_is_loaded_safely(write_spec):
    path = write_spec(raw="experiment: !!python/object/apply:os.system ['echo pwned']\nkind: pose\n")
    (line,) = problems_of(path)
    assert "invalid YAML" in line and "python/object" in line


def test_empty_and_non_mapping_specs(write_spec):
    assert "the spec is empty" in problems_of(write_spec(raw=""))[0]
    assert "expected a mapping at the top level, got a list" in problems_of(write_spec(raw="- 1\n"))[0]


def test_missing_file_named():
    with pytest.raises(SpecError, match=r"/nope\.yaml: cannot read spec"):
        load_spec("/nope.yaml")


def test_sweep_errors_point_at_the_sweep_entry(write_spec):
    path = write_spec(
        raw=(
            "experiment: s\nkind: pose\ntrain:\n  steps: 100\n  log_every: 10\n"
            "sweep:\n  grid:\n    train.lr: [0.1, -0.5]\n    train.log_every: [10, 1000]\n"
        )
    )
    assert problems_of(path) == [
        f"{path}:8:21: sweep.grid.train.lr[1]: expected a value > 0, got -0.5",
        f"{path}:9:27: sweep.grid.train.log_every[1]: expected at most train.steps (100), got 1000",
    ]


def test_sweep_structure_errors(write_spec):
    path = write_spec(
        raw=(
            "experiment: s\nkind: pose\n"
            "sweep:\n  grid:\n    data.sigmaa: [1, 2]\n    experiment: [a]\n    train.lr: [0.1]\n"
            "  zip:\n    train.batch_size: [8, 16]\n    model.hidden: [8]\n    train.lr: [0.2]\n"
        )
    )
    assert problems_of(path) == [
        f"{path}:5:5: sweep.grid.data.sigmaa: 'data.sigmaa' is not a key of a pose spec; did you mean 'data.sigma'?",
        f"{path}:6:5: sweep.grid.experiment: 'experiment' is set once per experiment and cannot be swept",
        f"{path}:8:3: sweep.zip: zip lists must have equal lengths, got train.batch_size: 2, model.hidden: 1, train.lr: 1",
        f"{path}:11:5: sweep.zip.train.lr: 'train.lr' is swept in both grid and zip; use one",
    ]


def test_missing_obj_structure_is_a_semantic_error(write_spec, tmp_path):
    path = write_spec({"data": {"structure": "shapes/missing.obj"}})
    (line,) = problems_of(path)
    assert (
        f"data.structure: expected a built-in shape (torus, npc, tetrahedron, asymmetric, teapot) or an existing OBJ file, but {tmp_path}/shapes/missing.obj does not exist"
        in line
    )


def test_bad_obj_file_names_its_line(write_spec, tmp_path):
    (tmp_path / "broken.obj").write_text("# a mesh\nv 0 0 0\nv 1 x 0\n")
    path = write_spec({"data": {"structure": "broken.obj"}})
    (line,) = problems_of(path)
    assert f"{tmp_path}/broken.obj:3: expected 'v x y z' with three finite numbers" in line


def test_defaults_come_from_the_schema(write_spec):
    spec = load_spec(write_spec(raw="experiment: d\nkind: pose\n"))
    r = spec.resolved
    assert r["seed"] == 0 and r["device"] == "auto" and r["output_root"] == "runs"
    assert r["data"]["image_size"] == 32 and r["data"]["structure"] == "torus"
    assert r["model"]["channels"] == [16, 32, 64, 128]
    assert r["train"]["steps"] == 1000 and r["train"]["loss"] == "l2" and r["train"]["lr_schedule"] == "constant"
    assert r["launch"] == {"cluster": "local", "array_parallelism": 1, "threads": 0}
    assert r["resources"] == {"time": 120, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "extra": {}}
    assert "container" not in r
    assert r["sweep"] == {"grid": {}, "zip": {}, "seeds": 1}


def test_schema_is_valid_draft_2020_12_and_kinds_agree():
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert tuple(schema["properties"]["kind"]["enum"]) == KIND_NAMES == tuple(KINDS)
    assert kinds.KINDS is KINDS  # the runtime resolves the same table spec validation names


@pytest.mark.parametrize("path", sorted((REPO / "jobspecs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_validate_and_point_editors_at_the_schema(path: Path):
    spec = load_spec(path)
    first = path.read_text().splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, f"{path.name} must start with the yaml-language-server schema comment"
    assert (path.parent / match.group(1)).resolve() == (REPO / "schemas" / "jobspec.schema.json").resolve()
    assert spec.experiment


def test_sweepable_paths_cover_the_kind_sections():
    paths = sweepable_paths({"kind": "pose"})
    assert {"train.lr", "data.sigma", "model.channels", "seed", "device"} <= set(paths)
    assert not any(p.startswith(("launch", "sweep", "registry", "experiment")) for p in paths)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lr=st.floats(min_value=1e-6, max_value=1.0),
    steps=st.integers(min_value=1, max_value=10_000),
    size=st.integers(min_value=8, max_value=256),
    extra=st.sampled_from(["", "lrr", "stepz", "batchsize"]),
)
def test_generated_specs_are_accepted_or_rejected_by_key(tmp_path_factory, lr, steps, size, extra):
    folder = tmp_path_factory.mktemp("h")
    train = {"lr": lr, "steps": steps, "log_every": 1}
    if extra:
        train[extra] = 1
    path = folder / "s.yaml"
    path.write_text(json.dumps({"experiment": "h", "kind": "pose", "data": {"image_size": size}, "train": train}))
    if not extra:
        spec = load_spec(path)
        assert spec.resolved["train"]["lr"] == lr and spec.resolved["data"]["image_size"] == size
    else:
        with pytest.raises(SpecError) as info:
            load_spec(path)
        assert len(info.value.problems) == 1 and info.value.problems[0].path == ("train", extra)
        assert "did you mean" in info.value.problems[0].message


def test_apply_defaults_does_not_touch_given_values():
    out = apply_defaults({"experiment": "x", "kind": "pose", "train": {"lr": 0.5}})
    assert out["train"]["lr"] == 0.5 and out["train"]["steps"] == 1000


def test_exponent_floats_without_a_dot_are_numbers(write_spec):
    """PyYAML alone reads `1e-4` as a string (YAML 1.1); researchers write learning rates that way."""
    spec = load_spec(write_spec(raw="experiment: e\nkind: pose\ntrain:\n  lr: 1e-4\n  weight_decay: 5E-3\n"))
    assert spec.resolved["train"]["lr"] == pytest.approx(1e-4)
    assert spec.resolved["train"]["weight_decay"] == pytest.approx(5e-3)


def test_resource_rules_and_misspelled_resource_keys(write_spec):
    path = write_spec({"resources": {"gpus_per_node": 2, "tasks_per_node": 1, "nodes": 2, "gpus": 1}})
    assert [str(p).split(": ", 1)[1] for p in load_spec_problems(path)] == [
        "resources.gpus: unknown key 'gpus'; did you mean 'gpus_per_node'?",
    ]
    path = write_spec({"resources": {"gpus_per_node": 2, "tasks_per_node": 1, "nodes": 2}}, name="r.yaml")
    assert [str(p).split(": ", 1)[1] for p in load_spec_problems(path)] == [  # in file order
        "resources.tasks_per_node: expected one process per GPU: tasks_per_node = gpus_per_node (2), got 1",
        "resources.nodes: expected 1 node with launch.cluster local (several nodes need slurm), got 2",
    ]
    ok = write_spec(
        {
            "launch": {"cluster": "slurm"},
            "resources": {
                "gpus_per_node": 2,
                "tasks_per_node": 2,
                "nodes": 2,
                "mem": "16G",
                "extra": {"mail-type": "END"},
            },
        },
        name="ok.yaml",
    )
    assert load_spec(ok).resolved["resources"]["extra"] == {"mail-type": "END"}


def load_spec_problems(path):
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.problems


def test_a_misspelt_key_and_a_semantic_problem_are_reported_in_one_run(write_spec):
    """validate lists every problem at once: the unknown key and what the rest of the spec gets wrong."""
    path = write_spec({"data": {"structrue": "torus"}, "train": {"steps": 5, "log_every": 50}}, name="both.yaml")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    keys = [format_path(p.path) for p in err.value.problems]
    assert keys == ["data.structrue", "train.log_every"], keys
    assert "did you mean 'structure'" in str(err.value) and "expected at most train.steps (5)" in str(err.value)


def test_a_wrong_value_still_hides_the_semantic_checks_that_would_read_it(write_spec):
    """Semantic checks run beside unknown keys only: a wrongly typed value could make them misread it."""
    path = write_spec({"train": {"steps": "many", "log_every": 50}}, name="typed.yaml")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert [format_path(p.path) for p in err.value.problems] == ["train.steps"]
