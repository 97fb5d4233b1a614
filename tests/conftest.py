"""Shared fixtures: small specs that train in seconds, written into a temporary folder."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "experiment": "tiny",
    "kind": "pose",
    "seed": 7,
    "device": "cpu",
    "data": {"structure": "torus", "num_points": 40, "image_size": 16, "sigma": 1.2, "eval_size": 16},
    "model": {"channels": [8, 16], "hidden": 16},
    "train": {"steps": 20, "batch_size": 8, "lr": 0.003, "log_every": 5, "checkpoint_every": 10, "keep_checkpoints": 2},
    "launch": {"cluster": "local", "array_parallelism": 2, "threads": 1},
    "resources": {"time": 10},
}


def deep_update(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = deep_update(out.get(key, {}), value) if isinstance(value, dict) and key != "sweep" else value
    return out


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: a shared 2-core machine slows badly when OpenMP oversubscribes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded_torch():
    """The global torch RNG at seed 0, for tests that initialise models from it."""
    import torch

    torch.manual_seed(0)


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(changes, name) -> path of a spec = TINY updated with `changes`, output_root in tmp_path."""

    def write(changes: dict | None = None, name: str = "spec.yaml", raw: str | None = None) -> Path:
        path = tmp_path / name
        if raw is not None:
            path.write_text(raw)
            return path
        spec = deep_update({**TINY, "output_root": str(tmp_path / "runs")}, changes or {})
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return write


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: cli(*args) -> (exit code, stdout, stderr)."""
    from holly_hpc.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(autouse=True)
def _no_registry_env(monkeypatch):
    monkeypatch.delenv("HOLLY_REGISTRY_URL", raising=False)


def holly_hpc_exe() -> list[str]:
    """The installed console script (crossing the real entry point), next to this interpreter."""
    exe = Path(sys.executable).with_name("holly-hpc")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "holly_hpc.cli"]


def wait_for(predicate, timeout=240, poll=1.0, what="condition"):
    """The first truthy value of predicate(), polled; fails after `timeout` s (a hang guard, not a speed test)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def env_for_subprocess() -> dict:
    env = dict(os.environ)
    env.pop("HOLLY_REGISTRY_URL", None)
    return env


PG_PASSWORD = os.environ.get("HOLLY_PG_TEST_PASSWORD", "holly-test-pw")


@pytest.fixture(scope="session")
def postgres_server():
    """Debian's PostgreSQL 15 started by tests/services/postgres_up.sh. Under CI=true it must be there."""
    import subprocess

    up = subprocess.run(
        ["bash", str(REPO / "tests" / "services" / "postgres_up.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "HOLLY_PG_TEST_PASSWORD": PG_PASSWORD},
        timeout=600,
        check=False,
    )
    if up.returncode != 0:
        message = f"PostgreSQL unavailable: {up.stdout[-1500:]}{up.stderr[-1500:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)  # outside CI=true only: under CI the line above fails instead
    os.environ["PGPASSWORD"] = PG_PASSWORD  # libpq reads it; URLs carry no password
    return "postgresql://holly_test@127.0.0.1:5432"


@pytest.fixture
def fresh_postgres_url(postgres_server):
    """A new, empty database for one test."""
    import uuid

    import psycopg2

    name = f"holly_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(f"{postgres_server}/postgres", password=PG_PASSWORD)  # not from env: tests change it
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")  # name: our own hex, not user input
    admin.close()
    yield f"{postgres_server}/{name}"
    admin = psycopg2.connect(f"{postgres_server}/postgres", password=PG_PASSWORD)  # not from env: tests change it
    admin.autocommit = True
    admin.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def registry_url(request, tmp_path):
    """The same test body against the SQLite file and a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite'}"
    return request.getfixturevalue("fresh_postgres_url")
