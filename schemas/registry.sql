-- holly-hpc run registry, PostgreSQL dialect (what a lab shares across clusters). The SQLite default
-- (registry.sqlite.sql) has the same tables and columns. Every write is idempotent: natural primary
-- keys + INSERT ... ON CONFLICT, so a replayed or requeued write never duplicates rows.
-- Versions: 1 base tables; 2 runs.job_id; 3 experiment provenance. `holly-hpc registry migrate` applies
-- what a database lacks and records it in schema_version.
CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY,
    applied_at  DOUBLE PRECISION NOT NULL
);

CREATE TABLE IF NOT EXISTS experiments (
    name              TEXT PRIMARY KEY,
    created           DOUBLE PRECISION NOT NULL,
    spec_text         TEXT NOT NULL,
    spec_hash         TEXT NOT NULL,
    experiment_dir    TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    experiment      TEXT NOT NULL REFERENCES experiments(name),
    task_index      INTEGER NOT NULL,
    task_id         TEXT NOT NULL,
    config          JSONB NOT NULL,
    config_hash     TEXT NOT NULL,
    seed            BIGINT NOT NULL,
    out_dir         TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    created         DOUBLE PRECISION NOT NULL,
    started         DOUBLE PRECISION,
    finished        DOUBLE PRECISION,
    heartbeat       DOUBLE PRECISION,
    last_step       INTEGER,
    last_loss       DOUBLE PRECISION,
    final_metrics   JSONB,
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
    started      DOUBLE PRECISION NOT NULL,
    ended        DOUBLE PRECISION,
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
    value       DOUBLE PRECISION,
    wall_time   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (experiment, task_index, step, key)
);

CREATE TABLE IF NOT EXISTS events (
    id          BIGSERIAL PRIMARY KEY,
    experiment  TEXT NOT NULL,
    task_index  INTEGER NOT NULL,
    time        DOUBLE PRECISION NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT
);

-- The newest value of every metric of every run.
CREATE OR REPLACE VIEW latest_metrics AS
    SELECT DISTINCT ON (experiment, task_index, key) experiment, task_index, key, step, value, wall_time
    FROM metrics ORDER BY experiment, task_index, key, step DESC;
