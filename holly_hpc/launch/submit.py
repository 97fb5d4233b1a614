"""Submit a spec: validate, expand, check, freeze, register, launch what is not done yet, optionally wait."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..experiment import Experiment, planned, register, write_frozen
from ..registry import (
    TERMINAL_STATES,
    Registry,
    open_registry,
    resolve_url,
    storable_url,
)
from ..spec import SpecError, load_spec
from ..spec_values import refuse_control
from ..sweep import expand
from .executors import LaunchedTask, Launcher, get_launcher
from .liveness import reap_lost
from .progress import Progress


@dataclass
class Submission:
    experiment: Experiment
    registry: Registry
    launcher: Launcher
    launched: list[LaunchedTask] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # task index -> why


def output_root_for(spec, override: str | None) -> Path:
    root = override or spec.resolved["output_root"]
    refuse_control(str(root), "--output-root")  # a spec's output_root is checked at validate; this is the flag
    return Path(root).expanduser().resolve()


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written there, before anything is frozen or registered."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".holly-write-check-"):
            pass
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write to the output root ({exc.strerror})", str(folder)) from None


def prepare(
    spec_path: str | Path,
    cluster: str | None = None,
    output_root: str | None = None,
    check: Callable[[Experiment], None] | None = None,
    launcher_check: bool = True,
) -> tuple[Submission, list[int]]:
    """Validate, expand, check, freeze and register the spec; return the submission and the tasks to launch.

    Everything that can fail is tried before anything is written: the spec, the output root (writable, no
    symbolic links out of it), the launcher's own checks (SLURM: resources the cluster accepts), `check`
    (e.g. rendering sbatch scripts) and the registry connection. Only then is the experiment frozen and
    registered, so a refused submission leaves no half-made experiment and no task pending for ever.
    """
    spec = load_spec(spec_path)
    if cluster:
        # validate checked the spec's own cluster; the one given instead must be able to run it too
        refused = get_launcher(cluster).problems(spec.resolved["resources"])
        if refused:
            raise SpecError(
                [spec.loaded.problem(path, f"{message} (--cluster {cluster})") for path, message in refused]
            )
        spec.resolved["launch"]["cluster"] = cluster
    tasks = expand(spec)
    root = output_root_for(spec, output_root)
    url = resolve_url(spec.resolved["registry"].get("url"), root)
    # plan.json keeps the URL without a password; jobs get it back from the environment (runtime_url).
    experiment = planned(spec, tasks, root, storable_url(url))
    check_writable(root)
    launcher = get_launcher(experiment.launch["cluster"])
    if launcher_check:
        launcher.check(experiment)
    if check is not None:
        check(experiment)
    registry = open_registry(url)
    registry.init()

    write_frozen(experiment, spec.text)
    register(registry, experiment)
    runs = registry.runs(experiment.name)
    if reap_lost(registry, experiment.name, runs):
        runs = registry.runs(experiment.name)
    alive = launcher.active(experiment, registry, runs)
    states = {r.task_index: r.state for r in runs}
    submission = Submission(experiment, registry, launcher)
    to_run = []
    for t in tasks:
        if states.get(t.index) == "succeeded":
            submission.skipped[t.index] = "succeeded"
            continue
        if t.index in alive:
            submission.skipped[t.index] = f"already {alive[t.index]}"
            continue
        if states.get(t.index) in ("failed", "cancelled", "running"):  # running here: its process is gone
            registry.set_state(experiment.name, t.index, "pending", "resubmitted")
        to_run.append(t.index)
    return submission, to_run


def submit(spec_path: str | Path, cluster: str | None = None, output_root: str | None = None) -> Submission:
    """prepare(), then launch every task that has not succeeded and is not alive as one job array. If the
    launch itself fails (the scheduler refuses at the last moment), the tasks are marked failed with the
    reason, not left pending."""
    submission, to_run = prepare(spec_path, cluster, output_root)
    experiment, registry = submission.experiment, submission.registry
    if to_run:
        try:
            submission.launched = submission.launcher.launch(experiment, to_run)
        except BaseException as exc:
            for index in to_run:
                registry.finish(experiment.name, index, "failed", None, f"submission failed: {exc}")
            raise
        registry.set_job_ids(experiment.name, {t.task_index: t.job_id for t in submission.launched})
    return submission


def wait(
    submission: Submission, out: TextIO | None = None, poll_s: float = 2.0, timeout_s: float | None = None
) -> bool:
    """Block until every launched task has ended, printing progress; True if all succeeded."""
    out = out or sys.stdout
    exp, registry = submission.experiment, submission.registry
    wanted = {t.task_index for t in submission.launched}
    jobs = [t.job for t in submission.launched]
    progress = progress_for(submission, wanted)
    start = time.time()
    while True:
        runs = {r.task_index: r for r in registry.runs(exp.name) if r.task_index in wanted}
        for line in progress.update(runs):
            print(line, file=out, flush=True)
        if all(r.state in TERMINAL_STATES for r in runs.values()):
            return all(r.state == "succeeded" for r in runs.values())
        if jobs and all(_job_done(j) for j in jobs):
            # Every process we started has exited but some task never reported an end.
            time.sleep(poll_s)
            runs = {r.task_index: r for r in registry.runs(exp.name) if r.task_index in wanted}
            if all(r.state in TERMINAL_STATES for r in runs.values()):
                continue
            for r in runs.values():
                if r.state not in TERMINAL_STATES:
                    print(
                        f"[{r.task_id}] its process exited while the task is {r.state}; "
                        f"see: holly-hpc logs {exp.root} --task {r.task_index}",
                        file=out,
                        flush=True,
                    )
            return False
        if timeout_s is not None and time.time() - start > timeout_s:
            print("stopped waiting (timeout); the tasks go on", file=out, flush=True)
            return False
        time.sleep(poll_s)


def progress_for(submission: Submission, wanted: set[int]) -> Progress:
    """The progress printer of these launched tasks: their steps and kinds from the frozen plan, the key metric
    read from the registry's metric rows when a task has moved on."""
    exp, registry = submission.experiment, submission.registry
    tasks = {t.index: t for t in exp.tasks if t.index in wanted}

    def latest(index: int, key: str) -> float | None:
        values = [value for _, name, value in registry.metrics(exp.name, index) if name == key]
        return values[-1] if values else None

    return Progress(
        {i: t.config["train"]["steps"] for i, t in tasks.items()},
        {i: t.config["kind"] for i, t in tasks.items()},
        exp.launch["array_parallelism"],
        latest,
    )


def _job_done(job) -> bool:
    try:
        return job.done()
    except Exception:
        return False
