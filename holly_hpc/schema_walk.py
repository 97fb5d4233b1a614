"""Navigating the jobspec JSON Schema (schemas/jobspec.schema.json): local $ref resolution, the if/then/else
branches an instance selects (a kind's sections), the properties a key path has, and the defaults it fills in.

It only reads the schema; validating a spec against it, and reporting problems, is holly_hpc.spec's job.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import jsonschema

from .resources import schema_file

if TYPE_CHECKING:
    from .spec_yaml import KeyPath

__all__ = [
    "apply_defaults",
    "effective_properties",
    "known_keys",
    "leaf_paths",
    "load_schema",
    "property_schema",
    "resolve",
]


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    schema = json.loads(schema_file("jobspec.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def resolve(schema: dict, root: dict) -> dict:
    """`schema` with its local $refs (`#/...` into `root`) followed; its own keys win over the target's."""
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $refs are supported, got {ref}")
        target = root
        for part in ref[2:].split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def effective_properties(schema: dict, instance: Any, root: dict | None = None) -> dict[str, dict]:
    """The property subschemas that apply to `instance`: properties + allOf parts + matching if/then."""
    root = root or load_schema()
    schema = resolve(schema, root)
    props: dict[str, dict] = {}
    for name, sub in schema.get("properties", {}).items():
        props[name] = sub
    for conditional in schema.get("allOf", []):
        part = resolve(conditional, root)
        if "if" in part:
            branch = "then" if jsonschema.Draft202012Validator(part["if"]).is_valid(instance) else "else"
            part = resolve(part.get(branch, {}), root)
        for name, sub in effective_properties(part, instance, root).items():
            # A later, more specific subschema (a kind's data section) refines the generic one.
            props[name] = {"allOf": [props[name], sub]} if name in props else sub
    return props


def _subschema_parts(schema: dict, root: dict) -> list[dict]:
    schema = resolve(schema, root)
    parts = [schema]
    for part in schema.get("allOf", []):
        parts.extend(_subschema_parts(part, root))
    return parts


def property_schema(path: KeyPath, instance: dict) -> dict | None:
    """The merged schema of the property at `path` in a spec like `instance`, or None if it does not exist."""
    root = load_schema()
    schema: dict = root
    node: Any = instance
    for part in path:
        props = effective_properties(schema, node, root) if isinstance(node, dict) or node is None else {}
        if part not in props:
            return None
        schema = props[part]
        node = node.get(part) if isinstance(node, dict) else None
    return schema


def known_keys(path: KeyPath, instance: dict) -> list[str]:
    """Keys allowed in the mapping at `path` (for 'did you mean' suggestions)."""
    root = load_schema()
    if not path:
        return sorted(effective_properties(root, instance, root))
    schema = property_schema(path, instance)
    if schema is None:
        return []
    node = instance
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    keys: set[str] = set()
    for part in _subschema_parts(schema, root):
        keys.update(effective_properties(part, node if isinstance(node, dict) else {}, root))
    return sorted(keys)


def apply_defaults(instance: Any, schema: dict | None = None, root: dict | None = None) -> Any:
    """Fill schema defaults into a copy of `instance`, recursing into objects (defaults live only in the schema)."""
    root = root or load_schema()
    schema = root if schema is None else schema
    if not isinstance(instance, dict):
        return instance
    out = copy.deepcopy(instance)
    merged: dict[str, list[dict]] = {}
    for part in _subschema_parts(schema, root):
        for name, sub in effective_properties(part, out, root).items():
            merged.setdefault(name, []).extend(_subschema_parts(sub, root))
    for name, parts in merged.items():
        if name not in out:
            for part in parts:
                if "default" in part:
                    out[name] = copy.deepcopy(part["default"])
                    break
        if name in out and isinstance(out[name], dict):
            out[name] = apply_defaults(out[name], {"allOf": parts}, root)
    return out


def leaf_paths(instance: dict, skip: Collection[str] = ()) -> list[str]:
    """Every dotted leaf path of a spec like `instance`, sorted, leaving out the top-level keys in `skip`."""
    out: list[str] = []
    root = load_schema()

    def walk(schema: dict, node: Any, prefix: tuple) -> None:
        props: dict[str, dict] = {}
        for part in _subschema_parts(schema, root):
            for name, sub in effective_properties(part, node if isinstance(node, dict) else {}, root).items():
                props.setdefault(name, {"allOf": []})["allOf"].append(sub)
        if not props:
            if prefix:
                out.append(".".join(prefix))
            return
        for name, sub in props.items():
            if not prefix and name in skip:
                continue
            walk(sub, node.get(name) if isinstance(node, dict) else None, (*prefix, name))

    walk(root, instance, ())
    return sorted(out)
