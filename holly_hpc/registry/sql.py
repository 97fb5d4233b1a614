"""The registry's SQL, written once for both databases (SQLite and PostgreSQL speak the same
INSERT ... ON CONFLICT). Subclasses only open connections and name their placeholder style.

Every statement is parameterised: experiment names, metric keys and error texts are data, never SQL.
"""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from contextlib import AbstractContextManager

from .base import STATES, ExperimentRow, MissingRows, Registry, RunRow

PROVENANCE = (
    "owner",
    "git_commit",
    "git_dirty",
    "holly_hpc_version",
    "torch_version",
    "python_version",
    "container_image",
    "container_digest",
)

EXIT_REASONS = ("completed", "failed", "timeout", "preempted", "cancelled", "lost")
_EXIT_CHECK = f"CHECK (exit_reason IN ({', '.join(repr(r) for r in EXIT_REASONS)}))"

# (version, what it adds, statements): one list for both dialects, or {dialect: list} where they differ.
# Version 1 is the base schema file of each dialect.
MIGRATIONS = [
    (2, "runs.job_id: the scheduler's id of a task's latest submission", ["ALTER TABLE runs ADD COLUMN job_id TEXT"]),
    (
        3,
        "experiment provenance: owner, code version, software versions, container",
        [f"ALTER TABLE experiments ADD COLUMN {c} {'BOOLEAN' if c == 'git_dirty' else 'TEXT'}" for c in PROVENANCE],
    ),
    (
        4,
        "events are idempotent: one row per (run, time, state), so a replayed write adds nothing",
        ["CREATE UNIQUE INDEX IF NOT EXISTS events_natural_key ON events (experiment, task_index, time, state)"],
    ),
    (
        5,
        "attempts: exit reason 'lost' (its process ended without reporting) and the process's start identity",
        {
            "sqlite": [  # SQLite cannot alter a CHECK constraint: rebuild the table
                (
                    "CREATE TABLE attempts_v5 (experiment TEXT NOT NULL, task_index INTEGER NOT NULL, attempt INTEGER NOT NULL,"
                    " job_id TEXT, host TEXT, pid INTEGER, started REAL NOT NULL, ended REAL,"
                    f" exit_reason TEXT {_EXIT_CHECK}, error TEXT, proc_start TEXT,"
                    " PRIMARY KEY (experiment, task_index, attempt),"
                    " FOREIGN KEY (experiment, task_index) REFERENCES runs(experiment, task_index))"
                ),
                (
                    "INSERT INTO attempts_v5 (experiment, task_index, attempt, job_id, host, pid, started, ended, exit_reason, error)"
                    " SELECT experiment, task_index, attempt, job_id, host, pid, started, ended, exit_reason, error FROM attempts"
                ),
                "DROP TABLE attempts",
                "ALTER TABLE attempts_v5 RENAME TO attempts",
            ],
            "postgresql": [
                "ALTER TABLE attempts DROP CONSTRAINT IF EXISTS attempts_exit_reason_check",
                f"ALTER TABLE attempts ADD CONSTRAINT attempts_exit_reason_check {_EXIT_CHECK}",
                "ALTER TABLE attempts ADD COLUMN proc_start TEXT",
            ],
        },
    ),
]
LATEST_VERSION = MIGRATIONS[-1][0]


def _json(value):
    """JSON columns come back as text from SQLite and as objects from PostgreSQL."""
    if value is None or isinstance(value, (dict, list)):
        return value
    return json.loads(value)


class SQLRegistry(Registry):
    placeholder = "?"
    dialect = "sqlite"

    @abstractmethod
    def _connect(self, write: bool = True) -> AbstractContextManager:
        """A short-lived connection (a transaction when writing), closed on exit."""

    @abstractmethod
    def _base_schema(self) -> str: ...

    @abstractmethod
    def _columns(self, conn, table: str) -> set[str]: ...

    def _sql(self, query: str) -> str:
        return query if self.placeholder == "?" else query.replace("?", self.placeholder)

    def _execute(self, conn, query: str, params=()):
        cursor = conn.cursor()
        try:
            cursor.execute(self._sql(query), params)
        except Exception as exc:
            if self._missing_table(exc):  # a database without our tables holds no rows of ours either
                raise MissingRows(f"{self.url} has no registry tables ({exc})".strip()) from exc
            raise
        return cursor

    @staticmethod
    def _missing_table(exc: Exception) -> bool:
        return "no such table" in str(exc) or type(exc).__name__ == "UndefinedTable"

    # ----------------------------------------------------------------------------------- schema
    def init(self) -> None:
        self.migrate()

    def migrate(self) -> list[int]:
        """Create the base tables if missing and apply every migration the database lacks; returns them."""
        applied = []
        with self._connect() as conn:
            self._create_base(conn)
            have = {row[0] for row in self._execute(conn, "SELECT version FROM schema_version").fetchall()}
            if 1 not in have:
                self._execute(conn, "INSERT INTO schema_version (version, applied_at) VALUES (1, ?)", (time.time(),))
            for version, _, statements in MIGRATIONS:
                if version in have:
                    continue
                for statement in statements[self.dialect] if isinstance(statements, dict) else statements:
                    words = statement.split()
                    if (
                        words[:2] == ["ALTER", "TABLE"]
                        and words[3:5] == ["ADD", "COLUMN"]
                        and words[5] in self._columns(conn, words[2])
                    ):
                        continue  # a file created with a newer base already has it
                    self._execute(conn, statement)
                self._execute(
                    conn, "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time())
                )
                applied.append(version)
        return applied

    def schema_versions(self) -> list[int]:
        with self._connect(write=False) as conn:
            return sorted(r[0] for r in self._execute(conn, "SELECT version FROM schema_version").fetchall())

    def _create_base(self, conn) -> None:
        text = "\n".join(line for line in self._base_schema().splitlines() if not line.lstrip().startswith("--"))
        for statement in text.split(";"):
            if statement.strip():
                self._execute(conn, statement)

    # ----------------------------------------------------------------------------------- writes
    def upsert_experiment(self, name, spec_text, spec_hash, experiment_dir, provenance=None):
        provenance = {k: (provenance or {}).get(k) for k in PROVENANCE}
        columns = ", ".join(PROVENANCE)
        marks = ", ".join("?" for _ in PROVENANCE)
        updates = ", ".join(f"{c} = excluded.{c}" for c in ("spec_text", "spec_hash", "experiment_dir", *PROVENANCE))
        with self._connect() as conn:
            self._execute(
                conn,
                f"INSERT INTO experiments (name, created, spec_text, spec_hash, experiment_dir, {columns})"
                f" VALUES (?, ?, ?, ?, ?, {marks}) ON CONFLICT (name) DO UPDATE SET {updates}",
                (name, time.time(), spec_text, spec_hash, experiment_dir, *provenance.values()),
            )

    def upsert_runs(self, experiment, runs):
        now = time.time()
        with self._connect() as conn:
            for r in runs:
                self._execute(
                    conn,
                    "INSERT INTO runs (experiment, task_index, task_id, config, config_hash, seed, out_dir, state, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT (experiment, task_index) DO NOTHING",
                    (
                        experiment,
                        r["task_index"],
                        r["task_id"],
                        r["config"],
                        r["config_hash"],
                        r["seed"],
                        r["out_dir"],
                        now,
                    ),
                )

    def _update_run(self, conn, experiment, task_index, assignments: str, params: tuple) -> None:
        """UPDATE one run's row; MissingRows if there is none (the write would otherwise vanish)."""
        cursor = self._execute(
            conn,
            f"UPDATE runs SET {assignments} WHERE experiment = ? AND task_index = ?",
            (*params, experiment, task_index),
        )
        if cursor.rowcount == 0:
            raise MissingRows(f"no run {experiment} task {task_index} in {self.url}")

    def _require_run(self, conn, experiment, task_index) -> None:
        if not self._execute(
            conn, "SELECT 1 FROM runs WHERE experiment = ? AND task_index = ?", (experiment, task_index)
        ).fetchone():
            raise MissingRows(f"no run {experiment} task {task_index} in {self.url}")

    def set_state(self, experiment, task_index, state, reason, at=None):
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self._connect() as conn:
            self._update_run(conn, experiment, task_index, "state = ?", (state,))
            self._event(conn, experiment, task_index, state, reason, at)

    def note(self, experiment, task_index, reason, at=None):
        """An event that changes nothing, e.g. a corrupt checkpoint moved aside (the run's state is kept)."""
        with self._connect() as conn:
            row = self._execute(
                conn, "SELECT state FROM runs WHERE experiment = ? AND task_index = ?", (experiment, task_index)
            ).fetchone()
            if row is None:
                raise MissingRows(f"no run {experiment} task {task_index} in {self.url}")
            self._event(conn, experiment, task_index, row[0], reason, at)

    def _event(self, conn, experiment, task_index, state, reason, at=None):
        self._execute(
            conn,
            "INSERT INTO events (experiment, task_index, time, state, reason) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (experiment, task_index, time, state) DO NOTHING",
            (experiment, task_index, at or time.time(), state, reason),
        )

    def start_attempt(self, experiment, task_index, job_id, host, pid, at=None, proc_start=None):
        """Only the process that holds the task's lock calls this, so any attempt still open is one whose
        process died without reporting (SIGKILL, out of memory): it is closed as lost. The run's job id
        becomes this process's job: the job that is actually training."""
        now = at or time.time()
        with self._connect() as conn:
            same = self._execute(
                conn,
                "SELECT attempt FROM attempts WHERE experiment = ? AND task_index = ? AND started = ?",
                (experiment, task_index, now),
            ).fetchone()
            if same:  # a replay of a start already recorded
                return same[0]
            self._update_run(
                conn,
                experiment,
                task_index,
                "state = 'running', started = COALESCE(started, ?), "
                "finished = NULL, heartbeat = ?, error = NULL, job_id = ?",
                (now, now, job_id),
            )
            self._execute(
                conn,
                "UPDATE attempts SET ended = ?, exit_reason = 'lost', error = ? WHERE experiment = ?"
                " AND task_index = ? AND ended IS NULL AND started < ?",
                (
                    now,
                    f"its process ended without reporting; found by attempt started at {now:.3f}",
                    experiment,
                    task_index,
                    now,
                ),
            )
            attempt = self._next_attempt(conn, experiment, task_index)
            self._execute(
                conn,
                "INSERT INTO attempts (experiment, task_index, attempt, job_id, host, pid, started, proc_start)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (experiment, task_index, attempt, job_id, host, pid, now, proc_start),
            )
            self._event(conn, experiment, task_index, "running", f"attempt {attempt} (job {job_id} on {host})", now)
        return attempt

    def _next_attempt(self, conn, experiment, task_index) -> int:
        """The number the task's next attempt gets: one more than the highest recorded (1 for the first)."""
        (last,) = self._execute(
            conn,
            "SELECT COALESCE(MAX(attempt), 0) FROM attempts WHERE experiment = ? AND task_index = ?",
            (experiment, task_index),
        ).fetchone()
        return last + 1

    def end_attempt(self, experiment, task_index, attempt, exit_reason, error=None, at=None, started=None):
        """attempt: its number, or None with `started` (its start time) when the start was spooled. An attempt
        whose start never reached this database (it was lost with an earlier one) is recorded as it ended."""
        at = at or time.time()
        with self._connect() as conn:
            cursor = self._execute(
                conn,
                "UPDATE attempts SET ended = ?, exit_reason = ?, error = ?"
                " WHERE experiment = ? AND task_index = ? AND (attempt = ? OR started = ?)",
                (at, exit_reason, error, experiment, task_index, attempt, started),
            )
            if cursor.rowcount:
                return
            self._require_run(conn, experiment, task_index)
            if attempt is None:
                attempt = self._next_attempt(conn, experiment, task_index)
            self._execute(
                conn,
                "INSERT INTO attempts (experiment, task_index, attempt, started, ended, exit_reason, error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (experiment, task_index, attempt, started if started is not None else at, at, exit_reason, error),
            )

    def set_job_ids(self, experiment, job_ids):
        """The scheduler's ids of newly submitted tasks. A task already running keeps the id of the job that
        runs it: a second submission's job will find the task locked and exit."""
        with self._connect() as conn:
            for index, job in job_ids.items():
                self._execute(
                    conn,
                    "UPDATE runs SET job_id = ? WHERE experiment = ? AND task_index = ? AND state <> 'running'",
                    (job, experiment, index),
                )

    def heartbeat(self, experiment, task_index, step, loss, at=None):
        with self._connect() as conn:
            self._update_run(
                conn,
                experiment,
                task_index,
                "heartbeat = ?, last_step = ?, last_loss = ?",
                (at or time.time(), step, loss),
            )

    def log_metrics(self, experiment, task_index, rows):
        with self._connect() as conn:
            self._require_run(conn, experiment, task_index)
            self._insert_metrics(
                conn, [(experiment, task_index, step, key, value, wall) for step, key, value, wall in rows]
            )

    def _insert_metrics(self, conn, rows) -> None:
        conn.cursor().executemany(
            self._sql(
                "INSERT INTO metrics (experiment, task_index, step, key, value, wall_time) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (experiment, task_index, step, key) DO UPDATE SET value = excluded.value, wall_time = excluded.wall_time"
            ),
            rows,
        )

    def finish(self, experiment, task_index, state, final_metrics, error, at=None):
        at = at or time.time()
        with self._connect() as conn:
            self._update_run(
                conn,
                experiment,
                task_index,
                "state = ?, finished = ?, final_metrics = ?, error = ?",
                (state, at, json.dumps(final_metrics) if final_metrics is not None else None, error),
            )
            self._event(conn, experiment, task_index, state, (error or "")[-500:] or None, at)

    # ----------------------------------------------------------------------------------- reads
    def runs(self, experiment=None, state=None):
        query = (
            "SELECT r.experiment, r.task_index, r.task_id, r.state,"
            " (SELECT COUNT(*) FROM attempts a WHERE a.experiment = r.experiment AND a.task_index = r.task_index),"
            " r.last_step, r.last_loss, r.created, r.started, r.finished, r.heartbeat, r.out_dir, r.final_metrics, r.error,"
            " r.job_id FROM runs r WHERE (? IS NULL OR r.experiment = ?) AND (? IS NULL OR r.state = ?)"
            " ORDER BY r.experiment, r.task_index"
        )
        with self._connect(write=False) as conn:
            rows = self._execute(conn, query, (experiment, experiment, state, state)).fetchall()
        return [RunRow(*row[:12], _json(row[12]), row[13], row[14]) for row in rows]

    def experiments(self):
        with self._connect(write=False) as conn:
            exps = self._execute(
                conn, "SELECT name, created, experiment_dir FROM experiments ORDER BY created"
            ).fetchall()
            counts = self._execute(
                conn, "SELECT experiment, state, COUNT(*) FROM runs GROUP BY experiment, state"
            ).fetchall()
        by_exp: dict[str, dict] = {}
        for name, state, n in counts:
            by_exp.setdefault(name, {})[state] = n
        return [ExperimentRow(name, created, d, by_exp.get(name, {})) for name, created, d in exps]

    def experiment_details(self, name: str) -> dict | None:
        """Everything stored about one experiment (spec text, hash, provenance)."""
        with self._connect(write=False) as conn:
            cursor = self._execute(conn, "SELECT * FROM experiments WHERE name = ?", (name,))
            row = cursor.fetchone()
            columns = [d[0] for d in cursor.description]
        return dict(zip(columns, row, strict=True)) if row else None

    def run_config(self, experiment: str, task_index: int) -> dict | None:
        with self._connect(write=False) as conn:
            row = self._execute(
                conn, "SELECT config FROM runs WHERE experiment = ? AND task_index = ?", (experiment, task_index)
            ).fetchone()
        return _json(row[0]) if row else None

    def attempts(self, experiment: str, task_index: int) -> list[dict]:
        with self._connect(write=False) as conn:
            cursor = self._execute(
                conn,
                "SELECT attempt, job_id, host, pid, started, ended, exit_reason, error, proc_start"
                " FROM attempts"
                " WHERE experiment = ? AND task_index = ? ORDER BY attempt",
                (experiment, task_index),
            )
            columns = [d[0] for d in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def metrics(self, experiment, task_index):
        with self._connect(write=False) as conn:
            return [
                tuple(r)
                for r in self._execute(
                    conn,
                    "SELECT step, key, value FROM metrics WHERE experiment = ? AND task_index = ? ORDER BY step, key",
                    (experiment, task_index),
                ).fetchall()
            ]

    def count_metrics(self, experiment: str | None = None) -> int:
        with self._connect(write=False) as conn:
            return self._execute(
                conn, "SELECT COUNT(*) FROM metrics WHERE (? IS NULL OR experiment = ?)", (experiment, experiment)
            ).fetchone()[0]
