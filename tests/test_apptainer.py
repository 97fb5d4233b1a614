"""launch/apptainer.py against a FAKE `apptainer` executable put first on PATH.

Apptainer cannot be installed on the development machines, so these tests cover the command that
is built (and how a shell reads it back) and every error path of the preflight; they never run a
real container.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time

import pytest
import submitit
import torch

import holly_hpc
from holly_hpc.launch.apptainer import (
    PreflightProblem,
    container_command,
    container_python,
    format_problems,
    preflight,
)

HOST_PY = platform.python_version()
HOST_TORCH = torch.__version__.split("+")[0]

# Bodies of the fake apptainer (a bash script).
ECHO_ARGV = f'exec {shlex.quote(sys.executable)} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n'
# Drops "exec ... IMAGE python" and runs the rest (-c PROBE) with this interpreter: the host's own versions.
RUN_PROBE_ON_HOST = f'while [ "$1" != python ]; do shift; done; shift\nexec {shlex.quote(sys.executable)} "$@"\n'


@pytest.fixture
def fake_apptainer(tmp_path, monkeypatch):
    """fake_apptainer(body) writes an executable `apptainer` running `body` and puts it first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()

    def install(body: str):
        exe = bindir / "apptainer"
        exe.write_text("#!/bin/bash\n" + body)
        exe.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
        return exe

    return install


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "holly.sif"
    path.write_bytes(b"not really a SIF")
    return str(path)


def prints(obj) -> str:
    return f"echo {shlex.quote(json.dumps(obj))}\n"


def versions(**changes):
    return {"python": HOST_PY, "holly_hpc": holly_hpc.__version__, "torch": torch.__version__, **changes}


# ---------------------------------------------------------------------------------------- commands
def test_command_minimal_without_gpus():
    assert container_command({"image": "/img/holly.sif"}, gpus=False) == [
        "apptainer",
        "exec",
        "/img/holly.sif",
        "python",
    ]


def test_command_with_gpus_binds_and_env_in_order():
    container = {
        "image": "/img/holly.sif",
        "binds": ["/data", "/scratch:/scratch", "/ref:/ref:ro"],
        "env": {"OMP_NUM_THREADS": 4, "HOLLY_DEBUG": True, "QUIET": False, "LR": 0.5, "NAME": "x y"},
    }
    assert container_command(container, gpus=True) == [
        "apptainer",
        "exec",
        "--nv",
        "--bind",
        "/data",
        "--bind",
        "/scratch:/scratch",
        "--bind",
        "/ref:/ref:ro",
        "--env",
        "OMP_NUM_THREADS=4",
        "--env",
        "HOLLY_DEBUG=true",
        "--env",
        "QUIET=false",
        "--env",
        "LR=0.5",
        "--env",
        "NAME=x y",
        "/img/holly.sif",
        "python",
    ]


def test_container_python_is_the_quoted_command():
    container = {"image": "/img/my image.sif", "env": {"A": "1"}}
    text = container_python(container, gpus=True)
    assert text == "apptainer exec --nv --env A=1 '/img/my image.sif' python"
    assert shlex.split(text) == container_command(container, gpus=True)


NASTY = {
    "image": '/images/it\'s a "sif" $HOME;.sif',
    "binds": ["/data/my dir/it's $HOME; rm -rf x:/in container:ro", '/a"b`id`'],
    "env": {"MSG": 'say "hi" to $USER; echo `id` && exit 1 | cat > /tmp/x', "OPTS": "a=b c", "EMPTY": ""},
}


def test_nasty_values_survive_bash_as_one_argument_each(fake_apptainer):
    fake_apptainer(ECHO_ARGV)
    out = subprocess.run(["bash", "-c", container_python(NASTY, gpus=True)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [
        "exec",
        "--nv",
        "--bind",
        "/data/my dir/it's $HOME; rm -rf x:/in container:ro",
        "--bind",
        '/a"b`id`',
        "--env",
        'MSG=say "hi" to $USER; echo `id` && exit 1 | cat > /tmp/x',
        "--env",
        "OPTS=a=b c",
        "--env",
        "EMPTY=",
        '/images/it\'s a "sif" $HOME;.sif',
        "python",
    ]


def test_submitit_command_line_reaches_apptainer_intact(fake_apptainer, tmp_path):
    """The hook as submitit uses it: python=... pasted in front of `-u -m submitit.core._submit FOLDER`."""
    fake_apptainer(ECHO_ARGV)
    folder = tmp_path / "sub mit"
    executor = submitit.SlurmExecutor(folder=folder, python=container_python(NASTY, gpus=False))
    out = subprocess.run(["bash", "-c", executor._submitit_command_str], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [
        *container_command(NASTY, gpus=False)[1:],
        "-u",
        "-m",
        "submitit.core._submit",
        str(folder),
    ]


@pytest.mark.parametrize(
    "container, message",
    [
        ({}, "container.image: expected the path of a .sif image"),
        ({"image": ""}, "container.image: expected the path of a .sif image"),
        (
            {"image": "/i.sif", "binds": ["/a,/b"]},
            "container.binds[0]: expected SRC[:DST[:OPTS]] without commas, got '/a,/b'",
        ),
        ({"image": "/i.sif", "env": {"L": [1]}}, "container.env.L: expected a string, number or boolean, got [1]"),
        (
            {"image": "/i.sif", "env": {"V": "x,y=z"}},
            "container.env.V: apptainer's --env cannot pass 'x,y=z' unchanged",
        ),
        (
            {"image": "/i.sif", "env": {"V": 'a="b"'}},
            "container.env.V: apptainer's --env cannot pass 'a=\"b\"' unchanged",
        ),
        (
            {"image": "/i.sif", "env": {"V": '"quoted"'}},
            "container.env.V: apptainer's --env cannot pass '\"quoted\"' unchanged",
        ),
    ],
)
def test_command_refuses_what_apptainer_would_misread(container, message):
    with pytest.raises(ValueError) as info:
        container_command(container, gpus=False)
    assert str(info.value).startswith(message)


# --------------------------------------------------------------------------------------- preflight
def test_preflight_ok_when_the_image_has_the_hosts_versions(fake_apptainer, image):
    fake_apptainer(RUN_PROBE_ON_HOST)  # really runs PROBE, with this interpreter
    assert preflight({"image": image, "binds": ["/tmp"], "env": {"A": "1"}}, gpus=True) == []
    assert format_problems([]) == "container preflight: OK"


def test_preflight_passes_the_spec_to_apptainer(fake_apptainer, image):
    """The probe runs with the same command as the jobs, then `-c PROBE`."""
    exe = fake_apptainer('printf "%s\\n" "$@" > "$(dirname "$0")/argv.txt"\n' + prints(versions()))
    container = {"image": image, "binds": ["/scratch:/scratch"], "env": {"K": "v w"}}
    assert preflight(container, gpus=True) == []
    argv = (exe.parent / "argv.txt").read_text().split("\n")
    assert argv[:9] == ["exec", "--nv", "--bind", "/scratch:/scratch", "--env", "K=v w", image, "python", "-c"]
    assert argv[9].startswith("import json, platform")


def test_preflight_no_apptainer_and_no_image_reports_both(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    missing = str(tmp_path / "nope.sif")
    problems = preflight({"image": missing})
    assert problems == [
        PreflightProblem("apptainer", "no 'apptainer' executable on PATH (on a cluster: module load apptainer)"),
        PreflightProblem("image", f"{missing} does not exist (build it: see containers/README.md)"),
    ]
    assert format_problems(problems) == (
        "container preflight: 2 problem(s)\n"
        "  apptainer: no 'apptainer' executable on PATH (on a cluster: module load apptainer)\n"
        f"  image: {missing} does not exist (build it: see containers/README.md)"
    )


def test_preflight_missing_image_does_not_run_the_probe(fake_apptainer, tmp_path):
    exe = fake_apptainer('touch "$(dirname "$0")/ran"\n' + prints(versions()))
    missing = str(tmp_path / "missing.sif")
    assert preflight({"image": missing}) == [
        PreflightProblem("image", f"{missing} does not exist (build it: see containers/README.md)")
    ]
    assert not (exe.parent / "ran").exists()


def test_preflight_image_that_is_a_directory(fake_apptainer, tmp_path):
    fake_apptainer(prints(versions()))
    assert preflight({"image": str(tmp_path)}) == [
        PreflightProblem("image", f"{tmp_path} is not a regular file (expected a .sif image)")
    ]


def test_preflight_bad_spec_is_a_problem_not_an_exception(fake_apptainer, image):
    fake_apptainer(prints(versions()))
    assert preflight({"image": image, "binds": ["/a,/b"]}) == [
        PreflightProblem("container", "container.binds[0]: expected SRC[:DST[:OPTS]] without commas, got '/a,/b'")
    ]


def test_preflight_python_minor_mismatch(fake_apptainer, image):
    major, minor = HOST_PY.split(".")[:2]
    other = f"{major}.{int(minor) + 1}.0"
    fake_apptainer(prints(versions(python=other)))
    assert preflight({"image": image}) == [
        PreflightProblem(
            "python",
            f"Python {other} in the image, {HOST_PY} on this host: "
            "submitit's pickles need the same major.minor version",
        )
    ]


def test_preflight_python_patch_difference_is_fine(fake_apptainer, image):
    major, minor = HOST_PY.split(".")[:2]
    fake_apptainer(prints(versions(python=f"{major}.{minor}.99")))
    assert preflight({"image": image}) == []


def test_preflight_holly_hpc_mismatch(fake_apptainer, image):
    fake_apptainer(prints(versions(holly_hpc="0.0.1")))
    assert preflight({"image": image}) == [
        PreflightProblem("holly_hpc", f"holly_hpc 0.0.1 in the image, {holly_hpc.__version__} on this host")
    ]


def test_preflight_torch_mismatch(fake_apptainer, image):
    fake_apptainer(prints(versions(torch="2.2.0+cu121")))
    assert preflight({"image": image}) == [
        PreflightProblem("torch", f"torch 2.2.0+cu121 in the image, {torch.__version__} on this host")
    ]


@pytest.mark.parametrize("suffix", ["+cu121", "+cu126", "+cpu", ""])
def test_preflight_torch_local_suffix_is_ignored(fake_apptainer, image, suffix):
    fake_apptainer(prints(versions(torch=HOST_TORCH + suffix)))
    assert preflight({"image": image}) == []


def test_preflight_reports_every_mismatch_at_once(fake_apptainer, image):
    fake_apptainer(prints({"python": "2.7.18", "holly_hpc": None, "torch": "1.0.0"}))
    problems = preflight({"image": image})
    assert [p.what for p in problems] == ["python", "holly_hpc", "torch"]
    assert problems[1] == PreflightProblem(
        "holly_hpc", f"holly_hpc cannot be imported in the image (host has {holly_hpc.__version__})"
    )


def test_preflight_module_missing_in_the_image(fake_apptainer, image):
    fake_apptainer(prints(versions(torch=None)))
    assert preflight({"image": image}) == [
        PreflightProblem("torch", f"torch cannot be imported in the image (host has {torch.__version__})")
    ]


def test_probe_prints_null_for_a_missing_module(tmp_path):
    """PROBE itself, run by a Python that cannot import holly_hpc or torch: nulls, no traceback."""
    from holly_hpc.launch.apptainer import PROBE

    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"python": HOST_PY, "holly_hpc": None, "torch": None}


def test_preflight_nonzero_exit_shows_the_end_of_stderr(fake_apptainer, image):
    noise = "".join(f"echo 'line {i}' >&2\n" for i in range(20))
    fake_apptainer(noise + "echo 'FATAL:   could not open image /x.sif: permission denied' >&2\nexit 255\n")
    [problem] = preflight({"image": image})
    assert problem.what == "container"
    assert problem.detail.startswith("the probe exited with status 255; stderr:\n")
    lines = problem.detail.split("\n    ")[1:]
    assert lines == [f"line {i}" for i in range(11, 20)] + ["FATAL:   could not open image /x.sif: permission denied"]


def test_preflight_nonzero_exit_without_stderr(fake_apptainer, image):
    fake_apptainer("exit 3\n")
    assert preflight({"image": image}) == [PreflightProblem("container", "the probe exited with status 3; no stderr")]


def test_preflight_timeout_kills_the_probe(fake_apptainer, image, tmp_path):
    fake_apptainer('echo \'INFO:    loading image\' >&2\nsleep 30\necho done > "$(dirname "$0")/finished"\n')
    started = time.monotonic()
    problems = preflight({"image": image}, timeout_s=0.5)
    assert time.monotonic() - started < 10  # not the 30 s of the sleep: the whole group was killed
    assert problems == [
        PreflightProblem("container", "the probe did not finish within 0.5 s; stderr:\n    INFO:    loading image")
    ]


def test_preflight_garbage_output(fake_apptainer, image):
    fake_apptainer("echo 'Segmentation fault (core dumped)'\necho 'WARNING: no GPU' >&2\n")
    assert preflight({"image": image}) == [
        PreflightProblem(
            "container",
            "the probe printed no version JSON (stdout: 'Segmentation fault (core dumped)'); "
            "stderr:\n    WARNING: no GPU",
        )
    ]


def test_preflight_json_that_is_not_an_object(fake_apptainer, image):
    fake_apptainer("echo '[1, 2]'\n")
    assert preflight({"image": image}) == [
        PreflightProblem("container", "the probe printed no version JSON (stdout: '[1, 2]'); no stderr")
    ]


def test_preflight_reads_the_last_line_after_banners(fake_apptainer, image):
    fake_apptainer("echo '=== welcome to the cluster ==='\n" + prints(versions()) + "echo\n")
    assert preflight({"image": image}) == []


def test_preflight_apptainer_that_cannot_start(fake_apptainer, image):
    exe = fake_apptainer("")
    exe.write_text("#!/nonexistent/interpreter\n")
    [problem] = preflight({"image": image})
    assert problem.what == "container"
    assert problem.detail.startswith("could not start apptainer: [Errno 2] No such file or directory")


def test_preflight_command_checks_the_image_the_jobs_will_use(cli, write_spec, tmp_path, monkeypatch):
    """holly-hpc preflight: relative image paths resolve from the spec, as in the frozen plan."""
    from holly_hpc.experiment import build_plan
    from holly_hpc.spec import load_spec
    from holly_hpc.sweep import expand

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    path = write_spec({"container": {"image": "images/holly.sif"}})
    code, _, err = cli("preflight", path)
    assert code == 1
    assert "apptainer: no 'apptainer' executable on PATH" in err
    assert f"image: {tmp_path / 'images' / 'holly.sif'} does not exist" in err
    spec = load_spec(path)
    plan = build_plan(spec, expand(spec), tmp_path / "runs", "sqlite:///x")
    assert plan["container"]["image"] == str(tmp_path / "images" / "holly.sif")
    code, out, _ = cli("preflight", write_spec(name="plain.yaml"))
    assert code == 0 and "no container section" in out
