"""What no spec, file or fault may do: write outside the output root, put a line into a batch script, freeze
half an experiment, lose a registry row, train a task twice, or leave a dead task 'running'."""

from __future__ import annotations

import io
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from holly_hpc.experiment import Experiment, UnsafePath, freeze
from holly_hpc.launch.executors import SlurmLauncher
from holly_hpc.launch.sbatch import directives, render_scripts
from holly_hpc.launch.slurm import UnsafeDirective, sbatch_parameters
from holly_hpc.registry import MissingRows, open_registry
from holly_hpc.registry.spool import SPOOL_FILE, SpooledRegistry
from holly_hpc.runtime.checkpoint import (
    list_checkpoints,
    newest_intact_checkpoint,
    save_checkpoint,
    verified_checkpoint,
)
from holly_hpc.runtime.outputs import TaskPaths
from holly_hpc.runtime.processes import is_alive, process_identity
from holly_hpc.runtime.task import TaskRunner, run_task, task_lock
from holly_hpc.spec import load_spec
from holly_hpc.sweep import expand

from .conftest import env_for_subprocess, holly_hpc_exe, wait_for

# A local task that trains until stopped, reporting every log (flush 0) and checkpointing often.
LONG = {
    "train": {"steps": 200000, "log_every": 10, "checkpoint_every": 50, "keep_checkpoints": 2},
    "registry": {"flush_seconds": 0},
    "launch": {"cluster": "local", "array_parallelism": 1, "threads": 1},
}


def _sh(*args, timeout=300):
    return subprocess.run(
        [*holly_hpc_exe(), *map(str, args)],
        capture_output=True,
        text=True,
        env=env_for_subprocess(),
        timeout=timeout,
        check=False,
    )


def _registry(root: Path):
    return open_registry(Experiment.load(root).registry_url)


def _open_attempt(root: Path, index: int = 0):
    reg = _registry(root)
    attempts = reg.attempts(Experiment.load(root).name, index)
    return attempts[-1] if attempts and attempts[-1]["ended"] is None else None


def _frozen(write_spec, tmp_path, changes=None, url=None):
    path = write_spec(changes or {})
    spec = load_spec(path)
    return freeze(spec, expand(spec), tmp_path / "runs", url or f"sqlite:///{tmp_path / 'runs' / 'registry.sqlite'}")


def _registered(write_spec, tmp_path, changes=None):
    from holly_hpc.experiment import restore_registry

    exp = _frozen(write_spec, tmp_path, changes)
    reg = open_registry(exp.registry_url)
    restore_registry(reg, exp)
    return exp, reg


@pytest.fixture
def stop_tasks():
    """Roots of experiments whose local tasks must not outlive the test."""
    roots: list[Path] = []
    yield roots
    for root in roots:
        if (root / "plan.json").exists():
            _sh("cancel", root, "--grace", "5")


# ------------------------------------------------------------------------------------ batch scripts
def _hacked(exp: Experiment, **resources) -> Experiment:
    """An experiment whose frozen plan was edited by hand after validate (the second line of defence)."""
    plan = {**exp.plan, "resources": {**exp.plan["resources"], **resources}}
    return Experiment(exp.root, plan)


@pytest.mark.parametrize(
    "resources",
    [
        {"partition": "debug\ntouch /tmp/x\n#"},
        {"account": "a\rb"},
        {"extra": {"mail-type": "END\n#"}},
        {"extra": {"x\nrm -rf ~": True}},
        {"mem": "4G\u2028"},
    ],
)
def test_no_directive_with_a_control_character_is_written(write_spec, tmp_path, resources):
    exp = _hacked(_frozen(write_spec, tmp_path), **resources)
    with pytest.raises(UnsafeDirective, match="control character"):
        directives(exp, 0, 1)
    with pytest.raises(UnsafeDirective, match="control character"):
        sbatch_parameters(exp.resources, 1)
    with pytest.raises(UnsafeDirective, match="control character"):
        SlurmLauncher()._executor(exp)


def test_no_script_line_breaks_for_a_name_or_folder(write_spec, tmp_path):
    exp = _frozen(write_spec, tmp_path)
    with pytest.raises(UnsafeDirective):
        render_scripts(
            Experiment(exp.root, {**exp.plan, "experiment": "x\ntouch /tmp/pwned"}), [0], tmp_path / "a.sbatch", 10
        )
    with pytest.raises(UnsafeDirective):
        render_scripts(exp, [0], tmp_path / "a\nb.sbatch", 10)
    with pytest.raises(UnsafeDirective):  # the folder submitit writes into #SBATCH --output
        SlurmLauncher()._executor(Experiment(Path(str(exp.root) + "\nid"), exp.plan))


@pytest.mark.parametrize("command", ["sbatch", "submit"])
def test_a_newline_in_a_resource_is_refused_before_anything_is_written(write_spec, tmp_path, command):
    marker = tmp_path / "pwned"
    path = write_spec(
        raw=f'experiment: x\nkind: pose\nresources:\n  partition: "debug\\ntouch {marker}\\n#"\n'
        f"output_root: {tmp_path / 'runs'}\nlaunch: {{cluster: slurm}}\n"
    )
    done = _sh(command, path, *(["-o", tmp_path / "x.sbatch"] if command == "sbatch" else []))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{path}:4:14: resources.partition: control character U+000A (line feed)" in done.stderr
    assert not marker.exists() and not (tmp_path / "runs").exists() and not (tmp_path / "x.sbatch").exists()


# ------------------------------------------------------------------------------------- output paths
@pytest.mark.parametrize("name", ["..", "../escape", "/etc/cron.d/x", "a/b", ".hidden", "x\n"])
def test_experiment_names_cannot_leave_the_output_root(write_spec, name):
    path = write_spec({"experiment": name})
    with pytest.raises(Exception, match=r"experiment: expected a string matching|experiment: control character"):
        load_spec(path)


def test_a_symlinked_experiment_folder_is_refused(write_spec, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(elsewhere)
    done = _sh("submit", write_spec({"launch": {"cluster": "debug"}}))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.search(r"error: .*/runs/tiny is a symbolic link \(to .*/elsewhere\): refused", done.stderr), done.stderr
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "runs" / "registry.sqlite").exists()


def test_a_symlinked_task_folder_or_output_folder_is_refused(write_spec, tmp_path):
    exp = _frozen(write_spec, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    task_dir = exp.root / exp.plan["tasks"][0]["rel_dir"]
    task_dir.parent.mkdir(parents=True)
    task_dir.symlink_to(elsewhere)
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        exp.task_dir(0)
    with pytest.raises(UnsafePath, match="is a symbolic link"):
        freeze(load_spec(write_spec()), expand(load_spec(write_spec())), tmp_path / "runs", exp.registry_url)
    task_dir.unlink()
    task_dir.mkdir()
    (task_dir / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(UnsafePath, match="checkpoints is a symbolic link"):
        TaskPaths(exp.task_dir(0)).make()
    assert list(elsewhere.iterdir()) == []


def test_a_tampered_plan_cannot_point_a_task_outside(write_spec, tmp_path):
    exp = _frozen(write_spec, tmp_path)
    for rel in ("../../escape", "/tmp/escape", "tasks/../../x"):
        tampered = Experiment(exp.root, {**exp.plan, "tasks": [{**exp.plan["tasks"][0], "rel_dir": rel}]})
        with pytest.raises(UnsafePath):
            tampered.task_dir(0)


def test_lock_and_spool_files_are_not_written_through_a_planted_link(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    (task_dir / ".lock").symlink_to(target)
    with pytest.raises(OSError), task_lock(task_dir):
        pass
    (task_dir / SPOOL_FILE).symlink_to(target)
    down = open_registry(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'r.sqlite'}")
    with pytest.raises(OSError):
        SpooledRegistry(down, task_dir / SPOOL_FILE).heartbeat("e", 0, 1, 0.5)
    assert target.read_text() == "keep me"


# ----------------------------------------------------------------------- nothing frozen before checks
def test_a_refused_submission_freezes_and_registers_nothing(write_spec, tmp_path):
    done = _sh(
        "submit",
        write_spec(raw=f"experiment: inf\nkind: pose\nresources: {{time: .inf}}\noutput_root: {tmp_path / 'runs'}\n"),
    )
    assert done.returncode == 1 and "resources.time: expected a finite number, got inf" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_an_output_root_that_cannot_be_written_is_one_line(write_spec, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _sh("submit", write_spec(), "--output-root", blocker / "runs")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {blocker / 'runs'}: cannot write to the output root (Not a directory)"


def test_a_read_only_output_root_is_one_line_and_nothing_is_half_written(write_spec, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    spec = write_spec({"launch": {"cluster": "debug"}})
    script = (
        f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
        f"{' '.join(holly_hpc_exe())} submit {spec} --output-root {ro}"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for_subprocess(),
        check=False,
    )
    if "mount:" in done.stderr or "unshare:" in done.stderr:
        message = f"no private read-only mount here: {done.stderr.strip()}"
        if os.environ.get("CI") == "true":  # CI runs as root on a machine where unshare works
            pytest.fail(message)
        pytest.skip(message)  # outside CI=true only
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {ro}: cannot write to the output root (Read-only file system)"
    assert list(ro.iterdir()) == []


def test_an_unreachable_registry_freezes_nothing(write_spec, tmp_path):
    done = _sh("submit", write_spec({"registry": {"url": "postgresql://nobody@127.0.0.1:9/none"}}))
    assert done.returncode == 1 and "Traceback" not in done.stderr and "cannot connect to the registry" in done.stderr
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_launch_that_fails_marks_its_tasks_failed_not_pending(write_spec, tmp_path, monkeypatch):
    from holly_hpc.launch import executors
    from holly_hpc.launch.submit import submit

    def refuse(self, experiment, indices):
        raise RuntimeError("sbatch: error: Batch job submission failed: Invalid account")

    monkeypatch.setattr(executors.LocalLauncher, "launch", refuse)
    with pytest.raises(RuntimeError, match="Invalid account"):
        submit(write_spec())
    (run,) = _registry(tmp_path / "runs" / "tiny").runs("tiny")
    assert (
        run.state == "failed"
        and run.error == "submission failed: sbatch: error: Batch job submission failed: Invalid account"
    )


# ---------------------------------------------------------------------------------------- checkpoints
def _payload(step):
    return {"step": step, "kind": {"w": step}, "rng": {}}


def test_a_truncated_or_altered_checkpoint_is_set_aside_for_the_newest_intact_one(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, _payload(step), keep=3)
    newest = tmp_path / "step_00000030.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, and without its digest (as a pre-digest file):
    (tmp_path / "step_00000030.pt.sha256").unlink()  # torch's reader has to find it out
    middle = tmp_path / "step_00000020.pt"
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the zip may still open, the digest does not match
    middle.write_bytes(bytes(data))
    seen = []
    path, payload = newest_intact_checkpoint(tmp_path, lambda p, aside, why: seen.append((p.name, aside.name, why)))
    assert path.name == "step_00000010.pt" and payload["kind"] == {"w": 10}
    assert [(name, aside) for name, aside, _ in seen] == [
        ("step_00000030.pt", "step_00000030.pt.corrupt"),
        ("step_00000020.pt", "step_00000020.pt.corrupt"),
    ]
    assert "cannot be read" in seen[0][2] and "sha256 differs" in seen[1][2]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    (tmp_path / "step_00000040.pt").write_bytes(b"no digest, not a zip")  # a file without a digest: read to tell
    assert newest_intact_checkpoint(tmp_path)[0].name == "step_00000010.pt"


def test_a_checkpoint_of_another_step_or_shape_is_not_trusted(tmp_path):
    save_checkpoint(tmp_path, 10, {"step": 99, "kind": {}, "rng": {}}, keep=3)
    with pytest.raises(Exception, match="not a holly-hpc checkpoint of the step its name says"):
        verified_checkpoint(tmp_path / "step_00000010.pt")


def test_training_resumes_from_the_newest_intact_checkpoint_and_records_it(write_spec, tmp_path):
    exp, reg = _registered(
        write_spec, tmp_path, {"train": {"steps": 40, "log_every": 5, "checkpoint_every": 10, "keep_checkpoints": 3}}
    )
    run_task(exp, 0, reg, stop_after_step=30, out=io.StringIO())
    ckpts = exp.task_dir(0) / "checkpoints"
    (ckpts / "step_00000030.pt").write_bytes(b"PK\x03\x04 truncated")
    out = io.StringIO()
    result = run_task(exp, 0, reg, out=out)
    assert result.completed and result.step == 40
    assert "checkpoint " in out.getvalue() and "step_00000030.pt is corrupt" in out.getvalue()
    assert "resumed from step_00000020.pt (step 20)" in out.getvalue()
    assert (ckpts / "step_00000030.pt.corrupt").exists()
    with reg._connect(write=False) as conn:
        reasons = [r[0] for r in reg._execute(conn, "SELECT reason FROM events ORDER BY id").fetchall()]
    assert any(r and "step_00000030.pt is corrupt" in r for r in reasons)


def test_when_no_checkpoint_is_intact_training_starts_over_and_says_so(write_spec, tmp_path):
    exp, reg = _registered(write_spec, tmp_path)
    run_task(exp, 0, reg, stop_after_step=10, out=io.StringIO())
    for _, path in list_checkpoints(exp.task_dir(0) / "checkpoints"):
        path.write_bytes(b"")
    out = io.StringIO()
    assert run_task(exp, 0, reg, out=out).step == 20
    assert "no intact checkpoint left: starting over from step 0" in out.getvalue()


def test_eval_uses_the_newest_intact_checkpoint(write_spec, tmp_path, cli):
    exp, reg = _registered(write_spec, tmp_path)
    run_task(exp, 0, reg, out=io.StringIO())
    (exp.task_dir(0) / "checkpoints" / "step_00000020.pt").write_bytes(b"\x00" * 10)
    code, out, err = cli("eval", exp.task_dir(0))
    assert code == 0 and "at step 10" in out and "step_00000020.pt is corrupt" in err


# ------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize(
    "write",
    [
        lambda r: r.set_state("exp", 5, "running", "x"),
        lambda r: r.heartbeat("exp", 5, 1, 0.5),
        lambda r: r.finish("exp", 5, "succeeded", {}, None),
        lambda r: r.log_metrics("exp", 5, [(1, "loss", 0.5, 0.0)]),
        lambda r: r.start_attempt("exp", 5, "j", "h", 1),
        lambda r: r.note("exp", 5, "x"),
        lambda r: r.end_attempt("exp", 5, 1, "completed"),
    ],
)
def test_a_write_to_a_missing_run_raises_instead_of_vanishing(registry_url, write):
    reg = open_registry(registry_url)
    reg.init()
    reg.upsert_experiment("exp", "", "", "/x")
    with pytest.raises(MissingRows, match="no run exp task 5"):
        write(reg)
    empty = open_registry(registry_url.replace("registry.sqlite", "empty.sqlite")) if "sqlite" in registry_url else None
    if empty is not None:  # a file without our tables holds none of our rows either
        with pytest.raises(MissingRows, match="has no registry tables"):
            write(empty)


def _one_run(url: str):
    """A registry holding experiment 'exp' with one pending run, task 0."""
    reg = open_registry(url)
    reg.init()
    reg.upsert_experiment("exp", "", "", "/x")
    reg.upsert_runs(
        "exp", [{"task_index": 0, "task_id": "0000-x", "config": "{}", "config_hash": "x", "seed": 1, "out_dir": "/o"}]
    )
    return reg


def test_an_attempt_whose_start_was_lost_is_recorded_when_it_ends(registry_url):
    reg = _one_run(registry_url)
    reg.end_attempt("exp", 0, None, "completed", started=100.0, at=160.0)
    (attempt,) = reg.attempts("exp", 0)
    assert (attempt["attempt"], attempt["started"], attempt["ended"], attempt["exit_reason"]) == (
        1,
        100.0,
        160.0,
        "completed",
    )


def test_a_registry_deleted_while_a_task_runs_gets_its_rows_back(write_spec, tmp_path, monkeypatch):
    exp, reg = _registered(write_spec, tmp_path, {"train": {"steps": 40, "log_every": 5, "checkpoint_every": 10}})
    run_task(exp, 0, reg, stop_after_step=20, out=io.StringIO())
    db = Path(reg.url[len("sqlite:///") :])
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    TaskRunner(exp.root, 0)()  # the rest of the run, as a job would: its every write must land
    (run,) = open_registry(exp.registry_url).runs(exp.name)
    assert run.state == "succeeded" and run.final_metrics and run.last_step == 40
    assert sorted({s for s, _, _ in reg.metrics(exp.name, 0)}) == [25, 30, 35, 40]
    assert not (exp.task_dir(0) / SPOOL_FILE).exists()


def test_sync_into_a_fresh_postgres_database_restores_rows_and_counts_writes(
    write_spec, tmp_path, fresh_postgres_url, cli
):
    exp = _frozen(write_spec, tmp_path, url=fresh_postgres_url)  # frozen, never registered there
    down = open_registry(f"sqlite:///{tmp_path / 'no' / 'such' / 'r.sqlite'}")
    spool = exp.task_dir(0) / SPOOL_FILE
    away = SpooledRegistry(down, spool)
    away.start_attempt(exp.name, 0, "j1", "h", 1, at=100.0)
    away.log_metrics(exp.name, 0, [(5, "loss", 0.5, 100.0), (10, "loss", 0.25, 101.0)])
    away.heartbeat(exp.name, 0, 10, 0.25, at=101.0)
    away.end_attempt(exp.name, 0, None, "completed", started=100.0, at=102.0)
    away.finish(exp.name, 0, "succeeded", {"m": 1.0}, None, at=102.0)
    away.log_metrics(exp.name, 7, [(5, "loss", 0.5, 100.0)])  # a task the experiment does not have
    code, out, err = cli("registry", "sync", exp.root)
    assert code == 1
    assert "replayed 5 of 6 spooled write(s) from 1 spool file(s)" in out and "written again from its folder" in out
    assert f"kept {spool}: 1 write(s) not written: MissingRows: no run tiny task 7" in err
    reg = open_registry(fresh_postgres_url)
    (run,) = reg.runs(exp.name)
    assert run.state == "succeeded" and run.final_metrics == {"m": 1.0} and run.last_step == 10
    assert reg.metrics(exp.name, 0) == [(5, "loss", 0.5), (10, "loss", 0.25)]
    assert len(spool.read_text().splitlines()) == 1  # only the write that did not land is kept


# ------------------------------------------------------------------------------- processes, for real
def _start_long(write_spec, tmp_path, stop_tasks, name="spec.yaml"):
    path = write_spec(LONG, name=name)
    root = tmp_path / "runs" / "tiny"
    stop_tasks.append(root)
    return path, root


def test_two_submits_at_once_train_once_and_cancel_stops_the_process_that_trains(write_spec, tmp_path, stop_tasks):
    path, root = _start_long(write_spec, tmp_path, stop_tasks)
    both = [
        subprocess.Popen(
            [*holly_hpc_exe(), "submit", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for_subprocess(),
        )
        for _ in range(2)
    ]
    for proc in both:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
    attempt = wait_for(lambda: _open_attempt(root), what="the task to start")
    time.sleep(3)  # time for the second controller to find the task locked and leave
    reg = _registry(root)
    (run,) = reg.runs("tiny")
    assert len(reg.attempts("tiny", 0)) == 1
    assert run.job_id == attempt["job_id"]  # the job that holds the task, whichever submit came last

    again = _sh("submit", path)
    assert again.returncode == 0 and "0 launched (local)" in again.stdout
    assert f"task 0 not launched again: already running (job {run.job_id}, pid {attempt['pid']})" in again.stdout

    done = _sh("cancel", root, "--grace", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"task 0: cancelled: process {attempt['pid']} stopped at a step boundary after SIGTERM" in done.stdout
    assert is_alive(attempt["pid"], attempt["proc_start"]) is False
    (run,) = reg.runs("tiny")
    (ended,) = reg.attempts("tiny", 0)
    assert run.state == "cancelled" and ended["exit_reason"] == "cancelled"
    assert re.match(r"stopped after step \d+ on SIGTERM", ended["error"])
    stopped_at = int(re.search(r"step (\d+)", ended["error"]).group(1))
    assert list_checkpoints(Experiment.load(root).task_dir(0) / "checkpoints")[-1][0] == stopped_at
    logs = _sh("logs", root, "--task", "0").stdout + _sh("logs", root, "--task", "0", "--stderr").stdout
    assert "caught SIGTERM: checkpointing at the end of this step, then stopping" in logs
    assert "Traceback" not in logs and "KeyboardInterrupt" not in logs


def test_a_task_killed_with_sigkill_is_found_lost_and_resumes(write_spec, tmp_path, stop_tasks):
    path, root = _start_long(write_spec, tmp_path, stop_tasks)
    assert _sh("submit", path).returncode == 0
    attempt = wait_for(lambda: _open_attempt(root), what="the task to start")
    ckpts = Experiment.load(root).task_dir(0) / "checkpoints"
    wait_for(lambda: list_checkpoints(ckpts), what="a checkpoint")
    os.kill(attempt["pid"], signal.SIGKILL)
    wait_for(lambda: is_alive(attempt["pid"], attempt["proc_start"]) is False, what="the process to die")
    status = _sh("status", root)
    assert status.returncode == 0
    assert "note: task 0 of tiny was running but its process is gone: marked failed (lost)" in status.stderr
    assert status.stdout.splitlines()[1].split()[2] == "failed"
    reg = _registry(root)
    (lost,) = reg.attempts("tiny", 0)
    assert lost["exit_reason"] == "lost" and lost["ended"] is not None and "ended without reporting" in lost["error"]
    again = _sh("submit", path)
    assert "1 launched (local)" in again.stdout, again.stdout + again.stderr
    second = wait_for(lambda: _open_attempt(root), what="the resubmitted task to start")
    assert second["attempt"] == 2 and [a["exit_reason"] for a in reg.attempts("tiny", 0)] == ["lost", None]
    wait_for(lambda: "resumed from step_" in _sh("logs", root, "--task", "0").stdout, what="a resume")


def test_an_open_attempt_left_by_a_dead_process_is_closed_by_the_next(registry_url):
    reg = _one_run(registry_url)
    reg.start_attempt("exp", 0, "j1", "h", 11, at=100.0)  # its process was killed: never ended
    reg.start_attempt("exp", 0, "j2", "h", 12, at=200.0, proc_start=process_identity())
    first, second = reg.attempts("exp", 0)
    assert first["exit_reason"] == "lost" and first["ended"] == 200.0 and second["ended"] is None
    assert second["proc_start"] == process_identity() and reg.runs("exp")[0].job_id == "j2"


def test_submit_wait_says_cancelled_when_its_tasks_are_cancelled(write_spec, tmp_path, stop_tasks):
    path, root = _start_long(write_spec, tmp_path, stop_tasks)
    waiting = subprocess.Popen(
        [*holly_hpc_exe(), "submit", str(path), "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for_subprocess(),
    )
    wait_for(lambda: (root / "plan.json").exists() and _open_attempt(root), what="the task to start")
    assert _sh("cancel", root).returncode == 0
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 3, out + err
    assert re.search(r"cancelled after \d+:\d\d:\d\d: 1 task\(s\) cancelled, 0 succeeded", out)
    assert "finished in" not in out


def test_cancel_of_a_queued_local_task_stops_it_before_it_starts(write_spec, tmp_path, stop_tasks):
    path = write_spec({**LONG, "sweep": {"grid": {"train.lr": [0.003, 0.001]}}})
    root = tmp_path / "runs" / "tiny"
    stop_tasks.append(root)
    assert _sh("submit", path).returncode == 0  # array_parallelism 1: one task waits for the other's slot
    running = wait_for(lambda: [i for i in (0, 1) if _open_attempt(root, i)], what="a task to start")[0]
    queued = 1 - running
    done = _sh("cancel", root, "--task", queued, "--grace", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"task {queued}: cancelled: queued job \d+ stopped before it started", done.stdout)
    reg = _registry(root)
    assert {r.task_index: r.state for r in reg.runs("tiny")} == {running: "running", queued: "cancelled"}
    assert reg.attempts("tiny", queued) == []


def test_sigterm_checkpoints_at_the_step_and_a_resubmission_resumes_there(write_spec, tmp_path, stop_tasks):
    path, root = _start_long(write_spec, tmp_path, stop_tasks)
    assert _sh("submit", path).returncode == 0
    attempt = wait_for(lambda: _open_attempt(root), what="the task to start")
    wait_for(lambda: (_registry(root).runs("tiny")[0].last_step or 0) >= 20, what="some steps")
    os.kill(attempt["pid"], signal.SIGTERM)  # what SLURM sends a preempted or scancelled job
    wait_for(lambda: is_alive(attempt["pid"], attempt["proc_start"]) is False, what="the task to stop")
    reg = _registry(root)
    (ended,) = reg.attempts("tiny", 0)
    step = int(re.search(r"stopped after step (\d+) on SIGTERM", ended["error"]).group(1))
    ckpts = Experiment.load(root).task_dir(0) / "checkpoints"
    assert list_checkpoints(ckpts)[-1][0] == step and reg.runs("tiny")[0].state == "cancelled"
    assert _sh("submit", path).returncode == 0
    wait_for(
        lambda: f"resumed from step_{step:08d}.pt (step {step})" in _sh("logs", root, "--task", "0").stdout,
        what="the resume from the stop step",
    )


def test_cli_errors_are_one_line(cli, tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = cli("registry", "init", f"sqlite:///{tmp_path}/file/x.sqlite")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.strip() == f"error: {tmp_path}/file: File exists"


def test_sqlite_registry_file_is_not_left_half_migrated(tmp_path):
    """Migration 5 rebuilds the attempts table: rows and the run link survive."""
    path = tmp_path / "r.sqlite"
    reg = open_registry(f"sqlite:///{path}")
    with reg._connect() as conn:
        reg._create_base(conn)
        for v in (1, 2, 3, 4):
            reg._execute(conn, "INSERT INTO schema_version (version, applied_at) VALUES (?, 0)", (v,))
        reg._execute(conn, "ALTER TABLE runs ADD COLUMN job_id TEXT")
        reg._execute(
            conn,
            "INSERT INTO experiments (name, created, spec_text, spec_hash, experiment_dir) VALUES ('e', 0, '', '', '/x')",
        )
        reg._execute(
            conn,
            "INSERT INTO runs (experiment, task_index, task_id, config, config_hash, seed, out_dir, state,"
            " created) VALUES ('e', 0, '0000-x', '{}', 'x', 1, '/o', 'running', 0)",
        )
        reg._execute(
            conn,
            "INSERT INTO attempts (experiment, task_index, attempt, job_id, host, pid, started)"
            " VALUES ('e', 0, 1, 'j', 'h', 5, 10.0)",
        )
    assert 5 in reg.migrate()
    (attempt,) = reg.attempts("e", 0)
    assert attempt["job_id"] == "j" and attempt["proc_start"] is None
    reg.end_attempt("e", 0, 1, "lost", "gone")
    assert reg.attempts("e", 0)[0]["exit_reason"] == "lost"
    with sqlite3.connect(path) as db, pytest.raises(sqlite3.IntegrityError):
        db.execute(
            "INSERT INTO attempts (experiment, task_index, attempt, started, exit_reason) VALUES ('e', 0, 2, 1, 'exploded')"
        )


def test_a_spool_line_cut_short_by_a_crash_is_set_aside_not_counted_as_written(write_spec, tmp_path, cli):
    exp, reg = _registered(write_spec, tmp_path)
    spool = exp.task_dir(0) / SPOOL_FILE
    down = open_registry(f"sqlite:///{tmp_path / 'no' / 'such' / 'r.sqlite'}")
    SpooledRegistry(down, spool).heartbeat(exp.name, 0, 5, 0.5, at=100.0)
    with open(spool, "a") as fh:
        fh.write('{"method": "heartbeat", "args": ["tiny", 0, 1')  # the writer died here
    code, out, _ = cli("registry", "sync", exp.root)
    assert code == 0 and "replayed 1 of 2 spooled write(s)" in out and "1 unreadable line(s) moved" in out
    assert (spool.parent / (SPOOL_FILE + ".unreadable")).read_text().startswith('{"method": "heartbeat"')
    assert not spool.exists() and reg.runs(exp.name)[0].last_step == 5
