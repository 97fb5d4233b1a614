"""TaskRunner: the small callable submitit pickles. It carries only (experiment_dir, task_index) and
re-reads the frozen plan inside the job, so no user code or closure crosses the submission boundary."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import submitit

from ..experiment import Experiment
from ..registry import open_registry, runtime_url
from ..registry.spool import SPOOL_FILE, SpooledRegistry
from .distributed import DistInfo, setup_distributed, teardown_distributed
from .preemption import Preempted, StopRequest, exit_for_requeue


def select_device(name: str, local_rank: int | None = None):
    """The spec's device; with several ranks on a node, rank r takes GPU r."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on {socket.gethostname()}")
    return device


def cpu_threads(launch: dict, n_tasks: int) -> int:
    """launch.threads; else on SLURM the CPUs the job was given; else (local) the cores this process may
    use, shared among the tasks that run at once (oversubscribed OpenMP threads slow torch down badly)."""
    if launch.get("threads"):
        return int(launch["threads"])
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    available = len(os.sched_getaffinity(0))
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return available
    at_once = max(1, min(int(launch.get("array_parallelism", 1)), n_tasks))
    return max(1, available // at_once)


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


def run_task(experiment: Experiment, index: int, registry=None, stop_after_step: int | None = None, out=None,
             stop: StopRequest | None = None, dist: DistInfo | None = None):
    """Build the task's kind from its frozen config and train it (resuming from its last checkpoint)."""
    import torch

    from .checkpoint import seed_everything
    from .kinds import get_kind
    from .outputs import TaskPaths
    from .trainer import RegistryReporter, Trainer

    dist = dist or DistInfo()
    task = experiment.task(index)
    config = task.config
    torch.set_num_threads(cpu_threads(experiment.launch, len(experiment.plan["tasks"])))
    device = select_device(config["device"], dist.local_rank if dist.active else None)
    # Seed before building the model so initial weights are a function of the task seed alone.
    seed_everything(task.seed)
    kind = get_kind(config["kind"])(config, device, experiment.spec_dir, dist)
    reporter = RegistryReporter(registry if dist.is_main else None, experiment.name, index,
                                flush_s=experiment.plan.get("registry_flush_s", 10.0))
    trainer = Trainer(kind, config, TaskPaths(experiment.task_dir(index)), reporter, label=task.task_id, out=out,
                      stop=stop, dist=dist)
    result = trainer.run(stop_after_step=stop_after_step)
    if dist.active:
        write_rank_digest(experiment.task_dir(index), dist, kind)
    return result


def write_rank_digest(task_dir: Path, dist: DistInfo, kind) -> None:
    """ranks/rank-<r>.json: a checksum of this rank's trained parameters, so anyone can check the ranks
    agree. (BatchNorm running statistics are per rank by design and left out.)"""
    import hashlib
    import json

    digest = hashlib.sha256()
    for tensor in kind.trained_parameters():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    folder = task_dir / "ranks"
    folder.mkdir(exist_ok=True)
    (folder / f"rank-{dist.rank}.json").write_text(json.dumps({"rank": dist.rank, "world": dist.world,
                                                              "params_sha256": digest.hexdigest()}))


class TaskRunner(submitit.helpers.Checkpointable):
    """Runs task `task_index` of the experiment frozen in `experiment_dir`; requeued on preemption."""

    def __init__(self, experiment_dir: str | Path, task_index: int):
        self.experiment_dir = str(experiment_dir)
        self.task_index = int(task_index)
        self._attempt: int | None = None
        self._requeued = False

    def __call__(self) -> dict:
        stop = StopRequest().install()  # before anything slow: a signal during set-up is not lost
        experiment = Experiment.load(self.experiment_dir)
        registry = open_registry(runtime_url(experiment.registry_url))
        done = [r for r in registry.runs(experiment.name) if r.task_index == self.task_index and r.state == "succeeded"]
        if done:  # e.g. an exported sbatch script run again (every rank sees this and stops together)
            print(f"task {self.task_index} already succeeded; nothing to do")
            return done[0].final_metrics or {}
        dist = setup_distributed(_device_type(experiment.task(self.task_index).config["device"]))
        try:
            if not dist.is_main:  # other ranks train alongside rank 0, which owns the task's bookkeeping
                return self._train(experiment, None, stop, dist)
            local = os.environ.get("SUBMITIT_EXECUTOR") == "local" and not dist.active
            task_dir = experiment.task_dir(self.task_index)
            registry = SpooledRegistry(registry, task_dir / SPOOL_FILE, label=experiment.task(self.task_index).task_id)
            with task_lock(task_dir) as owned:
                if not owned:
                    # A resubmission launched this task again while an earlier launch still holds it.
                    print(f"task {self.task_index} is already queued or running in another process; nothing to do")
                    return {"skipped": "already running"}
                with local_slot(experiment) if local else contextlib.nullcontext():
                    return self._run(experiment, registry, stop, dist)
        finally:
            teardown_distributed()

    def _train(self, experiment, registry, stop, dist) -> dict:
        try:
            result = run_task(experiment, self.task_index, registry, stop=stop, dist=dist)
        except Preempted:
            if exit_for_requeue() is False:
                raise
        return result.final_metrics or {}

    def _run(self, experiment: Experiment, registry, stop: StopRequest, dist: DistInfo) -> dict:
        name, index = experiment.name, self.task_index
        # The start time names this attempt even if its start is spooled (the number comes on replay).
        started = time.time()
        self._attempt = registry.start_attempt(name, index, current_job_id(), socket.gethostname(), os.getpid(), at=started)

        def end(reason: str, error: str | None = None) -> None:
            registry.end_attempt(name, index, self._attempt, reason, error, started=started)

        try:
            result = run_task(experiment, index, registry, stop=stop, dist=dist)
        except Preempted as exc:
            end("preempted", str(exc))
            registry.set_state(name, index, "pending", f"requeued: {exc}")
            registry.replay()
            if exit_for_requeue() is False:
                raise
        except BaseException as exc:
            if self._requeued:
                raise  # submitit's requeue exit after checkpoint(): the run is pending again, not failed
            cancelled = isinstance(exc, KeyboardInterrupt)
            error = "cancelled" if cancelled else traceback.format_exc(limit=20)
            end("cancelled" if cancelled else "failed", error)
            registry.finish(name, index, "cancelled" if cancelled else "failed", None, error)
            registry.replay()
            raise
        end("completed")
        registry.finish(name, index, "succeeded", result.final_metrics, None)
        if not registry.replay():
            print(f"registry still unreachable: {registry.pending()} write(s) wait in {registry.spool_path}; "
                  f"replay them with: holly-hpc registry sync {experiment.root}", file=sys.stderr)
        return result.final_metrics

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called only if submitit's own SIGUSR2 handler fires (before __call__ installed ours): requeue this
        same task; the requeued attempt resumes from the task's latest periodic checkpoint."""
        self._requeued = True
        if self._attempt is not None:
            with contextlib.suppress(Exception):
                experiment = Experiment.load(self.experiment_dir)
                registry = open_registry(runtime_url(experiment.registry_url))
                registry.end_attempt(experiment.name, self.task_index, self._attempt, "preempted")
                registry.set_state(experiment.name, self.task_index, "pending", "requeued after SIGUSR2")
        return submitit.helpers.DelayedSubmission(TaskRunner(self.experiment_dir, self.task_index))


def _device_type(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":")[0]
