"""holly-hpc: validate, plan, submit, status, list, logs, reference."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from .experiment import PLAN, Experiment, ExperimentMismatch, restore_registry
from .registry import STATES, open_registry, redact, resolve_url, runtime_url
from .registry.sql import PROVENANCE
from .spec import SpecError, load_spec
from .sweep import expand

DEFAULT_OUTPUT_ROOT = "runs"
EXIT_FAILED = 1  # a task failed, or an error (one line on stderr)
EXIT_CANCELLED = 3  # `submit --wait`: every task ended, some were cancelled, none failed


def _table(headers: list[str], rows: list[list], out=None) -> None:
    out = out or sys.stdout
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _overrides_text(overrides: dict) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) or "-"


# ------------------------------------------------------------------------------------------ commands
def cmd_validate(args) -> int:
    status, reports = 0, []
    for path in args.specs:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            status = 1
            reports.append({"spec": str(path), "ok": False, "problems": [_problem_json(p) for p in exc.problems]})
            if not args.json:
                print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
                print(str(exc), file=sys.stderr)
            continue
        tasks = len(expand(spec))
        reports.append({"spec": str(path), "ok": True, "kind": spec.resolved["kind"], "tasks": tasks, "problems": []})
        if not args.json:
            print(f"{path}: OK ({spec.resolved['kind']}, {tasks} task(s))")
    if args.json:
        print(json.dumps(reports, indent=2))
    return status


def _problem_json(problem) -> dict:
    from .spec_yaml import format_path

    return {
        "file": problem.file,
        "line": problem.line,
        "column": problem.column,
        "key": format_path(problem.path),
        "message": problem.message,
    }


def cmd_plan(args) -> int:
    from .launch.submit import output_root_for

    spec = load_spec(args.spec)
    tasks = expand(spec)
    root = output_root_for(spec, args.output_root) / spec.experiment
    if args.json:
        print(json.dumps([{**t.to_json(), "out_dir": str(root / t.rel_dir)} for t in tasks], indent=2))
        return 0
    print(f"experiment {spec.experiment}: {len(tasks)} task(s) of kind {spec.resolved['kind']} -> {root}")
    _table(
        ["index", "task", "hash", "seed", "overrides", "output"],
        [
            [t.index, t.task_id, t.config_hash[:8], t.seed, _overrides_text(t.overrides), root / t.rel_dir]
            for t in tasks
        ],
    )
    return 0


def cmd_submit(args) -> int:
    from .launch.submit import submit, wait

    started = time.time()
    try:
        sub = submit(args.spec, cluster=args.cluster, output_root=args.output_root)
    except ExperimentMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    exp = sub.experiment
    cluster = exp.launch["cluster"]
    succeeded = [i for i, why in sub.skipped.items() if why == "succeeded"]
    print(
        f"experiment {exp.name}: {len(exp.plan['tasks'])} task(s), {len(sub.launched)} launched ({cluster}), "
        f"{len(succeeded)} already succeeded"
    )
    for index, why in sorted(sub.skipped.items()):
        if why != "succeeded":
            print(f"task {index} not launched again: {why}")
    if sub.launched:
        print("jobs: " + ", ".join(f"task {t.task_index} -> {t.job_id}" for t in sub.launched))
    if args.wait and not sub.launcher.synchronous and sub.launched:
        steps = sorted({exp.task(t.task_index).config["train"]["steps"] for t in sub.launched})
        print(
            f"following {len(sub.launched)} task(s) of {'/'.join(map(str, steps))} steps "
            f"(Ctrl-C stops watching; the tasks go on). Each task's log: holly-hpc logs {shlex.quote(str(exp.root))} "
            "--task N"
        )
        try:
            wait(sub)
        except KeyboardInterrupt:
            print(f"\nstopped watching; the tasks go on: holly-hpc status {exp.root}")
            return 130
    code = 0
    if args.wait or sub.launcher.synchronous:
        runs = sub.registry.runs(exp.name)
        _summary_table(exp, runs)
        states = [r.state for r in runs]
        elapsed = _duration(time.time() - started)
        if "failed" in states or any(s in ("pending", "running") for s in states):
            print(f"ended in {elapsed} with {len(states) - states.count('succeeded')} task(s) not succeeded")
            code = EXIT_FAILED
        elif "cancelled" in states:
            print(
                f"cancelled after {elapsed}: {states.count('cancelled')} task(s) cancelled, "
                f"{states.count('succeeded')} succeeded"
            )
            code = EXIT_CANCELLED
        else:
            print(f"finished in {elapsed}")
        if not sub.launcher.synchronous:
            from .launch.report import report

            _report_table(report(exp, sub.registry, sub.launcher))
    print(f"outputs:     {exp.root}")
    print(f"registry:    {exp.registry_url}")
    print(f"status:      holly-hpc status {exp.root}")
    print(f"tensorboard: tensorboard --logdir {exp.root / 'tasks'}")
    return code


def _summary_table(exp: Experiment, runs) -> None:
    """Each task's state and its kind's main final metrics, then the reason of each failure."""
    from .launch.progress import summary_rows

    headers, rows = summary_rows(runs, {t.index: t.config["kind"] for t in exp.tasks})
    _table(headers, rows)
    for r in runs:
        if r.state == "failed" and r.error:
            print(f"{r.task_id} failed: {failure_reason(r.error)}")
            print(f"  log: holly-hpc logs {shlex.quote(str(exp.root))} --task {r.task_index} --stderr")


def cmd_report(args) -> int:
    from .launch.executors import get_launcher
    from .launch.report import report

    exp = _experiment_from(args, args.experiment)
    registry = open_registry(runtime_url(exp.registry_url))
    found = report(exp, registry, get_launcher(exp.launch["cluster"]))
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    _report_table(found)
    return 0


def _report_table(found: dict) -> None:
    def pct(part, whole):
        return "-" if part is None or not whole else f"{100 * part / whole:.0f}%"

    def mb(value):
        return "-" if value is None else f"{value:.0f}"

    rows = [
        [
            r["task"],
            r["state"],
            r["attempts"],
            "-" if r["wall_s"] is None else _duration(r["wall_s"]),
            pct(r["longest_attempt_s"], r["time_limit_s"]),
            "-" if r["cpu_s"] is None else f"{r['cpu_s']:.0f}",
            r["threads"] or "-",
            pct(r["cpu_efficiency"], 1.0),
            mb(r["peak_mb"]),
            mb(r["mem_requested_mb"]),
            mb(r["gpu_max_memory_mb"]),
        ]
        for r in found["tasks"]
    ]
    headers = ["task", "state", "attempts", "wall", "of_limit", "cpu_s", "threads", "cpu_eff", "peak_mb", "req_mb"]
    _table([*headers, "gpu_mb"], rows)
    total = found["total"]
    print(
        f"total: {total['tasks']} task(s), {total['attempts']} attempt(s), {_duration(total['wall_s'])} wall "
        f"of {_duration(total['requested_wall_s'])} requested, {total['cpu_s']:.0f} CPU s"
    )
    if found["suggestion"]:
        print("next submission: resources: " + json.dumps(found["suggestion"]))
    if found["note"]:
        print(f"note: {found['note']}", file=sys.stderr)


def _registry_for(args, target: str | None):
    """Registry URL and experiment name from TARGET: an experiment folder, a spec file, or a name."""
    if target:
        path = Path(target)
        if (path / PLAN).exists():
            exp = Experiment.load(path)
            return open_registry(runtime_url(exp.registry_url)), exp.name
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            from .launch.submit import output_root_for

            spec = load_spec(path)
            root = output_root_for(spec, args.output_root)
            return open_registry(resolve_url(spec.resolved["registry"].get("url"), root)), spec.experiment
    root = Path(args.output_root or DEFAULT_OUTPUT_ROOT).expanduser().resolve()
    return open_registry(args.registry or resolve_url(None, root)), target


def _check_registry(registry) -> None:
    if registry.url.startswith("sqlite:///") and not Path(registry.url[len("sqlite:///") :]).exists():
        raise FileNotFoundError(
            f"no registry at {registry.url}: nothing submitted there yet "
            f"(pass --output-root or --registry, or an experiment folder)"
        )


def _status_table(runs, scheduler: dict[tuple[str, int], tuple[str, str | None]] | None = None, asked="") -> None:
    """One line per task; with `scheduler` ((experiment, task) -> (the scheduler's state of its job, what that
    means for the task)) a job column and one headed `asked` (the clusters asked, e.g. slurm), and a task the
    registry still counts as pending/running but whose job the scheduler has ended shows the scheduler's
    verdict."""
    now = time.time()
    headers = ["experiment", "task", "state", "attempts", "step", "loss", "elapsed"]
    rows = []
    for r in runs:
        state = r.state
        if state == "running" and r.heartbeat is not None and now - r.heartbeat > STALE_AFTER_S:
            # Alive tasks report at least every flush interval; this one went silent (node failure?).
            state = f"lost?({_duration(now - r.heartbeat)} silent)"
        row = [
            r.experiment,
            r.task_id,
            state,
            r.attempts,
            "-" if r.last_step is None else r.last_step,
            "-" if r.last_loss is None else f"{r.last_loss:.4g}",
            _duration(r.elapsed(now)),
        ]
        if scheduler is not None:
            job_state, verdict = scheduler.get((r.experiment, r.task_index), ("-", None))
            if state in ("pending", "running") and verdict:
                row[2] = verdict
            row += [r.job_id or "-", job_state]
        rows.append(row)
    _table(headers + (["job", asked] if scheduler is not None else []), rows)


STALE_AFTER_S = 600  # a running task that has not reported for this long is shown as lost


def _scheduler_states(registry, runs) -> tuple[dict[tuple[str, int], tuple[str, str | None]] | None, str]:
    """Each run's job as its experiment's own launcher sees it (None when no launcher has a scheduler to ask),
    and the names of the clusters that answered."""
    from .launch.executors import get_launcher

    found: dict[tuple[str, int], tuple[str, str | None]] = {}
    asked: set[str] = set()
    folders = {e.name: Path(e.experiment_dir) for e in registry.experiments()}
    for name in sorted({r.experiment for r in runs}):
        if name not in folders or not (folders[name] / PLAN).exists():
            continue
        launcher = get_launcher(Experiment.load(folders[name]).launch["cluster"])
        with_job = [r for r in runs if r.experiment == name and r.job_id]
        states = launcher.states([r.job_id for r in with_job]) if with_job else None
        if states is not None:
            asked.add(launcher.name)
        for r in with_job if states is not None else []:
            state = states.get(r.job_id, "-")
            found[(name, r.task_index)] = (state, launcher.ended_as(state))
    return found or None, "/".join(sorted(asked))


def cmd_status(args) -> int:
    from .launch.liveness import reap_lost

    registry, name = _registry_for(args, args.experiment)
    _check_registry(registry)
    runs = registry.runs(name)
    if name and not runs:
        print(f"no runs of experiment '{name}' in {registry.url}", file=sys.stderr)
        return 1
    lost = {
        (e, i)
        for e in {r.experiment for r in runs}
        for i in reap_lost(registry, e, [r for r in runs if r.experiment == e])
    }
    if lost:  # processes of this machine that died without a word (SIGKILL, out of memory)
        runs = registry.runs(name)
        for experiment, index in sorted(lost):
            print(
                f"note: task {index} of {experiment} was running but its process is gone: marked failed (lost)",
                file=sys.stderr,
            )
    if args.json:
        now = time.time()
        print(json.dumps([_run_json(r, now) for r in runs], indent=2))
        return 0
    _status_table(runs, *_scheduler_states(registry, runs))
    for r in runs:
        if r.state == "failed" and r.error:
            print(f"{r.task_id} failed: {failure_reason(r.error)}")
            print(
                f"  log: holly-hpc logs {shlex.quote(str(Path(r.out_dir).parent.parent))} --task {r.task_index} --stderr"
            )
    return 0


def failure_reason(error: str) -> str:
    """A traceback (or a note) as one line: its last line, the exception type and message."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return lines[-1] if lines else error


def _run_json(r, now: float) -> dict:
    return {
        "experiment": r.experiment,
        "task": r.task_index,
        "task_id": r.task_id,
        "state": r.state,
        "attempts": r.attempts,
        "step": r.last_step,
        "loss": r.last_loss,
        "elapsed_s": r.elapsed(now),
        "job_id": r.job_id,
        "error": r.error,
        "reason": failure_reason(r.error) if r.state == "failed" and r.error else None,
        "folder": r.out_dir,
    }


def cmd_cancel(args) -> int:
    """Cancel exactly the experiment's unfinished tasks (or one of them): the launcher stops their processes
    (scancel on SLURM; SIGTERM to the local process, which checkpoints at its next step boundary) and waits
    until they have ended; only then does the registry mark them cancelled."""
    from .launch.executors import get_launcher

    exp = _experiment_from(args, args.experiment)
    registry = open_registry(runtime_url(exp.registry_url))
    runs = [r for r in registry.runs(exp.name) if args.task is None or r.task_index == args.task]
    if args.task is not None and not runs:
        print(f"error: experiment {exp.name} has no task {args.task}", file=sys.stderr)
        return 1
    targets = [r for r in runs if r.state in ("pending", "running")]
    stopped = get_launcher(exp.launch["cluster"]).cancel(exp, registry, targets, args.grace)
    now = {r.task_index: r.state for r in registry.runs(exp.name)}
    for s in stopped:
        if s.ended and now.get(s.task_index) in ("pending", "running", "cancelled"):
            registry.set_state(exp.name, s.task_index, "cancelled", f"holly-hpc cancel: {s.detail}")
        state = (
            now.get(s.task_index)
            if now.get(s.task_index) == "succeeded"
            else ("cancelled" if s.ended else "NOT stopped")
        )
        print(f"task {s.task_index}: {state}: {s.detail}")
    unverified = [s for s in stopped if not s.ended]
    done = len(stopped) - len(unverified)
    print(
        f"cancelled {done} task(s) of {exp.name}"
        + (f"; {len(unverified)} could not be verified to end" if unverified else "")
    )
    return 1 if unverified else 0


def cmd_sbatch(args) -> int:
    from .launch.sbatch import render_scripts, write_scripts
    from .launch.submit import check_writable, prepare

    output = Path(args.output) if args.output else None
    scripts: list = []

    def render(experiment) -> None:  # before anything is frozen: a script that cannot be written stops it all
        max_array = args.max_array_size or _cluster_max_array_size()
        target = output or Path(f"{experiment.name}.sbatch")
        check_writable(target.resolve().parent)
        scripts.extend(render_scripts(experiment, [t.index for t in experiment.tasks], target, max_array))
        if shutil.which("sbatch"):
            from .launch.slurm import test_only

            test_only(scripts[0][1])

    sub, _ = prepare(args.spec, cluster="slurm", output_root=args.output_root, check=render, launcher_check=False)
    paths = write_scripts(scripts, sub.experiment)
    total = len(sub.experiment.tasks)
    print(
        f"experiment {sub.experiment.name}: {total} task(s), "
        f"{sum(why == 'succeeded' for why in sub.skipped.values())} already succeeded"
    )
    for path in paths:
        print(f"wrote {path}: submit it with  sbatch {path}")
    return 0


def _cluster_max_array_size() -> int:
    from .launch.slurm import SlurmError, max_array_size

    try:
        return max_array_size()
    except (SlurmError, OSError):
        print(
            "note: scontrol unavailable here; assuming SLURM's default MaxArraySize 1001 "
            "(pass --max-array-size to change)",
            file=sys.stderr,
        )
        return 1001


def cmd_preflight(args) -> int:
    from .experiment import resolved_container
    from .launch.apptainer import format_problems, preflight

    spec = load_spec(args.spec)
    container = resolved_container(spec)  # the same image path the jobs will use
    if not container:
        print(f"{args.spec}: no container section: tasks run in this Python environment ({sys.executable})")
        return 0
    problems = preflight(container, gpus=spec.resolved["resources"]["gpus_per_node"] > 0)
    if problems:
        print(format_problems(problems), file=sys.stderr)
        return 1
    print(f"{args.spec}: container {container['image']} OK (Python, holly_hpc and torch match this host)")
    return 0


def cmd_list(args) -> int:
    registry, _ = _registry_for(args, None)
    _check_registry(registry)
    exps = registry.experiments()
    if args.state:
        exps = [e for e in exps if e.counts.get(args.state)]
    if args.since:
        since = _parse_since(args.since)
        exps = [e for e in exps if e.created >= since]
    if args.json:
        rows = [
            {"experiment": e.name, "created": e.created, "tasks": sum(e.counts.values()), "counts": dict(e.counts),
             "folder": e.experiment_dir}
            for e in exps
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    _table(
        ["experiment", "created", "tasks", *list(STATES), "folder"],
        [
            [
                e.name,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)),
                sum(e.counts.values()),
                *(e.counts.get(s, 0) for s in STATES),
                e.experiment_dir,
            ]
            for e in exps
        ],
    )
    return 0


def _parse_since(text: str) -> float:
    """'3d', '12h', '30m' ago, or a date/time like 2026-11-01 or 2026-11-01T08:00."""
    import datetime as dt
    import re

    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if match:
        seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return time.time() - float(match.group(1)) * seconds
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"--since {text!r}: expected an age like 3d, 12h, 30m or a date like 2026-11-01") from None


def cmd_runs(args) -> int:
    """The tasks of an experiment with their overrides and final metrics, best first."""
    import csv
    import io

    exp = _experiment_from(args, args.experiment)
    registry = open_registry(runtime_url(exp.registry_url))
    overrides = {t.index: t.overrides for t in exp.tasks}
    rows = []
    for r in registry.runs(exp.name):
        row = {
            "task": r.task_id,
            "state": r.state,
            **dict(overrides.get(r.task_index, {}).items()),
            **{f"metric:{k}": v for k, v in (r.final_metrics or {}).items()},
        }
        rows.append(row)
    if args.sort:
        key = args.sort if args.sort.startswith("metric:") or args.sort in ("task", "state") else f"metric:{args.sort}"
        missing = [r for r in rows if r.get(key) is None]
        ranked = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r[key], reverse=args.desc)
        rows = ranked + missing  # tasks without the metric (unfinished) last
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        print(out.getvalue(), end="")
    else:
        _table(columns, [[_cell(r.get(c)) for c in columns] for r in rows])
    return 0


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_show(args) -> int:
    """Everything about one run: config, provenance, attempts, final metrics, paths."""
    exp = _experiment_from(args, args.experiment)
    registry = open_registry(runtime_url(exp.registry_url))
    (run,) = [r for r in registry.runs(exp.name) if r.task_index == args.task] or [None]
    if run is None:
        print(f"error: experiment {exp.name} has no task {args.task}", file=sys.stderr)
        return 1
    details = registry.experiment_details(exp.name) or {}
    report = {
        "run": {
            "experiment": exp.name,
            "task": run.task_id,
            "index": run.task_index,
            "state": run.state,
            "job_id": run.job_id,
            "last_step": run.last_step,
            "last_loss": run.last_loss,
            "error": run.error,
        },
        "paths": {
            "task_dir": run.out_dir,
            "experiment_dir": str(exp.root),
            "tensorboard": f"{run.out_dir}/tb",
            "outputs": f"{run.out_dir}/outputs.zarr",
            "final": f"{run.out_dir}/final",
        },
        "overrides": exp.task(run.task_index).overrides,
        "config": registry.run_config(exp.name, run.task_index),
        "provenance": {k: details.get(k) for k in (*PROVENANCE, "spec_hash")},
        "attempts": registry.attempts(exp.name, run.task_index),
        "final_metrics": run.final_metrics,
    }
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_registry(args) -> int:
    from .registry.spool import SPOOL_FILE, replay_spool

    if args.action == "sync":
        exp = _experiment_from(args, args.target)
        registry = open_registry(runtime_url(exp.registry_url))
        spools = sorted((exp.root / "tasks").glob(f"*/{SPOOL_FILE}"))
        restore = functools.partial(restore_registry, registry, exp)
        results = [(p, replay_spool(registry, p, restore)) for p in spools]
        sent, total = sum(r.sent for _, r in results), sum(r.total for _, r in results)
        left = [(p, r) for p, r in results if not r.done]
        restored = (
            " (the experiment's rows were missing: written again from its folder)"
            if any(r.restored for _, r in results)
            else ""
        )
        unreadable = sum(r.unreadable for _, r in results)
        cut = f"; {unreadable} unreadable line(s) moved to *.unreadable" if unreadable else ""
        print(
            f"replayed {sent} of {total} spooled write(s) from {len(spools)} spool file(s) into {registry.url}"
            f"{restored}{cut}"
        )
        for p, r in left:
            print(
                f"kept {p}: {r.total - r.sent - r.unreadable} write(s) not written: {redact(r.error or '?')}",
                file=sys.stderr,
            )
        return 1 if left else 0
    url = (
        args.target
        or os.environ.get("HOLLY_REGISTRY_URL")
        or resolve_url(None, Path(args.output_root or DEFAULT_OUTPUT_ROOT))
    )
    registry = open_registry(url)
    applied = registry.migrate()
    versions = registry.schema_versions()
    print(
        f"{registry.url}: schema version {versions[-1]}"
        + (f" (applied {', '.join(map(str, applied))})" if applied else " (up to date)")
    )
    return 0


def cmd_logs(args) -> int:
    exp = _experiment_from(args, args.experiment)
    logs = sorted(exp.submitit_dir.glob("*_log.out" if not args.stderr else "*_log.err"), key=os.path.getmtime)
    mine = [p for p in logs if _log_belongs_to(p, exp, args.task)]
    # Scripts from `holly-hpc sbatch` log to <experiment>/slurm-logs/<array>_<task>.out, named by the job ids
    # the task's attempts recorded.
    registry = open_registry(runtime_url(exp.registry_url))
    for attempt in registry.attempts(exp.name, args.task):
        path = exp.root / "slurm-logs" / f"{attempt['job_id']}.{'err' if args.stderr else 'out'}"
        if attempt["job_id"] and path.exists() and path not in mine:
            mine.append(path)
    if not mine:
        print(f"no logs for task {args.task} under {exp.submitit_dir}", file=sys.stderr)
        return 1
    for p in mine:
        print(f"==> {p} <==")
        print(p.read_text(encoding="utf-8", errors="replace"), end="")
    return 0


def _log_belongs_to(log: Path, exp: Experiment, task_index: int) -> bool:
    """submitit names logs by job id; the job's submitted pickle names the TaskRunner's task index."""
    job_id = log.name.rsplit("_", 2)[0]
    pickle = exp.submitit_dir / f"{job_id}_submitted.pkl"
    if not pickle.exists():
        return False
    import submitit

    delayed = submitit.helpers.DelayedSubmission.load(pickle)
    return getattr(delayed.function, "task_index", None) == task_index


def _experiment_from(args, target: str) -> Experiment:
    """An experiment folder, or a name looked up in the registry."""
    path = Path(target)
    if (path / PLAN).exists():
        return Experiment.load(path)
    registry, _ = _registry_for(args, target)
    _check_registry(registry)
    match = [e for e in registry.experiments() if e.name == target]
    if not match:
        raise FileNotFoundError(
            f"no experiment folder or registered experiment named '{target}' (registry {registry.url})"
        )
    return Experiment.load(match[0].experiment_dir)


def _task_from(args) -> tuple[Experiment | None, int]:
    """RUN as a task folder, or an experiment (folder or name) with --task N."""
    target = Path(args.run)
    if (target / "checkpoints").is_dir() and (target.parent.parent / PLAN).exists():
        exp = Experiment.load(target.parent.parent)  # a task folder: <experiment>/tasks/<id>
        return exp, next(t.index for t in exp.tasks if exp.root / t.rel_dir == target.resolve())
    if args.task is None:
        print("error: give a task folder, or an experiment with --task N", file=sys.stderr)
        return None, 0
    return _experiment_from(args, args.run), args.task


def cmd_eval(args) -> int:
    from .runtime.evaluate import evaluate_task

    exp, index = _task_from(args)
    if exp is None:
        return 1
    metrics = evaluate_task(exp, index)
    print(
        f"task {exp.task(index).task_id} at step {metrics.pop('step')}: outputs rewritten in {exp.task_dir(index) / 'final'}"
    )
    _table(["metric", "value"], [[k, f"{v:.6g}"] for k, v in metrics.items()])
    return 0


def cmd_embed(args) -> int:
    import zarr

    from .embed.data import SPLITS
    from .embed.export import readouts_of, write_table
    from .embed.infer import embed_new_images

    exp, index = _task_from(args)
    if exp is None:
        return 1
    if args.input is None:  # the run's own images, every split
        if not args.table:
            print(
                "error: give --input to embed new images, or --table to write the run's own embeddings", file=sys.stderr
            )
            return 2
        store = exp.task_dir(index) / "outputs.zarr"
        if not (store / "embeddings").exists():
            print(f"error: {store} has no embeddings yet (the task writes them when it finishes)", file=sys.stderr)
            return 1
        group = zarr.open_group(str(store), mode="r")
        parts = [(split, group[f"embeddings/{split}"]) for split in SPLITS if split in group["embeddings"]]
    else:
        output = (
            Path(args.output) if args.output else Path(args.input).with_name(Path(args.input).name + ".embeddings.zarr")
        )
        summary = embed_new_images(
            exp,
            index,
            Path(args.input),
            output,
            labels=args.labels,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            device=args.device,
            skip_bad=True if args.skip_bad else None,
        )
        print(
            f"{summary['embedded']} image(s) embedded, {summary['skipped']} skipped, dimension {summary['dim']}, "
            f"checkpoint step {summary['step']}"
        )
        parts = [("input", zarr.open_group(str(output), mode="r")["embeddings"])]
        print(f"embeddings: {summary['output']} (embeddings/embedding, features, index, id, label)")
    readouts = readouts_of(parts[0][1])
    print("readouts: " + ", ".join(f"{name} ({dim})" for name, dim in readouts.items()))
    if args.table:
        rows = write_table(Path(args.table), parts, overwrite=args.overwrite)
        print(
            f"table: {args.table} ({rows} rows: split, index, id, label, "
            + ", ".join(f"{n}_0…" for n in readouts)
            + ")"
        )
    return 0


def cmd_sample(args) -> int:
    from .gan.sample import sample_from_run

    exp, index = _task_from(args)
    if exp is None:
        return 1
    summary = sample_from_run(
        exp, index, args.n, args.code, args.seed, Path(args.output), overwrite=args.overwrite, device=args.device
    )
    fixed = ", ".join(f"{k}={v}" for k, v in summary["fixed"].items()) or "none"
    print(
        f"{summary['images']} image(s) from checkpoint step {summary['step']} (fixed codes: {fixed}) -> {summary['output']}"
    )
    return 0


def cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(f"holly_hpc.bench.{args.what}").main(args.rest)


def cmd_reference(args) -> int:
    from .specdoc import reference_markdown

    print(reference_markdown(), end="")
    return 0


# -------------------------------------------------------------------------------------------- parser
def _lookup_options(p: argparse.ArgumentParser) -> None:
    """Where commands that take an experiment *name* find the registry that knows it."""
    p.add_argument("--output-root", help=f"where to find the default registry (default: ./{DEFAULT_OUTPUT_ROOT})")
    p.add_argument("--registry", help="registry URL (default: $HOLLY_REGISTRY_URL, then <output-root>/registry.sqlite)")


def _run_options(p: argparse.ArgumentParser) -> None:
    """RUN as a task folder, or an experiment (folder or name) with --task N (see _task_from)."""
    p.add_argument("run", metavar="RUN", help="a task folder, or an experiment (folder or name) with --task")
    p.add_argument("--task", type=int, help="task index, when RUN is an experiment")
    _lookup_options(p)


def _cluster_names() -> list[str]:
    """launch.cluster's names, from the schema (which tests keep equal to launch.executors.LAUNCHERS)."""
    from .resources import schema_file

    schema = json.loads(schema_file("jobspec.schema.json").read_text(encoding="utf-8"))
    return schema["$defs"]["launch"]["properties"]["cluster"]["enum"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="holly-hpc", description="Train microscopy models from YAML job specs, locally or on SLURM."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"holly-hpc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check specs against the schema and semantic rules")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("--json", action="store_true", help="print each spec's result and problems as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show the tasks a spec expands to, without running anything")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--output-root", help="override the spec's output_root")
    p.add_argument("--json", action="store_true", help="print the tasks as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("submit", help="freeze the spec and launch its tasks as one job array")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--cluster", choices=_cluster_names(), help="override launch.cluster")
    p.add_argument("--output-root", help="override the spec's output_root")
    p.add_argument("--wait", action="store_true", help="block until the tasks end, printing progress")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="one line per task: state, attempts, step, loss, elapsed")
    p.add_argument(
        "experiment",
        nargs="?",
        metavar="EXPERIMENT",
        help="experiment name, experiment folder or spec file (default: every experiment)",
    )
    _lookup_options(p)
    p.add_argument("--json", action="store_true", help="print the tasks as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", help="one line per experiment with its task counts by state")
    p.add_argument("--state", choices=STATES, help="only experiments with tasks in this state")
    p.add_argument("--since", help="only experiments created since: an age (3d, 12h, 30m) or a date (2026-11-01)")
    _lookup_options(p)
    p.add_argument("--json", action="store_true", help="print the experiments as JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("report", help="requested vs used wall time, CPU and memory per task, and what to ask next")
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment name or folder")
    _lookup_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("logs", help="print a task's stdout (or stderr) files")
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment name or folder")
    p.add_argument("--task", type=int, required=True, help="task index")
    p.add_argument("--stderr", action="store_true", help="print stderr instead of stdout")
    _lookup_options(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("runs", help="an experiment's tasks with overrides and final metrics, sorted")
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment name or folder")
    p.add_argument("--sort", help="metric:KEY (or KEY) to sort by, ascending (best first for errors)")
    p.add_argument("--desc", action="store_true", help="sort descending (best first for scores)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    _lookup_options(p)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("show", help="one run: config, provenance, attempts, final metrics, paths (JSON)")
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment name or folder")
    p.add_argument("--task", type=int, required=True, help="task index")
    _lookup_options(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("registry", help="registry maintenance: init, migrate, sync")
    p.add_argument("action", choices=["init", "migrate", "sync"])
    p.add_argument(
        "target",
        nargs="?",
        metavar="URL|EXPERIMENT",
        help="init/migrate: registry URL (default $HOLLY_REGISTRY_URL, then ./runs/registry.sqlite); sync: experiment",
    )
    _lookup_options(p)
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser(
        "cancel", help="cancel an experiment's unfinished tasks (scancel on SLURM) and wait until they end"
    )
    p.add_argument("experiment", metavar="EXPERIMENT", help="experiment name or folder")
    p.add_argument("--task", type=int, help="only this task index")
    p.add_argument(
        "--grace",
        type=float,
        default=60.0,
        help="seconds a task may take to checkpoint and stop before it is killed (default 60)",
    )
    _lookup_options(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("sbatch", help="freeze the spec and write a standalone sbatch array script")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("-o", "--output", help="script path (default: <experiment>.sbatch)")
    p.add_argument("--output-root", help="override the spec's output_root")
    p.add_argument("--max-array-size", type=int, help="split arrays above this size (default: scontrol's MaxArraySize)")
    p.set_defaults(func=cmd_sbatch)

    p = sub.add_parser("preflight", help="check the spec's container before anything is queued")
    p.add_argument("spec", metavar="SPEC")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("eval", help="recompute a finished task's metrics and pictures from its checkpoint")
    _run_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("embed", help="embed new images (folder of TIFF/PNG, zarr, OME-Zarr) with a trained embed task")
    _run_options(p)
    p.add_argument(
        "--input", help="folder of images, zarr group (array 'images') or OME-Zarr image (default: none, see --table)"
    )
    p.add_argument(
        "--table",
        help="also write one CSV of every image (split, id, label, every readout); without --input: the run's own",
    )
    p.add_argument("--output", help="zarr store to write (default: <input>.embeddings.zarr beside the input)")
    p.add_argument("--labels", default="none", help="labels of a folder input: none, folders, or a CSV file,label")
    p.add_argument(
        "--skip-bad", action="store_true", help="leave unreadable images out (default: as the run's spec says)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    p.add_argument(
        "--batch-size", type=int, help="images per forward pass (default: the spec's train.embed_batch_size)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the spec's device)")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("sample", help="draw images from a trained generate (InfoGAN) task")
    _run_options(p)
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument(
        "--code",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="fix a code for every image, e.g. cat0=3 or cont1=-1.5 (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and of the codes left free")
    p.add_argument("--output", default="samples.png", help="a .png grid or a .zarr store (default samples.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the spec's device)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "bench",
        help="benchmarks: render (fast vs dense renderer), train (reconstruct images/s), "
        "embed (VQ-VAE images/s vs a plain loop), registry (concurrent writers), "
        "methods (reconstruct's method options on realistic particles)",
    )
    p.add_argument("what", choices=["render", "train", "embed", "registry", "methods", "ssl"])
    p.add_argument(
        "rest", nargs=argparse.REMAINDER, help="the benchmark's own options (see: holly-hpc bench WHAT --help)"
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("reference", help="print the spec reference (markdown) generated from the schema")
    p.set_defaults(func=cmd_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .launch.slurm import SlurmError
    from .registry import MissingRows

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader left (`holly-hpc runs | head`): no traceback, and nothing more to write to it. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for SIGPIPE
    except SpecError as exc:
        print(f"{len(exc.problems)} problem(s) in the spec:", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return 1
    except OSError as exc:  # one line naming the path and the cause: a read-only mount, no permission, disk full
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {redact(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 1
    except (ValueError, ConnectionError, ExperimentMismatch, SlurmError, MissingRows) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
