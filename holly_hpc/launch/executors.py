"""Launchers: turn a frozen experiment's tasks into one submitit job array, and own everything else that
differs between clusters.

Each cluster type is one Launcher subclass registered in LAUNCHERS (as submitit registers its Slurm, Local and
Debug executors, each with its Job and JobEnvironment): which resources it can run (`problems`, asked by
validate), the check before anything is frozen, submission, its scheduler's view of the jobs (`states`, for
`status`), which tasks are still alive and how to stop them (`cancel`), and where its tasks run
(`shares_machine`, `requeue_code`, `synchronous`). The CLI, spec and runtime ask the experiment's launcher
and never test a cluster's name, so a new cluster is one class here plus its name in the schema's
launch.cluster enum.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shlex
import signal
import sys
import time
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import submitit

from ..experiment import Experiment
from ..runtime.preemption import LOCAL_REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE
from ..runtime.processes import stop_process, this_host
from .liveness import attempt_alive, is_submitit_controller, open_attempt

if TYPE_CHECKING:
    from ..runtime.task import TaskRunner


@dataclass
class LaunchedTask:
    task_index: int
    job_id: str
    job: Any  # the submitit Job, for waiting on it in this process


@dataclass
class Stopped:
    task_index: int
    ended: bool  # verified: nothing of the task runs any more
    detail: str  # what was done and seen, for the user


class Launcher(ABC):
    """One cluster type: submits (launch), checks before anything is frozen (check), and owns what only it can
    know about its jobs: what its scheduler says of them (states), which are still alive (active) and how to
    stop them (cancel)."""

    name: str
    # Its tasks run side by side on the submitting machine: slot locks bound how many train at once
    # (launch.array_parallelism) and they share its cores (runtime/task.py).
    shares_machine = False
    # launch() returns only once every task has run (in the submitting process): nothing to wait for.
    synchronous = False
    max_nodes: int | None = 1  # None: any number
    # The exit code on which this cluster starts a task again after it checkpointed (SIGUSR2); None: the task
    # runs in the submitting process and must not exit.
    requeue_code: int | None = None

    def runner(self, experiment: Experiment, index: int) -> TaskRunner:
        """What a job of this cluster runs: data only (the experiment's folder, the index, how to behave)."""
        from ..runtime.task import TaskRunner  # torch comes with it: not for `status`, `cancel` or validate

        return TaskRunner(experiment.root, index, self.shares_machine, self.requeue_code)

    @classmethod
    def problems(cls, resources: dict) -> list[tuple[tuple, str]]:
        """Resource requests this cluster cannot run, as [(key path, message)]: validate reports them at
        their place in the spec, before anything is submitted."""
        if cls.max_nodes is not None and resources["nodes"] > cls.max_nodes:
            return [
                (
                    ("resources", "nodes"),
                    f"expected {cls.max_nodes} node with launch.cluster {cls.name} (several nodes need slurm), "
                    f"got {resources['nodes']}",
                )
            ]
        return []

    def check(self, experiment: Experiment) -> None:
        """Raise (with a message naming what is wrong) if launching would fail; writes nothing."""
        return  # an optional hook: local processes need no check

    @abstractmethod
    def launch(self, experiment: Experiment, indices: list[int]) -> list[LaunchedTask]:
        """Submit the tasks `indices` as one array and return without waiting for them."""

    def states(self, job_ids: list[str]) -> dict[str, str] | None:
        """The scheduler's state of each job id, or None where there is no scheduler to ask (or it cannot be
        asked now: then a note on stderr says why). Local processes have none: the registry tells."""
        return None

    def usage(self, job_ids: list[str]) -> dict[str, dict] | None:
        """What the scheduler measured of each job (state, cpu_s, max_rss_mb), for `report`; None where there is
        no scheduler (the tasks' own usage records then stand alone). Raises when the scheduler cannot be asked."""
        return None

    def ended_as(self, scheduler_state: str) -> str | None:
        """The registry state a task the registry still counts as pending/running has in truth, when its job
        is in `scheduler_state` (e.g. cancelled by the scheduler); None while the job may still report."""
        return None

    def active(self, experiment: Experiment, registry, runs) -> dict[int, str]:
        """Tasks whose job is still queued or running (index -> what), so a resubmission leaves them be.
        Here: a running task whose process, on this machine, is alive."""
        found = {}
        for run in runs:
            if run.state == "running":
                attempt = open_attempt(registry, experiment.name, run.task_index)
                if attempt_alive(attempt) is not False:  # alive, or on another machine: do not start it twice
                    found[run.task_index] = f"running (job {run.job_id}, pid {attempt['pid'] if attempt else '?'})"
        return found

    def cancel(self, experiment: Experiment, registry, runs, grace_s: float) -> list[Stopped]:
        """Stop the processes of these unfinished tasks and verify they ended: SIGTERM (the task checkpoints
        at its next step boundary and exits), SIGKILL after `grace_s`."""
        return [self._stop_local(experiment, registry, run, grace_s) for run in runs]

    def _stop_local(self, experiment, registry, run, grace_s: float) -> Stopped:
        attempt = open_attempt(registry, experiment.name, run.task_index)
        alive = attempt_alive(attempt)
        if alive:
            outcome = stop_process(int(attempt["pid"]), attempt["proc_start"], grace_s)
            words = {
                "ended": "stopped at a step boundary after SIGTERM",
                "gone": "had already ended",
                "killed": f"did not stop within {grace_s:g} s: killed",
                "unknown": "could not be verified to end",
            }
            return Stopped(run.task_index, outcome != "unknown", f"process {attempt['pid']} {words[outcome]}")
        if alive is None and attempt is not None and attempt["host"] != this_host():
            return Stopped(
                run.task_index, False, f"process {attempt['pid']} runs on {attempt['host']}, not here: cancel it there"
            )
        controller = int(run.job_id) if run.job_id and run.job_id.isdigit() else None
        if controller and is_submitit_controller(controller):  # queued (no attempt yet), or not checkable
            os.kill(controller, signal.SIGTERM)  # forwarded to its task, which leaves the slot queue
            deadline = time.monotonic() + grace_s
            while is_submitit_controller(controller) and time.monotonic() < deadline:
                time.sleep(0.2)
            if is_submitit_controller(controller):
                os.killpg(controller, signal.SIGKILL)
                return Stopped(run.task_index, True, f"queued job {controller} killed after {grace_s:g} s")
            return Stopped(
                run.task_index,
                True,
                f"queued job {controller} stopped before it started"
                if attempt is None
                else f"job {controller} stopped",
            )
        if alive is None and attempt is not None:
            return Stopped(run.task_index, False, f"process {attempt['pid']} could not be checked: stop it by hand")
        return Stopped(run.task_index, True, "no process was running it")


class LocalLauncher(Launcher):
    """Background processes on this machine via submitit's LocalExecutor. The controllers outlive the
    submitting command; runtime/task.py's slot locks keep at most array_parallelism training at once."""

    name = "local"
    shares_machine = True
    requeue_code = LOCAL_REQUEUE_EXIT_CODE  # submitit's local controller reruns the task on it

    def launch(self, experiment, indices):
        launch = experiment.launch
        executor = submitit.LocalExecutor(folder=experiment.submitit_dir)
        # The local controller's clock starts when the process starts, including the wait for a slot,
        # so each process gets the per-task limit times the number of waves ahead of it.
        waves = math.ceil(len(indices) / max(1, launch["array_parallelism"]))
        executor.update_parameters(
            timeout_min=experiment.resources["time"] * waves + 1, tasks_per_node=experiment.resources["tasks_per_node"]
        )
        with _controllers_in_own_session():
            jobs = executor.submit_array([self.runner(experiment, i) for i in indices])
        return [LaunchedTask(i, str(job.job_id), job) for i, job in zip(indices, jobs, strict=True)]


@contextlib.contextmanager
def _controllers_in_own_session():
    """submitit starts each local controller with a plain Popen, inside the terminal's process group, so a
    Ctrl-C meant to stop `holly-hpc submit --wait` from watching would also kill every task. Start the
    controllers in their own session instead: the tasks run on until they end (or are cancelled). They
    also get no terminal streams (their tasks log to files): otherwise `holly-hpc submit ... | tee x`
    would wait for the last task, since the controllers would hold the pipe open."""
    from submitit.local import local as local_module

    real = local_module.subprocess
    shim = types.SimpleNamespace(**vars(real))
    shim.Popen = functools.partial(
        real.Popen, start_new_session=True, stdin=real.DEVNULL, stdout=real.DEVNULL, stderr=real.DEVNULL
    )
    local_module.subprocess = shim
    try:
        yield
    finally:
        local_module.subprocess = real


class DebugLauncher(Launcher):
    """Runs the tasks in this process, one after another (submitit's DebugExecutor): for debugging a
    spec with breakpoints and full tracebacks. Blocks until all tasks have run."""

    name = "debug"
    synchronous = True

    @classmethod
    def problems(cls, resources):
        found = super().problems(resources)
        if resources["tasks_per_node"] > 1:
            found.append(
                (
                    ("resources", "tasks_per_node"),
                    "expected 1 with launch.cluster debug (it runs in the submitting process), got "
                    f"{resources['tasks_per_node']}",
                )
            )
        return found

    def launch(self, experiment, indices):
        executor = submitit.DebugExecutor(folder=experiment.submitit_dir)
        jobs = executor.submit_array([self.runner(experiment, i) for i in indices])
        launched = []
        for i, job in zip(indices, jobs, strict=True):
            # Run the submission directly rather than job.result(): submitit's debug jobs open pdb on a
            # failure, which would hang a non-interactive run; the failure is in the registry already.
            with _environ(SUBMITIT_DEBUG_JOB_ID=job.job_id, SUBMITIT_EXECUTOR="debug"):
                try:
                    job.submission().result()
                except Exception as exc:
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
    ALIVE = (
        "PENDING",
        "RUNNING",
        "CONFIGURING",
        "COMPLETING",
        "REQUEUED",
        "RESIZING",
        "SUSPENDED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
    )
    # SLURM end states that mean a task the registry still calls pending/running will not report any more.
    ENDED: ClassVar[dict[str, str]] = {
        "CANCELLED": "cancelled",
        "FAILED": "failed",
        "TIMEOUT": "failed",
        "NODE_FAIL": "failed",
        "OUT_OF_MEMORY": "failed",
        "BOOT_FAIL": "failed",
        "DEADLINE": "failed",
    }
    max_nodes = None
    requeue_code = REQUEUE_EXIT_CODE  # the job script's teardown runs `scontrol requeue` on it (slurm.py)

    def _executor(self, experiment) -> submitit.SlurmExecutor:
        from .slurm import refuse_unsafe, sbatch_parameters

        resources = experiment.resources
        python = shlex.quote(sys.executable)
        if experiment.container:
            from .apptainer import container_python

            python = container_python(experiment.container, gpus=resources["gpus_per_node"] > 0)
        parameters = {
            "job_name": f"holly-{experiment.name}",
            **sbatch_parameters(resources, experiment.launch["array_parallelism"]),
        }
        # submitit writes every parameter into an #SBATCH line as it is, and the folder and the python command
        # into the script: none may break out of its line.
        refuse_unsafe(parameters, str(experiment.submitit_dir), python)
        executor = submitit.SlurmExecutor(folder=experiment.submitit_dir, python=python)
        executor.update_parameters(**parameters)
        return executor

    def check(self, experiment):
        from .sbatch import render_scripts
        from .slurm import max_array_size, test_only

        self._executor(experiment)
        first = list(range(min(len(experiment.plan["tasks"]), max_array_size())))
        ((_, script),) = render_scripts(experiment, first, experiment.root / "check.sbatch", len(first))
        test_only(script)

    def launch(self, experiment, indices):
        from .slurm import chunks, max_array_size

        executor = self._executor(experiment)
        launched = []
        for part in chunks(indices, max_array_size()):
            jobs = executor.submit_array([self.runner(experiment, i) for i in part])
            launched += [LaunchedTask(i, str(job.job_id), job) for i, job in zip(part, jobs, strict=True)]
        return launched

    def _states(self, runs) -> dict[str, str]:
        """Raises SlurmError when SLURM cannot be asked (cancel must not guess)."""
        from .slurm import job_states

        return job_states([r.job_id for r in runs if r.job_id])

    def states(self, job_ids):
        from .slurm import SlurmError, job_states

        try:
            return job_states(job_ids)
        except (SlurmError, OSError) as exc:  # e.g. `holly-hpc status` away from the cluster
            print(f"note: cannot ask SLURM for the jobs' states ({exc})", file=sys.stderr)
            return None

    def usage(self, job_ids):
        from .slurm import sacct_usage

        return sacct_usage(job_ids)

    def ended_as(self, scheduler_state):
        return self.ENDED.get(scheduler_state)

    def active(self, experiment, registry, runs):
        unfinished = [r for r in runs if r.state in ("pending", "running") and r.job_id]
        states = self.states([r.job_id for r in unfinished]) if unfinished else {}
        if states is None:  # e.g. `holly-hpc sbatch` away from the cluster: the task locks decide
            return {}
        return {
            r.task_index: f"{states[r.job_id].lower()} (job {r.job_id})"
            for r in unfinished
            if states.get(r.job_id) in self.ALIVE
        }

    def cancel(self, experiment, registry, runs, grace_s):
        """scancel, then wait until SLURM reports every job ended (SIGTERM reaches the task, which checkpoints)."""
        from .slurm import cancel

        with_job = [r for r in runs if r.job_id]
        if with_job:
            cancel([r.job_id for r in with_job])
        deadline = time.monotonic() + grace_s
        states = self._states(with_job) if with_job else {}
        while any(s in self.ALIVE for s in states.values()) and time.monotonic() < deadline:
            time.sleep(1.0)
            states = self._states(with_job)
        return [
            Stopped(
                r.task_index,
                states.get(r.job_id) not in self.ALIVE,
                f"job {r.job_id}: {states.get(r.job_id, 'UNKNOWN')}",
            )
            if r.job_id
            else Stopped(r.task_index, True, "never submitted")
            for r in runs
        ]


LAUNCHERS: dict[str, type[Launcher]] = {cls.name: cls for cls in (LocalLauncher, DebugLauncher, SlurmLauncher)}


def get_launcher(cluster: str) -> Launcher:
    try:
        return LAUNCHERS[cluster]()
    except KeyError:
        raise ValueError(f"unknown cluster {cluster!r}; known: {', '.join(LAUNCHERS)}") from None
