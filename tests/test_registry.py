"""The SQLite registry: idempotent writes, states, attempts, metrics, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from holly_hpc.registry import open_registry, resolve_url


def _registry(tmp_path):
    reg = open_registry(f"sqlite:///{tmp_path / 'r.sqlite'}")
    reg.init()
    reg.upsert_experiment("exp", "experiment: exp\n", "abc", str(tmp_path / "exp"))
    runs = [{"task_index": i, "task_id": f"{i:04d}-h", "config": json.dumps({"i": i}), "config_hash": "h",
             "seed": i, "out_dir": f"/o/{i}"} for i in range(3)]
    reg.upsert_runs("exp", runs)
    return reg, runs


def test_upserts_are_idempotent(tmp_path):
    reg, runs = _registry(tmp_path)
    reg.init()  # again: no error, no duplicate version row
    reg.upsert_runs("exp", runs)
    reg.upsert_experiment("exp", "experiment: exp\n", "abc", str(tmp_path / "exp"))
    assert [r.task_index for r in reg.runs("exp")] == [0, 1, 2]
    assert all(r.state == "pending" and r.attempts == 0 for r in reg.runs("exp"))
    (exp,) = reg.experiments()
    assert exp.counts == {"pending": 3}
    with sqlite3.connect(tmp_path / "r.sqlite") as c:
        assert c.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == [(1,), (2,)]


def test_run_lifecycle_attempts_and_metrics(tmp_path):
    reg, _ = _registry(tmp_path)
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
    with sqlite3.connect(tmp_path / "r.sqlite") as c:
        reasons = c.execute("SELECT exit_reason FROM attempts ORDER BY attempt").fetchall()
        events = c.execute("SELECT state FROM events WHERE task_index = 1 ORDER BY id").fetchall()
    assert reasons == [("preempted",), ("completed",)]
    assert events == [("running",), ("running",), ("succeeded",)]


def test_state_is_checked(tmp_path):
    reg, _ = _registry(tmp_path)
    with pytest.raises(ValueError, match="unknown state"):
        reg.set_state("exp", 0, "exploded", "?")
    with pytest.raises(sqlite3.IntegrityError):
        reg.finish("exp", 0, "exploded", None, None)


def _writer(url: str, index: int, n: int) -> None:
    reg = open_registry(url)
    for step in range(n):
        reg.log_metrics("exp", index, [(step, "loss", float(step), 0.0)])


def test_concurrent_writers_lose_nothing(tmp_path):
    reg, _ = _registry(tmp_path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(reg.url, i, 40)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert [len(reg.metrics("exp", i)) for i in range(3)] == [40, 40, 40]


def test_url_resolution_order(tmp_path, monkeypatch):
    assert resolve_url("sqlite:///a.sqlite", tmp_path) == "sqlite:///a.sqlite"
    monkeypatch.setenv("HOLLY_REGISTRY_URL", "sqlite:///env.sqlite")
    assert resolve_url(None, tmp_path) == "sqlite:///env.sqlite"
    monkeypatch.delenv("HOLLY_REGISTRY_URL")
    assert resolve_url(None, tmp_path) == f"sqlite:///{tmp_path}/registry.sqlite"
    with pytest.raises(ValueError, match="unsupported registry URL scheme 'mysql'"):
        open_registry("mysql://x")


def test_a_version_1_file_gains_the_job_id_column(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as c:  # the runs table as version 1 made it, with a row in it
        c.execute("CREATE TABLE runs (experiment TEXT NOT NULL, task_index INTEGER NOT NULL, task_id TEXT NOT NULL,"
                  " config TEXT NOT NULL, config_hash TEXT NOT NULL, seed INTEGER NOT NULL, out_dir TEXT NOT NULL,"
                  " state TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL, heartbeat REAL,"
                  " last_step INTEGER, last_loss REAL, final_metrics TEXT, error TEXT,"
                  " PRIMARY KEY (experiment, task_index))")
        c.execute("INSERT INTO runs VALUES ('e', 0, '0000-x', '{}', 'x', 1, '/o', 'succeeded', 0, NULL, NULL, NULL,"
                  " 5, 0.5, NULL, NULL)")
    reg = open_registry(f"sqlite:///{path}")
    reg.init()
    reg.set_job_ids("e", {0: "77_0"})
    (run,) = reg.runs("e")
    assert run.state == "succeeded" and run.last_step == 5 and run.job_id == "77_0"
