"""Launchers: turn a frozen experiment's tasks into one submitit job array.

Each cluster type is one Launcher subclass registered in LAUNCHERS (as submitit registers its Slurm,
Local and Debug executors), so a new cluster is a new class, not an edit of the others.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shlex
import sys
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import submitit

from ..experiment import Experiment
from ..runtime.task import TaskRunner


@dataclass
class LaunchedTask:
    task_index: int
    job_id: str
    job: Any  # the submitit Job, for waiting on it in this process


class Launcher(ABC):
    name: str

    @abstractmethod
    def launch(self, experiment: Experiment, indices: list[int]) -> list[LaunchedTask]:
        """Submit the tasks `indices` as one array and return without waiting for them."""


class LocalLauncher(Launcher):
    """Background processes on this machine via submitit's LocalExecutor. The controllers outlive the
    submitting command; runtime/task.py's slot locks keep at most array_parallelism training at once."""

    name = "local"

    def launch(self, experiment, indices):
        launch = experiment.launch
        executor = submitit.LocalExecutor(folder=experiment.submitit_dir)
        # The local controller's clock starts when the process starts, including the wait for a slot,
        # so each process gets the per-task limit times the number of waves ahead of it.
        waves = math.ceil(len(indices) / max(1, launch["array_parallelism"]))
        executor.update_parameters(timeout_min=experiment.resources["time"] * waves + 1,
                                   tasks_per_node=experiment.resources["tasks_per_node"])
        with _controllers_in_own_session():
            jobs = executor.submit_array([TaskRunner(experiment.root, i) for i in indices])
        return [LaunchedTask(i, str(job.job_id), job) for i, job in zip(indices, jobs)]


@contextlib.contextmanager
def _controllers_in_own_session():
    """submitit starts each local controller with a plain Popen, inside the terminal's process group, so a
    Ctrl-C meant to stop `holly-hpc submit --wait` from watching would also kill every task. Start the
    controllers in their own session instead: the tasks run on until they end (or are cancelled)."""
    from submitit.local import local as local_module

    real = local_module.subprocess
    shim = types.SimpleNamespace(**vars(real))
    shim.Popen = functools.partial(real.Popen, start_new_session=True)
    local_module.subprocess = shim
    try:
        yield
    finally:
        local_module.subprocess = real


class DebugLauncher(Launcher):
    """Runs the tasks in this process, one after another (submitit's DebugExecutor): for debugging a
    spec with breakpoints and full tracebacks. Blocks until all tasks have run."""

    name = "debug"

    def launch(self, experiment, indices):
        executor = submitit.DebugExecutor(folder=experiment.submitit_dir)
        jobs = executor.submit_array([TaskRunner(experiment.root, i) for i in indices])
        launched = []
        for i, job in zip(indices, jobs):
            # Run the submission directly rather than job.result(): submitit's debug jobs open pdb on a
            # failure, which would hang a non-interactive run; the failure is in the registry already.
            with _environ(SUBMITIT_DEBUG_JOB_ID=job.job_id, SUBMITIT_EXECUTOR="debug"):
                try:
                    job.submission().result()
                except Exception as exc:  # noqa: BLE001
                    print(f"task {i} failed: {exc}", file=sys.stderr)
            launched.append(LaunchedTask(i, str(job.job_id), job))
        return launched


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SlurmLauncher(Launcher):
    """A SLURM job array through submitit's SlurmExecutor, split into several arrays when it is larger than
    the cluster's MaxArraySize (each element still carries its own task index in its pickle). With a
    `container`, every task's Python runs inside the Apptainer image."""

    name = "slurm"

    def launch(self, experiment, indices):
        from .slurm import chunks, max_array_size, sbatch_parameters

        resources = experiment.resources
        python = shlex.quote(sys.executable)
        if experiment.container:
            from .apptainer import container_python

            python = container_python(experiment.container, gpus=resources["gpus_per_node"] > 0)
        executor = submitit.SlurmExecutor(folder=experiment.submitit_dir, python=python)
        executor.update_parameters(job_name=f"holly-{experiment.name}",
                                   **sbatch_parameters(resources, experiment.launch["array_parallelism"]))
        launched = []
        for part in chunks(indices, max_array_size()):
            jobs = executor.submit_array([TaskRunner(experiment.root, i) for i in part])
            launched += [LaunchedTask(i, str(job.job_id), job) for i, job in zip(part, jobs)]
        return launched


LAUNCHERS: dict[str, type[Launcher]] = {cls.name: cls for cls in (LocalLauncher, DebugLauncher, SlurmLauncher)}


def get_launcher(cluster: str) -> Launcher:
    try:
        return LAUNCHERS[cluster]()
    except KeyError:
        raise ValueError(f"unknown cluster {cluster!r}; known: {', '.join(LAUNCHERS)}") from None
