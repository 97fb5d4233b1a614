"""A spec is untrusted input: what it may not hold, and how validate refuses it (with file:line:col and key
path, never a traceback, bounded in time and memory)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from holly_hpc.spec import _validator, load_spec, whole_string_pattern
from holly_hpc.spec_values import control_character
from holly_hpc.spec_yaml import MAX_DEPTH, MAX_NODES
from holly_hpc.sweep import expand

from .conftest import REPO, TINY
from .test_spec import problems_of


def spec_text(**sections) -> str:
    """TINY as YAML text with sections replaced; json.dumps writes strings with escapes YAML reads back."""
    spec = {**TINY, **sections}
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in spec.items())


# ------------------------------------------------------------------------------- control characters
INJECTIONS = [
    "debug\ntouch /tmp/x\n#",
    "a\rb",
    "a\x1b[2Jb",
    "x\x00y",
    "x\x7fy",
    "x\x85y",
    "x\u2028y",
    "x\u202ey",
    "a\n",
]
PLACES = [
    ({"resources": {"time": 10, "partition": "{}"}}, "resources.partition"),
    ({"resources": {"time": 10, "account": "{}"}}, "resources.account"),
    ({"resources": {"time": 10, "qos": "{}"}}, "resources.qos"),
    ({"resources": {"time": 10, "constraint": "{}"}}, "resources.constraint"),
    ({"resources": {"time": 10, "mem": "{}"}}, "resources.mem"),
    ({"resources": {"time": 10, "extra": {"mail-type": "{}"}}}, "resources.extra.mail-type"),
    ({"output_root": "{}"}, "output_root"),
    ({"experiment": "{}"}, "experiment"),
    ({"description": "{}"}, "description"),
    ({"container": {"image": "{}"}}, "container.image"),
    ({"container": {"image": "x.sif", "env": {"A": "{}"}}}, "container.env.A"),
    ({"data": {**TINY["data"], "structure": "{}"}}, "data.structure"),
    ({"sweep": {"grid": {"data.structure": ["torus", "{}"]}}}, "sweep.grid.data.structure[1]"),
]


def _fill(value, text):
    if isinstance(value, dict):
        return {k: _fill(v, text) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, text) for v in value]
    return text if value == "{}" else value


@pytest.mark.parametrize("injection", INJECTIONS, ids=repr)
@pytest.mark.parametrize("sections,key", PLACES, ids=[k for _, k in PLACES])
def test_control_characters_are_refused_in_every_string(write_spec, sections, key, injection):
    path = write_spec(raw=spec_text(**_fill(sections, injection)))
    lines = problems_of(path)
    line_of_key = next(
        i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith(key.split(".")[0] + ":")
    )
    hits = [text for text in lines if f": {key}: control character U+" in text]
    assert hits, lines
    assert hits[0].startswith(f"{path}:{line_of_key}:")


def test_control_characters_in_keys_are_refused(write_spec):
    path = write_spec(raw=spec_text(resources={"time": 10, "extra": {"mail-type\n#SBATCH --x": "END"}}))
    (line,) = [text for text in problems_of(path) if "control character" in text]
    assert "resources.extra.mail-type\n" not in line and "control character U+000A (line feed) in a key" in line


def test_tab_is_allowed_and_named_characters_are_reported():
    assert control_character("a\tb") is None
    assert control_character("a\nb") == "U+000A (line feed)"
    assert control_character("a\x9bb") == "U+009B"


def test_schema_patterns_match_the_whole_string():
    # Python's `$` matches before a trailing newline; the schema's (ECMA-262) does not.
    assert whole_string_pattern("^[a-z]+$") == "^[a-z]+\\Z"
    validator = _validator()
    assert not validator.is_valid({"experiment": "name\n", "kind": "pose"})
    assert not validator.is_valid({"experiment": "x", "kind": "pose", "resources": {"extra": {"mail-type\n": 1}}})
    assert validator.is_valid({"experiment": "name", "kind": "pose"})


# ---------------------------------------------------------------------------------- size and shape
def _validate_in_subprocess(path, memory_mb=500, timeout_s=60):
    """validate in a child limited to `memory_mb` of address space; the timeout only catches a hang."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))

    return subprocess.run(
        [sys.executable, "-m", "holly_hpc.cli", "validate", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        preexec_fn=limit,
        cwd=REPO,
    )


BOMB = "experiment: bomb\nkind: pose\na0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)


def test_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 800  # 9^10 = 3.5 billion nodes once expanded
    done = _validate_in_subprocess(path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [text for text in done.stderr.splitlines() if "expands to more than" in text]
    assert line.startswith(f"{path}:") and f"{MAX_NODES:,} YAML nodes" in line


def test_aliases_within_the_bound_still_work(write_spec):
    path = write_spec(
        raw="experiment: ok\nkind: pose\ndevice: cpu\n"
        "data: &d {structure: torus, image_size: 16}\n"
        "sweep: {grid: {train.lr: &s [0.1, 0.2]}, zip: {data.sigma: *s}}\n"
    )
    spec = load_spec(path)
    assert spec.resolved["data"]["image_size"] == 16
    assert [t.overrides for t in expand(spec)] == [
        {"train.lr": a, "data.sigma": b} for a in (0.1, 0.2) for b in (0.1, 0.2)
    ]


def test_deep_nesting_is_refused_with_its_place(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("experiment: deep\nkind: pose\ndata: " + "[" * 10_000 + "]" * 10_000 + "\n")
    done = _validate_in_subprocess(path)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "RecursionError" not in done.stderr
    (line,) = [text for text in done.stderr.splitlines() if "nested deeper" in text]
    assert line.startswith(f"{path}:3:{6 + MAX_DEPTH}: data" + "[0]" * (MAX_DEPTH - 1) + ": nested deeper than")


def test_an_alias_inside_its_own_anchor_is_a_cycle(write_spec):
    path = write_spec(raw="experiment: c\nkind: pose\ntrain: &t {lr: [*t]}\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:3:17: train.lr[0]: alias *t refers to a collection that contains it")


def test_oversized_file_is_refused_before_parsing(write_spec):
    path = write_spec(raw="experiment: big\nkind: pose\ndescription: " + "x" * (1 << 20) + "\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: the spec is") and "refused above" in line


def test_long_sweep_string_is_a_type_error_not_a_sweep(write_spec):
    path = write_spec(raw='experiment: s\nkind: pose\nsweep: {grid: {train.lr: "' + "a" * 100_000 + '"}}\n')
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:3:26: sweep.grid.train.lr: expected an array, got a string")


@pytest.mark.parametrize(
    "sweep,where,message",
    [
        ("5", "3:8: sweep", "expected an object, got an integer (5)"),
        ("{grid: {train.lr: 0.5}}", "3:26: sweep.grid.train.lr", "expected an array, got a number (0.5)"),
        ("{zip: {train.lr: abc}}", "3:25: sweep.zip.train.lr", 'expected an array, got a string ("abc")'),
        ("{grid: {train.lr: []}}", "3:26: sweep.grid.train.lr", "expected at least 1 item(s), got 0"),
        ("{seeds: many}", "3:16: sweep.seeds", 'expected an integer, got a string ("many")'),
        ("{grid: null}", "3:15: sweep.grid", "expected an object, got nothing (null)"),
    ],
)
def test_malformed_sweeps_are_spec_errors(write_spec, sweep, where, message):
    path = write_spec(raw=f"experiment: s\nkind: pose\nsweep: {sweep}\n")
    assert problems_of(path) == [f"{path}:{where}: {message}"]


def test_a_sweep_into_a_null_section_reports_the_section(write_spec):
    path = write_spec(raw="experiment: s\nkind: pose\ndata: null\nsweep: {grid: {data.sigma: [1, 2]}}\n")
    assert problems_of(path) == [f"{path}:3:7: data: expected an object, got nothing (null)"]


def test_a_swept_key_inside_another_swept_key_is_refused(write_spec):
    path = write_spec(raw="experiment: s\nkind: pose\nsweep: {grid: {data: [{sigma: 1}], data.sigma: [1, 2]}}\n")
    (line,) = problems_of(path)
    assert (
        line
        == f"{path}:3:36: sweep.grid.data.sigma: 'data.sigma' is inside 'data', which is swept too; sweep one of them"
    )


def test_a_sweep_through_a_swept_scalar_is_a_spec_error(write_spec):
    path = write_spec(raw="experiment: s\nkind: pose\nsweep: {grid: {data: [5]}}\n")
    assert problems_of(path) == [f"{path}:3:23: sweep.grid.data[0]: expected an object, got an integer (5)"]


def test_sweeps_are_bounded_in_tasks(write_spec):
    grid = {f"train.{k}": list(range(1, 23)) for k in ("steps", "batch_size", "log_every")}
    path = write_spec(raw=spec_text(sweep={"grid": grid}))
    (line,) = problems_of(path)
    assert line.endswith(
        "sweep: expands to 10,648 tasks; at most 10,000 per experiment (split the sweep into several experiments)"
    )


# ------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    "text,key,shown",
    [
        ("train: {lr: .nan}", "train.lr", "nan"),
        ("train: {lr: .inf}", "train.lr", "inf"),
        ("train: {lr: -.inf}", "train.lr", "-inf"),
        ("train: {lr: 1e999}", "train.lr", "inf"),
        ("resources: {time: .inf}", "resources.time", "inf"),
        ("sweep: {grid: {data.sigma: [1.0, .nan]}}", "sweep.grid.data.sigma[1]", "nan"),
    ],
)
def test_non_finite_numbers_are_refused_everywhere(write_spec, text, key, shown):
    path = write_spec(raw=f"experiment: n\nkind: pose\n{text}\n")
    assert f": {key}: expected a finite number, got {shown}" in "\n".join(problems_of(path))


def test_huge_numbers_are_refused_where_they_would_overflow(write_spec):
    path = write_spec(
        raw="experiment: n\nkind: pose\ntrain: {steps: 123456789012345678901234567890}\n"
        "resources: {time: 1e300}\nlaunch: {threads: 100000}\n"
    )
    lines = problems_of(path)
    assert any("train.steps: expected an integer between -2^53 and 2^53" in text for text in lines)
    assert any("resources.time: expected a value <= 525600, got 1e+300" in text for text in lines)
    assert any("launch.threads: expected a value <= 1024, got 100000" in text for text in lines)


def test_an_integer_too_long_to_read_is_a_yaml_error(write_spec):
    path = write_spec(raw="experiment: n\nkind: pose\ntrain: {steps: " + "9" * 5000 + "}\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:3:16: train.steps: invalid YAML:") and "more than 4300 digits" in line


# -------------------------------------------------------------------------------------- YAML itself
@pytest.mark.parametrize(
    "raw,where",
    [
        (b"experiment: r\nkind: pose\ntrain: {lr: \x00}\n", "3:13: train.lr: invalid YAML: character U+0000"),
        (
            b"experiment: r\nkind: pose\ntrain:\n  lr: 1\n  steps: \xc2\x9b\n",
            "5:10: train.steps: invalid YAML: character U+009B",
        ),
    ],
)
def test_reader_errors_give_line_column_and_key_path(write_spec, raw, where):
    path = write_spec(raw="")
    path.write_bytes(raw)
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:{where}")


def test_binary_garbage_is_not_utf8(write_spec):
    path = write_spec(raw="")
    path.write_bytes(b"experiment: r\n\xff\xfe\x00binary")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:2:1: not UTF-8 text: byte 0xff")


@pytest.mark.parametrize(
    "value,message",
    [
        ("!!int abc", "cannot read this tag:yaml.org,2002:int value"),
        ("!!float x", "cannot read this tag:yaml.org,2002:float value"),
        ("!!timestamp 2024-02-30", "cannot read this tag:yaml.org,2002:timestamp value"),
    ],
)
def test_values_their_tag_cannot_hold_are_yaml_errors(write_spec, value, message):
    path = write_spec(raw=f"experiment: r\nkind: pose\ntrain: {{steps: {value}}}\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:3:16: train.steps: invalid YAML:") and message in line


def test_binary_values_are_type_errors(write_spec):
    path = write_spec(raw="experiment: r\nkind: pose\ntrain: {steps: !!binary aGk=}\n")
    assert problems_of(path) == [f"{path}:3:16: train.steps: expected an integer, got bytes (\"b'hi'\")"]


def test_dates_are_strings_not_timestamps(write_spec):
    path = write_spec(raw="experiment: 2024-01-31\nkind: pose\ndevice: cpu\ndescription: 2024-01-31 12:00:00\n")
    spec = load_spec(path)
    assert spec.experiment == "2024-01-31" and spec.resolved["description"] == "2024-01-31 12:00:00"


def test_keys_must_be_strings(write_spec):
    path = write_spec(raw="experiment: r\nkind: pose\nsweep: {grid: {1: [1, 2]}}\n")
    lines = problems_of(path)
    assert f"{path}:3:16: sweep.grid.1: expected a string key, got int 1 (quote it)" in lines


# ------------------------------------------------------------------------------------ files it names
def test_an_obj_path_longer_than_the_file_system_allows_is_a_spec_error(write_spec, tmp_path):
    path = write_spec({"data": {"structure": "a" * 300 + ".obj"}})
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:") and "data.structure: expected a built-in shape" in line
    assert "cannot be checked: File name too long" in line


@pytest.mark.parametrize("vertices", ["v 1 2 3\n", "v 1 2 3\nv 1 2 3\nv 1 2 3\n"])
def test_a_point_or_coincident_obj_is_refused_at_validate(write_spec, tmp_path, vertices):
    (tmp_path / "dot.obj").write_text(vertices)
    path = write_spec({"data": {"structure": "dot.obj"}})
    (line,) = problems_of(path)
    assert line.endswith(
        f"data.structure: {tmp_path}/dot.obj: expected a point cloud with an extent, but all "
        f"{vertices.count('v')} vertices lie at (1, 2, 3)"
    )


def test_the_reconstruct_init_obj_is_read_at_validate(write_spec, tmp_path):
    (tmp_path / "dot.obj").write_text("v 0 0 0\n")
    path = write_spec(
        raw="experiment: r\nkind: reconstruct\ndata: {source: simulate, image_size: 16}\nmodel: {init: dot.obj}\n"
    )
    (line,) = [text for text in problems_of(path) if "model.init" in text]
    assert "expected a point cloud with an extent" in line
