"""SLURM's command-line tools, wrapped: cluster limits, job states, cancelling, and the spec's resources as
sbatch parameters. Every call names the command when it fails."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile

from ..runtime.preemption import REQUEUE_EXIT_CODE
from ..spec_values import control_character

SIGNAL_DELAY_S = 90  # SIGUSR2 this long before the time limit: time to finish a step and checkpoint


class SlurmError(RuntimeError):
    pass


class UnsafeDirective(ValueError):
    """A value that would not stay inside its #SBATCH line."""


def refuse_unsafe(parameters: dict, *texts: str) -> None:
    """Second line of defence (validate already refuses such specs): no parameter key or value, nor any of
    `texts` (the folder and command put in the script), may hold a control character. Inside an #SBATCH
    line a newline ends the comment and starts a shell command, and no quoting helps in a comment."""

    def check(where: str, text: str) -> None:
        bad = control_character(text)
        if bad:
            raise UnsafeDirective(
                f"{where}: control character {bad} in {text[:80]!r}: refused, it would break out of "
                "its line of the batch script"
            )

    for key, value in parameters.items():
        check(f"sbatch option {str(key)[:40]!r}", str(key))
        if isinstance(value, dict):
            refuse_unsafe(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                check(f"sbatch option {key}", str(item))
        else:
            check(f"sbatch option {key}", str(value))
    for text in texts:
        check("batch script", str(text))


def _run(argv: list[str], timeout: float = 60) -> str:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]} not found on PATH: is this a SLURM login node (or is slurm-client installed)?")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SlurmError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def max_array_size() -> int:
    """The cluster's MaxArraySize: array indices must stay below it."""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", _run(["scontrol", "show", "config"]), flags=re.M)
    if not match:
        raise SlurmError("scontrol show config did not report MaxArraySize")
    return int(match.group(1))


def chunks(indices: list[int], size: int) -> list[list[int]]:
    """Split task indices into arrays of at most `size` elements (each array indexes from 0)."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def job_states(job_ids: list[str]) -> dict[str, str]:
    """State per job id (ARRAYID_TASKID or plain), from sacct; squeue fills in jobs sacct does not know yet."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    try:
        out = _run(
            [
                "sacct",
                "-n",
                "-P",
                "-X",
                "--format=JobID,State",
                "-j",
                ",".join(sorted({j.split("_")[0] for j in job_ids})),
            ]
        )
    except SlurmError:
        out = ""  # a cluster without accounting: squeue still knows the jobs that are queued or running
    for line in out.splitlines():
        if "|" in line:
            job, state = line.split("|", 1)
            for one in expand_array_ids(job):
                states[one] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    missing = [j for j in job_ids if j not in states]
    if missing:
        out = _run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(sorted({j.split("_")[0] for j in missing}))])
        for line in out.splitlines():
            if "|" in line:
                job, state = line.split("|", 1)
                for one in expand_array_ids(job):
                    states.setdefault(one, state)
    return {j: states.get(j, "UNKNOWN") for j in job_ids}


def expand_array_ids(job: str) -> list[str]:
    """'12_[0-2,5%2]' (pending array elements, as sacct/squeue print them) -> ['12_0', '12_1', '12_2', '12_5']."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job)
    if not match:
        return [job]
    out = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        out += [f"{match.group(1)}_{i}" for i in range(int(low), int(high or low) + 1)]
    return out


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])


OPTIONAL_OPTIONS = ("partition", "account", "qos", "cpus_per_task", "mem", "constraint")  # resources.<key> as is


def resource_options(resources: dict) -> dict:
    """The spec's resources as sbatch long options, named as submitit names them (underscores for dashes):
    the one map that both submissions through submitit and the exported scripts' #SBATCH lines are made of."""
    options = {
        "time": max(1, round(resources["time"])),
        "nodes": resources["nodes"],
        "ntasks_per_node": resources["tasks_per_node"],
    }
    if resources.get("gpus_per_node"):
        options["gpus_per_node"] = resources["gpus_per_node"]
    options.update({key: resources[key] for key in OPTIONAL_OPTIONS if resources.get(key) is not None})
    return options


def extra_options(resources: dict) -> dict:
    """resources.extra, passed to sbatch as given (True: a flag without a value), with --requeue by default."""
    extra = dict(resources.get("extra") or {})
    extra.setdefault("requeue", True)
    return extra


def sbatch_flag(option: str, value) -> str:
    """One #SBATCH line, written as submitit writes its own: underscores become dashes, True is a bare flag."""
    option = option.replace("_", "-")
    return f"#SBATCH --{option}" if value is True else f"#SBATCH --{option}={shlex.quote(str(value))}"


def sbatch_parameters(resources: dict, array_parallelism: int) -> dict:
    """The spec's resources as submitit SlurmExecutor parameters."""
    params = {
        **resource_options(resources),
        "array_parallelism": array_parallelism,
        "signal_delay_s": SIGNAL_DELAY_S,
        # The task exits with REQUEUE_EXIT_CODE after checkpointing on SIGUSR2; this runs on the host (outside
        # any container), where scontrol exists.
        "teardown": requeue_teardown(),
        "additional_parameters": extra_options(resources),
    }
    refuse_unsafe(params)
    return params


def test_only(script_text: str) -> None:
    """`sbatch --test-only`: the cluster checks the script's options (partition, account, QOS, time, memory)
    without queueing anything, so a submission the cluster would refuse is refused before anything is frozen."""
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", prefix="holly-test-only-", delete=False) as fh:
        fh.write(script_text)
    try:
        if shutil.which("sbatch") is None:
            raise SlurmError("sbatch not found on PATH: is this a SLURM login node (or is slurm-client installed)?")
        done = subprocess.run(
            ["sbatch", "--test-only", fh.name], check=False, capture_output=True, text=True, timeout=60
        )
        # sbatch --test-only reports on stderr either way; only the exit status tells.
        if done.returncode != 0:
            raise SlurmError(
                f"the cluster refuses these resources (sbatch --test-only): {(done.stderr or done.stdout).strip()}"
            )
    finally:
        os.unlink(fh.name)


def requeue_teardown() -> list[str]:
    return [
        "holly_rc=$?",
        f'if [ "$holly_rc" -eq {REQUEUE_EXIT_CODE} ]; then',
        '    echo "holly-hpc: task checkpointed after SIGUSR2; requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'exit "$holly_rc"',
    ]


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
    arrays = sorted({j.split("_")[0] for j in job_ids if j})
    if not arrays:
        return {}
    out = _run(["sacct", "-n", "-P", "--format=JobID,State,TotalCPU,MaxRSS", "-j", ",".join(arrays)])
    return parse_sacct(out)
