"""Shared fixtures: small specs that train in seconds, written into a temporary folder."""

from __future__ import annotations

import os
import sys
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


def env_for_subprocess() -> dict:
    env = dict(os.environ)
    env.pop("HOLLY_REGISTRY_URL", None)
    return env
