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


class Registry(ABC):
    """Writes are idempotent; every method opens and closes its own short-lived connection. A write that
    finds no experiment or run row to write to raises MissingRows instead of doing nothing."""

    url: str

    @abstractmethod
    def init(self) -> None:
        """Create the tables if they do not exist."""

    @abstractmethod
    def migrate(self) -> list[int]:
        """Bring the schema to the latest version; returns the versions applied now."""

    @abstractmethod
    def upsert_experiment(
        self, name: str, spec_text: str, spec_hash: str, experiment_dir: str, provenance: dict | None = None
    ) -> None:
        """provenance: owner, git_commit, git_dirty, holly_hpc/torch/python versions, container image/digest."""

    @abstractmethod
    def upsert_runs(self, experiment: str, runs: list[dict]) -> None:
        """runs: dicts with task_index, task_id, config (JSON text), config_hash, seed, out_dir. New rows are pending."""

    @abstractmethod
    def set_state(self, experiment: str, task_index: int, state: str, reason: str) -> None:
        """Move a run to `state` and record the transition as an event."""

    @abstractmethod
    def note(self, experiment: str, task_index: int, reason: str) -> None:
        """Record an event that leaves the run's state as it is (a corrupt checkpoint set aside, say)."""

    @abstractmethod
    def start_attempt(
        self, experiment: str, task_index: int, job_id: str, host: str, pid: int, proc_start: str | None = None
    ) -> int:
        """Record a new execution of the run (state running) by process `pid` (whose start identity is
        `proc_start`, to tell it from a later process with the same pid); returns its number, from 1."""

    @abstractmethod
    def end_attempt(
        self, experiment: str, task_index: int, attempt: int, exit_reason: str, error: str | None = None
    ) -> None: ...

    @abstractmethod
    def set_job_ids(self, experiment: str, job_ids: dict[int, str]) -> None:
        """Record the scheduler's job id of each submitted task (task index -> id)."""

    @abstractmethod
    def heartbeat(
        self, experiment: str, task_index: int, step: int, loss: float | None, at: float | None = None
    ) -> None:
        """The run is alive at time `at` (default now) and has reached `step`."""

    @abstractmethod
    def log_metrics(self, experiment: str, task_index: int, rows: list[tuple[int, str, float, float]]) -> None:
        """rows: (step, key, value, wall_time); writing the same (step, key) again keeps one row."""

    @abstractmethod
    def finish(
        self, experiment: str, task_index: int, state: str, final_metrics: dict | None, error: str | None
    ) -> None: ...

    @abstractmethod
    def runs(self, experiment: str | None = None, state: str | None = None) -> list[RunRow]: ...

    @abstractmethod
    def experiments(self) -> list[ExperimentRow]: ...

    @abstractmethod
    def attempts(self, experiment: str, task_index: int) -> list[dict]:
        """Every execution of one run, oldest first: attempt, job_id, host, pid, started, ended, exit_reason, error."""

    @abstractmethod
    def metrics(self, experiment: str, task_index: int) -> list[tuple[int, str, float]]:
        """(step, key, value) of one run, ordered by step then key."""
