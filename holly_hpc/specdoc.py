"""The spec reference, generated from schemas/jobspec.schema.json (the README embeds its output)."""

from __future__ import annotations

import json

from .schema_walk import load_schema, resolve


def _type_of(schema: dict) -> str:
    if "anyOf" in schema:
        return " or ".join(_type_of(option) for option in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array" and "items" in schema:
        return f"list of {schema['items'].get('type', 'any')}"
    return kind


def _constraints(schema: dict) -> str:
    parts = []
    for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            parts.append(f"{op} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"matches `{schema['pattern']}`")
    return ", ".join(parts)


def _cell(text: str) -> str:
    """Escape what would break a markdown table cell or be read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _rows(props: dict, root: dict, prefix: str, required: set) -> list[str]:
    rows = []
    for name, unresolved in props.items():
        sub = resolve(unresolved, root)
        default = json.dumps(sub["default"]) if "default" in sub and not isinstance(sub["default"], dict) else ""
        if name in required:
            default = "**required**"
        rows.append(
            f"| `{prefix}{name}` | {_type_of(sub)} | {default} | {_cell(_constraints(sub))} | {_cell(sub.get('description', ''))} |"
        )
        if "properties" in sub:  # a nested section (data.simulate, ...): its keys follow it
            rows += _rows(sub["properties"], root, f"{prefix}{name}.", set(sub.get("required", [])))
    return rows


def _section(title: str, props: dict, root: dict, prefix: str, required=()) -> str:
    header = f"\n#### {title}\n\n| key | type | default | constraint | meaning |\n|---|---|---|---|---|\n"
    return header + "\n".join(_rows(props, root, prefix, set(required))) + "\n"


def reference_markdown() -> str:
    root = load_schema()
    out = [
        "<!-- generated from schemas/jobspec.schema.json by `python -m holly_hpc.specdoc` (or `holly-hpc reference`); tests/test_docs.py keeps it in sync -->\n"
    ]
    top = {
        k: v
        for k, v in root["properties"].items()
        if k not in ("data", "model", "train", "sweep", "launch", "registry")
    }
    out.append(_section("top level", top, root, "", root.get("required", [])))
    for name in ("sweep", "launch", "registry"):
        out.append(_section(name, resolve(root["$defs"][name], root)["properties"], root, f"{name}."))
    for part in root.get("allOf", []):
        kind = part["if"]["properties"]["kind"]["const"]
        for section, ref in part["then"]["properties"].items():
            schema = resolve(ref, root)
            props = dict(schema.get("properties", {}))
            for inner in schema.get("allOf", []):
                props = {**resolve(inner, root).get("properties", {}), **props}
            if props:  # a section the kind does not have (eval outside embed) gets no empty table
                out.append(_section(f"kind: {kind} — {section}", props, root, f"{section}."))
    return "".join(out)


def update_readme(path: str = "README.md") -> None:
    """Replace the text between the README's reference markers with the generated reference."""
    from pathlib import Path

    readme = Path(path)
    text = readme.read_text(encoding="utf-8")
    start_marker, end_marker = "<!-- reference:start -->\n", "<!-- reference:end -->"
    start = text.index(start_marker) + len(start_marker)
    end = text.index(end_marker)
    readme.write_text(text[:start] + reference_markdown() + text[end:], encoding="utf-8")


if __name__ == "__main__":
    update_readme()
