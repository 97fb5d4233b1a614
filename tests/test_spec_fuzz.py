"""Seeded random mutants of every shipped spec: each is either accepted with every value finite and free of
control characters (and then expands, plans and writes #SBATCH lines), or refused with file:line:col and a
key path, never a traceback, a hang or a memory blow-up.

HOLLY_FUZZ_SEED=<n> replays a run; HOLLY_FUZZ_MUTANTS=<n> sets how many mutants (default 500).
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
import resource
import signal
import time

import pytest
import yaml

from holly_hpc.experiment import planned
from holly_hpc.launch.sbatch import directives
from holly_hpc.launch.slurm import sbatch_parameters
from holly_hpc.spec import SpecError, load_spec
from holly_hpc.spec_values import control_character
from holly_hpc.sweep import expand

from .conftest import REPO

SHIPPED = sorted((REPO / "jobspecs").glob("*.yaml"))
# Problems about the document as a whole have no key to name.
WHOLE_DOCUMENT = re.compile(
    r"is required but missing|expected a mapping at the top level|the spec is empty|"
    r"invalid YAML|not UTF-8|expands to more than|nested deeper"
)
PER_MUTANT_S = 20  # only a hang trips this; a mutant takes milliseconds


# ------------------------------------------------------------------------------------------ mutations
def _junk(rng: random.Random):
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            2**53 + 1,
            10**30,
            -(10**30),
            1e308,
            float("nan"),
            float("inf"),
            -float("inf"),
            1e-320,
            "",
            "x" * rng.choice([1, 300, 5000]),
            "a\nb",
            "debug\ntouch /tmp/pwned\n#",
            "a\rb",
            "\x1b[2J",
            "\x7f",
            "\u2028",
            "\u202e",
            "ünïcødé ∂ 🧬",
            "../../etc",
            "/abs/path",
            "$(rm -rf ~)",
            "'; DROP TABLE runs; --",
            [],
            [1, "a", None],
            {},
            {"k": "v"},
            [[[[[[1]]]]]],
            3.5,
            "1e-3",
            "yes",
            "0x1F",
        ]
    )


def _paths(node, prefix=()):
    """Every key path of a nested mapping/list."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _get_parent(node, path):
    for part in path[:-1]:
        node = node[part]
    return node


def mutate_data(data: dict, rng: random.Random) -> dict:
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(data) if p]
        path = rng.choice(paths)
        parent = _get_parent(data, path)
        action = rng.random()
        if action < 0.25 and isinstance(parent, dict):
            del parent[path[-1]]
        elif action < 0.7:
            parent[path[-1]] = _junk(rng)
        elif action < 0.8 and isinstance(parent, dict):
            parent[rng.choice(["lrr", "train.lr", "a\nb", "", "1", "experiment"])] = _junk(rng)
        elif isinstance(parent[path[-1]], str):
            text = parent[path[-1]]
            i = rng.randint(0, len(text))
            parent[path[-1]] = text[:i] + rng.choice(["\n", "\r", "\x00", "\x85", "\t", "\u2029"]) + text[i:]
        else:
            parent[path[-1]] = str(parent[path[-1]])
    if rng.random() < 0.2:  # a sweep of some kind
        data["sweep"] = rng.choice(
            [
                5,
                "x" * 1000,
                {"grid": {"train.lr": 0.5}},
                {"grid": {"data.sigma": [1, 2]}},
                {"zip": {"train.lr": [0.1], "train.steps": [1, 2]}},
                {"seeds": 10**9},
                {"grid": {"train.steps": list(range(1, 200)), "train.batch_size": list(range(1, 200))}},
            ]
        )
    return data


TEXT_PIECES = [
    "\x00",
    "\x9b",
    "\ufeff",
    "\t\t",
    ": : :",
    "- - -",
    "[",
    "]]]]",
    "{",
    "&a",
    "*a",
    "*nowhere",
    "!!python/object/apply:os.system ['id']",
    "!!binary 'garbage'",
    "!!int x",
    "!!timestamp 2024-02-30",
    "<<: *a",
    "? [a, b]\n: c",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "\n  bad indent: 1\n",
    "x: " + "[" * 200 + "]" * 200,
    '"unterminated',
    "'",
    "# comment\n",
    "key: &r [*r]\n",
]


def mutate_text(text: str, rng: random.Random) -> bytes:
    action = rng.random()
    if action < 0.1:
        return b""
    if action < 0.2:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
    if action < 0.3:
        return text[: rng.randint(0, len(text))].encode()
    lines = text.splitlines(keepends=True) or [""]
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        choice = rng.random()
        if choice < 0.3:
            lines.insert(i, lines[i])  # a duplicate key, mostly
        elif choice < 0.5:
            del lines[i]
        else:
            j = rng.randint(0, len(lines[i]))
            lines[i] = lines[i][:j] + rng.choice(TEXT_PIECES) + lines[i][j:]
    out = "".join(lines)
    if rng.random() < 0.1:
        out += "bomb0: &b0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"bomb{k}: &b{k} [{', '.join([f'*b{k - 1}'] * 9)}]\n" for k in range(1, 9)
        )
    return out.encode("utf-8", errors="surrogatepass")


# ------------------------------------------------------------------------------------------ the check
def _assert_clean(value, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str) and control_character(key) is None, f"{where}: key {key!r}"
            _assert_clean(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _assert_clean(item, f"{where}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{where}: {value}"
    elif isinstance(value, str):
        assert control_character(value) is None, f"{where}: {value!r}"


def check_mutant(path, out_root) -> str:
    """'accepted' or 'refused'; fails the test on anything else."""
    try:
        spec = load_spec(path)
    except SpecError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.line is not None and problem.column is not None, f"no line:col: {problem}"
            assert str(problem).startswith(f"{path}:{problem.line}:{problem.column}: ")
            assert problem.path or WHOLE_DOCUMENT.search(problem.message), f"no key path: {problem}"
        return "refused"
    _assert_clean(spec.resolved, "spec")
    tasks = expand(spec)
    for task in tasks:
        _assert_clean(task.config, f"task {task.index}")
    experiment = planned(spec, tasks, out_root, f"sqlite:///{out_root}/registry.sqlite")  # writes nothing
    for line in directives(experiment, 0, len(tasks)):
        assert "\n" not in line and line.startswith("#SBATCH --")
    sbatch_parameters(experiment.resources, experiment.launch["array_parallelism"])
    return "accepted"


def _timeout(signum, frame):
    raise TimeoutError(f"a mutant took more than {PER_MUTANT_S} s")


def test_mutants_of_the_shipped_specs_are_accepted_clean_or_refused_with_a_place(tmp_path):
    seed = int(os.environ.get("HOLLY_FUZZ_SEED") or time.time_ns() % 2**32)
    count = int(os.environ.get("HOLLY_FUZZ_MUTANTS") or 500)
    rng = random.Random(seed)
    bases = [(p, p.read_text(encoding="utf-8")) for p in SHIPPED]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    outcomes = {"accepted": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _timeout)
    try:
        for n in range(count):
            source, text = rng.choice(bases)
            mutant = tmp_path / f"mutant-{n:04d}.yaml"
            if rng.random() < 0.6:
                data = mutate_data(yaml.safe_load(text), rng)
                mutant.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=rng.random() < 0.5))
            else:
                mutant.write_bytes(mutate_text(text, rng))
            signal.alarm(PER_MUTANT_S)
            try:
                outcomes[check_mutant(mutant, tmp_path / "runs")] += 1
            except Exception as exc:
                raise AssertionError(
                    f"HOLLY_FUZZ_SEED={seed}: mutant {n} of {source.name} ({mutant}) gave "
                    f"{type(exc).__name__}: {exc}\n--- mutant ---\n"
                    f"{mutant.read_bytes()[:2000]!r}"
                ) from exc
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"fuzz seed {seed}: {outcomes}, peak memory grew {grown_mb:.0f} MB")
    assert grown_mb < 500, f"HOLLY_FUZZ_SEED={seed}: peak memory grew by {grown_mb:.0f} MB"
    assert outcomes["refused"] > count // 4 and outcomes["accepted"] > 0, (seed, outcomes)  # both paths exercised
    assert not (tmp_path / "runs").exists()  # checking a spec writes nothing


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_spec_is_accepted_clean(path, tmp_path):
    assert check_mutant(path, tmp_path / "runs") == "accepted"
