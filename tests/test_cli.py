"""Every CLI command, end to end: local submitit arrays, resubmission, status, list, logs, debug runs."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import time

import torch

from holly_hpc.experiment import Experiment, freeze
from holly_hpc.registry import open_registry
from holly_hpc.runtime.checkpoint import latest_checkpoint, load_checkpoint
from holly_hpc.runtime.task import run_task
from holly_hpc.spec import load_spec
from holly_hpc.sweep import expand

from .conftest import env_for_subprocess, holly_hpc_exe

SWEEP3 = {"sweep": {"grid": {"train.lr": [0.003, 0.001, 0.0003]}}}


def _sh(*args, cwd=None, timeout=300):
    return subprocess.run(
        [*holly_hpc_exe(), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env_for_subprocess(),
        timeout=timeout,
        check=False,
    )


def test_validate_ok_and_errors(cli, write_spec):
    good = write_spec()
    code, out, _ = cli("validate", good)
    assert code == 0 and out.strip() == f"{good}: OK (pose, 1 task(s))"
    bad = write_spec({"train": {"lrr": 1, "steps": 0}}, name="bad.yaml")
    code, _, err = cli("validate", good, bad)
    assert code == 1
    assert f"{bad}: 2 problem(s)" in err
    assert "train.steps: expected a value >= 1, got 0" in err and "unknown key 'lrr'; did you mean 'lr'?" in err
    code, out, err = cli("validate", good, bad, "--json")
    assert code == 1 and err == ""
    ok, failed = json.loads(out)
    assert ok == {"spec": str(good), "ok": True, "kind": "pose", "tasks": 1, "problems": []}
    assert failed["ok"] is False and {p["key"] for p in failed["problems"]} == {"train.steps", "train.lrr"}
    assert all(p["file"] == str(bad) and p["line"] > 0 for p in failed["problems"])


def test_plan_shows_tasks_without_running(cli, write_spec, tmp_path):
    path = write_spec({**SWEEP3, "sweep": {**SWEEP3["sweep"], "seeds": 2}})
    code, out, err = cli("plan", path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"experiment tiny: 6 task(s) of kind pose -> {tmp_path / 'runs' / 'tiny'}"
    assert lines[1].split() == ["index", "task", "hash", "seed", "overrides", "output"]
    tasks = expand(load_spec(path))
    for line, task in zip(lines[2:], tasks, strict=True):
        cols = line.split()
        assert cols[:4] == [str(task.index), task.task_id, task.config_hash[:8], str(task.seed)]
        assert cols[4] == f"train.lr={json.dumps(task.overrides['train.lr'])}"
        assert cols[5] == str(tmp_path / "runs" / "tiny" / task.rel_dir)
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing written
    code, out, _ = cli("plan", path, "--json")
    assert [t["task_id"] for t in json.loads(out)] == [t.task_id for t in tasks]


def test_local_array_of_three_succeeds_then_resubmission_skips_it(write_spec, tmp_path):
    path = write_spec(SWEEP3)
    done = _sh("submit", path, "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    root = tmp_path / "runs" / "tiny"
    assert "experiment tiny: 3 task(s), 3 launched (local), 0 already succeeded" in done.stdout
    assert f"outputs:     {root}" in done.stdout
    assert "following 3 task(s) of 20 steps" in done.stdout
    exp = Experiment.load(root)
    # It ends with each task's main final metrics, as final/metrics.json holds them.
    lines = done.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("task "))
    assert lines[head].split() == ["task", "state", "rot_err_median_deg", "rot_within_10deg", "eval_loss", "elapsed"]
    for line, task in zip(lines[head + 1 : head + 4], exp.tasks, strict=True):
        final = json.loads((exp.task_dir(task.index) / "final" / "metrics.json").read_text())
        cells = line.split()
        assert cells[:2] == [task.task_id, "succeeded"]
        assert cells[2:5] == [f"{final[k]:.4g}" for k in ("rot_err_median_deg", "rot_within_10deg", "eval_loss")]
    assert (root / "spec.yaml").read_text() == path.read_text()  # the frozen copy
    reg = open_registry(exp.registry_url)
    runs = reg.runs("tiny")
    assert [(r.task_index, r.state, r.attempts, r.last_step) for r in runs] == [
        (0, "succeeded", 1, 20),
        (1, "succeeded", 1, 20),
        (2, "succeeded", 1, 20),
    ]
    # Three local jobs of one array: distinct job ids recorded per attempt.
    for i in range(3):
        assert (exp.task_dir(i) / "final" / "metrics.json").exists()

    # ... then the efficiency report, from what each task measured of itself
    assert any(line.startswith("next submission: resources: ") for line in lines)
    found = json.loads(_sh("report", root, "--json").stdout)
    assert [(r["task"], r["attempts"]) for r in found["tasks"]] == [(t.task_id, 1) for t in exp.tasks]
    assert all(r["cpu_s"] > 0 and r["max_rss_mb"] > 50 and 0 < r["wall_s"] < 600 for r in found["tasks"])
    assert found["total"]["attempts"] == 3 and found["suggestion"]["time"] >= 1

    again = _sh("submit", path)
    assert again.returncode == 0
    assert "experiment tiny: 3 task(s), 0 launched (local), 3 already succeeded" in again.stdout
    assert [r.attempts for r in reg.runs("tiny")] == [1, 1, 1]

    status = _sh("status", root)
    assert status.returncode == 0
    rows = [line.split() for line in status.stdout.splitlines()]
    assert rows[0] == ["experiment", "task", "state", "attempts", "step", "loss", "elapsed"]
    assert [(r[1], r[2], r[3], r[4]) for r in rows[1:]] == [(t.task_id, "succeeded", "1", "20") for t in exp.tasks]

    listing = _sh("list", "--output-root", tmp_path / "runs")
    assert listing.returncode == 0
    header, row = (line.split() for line in listing.stdout.splitlines())
    assert header == [
        "experiment",
        "created",
        "tasks",
        "pending",
        "running",
        "succeeded",
        "failed",
        "cancelled",
        "folder",
    ]
    assert row[0] == "tiny" and row[3:] == ["3", "0", "0", "3", "0", "0", str(root)]
    listed = json.loads(_sh("list", "--output-root", tmp_path / "runs", "--json").stdout)
    assert [(e["experiment"], e["tasks"], e["counts"]["succeeded"], e["folder"]) for e in listed] == [
        ("tiny", 3, 3, str(root))
    ]
    tasks = json.loads(_sh("status", root, "--json").stdout)
    assert [(t["task"], t["task_id"], t["state"], t["step"]) for t in tasks] == [
        (t.index, t.task_id, "succeeded", 20) for t in exp.tasks
    ]
    assert all(t["elapsed_s"] > 0 and t["error"] is None for t in tasks)

    logs = _sh("logs", root, "--task", "1")
    assert logs.returncode == 0
    assert f"[{exp.task(1).task_id}] done" in logs.stdout and "step 20/20" in logs.stdout


def test_failed_task_is_recorded_and_resubmission_retries_it(cli, write_spec, tmp_path):
    obj = tmp_path / "shape.obj"
    obj.write_text("".join(f"v {x} {y} {z}\n" for x, y, z in [(0, 0, 0), (1, 0, 0), (0, 2, 0), (0, 0, 3), (1, 1, 1)]))
    path = write_spec({"data": {"structure": "shape.obj"}, "launch": {"cluster": "debug"}})
    spec_ok = load_spec(path)
    obj.unlink()  # disappears between validation and the run
    root = tmp_path / "runs" / "tiny"
    freeze(spec_ok, expand(spec_ok), tmp_path / "runs", f"sqlite:///{tmp_path / 'runs' / 'registry.sqlite'}")
    code, out, err = cli("submit", path, "--cluster", "debug")  # validation now fails: file named
    assert code == 1 and f"{obj} does not exist" in err
    # Run the frozen task directly, as a job would: it fails and says why.
    from holly_hpc.launch.executors import get_launcher

    exp = Experiment.load(root)
    reg = open_registry(exp.registry_url)
    reg.init()
    reg.upsert_experiment("tiny", "", "", str(root))
    t = exp.task(0)
    reg.upsert_runs(
        "tiny",
        [
            {
                "task_index": 0,
                "task_id": t.task_id,
                "config": "{}",
                "config_hash": t.config_hash,
                "seed": t.seed,
                "out_dir": str(exp.task_dir(0)),
            }
        ],
    )
    get_launcher("debug").launch(exp, [0])
    (run,) = reg.runs("tiny")
    assert run.state == "failed" and run.attempts == 1 and "shape.obj" in run.error
    code, out, _ = cli("status", root)  # the reason in one line, and where the log is
    (reason,) = [line for line in out.splitlines() if line.startswith(f"{t.task_id} failed: ")]
    assert "shape.obj" in reason and "Traceback" not in reason and reason.count("\n") == 0
    assert f"  log: holly-hpc logs {root} --task 0 --stderr" in out.splitlines()
    (shown,) = json.loads(cli("status", root, "--json")[1])
    assert shown["reason"] == reason.split(" failed: ", 1)[1]

    obj.write_text("".join(f"v {x} {y} {z}\n" for x, y, z in [(0, 0, 0), (1, 0, 0), (0, 2, 0), (0, 0, 3), (1, 1, 1)]))
    code, out, _ = cli("submit", path, "--cluster", "debug")
    assert code == 0, out
    assert "1 launched (debug), 0 already succeeded" in out
    (run,) = reg.runs("tiny")
    assert run.state == "succeeded" and run.attempts == 2


def test_resubmission_resumes_an_unfinished_task_from_its_checkpoint(cli, write_spec, tmp_path):
    path = write_spec({"launch": {"cluster": "debug"}})
    spec = load_spec(path)
    exp = freeze(spec, expand(spec), tmp_path / "runs", f"sqlite:///{tmp_path / 'runs' / 'registry.sqlite'}")
    run_task(exp, 0, stop_after_step=10, out=io.StringIO())  # a previous attempt that was cut off
    code, _out, _ = cli("submit", path)
    assert code == 0
    reg = open_registry(exp.registry_url)
    (run,) = reg.runs("tiny")
    assert run.state == "succeeded" and run.last_step == 20
    # Only steps after 10 ran in this attempt: its registry metrics start at 15.
    assert sorted({s for s, _, _ in reg.metrics("tiny", 0)}) == [15, 20]


def test_changed_spec_under_the_same_name_is_refused(cli, write_spec):
    path = write_spec({"launch": {"cluster": "debug"}})
    assert cli("submit", path)[0] == 0
    changed = write_spec({"launch": {"cluster": "debug"}, "train": {"lr": 0.01}})
    code, _, err = cli("submit", changed)
    assert code == 1
    assert "already holds experiment 'tiny' with different tasks (1 frozen, 1 now; task(s) 0 differ)" in err


def test_status_and_list_errors(cli, tmp_path):
    code, _, err = cli("status", "nothing-here", "--output-root", tmp_path)
    assert code == 1 and "no registry at sqlite:///" in err
    code, _, err = cli("logs", tmp_path, "--task", "0", "--output-root", tmp_path)
    assert code == 1


def test_submitit_requeue_on_sigusr2_resumes_and_matches_an_uninterrupted_run(write_spec, tmp_path):
    """A real preemption signal to a local submitit job: checkpoint() requeues the same task, which
    resumes from its last checkpoint and ends with the parameters of an uninterrupted run."""
    from holly_hpc.launch.submit import submit, wait

    changes = {"train": {"steps": 400, "log_every": 20, "checkpoint_every": 20}}
    ref_path = write_spec({**changes, "experiment": "ref", "launch": {"cluster": "debug"}}, name="ref.yaml")
    assert submit(ref_path).launched
    path = write_spec({**changes, "experiment": "pre"}, name="pre.yaml")
    sub = submit(path)
    (launched,) = sub.launched
    # The local controller runs in its own session: a Ctrl-C on `submit --wait` does not reach the task.
    assert os.getsid(int(launched.job_id)) == int(launched.job_id) != os.getsid(0)
    ckpts = sub.experiment.task_dir(0) / "checkpoints"
    deadline = time.time() + 120
    while latest_checkpoint(ckpts) is None and time.time() < deadline:
        time.sleep(0.2)
    assert latest_checkpoint(ckpts) is not None
    # SIGUSR2 to the task process, as SLURM sends before a time limit or preemption. (submitit's
    # LocalJob._interrupt signals the local controller instead, which just dies of it.)
    with sqlite3.connect(sub.registry.url[len("sqlite:///") :]) as db:
        (pid,) = db.execute("SELECT pid FROM attempts WHERE experiment = 'pre' AND attempt = 1").fetchone()
    os.kill(pid, signal.SIGUSR2)
    progress = io.StringIO()
    assert wait(sub, out=progress, poll_s=0.5, timeout_s=240), progress.getvalue()
    (run,) = sub.registry.runs("pre")
    assert run.state == "succeeded" and run.attempts == 2
    ref = load_checkpoint(latest_checkpoint(Experiment.load(tmp_path / "runs" / "ref").task_dir(0) / "checkpoints"))
    got = load_checkpoint(latest_checkpoint(ckpts))
    for key, tensor in ref["kind"]["net"].items():
        assert torch.equal(tensor, got["kind"]["net"][key]), key


def test_reference_prints_every_section(cli):
    code, out, _ = cli("reference")
    assert code == 0
    for section in ("#### top level", "#### sweep", "#### launch", "#### kind: pose — data", "#### kind: pose — train"):
        assert section in out


def test_version_python_dash_m_and_a_closed_pipe_without_traceback():
    import shlex
    import sys

    from holly_hpc import __version__

    version = subprocess.run(
        [*holly_hpc_exe(), "--version"], check=False, capture_output=True, text=True, env=env_for_subprocess()
    )
    assert version.returncode == 0 and version.stdout.strip() == f"holly-hpc {__version__}"
    module = subprocess.run(
        [sys.executable, "-m", "holly_hpc", "--version"],
        check=False,
        capture_output=True,
        text=True,
        env=env_for_subprocess(),
    )
    assert module.returncode == 0 and module.stdout == version.stdout
    # The reference is far longer than one line: head leaves after the first, the writer gets EPIPE.
    command = shlex.join([*holly_hpc_exe(), "reference"]) + " | head -n 1"
    piped = subprocess.run(
        ["bash", "-c", command], check=False, capture_output=True, text=True, env=env_for_subprocess()
    )
    assert piped.stdout.count("\n") == 1 and piped.stdout.strip()
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr
