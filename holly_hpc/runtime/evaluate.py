"""Recompute a finished task's final metrics and pictures from its latest checkpoint (`holly-hpc eval`)."""

from __future__ import annotations

from ..experiment import Experiment
from .checkpoint import latest_checkpoint, load_checkpoint
from .outputs import MetricsStore, TaskPaths, write_json_atomic


def evaluate_task(experiment: Experiment, index: int) -> dict[str, float]:
    """Load the task's newest checkpoint into its kind, rewrite final/ and outputs.zarr's final arrays."""
    from .kinds import get_kind
    from .task import select_device

    task = experiment.task(index)
    paths = TaskPaths(experiment.task_dir(index))
    path = latest_checkpoint(paths.checkpoints)
    if path is None:
        raise FileNotFoundError(f"{paths.checkpoints}: no checkpoint to evaluate (has task {index} run?)")
    payload = load_checkpoint(path)
    kind = get_kind(task.config["kind"])(task.config, select_device(task.config["device"]), experiment.spec_dir)
    kind.load_state_dict(payload["kind"])
    paths.final.mkdir(parents=True, exist_ok=True)
    train = task.config["train"]
    final = kind.write_outputs(paths.final, MetricsStore(paths.zarr, train["steps"] // train["log_every"]))
    write_json_atomic(paths.final / "metrics.json", {"step": payload["step"], **final})
    return {"step": payload["step"], **final}
