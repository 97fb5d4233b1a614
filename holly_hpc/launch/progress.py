"""What `submit --wait` prints while its tasks run, and the table it ends with.

Per task: step/total, its rate, the time left and the clock time it should end, its latest loss and its kind's
key metric; for an experiment of several tasks, when the whole of it should end. At the end, one row per task
with its kind's main final metrics (those of final/metrics.json), not only its state.

Everything is read from the registry (no log files are parsed), so it works the same for local processes and
SLURM jobs on other nodes. Rates come from the heartbeats seen (each task reports at most every 10 s); a task's
first attempt also counts from its start, so its first report already gives an estimate.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

# The metric a task's progress line shows beside its loss (the last value logged), and the final metrics its
# summary row shows, per kind: the ones a researcher judges a run by. Keys a run did not write are left out.
KEY_METRIC = {
    "pose": "rot_err_median_deg",
    "reconstruct": "structure_error",
    "embed": "eval_loss",
    "generate": "diversity_ratio",
}
MAIN_METRICS = {
    "pose": ("rot_err_median_deg", "rot_within_10deg", "eval_loss"),
    "reconstruct": (
        "structure_error",
        "rot_err_median_deg",
        "fsc_resolution_nm",
        "symmetry_n",
        "eval_loss",
        "nll_per_localisation",
    ),
    "embed": (
        "eval_loss",
        "eval_logreg_balanced_accuracy",
        "eval_knn_balanced_accuracy",
        "baseline_logreg_balanced_accuracy",
    ),
    "generate": ("diversity_ratio", "cluster_accuracy", "sample_diversity"),
}
MANY_TASKS = 16  # above this many launched tasks, one line for the experiment per change instead of one per task


def format_left(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def clock_time(at: float) -> str:
    return time.strftime("%H:%M", time.localtime(at))


@dataclass
class _Track:
    attempts: int
    first: tuple[float, int]  # (wall time, step) the rate is measured from
    last: tuple[float, int]

    def rate(self) -> float | None:
        (t0, s0), (t1, s1) = self.first, self.last
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


class Progress:
    """Turns successive registry reads into lines to print. `totals`: each launched task's train.steps;
    `kinds`: each task's kind; `parallelism`: how many tasks run at once (launch.array_parallelism);
    `key_metric(index)`: the latest value of the task's key metric, or None (asked only when its step moved)."""

    def __init__(
        self,
        totals: dict[int, int],
        kinds: dict[int, str],
        parallelism: int,
        key_metric: Callable[[int, str], float | None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.totals, self.kinds = totals, kinds
        self.parallelism = max(1, parallelism)
        self.key_metric = key_metric or (lambda index, key: None)
        self.clock = clock
        self._tracks: dict[int, _Track] = {}
        self._shown: dict[int, tuple] = {}
        self._summary_shown: tuple | None = None

    # ------------------------------------------------------------------ rates
    def _observe(self, run) -> None:
        if run.state != "running" or run.last_step is None or run.heartbeat is None:
            return
        point = (run.heartbeat, run.last_step)
        track = self._tracks.get(run.task_index)
        if track is None or track.attempts != run.attempts or run.last_step < track.last[1]:
            # A new attempt (resumed from a checkpoint at an unknown step): measure from here on, except that
            # a first attempt started at step 0 at its start time.
            first = (run.started, 0) if run.attempts == 1 and run.started is not None else point
            self._tracks[run.task_index] = _Track(run.attempts, first, point)
        else:
            track.last = point

    def seconds_left(self, run) -> float | None:
        """Time until the task's last step, from its rate; None before a rate is known."""
        track = self._tracks.get(run.task_index)
        rate = track.rate() if track else None
        if rate is None:
            return None
        done_at = track.last[0] + (self.totals[run.task_index] - track.last[1]) / rate
        return max(done_at - self.clock(), 0.0)

    def _task_seconds(self) -> float | None:
        """How long one whole task takes, from the rates measured so far (for tasks not started yet)."""
        rates = [(i, t.rate()) for i, t in self._tracks.items()]
        durations = [self.totals[i] / r for i, r in rates if r]
        return sum(durations) / len(durations) if durations else None

    def experiment_left(self, runs: dict) -> float | None:
        """Time until every task has ended: `parallelism` slots, each busy until its running task ends, and each
        pending task taking the first slot that frees; None until one rate is known."""
        per_task = self._task_seconds()
        if per_task is None:
            return None
        running = [self.seconds_left(r) for r in runs.values() if r.state == "running"]
        slots = [per_task if left is None else left for left in running]
        slots += [0.0] * max(self.parallelism - len(slots), 0)
        heapq.heapify(slots)
        for _ in range(sum(r.state == "pending" for r in runs.values())):
            heapq.heappush(slots, heapq.heappop(slots) + per_task)
        return max(slots, default=0.0)

    # ------------------------------------------------------------------ lines
    def task_line(self, run) -> str:
        total = self.totals.get(run.task_index)
        parts = [f"[{run.task_id}] {run.state}"]
        if run.attempts > 1:
            parts.append(f"attempt {run.attempts}")
        if run.last_step is not None:
            parts.append(f"step {run.last_step}/{total}" if total else f"step {run.last_step}")
        if run.last_loss is not None:
            parts.append(f"loss {run.last_loss:.4g}")
        key = KEY_METRIC.get(self.kinds.get(run.task_index, ""))
        if run.state == "running" and key and run.last_step:
            value = self.key_metric(run.task_index, key)
            if value is not None:
                parts.append(f"{key} {value:.4g}")
        if run.state == "running":
            track = self._tracks.get(run.task_index)
            rate = track.rate() if track else None
            left = self.seconds_left(run)
            if rate is not None and left is not None:
                parts.append(f"{rate:.3g} steps/s")
                parts.append(f"eta {format_left(left)} (~{clock_time(self.clock() + left)})")
            elif run.last_step is None:
                parts.append("preparing data and model")
        if run.state == "pending":
            parts.append("queued")
        return "  ".join(parts)

    def update(self, runs: dict) -> list[str]:
        """The lines to print for this read of the registry (runs: task index -> RunRow)."""
        for run in runs.values():
            self._observe(run)
        lines = []
        if len(runs) > MANY_TASKS:
            counts = {}
            for run in runs.values():
                counts[run.state] = counts.get(run.state, 0) + 1
                if run.state in ("failed", "cancelled") and self._shown.get(run.task_index) != run.state:
                    self._shown[run.task_index] = run.state
                    lines.append(self.task_line(run))
            key = tuple(sorted(counts.items()))
            if key != self._summary_shown:
                self._summary_shown = key
                lines.append(self.experiment_line(runs, counts))
            return lines
        for index, run in sorted(runs.items()):
            key = (run.state, run.last_step, run.attempts)
            if self._shown.get(index) != key:
                self._shown[index] = key
                lines.append(self.task_line(run))
        if lines and len(runs) > 1:
            lines.append(self.experiment_line(runs))
        return lines

    def experiment_line(self, runs: dict, counts: dict | None = None) -> str:
        if counts is None:
            counts = {}
            for run in runs.values():
                counts[run.state] = counts.get(run.state, 0) + 1
        text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        left = self.experiment_left(runs) if any(s in counts for s in ("pending", "running")) else None
        when = "" if left is None else f"; all done in about {format_left(left)} (~{clock_time(self.clock() + left)})"
        return f"{len(runs)} tasks: {text}{when}"


def summary_rows(runs, kinds: dict[int, str]) -> tuple[list[str], list[list[str]]]:
    """The final table: task, state, the main final metrics of its kind that any run has, and the elapsed time."""
    keys: list[str] = []
    for run in runs:
        for key in MAIN_METRICS.get(kinds.get(run.task_index, ""), ()):
            if run.final_metrics and key in run.final_metrics and key not in keys:
                keys.append(key)
    now = time.time()
    rows = []
    for run in runs:
        values = run.final_metrics or {}
        cells = [run.task_id, run.state]
        cells += [_number(values.get(key)) for key in keys]
        elapsed = run.elapsed(now)
        cells.append("-" if elapsed is None else format_left(elapsed))
        rows.append(cells)
    return ["task", "state", *keys, "elapsed"], rows


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
