"""The SQLite registry: idempotent writes, states, attempts, metrics, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from holly_hpc.registry import open_registry, redact, resolve_url, storable_url
from holly_hpc.registry.sql import LATEST_VERSION


def _registry(url):
    reg = open_registry(url)
    reg.init()
    reg.upsert_experiment("exp", "experiment: exp\n", "abc", "/runs/exp")
    runs = [
        {
            "task_index": i,
            "task_id": f"{i:04d}-h",
            "config": json.dumps({"i": i}),
            "config_hash": "h",
            "seed": i,
            "out_dir": f"/o/{i}",
        }
        for i in range(3)
    ]
    reg.upsert_runs("exp", runs)
    return reg, runs


def test_upserts_are_idempotent(registry_url, tmp_path):
    reg, runs = _registry(registry_url)
    assert reg.migrate() == []  # again: nothing to apply, no duplicate version row
    reg.upsert_runs("exp", runs)
    reg.upsert_experiment("exp", "experiment: exp\n", "abc", "/runs/exp")
    assert [r.task_index for r in reg.runs("exp")] == [0, 1, 2]
    assert all(r.state == "pending" and r.attempts == 0 for r in reg.runs("exp"))
    (exp,) = reg.experiments()
    assert exp.counts == {"pending": 3}
    assert reg.schema_versions() == list(range(1, LATEST_VERSION + 1))


def test_run_lifecycle_attempts_and_metrics(registry_url):
    reg, _ = _registry(registry_url)
    a1 = reg.start_attempt("exp", 1, "job-1", "node1", 11)
    reg.log_metrics("exp", 1, [(5, "loss", 0.5, 1.0), (5, "acc", 0.1, 1.0)])
    reg.log_metrics("exp", 1, [(5, "loss", 0.5, 2.0)])  # replayed: still one row
    reg.heartbeat("exp", 1, 5, 0.5)
    reg.end_attempt("exp", 1, a1, "preempted")
    a2 = reg.start_attempt("exp", 1, "job-2", "node1", 12)
    reg.log_metrics("exp", 1, [(10, "loss", 0.25, 3.0)])
    reg.end_attempt("exp", 1, a2, "completed")
    reg.finish("exp", 1, "succeeded", {"rot_err_median_deg": 2.0}, None)
    (run,) = [r for r in reg.runs("exp") if r.task_index == 1]
    assert (a1, a2) == (1, 2)
    assert run.state == "succeeded" and run.attempts == 2 and run.last_step == 5
    assert run.final_metrics == {"rot_err_median_deg": 2.0}
    assert run.elapsed(run.finished) >= 0
    assert reg.metrics("exp", 1) == [(5, "acc", 0.1), (5, "loss", 0.5), (10, "loss", 0.25)]
    assert [r.task_index for r in reg.runs(state="succeeded")] == [1]
    assert [a["exit_reason"] for a in reg.attempts("exp", 1)] == ["preempted", "completed"]
    assert [a["job_id"] for a in reg.attempts("exp", 1)] == ["job-1", "job-2"]
    with reg._connect(write=False) as conn:
        events = reg._execute(conn, "SELECT state FROM events WHERE task_index = 1 ORDER BY id").fetchall()
    assert [tuple(e) for e in events] == [("running",), ("running",), ("succeeded",)]


def test_state_is_checked_by_the_database(registry_url):
    reg, _ = _registry(registry_url)
    with pytest.raises(ValueError, match="unknown state"):
        reg.set_state("exp", 0, "exploded", "?")
    with pytest.raises(Exception, match=r"(?i)check constraint"):  # the CHECK constraint itself
        reg.finish("exp", 0, "exploded", None, None)
    assert reg.runs("exp")[0].state == "pending"


def _writer(url: str, index: int, n: int, writer: int) -> None:
    reg = open_registry(url)
    for step in range(n):
        reg.log_metrics("exp", index, [(writer * 1000 + step, "loss", float(step), 0.0)])


def test_32_concurrent_writers_lose_nothing(registry_url):
    reg, _ = _registry(registry_url)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(registry_url, i % 3, 10, i)) for i in range(32)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 32
    # Writer w logs steps w*1000 .. w*1000+9 of run w % 3: exact counts per run, nothing lost or doubled.
    assert [len(reg.metrics("exp", i)) for i in range(3)] == [11 * 10, 11 * 10, 10 * 10]
    assert reg.count_metrics("exp") == 320


def test_url_resolution_order(tmp_path, monkeypatch):
    assert resolve_url("sqlite:///a.sqlite", tmp_path) == "sqlite:///a.sqlite"
    monkeypatch.setenv("HOLLY_REGISTRY_URL", "sqlite:///env.sqlite")
    assert resolve_url(None, tmp_path) == "sqlite:///env.sqlite"
    monkeypatch.delenv("HOLLY_REGISTRY_URL")
    assert resolve_url(None, tmp_path) == f"sqlite:///{tmp_path}/registry.sqlite"
    with pytest.raises(ValueError, match="unsupported registry URL scheme 'mysql'"):
        open_registry("mysql://x")


def test_passwords_are_redacted_everywhere_they_could_show(postgres_server):
    url = "postgresql://holly_test:s3cr3t@127.0.0.1:5432/nonexistent_db"
    assert redact(url) == "postgresql://holly_test:***@127.0.0.1:5432/nonexistent_db"
    assert storable_url(url) == "postgresql://holly_test@127.0.0.1:5432/nonexistent_db"
    assert redact("connect failed: password=s3cr3t host=x") == "connect failed: password=*** host=x"
    reg = open_registry(url)
    assert "s3cr3t" not in reg.url
    with pytest.raises(ConnectionError) as info:
        reg.runs()
    assert "s3cr3t" not in str(info.value) and "nonexistent_db" in str(info.value)


def test_migration_from_version_1(registry_url):
    """A database made by version 1 (base tables only) is migrated in place, keeping its rows."""
    reg = open_registry(registry_url)
    with reg._connect() as conn:
        reg._create_base(conn)
        reg._execute(conn, "INSERT INTO schema_version (version, applied_at) VALUES (1, 0)")
        reg._execute(
            conn,
            "INSERT INTO experiments (name, created, spec_text, spec_hash, experiment_dir) VALUES ('e', 0, '', '', '/x')",
        )
        reg._execute(
            conn,
            "INSERT INTO runs (experiment, task_index, task_id, config, config_hash, seed, out_dir, state, created)"
            " VALUES ('e', 0, '0000-x', '{}', 'x', 1, '/o', 'succeeded', 0)",
        )
    assert reg.migrate() == list(range(2, LATEST_VERSION + 1))
    reg.set_job_ids("e", {0: "77_0"})
    reg.upsert_experiment("e", "", "", "/x", {"owner": "ada", "git_commit": "abc123", "git_dirty": True})
    (run,) = reg.runs("e")
    assert run.state == "succeeded" and run.job_id == "77_0"
    details = reg.experiment_details("e")
    assert details["owner"] == "ada" and details["git_commit"] == "abc123" and bool(details["git_dirty"]) is True


def test_sql_injection_attempts_are_stored_verbatim(registry_url):
    reg = open_registry(registry_url)
    reg.init()
    name = "x'); DROP TABLE runs; --"
    key = 'loss"; DELETE FROM metrics; --'
    reg.upsert_experiment(name, "spec: '; DROP TABLE experiments; --", "h", "/tmp/x")
    reg.upsert_runs(
        name,
        [
            {
                "task_index": 0,
                "task_id": "0000-x",
                "config": json.dumps({"k": "'; --"}),
                "config_hash": "h",
                "seed": 1,
                "out_dir": "/o",
            }
        ],
    )
    reg.log_metrics(name, 0, [(1, key, 0.5, 0.0)])
    assert [e.name for e in reg.experiments()] == [name]
    assert reg.metrics(name, 0) == [(1, key, 0.5)]
    assert reg.run_config(name, 0) == {"k": "'; --"}
    assert reg.experiment_details(name)["spec_text"] == "spec: '; DROP TABLE experiments; --"


def test_a_version_1_file_gains_the_job_id_column(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as c:  # the runs table as version 1 made it, with a row in it
        c.execute(
            "CREATE TABLE runs (experiment TEXT NOT NULL, task_index INTEGER NOT NULL, task_id TEXT NOT NULL,"
            " config TEXT NOT NULL, config_hash TEXT NOT NULL, seed INTEGER NOT NULL, out_dir TEXT NOT NULL,"
            " state TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, heartbeat REAL,"
            " last_step INTEGER, last_loss REAL, final_metrics TEXT, error TEXT,"
            " PRIMARY KEY (experiment, task_index))"
        )
        c.execute(
            "INSERT INTO runs VALUES ('e', 0, '0000-x', '{}', 'x', 1, '/o', 'succeeded', 0, NULL, NULL, NULL,"
            " 5, 0.5, NULL, NULL)"
        )
    reg = open_registry(f"sqlite:///{path}")
    reg.init()
    reg.set_job_ids("e", {0: "77_0"})
    (run,) = reg.runs("e")
    assert run.state == "succeeded" and run.last_step == 5 and run.job_id == "77_0"
    assert reg.schema_versions() == list(range(1, LATEST_VERSION + 1))
