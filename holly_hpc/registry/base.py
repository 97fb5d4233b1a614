"""The run registry interface: one set of operations, one implementation per database."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

STATES = ("pending", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class MissingRows(LookupError):
    """A write found no row to write to: the experiment or run is not in this database (a deleted SQLite file,
    a new PostgreSQL database). The caller can register the experiment again and retry."""


@dataclass(frozen=True)
class RunRow:
    experiment: str
    task_index: int
    task_id: str
    state: str
    attempts: int
    last_step: int | None
    last_loss: float | None
    created: float
    started: float | None
    finished: float | None
    heartbeat: float | None
    out_dir: str
    final_metrics: dict | None
    error: str | None
    job_id: str | None = None  # the scheduler's id of the task's latest submission (SLURM: ARRAYID_TASKID)

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.finished or now) - self.started


@dataclass(frozen=True)
class ExperimentRow:
    name: str
    created: float
    experiment_dir: str
    counts: dict  # state -> number of runs


# The interface's methods, by what they do to the database. Every abstract method of Registry is in exactly one
# of TASK_WRITES, SETUP_WRITES and READS (tests/test_registry_interface.py checks it).

TASK_WRITES = frozenset({"start_attempt", "end_attempt", "set_state", "note", "heartbeat", "log_metrics", "finish"})
"""The writes a running task makes. Each is idempotent and carries the moment it happened (`at=`, or the wall
times in its rows), so SpooledRegistry appends one that fails to the task's spool file and replays it later,
in order, as if it had landed then: these are the spool's writes."""

STAMPED_WRITES = frozenset({"start_attempt", "end_attempt", "set_state", "note", "heartbeat", "finish"})
"""The task writes that take `at=` (when it happened, default now): the spool fills it in before a write is
spooled, so a replay records the original time, not the time of the replay."""

SETUP_WRITES = frozenset({"init", "migrate", "upsert_experiment", "upsert_runs", "set_job_ids"})
"""Writes made by submit, the CLI and the restore of lost rows, never by a task through the spool: they must
reach the database or fail loudly (a submission whose rows or job ids were never written would launch tasks
the registry cannot see; a spooled migrate would report no versions), so they are never spooled."""

WRITE_METHODS = TASK_WRITES | SETUP_WRITES

READS = frozenset(
    {
        "schema_versions",
        "runs",
        "experiments",
        "experiment_details",
        "run_config",
        "attempts",
        "metrics",
        "count_metrics",
    }
)
"""Methods that only read. A SpooledRegistry passes them straight to the database (no spooling)."""


class Registry(ABC):
    """Writes are idempotent; every method opens and closes its own short-lived connection. A write that
    finds no experiment or run row to write to raises MissingRows instead of doing nothing.

    Writes are TASK_WRITES (spooled during an outage) and SETUP_WRITES (never spooled); the rest are READS.
    Timestamps (`at=`, `started=`) are seconds since the epoch (time.time())."""

    url: str  # where the registry is, without a password: sqlite:///path or postgresql://user@host/db

    # ------------------------------------------------------------------------------- setup writes
    @abstractmethod
    def init(self) -> None:
        """Setup write: create the tables if they do not exist (and bring the schema up to date)."""

    @abstractmethod
    def migrate(self) -> list[int]:
        """Setup write: bring the schema to the latest version; returns the versions applied now."""

    @abstractmethod
    def upsert_experiment(
        self, name: str, spec_text: str, spec_hash: str, experiment_dir: str, provenance: dict | None = None
    ) -> None:
        """Setup write: the experiment's row, inserted or updated. provenance: owner, git_commit, git_dirty,
        holly_hpc/torch/python versions, container image/digest."""

    @abstractmethod
    def upsert_runs(self, experiment: str, runs: list[dict]) -> None:
        """Setup write: runs are dicts with task_index, task_id, config (JSON text), config_hash, seed, out_dir.
        New rows are pending; a run already there is left as it is."""

    @abstractmethod
    def set_job_ids(self, experiment: str, job_ids: dict[int, str]) -> None:
        """Setup write: record the scheduler's job id of each submitted task (task index -> id); a task already
        running keeps the id of the job that runs it."""

    # -------------------------------------------------------------------------------- task writes
    @abstractmethod
    def set_state(self, experiment: str, task_index: int, state: str, reason: str, at: float | None = None) -> None:
        """Task write: move a run to `state` and record the transition, at time `at` (default now), as an event."""

    @abstractmethod
    def note(self, experiment: str, task_index: int, reason: str, at: float | None = None) -> None:
        """Task write: record an event at time `at` (default now) that leaves the run's state as it is (a corrupt
        checkpoint set aside, say)."""

    @abstractmethod
    def start_attempt(
        self,
        experiment: str,
        task_index: int,
        job_id: str,
        host: str,
        pid: int,
        at: float | None = None,
        proc_start: str | None = None,
    ) -> int:
        """Task write: record a new execution of the run (state running), started at `at` (default now), by
        process `pid` (whose start identity is `proc_start`, to tell it from a later process with the same pid);
        returns its number, from 1. An attempt still open is closed as lost; a replay of the same start (same
        `at`) returns the number already given."""

    @abstractmethod
    def end_attempt(
        self,
        experiment: str,
        task_index: int,
        attempt: int | None,
        exit_reason: str,
        error: str | None = None,
        at: float | None = None,
        started: float | None = None,
    ) -> None:
        """Task write: close an attempt at time `at` (default now) with `exit_reason` (completed, failed, timeout,
        preempted, cancelled, lost). attempt: its number, or None with `started` (its start time) when its start
        was spooled and the number is not known yet."""

    @abstractmethod
    def heartbeat(
        self, experiment: str, task_index: int, step: int, loss: float | None, at: float | None = None
    ) -> None:
        """Task write: the run is alive at time `at` (default now) and has reached `step`."""

    @abstractmethod
    def log_metrics(self, experiment: str, task_index: int, rows: list[tuple[int, str, float, float]]) -> None:
        """Task write: rows are (step, key, value, wall_time); writing the same (step, key) again keeps one row."""

    @abstractmethod
    def finish(
        self,
        experiment: str,
        task_index: int,
        state: str,
        final_metrics: dict | None,
        error: str | None,
        at: float | None = None,
    ) -> None:
        """Task write: the run ended at time `at` (default now) in `state`, with its final metrics or error."""

    # -------------------------------------------------------------------------------------- reads
    @abstractmethod
    def schema_versions(self) -> list[int]:
        """Read: the schema versions applied to this database, ascending."""

    @abstractmethod
    def runs(self, experiment: str | None = None, state: str | None = None) -> list[RunRow]:
        """Read: the runs, of one experiment and/or in one state, ordered by experiment then task index."""

    @abstractmethod
    def experiments(self) -> list[ExperimentRow]:
        """Read: every experiment, oldest first, with its runs counted by state."""

    @abstractmethod
    def experiment_details(self, name: str) -> dict | None:
        """Read: everything stored about one experiment (its row: spec text, hash, directory, provenance), or
        None if there is no such experiment."""

    @abstractmethod
    def run_config(self, experiment: str, task_index: int) -> dict | None:
        """Read: one run's config as stored at submission, or None if there is no such run."""

    @abstractmethod
    def attempts(self, experiment: str, task_index: int) -> list[dict]:
        """Read: every execution of one run, oldest first: attempt, job_id, host, pid, started, ended,
        exit_reason, error, proc_start."""

    @abstractmethod
    def metrics(self, experiment: str, task_index: int) -> list[tuple[int, str, float]]:
        """Read: (step, key, value) of one run, ordered by step then key."""

    @abstractmethod
    def count_metrics(self, experiment: str | None = None) -> int:
        """Read: the number of metric rows, of one experiment or of all."""
