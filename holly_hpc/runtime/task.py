"""TaskRunner: the small callable submitit pickles. It carries only (experiment_dir, task_index) and
re-reads the frozen plan inside the job, so no user code or closure crosses the submission boundary."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
import traceback
from pathlib import Path

import submitit

from ..experiment import Experiment
from ..registry import open_registry


def select_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on {socket.gethostname()}")
    return device


def cpu_threads(launch: dict, n_tasks: int) -> int:
    """launch.threads, or (0) this machine's cores shared among the tasks that run at once."""
    if launch.get("threads"):
        return int(launch["threads"])
    at_once = max(1, min(int(launch.get("array_parallelism", 1)), n_tasks))
    return max(1, (os.cpu_count() or 1) // at_once)


@contextlib.contextmanager
def local_slot(experiment: Experiment, poll_s: float = 0.5):
    """Hold one of array_parallelism slot locks: the local executor starts every array task at once,
    so this is what limits how many train together (the kernel frees the lock if the process dies)."""
    slots = int(experiment.launch.get("array_parallelism", 1))
    folder = experiment.root / ".slots"
    folder.mkdir(exist_ok=True)
    while True:
        for k in range(slots):
            fh = open(folder / f"slot-{k}.lock", "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            try:
                yield k
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        time.sleep(poll_s)


@contextlib.contextmanager
def task_lock(task_dir: Path):
    """Yield True while this process exclusively holds the task (False if another process does)."""
    task_dir.mkdir(parents=True, exist_ok=True)
    fh = open(task_dir / ".lock", "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        fh.close()


def current_job_id() -> str:
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return f"pid-{os.getpid()}"


def run_task(experiment: Experiment, index: int, registry=None, stop_after_step: int | None = None, out=None):
    """Build the task's kind from its frozen config and train it (resuming from its last checkpoint)."""
    import torch

    from .checkpoint import seed_everything
    from .kinds import get_kind
    from .outputs import TaskPaths
    from .trainer import RegistryReporter, Trainer

    task = experiment.task(index)
    config = task.config
    torch.set_num_threads(cpu_threads(experiment.launch, len(experiment.plan["tasks"])))
    device = select_device(config["device"])
    # Seed before building the model so initial weights are a function of the task seed alone.
    seed_everything(task.seed)
    kind = get_kind(config["kind"])(config, device, experiment.spec_dir)
    trainer = Trainer(kind, config, TaskPaths(experiment.task_dir(index)),
                      RegistryReporter(registry, experiment.name, index), label=task.task_id, out=out)
    return trainer.run(stop_after_step=stop_after_step)


class TaskRunner(submitit.helpers.Checkpointable):
    """Runs task `task_index` of the experiment frozen in `experiment_dir`; requeued on preemption."""

    def __init__(self, experiment_dir: str | Path, task_index: int):
        self.experiment_dir = str(experiment_dir)
        self.task_index = int(task_index)
        self._attempt: int | None = None
        self._requeued = False

    def __call__(self) -> dict:
        experiment = Experiment.load(self.experiment_dir)
        registry = open_registry(experiment.registry_url)
        slot = local_slot(experiment) if os.environ.get("SUBMITIT_EXECUTOR") == "local" else contextlib.nullcontext()
        with task_lock(experiment.task_dir(self.task_index)) as owned:
            if not owned:
                # A resubmission launched this task again while an earlier launch still holds it.
                print(f"task {self.task_index} is already queued or running in another process; nothing to do")
                return {"skipped": "already running"}
            with slot:
                return self._run(experiment, registry)

    def _run(self, experiment: Experiment, registry) -> dict:
        self._attempt = registry.start_attempt(experiment.name, self.task_index, current_job_id(),
                                               socket.gethostname(), os.getpid())
        try:
            result = run_task(experiment, self.task_index, registry)
        except BaseException as exc:
            if self._requeued:
                raise  # submitit's requeue exit after checkpoint(): the run is pending again, not failed
            cancelled = isinstance(exc, KeyboardInterrupt)
            error = "cancelled" if cancelled else traceback.format_exc(limit=20)
            registry.end_attempt(experiment.name, self.task_index, self._attempt,
                                 "cancelled" if cancelled else "failed", error)
            registry.finish(experiment.name, self.task_index, "cancelled" if cancelled else "failed", None, error)
            raise
        registry.end_attempt(experiment.name, self.task_index, self._attempt, "completed")
        registry.finish(experiment.name, self.task_index, "succeeded", result.final_metrics, None)
        return result.final_metrics

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR2 (time limit or preemption): requeue this same task. The requeued
        attempt resumes from the task's latest periodic checkpoint, so the result is unchanged."""
        self._requeued = True
        if self._attempt is not None:
            with contextlib.suppress(Exception):
                experiment = Experiment.load(self.experiment_dir)
                registry = open_registry(experiment.registry_url)
                registry.end_attempt(experiment.name, self.task_index, self._attempt, "preempted")
                registry.set_state(experiment.name, self.task_index, "pending", "requeued after SIGUSR2")
        return submitit.helpers.DelayedSubmission(TaskRunner(self.experiment_dir, self.task_index))
