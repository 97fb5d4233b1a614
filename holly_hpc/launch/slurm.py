"""SLURM's command-line tools, wrapped: cluster limits, job states, cancelling, and the spec's resources as
sbatch parameters. Every call names the command when it fails."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

from ..runtime.preemption import REQUEUE_EXIT_CODE

SIGNAL_DELAY_S = 90  # SIGUSR2 this long before the time limit: time to finish a step and checkpoint


class SlurmError(RuntimeError):
    pass


def _run(argv: list[str], timeout: float = 60) -> str:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]} not found on PATH: is this a SLURM login node (or is slurm-client installed)?")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
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
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def job_states(job_ids: list[str]) -> dict[str, str]:
    """State per job id (ARRAYID_TASKID or plain), from sacct; squeue fills in jobs sacct does not know yet."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    out = _run(["sacct", "-n", "-P", "-X", "--format=JobID,State", "-j", ",".join(sorted({j.split("_")[0] for j in job_ids}))])
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


def sbatch_parameters(resources: dict, array_parallelism: int) -> dict:
    """The spec's resources as submitit SlurmExecutor parameters (names follow sbatch's long options)."""
    params = {
        "time": max(1, int(round(resources["time"]))),
        "nodes": resources["nodes"],
        "ntasks_per_node": resources["tasks_per_node"],
        "array_parallelism": array_parallelism,
        "signal_delay_s": SIGNAL_DELAY_S,
        # The task exits with REQUEUE_EXIT_CODE after checkpointing on SIGUSR2; this runs on the host (outside
        # any container), where scontrol exists.
        "teardown": requeue_teardown(),
    }
    if resources.get("gpus_per_node"):
        params["gpus_per_node"] = resources["gpus_per_node"]
    for key in ("partition", "account", "qos", "cpus_per_task", "mem", "constraint"):
        if resources.get(key) is not None:
            params[key] = resources[key]
    extra = dict(resources.get("extra") or {})
    extra.setdefault("requeue", True)
    params["additional_parameters"] = extra
    return params


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
