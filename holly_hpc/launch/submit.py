"""Submit a spec: validate, expand, freeze, register, launch what is not done yet, optionally wait."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..experiment import Experiment, freeze, spec_hash
from ..provenance import provenance
from ..registry import (
    TERMINAL_STATES,
    Registry,
    open_registry,
    resolve_url,
    storable_url,
)
from ..spec import load_spec
from ..sweep import expand
from .executors import LaunchedTask, get_launcher


@dataclass
class Submission:
    experiment: Experiment
    registry: Registry
    launched: list[LaunchedTask] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # task index -> why


def output_root_for(spec, override: str | None) -> Path:
    return Path(override or spec.resolved["output_root"]).expanduser().resolve()


def prepare(spec_path: str | Path, cluster: str | None = None, output_root: str | None = None) -> tuple[Submission, list[int]]:
    """Validate, expand, freeze and register the spec; return the submission and the tasks still to run."""
    spec = load_spec(spec_path)
    tasks = expand(spec)
    root = output_root_for(spec, output_root)
    url = resolve_url(spec.resolved["registry"].get("url"), root)
    if cluster:
        spec.resolved["launch"]["cluster"] = cluster
    # plan.json keeps the URL without a password; jobs get it back from the environment (runtime_url).
    experiment = freeze(spec, tasks, root, storable_url(url))

    registry = open_registry(url)
    registry.init()
    registry.upsert_experiment(experiment.name, spec.text, spec_hash(spec.text), str(experiment.root),
                               provenance(experiment))
    registry.upsert_runs(experiment.name, [
        {"task_index": t.index, "task_id": t.task_id, "config": json.dumps(t.config, sort_keys=True),
         "config_hash": t.config_hash, "seed": t.seed, "out_dir": str(experiment.root / t.rel_dir)}
        for t in tasks
    ])
    states = {r.task_index: r.state for r in registry.runs(experiment.name)}
    submission = Submission(experiment, registry)
    to_run = []
    for t in tasks:
        if states.get(t.index) == "succeeded":
            submission.skipped[t.index] = "succeeded"
            continue
        if states.get(t.index) in ("failed", "cancelled"):
            registry.set_state(experiment.name, t.index, "pending", "resubmitted")
        to_run.append(t.index)
    return submission, to_run


def submit(spec_path: str | Path, cluster: str | None = None, output_root: str | None = None) -> Submission:
    """prepare(), then launch every task that has not succeeded as one job array."""
    submission, to_run = prepare(spec_path, cluster, output_root)
    experiment, registry = submission.experiment, submission.registry
    if to_run:
        submission.launched = get_launcher(experiment.launch["cluster"]).launch(experiment, to_run)
        registry.set_job_ids(experiment.name, {t.task_index: t.job_id for t in submission.launched})
    return submission


def wait(submission: Submission, out: TextIO | None = None, poll_s: float = 2.0, timeout_s: float | None = None) -> bool:
    """Block until every launched task has ended, printing progress; True if all succeeded."""
    out = out or sys.stdout
    exp, registry = submission.experiment, submission.registry
    wanted = {t.task_index for t in submission.launched}
    jobs = [t.job for t in submission.launched]
    seen: dict[int, tuple] = {}
    start = time.time()
    while True:
        runs = {r.task_index: r for r in registry.runs(exp.name) if r.task_index in wanted}
        for index, run in sorted(runs.items()):
            key = (run.state, run.last_step)
            if seen.get(index) != key:
                seen[index] = key
                loss = "" if run.last_loss is None else f" loss {run.last_loss:.4g}"
                step = "" if run.last_step is None else f" step {run.last_step}"
                print(f"[{run.task_id}] {run.state}{step}{loss}", file=out, flush=True)
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
                    print(f"[{r.task_id}] its process exited while the task is {r.state}; "
                          f"see: holly-hpc logs {exp.root} --task {r.task_index}", file=out, flush=True)
            return False
        if timeout_s is not None and time.time() - start > timeout_s:
            print("stopped waiting (timeout); the tasks go on", file=out, flush=True)
            return False
        time.sleep(poll_s)


def _job_done(job) -> bool:
    try:
        return job.done()
    except Exception:  # noqa: BLE001 - an unreadable job state counts as not done
        return False
