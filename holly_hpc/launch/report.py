"""`holly-hpc report`: per task and summed, the resources requested against those used (wall time, CPU, peak
memory, GPU memory), with a suggestion for the next submission.

The figures come from the tasks themselves (runtime/usage.py: usage.jsonl, one line per attempt), so a local
run is reported as a SLURM one is; on SLURM, one batched sacct call for all of the experiment's jobs adds the
scheduler's view (TotalCPU, MaxRSS over the job's steps, the exit state).
"""

from __future__ import annotations

import math
import re

from ..runtime import usage as usage_records

MARGIN = 1.25  # the suggestion leaves this much headroom over the largest use seen
UNITS_MB = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0**2}


def memory_mb(text: str | None) -> float | None:
    """'16G', '4000M', '512K', '2.5G' (SLURM's units; a bare number is MB) -> MB."""
    if not text:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), flags=re.I)
    if not match:
        return None
    return float(match.group(1)) * UNITS_MB[(match.group(2) or "M").upper()]


def slurm_seconds(text: str) -> float | None:
    """sacct's durations: '12:34.567', '01:02:03', '1-02:03:04' -> seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", text.strip())
    if not match:
        return None
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)


def parse_sacct(text: str) -> dict[str, dict]:
    """`sacct -n -P --format=JobID,State,TotalCPU,MaxRSS` lines -> per job (the array element, steps folded in):
    state (of the allocation line), cpu_s (its TotalCPU, which sums its steps) and max_rss_mb (over the steps)."""
    jobs: dict[str, dict] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        job_id, state, total_cpu, max_rss = parts[:4]
        job, _, step = job_id.partition(".")
        row = jobs.setdefault(job, {"state": None, "cpu_s": None, "max_rss_mb": None})
        if not step:
            row["state"] = state.split()[0] if state else None
            row["cpu_s"] = slurm_seconds(total_cpu) if total_cpu else None
        rss = memory_mb(max_rss)
        if rss is not None:
            row["max_rss_mb"] = max(row["max_rss_mb"] or 0.0, rss)
    return jobs


def sacct_usage(job_ids: list[str]) -> dict[str, dict]:
    """One sacct call for every job of the experiment (never one per task)."""
    from .slurm import _run

    arrays = sorted({j.split("_")[0] for j in job_ids if j})
    if not arrays:
        return {}
    out = _run(["sacct", "-n", "-P", "--format=JobID,State,TotalCPU,MaxRSS", "-j", ",".join(arrays)])
    return parse_sacct(out)


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
            "mem_requested_mb": mem_requested,
            "gpu_max_memory_mb": max(gpus) if gpus else None,
        }
        if scheduler is not None:
            job = scheduler.get(run.job_id or "", {})
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
    peaks = [max(r["max_rss_mb"] or 0.0, r.get("slurm_max_rss_mb") or 0.0) for r in measured]
    busy = [r["cpu_s"] / r["wall_s"] for r in measured if r["cpu_s"] and r["wall_s"]]
    out = {"time": max(1, math.ceil(longest * MARGIN / 60)), "mem": _mem_text(max(peaks) * MARGIN)}
    if busy:
        out["cpus_per_task"] = max(1, math.ceil(max(busy) - 0.25))  # a core used 80% of the time still counts
    return out


def report(experiment, registry, launcher) -> dict:
    runs = registry.runs(experiment.name)
    scheduler, note = None, None
    if launcher.name == "slurm":
        try:
            scheduler = sacct_usage([r.job_id for r in runs if r.job_id])
        except Exception as exc:  # away from the cluster: the tasks' own figures still stand
            note = f"sacct could not be asked ({exc})"
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
