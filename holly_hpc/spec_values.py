"""Rules every value of a spec obeys, whatever its key: checked before the schema, for the whole document.

- No control characters in any string or key (tab excepted). Spec strings reach #SBATCH lines, shell
  command lines, folder names and the registry; a newline in `resources.partition` would end the
  #SBATCH comment and start a shell command, and no quoting helps inside a comment. Line and paragraph
  separators and the bidirectional overrides are refused too: they make a script read differently from
  how it runs.
- Numbers are finite (NaN passes every JSON Schema bound: it is neither above nor below anything) and
  integers fit in a double (±2^53), so they survive JSON, SQLite, PostgreSQL and torch unchanged.
- Mapping keys are strings, as in JSON.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .spec_yaml import LoadedYaml, Problem

# C0 except tab, DEL, C1, U+2028/2029 (line/paragraph separators), bidi embeddings/overrides/isolates.
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
MAX_INT = 2**53


def control_character(text: str) -> str | None:
    """The first forbidden character of `text` as 'U+000A (line feed)', or None."""
    match = CONTROL.search(text)
    if not match:
        return None
    char = match.group()
    names = {
        "\n": "line feed",
        "\r": "carriage return",
        "\x00": "NUL",
        "\x1b": "escape",
        "\x7f": "delete",
        "\u2028": "line separator",
        "\u2029": "paragraph separator",
    }
    return f"U+{ord(char):04X}" + (f" ({names[char]})" if char in names else "")


def refuse_control(text: str, what: str) -> None:
    """Raise ValueError if `text` (a path or value given outside a spec) holds a control character."""
    bad = control_character(text)
    if bad:
        raise ValueError(f"{what}: control character {bad} in {text!r}: refused (it would reach scripts and paths)")


def value_problems(loaded: LoadedYaml) -> list[Problem]:
    """Every violation of the rules above in the loaded document, each at its key or value."""
    problems: list[Problem] = []
    seen: set[int] = set()  # alias-shared containers are checked once (their marks are the anchor's)

    def walk(value: Any, path: tuple) -> None:
        if isinstance(value, dict):
            if id(value) in seen:
                return
            seen.add(id(value))
            for key, item in value.items():
                if not isinstance(key, str):
                    problems.append(
                        loaded.problem(
                            (*path, str(key)),
                            f"expected a string key, got {type(key).__name__} {key!r} (quote it)",
                            prefer_key=True,
                        )
                    )
                    continue
                bad = control_character(key)
                if bad:
                    problems.append(
                        loaded.problem((*path, key), f"control character {bad} in a key: refused", prefer_key=True)
                    )
                    continue
                walk(item, (*path, key))
        elif isinstance(value, list):
            if id(value) in seen:
                return
            seen.add(id(value))
            for i, item in enumerate(value):
                walk(item, (*path, i))
        elif isinstance(value, str):
            bad = control_character(value)
            if bad:
                problems.append(
                    loaded.problem(
                        path,
                        f"control character {bad} in a string: refused (spec strings "
                        "reach scripts, command lines, folder names and the registry; "
                        "write text on one line, or fold it with '>-')",
                    )
                )
        elif isinstance(value, bool):
            return
        elif isinstance(value, float):
            if not math.isfinite(value):
                problems.append(loaded.problem(path, f"expected a finite number, got {value}"))
        elif isinstance(value, int) and abs(value) > MAX_INT:
            problems.append(
                loaded.problem(
                    path, f"expected an integer between -2^53 and 2^53, got one of {value.bit_length()} bits"
                )
            )

    walk(loaded.data, ())
    return problems
