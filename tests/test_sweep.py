"""Sweep expansion: counts, stable hashes and ids, distinct seeds, overrides applied."""

from __future__ import annotations

import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from holly_hpc.spec import load_spec
from holly_hpc.sweep import config_hash, derive_seed, expand

from .conftest import TINY

SWEEPABLE = {
    "train.lr": st.floats(min_value=1e-5, max_value=0.5, allow_nan=False),
    "train.batch_size": st.integers(min_value=1, max_value=64),
    "data.sigma": st.floats(min_value=0.3, max_value=4.0, allow_nan=False),
    "model.hidden": st.integers(min_value=1, max_value=64),
}

sweeps = st.tuples(
    st.dictionaries(st.sampled_from(["train.lr", "data.sigma"]), st.integers(1, 3), max_size=2),  # grid sizes
    st.integers(0, 3),  # zip length (0: no zip)
    st.integers(1, 3),  # seeds
)


def _spec(tmp_path_factory, grid_sizes: dict, zip_len: int, seeds: int, data) -> tuple:
    grid = {k: data.draw(st.lists(SWEEPABLE[k], min_size=n, max_size=n, unique=True)) for k, n in grid_sizes.items()}
    zipped = {}
    if zip_len:
        zipped = {
            k: data.draw(st.lists(SWEEPABLE[k], min_size=zip_len, max_size=zip_len))
            for k in ("train.batch_size", "model.hidden")
        }
    doc = {**TINY, "sweep": {"grid": grid, "zip": zipped, "seeds": seeds}}
    path = tmp_path_factory.mktemp("sweep") / "s.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, grid, zipped


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=sweeps, data=st.data())
def test_expansion_count_stability_and_seeds(tmp_path_factory, shape, data):
    grid_sizes, zip_len, seeds = shape
    path, grid, zipped = _spec(tmp_path_factory, grid_sizes, zip_len, seeds, data)
    tasks = expand(load_spec(path))

    expected = math.prod(len(v) for v in grid.values()) * (zip_len or 1) * seeds
    assert len(tasks) == expected
    assert [t.index for t in tasks] == list(range(expected))
    # The same spec, loaded again, expands to the same ids, hashes and seeds.
    again = expand(load_spec(path))
    assert [(t.task_id, t.config_hash, t.seed) for t in again] == [(t.task_id, t.config_hash, t.seed) for t in tasks]
    # Seeds are distinct, so are ids and hashes (the seed is part of the config).
    assert len({t.seed for t in tasks}) == expected
    assert len({t.config_hash for t in tasks}) == expected
    # Every override lands in the task's config; each grid value appears in the expected share of tasks.
    for t in tasks:
        for dotted, value in t.overrides.items():
            section, key = dotted.split(".")
            assert t.config[section][key] == value
        assert t.config["seed"] == t.seed == derive_seed(TINY["seed"], t.index)
    for key, values in grid.items():
        for v in values:
            assert sum(t.overrides[key] == v for t in tasks) == expected // len(values)
    if zipped:
        # zip keeps rows together
        rows = {(t.overrides["train.batch_size"], t.overrides["model.hidden"]) for t in tasks}
        assert rows == set(zip(zipped["train.batch_size"], zipped["model.hidden"], strict=True))


def test_no_sweep_gives_one_task_with_the_base_config(write_spec):
    (task,) = expand(load_spec(write_spec()))
    assert task.index == 0 and task.overrides == {} and task.replicate == 0
    assert task.config["train"]["lr"] == TINY["train"]["lr"]
    assert set(task.config) == {"kind", "seed", "device", "data", "model", "train"}
    assert task.task_id == f"0000-{task.config_hash[:8]}"


def test_hash_is_canonical_and_sensitive():
    a = {"kind": "pose", "train": {"lr": 0.1, "steps": 5}}
    b = {"train": {"steps": 5, "lr": 0.1}, "kind": "pose"}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({"kind": "pose", "train": {"lr": 0.2, "steps": 5}})
    # Pinned: a change to the canonical form would silently orphan every existing experiment.
    assert config_hash({"x": 1}) == "5041bf1f713df204784353e82f6a4a535931cb64f1f4b4a5aeaffcb720918b22"


def test_seeds_replicates_differ_only_by_seed(write_spec):
    tasks = expand(load_spec(write_spec({"sweep": {"seeds": 3}})))
    assert [t.replicate for t in tasks] == [0, 1, 2]
    strip = [{k: v for k, v in t.config.items() if k != "seed"} for t in tasks]
    assert strip[0] == strip[1] == strip[2]


def test_grid_order_follows_the_spec(write_spec):
    tasks = expand(load_spec(write_spec({"sweep": {"grid": {"train.lr": [0.1, 0.2], "data.sigma": [1.0, 2.0]}}})))
    assert [(t.overrides["train.lr"], t.overrides["data.sigma"]) for t in tasks] == [
        (0.1, 1.0),
        (0.1, 2.0),
        (0.2, 1.0),
        (0.2, 2.0),
    ]
