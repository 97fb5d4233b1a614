"""Apptainer: the command that runs a task's Python inside the spec's image, and a preflight check.

submitit pickles the task on the submitting host and unpickles it inside the container, so the
container must hold the same Python (major.minor), holly_hpc and torch; `preflight` checks this
before anything is submitted, with the same command the jobs will use.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Runs inside the image: one JSON line with the versions that must match the host's. A missing or
# broken module prints null rather than failing, so every mismatch is reported in one go.
PROBE = """\
import json, platform
def version(name):
    try:
        return __import__(name).__version__
    except Exception:
        return None
print(json.dumps({"python": platform.python_version(), "holly_hpc": version("holly_hpc"), "torch": version("torch")}))
"""

STDERR_LINES = 10  # how much of a failing probe's stderr a problem quotes


def container_command(container: dict, gpus: bool) -> list[str]:
    """argv prefix that runs `python` inside container["image"].

    No --cleanenv: the host environment is kept on purpose, since the task inside needs SLURM_*
    (array index, requeue, distributed set-up) and SUBMITIT_* variables. The image's %environment
    still overrides what it sets (PYTHONNOUSERSITE, locale).
    """
    image = container.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError("container.image: expected the path of a .sif image")
    argv = ["apptainer", "exec"]
    if gpus:
        argv.append("--nv")  # bind the host's NVIDIA driver libraries and devices
    for i, bind in enumerate(container.get("binds", [])):
        # apptainer reads "a,b" as two binds, so a comma cannot be part of a path
        if not isinstance(bind, str) or not bind or "," in bind:
            raise ValueError(f"container.binds[{i}]: expected SRC[:DST[:OPTS]] without commas, got {bind!r}")
        argv += ["--bind", bind]
    for key, value in container.get("env", {}).items():
        argv += ["--env", _env_arg(key, value)]
    return [*argv, image, "python"]


def _env_arg(key: str, value) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        text = "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        text = str(value)
    else:
        raise ValueError(f"container.env.{key}: expected a string, number or boolean, got {value!r}")
    # apptainer parses --env with pflag's StringToString: with one '=' it strips '"' from both ends;
    # with more it reads the argument as a CSV record (',' splits it, '"' is an error, a newline
    # ends it). Refuse what it would change rather than run with a different value.
    if text.startswith('"') or text.endswith('"') or ("=" in text and any(c in text for c in ',"\n\r')):
        raise ValueError(
            f"container.env.{key}: apptainer's --env cannot pass {text!r} unchanged "
            f"(a value with '=' cannot hold ',', '\"' or a newline, nor start or end with '\"')"
        )
    return f"{key}={text}"


def container_python(container: dict, gpus: bool) -> str:
    """container_command as one shell word list, for submitit's `python=`: submitit pastes it into
    a shell command line, so every element is quoted (paths and values may hold spaces, $, ;)."""
    return shlex.join(container_command(container, gpus))


@dataclass
class PreflightProblem:
    what: str  # short name of what is wrong: apptainer, image, container, python, holly_hpc, torch
    detail: str  # one sentence a user can act on


def preflight(container: dict, gpus: bool = False, timeout_s: float = 120) -> list[PreflightProblem]:
    """Every problem found with running tasks in this container (an empty list: ready)."""
    problems = []
    if shutil.which("apptainer") is None:
        problems.append(
            PreflightProblem("apptainer", "no 'apptainer' executable on PATH (on a cluster: module load apptainer)")
        )
    image = container.get("image")
    if isinstance(image, str) and image:  # otherwise container_command below says what is wrong
        if not Path(image).exists():
            problems.append(PreflightProblem("image", f"{image} does not exist (build it: see containers/README.md)"))
        elif not Path(image).is_file():
            problems.append(PreflightProblem("image", f"{image} is not a regular file (expected a .sif image)"))
    try:
        argv = [*container_command(container, gpus), "-c", PROBE]
    except ValueError as exc:
        problems.append(PreflightProblem("container", str(exc)))
        return problems
    if problems:  # the probe cannot run without apptainer and an image
        return problems
    versions, problem = _probe(argv, timeout_s)
    return [problem] if problem else _compare(versions)


def _probe(argv: list[str], timeout_s: float) -> tuple[dict | None, PreflightProblem | None]:
    # Own session, so a timeout kills apptainer and everything it started, not just the first process.
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        return None, PreflightProblem("container", f"could not start apptainer: {exc}")
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it may have ended just now
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, PreflightProblem("container", f"the probe did not finish within {timeout_s:g} s{_tail(err)}")
    if proc.returncode != 0:
        return None, PreflightProblem("container", f"the probe exited with status {proc.returncode}{_tail(err)}")
    # The JSON is the last line: the image's start-up may print banners before it.
    lines = [line for line in out.splitlines() if line.strip()]
    try:
        versions = json.loads(lines[-1]) if lines else None
    except ValueError:
        versions = None
    if not isinstance(versions, dict):
        return None, PreflightProblem(
            "container", f"the probe printed no version JSON (stdout: {out.strip()[-300:]!r}){_tail(err)}"
        )
    return versions, None


def _tail(stderr: str | None) -> str:
    lines = (stderr or "").strip().splitlines()[-STDERR_LINES:]
    return "; stderr:\n    " + "\n    ".join(lines) if lines else "; no stderr"


def host_versions() -> dict:
    from .. import __version__

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {"python": platform.python_version(), "holly_hpc": __version__, "torch": torch_version}


def _compare(image: dict) -> list[PreflightProblem]:
    host = host_versions()
    problems = []
    py_image, py_host = image.get("python"), host["python"]
    if not py_image or str(py_image).split(".")[:2] != py_host.split(".")[:2]:
        problems.append(
            PreflightProblem(
                "python",
                f"Python {py_image} in the image, {py_host} on this host: "
                "submitit's pickles need the same major.minor version",
            )
        )
    for name, same in (
        ("holly_hpc", lambda a, b: a == b),
        ("torch", lambda a, b: a.split("+")[0] == b.split("+")[0]),
    ):  # +cu126 / +cpu builds match
        mine, theirs = host[name], image.get(name)
        if theirs is None:
            problems.append(PreflightProblem(name, f"{name} cannot be imported in the image (host has {mine})"))
        elif mine is not None and not same(str(theirs), mine):
            problems.append(PreflightProblem(name, f"{name} {theirs} in the image, {mine} on this host"))
    return problems


def format_problems(problems: list[PreflightProblem]) -> str:
    if not problems:
        return "container preflight: OK"
    lines = [f"container preflight: {len(problems)} problem(s)"]
    lines += [f"  {p.what}: {p.detail}" for p in problems]
    return "\n".join(lines)
