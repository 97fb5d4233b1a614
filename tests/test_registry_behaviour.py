"""Registry behaviour end to end, on SQLite and on a real PostgreSQL server: outages, heartbeats,
passwords, and the query commands (runs, show, list --since, registry init/migrate/sync)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import threading
import time

import pytest

from holly_hpc.experiment import freeze
from holly_hpc.registry import open_registry
from holly_hpc.registry.spool import SPOOL_FILE, SpooledRegistry
from holly_hpc.runtime.task import run_task
from holly_hpc.spec import SpecError, load_spec
from holly_hpc.sweep import expand


def _registered(write_spec, tmp_path, url, changes=None, name="reg"):
    spec = load_spec(
        write_spec(
            {"experiment": name, "registry": {"url": url, "flush_seconds": 0}, **(changes or {})}, name=f"{name}.yaml"
        )
    )
    tasks = expand(spec)
    exp = freeze(spec, tasks, tmp_path / "runs", url)
    reg = open_registry(url)
    reg.init()
    reg.upsert_experiment(exp.name, spec.text, "h", str(exp.root))
    reg.upsert_runs(
        exp.name,
        [
            {
                "task_index": t.index,
                "task_id": t.task_id,
                "config": json.dumps(t.config),
                "config_hash": t.config_hash,
                "seed": t.seed,
                "out_dir": str(exp.task_dir(t.index)),
            }
            for t in tasks
        ],
    )
    return exp, reg


def _pg(action: str) -> None:
    subprocess.run(["pg_ctlcluster", "15", "main", action], check=True, capture_output=True, timeout=120)


def test_postgres_stopped_mid_run_loses_no_metric(write_spec, tmp_path, fresh_postgres_url):
    exp, reg = _registered(
        write_spec, tmp_path, fresh_postgres_url, {"train": {"steps": 300, "log_every": 5, "checkpoint_every": 100}}
    )
    ckpt = exp.task_dir(0) / "checkpoints" / "step_00000100.pt"

    def stop_when_a_third_done():
        while not ckpt.exists():
            time.sleep(0.05)
        _pg("stop")

    stopper = threading.Thread(target=stop_when_a_third_done)
    stopper.start()
    registry = SpooledRegistry(reg, exp.task_dir(0) / SPOOL_FILE)
    try:
        started = time.time()
        registry.start_attempt(exp.name, 0, "job", "host", 1, at=started)
        result = run_task(exp, 0, registry=registry, out=io.StringIO())
        registry.end_attempt(exp.name, 0, None, "completed", started=started)
        registry.finish(exp.name, 0, "succeeded", result.final_metrics, None)
        stopper.join()
        assert result.completed  # training went on through the outage
        assert not registry.replay() and registry.pending() > 0  # the database is still down
    finally:
        _pg("start")
    sync = subprocess.run(
        [os.path.join(os.path.dirname(os.sys.executable), "holly-hpc"), "registry", "sync", str(exp.root)],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
        check=False,
    )
    assert sync.returncode == 0, sync.stderr
    spooled = re.search(r"replayed (\d+) of (\d+) spooled write\(s\) from 1 spool file\(s\)", sync.stdout)
    assert spooled and spooled.group(1) == spooled.group(2) and int(spooled.group(1)) > 0, sync.stdout
    assert not (exp.task_dir(0) / SPOOL_FILE).exists()
    steps = sorted({s for s, _, _ in reg.metrics(exp.name, 0)})
    assert steps == list(range(5, 301, 5))  # every logged step, before, during and after the outage
    (run,) = reg.runs(exp.name)
    assert run.state == "succeeded" and run.attempts == 1 and run.last_step == 300
    # Replaying again (as an interrupted sync would) adds nothing.
    with reg._connect(write=False) as conn:
        events = reg._execute(conn, "SELECT COUNT(*) FROM events").fetchone()[0]
    assert SpooledRegistry(reg, exp.task_dir(0) / SPOOL_FILE).replay()
    with reg._connect(write=False) as conn:
        assert reg._execute(conn, "SELECT COUNT(*) FROM events").fetchone()[0] == events


def test_spool_replays_are_idempotent(write_spec, tmp_path, registry_url):
    exp, reg = _registered(write_spec, tmp_path, registry_url)
    spool = exp.task_dir(0) / SPOOL_FILE
    down = open_registry(f"sqlite:///{tmp_path / 'nowhere' / 'deeper' / 'x.sqlite'}")
    away = SpooledRegistry(down, spool)
    assert away.start_attempt(exp.name, 0, "j1", "h", 1, at=100.0) is None
    away.log_metrics(exp.name, 0, [(1, "loss", 0.5, 100.0)])
    away.end_attempt(exp.name, 0, None, "completed", started=100.0)
    away.finish(exp.name, 0, "succeeded", {"m": 1.0}, None)
    lines = spool.read_text()
    for _ in range(2):  # the same spool twice: as if a replay died half-way and ran again
        spool.write_text(lines)
        assert SpooledRegistry(reg, spool).replay()
    (run,) = reg.runs(exp.name)
    assert run.state == "succeeded" and run.attempts == 1 and run.final_metrics == {"m": 1.0}
    assert reg.metrics(exp.name, 0) == [(1, "loss", 0.5)]
    assert [a["exit_reason"] for a in reg.attempts(exp.name, 0)] == ["completed"]


def test_status_tells_a_silent_task_from_a_running_one(write_spec, tmp_path, registry_url, cli):
    exp, reg = _registered(write_spec, tmp_path, registry_url, {"sweep": {"seeds": 2}})
    for index in (0, 1):
        reg.start_attempt(exp.name, index, "j", "h", 1)
    reg.heartbeat(exp.name, 0, 5, 0.5)  # alive now
    reg.heartbeat(exp.name, 1, 5, 0.5, at=time.time() - 3600)  # silent for an hour: node failure?
    code, out, _ = cli("status", exp.root)
    assert code == 0
    states = [line.split()[2] for line in out.splitlines()[1:]]
    assert states[0] == "running" and states[1].startswith("lost?(1:00:")


def test_passwords_stay_out_of_plan_spec_registry_and_errors(
    write_spec, tmp_path, fresh_postgres_url, monkeypatch, cli
):
    from holly_hpc.launch.submit import submit

    password = os.environ["PGPASSWORD"]
    with_password = fresh_postgres_url.replace("holly_test@", f"holly_test:{password}@")
    # In the spec: refused, and the message does not repeat it.
    bad = write_spec({"registry": {"url": with_password}}, name="bad.yaml")
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert "registry.url: contains a password" in str(info.value) and password not in str(info.value)
    # In the environment: used, but never written down.
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("HOLLY_REGISTRY_URL", with_password)
    sub = submit(write_spec({"launch": {"cluster": "debug"}}))
    (run,) = sub.registry.runs("tiny")
    assert run.state == "succeeded"
    assert password not in (sub.experiment.root / "plan.json").read_text()
    assert password not in sub.registry.url
    with sub.registry._connect(write=False) as conn:
        dump = json.dumps(
            [
                list(r)
                for t in ("experiments", "runs", "attempts", "events")
                for r in sub.registry._execute(conn, f"SELECT * FROM {t}").fetchall()
            ],
            default=str,
        )
    assert password not in dump
    monkeypatch.setenv("HOLLY_REGISTRY_URL", with_password.replace(password, "wrong-one"))
    code, _, err = cli("registry", "migrate")
    assert code == 1 and "wrong-one" not in err and "***" in err


def test_runs_show_list_and_registry_commands(write_spec, tmp_path, registry_url, cli):
    exp, reg = _registered(write_spec, tmp_path, registry_url, {"sweep": {"grid": {"train.lr": [0.1, 0.2, 0.3]}}})
    for index, err in ((0, 0.30), (1, 0.10), (2, 0.20)):
        reg.finish(exp.name, index, "succeeded", {"rot_err_median_deg": err}, None)
    code, out, _ = cli("runs", exp.root, "--sort", "metric:rot_err_median_deg", "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["train.lr"], r["metric:rot_err_median_deg"]) for r in rows] == [(0.2, 0.1), (0.3, 0.2), (0.1, 0.3)]
    code, out, _ = cli("runs", exp.root, "--sort", "rot_err_median_deg", "--desc", "--format", "csv")
    assert out.splitlines()[0] == "task,state,train.lr,metric:rot_err_median_deg"
    assert [line.split(",")[2] for line in out.splitlines()[1:]] == ["0.1", "0.3", "0.2"]
    code, out, _ = cli("runs", exp.root)
    assert out.splitlines()[0].split() == ["task", "state", "train.lr", "metric:rot_err_median_deg"]

    code, out, _ = cli("show", exp.root, "--task", "1")
    report = json.loads(out)
    assert report["run"]["index"] == 1 and report["overrides"] == {"train.lr": 0.2}
    assert report["config"]["train"]["lr"] == 0.2 and report["final_metrics"] == {"rot_err_median_deg": 0.1}
    assert report["paths"]["task_dir"] == str(exp.task_dir(1))

    code, out, _ = cli("list", "--registry", registry_url, "--since", "1h")
    assert code == 0 and "reg" in out
    code, out, _ = cli("list", "--registry", registry_url, "--since", "2999-01-01")
    assert out.splitlines()[1:] == []
    code, _, err = cli("list", "--registry", registry_url, "--since", "yesterday-ish")
    assert code == 1 and "expected an age like 3d" in err

    code, out, _ = cli("registry", "migrate", registry_url)
    assert code == 0 and "(up to date)" in out
    code, out, _ = cli("registry", "sync", exp.root)
    assert code == 0 and "replayed 0 of 0 spooled write(s) from 0 spool file(s)" in out
