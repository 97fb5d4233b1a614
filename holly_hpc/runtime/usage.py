"""What one attempt of a task used, measured by the task itself: wall time, CPU time, peak memory, GPU memory.

Appended as one JSON line per attempt to <task dir>/usage.jsonl when the attempt ends (whatever the cluster), so
`holly-hpc report` can compare requested and used resources for local runs too, where no sacct exists. A line
is far below PIPE_BUF, so O_APPEND writes of concurrent ranks or attempts never interleave.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

USAGE_FILE = "usage.jsonl"


def measure(started: float, cpu_at_start: float) -> dict:
    """This process's use since `started` (wall clock) and `cpu_at_start` (its CPU seconds then)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # data-loading workers
    usage = {
        "wall_s": time.time() - started,
        "cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime - cpu_at_start,
        "max_rss_mb": max(own.ru_maxrss, children.ru_maxrss) / 1024,  # Linux reports KiB
        "threads": _torch_threads(),
        "gpu_max_memory_mb": None,
    }
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            usage["gpu_max_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # no torch, or a broken driver: the figure is optional
        pass
    return usage


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except Exception:
        return None


def record(task_dir: Path, attempt: int | None, job_id: str, exit_reason: str, usage: dict) -> None:
    line = json.dumps({"attempt": attempt, "job_id": job_id, "exit_reason": exit_reason, **usage}) + "\n"
    fd = os.open(task_dir / USAGE_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(task_dir: Path) -> list[dict]:
    """Every attempt's record, oldest first; a torn or foreign line is skipped."""
    path = task_dir / USAGE_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
