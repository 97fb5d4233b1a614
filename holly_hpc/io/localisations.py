"""Single-molecule localisation tables in: x, y[, z] in nanometres, grouped by particle.

Formats, by extension:

- `.csv`: comma-separated, the first row is the header.
- `.h5` / `.hdf5`: columns are the datasets of a group, the fields of a compound dataset, or the
  columns of a 2D (rows x columns) dataset. `dataset` is the path of that group or dataset; by default
  the root's only dataset when it holds nothing else and is a table, otherwise the root group.
- `.mat`: MATLAB v5 (scipy) or v7.3 (HDF5 behind a MATLAB header, read with h5py; MATLAB stores its
  arrays transposed there). Either one column vector per variable, named like the columns, or one
  numeric matrix variable whose columns are given by position (`columns={"x": 0, "y": 1, "particle": 3}`);
  `dataset` names that variable when the file holds several. HOLLy's CEP152 data came as .mat files.

`columns` maps the roles x, y, z, particle to column names or 0-based positions (in file order). A
name matches a column exactly, else case-insensitively, else after dropping spaces, '_' and '-' and a
trailing nanometre unit: "x [nm]", "X (nm)", "x_nm" and "xnm" all match "x". Other units ("x [px]")
never match, so that a table in pixels or micrometres is not read silently as nanometres.

z and particle are optional while they keep their default names: no z column gives 2D points, no
particle column makes every row particle 0. A column named explicitly is required; None turns an
optional role off. Error messages name the file, and the CSV line or the 1-based row where they apply.
"""

from __future__ import annotations

import csv
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.io

DEFAULT_COLUMNS = {"x": "x", "y": "y", "z": "z", "particle": "particle"}
REQUIRED_ROLES = ("x", "y")
# Fewer localisations than this give no usable centroid or shape; such particles are dropped.
MIN_LOCALISATIONS = 3
_MATLAB_NUMERIC = {"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}


class LocalisationFormatError(ValueError):
    """A localisation file that cannot be used; the message names the file (and column and line)."""


@dataclass
class LocalisationTable:
    """Localisations per particle id: (n, 2) or (n, 3) float64 arrays of x, y[, z] in nm."""

    particles: dict[int, np.ndarray]
    source: str
    has_z: bool
    dropped: list[int] = field(default_factory=list)  # ids of particles with < MIN_LOCALISATIONS rows

    def counts(self) -> dict[int, int]:
        """Localisations per particle id."""
        return {pid: len(points) for pid, points in self.particles.items()}


@dataclass
class _RawTable:
    """A file's columns in file order, unchecked. `lines` (CSV only): each row's line number; its
    presence also says the cells are text still to be parsed."""

    columns: dict[str, np.ndarray]
    lines: list[int] | None = None


def read_localisations(path: str | Path, columns: dict | None = None, dataset: str | None = None) -> LocalisationTable:
    """Read a localisation table and group it by particle (sorted ids), dropping particles with too few rows."""
    path = Path(path)
    roles = _roles(columns)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        expected = ", ".join(_READERS)
        raise LocalisationFormatError(
            f"{path}: unknown localisation file type {path.suffix!r}; expected one of {expected}"
        )
    if suffix == ".csv" and dataset is not None:
        raise ValueError(f"{path}: `dataset` applies to HDF5 and .mat files, not to CSV")
    if not path.is_file():
        raise LocalisationFormatError(f"{path}: no such file")
    raw = _READERS[suffix](path, dataset, roles)
    values = {}
    for role, spec in roles.items():
        name = _find_column(path, raw, role, spec, explicit=role in (columns or {}))
        if name is not None:
            values[role] = _numeric_column(path, raw, name)
    return _group(path, raw, values)


def centre_particles(table: LocalisationTable) -> LocalisationTable:
    """The same table with every particle moved so that its centroid is at the origin."""
    centred = {pid: points - points.mean(axis=0) for pid, points in table.particles.items()}
    return LocalisationTable(centred, table.source, table.has_z, list(table.dropped))


def _roles(columns: dict | None) -> dict:
    roles = {**DEFAULT_COLUMNS, **(columns or {})}
    unknown = sorted(set(roles) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f"unknown column role(s) {unknown}; the roles are {', '.join(DEFAULT_COLUMNS)}")
    for role, spec in roles.items():
        if spec is None and role in REQUIRED_ROLES:
            raise ValueError(f"column role {role!r} is required and cannot be None")
        if spec is not None and not isinstance(spec, (str, int, np.integer)):
            raise ValueError(f"column role {role!r}: expected a column name or a 0-based position, got {spec!r}")
    return {role: spec for role, spec in roles.items() if spec is not None}


# --- readers: each returns the file's columns, unchecked ----------------------------------------------


def _read_csv(path: Path, dataset: str | None, roles: dict) -> _RawTable:
    # dataset and roles do not apply: a CSV file holds one table, with named columns.
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if not header:
                raise LocalisationFormatError(f"{path}: empty file (expected a header row)")
            rows, lines = [], []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                if len(row) != len(header):
                    fields = f"{len(row)} fields, but the header has {len(header)}"
                    raise LocalisationFormatError(f"{path}:{reader.line_num}: {fields}")
                rows.append(row)
                lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LocalisationFormatError(f"{path}: cannot read CSV file: {exc}") from exc
    names = [name.strip() for name in header]
    if len(set(names)) < len(names):
        raise LocalisationFormatError(f"{path}:1: the header repeats a column name: {', '.join(names)}")
    cells = np.array(rows, dtype=object).reshape(len(rows), len(names))
    return _RawTable({name: cells[:, i] for i, name in enumerate(names)}, lines)


def _read_hdf5(path: Path, dataset: str | None, roles: dict) -> _RawTable:
    try:
        with h5py.File(path, "r") as f:
            node = _hdf5_node(path, f, dataset)
            if isinstance(node, h5py.Group):
                return _RawTable({name: item[()] for name, item in node.items() if isinstance(item, h5py.Dataset)})
            return _RawTable(_table_columns(path, node.name, node[()]))
    except OSError as exc:
        raise LocalisationFormatError(f"{path}: cannot read HDF5 file: {exc}") from exc


def _hdf5_node(path: Path, f: h5py.File, dataset: str | None) -> h5py.Group | h5py.Dataset:
    if dataset is not None:
        node = f.get(dataset)
        if node is None:
            raise LocalisationFormatError(
                f"{path}: no dataset or group {dataset!r}; the root holds: {', '.join(f) or 'nothing'}"
            )
        return node
    members = list(f.values())
    lone = members[0] if len(members) == 1 else None
    if isinstance(lone, h5py.Dataset) and (lone.dtype.names or lone.ndim == 2):
        return lone
    return f


def _read_mat(path: Path, dataset: str | None, roles: dict) -> _RawTable:
    try:
        variables = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    except NotImplementedError:  # scipy's answer to v7.3, an HDF5 file behind a 512-byte MATLAB header
        variables = _read_mat73(path)
    except (OSError, ValueError, TypeError, scipy.io.matlab.MatReadError) as exc:
        raise LocalisationFormatError(f"{path}: cannot read MATLAB file: {exc}") from exc
    by_position = any(isinstance(spec, (int, np.integer)) for spec in roles.values())
    if dataset is None and not by_position:
        return _RawTable(variables)  # one column vector per variable
    if dataset is None:
        matrices = [name for name, v in variables.items() if v.dtype.kind in "iuf" and v.ndim == 2 and v.shape[1] > 1]
        if len(matrices) != 1:
            found = ", ".join(matrices) or "none"
            raise LocalisationFormatError(
                f"{path}: columns given by position need one numeric matrix variable, found: {found}; name it with dataset="
            )
        dataset = matrices[0]
    if dataset not in variables:
        raise LocalisationFormatError(
            f"{path}: no variable {dataset!r}; the file holds: {', '.join(variables) or 'nothing'}"
        )
    return _RawTable(_table_columns(path, dataset, variables[dataset]))


def _read_mat73(path: Path) -> dict[str, np.ndarray]:
    variables = {}
    try:
        with h5py.File(path, "r") as f:
            for name, item in f.items():
                # Only numeric arrays can be columns: skip #refs#, structs, cells, chars (uint16) and logicals (uint8).
                numeric = isinstance(item, h5py.Dataset) and _matlab_class(item) in _MATLAB_NUMERIC
                if numeric and "MATLAB_empty" not in item.attrs:
                    variables[name] = np.asarray(item[()]).T  # MATLAB is column-major: undo the transpose
    except OSError as exc:
        raise LocalisationFormatError(f"{path}: cannot read MATLAB v7.3 (HDF5) file: {exc}") from exc
    return variables


def _matlab_class(item: h5py.Dataset) -> str:
    value = item.attrs.get("MATLAB_class", b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def _table_columns(path: Path, name: str, data: np.ndarray) -> dict[str, np.ndarray]:
    """The columns of one table-shaped array: the fields of a compound array, or the columns of a matrix."""
    if data.dtype.names:
        return {field_name: data[field_name] for field_name in data.dtype.names}
    if data.ndim == 2:
        return {f"column {i}": data[:, i] for i in range(data.shape[1])}
    raise LocalisationFormatError(
        f"{path}: {name!r} is not a table: expected a compound or 2D array, got shape {data.shape}"
    )


_READERS = {".csv": _read_csv, ".h5": _read_hdf5, ".hdf5": _read_hdf5, ".mat": _read_mat}


# --- from columns to particles ---------------------------------------------------------------------------


def _find_column(path: Path, raw: _RawTable, role: str, spec: str | int, explicit: bool) -> str | None:
    """The name of the column that plays `role`; None for an optional role that the file lacks."""
    names = list(raw.columns)
    if isinstance(spec, (int, np.integer)):
        if 0 <= spec < len(names):
            return names[spec]
        raise LocalisationFormatError(
            f"{path}: {role}: no column at position {spec}; the table has {len(names)} columns"
        )
    for key in (lambda n: n, str.lower, _normalise):
        matches = [n for n in names if key(n) == key(spec)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise LocalisationFormatError(
                f"{path}: {role}: several columns match {spec!r}: {', '.join(matches)}; name one exactly"
            )
    if role in REQUIRED_ROLES or explicit:
        listing = ", ".join(names) or "none"
        raise LocalisationFormatError(
            f"{path}: {role}: no column {spec!r}; the columns are: {listing}{_did_you_mean(spec, names)}"
        )
    # An absent optional column is fine, but "z [px]" is a z in another unit: do not ignore it silently.
    other_unit = next((n for n in names if _stem(n) == _stem(spec)), None)
    if other_unit:
        raise LocalisationFormatError(
            f"{path}: {role}: column {other_unit!r} is not in nm; map it with columns={{{role!r}: {other_unit!r}}} "
            f"if it is, or leave it out with columns={{{role!r}: None}}"
        )
    return None


def _did_you_mean(spec: str, names: list[str]) -> str:
    stems = {}
    for name in names:
        stems.setdefault(_stem(name), name)
    close = difflib.get_close_matches(_stem(spec), stems, n=1, cutoff=0.5)
    return f"; did you mean {stems[close[0]]!r}?" if close else ""


def _normalise(name: str) -> str:
    """'X [nm]', 'x_nm', 'xnm' -> 'x': lower case, no spaces/'_'/'-', no trailing nanometre unit."""
    key = re.sub(r"[\s_\-]", "", name.lower())
    return re.sub(r"(\[nm\]|\(nm\)|nm)$", "", key) or key


def _stem(name: str) -> str:
    """'Z [px]' -> 'z': like _normalise but dropping any bracketed unit; for hints, never for matching."""
    return re.sub(r"[\s_\-]", "", re.sub(r"[\[(][^\])]*[\])]\s*$", "", name.lower()))


def _numeric_column(path: Path, raw: _RawTable, name: str) -> np.ndarray:
    """A column as a finite float64 vector; errors point at the first bad CSV line or row."""
    values = np.asarray(raw.columns[name])
    if values.ndim == 2 and 1 in values.shape:  # MATLAB vectors are (n, 1) or (1, n) matrices
        values = values.reshape(-1)
    if values.ndim != 1:
        raise LocalisationFormatError(f"{path}: column {name!r} is not a vector: shape {values.shape}")
    if raw.lines is not None:  # CSV text
        out = np.empty(len(values))
        for i, text in enumerate(values):
            try:
                out[i] = float(text)
            except ValueError:
                raise LocalisationFormatError(
                    f"{_where(path, raw, i)}: column {name!r}: {text!r} is not a number"
                ) from None
    elif values.dtype.kind in "iuf":
        out = values.astype(np.float64)
    else:
        raise LocalisationFormatError(f"{path}: column {name!r} is not numeric (dtype {values.dtype})")
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise LocalisationFormatError(
            f"{_where(path, raw, bad[0])}: column {name!r}: {out[bad[0]]} is not a finite number"
        )
    return out


def _where(path: Path, raw: _RawTable, row: int) -> str:
    return f"{path}:{raw.lines[row]}" if raw.lines is not None else f"{path}: row {row + 1}"


def _group(path: Path, raw: _RawTable, values: dict[str, np.ndarray]) -> LocalisationTable:
    lengths = {role: len(v) for role, v in values.items()}
    if len(set(lengths.values())) > 1:
        raise LocalisationFormatError(f"{path}: columns differ in length: {lengths}")
    if lengths["x"] == 0:
        raise LocalisationFormatError(f"{path}: the table has no localisations")
    points = np.stack([values[role] for role in ("x", "y", "z") if role in values], axis=1)
    ids = values.get("particle", np.zeros(len(points)))
    fractional = np.flatnonzero(ids != np.round(ids))
    if fractional.size:
        row = fractional[0]
        raise LocalisationFormatError(f"{_where(path, raw, row)}: particle id {ids[row]} is not a whole number")
    ids = ids.astype(np.int64)
    order = np.argsort(ids, kind="stable")  # stable: each particle keeps its rows in file order
    unique, starts = np.unique(ids[order], return_index=True)
    groups = dict(zip(unique.tolist(), np.split(points[order], starts[1:]), strict=True))
    particles = {pid: p for pid, p in groups.items() if len(p) >= MIN_LOCALISATIONS}
    dropped = [pid for pid, p in groups.items() if len(p) < MIN_LOCALISATIONS]
    if not particles:
        raise LocalisationFormatError(
            f"{path}: every particle ({len(groups)}) has fewer than {MIN_LOCALISATIONS} localisations"
        )
    return LocalisationTable(particles, str(path), "z" in values, dropped)
