"""The registry in one SQLite file: the zero-setup default, safe for the tasks of one machine at once.

WAL journal + a generous busy timeout let concurrent local tasks write without 'database is locked'.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from ..resources import schema_file
from .base import STATES, ExperimentRow, Registry, RunRow


class SQLiteRegistry(Registry):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"

    @contextmanager
    def _connect(self, write: bool = True):
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            if write:
                conn.execute("BEGIN IMMEDIATE")
            yield conn
            if write:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def init(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(schema_file("registry.sqlite.sql").read_text(encoding="utf-8"))
            # Version 2 added runs.job_id; a version-1 file gets the column here.
            columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            if "job_id" not in columns:
                conn.execute("ALTER TABLE runs ADD COLUMN job_id TEXT")
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (2, strftime('%s', 'now'))"
                         " ON CONFLICT (version) DO NOTHING")
        finally:
            conn.close()

    def upsert_experiment(self, name, spec_text, spec_hash, experiment_dir):
        with self._connect() as c:
            c.execute(
                "INSERT INTO experiments (name, created, spec_text, spec_hash, experiment_dir) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET spec_text = excluded.spec_text, spec_hash = excluded.spec_hash,"
                " experiment_dir = excluded.experiment_dir",
                (name, time.time(), spec_text, spec_hash, experiment_dir),
            )

    def upsert_runs(self, experiment, runs):
        now = time.time()
        with self._connect() as c:
            for r in runs:
                c.execute(
                    "INSERT INTO runs (experiment, task_index, task_id, config, config_hash, seed, out_dir, state, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?) ON CONFLICT (experiment, task_index) DO NOTHING",
                    (experiment, r["task_index"], r["task_id"], r["config"], r["config_hash"], r["seed"], r["out_dir"], now),
                )

    def set_state(self, experiment, task_index, state, reason):
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self._connect() as c:
            c.execute("UPDATE runs SET state = ? WHERE experiment = ? AND task_index = ?", (state, experiment, task_index))
            self._event(c, experiment, task_index, state, reason)

    @staticmethod
    def _event(c, experiment, task_index, state, reason):
        c.execute("INSERT INTO events (experiment, task_index, time, state, reason) VALUES (?, ?, ?, ?, ?)",
                  (experiment, task_index, time.time(), state, reason))

    def start_attempt(self, experiment, task_index, job_id, host, pid):
        now = time.time()
        with self._connect() as c:
            (last,) = c.execute("SELECT COALESCE(MAX(attempt), 0) FROM attempts WHERE experiment = ? AND task_index = ?",
                                (experiment, task_index)).fetchone()
            attempt = last + 1
            c.execute("INSERT INTO attempts (experiment, task_index, attempt, job_id, host, pid, started) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (experiment, task_index, attempt, job_id, host, pid, now))
            c.execute("UPDATE runs SET state = 'running', started = COALESCE(started, ?), finished = NULL, heartbeat = ?, error = NULL"
                      " WHERE experiment = ? AND task_index = ?", (now, now, experiment, task_index))
            self._event(c, experiment, task_index, "running", f"attempt {attempt} (job {job_id} on {host})")
        return attempt

    def end_attempt(self, experiment, task_index, attempt, exit_reason, error=None):
        with self._connect() as c:
            c.execute("UPDATE attempts SET ended = ?, exit_reason = ?, error = ? WHERE experiment = ? AND task_index = ? AND attempt = ?",
                      (time.time(), exit_reason, error, experiment, task_index, attempt))

    def set_job_ids(self, experiment, job_ids):
        with self._connect() as c:
            c.executemany("UPDATE runs SET job_id = ? WHERE experiment = ? AND task_index = ?",
                          [(job, experiment, index) for index, job in job_ids.items()])

    def heartbeat(self, experiment, task_index, step, loss):
        with self._connect() as c:
            c.execute("UPDATE runs SET heartbeat = ?, last_step = ?, last_loss = ? WHERE experiment = ? AND task_index = ?",
                      (time.time(), step, loss, experiment, task_index))

    def log_metrics(self, experiment, task_index, rows):
        with self._connect() as c:
            c.executemany(
                "INSERT INTO metrics (experiment, task_index, step, key, value, wall_time) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (experiment, task_index, step, key) DO UPDATE SET value = excluded.value, wall_time = excluded.wall_time",
                [(experiment, task_index, step, key, value, wall) for step, key, value, wall in rows],
            )

    def finish(self, experiment, task_index, state, final_metrics, error):
        with self._connect() as c:
            c.execute("UPDATE runs SET state = ?, finished = ?, final_metrics = ?, error = ? WHERE experiment = ? AND task_index = ?",
                      (state, time.time(), json.dumps(final_metrics) if final_metrics is not None else None, error,
                       experiment, task_index))
            self._event(c, experiment, task_index, state, (error or "")[-500:] or None)

    def runs(self, experiment=None, state=None):
        query = (
            "SELECT r.experiment, r.task_index, r.task_id, r.state,"
            " (SELECT COUNT(*) FROM attempts a WHERE a.experiment = r.experiment AND a.task_index = r.task_index),"
            " r.last_step, r.last_loss, r.created, r.started, r.finished, r.heartbeat, r.out_dir, r.final_metrics, r.error,"
            " r.job_id"
            " FROM runs r WHERE (? IS NULL OR r.experiment = ?) AND (? IS NULL OR r.state = ?)"
            " ORDER BY r.experiment, r.task_index"
        )
        with self._connect(write=False) as c:
            rows = c.execute(query, (experiment, experiment, state, state)).fetchall()
        return [RunRow(*row[:12], json.loads(row[12]) if row[12] else None, row[13], row[14]) for row in rows]

    def experiments(self):
        with self._connect(write=False) as c:
            exps = c.execute("SELECT name, created, experiment_dir FROM experiments ORDER BY created").fetchall()
            counts = c.execute("SELECT experiment, state, COUNT(*) FROM runs GROUP BY experiment, state").fetchall()
        by_exp: dict[str, dict] = {}
        for name, state, n in counts:
            by_exp.setdefault(name, {})[state] = n
        return [ExperimentRow(name, created, d, by_exp.get(name, {})) for name, created, d in exps]

    def metrics(self, experiment, task_index):
        with self._connect(write=False) as c:
            return c.execute("SELECT step, key, value FROM metrics WHERE experiment = ? AND task_index = ? ORDER BY step, key",
                             (experiment, task_index)).fetchall()
