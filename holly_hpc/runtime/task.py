"""TaskRunner: the small callable submitit pickles. It carries only (experiment_dir, task_index) and
re-reads the frozen plan inside the job, so no user code or closure crosses the submission boundary."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import submitit

from ..experiment import Experiment, restore_registry
from ..registry import open_registry, runtime_url
from ..registry.spool import SPOOL_FILE, SpooledRegistry
from . import usage
from .distributed import DistInfo, setup_distributed, teardown_distributed
from .preemption import REQUEUE_EXIT_CODE, Preempted, StopRequest, exit_for_requeue, exit_stopped
from .processes import process_identity


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


def cpu_threads(launch: dict, n_tasks: int, shares_machine: bool = True) -> int:
    """launch.threads; else on SLURM the CPUs the job was given; else the cores this process may use, shared
    among the tasks that run at once when they share the machine (oversubscribed OpenMP threads slow torch down
    badly). The machine's load average is not used: it lags by a minute, so a task started right after another
    finished would see the finished one's load and take one thread on an idle machine."""
    if launch.get("threads"):
        return int(launch["threads"])
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    available = len(os.sched_getaffinity(0))
    if not shares_machine:
        return available
    at_once = max(1, min(int(launch.get("array_parallelism", 1)), n_tasks))
    return max(1, available // at_once)


def _open_lock(path: Path):
    """A lock file opened for writing without following a symbolic link planted at its name."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644), "w")


@contextlib.contextmanager
def local_slot(experiment: Experiment, poll_s: float = 0.5, stop: StopRequest | None = None):
    """Hold one of array_parallelism slot locks: the local executor starts every array task at once,
    so this is what limits how many train together (the kernel frees the lock if the process dies).
    A stop request while waiting (cancel of a queued task) leaves the queue: Preempted at step 0."""
    slots = int(experiment.launch.get("array_parallelism", 1))
    folder = experiment.folder(".slots")
    folder.mkdir(exist_ok=True)
    while True:
        if stop is not None and stop.requested:
            raise Preempted(0, stop.signal_name)
        for k in range(slots):
            fh = _open_lock(folder / f"slot-{k}.lock")
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
    fh = _open_lock(task_dir / ".lock")
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


def run_task(
    experiment: Experiment,
    index: int,
    registry=None,
    stop_after_step: int | None = None,
    out=None,
    stop: StopRequest | None = None,
    dist: DistInfo | None = None,
    shares_machine: bool = True,
):
    """Build the task's kind from its frozen config and train it (resuming from its last checkpoint).
    shares_machine: other tasks run beside it on this machine (see cpu_threads)."""
    import torch

    from .checkpoint import seed_everything
    from .kinds import get_kind
    from .outputs import TaskPaths, tensorboard_run_name
    from .trainer import RegistryReporter, Trainer

    dist = dist or DistInfo()
    task = experiment.task(index)
    config = task.config
    torch.set_num_threads(cpu_threads(experiment.launch, len(experiment.plan["tasks"]), shares_machine))
    device = select_device(config["device"], dist.local_rank if dist.active else None)
    dist = dist.on(device)  # collectives on the training device (NCCL has no CPU tensors)
    # Seed before building the model so initial weights are a function of the task seed alone.
    seed_everything(task.seed)
    kind = get_kind(config["kind"])(config, device, experiment.spec_dir, dist)
    reporter = RegistryReporter(
        registry if dist.is_main else None,
        experiment.name,
        index,
        flush_s=experiment.plan.get("registry_flush_s", 10.0),
    )
    varying = list(dict.fromkeys(key for t in experiment.tasks for key in t.overrides))
    if len({t.seed for t in experiment.tasks}) > 1:
        varying.append("seed")
    trainer = Trainer(
        kind,
        config,
        TaskPaths(experiment.task_dir(index), tensorboard_run_name(task.overrides)),
        reporter,
        label=task.task_id,
        out=out,
        stop=stop,
        dist=dist,
        hparam_keys=varying,
    )
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
    (folder / f"rank-{dist.rank}.json").write_text(
        json.dumps({"rank": dist.rank, "world": dist.world, "params_sha256": digest.hexdigest()})
    )


class TaskRunner(submitit.helpers.Checkpointable):
    """Runs task `task_index` of the experiment frozen in `experiment_dir`; requeued on preemption."""

    # A runner pickled before these were fields (a SLURM job queued across an upgrade) gets SLURM's conventions:
    # local controllers unpickle at once, so no local runner waits that long.
    shares_machine = False
    requeue_code: int | None = REQUEUE_EXIT_CODE

    def __init__(
        self, experiment_dir: str | Path, task_index: int, shares_machine: bool = False, requeue_code: int | None = None
    ):
        """What the launcher knows of where its tasks run (see Launcher): shares_machine, tasks side by side on
        one machine (slot locks bound how many train at once, and they split the cores); requeue_code, the exit
        code on which it starts the task again (None: the task runs in the submitting process and never exits)."""
        self.experiment_dir = str(experiment_dir)
        self.task_index = int(task_index)
        self.shares_machine = bool(shares_machine)
        self.requeue_code = requeue_code
        self._attempt: int | None = None
        self._requeued = False

    def __call__(self) -> dict:
        stop = StopRequest().install()  # before anything slow: a signal during set-up is not lost
        try:
            return self._call(stop)
        finally:
            stop.uninstall()

    def _call(self, stop: StopRequest) -> dict:
        experiment = Experiment.load(self.experiment_dir)
        registry = open_registry(runtime_url(experiment.registry_url))
        done = _succeeded(registry, experiment, self.task_index)
        if done is not None:  # e.g. an exported sbatch script run again (every rank sees this and stops together)
            print(f"task {self.task_index} already succeeded; nothing to do")
            return done
        dist = setup_distributed(_device_type(experiment.task(self.task_index).config["device"]))
        try:
            if not dist.is_main:  # other ranks train alongside rank 0, which owns the task's bookkeeping
                return self._train(experiment, None, stop, dist)
            slots = self.shares_machine and not dist.active
            task_dir = experiment.task_dir(self.task_index)
            registry = SpooledRegistry(
                registry,
                task_dir / SPOOL_FILE,
                label=experiment.task(self.task_index).task_id,
                restore=functools.partial(restore_registry, registry, experiment),
            )
            with task_lock(task_dir) as owned:
                if not owned:
                    # A resubmission launched this task again while an earlier launch still holds it. Nothing is
                    # written: the registry keeps the job id of the process that holds the task.
                    print(f"task {self.task_index} is already queued or running in another process; nothing to do")
                    return {"skipped": "already running"}
                try:
                    with local_slot(experiment, stop=stop) if slots else contextlib.nullcontext():
                        return self._run(experiment, registry, stop, dist)
                except Preempted as exc:
                    if exc.step != 0 or self._attempt is not None:
                        raise
                    print(f"task {self.task_index} left the queue on {exc.signal_name} before it started", flush=True)
                    exit_stopped(exc.signal_name, self.requeue_code)
                    raise
        finally:
            teardown_distributed()

    def _train(self, experiment, registry, stop, dist) -> dict:
        try:
            result = run_task(
                experiment, self.task_index, registry, stop=stop, dist=dist, shares_machine=self.shares_machine
            )
        except Preempted as exc:
            exit_for_requeue(self.requeue_code) if exc.requeue else exit_stopped(exc.signal_name, self.requeue_code)
            raise
        return result.final_metrics or {}

    def _run(self, experiment: Experiment, registry, stop: StopRequest, dist: DistInfo) -> dict:
        name, index = experiment.name, self.task_index
        # The start time names this attempt even if its start is spooled (the number comes on replay).
        started = time.time()
        self._attempt = registry.start_attempt(
            name, index, current_job_id(), socket.gethostname(), os.getpid(), at=started, proc_start=process_identity()
        )

        cpu_at_start = usage.cpu_seconds()

        def end(reason: str, error: str | None = None) -> None:
            registry.end_attempt(name, index, self._attempt, reason, error, started=started)
            with contextlib.suppress(OSError):  # the figures are for `report`; never a reason to fail a task
                usage.record(
                    experiment.task_dir(index),
                    self._attempt,
                    current_job_id(),
                    reason,
                    usage.measure(started, cpu_at_start),
                )

        try:
            result = run_task(experiment, index, registry, stop=stop, dist=dist, shares_machine=self.shares_machine)
        except Preempted as exc:
            if exc.requeue:
                end("preempted", str(exc))
                registry.set_state(name, index, "pending", f"requeued: {exc}")
                registry.replay()
                exit_for_requeue(self.requeue_code)
            else:  # stopped, not requeued: SLURM requeues a preempted job itself; scancel and cancel mean stop
                end("cancelled", str(exc))
                registry.finish(name, index, "cancelled", None, f"{exc}; checkpointed there: resubmit to resume")
                registry.replay()
                exit_stopped(exc.signal_name, self.requeue_code)
            raise  # in the submitting process (debug executor, tests): nothing to restart
        except BaseException as exc:
            if self._requeued:
                raise  # submitit's requeue exit after checkpoint(): the run is pending again, not failed
            cancelled = isinstance(exc, KeyboardInterrupt)
            error = "cancelled" if cancelled else traceback.format_exc(limit=20)
            end("cancelled" if cancelled else "failed", error)
            registry.finish(name, index, "cancelled" if cancelled else "failed", None, error)
            registry.replay()
            if cancelled:
                exit_stopped("SIGINT", self.requeue_code)  # a second signal: leave without a traceback in the log
            raise
        end("completed")
        registry.finish(name, index, "succeeded", result.final_metrics, None)
        if not registry.replay().done:
            print(
                f"registry still unreachable: {registry.pending()} write(s) wait in {registry.spool_path}; "
                f"replay them with: holly-hpc registry sync {experiment.root}",
                file=sys.stderr,
            )
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
        return submitit.helpers.DelayedSubmission(
            TaskRunner(self.experiment_dir, self.task_index, self.shares_machine, self.requeue_code)
        )


def _succeeded(registry, experiment: Experiment, index: int) -> dict | None:
    """The final metrics if the registry says the task succeeded. An unreachable or emptied registry
    says nothing: then the task lock and its checkpoints decide, and its writes are spooled or restored."""
    try:
        runs = registry.runs(experiment.name)
    except Exception as exc:
        print(f"registry unavailable at start ({exc}); going on", file=sys.stderr, flush=True)
        return None
    done = [r for r in runs if r.task_index == index and r.state == "succeeded"]
    return (done[0].final_metrics or {}) if done else None


def _device_type(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":")[0]
