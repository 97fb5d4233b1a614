"""Load a YAML job spec with line marks, validate it (JSON Schema + semantic checks), apply defaults.

Every problem found is reported, each as `file:line:col: key.path: what was expected`, and all of them at
once, so a researcher fixes a spec in one round instead of one error per submission.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from . import sweep as sweep_mod
from .kind_names import KINDS
from .schema_walk import apply_defaults, known_keys, leaf_paths, load_schema, property_schema
from .spec_values import value_problems
from .spec_yaml import KeyPath, LoadedYaml, Problem, SpecError, format_path, load_yaml

__all__ = ["KeyPath", "LoadedYaml", "Problem", "Spec", "SpecError", "format_path", "load_spec", "load_yaml"]

KIND_NAMES = tuple(KINDS)  # the schema's kind enum lists the same names (tests check it)
# Sections that describe the experiment, not one task: a sweep may not vary them.
EXPERIMENT_KEYS = ("experiment", "description", "output_root", "sweep", "launch", "registry", "resources", "container")


# ------------------------------------------------------------------------------------------- schema
def whole_string_pattern(pattern: str) -> str:
    """A JSON Schema pattern for Python's re: the schema's `$` is ECMA-262's, which matches only at the very
    end, but Python's also matches before a trailing newline (`experiment: "name\\n"` would pass)."""
    return re.sub(r"(?<!\\)\$", r"\\Z", pattern)


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not re.search(whole_string_pattern(pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


SpecValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern})


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return SpecValidator(load_schema())


# --------------------------------------------------------------------------------------- validation
_TYPE_NAMES = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "nothing (null)",
}


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    text = text if len(text) <= 60 else text[:57] + "..."
    if value is None or isinstance(value, (dict, list)):
        return _TYPE_NAMES[type(value)]
    return f"{_TYPE_NAMES.get(type(value), type(value).__name__)} ({text})"


def suggest(word: str, candidates: list[str]) -> str | None:
    """The candidate a typo most likely meant: a close spelling, else one that starts with the word."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    prefixed = [c for c in candidates if c.startswith(word) or word.startswith(c)]
    return min(prefixed, key=len) if prefixed and len(word) >= 3 else None


def _unknown_key_problems(error, loaded: LoadedYaml, path: KeyPath, instance: dict, full: dict) -> list[Problem]:
    allowed = known_keys(path, full)
    problems = []
    for key in error.instance:
        if key in allowed:
            continue
        hint = suggest(str(key), allowed)
        suggestion = f"; did you mean '{hint}'?" if hint else f"; allowed keys: {', '.join(allowed)}"
        problems.append(loaded.problem((*path, key), f"unknown key '{key}'{suggestion}", prefer_key=True))
    return problems


def _message(error) -> str:
    v, s, inst = error.validator, error.validator_value, error.instance
    if v == "type":
        want = " or ".join(s) if isinstance(s, list) else s
        return f"expected {'an' if want[0] in 'aeiou' else 'a'} {want}, got {_describe(inst)}"
    if v == "enum":
        return f"expected one of {', '.join(json.dumps(x) for x in s)}, got {_describe(inst)}"
    if v == "const":
        return f"expected {json.dumps(s)}, got {_describe(inst)}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return f"expected a value {op} {s}, got {inst}"
    if v == "pattern":
        return f"expected a string matching {s}, got {_describe(inst)}"
    if v in ("minItems", "maxItems"):
        return f"expected {'at least' if v == 'minItems' else 'at most'} {s} item(s), got {len(inst)}"
    if v == "minLength":
        return f"expected a string of at least {s} character(s), got {_describe(inst)}"
    if v == "required":
        return error.message.replace("is a required property", "is required but missing")
    return error.message


def schema_problems(loaded: LoadedYaml, instance: dict, path_map=None) -> list[Problem]:
    """All JSON Schema violations of `instance`, located in `loaded`.

    path_map(path) -> (reported path, mark path) lets sweep-expanded task configs point at the sweep value
    that produced the bad value instead of the base spec.
    """
    problems = []
    for error in _validator().iter_errors(instance):
        path = tuple(error.absolute_path)
        shown, mark_path = path_map(path) if path_map else (path, path)
        if error.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(error.instance, dict):
            for p in _unknown_key_problems(error, loaded, mark_path, error.instance, instance):
                problems.append(Problem(p.file, p.line, p.column, shown + p.path[len(mark_path) :], p.message))
            continue
        if error.validator in ("if", "allOf"):
            continue  # their failing sub-errors are reported on their own
        line, col = loaded.locate(mark_path)
        problems.append(Problem(loaded.file, line, col, shown, _message(error)))
    return problems


@dataclass
class Spec:
    """A validated spec: the experiment-level settings and the base task config, defaults applied."""

    file: Path
    text: str
    loaded: LoadedYaml
    resolved: dict  # the whole spec with defaults (sweep included)

    @property
    def base_dir(self) -> Path:
        return self.file.resolve().parent

    @property
    def experiment(self) -> str:
        return self.resolved["experiment"]

    def task_config(self, overrides: dict[str, Any]) -> dict:
        """The base spec with dotted-path overrides applied, experiment-level keys removed, defaults applied."""
        config = {k: v for k, v in self.loaded.data.items() if k not in EXPERIMENT_KEYS}
        config = copy.deepcopy(config)
        for dotted, value in overrides.items():
            set_dotted(config, dotted, value)
        full = apply_defaults({**config, "experiment": self.experiment})
        return {k: v for k, v in full.items() if k not in EXPERIMENT_KEYS}


class SweepTargetError(ValueError):
    """A swept dotted key runs through a value that is not a mapping."""

    def __init__(self, dotted: str, part: str, found: Any):
        super().__init__(f"cannot set '{dotted}': '{part}' is {_describe(found)}, not a mapping")
        self.dotted = dotted


def set_dotted(config: dict, dotted: str, value: Any) -> None:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SweepTargetError(dotted, part, child)
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def load_spec(path: str | Path) -> Spec:
    """Load, validate and resolve a spec; raises SpecError listing every problem.

    The checks run in layers, each only on what the layer before found sound, so a malformed spec gets a
    list of problems and never a traceback: values (control characters, non-finite numbers, non-string
    keys), the schema, the sweep's shape, then launch rules and every sweep-expanded task.
    """
    loaded = load_yaml(path)
    data = loaded.data
    if not isinstance(data, dict):
        raise SpecError([loaded.problem((), f"expected a mapping at the top level, got {_describe(data)}")])
    problems = schema_problems(loaded, data)
    bad_values = value_problems(loaded)
    if bad_values or any(p.path[:1] == ("sweep",) for p in problems):
        # Such values must not reach folder names or the sweep's expansion, nor a sweep its own checks.
        raise SpecError(_in_file_order(bad_values + problems))
    sweep_problems = _sweep_problems(loaded, data)
    problems += sweep_problems
    spec = Spec(Path(path), loaded.text, loaded, apply_defaults(data))
    if not problems:
        problems += _launch_problems(spec)
    swept = [tuple(k.split(".")) for section in ("grid", "zip") for k in ((data.get("sweep") or {}).get(section) or {})]
    blocked = any(p.path and any(s[: len(p.path)] == p.path for s in swept) for p in problems)
    if (
        not sweep_problems
        and not blocked
        and data.get("kind") in KIND_NAMES
        and isinstance(data.get("experiment"), str)
    ):
        problems += _task_problems(spec)
    if problems:
        raise SpecError(_in_file_order(problems))
    return spec


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    """Each problem once, in file order."""
    return sorted(set(problems), key=lambda p: (p.line or 0, p.column or 0, format_path(p.path), p.message))


def _launch_problems(spec: Spec) -> list[Problem]:
    """Resource combinations and registry settings the schema cannot rule out on its own; what a cluster cannot
    run, its launcher says."""
    from .launch.executors import get_launcher
    from .registry.urls import has_password

    r = spec.resolved["resources"]
    problems = []
    if has_password(spec.resolved["registry"].get("url", "")):  # the message must not repeat the URL
        problems.append(
            spec.loaded.problem(
                ("registry", "url"),
                "contains a password, which would be frozen with the "
                "spec: remove it and set PGPASSWORD or use ~/.pgpass",
            )
        )
    if r["gpus_per_node"] > 0 and r["tasks_per_node"] != r["gpus_per_node"]:
        problems.append(
            spec.loaded.problem(
                ("resources", "tasks_per_node"),
                f"expected one process per GPU: tasks_per_node = gpus_per_node ({r['gpus_per_node']}), got {r['tasks_per_node']}",
            )
        )
    launcher = get_launcher(spec.resolved["launch"]["cluster"])
    problems += [spec.loaded.problem(path, message) for path, message in launcher.problems(r)]
    return problems


def _sweep_problems(loaded: LoadedYaml, data: dict) -> list[Problem]:
    sweep = data.get("sweep") or {}
    problems = []
    grid = sweep.get("grid") if isinstance(sweep.get("grid"), dict) else {}
    zipped = sweep.get("zip") if isinstance(sweep.get("zip"), dict) else {}
    for section, entries in (("grid", grid), ("zip", zipped)):
        for dotted in entries:
            where = ("sweep", section, dotted)
            top = dotted.split(".")[0]
            if top in EXPERIMENT_KEYS or top in ("kind",):
                problems.append(
                    loaded.problem(where, f"'{top}' is set once per experiment and cannot be swept", prefer_key=True)
                )
                continue
            if property_schema(tuple(dotted.split(".")), data) is None:
                candidates = sweepable_paths(data)
                hint = suggest(dotted, candidates)
                extra = f"; did you mean '{hint}'?" if hint else ""
                problems.append(
                    loaded.problem(
                        where, f"'{dotted}' is not a key of a {data.get('kind')} spec{extra}", prefer_key=True
                    )
                )
    for dotted in set(grid) & set(zipped):
        problems.append(
            loaded.problem(
                ("sweep", "zip", dotted), f"'{dotted}' is swept in both grid and zip; use one", prefer_key=True
            )
        )
    keys = [*grid, *zipped]
    for dotted in keys:
        inside = [k for k in keys if dotted.startswith(k + ".")]
        if inside:
            section = "grid" if dotted in grid else "zip"
            problems.append(
                loaded.problem(
                    ("sweep", section, dotted),
                    f"'{dotted}' is inside '{inside[0]}', which is swept too; sweep one of them",
                    prefer_key=True,
                )
            )
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        problems.append(
            loaded.problem(("sweep", "zip"), f"zip lists must have equal lengths, got {detail}", prefer_key=True)
        )
    tasks = math.prod(len(v) for v in grid.values()) * (min(lengths.values()) if lengths else 1) * sweep.get("seeds", 1)
    if tasks > sweep_mod.MAX_TASKS:
        problems.append(
            loaded.problem(
                ("sweep",),
                f"expands to {tasks:,} tasks; at most {sweep_mod.MAX_TASKS:,} per "
                "experiment (split the sweep into several experiments)",
                prefer_key=True,
            )
        )
    return problems


def sweepable_paths(data: dict) -> list[str]:
    """Every dotted leaf path a sweep may vary in a spec of this kind."""
    return leaf_paths(data, skip=(*EXPERIMENT_KEYS, "kind"))


def _task_problems(spec: Spec) -> list[Problem]:
    """Validate every sweep-expanded task config; bad swept values point at the sweep entry."""
    loaded = spec.loaded
    problems: list[Problem] = []
    for combo in sweep_mod.override_sets(spec.resolved.get("sweep") or {}):
        overrides = {dotted: value for dotted, (value, _) in combo.items()}
        try:
            config = spec.task_config(overrides)
        except SweepTargetError as exc:
            (source,) = [src for key, (_, src) in combo.items() if key == exc.dotted]
            problems.append(loaded.problem(source[:3], str(exc), prefer_key=True))
            continue
        instance = {**config, "experiment": spec.experiment}

        def path_map(path: KeyPath, combo=combo) -> tuple[KeyPath, KeyPath]:
            dotted = ".".join(str(p) for p in path)
            for key, (_, source) in combo.items():
                if dotted == key or dotted.startswith(key + "."):
                    return source, source
            return path, path

        task_problems = schema_problems(loaded, instance, path_map)
        if not task_problems:
            task_problems = _semantic_problems(spec, config, path_map)
        elif all(p.message.startswith(UNKNOWN_KEY) for p in task_problems):
            # Only misspelt keys: the rest of the config is sound, so its semantic problems (a missing data
            # file…) are reported in the same run, not after the user has fixed the spelling.
            task_problems += _semantic_problems_without(spec, config, path_map, task_problems)
        problems += task_problems
    return problems


UNKNOWN_KEY = "unknown key '"


def _semantic_problems_without(spec: Spec, config: dict, path_map, unknown: list[Problem]) -> list[Problem]:
    """The semantic problems of `config` with its unknown keys taken out; none when a key cannot be found
    where the problem says (a swept key) or the checks cannot run on what is left."""
    cleaned = copy.deepcopy(config)
    for problem in unknown:
        *parents, key = problem.path
        node = cleaned
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key not in node:
            return []
        del node[key]
    try:
        return _semantic_problems(spec, cleaned, path_map)
    except (KeyError, TypeError, ValueError, AttributeError):
        return []


def _semantic_problems(spec: Spec, config: dict, path_map) -> list[Problem]:
    """Checks a schema cannot express; each kind adds its own (see runtime.kinds)."""
    from .runtime.kinds import get_kind

    problems = []
    train = config.get("train", {})
    if train.get("log_every", 0) > train.get("steps", 0):
        shown, mark = path_map(("train", "log_every"))
        line, col = spec.loaded.locate(mark)
        problems.append(
            Problem(
                spec.loaded.file,
                line,
                col,
                shown,
                f"expected at most train.steps ({train['steps']}), got {train['log_every']}",
            )
        )
    try:
        found = get_kind(config["kind"]).check_config(config, spec.base_dir)
    except OSError as exc:  # a kind's file check the system refused: still a problem with a place
        found = [(("data",), f"cannot check the data files: {exc.filename or ''}: {exc.strerror or exc}")]
    for path, message in found:
        shown, mark = path_map(path)
        line, col = spec.loaded.locate(mark)
        problems.append(Problem(spec.loaded.file, line, col, shown, message))
    return problems
