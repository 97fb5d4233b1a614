"""The README stays true: the spec reference is the schema's, and its commands are the tested ones."""

from __future__ import annotations

import re

from holly_hpc.cli import build_parser
from holly_hpc.specdoc import reference_markdown

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_spec_reference_is_generated_from_the_schema():
    start = README.index("<!-- reference:start -->\n") + len("<!-- reference:start -->\n")
    end = README.index("<!-- reference:end -->")
    assert README[start:end] == reference_markdown(), "run `holly-hpc reference` and paste it into the README"


def test_every_schema_key_is_documented():
    for key in ("experiment", "kind", "sweep.grid", "launch.array_parallelism", "data.structure", "train.lr_schedule"):
        assert f"| `{key}` |" in README


def test_readme_commands_exist_and_ci_runs_the_readme_test_command():
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    shown = set(re.findall(r"holly-hpc (\w+)", README))
    assert shown <= commands, shown - commands
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    setup, test = blocks[0].strip().splitlines(), next(b for b in blocks if "pytest" in b).strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert test in ci.splitlines()
    for line in setup:
        assert line in ci.splitlines(), line
    style = next(b for b in blocks if "ruff" in b).strip()
    assert style in ci.splitlines()
