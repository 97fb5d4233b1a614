"""Clusters own their behaviour: the CLI, the spec checks and the runtime ask the experiment's Launcher, and
never test a cluster's name. A cluster is one class in launch/executors.py plus its name in the schema."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import ClassVar

import pytest

from holly_hpc.launch.executors import LAUNCHERS, DebugLauncher, Launcher, LocalLauncher, SlurmLauncher, Stopped
from holly_hpc.launch.slurm import resource_options, sbatch_parameters
from holly_hpc.resources import schema_file

REPO = Path(__file__).resolve().parent.parent
FULL_RESOURCES = {
    "time": 30,
    "nodes": 2,
    "tasks_per_node": 2,
    "gpus_per_node": 2,
    "partition": "gpu",
    "account": "lab",
    "qos": "short",
    "cpus_per_task": 8,
    "mem": "32G",
    "constraint": "a100",
    "extra": {"mail_type": "END", "exclusive": True},
}


def test_the_schema_enum_the_cli_and_the_launchers_name_the_same_clusters():
    from holly_hpc.cli import build_parser

    schema = json.loads(schema_file("jobspec.schema.json").read_text())
    enum = schema["$defs"]["launch"]["properties"]["cluster"]["enum"]
    assert sorted(enum) == sorted(LAUNCHERS) == ["debug", "local", "slurm"]
    submit = build_parser()._subparsers._group_actions[0].choices["submit"]
    (cluster,) = [a for a in submit._actions if a.dest == "cluster"]
    assert sorted(cluster.choices) == sorted(enum)


def test_no_module_outside_the_launchers_tests_a_cluster_name():
    """The point of the move: adding a cluster must not mean editing the CLI, the spec or the runtime."""
    offenders = []
    for path in (REPO / "holly_hpc").rglob("*.py"):
        if path.name == "executors.py" or "bench" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                if any(n in ("local", "slurm", "debug") for n in names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize(
    ("launcher", "resources", "expected"),
    [
        (LocalLauncher, {"nodes": 2, "tasks_per_node": 1}, [("resources", "nodes")]),
        (DebugLauncher, {"nodes": 1, "tasks_per_node": 2}, [("resources", "tasks_per_node")]),
        (DebugLauncher, {"nodes": 3, "tasks_per_node": 2}, [("resources", "nodes"), ("resources", "tasks_per_node")]),
        (SlurmLauncher, {"nodes": 64, "tasks_per_node": 8}, []),
        (LocalLauncher, {"nodes": 1, "tasks_per_node": 4}, []),
    ],
)
def test_each_launcher_says_what_it_cannot_run(launcher, resources, expected):
    found = launcher.problems(resources)
    assert [path for path, _ in found] == expected
    for _, message in found:
        assert f"launch.cluster {launcher.name}" in message


@pytest.mark.parametrize(
    ("launcher", "shares_machine", "requeue_code", "synchronous"),
    [(LocalLauncher, True, 144, False), (DebugLauncher, False, None, True), (SlurmLauncher, False, 75, False)],
)
def test_each_launcher_tells_its_tasks_how_they_run(tmp_path, launcher, shares_machine, requeue_code, synchronous):
    """The runtime reads nothing of the cluster: what it must know travels in the pickled TaskRunner."""
    runner = launcher().runner(type("Frozen", (), {"root": tmp_path})(), 3)
    assert (runner.experiment_dir, runner.task_index) == (str(tmp_path), 3)
    assert (runner.shares_machine, runner.requeue_code, launcher.synchronous) == (
        shares_machine,
        requeue_code,
        synchronous,
    )


def test_tasks_that_share_the_machine_share_its_cores(monkeypatch):
    from holly_hpc.runtime.task import cpu_threads

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    launch = {"threads": None, "array_parallelism": 4}
    assert cpu_threads(launch, 10, shares_machine=True) == 2  # 8 cores, 4 tasks at once
    assert cpu_threads(launch, 2, shares_machine=True) == 4  # only 2 tasks: never more at once
    assert cpu_threads(launch, 10, shares_machine=False) == 8
    assert cpu_threads({**launch, "threads": 3}, 10, shares_machine=True) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cpu_threads(launch, 10, shares_machine=False) == 6


def test_a_runner_pickled_before_the_launchers_said_how_tasks_run_behaves_as_a_slurm_job(tmp_path):
    """A SLURM job queued across an upgrade unpickles a TaskRunner without the new fields."""
    import pickle

    from holly_hpc.runtime.task import TaskRunner

    old = TaskRunner(tmp_path, 0)
    del old.shares_machine, old.requeue_code  # as the old class pickled it
    restored = pickle.loads(pickle.dumps(old))
    assert (restored.shares_machine, restored.requeue_code) == (False, 75)


def test_validate_reports_the_launchers_problems_at_their_place(write_spec):
    from holly_hpc.spec import SpecError, load_spec

    with pytest.raises(SpecError) as err:
        load_spec(write_spec({"resources": {"tasks_per_node": 2}, "launch": {"cluster": "debug"}}))
    (problem,) = err.value.problems
    assert problem.path == ("resources", "tasks_per_node") and problem.line is not None
    assert "it runs in the submitting process" in problem.message


def test_a_cluster_given_on_the_command_line_is_checked_too(write_spec, cli, tmp_path):
    """`submit --cluster debug` of a spec made for SLURM with two tasks per node: refused before anything is
    written (validate had checked the spec's own cluster only)."""
    path = write_spec({"resources": {"tasks_per_node": 2}, "launch": {"cluster": "slurm"}})
    code, _, err = cli("submit", path, "--cluster", "debug")
    assert code != 0 and "resources.tasks_per_node" in err and "--cluster debug" in err
    assert not (tmp_path / "runs").exists()


def test_the_exported_scripts_and_submitit_write_the_same_resource_lines(tmp_path):
    """One parameter map: the #SBATCH lines of `holly-hpc sbatch` equal those submitit writes for `submit`."""
    from submitit.slurm.slurm import _make_sbatch_string

    from holly_hpc.launch.sbatch import directives

    class Frozen:  # what directives() reads of an experiment
        name, resources, launch = "exp", FULL_RESOURCES, {"array_parallelism": 4}

        def folder(self, name):
            return tmp_path / name

    ours = set(directives(Frozen(), 0, 3))
    theirs = _make_sbatch_string("python -u x.py", tmp_path, **sbatch_parameters(FULL_RESOURCES, 4))
    theirs = {line for line in theirs.splitlines() if line.startswith("#SBATCH")}
    resource_lines = {
        line
        for line in theirs
        if line.split("=")[0][len("#SBATCH --") :].replace("-", "_")
        in {*resource_options(FULL_RESOURCES), "mail_type", "exclusive", "requeue"}
    }
    assert len(resource_lines) == len(resource_options(FULL_RESOURCES)) + 3
    assert resource_lines <= ours, resource_lines - ours
    assert "#SBATCH --signal=USR2@90" in ours and "#SBATCH --exclusive" in ours and "#SBATCH --mail-type=END" in ours


class RecordingCluster(Launcher):
    """A cluster of the test's own, standing in for the experiment's: the CLI must ask it."""

    name = "local"
    asked: ClassVar[list] = []

    def launch(self, experiment, indices):
        raise AssertionError("not launched in this test")

    def states(self, job_ids):
        self.asked.append(("states", sorted(job_ids)))
        return dict.fromkeys(job_ids, "PREEMPTED_BY_TEST")

    def ended_as(self, scheduler_state):
        return "cancelled" if scheduler_state == "PREEMPTED_BY_TEST" else None

    def active(self, experiment, registry, runs):
        return {}

    def cancel(self, experiment, registry, runs, grace_s):
        self.asked.append(("cancel", [r.task_index for r in runs], grace_s))
        return [Stopped(r.task_index, True, "stopped by the test cluster") for r in runs]


def test_status_and_cancel_ask_the_experiments_own_launcher(write_spec, cli, monkeypatch, tmp_path):
    from holly_hpc.experiment import freeze
    from holly_hpc.registry import open_registry
    from holly_hpc.spec import load_spec
    from holly_hpc.sweep import expand

    spec = load_spec(write_spec({"sweep": {"grid": {"train.lr": [0.01, 0.02]}}}))
    url = f"sqlite:///{tmp_path / 'runs' / 'registry.sqlite'}"
    exp = freeze(spec, expand(spec), tmp_path / "runs", url)
    registry = open_registry(url)
    registry.init()
    from holly_hpc.experiment import register

    register(registry, exp)
    registry.set_job_ids(exp.name, {0: "77_0", 1: "77_1"})
    monkeypatch.setitem(LAUNCHERS, "local", RecordingCluster)
    RecordingCluster.asked = []

    code, out, _ = cli("status", exp.root)
    assert code == 0
    header, *rows = [line.split() for line in out.splitlines()]
    assert header[-2:] == ["job", "local"]  # the cluster asked heads its column
    assert [(r[2], r[-2], r[-1]) for r in rows] == [("cancelled", "77_0", "PREEMPTED_BY_TEST")] * 1 + [
        ("cancelled", "77_1", "PREEMPTED_BY_TEST")
    ]
    code, out, _ = cli("cancel", exp.root, "--grace", "7")
    assert code == 0 and out.count("stopped by the test cluster") == 2
    assert RecordingCluster.asked == [("states", ["77_0", "77_1"]), ("cancel", [0, 1], 7.0)]
    assert {r.state for r in registry.runs(exp.name)} == {"cancelled"}
