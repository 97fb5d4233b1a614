"""The registry interface (registry/base.py) against its implementation, the spool and its callers.

Pure interface checks: no database is opened.
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest

import holly_hpc
from holly_hpc.registry import base, spool
from holly_hpc.registry.base import Registry
from holly_hpc.registry.postgres import PostgresRegistry
from holly_hpc.registry.spool import SpooledRegistry
from holly_hpc.registry.sql import SQLRegistry
from holly_hpc.registry.sqlite import SQLiteRegistry

INTERFACE = frozenset(Registry.__abstractmethods__)
IMPLEMENTATIONS = [SQLRegistry, SQLiteRegistry, PostgresRegistry]
PACKAGE = Path(holly_hpc.__file__).parent

# Names used on a registry variable that the interface does not declare, each with the reason it may.
NOT_ON_THE_INTERFACE = {
    "replay": "SpooledRegistry: send the spooled writes (runtime/task.py, whose registry is a SpooledRegistry)",
    "pending": "SpooledRegistry: how many writes wait in the spool",
    "spool_path": "SpooledRegistry: where the spool file is",
}


def _shape(function) -> list[tuple[str, inspect._ParameterKind, object]]:
    """What a caller depends on: each parameter's name, kind and default (annotations aside)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_interface_declares_what_the_code_base_uses():
    assert {
        "init",
        "migrate",
        "schema_versions",
        "upsert_experiment",
        "upsert_runs",
        "set_job_ids",
        "set_state",
        "note",
        "start_attempt",
        "end_attempt",
        "heartbeat",
        "log_metrics",
        "finish",
        "runs",
        "experiments",
        "experiment_details",
        "run_config",
        "attempts",
        "metrics",
        "count_metrics",
    } == INTERFACE
    assert "url" in Registry.__annotations__


def test_every_interface_method_is_a_write_or_a_read_and_only_one():
    assert {
        "start_attempt",
        "end_attempt",
        "set_state",
        "note",
        "heartbeat",
        "log_metrics",
        "finish",
    } == base.TASK_WRITES
    assert {"init", "migrate", "upsert_experiment", "upsert_runs", "set_job_ids"} == base.SETUP_WRITES
    assert base.WRITE_METHODS == base.TASK_WRITES | base.SETUP_WRITES
    assert not base.TASK_WRITES & base.SETUP_WRITES
    assert not base.WRITE_METHODS & base.READS
    assert base.WRITE_METHODS | base.READS == INTERFACE


def test_every_method_says_whether_it_writes():
    for name in INTERFACE:
        doc = inspect.getdoc(getattr(Registry, name)) or ""
        kind = "Task write:" if name in base.TASK_WRITES else "Setup write:" if name in base.SETUP_WRITES else "Read:"
        assert doc.startswith(kind), f"Registry.{name}'s docstring should start with {kind!r}: {doc!r}"


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_the_sql_registries_implement_the_interface_with_its_signatures(cls):
    for name in sorted(INTERFACE):
        method = getattr(cls, name, None)
        assert method is not None and not getattr(method, "__isabstractmethod__", False), (
            f"{cls.__name__}.{name} is not implemented"
        )
        assert _shape(method) == _shape(getattr(Registry, name)), f"{cls.__name__}.{name}'s signature differs"
    if cls is not SQLRegistry:
        assert not inspect.isabstract(cls), cls.__abstractmethods__


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_the_sql_registries_have_no_public_method_the_interface_lacks(cls):
    public = {n for n, v in inspect.getmembers(cls, callable) if not n.startswith("_")}
    assert public - INTERFACE == set()


def test_the_stamped_writes_are_the_task_writes_that_take_at():
    assert {"start_attempt", "end_attempt", "set_state", "note", "heartbeat", "finish"} == base.STAMPED_WRITES
    for cls in (Registry, SQLRegistry):
        with_at = {n for n in base.TASK_WRITES if "at" in inspect.signature(getattr(cls, n)).parameters}
        assert with_at == base.STAMPED_WRITES, cls.__name__
    assert "started" in inspect.signature(Registry.end_attempt).parameters


def test_the_spool_lists_exactly_the_interface_task_writes():
    assert set(spool.WRITES) == base.TASK_WRITES
    assert set(spool.WRITES) <= base.WRITE_METHODS


def _unreachable(name):
    def method(self, *args, **kwargs):
        self.called.append(name)
        raise ConnectionError(f"{name}: the database is away")

    return method


def _init_down(self):
    self.called = []


# A database that is away: every interface method fails to connect (after noting that it was called).
_Down = type(
    "_Down",
    (Registry,),
    {"url": "postgresql://nobody@down/db", "__init__": _init_down, **{n: _unreachable(n) for n in INTERFACE}},
)


def _dummy_args(name: str) -> list:
    """A value for each required parameter (JSON-writable; the database never sees them)."""
    params = list(inspect.signature(getattr(Registry, name)).parameters.values())[1:]
    return [0 for p in params if p.default is inspect.Parameter.empty]


def test_the_spool_spools_every_task_write_and_passes_everything_else_through(tmp_path):
    spooled, through, stamped = set(), set(), set()
    for name in sorted(INTERFACE):
        down, path = _Down(), tmp_path / name / spool.SPOOL_FILE
        try:
            assert getattr(SpooledRegistry(down, path, label="test"), name)(*_dummy_args(name)) is None
        except ConnectionError:
            through.add(name)
        assert down.called == [name]  # the database was tried first, once
        if path.exists():
            (entry,) = [json.loads(line) for line in path.read_text().splitlines()]
            assert entry["method"] == name and entry["args"] == _dummy_args(name)
            spooled.add(name)
            if "at" in entry["kwargs"]:
                stamped.add(name)
    assert spooled == base.TASK_WRITES
    assert through == base.SETUP_WRITES | base.READS
    assert stamped == base.STAMPED_WRITES


def _registry_attributes() -> dict[str, set[str]]:
    """attribute -> files, for every `registry.X`, `reg.X` and `<name>.registry.X` in holly_hpc."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id in ("registry", "reg")) or (
                isinstance(owner, ast.Attribute) and owner.attr == "registry" and isinstance(owner.value, ast.Name)
            ):
                found.setdefault(node.attr, set()).add(str(path.relative_to(PACKAGE.parent)))
    return found


def test_everything_the_code_base_uses_on_a_registry_is_declared_on_the_interface():
    found = _registry_attributes()
    # The scan sees the calls this test is about (so it is not vacuously passing).
    assert {"experiment_details", "run_config", "schema_versions", "start_attempt", "url"} <= set(found)
    assert "holly_hpc/cli.py" in found["experiment_details"]
    declared = INTERFACE | set(Registry.__annotations__)
    undeclared = {a: sorted(files) for a, files in found.items() if a not in declared and a not in NOT_ON_THE_INTERFACE}
    assert undeclared == {}


def test_the_allow_list_is_needed_and_true(tmp_path):
    found = _registry_attributes()
    for name in NOT_ON_THE_INTERFACE:
        assert name in found, f"{name} is no longer used on a registry: drop it from NOT_ON_THE_INTERFACE"
        assert not hasattr(Registry, name) and name not in Registry.__annotations__
        assert hasattr(SpooledRegistry(_Down(), tmp_path / spool.SPOOL_FILE), name)
