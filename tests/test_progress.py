"""What `submit --wait` prints: per-task step/total, rate, ETA and key metric; the experiment's end; the final
table of main metrics. Driven by registry rows and a fake clock, so every number is known."""

from __future__ import annotations

from holly_hpc.launch.progress import MANY_TASKS, Progress, format_left, summary_rows
from holly_hpc.registry import RunRow


def run(index, state="running", step=None, heartbeat=None, started=0.0, attempts=1, loss=None, final=None):
    return RunRow(
        experiment="e",
        task_index=index,
        task_id=f"{index:04d}-abcdef12",
        state=state,
        attempts=attempts,
        last_step=step,
        last_loss=loss,
        created=0.0,
        started=started if state != "pending" else None,
        finished=None,
        heartbeat=heartbeat,
        out_dir="/x",
        final_metrics=final,
        error=None,
    )


class Clock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def test_a_first_attempt_has_an_eta_from_its_first_report():
    clock = Clock(10.0)
    asked = []
    progress = Progress({0: 1000}, {0: "pose"}, 1, key_metric=lambda i, k: asked.append((i, k)) or 12.5, clock=clock)
    (line,) = progress.update({0: run(0, step=100, heartbeat=10.0, loss=0.25)})
    # 100 steps in the 10 s since the attempt started: 10 steps/s, 900 steps left
    assert "step 100/1000" in line and "loss 0.25" in line and "10 steps/s" in line
    assert "eta 1m30s" in line and "rot_err_median_deg 12.5" in line
    assert asked == [(0, "rot_err_median_deg")]
    assert progress.update({0: run(0, step=100, heartbeat=10.0, loss=0.25)}) == []  # nothing new, nothing printed


def test_a_resumed_attempt_measures_its_rate_from_what_it_reports():
    clock = Clock(100.0)
    progress = Progress({0: 1000}, {0: "embed"}, 1, clock=clock)
    (line,) = progress.update({0: run(0, step=500, heartbeat=100.0, attempts=2)})
    assert "attempt 2" in line and "step 500/1000" in line and "eta" not in line  # the resume step's time is unknown
    clock.now = 110.0
    (line,) = progress.update({0: run(0, step=600, heartbeat=110.0, attempts=2)})
    assert "10 steps/s" in line and "eta 0m40s" in line


def test_the_eta_counts_down_between_reports():
    clock = Clock(10.0)
    progress = Progress({0: 1000}, {0: "pose"}, 1, clock=clock)
    progress.update({0: run(0, step=100, heartbeat=10.0)})
    clock.now = 40.0  # 30 s later, no new report
    assert progress.seconds_left(run(0, step=100, heartbeat=10.0)) == 60.0


def test_the_experiment_ends_after_the_pending_tasks_run_in_waves():
    clock = Clock(10.0)
    totals = dict.fromkeys(range(4), 1000)
    progress = Progress(totals, dict.fromkeys(totals, "pose"), 2, clock=clock)
    runs = {
        0: run(0, step=100, heartbeat=10.0),  # 10 steps/s: 90 s left, a whole task takes 100 s
        1: run(1, step=500, heartbeat=10.0),  # 50 steps/s: 10 s left, a whole task takes 20 s
        2: run(2, state="pending"),
        3: run(3, state="pending"),
    }
    lines = progress.update(runs)
    # A whole task takes 60 s (the mean of 100 and 20). Slot B frees at 10 s and runs task 2 to 70 s; slot A
    # is still busy until 90 s, so task 3 also goes to B and ends at 130 s.
    assert progress.experiment_left(runs) == 130.0
    assert lines[-1].startswith("4 tasks: 2 pending, 2 running; all done in about 2m10s")


def test_preparing_is_said_before_the_first_step_and_pending_is_queued():
    progress = Progress({0: 10, 1: 10}, {0: "pose", 1: "pose"}, 1, clock=Clock())
    lines = progress.update({0: run(0), 1: run(1, state="pending")})
    assert lines[0].endswith("running  preparing data and model")
    assert lines[1].endswith("pending  queued")
    assert lines[2] == "2 tasks: 1 pending, 1 running"  # no rate yet: no end is promised


def test_many_tasks_print_one_line_per_change_and_each_failure():
    n = MANY_TASKS + 4
    totals = dict.fromkeys(range(n), 100)
    progress = Progress(totals, dict.fromkeys(totals, "pose"), 4, clock=Clock(10.0))
    runs = {i: run(i, state="pending") for i in range(n)}
    assert progress.update(runs) == [f"{n} tasks: {n} pending"]
    assert progress.update(runs) == []
    runs[3] = run(3, state="failed", step=5)
    lines = progress.update(runs)
    assert lines[0].startswith("[0003-abcdef12] failed") and lines[1] == f"{n} tasks: 1 failed, {n - 1} pending"


def test_the_summary_shows_the_main_final_metrics_that_runs_have():
    runs = [
        run(0, state="succeeded", final={"rot_err_median_deg": 1.8271, "eval_loss": 0.01, "other": 3.0}),
        run(1, state="failed"),
    ]
    headers, rows = summary_rows(runs, {0: "pose", 1: "pose"})
    assert headers == ["task", "state", "rot_err_median_deg", "eval_loss", "elapsed"]
    assert rows[0][:4] == ["0000-abcdef12", "succeeded", "1.827", "0.01"]
    assert rows[1][:4] == ["0001-abcdef12", "failed", "-", "-"]


def test_format_left():
    assert format_left(59.9) == "0m59s" and format_left(3725) == "1h02m" and format_left(-3) == "0m00s"
