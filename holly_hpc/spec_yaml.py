"""Read a spec's YAML safely: bounded in time and memory, every key and value located (file:line:col).

A spec is untrusted input. Before anything is built from it, one pass over PyYAML's event stream (which
is iterative, so depth cannot overflow Python's stack) bounds what the document can make: how deep it
nests, how many nodes it expands to once aliases are followed (an 800-byte "billion laughs" file expands
to a billion), and whether an alias refers to its own ancestor (a cycle). Only then is it composed,
its marks recorded and its values constructed, all linear in the bounded size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KeyPath = tuple  # a key path into the spec: ("train", "lr"), ("sweep", "grid", "train.lr", 1)

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of settings; 1 MiB leaves room for long sweep lists
MAX_DEPTH = 32  # the deepest real spec nests 5 levels
MAX_NODES = 100_000  # nodes after aliases are expanded (a 1,000 x 100 sweep is 100,000)


# --------------------------------------------------------------------------------------------- errors
@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    column: int | None
    path: KeyPath
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        key = format_path(self.path)
        return f"{where}: {key}: {self.message}" if key else f"{where}: {self.message}"


class SpecError(Exception):
    """One or more problems with a spec; str() lists them all, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# ------------------------------------------------------------------------------------ YAML with marks
@dataclass
class LoadedYaml:
    file: str
    text: str
    data: Any
    # path -> (line, column) of the value, and of the key for mapping entries (1-based).
    value_marks: dict = field(default_factory=dict)
    key_marks: dict = field(default_factory=dict)

    def locate(self, path: KeyPath, prefer_key: bool = False) -> tuple[int | None, int | None]:
        """The mark of the deepest existing prefix of `path` (a missing key points at its parent)."""
        marks = self.key_marks if prefer_key else self.value_marks
        p = tuple(path)
        while p:
            if p in marks:
                return marks[p]
            if p in self.value_marks:
                return self.value_marks[p]
            p = p[:-1]
        return self.value_marks.get((), (1, 1))

    def problem(self, path: KeyPath, message: str, prefer_key: bool = False) -> Problem:
        line, col = self.locate(path, prefer_key)
        return Problem(self.file, line, col, tuple(path), message)


class SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, closer to YAML 1.2's core schema: `lr: 1e-4` is a number (PyYAML 1.1 makes it
    a string) and `2024-01-31` stays a string (no implicit timestamps: nothing in a spec is a date). A
    value its tag cannot hold (`!!int abc`, `!!timestamp 2024-02-30`) is a YAML error at its mark."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as exc:
            reason = "more than 4300 digits" if "integer string conversion" in str(exc) else str(exc)
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this {node.tag} value: {reason}", node.start_mark
            ) from None


SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _line_col(text: str, position: int) -> tuple[int, int]:
    line = text.count("\n", 0, position) + 1
    return line, position - (text.rfind("\n", 0, position) + 1) + 1


class _Shape:
    """Walks the event stream once, tracking the key path, depth and expanded size (see module docstring)."""

    def __init__(self, file: str):
        self.file = file
        self.stack: list[dict] = []  # open collections: path, is_mapping, expecting_key, key, size, anchor
        self.anchor_size: dict[str, int] = {}
        self.open_anchors: set[str] = set()
        self.total = 0

    def path(self) -> KeyPath:
        """Where the next event lands: the path of the value being read (a key's own path while reading it)."""
        if not self.stack:
            return ()
        top = self.stack[-1]
        if top["mapping"]:
            return top["path"] + ((top["key"],) if top["key"] is not None else ())
        return top["path"] + (top["items"],)

    def fail(self, event, message: str) -> SpecError:
        mark = event.start_mark
        return SpecError([Problem(self.file, mark.line + 1, mark.column + 1, self.path(), message)])

    def _count(self, event, nodes: int) -> None:
        self.total += nodes
        if self.total > MAX_NODES:
            raise self.fail(
                event,
                f"the spec expands to more than {MAX_NODES:,} YAML nodes (aliases included): "
                "refused, a spec that large is a mistake or an attack",
            )

    def _attach(self, event, size: int) -> None:
        """A finished node of `size` expanded nodes becomes the next child of the innermost open collection."""
        if not self.stack:
            return
        top = self.stack[-1]
        top["size"] += size
        if top["mapping"]:
            if top["expecting_key"]:
                top["key"] = event.value if isinstance(event, yaml.ScalarEvent) else "?"
            else:
                top["key"] = None
            top["expecting_key"] = not top["expecting_key"]
        else:
            top["items"] += 1

    def feed(self, event) -> None:
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(self.stack) >= MAX_DEPTH:
                raise self.fail(event, f"nested deeper than {MAX_DEPTH} levels: refused (a spec needs a handful)")
            self._count(event, 1)
            if event.anchor:
                self.open_anchors.add(event.anchor)
            self.stack.append(
                {
                    "path": self.path(),
                    "mapping": isinstance(event, yaml.MappingStartEvent),
                    "expecting_key": True,
                    "key": None,
                    "items": 0,
                    "size": 1,
                    "anchor": event.anchor,
                }
            )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            node = self.stack.pop()
            if node["anchor"]:
                self.open_anchors.discard(node["anchor"])
                self.anchor_size[node["anchor"]] = node["size"]
            self._attach(event, node["size"])
        elif isinstance(event, yaml.ScalarEvent):
            self._count(event, 1)
            if event.anchor:
                self.anchor_size[event.anchor] = 1
            self._attach(event, 1)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in self.open_anchors:
                raise self.fail(event, f"alias *{event.anchor} refers to a collection that contains it (a cycle)")
            size = self.anchor_size.get(event.anchor, 1)  # an unknown anchor: the composer reports it
            self._count(event, size)
            self._attach(event, size)


def _yaml_problem(file: str, text: str, exc: yaml.YAMLError, path: KeyPath) -> Problem:
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        line, col = mark.line + 1, mark.column + 1
    elif getattr(exc, "position", None) is not None:  # a ReaderError: a character YAML does not allow
        line, col = _line_col(text, exc.position)
    else:
        line, col = 1, 1
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        reason = f"character U+{ord(char):04X} is not allowed in YAML ({exc.reason})"
    else:
        reason = getattr(exc, "problem", None) or str(exc)
    return Problem(file, line, col, path, f"invalid YAML: {reason}")


def load_yaml(path: str | Path) -> LoadedYaml:
    """Parse YAML safely, keeping where each key and value is; duplicate keys are errors."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError([Problem(str(path), None, None, (), f"cannot read spec: {exc.strerror or exc}")]) from exc
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(
            [
                Problem(
                    str(path),
                    None,
                    None,
                    (),
                    f"the spec is {len(raw):,} bytes; refused above {MAX_SPEC_BYTES:,} (is this the right file?)",
                )
            ]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _line_col(raw.decode("utf-8", errors="replace"), exc.start)
        raise SpecError(
            [
                Problem(
                    str(path),
                    line,
                    col,
                    (),
                    f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded (is this a binary file?)",
                )
            ]
        ) from None
    loaded = LoadedYaml(str(path), text, None)
    shape = _Shape(str(path))
    try:
        for event in yaml.parse(text, Loader=SpecLoader):
            shape.feed(event)
        loader = SpecLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise SpecError(
                    [
                        Problem(
                            str(path),
                            1,
                            1,
                            (),
                            "the spec is empty: expected a mapping with at least 'experiment' and 'kind'",
                        )
                    ]
                )
            duplicates: list[Problem] = []
            _record_marks(node, (), loaded, duplicates)
            if duplicates:
                raise SpecError(duplicates)
            loaded.data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        where = shape.path()
        if isinstance(exc, yaml.reader.ReaderError):  # found before any event: read up to the character
            where = _path_before(str(path), text[: exc.position])
        elif isinstance(exc, yaml.constructor.ConstructorError) and exc.problem_mark is not None:
            # Raised after the event pass, at a value whose mark _record_marks has seen.
            at = (exc.problem_mark.line + 1, exc.problem_mark.column + 1)
            where = next((p for p, mark in loaded.value_marks.items() if mark == at), where)
        raise SpecError([_yaml_problem(str(path), text, exc, where)]) from None
    return loaded


def _path_before(file: str, head: str) -> KeyPath:
    """The key path at the end of `head` (the text before a bad character), as far as it parses."""
    shape = _Shape(file)
    try:
        for event in yaml.parse(head, Loader=SpecLoader):
            if not head[event.start_mark.index :].strip():  # what the parser makes up at the cut (an empty value)
                break
            shape.feed(event)
    except (yaml.YAMLError, SpecError):
        pass
    return shape.path()


def _record_marks(node: yaml.Node, path: KeyPath, loaded: LoadedYaml, problems: list[Problem]) -> None:
    """Marks of every key and value; the walk follows aliases, which _Shape has already bounded."""
    loaded.value_marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            sub = (*path, key)
            line = key_node.start_mark.line + 1
            if key in seen and key != "<<":  # YAML merge keys may repeat
                problems.append(
                    Problem(
                        loaded.file,
                        line,
                        key_node.start_mark.column + 1,
                        sub,
                        f"duplicate key (first set on line {seen[key]})",
                    )
                )
            seen.setdefault(key, line)
            loaded.key_marks[sub] = (line, key_node.start_mark.column + 1)
            _record_marks(value_node, sub, loaded, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_marks(item, (*path, i), loaded, problems)
