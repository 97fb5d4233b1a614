"""A localisation file's columns as stored, before any meaning is given to them.

One reader per container: CSV (comment lines starting with '#' kept aside, as DECODE writes its metadata
there), HDF5 (a group's datasets, a compound dataset's fields or a matrix's columns) and MATLAB .mat (v5
through scipy, v7.3 through h5py; a dotted `dataset` reaches into nested structs, as SMAP's
`saveloc.loc`). Every reader can stop at the header (`header_only=True`): column names without data,
what `validate` needs, without reading a large file.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.io


class LocalisationFormatError(ValueError):
    """A localisation file that cannot be used; the message names the file (and column and line).

    `key`: the spec key (under data.localisations) that would fix it, when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


_MATLAB_NUMERIC = {"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}


@dataclass
class RawTable:
    """A file's columns in file order. `columns[name]` is None when only the header was read. `lines`
    (CSV only): each row's line number, for messages; `comments`: the '#' lines before the header."""

    path: Path
    container: str  # "csv", "hdf5" or "mat"
    columns: dict[str, np.ndarray | None]
    lines: list[int] | None = None
    comments: list[str] = field(default_factory=list)
    dataset: str | None = None  # where in the file the table was found (HDF5/MAT)

    def where(self, row: int) -> str:
        """'file:line' for a CSV row, 'file: row N' (1-based) otherwise."""
        return f"{self.path}:{self.lines[row]}" if self.lines is not None else f"{self.path}: row {row + 1}"


CONTAINERS = {".csv": "csv", ".h5": "hdf5", ".hdf5": "hdf5", ".mat": "mat"}


def read_raw(path: Path, dataset: str | None = None, header_only: bool = False, by_position: bool = False) -> RawTable:
    """The table in `path`; `by_position`: .mat columns are given by position, so look for a matrix."""
    container = CONTAINERS.get(path.suffix.lower())
    if container is None:
        raise LocalisationFormatError(
            f"{path}: unknown localisation file type {path.suffix!r}; expected one of {', '.join(CONTAINERS)}"
        )
    if container == "csv" and dataset is not None:
        raise LocalisationFormatError(f"{path}: `dataset` applies to HDF5 and .mat files, not to CSV", key="dataset")
    if not path.is_file():
        raise LocalisationFormatError(f"{path}: no such file", key="path")
    if container == "csv":
        return _read_csv(path, header_only)
    if container == "hdf5":
        return _read_hdf5(path, dataset, header_only)
    return _read_mat(path, dataset, header_only, by_position)


# ------------------------------------------------------------------------------------------------ CSV
def _read_csv(path: Path, header_only: bool) -> RawTable:
    comments: list[str] = []
    numbers: list[int] = []  # the line number of the line last handed to the csv reader

    def content(handle):
        for number, line in enumerate(handle, start=1):
            stripped = line.strip()
            if stripped.startswith("#"):
                comments.append(stripped)
                continue
            if not stripped:
                continue  # blank line
            numbers.append(number)
            yield line

    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(content(handle))
            header = next(reader, None)
            if not header:
                raise LocalisationFormatError(f"{path}: empty file (expected a header row)")
            header_line = numbers[-1]
            names = [name.strip() for name in header]
            if len(set(names)) < len(names):
                raise LocalisationFormatError(
                    f"{path}:{header_line}: the header repeats a column name: {', '.join(names)}"
                )
            if header_only:
                return RawTable(path, "csv", dict.fromkeys(names), [], comments)
            rows, lines = [], []
            for row in reader:
                if len(row) != len(names):
                    fields = f"{len(row)} fields, but the header (line {header_line}) has {len(names)}"
                    raise LocalisationFormatError(f"{path}:{numbers[-1]}: {fields}")
                rows.append(row)
                lines.append(numbers[-1])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LocalisationFormatError(f"{path}: cannot read CSV file: {exc}") from exc
    cells = np.array(rows, dtype=object).reshape(len(rows), len(names))
    return RawTable(path, "csv", {name: cells[:, i] for i, name in enumerate(names)}, lines, comments)


# ----------------------------------------------------------------------------------------------- HDF5
def _read_hdf5(path: Path, dataset: str | None, header_only: bool) -> RawTable:
    try:
        with h5py.File(path, "r") as f:
            node = _hdf5_node(path, f, dataset)
            where = node.name.lstrip("/") or None
            if isinstance(node, h5py.Group):
                items = {name: item for name, item in node.items() if isinstance(item, h5py.Dataset)}
                columns = {name: None if header_only else item[()] for name, item in items.items()}
                return RawTable(path, "hdf5", columns, dataset=where)
            if header_only:
                return RawTable(path, "hdf5", _table_names(path, node.name, node.dtype, node.shape), dataset=where)
            return RawTable(path, "hdf5", _table_columns(path, node.name, node[()]), dataset=where)
    except OSError as exc:
        raise LocalisationFormatError(f"{path}: cannot read HDF5 file: {exc}") from exc


def _hdf5_node(path: Path, f: h5py.File, dataset: str | None) -> h5py.Group | h5py.Dataset:
    if dataset is not None:
        node = f.get(dataset.replace(".", "/") if dataset not in f else dataset)
        if node is None:
            raise LocalisationFormatError(
                f"{path}: no dataset or group {dataset!r}; the root holds: {', '.join(f) or 'nothing'}", key="dataset"
            )
        return node
    members = list(f.values())
    lone = members[0] if len(members) == 1 else None
    if isinstance(lone, h5py.Dataset) and (lone.dtype.names or lone.ndim == 2):
        return lone
    if isinstance(f.get("locs"), h5py.Dataset):  # Picasso keeps its table in 'locs' (beside nothing, usually)
        return f["locs"]
    return f


# ------------------------------------------------------------------------------------------------ MAT
def _read_mat(path: Path, dataset: str | None, header_only: bool, by_position: bool) -> RawTable:
    variables = _read_mat73(path, dataset, header_only) if _is_mat73(path) else _read_mat5(path, dataset)
    if dataset is None and not by_position:  # one column vector per variable
        return RawTable(path, "mat", {k: None if isinstance(v, tuple) else v for k, v in variables.items()})
    if dataset is None:
        matrices = [name for name, v in variables.items() if _is_matrix(v)]
        if len(matrices) != 1:
            found = ", ".join(matrices) or "none"
            raise LocalisationFormatError(
                f"{path}: columns given by position need one numeric matrix variable, found: {found}; name it with dataset=",
                key="dataset",
            )
        dataset = matrices[0]
        value = variables[dataset]
    else:
        value = variables
    if isinstance(value, dict):  # a struct: its fields are the columns
        return RawTable(
            path, "mat", {k: None if isinstance(v, tuple) else v for k, v in value.items()}, dataset=dataset
        )
    if header_only and isinstance(value, tuple):  # (shape, dtype) of a matrix read header-only
        return RawTable(path, "mat", {f"column {i}": None for i in range(value[0][1])}, dataset=dataset)
    return RawTable(path, "mat", _table_columns(path, dataset, value), dataset=dataset)


def _is_matrix(value) -> bool:
    if isinstance(value, tuple):
        shape, _ = value
        return len(shape) == 2 and shape[1] > 1
    return isinstance(value, np.ndarray) and value.dtype.kind in "iuf" and value.ndim == 2 and value.shape[1] > 1


def _is_mat73(path: Path) -> bool:
    try:
        return h5py.is_hdf5(path)
    except OSError:
        return False


def _read_mat5(path: Path, dataset: str | None) -> dict:
    """Variables of a v5 file, or (with `dataset`) the variable or struct field it names."""
    top = dataset.split(".")[0] if dataset else None
    try:
        loaded = scipy.io.loadmat(path, simplify_cells=True, variable_names=[top] if top else None)
    except (OSError, ValueError, TypeError, NotImplementedError, scipy.io.matlab.MatReadError) as exc:
        raise LocalisationFormatError(f"{path}: cannot read MATLAB file: {exc}") from exc
    variables = {k: v for k, v in loaded.items() if not k.startswith("__")}
    if dataset is None:
        return {k: np.asarray(v) for k, v in variables.items() if _is_numeric(v)}
    if top not in variables:
        held = [name for name, _, _ in scipy.io.whosmat(path)]
        raise LocalisationFormatError(_missing(path, dataset, 0, held), key="dataset")
    node: object = variables
    for depth, part in enumerate(dataset.split(".")):
        if not isinstance(node, dict) or part not in node:
            raise LocalisationFormatError(
                _missing(path, dataset, depth, list(node) if isinstance(node, dict) else []), key="dataset"
            )
        node = node[part]
    if isinstance(node, dict):
        return {k: np.asarray(v) for k, v in node.items() if _is_numeric(v)}
    return node


def _is_numeric(value) -> bool:
    """A number or numeric array (simplify_cells hands 1x1 arrays over as Python numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, np.ndarray) and value.dtype.kind in "iuf"


def _read_mat73(path: Path, dataset: str | None, header_only: bool) -> dict:
    try:
        with h5py.File(path, "r") as f:
            node = f
            if dataset:
                for depth, part in enumerate(dataset.split(".")):
                    if not isinstance(node, h5py.Group) or part not in node:
                        held = [k for k in node if not k.startswith("#")] if isinstance(node, h5py.Group) else []
                        raise LocalisationFormatError(_missing(path, dataset, depth, held), key="dataset")
                    node = node[part]
            if isinstance(node, h5py.Dataset):
                shape = tuple(reversed(node.shape))  # MATLAB is column-major: h5py sees the transpose
                return (shape, node.dtype) if header_only else np.asarray(node[()]).T
            variables = {}
            for name, item in node.items():
                # Only numeric arrays can be columns: skip #refs#, structs, cells, chars (uint16) and logicals (uint8).
                numeric = isinstance(item, h5py.Dataset) and _matlab_class(item) in _MATLAB_NUMERIC
                if numeric and "MATLAB_empty" not in item.attrs:
                    variables[name] = (
                        (tuple(reversed(item.shape)), item.dtype) if header_only else np.asarray(item[()]).T
                    )
            return variables
    except OSError as exc:
        raise LocalisationFormatError(f"{path}: cannot read MATLAB v7.3 (HDF5) file: {exc}") from exc


def _missing(path: Path, dataset: str, depth: int, held: list[str]) -> str:
    parts = dataset.split(".")
    if depth == 0:
        return f"{path}: no variable {parts[0]!r}; the file holds: {', '.join(held) or 'nothing'}"
    return f"{path}: no field {parts[depth]!r} in {'.'.join(parts[:depth])}; it holds: {', '.join(held) or 'no fields'}"


def _matlab_class(item: h5py.Dataset) -> str:
    value = item.attrs.get("MATLAB_class", b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def _table_names(path: Path, name: str, dtype: np.dtype, shape: tuple) -> dict[str, None]:
    if dtype.names:
        return dict.fromkeys(dtype.names)
    if len(shape) == 2:
        return {f"column {i}": None for i in range(shape[1])}
    raise LocalisationFormatError(
        f"{path}: {name!r} is not a table: expected a compound or 2D array, got shape {shape}"
    )


def _table_columns(path: Path, name: str, data: np.ndarray) -> dict[str, np.ndarray]:
    """The columns of one table-shaped array: the fields of a compound array, or the columns of a matrix."""
    data = np.asarray(data)
    if data.dtype.names:
        return {field_name: data[field_name] for field_name in data.dtype.names}
    if data.ndim == 2:
        return {f"column {i}": data[:, i] for i in range(data.shape[1])}
    raise LocalisationFormatError(
        f"{path}: {name!r} is not a table: expected a compound or 2D array, got shape {data.shape}"
    )
