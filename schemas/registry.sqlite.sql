-- holly-hpc run registry, SQLite dialect (the zero-setup default): version 1 of the schema; later
-- versions are applied by holly_hpc/registry/sql.py (MIGRATIONS), the same for PostgreSQL (registry.sql).
-- Every write is idempotent: natural primary keys + INSERT ... ON CONFLICT.
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    applied_at  REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS experiments (
    name            TEXT PRIMARY KEY,
    created         REAL NOT NULL,
    spec_text       TEXT NOT NULL,
    spec_hash       TEXT NOT NULL,
    experiment_dir  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    experiment      TEXT NOT NULL REFERENCES experiments(name),
    task_index      INTEGER NOT NULL,
    task_id         TEXT NOT NULL,
    config          TEXT NOT NULL,
    config_hash     TEXT NOT NULL,
    seed            INTEGER NOT NULL,
    out_dir         TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    created         REAL NOT NULL,
    started         REAL,
    finished        REAL,
    heartbeat       REAL,
    last_step       INTEGER,
    last_loss       REAL,
    final_metrics   TEXT,
    error           TEXT,
    PRIMARY KEY (experiment, task_index)
);

CREATE TABLE IF NOT EXISTS attempts (
    experiment   TEXT NOT NULL,
    task_index   INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    job_id       TEXT,
    host         TEXT,
    pid          INTEGER,
    started      REAL NOT NULL,
    ended        REAL,
    exit_reason  TEXT CHECK (exit_reason IN ('completed', 'failed', 'timeout', 'preempted', 'cancelled')),
    error        TEXT,
    PRIMARY KEY (experiment, task_index, attempt),
    FOREIGN KEY (experiment, task_index) REFERENCES runs(experiment, task_index)
);

CREATE TABLE IF NOT EXISTS metrics (
    experiment  TEXT NOT NULL,
    task_index  INTEGER NOT NULL,
    step        INTEGER NOT NULL,
    key         TEXT NOT NULL,
    value       REAL,
    wall_time   REAL NOT NULL,
    PRIMARY KEY (experiment, task_index, step, key)
);

CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment  TEXT NOT NULL,
    task_index  INTEGER NOT NULL,
    time        REAL NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT
);

-- The newest value of every metric of every run.
CREATE VIEW IF NOT EXISTS latest_metrics AS
    SELECT m.experiment, m.task_index, m.key, m.step, m.value, m.wall_time FROM metrics m
    WHERE m.step = (SELECT MAX(step) FROM metrics n
                    WHERE n.experiment = m.experiment AND n.task_index = m.task_index AND n.key = m.key);
