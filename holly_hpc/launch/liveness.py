"""Which of an experiment's tasks are really alive, from the processes themselves rather than the registry:
a task killed with SIGKILL (or by the out-of-memory killer) never reports its end, so the registry would
call it running until the 10-minute silence rule, and its attempt would stay open for ever."""

from __future__ import annotations

from pathlib import Path

from ..runtime.processes import is_alive, stat_fields, this_host


def open_attempt(registry, experiment: str, index: int) -> dict | None:
    """The task's newest attempt if it has not ended."""
    attempts = registry.attempts(experiment, index)
    return attempts[-1] if attempts and attempts[-1]["ended"] is None else None


def attempt_alive(attempt: dict | None) -> bool | None:
    """True/False when the attempt ran on this machine and its process can be checked, else None."""
    if attempt is None or attempt.get("host") != this_host() or not attempt.get("pid"):
        return None
    return is_alive(int(attempt["pid"]), attempt.get("proc_start"))


def reap_lost(registry, experiment: str, runs) -> list[int]:
    """Close the open attempt of every running task whose process on this machine has ended without
    reporting, as lost, and mark the task failed (a resubmission resumes it). Returns their indices."""
    lost = []
    for run in runs:
        if run.state != "running":
            continue
        attempt = open_attempt(registry, experiment, run.task_index)
        if attempt_alive(attempt) is False:
            why = (
                f"lost: process {attempt['pid']} on {attempt['host']} ended without reporting (killed, or out of "
                f"memory?); resubmit to resume from its last checkpoint"
            )
            registry.end_attempt(experiment, run.task_index, attempt["attempt"], "lost", why)
            registry.finish(experiment, run.task_index, "failed", None, why)
            lost.append(run.task_index)
    return lost


def is_submitit_controller(pid: int) -> bool:
    """Whether `pid` is (still) a submitit local controller: a reused pid is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    fields = stat_fields(pid)
    return b"submitit.local._local" in cmdline and fields is not None and fields[0] not in ("Z", "X")
