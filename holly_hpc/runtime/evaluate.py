"""Recompute a finished task's final metrics and pictures from its latest checkpoint (`holly-hpc eval`)."""

from __future__ import annotations

import sys

from ..experiment import Experiment
from .checkpoint import newest_intact_checkpoint
from .outputs import MetricsStore, TaskPaths, write_json_atomic


def newest_task_checkpoint(experiment: Experiment, index: int, kind: str | None = None) -> dict:
    """The payload of task `index`'s newest checkpoint; with `kind`, the task must be of that kind."""
    config = experiment.task(index).config
    if kind is not None and config["kind"] != kind:
        raise ValueError(f"task {index} of {experiment.name} is a {config['kind']} task, not {kind}")
    folder = TaskPaths(experiment.task_dir(index)).checkpoints

    def corrupt(path, aside, why) -> None:
        print(
            f"warning: checkpoint {path} is corrupt ({why}); moved to {aside.name if aside else '?'}; "
            "using the newest intact one",
            file=sys.stderr,
        )

    found = newest_intact_checkpoint(folder, corrupt)
    if found is None:
        raise FileNotFoundError(f"{folder}: no intact checkpoint (has task {index} run?)")
    return found[1]


def evaluate_task(experiment: Experiment, index: int) -> dict[str, float]:
    """Load the task's newest checkpoint into its kind, rewrite final/ and outputs.zarr's final arrays."""
    from .kinds import get_kind
    from .task import select_device

    task = experiment.task(index)
    paths = TaskPaths(experiment.task_dir(index))
    payload = newest_task_checkpoint(experiment, index)
    kind = get_kind(task.config["kind"])(task.config, select_device(task.config["device"]), experiment.spec_dir)
    kind.load_state_dict(payload["kind"])
    paths.final.mkdir(parents=True, exist_ok=True)
    train = task.config["train"]
    final = kind.write_outputs(paths.final, MetricsStore(paths.zarr, train["steps"] // train["log_every"]))
    write_json_atomic(paths.final / "metrics.json", {"step": payload["step"], **final})
    return {"step": payload["step"], **final}
