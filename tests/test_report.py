"""`holly-hpc report`: sacct's text parsed, the tasks' own usage records summed, a suggestion with headroom."""

from __future__ import annotations

import json
import types

import pytest

from holly_hpc.launch.report import suggestion, task_rows
from holly_hpc.launch.slurm import memory_mb, parse_sacct, slurm_seconds
from holly_hpc.runtime import usage


def test_sacct_units_and_durations():
    assert memory_mb("16G") == 16384 and memory_mb("4000M") == 4000 and memory_mb("512K") == 0.5
    assert memory_mb("2.5G") == 2560 and memory_mb("300") == 300 and memory_mb("") is None and memory_mb("x") is None
    assert slurm_seconds("12:34.500") == 754.5 and slurm_seconds("01:02:03") == 3723
    assert slurm_seconds("1-00:00:01") == 86401 and slurm_seconds("bad") is None


def test_sacct_lines_fold_steps_into_their_array_element():
    text = "\n".join(
        [
            "41_0|COMPLETED|00:31.200|",
            "41_0.batch|COMPLETED|00:01.000|2000K",
            "41_0.0|COMPLETED|00:30.200|300M",
            "41_1|OUT_OF_MEMORY|00:05.000|",
            "41_1.0|OUT_OF_MEMORY|00:05.000|1.5G",
            "41_2|CANCELLED by 0||",
        ]
    )
    jobs = parse_sacct(text)
    assert jobs["41_0"] == {"state": "COMPLETED", "cpu_s": 31.2, "max_rss_mb": 300.0}
    assert jobs["41_1"] == {"state": "OUT_OF_MEMORY", "cpu_s": 5.0, "max_rss_mb": 1536.0}
    assert jobs["41_2"] == {"state": "CANCELLED", "cpu_s": None, "max_rss_mb": None}


def _experiment(tmp_path, n: int, resources: dict):
    dirs = {i: tmp_path / f"t{i}" for i in range(n)}
    for d in dirs.values():
        d.mkdir()
    return types.SimpleNamespace(name="e", resources=resources, task_dir=lambda i: dirs[i])


def _run(index, state="succeeded", job_id=None):
    return types.SimpleNamespace(task_index=index, task_id=f"{index:04d}-abcdef12", state=state, job_id=job_id)


def test_rows_sum_attempts_and_the_suggestion_leaves_headroom(tmp_path):
    exp = _experiment(tmp_path, 2, {"time": 30, "mem": "4G"})
    usage.record(
        exp.task_dir(0), 1, "1", "preempted", {"wall_s": 100.0, "cpu_s": 150.0, "max_rss_mb": 800.0, "threads": 2}
    )
    usage.record(
        exp.task_dir(0), 2, "1", "completed", {"wall_s": 300.0, "cpu_s": 450.0, "max_rss_mb": 900.0, "threads": 2}
    )
    (exp.task_dir(0) / usage.USAGE_FILE).open("a").write("{torn\n")  # a torn line is skipped
    rows = task_rows(exp, [_run(0), _run(1, "pending")])
    first, second = rows
    assert first["attempts"] == 2 and first["wall_s"] == 400.0 and first["longest_attempt_s"] == 300.0
    assert first["cpu_s"] == 600.0 and first["cpu_efficiency"] == pytest.approx(600 / (400 * 2))
    assert first["max_rss_mb"] == 900.0 and first["mem_requested_mb"] == 4096 and first["time_limit_s"] == 1800
    assert second["attempts"] == 0 and second["wall_s"] is None
    # 300 s * 1.25 -> 7 min; 900 MB * 1.25 = 1125 MB -> 2G; 1.5 cores busy -> 2 CPUs
    assert suggestion(exp, rows) == {"time": 7, "mem": "2G", "cpus_per_task": 2}


def test_the_scheduler_view_is_added_per_job(tmp_path):
    exp = _experiment(tmp_path, 1, {"time": 10})
    usage.record(
        exp.task_dir(0), 1, "9_0", "completed", {"wall_s": 60.0, "cpu_s": 55.0, "max_rss_mb": 200.0, "threads": 1}
    )
    (row,) = task_rows(
        exp, [_run(0, job_id="9_0")], {"9_0": {"state": "COMPLETED", "cpu_s": 56.0, "max_rss_mb": 250.0}}
    )
    assert (row["slurm_state"], row["slurm_cpu_s"], row["slurm_max_rss_mb"]) == ("COMPLETED", 56.0, 250.0)
    # the larger of the two peaks decides the memory suggested: 250 * 1.25 = 312.5 MB -> 512M
    assert suggestion(exp, [row])["mem"] == "512M"


def test_a_usage_record_is_one_json_line_per_attempt(tmp_path):
    measured = usage.measure(started=0.0, cpu_at_start=0.0)
    assert measured["cpu_s"] > 0 and measured["max_rss_mb"] > 10 and measured["wall_s"] > 0
    usage.record(tmp_path, 3, "77", "completed", measured)
    (line,) = (tmp_path / usage.USAGE_FILE).read_text().splitlines()
    assert json.loads(line)["attempt"] == 3 and usage.read(tmp_path)[0]["exit_reason"] == "completed"
