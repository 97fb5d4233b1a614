"""`holly-hpc report`: per task and summed, the resources requested against those used (wall time, CPU, peak
memory, GPU memory), with a suggestion for the next submission.

The figures come from the tasks themselves (runtime/usage.py: usage.jsonl, one line per attempt), so a local
run is reported as a SLURM one is; where the launcher has a scheduler to ask (Launcher.usage; SLURM: one batched
sacct call for all of the experiment's jobs), its view is added (TotalCPU, MaxRSS over the job's steps, the state).
"""

from __future__ import annotations

import math

from ..runtime import usage as usage_records
from .slurm import memory_mb

MARGIN = 1.25  # the suggestion leaves this much headroom over the largest use seen


def task_rows(experiment, runs, scheduler: dict[str, dict] | None = None) -> list[dict]:
    resources = experiment.resources
    limit_s = resources["time"] * 60
    mem_requested = memory_mb(resources.get("mem"))
    rows = []
    for run in runs:
        attempts = usage_records.read(experiment.task_dir(run.task_index))
        walls = [a.get("wall_s") or 0.0 for a in attempts]
        cpu = sum(a.get("cpu_s") or 0.0 for a in attempts)
        threads = max([a.get("threads") or 1 for a in attempts], default=None)
        peak = max([a.get("max_rss_mb") or 0.0 for a in attempts], default=None)
        gpus = [a["gpu_max_memory_mb"] for a in attempts if a.get("gpu_max_memory_mb") is not None]
        row = {
            "task": run.task_id,
            "state": run.state,
            "attempts": len(attempts),
            "wall_s": sum(walls) if attempts else None,
            "longest_attempt_s": max(walls, default=None),
            "time_limit_s": limit_s,
            "cpu_s": cpu if attempts else None,
            "threads": threads,
            "cpu_efficiency": cpu / (sum(walls) * threads) if attempts and sum(walls) > 0 and threads else None,
            "max_rss_mb": peak,
            "peak_mb": peak,  # the larger of the task's own peak and the scheduler's
            "mem_requested_mb": mem_requested,
            "gpu_max_memory_mb": max(gpus) if gpus else None,
        }
        if scheduler is not None:
            job = scheduler.get(run.job_id or "", {})
            if job.get("max_rss_mb") is not None and peak is not None:
                row["peak_mb"] = max(peak, job["max_rss_mb"])  # sacct counts the job's other processes too
            row.update(
                {
                    "slurm_state": job.get("state"),
                    "slurm_cpu_s": job.get("cpu_s"),
                    "slurm_max_rss_mb": job.get("max_rss_mb"),
                }
            )
        rows.append(row)
    return rows


def _mem_text(mb: float) -> str:
    return f"{math.ceil(mb / 1024)}G" if mb >= 1024 else f"{math.ceil(mb / 256) * 256}M"


def suggestion(experiment, rows: list[dict]) -> dict:
    """resources for the next submission: the largest attempt's time and memory with MARGIN headroom, and as
    many CPUs as the tasks kept busy."""
    measured = [r for r in rows if r["longest_attempt_s"]]
    if not measured:
        return {}
    longest = max(r["longest_attempt_s"] for r in measured)
    peaks = [r["peak_mb"] or 0.0 for r in measured]
    busy = [r["cpu_s"] / r["wall_s"] for r in measured if r["cpu_s"] and r["wall_s"]]
    out = {"time": max(1, math.ceil(longest * MARGIN / 60)), "mem": _mem_text(max(peaks) * MARGIN)}
    if busy:
        out["cpus_per_task"] = max(1, math.ceil(max(busy) - 0.25))  # a core used 80% of the time still counts
    return out


def report(experiment, registry, launcher) -> dict:
    runs = registry.runs(experiment.name)
    scheduler, note = None, None
    try:
        scheduler = launcher.usage([r.job_id for r in runs if r.job_id])
    except Exception as exc:  # away from the cluster: the tasks' own figures still stand
        note = f"the scheduler could not be asked ({exc})"
    rows = task_rows(experiment, runs, scheduler)
    measured = [r for r in rows if r["wall_s"] is not None]
    total = {
        "tasks": len(rows),
        "attempts": sum(r["attempts"] for r in rows),
        "wall_s": sum(r["wall_s"] for r in measured),
        "cpu_s": sum(r["cpu_s"] or 0.0 for r in measured),
        "max_rss_mb": max([r["max_rss_mb"] or 0.0 for r in measured], default=None),
        "requested_wall_s": sum(r["time_limit_s"] * max(r["attempts"], 1) for r in measured),
    }
    return {
        "experiment": experiment.name,
        "requested": {k: experiment.resources.get(k) for k in ("time", "mem", "cpus_per_task", "gpus_per_node")},
        "tasks": rows,
        "total": total,
        "suggestion": suggestion(experiment, rows),
        "note": note,
    }
