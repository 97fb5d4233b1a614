"""Which group (a cell, a well, a track) and which time point each image belongs to, for the evaluation's
grouped and temporal splits (spec keys eval.group_by and eval.time_by).

A rule is one of
  {column: NAME}   a column of the labels CSV (data.folder.labels), on the row of the image's file
  {folder: LEVEL}  the image's folder at that depth below the data root (0: the first subfolder)
  {regex: PATTERN} a regular expression searched in the image's path below the root (or its id in a zarr
                   store): its group named `key`, else its first group, else the whole match
Times are numbers (a regex on `t0042` gives 42). Every image of the evaluation needs a key; one without
is an error naming the image and the rule, never a silent group of its own.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path, PurePosixPath

import numpy as np

from ..io.images import ImageCollection
from ..io.images.folders import csv_file_name


class GroupRuleError(ValueError):
    """A rule that cannot give every image its key (the message names the spec key and the image)."""


def rule_problem(rule: dict | None, key: str, source: str, labels: str) -> str | None:
    """What is wrong with a rule before any image is read (for validate), or None."""
    if rule is None:
        return None
    if "regex" in rule:
        try:
            re.compile(rule["regex"])
        except re.error as exc:
            return f"{key}.regex is not a regular expression: {exc}"
    if "column" in rule and (source != "folder" or labels in ("none", "folders")):
        return f"{key}.column reads the labels CSV: it needs data.source: folder with data.folder.labels a CSV file"
    if "folder" in rule and source != "folder":
        return f"{key}.folder reads the folders below data.folder.path: it needs data.source: folder"
    return None


def _csv_column(path: Path, column: str, key: str) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        found = [name.strip() for name in reader.fieldnames or []]
        if column not in found:
            raise GroupRuleError(f"{key}: {path} has no column {column!r} (its columns: {', '.join(found)})")
        reader.fieldnames = found
        out = {}
        for row in reader:
            value = (row[column] or "").strip()
            if value:
                out[csv_file_name(row["file"] or "")] = value
        return out


def _key_of(name: str, rule: dict, key: str, table: dict[str, str] | None) -> str:
    if "column" in rule:
        if name not in table:
            raise GroupRuleError(f"{key}: {name} has no value in column {rule['column']!r} of the labels CSV")
        return table[name]
    if "folder" in rule:
        parts = PurePosixPath(name).parts[:-1]
        level = rule["folder"]
        if level >= len(parts):
            raise GroupRuleError(f"{key}: {name} has no folder at level {level} below the data root")
        return parts[level]
    match = re.search(rule["regex"], name)
    if match is None:
        raise GroupRuleError(f"{key}: regex '{rule['regex']}' does not match {name}")
    if "key" in match.groupdict():
        return match.group("key")
    return match.group(1) if match.groups() else match.group(0)


def image_keys(
    collection: ImageCollection, indices, rule: dict | None, key: str, labels_csv: Path | None = None
) -> np.ndarray | None:
    """The rule's key of every image at `indices` (strings), or None without a rule."""
    if rule is None:
        return None
    names = collection.split_ids  # files below the root for folders (planes of one stack share it), ids else
    table = _csv_column(labels_csv, rule["column"], key) if "column" in rule else None
    return np.array([_key_of(names[int(i)], rule, key, table) for i in indices], dtype=object)


def image_times(
    collection: ImageCollection, indices, rule: dict | None, key: str, labels_csv: Path | None = None
) -> np.ndarray | None:
    """The rule's time of every image at `indices` as numbers, or None without a rule."""
    keys = image_keys(collection, indices, rule, key, labels_csv)
    if keys is None:
        return None
    try:
        return np.array([float(k) for k in keys])
    except ValueError as exc:
        raise GroupRuleError(f"{key}: a time must be a number: {exc}") from None
