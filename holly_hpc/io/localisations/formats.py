"""What the columns of each format mean, and in which units: a Plan per file.

- thunderstorm: CSV, `"id","frame","x [nm]","y [nm]",...,"uncertainty [nm]"`; units from the headers; a
  whole field of view (no particle column).
- picasso: HDF5 `locs` (frame, x, y, photons, sx, sy, bg, lpx, lpy[, z][, group]); x, y, lpx, lpy in camera
  pixels, z in nm; the pixel size is the sidecar YAML's `Pixelsize` (same name, .yaml) or camera_pixel_nm.
  `group` (after picking in Picasso) is the particle.
- smap: MATLAB `_sml.mat` with `saveloc.loc.{xnm, ynm, znm, locprecnm, frame, ...}` (v5 or v7.3), in nm.
- decode: CSV with three '#' lines (the last a JSON object with `xy_unit` and `px_size`), then
  `x,y,z,phot,frame_ix,...,x_sig,y_sig,...`; x, y (and their sigmas) in xy_unit, z in nm.
- table: any CSV/HDF5/MAT table with x, y[, z][, particle][, precision] columns; units from the column
  names ("x [nm]", "x_px"...) or from data.localisations.units.

`auto` picks one of these from the extension and the header or fields, reading only those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.io
import yaml

from .columns import NM_PER, find_column, split_unit
from .raw import LocalisationFormatError, RawTable, read_raw

FORMATS = ("auto", "thunderstorm", "picasso", "smap", "decode", "table")
UNITS = ("nm", "px", "um")
ROLES = ("x", "y", "z", "particle", "precision")
# Names a generic table's precision column goes by (nm unless its name says otherwise).
PRECISION_NAMES = ["precision", "uncertainty", "uncertainty_xy", "locprec", "localization_precision"]


@dataclass(frozen=True)
class ReadOptions:
    """The spec's data.localisations keys that say how to read a file."""

    format: str = "auto"
    columns: dict = field(default_factory=dict)
    dataset: str | None = None
    units: str | None = None
    camera_pixel_nm: float | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unknown localisation format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.units not in (None, *UNITS):
            raise ValueError(f"unknown units {self.units!r}; expected one of {', '.join(UNITS)}")
        unknown = sorted(set(self.columns) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown column role(s) {unknown}; the roles are {', '.join(ROLES)}")
        for role in ("x", "y"):
            if role in self.columns and self.columns[role] is None:
                raise ValueError(f"column role {role!r} is required and cannot be None")


@dataclass
class Plan:
    """Which column plays each role and how many nm one of its units is. precision may be a pair of
    columns (x and y precision: their RMS is used)."""

    format: str
    raw: RawTable
    columns: dict[str, str | tuple[str, str]]
    nm_per_unit: dict[str, float]
    notes: list[str] = field(default_factory=list)


def plan(path: Path, options: ReadOptions, header_only: bool = False) -> Plan:
    """Read `path` (only its header with header_only) and decide what its columns mean."""
    fmt = options.format if options.format != "auto" else detect(path)
    by_position = any(isinstance(v, int) and not isinstance(v, bool) for v in options.columns.values())
    dataset = options.dataset if options.dataset is not None else _DEFAULT_DATASET.get(fmt)
    raw = read_raw(path, dataset, header_only=header_only, by_position=by_position)
    return _RULES[fmt](raw, options)


# --------------------------------------------------------------------------------------------- detection
def detect(path: Path) -> str:
    """The format of a file, from its extension and its header or fields (cheap: no data read)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raw = read_raw(path, header_only=True)
        if raw.comments and raw.comments[0].lstrip("# ").upper().startswith("DECODE"):
            return "decode"
        names = {split_unit(n)[0]: split_unit(n)[1] for n in raw.columns}
        if (
            names.get("x") in UNITS
            and "frame" in names
            and ("uncertainty" in names or "uncertaintyxy" in names or "sigma" in names)
        ):
            return "thunderstorm"
        return "table"
    if suffix in (".h5", ".hdf5") and path.is_file():
        try:
            with h5py.File(path, "r") as f:
                locs = f.get("locs")
                if (
                    isinstance(locs, h5py.Dataset)
                    and locs.dtype.names
                    and {"x", "y", "lpx", "lpy"} <= set(locs.dtype.names)
                ):
                    return "picasso"
        except OSError:
            return "table"  # read_raw says why it cannot be read
        return "table"
    if suffix == ".mat" and path.is_file():
        return "smap" if "saveloc" in _mat_variables(path) else "table"
    return "table"


def _mat_variables(path: Path) -> list[str]:
    try:
        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as f:
                return list(f)
        return [name for name, _, _ in scipy.io.whosmat(path)]
    except (OSError, ValueError, NotImplementedError, scipy.io.matlab.MatReadError):
        return []


_DEFAULT_DATASET = {"smap": "saveloc.loc"}


# -------------------------------------------------------------------------------------------- units
def _scale(
    raw: RawTable,
    role: str,
    column: str,
    options: ReadOptions,
    stated: str | None,
    pixel_nm: float | None,
    said_by: str,
) -> tuple[float, str]:
    """(nm per unit, unit) of `column`: its name's unit, else the format's (`stated`), else data.localisations.units."""
    named = split_unit(column)[1]
    if named is not None and named not in UNITS:
        raise LocalisationFormatError(
            f"{raw.path}: {role}: column {column!r} is in {named!r}, not a length (nm, px or um)", key=f"columns.{role}"
        )
    unit = named or stated or options.units
    if unit is None:
        raise LocalisationFormatError(
            f"{raw.path}: {role}: the units of column {column!r} are not known (its name gives none); "
            f"set data.localisations.units to nm, px or um",
            key="units",
        )
    if options.units is not None and unit != options.units and (named or stated):
        source = f"its name {column!r}" if named else said_by
        raise LocalisationFormatError(
            f"{raw.path}: {role}: {source} says {unit}, but data.localisations.units is {options.units}", key="units"
        )
    if unit != "px":
        return NM_PER[unit], unit
    if pixel_nm is None:
        raise LocalisationFormatError(
            f"{raw.path}: {role}: column {column!r} is in camera pixels and the file does not say their size; "
            f"set data.localisations.camera_pixel_nm",
            key="camera_pixel_nm",
        )
    return float(pixel_nm), unit


def _pixel_size(raw: RawTable, options: ReadOptions, from_file: float | None, what: str) -> float | None:
    if (
        from_file is not None
        and options.camera_pixel_nm is not None
        and not np.isclose(from_file, options.camera_pixel_nm)
    ):
        raise LocalisationFormatError(
            f"{raw.path}: {what} says a camera pixel is {from_file:g} nm, but data.localisations.camera_pixel_nm is "
            f"{options.camera_pixel_nm:g}; remove the key or correct the file",
            key="camera_pixel_nm",
        )
    return from_file if from_file is not None else options.camera_pixel_nm


def _column(raw: RawTable, options: ReadOptions, role: str, defaults, required: bool) -> str | None:
    wanted = options.columns.get(role, defaults)
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return None
    return find_column(raw, role, wanted, required or role in options.columns, key=f"columns.{role}")


def _common(
    raw: RawTable, options: ReadOptions, fmt: str, defaults: dict, stated: dict, pixel_nm, said_by: str
) -> Plan:
    """Roles found from `defaults` (names per role, the spec's columns win), scaled to nm."""
    columns, scales, units = {}, {}, {}
    for role in ROLES:  # every column first: a missing column is the first thing to hear of
        found = _column(raw, options, role, defaults.get(role), required=role in ("x", "y"))
        if found is not None:
            columns[role] = found
    for role, found in columns.items():
        if role != "particle":
            # A precision without a unit of its own is in the unit of the coordinates it qualifies.
            told = stated.get(role) or (units["x"] if role == "precision" else None)
            scales[role], units[role] = _scale(raw, role, found, options, told, pixel_nm, said_by)
    return Plan(fmt, raw, columns, scales)


# ------------------------------------------------------------------------------------------- formats
def _table(raw: RawTable, options: ReadOptions) -> Plan:
    defaults = {"x": "x", "y": "y", "z": ["z"], "particle": ["particle"], "precision": PRECISION_NAMES}
    return _common(raw, options, "table", defaults, {}, options.camera_pixel_nm, "data.localisations.units")


def _thunderstorm(raw: RawTable, options: ReadOptions) -> Plan:
    defaults = {"x": "x", "y": "y", "z": ["z"], "particle": [], "precision": ["uncertainty_xy", "uncertainty"]}
    result = _common(raw, options, "thunderstorm", defaults, {}, options.camera_pixel_nm, "the ThunderSTORM header")
    result.notes.append("ThunderSTORM CSV: units from its column headers")
    return result


def _picasso_sidecar(path: Path) -> tuple[float | None, str]:
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None, f"no sidecar {sidecar.name}"
    try:
        documents = list(yaml.safe_load_all(sidecar.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise LocalisationFormatError(f"{sidecar}: cannot read Picasso's YAML sidecar: {exc}") from exc
    for document in documents:
        if isinstance(document, dict) and document.get("Pixelsize") is not None:
            value = document["Pixelsize"]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise LocalisationFormatError(f"{sidecar}: Pixelsize must be a positive number of nm, got {value!r}")
            return float(value), f"Pixelsize {value:g} nm from {sidecar.name}"
    return None, f"{sidecar.name} has no Pixelsize"


def _picasso(raw: RawTable, options: ReadOptions) -> Plan:
    from_file, how = _picasso_sidecar(raw.path)
    if from_file is None and options.camera_pixel_nm is None:
        raise LocalisationFormatError(
            f"{raw.path}: Picasso stores x, y in camera pixels, and their size is unknown ({how}); "
            f"set data.localisations.camera_pixel_nm",
            key="camera_pixel_nm",
        )
    pixel_nm = _pixel_size(raw, options, from_file, how)
    defaults = {"x": "x", "y": "y", "z": ["z"], "particle": ["group"], "precision": []}
    result = _common(raw, options, "picasso", defaults, {"x": "px", "y": "px", "z": "nm"}, pixel_nm, "Picasso")
    if "precision" not in options.columns and {"lpx", "lpy"} <= set(raw.columns):
        result.columns["precision"] = ("lpx", "lpy")
        result.nm_per_unit["precision"] = pixel_nm
    result.notes.append(
        f"Picasso HDF5: x, y in camera pixels × {pixel_nm:g} nm ({how if from_file else 'camera_pixel_nm'})"
    )
    return result


def _smap(raw: RawTable, options: ReadOptions) -> Plan:
    defaults = {"x": "xnm", "y": "ynm", "z": ["znm"], "particle": [], "precision": ["locprecnm"]}
    result = _common(raw, options, "smap", defaults, {}, options.camera_pixel_nm, "SMAP")
    if (
        "z" in result.columns
        and raw.columns[result.columns["z"]] is not None
        and np.size(raw.columns[result.columns["z"]]) == 0
    ):
        del result.columns["z"], result.nm_per_unit["z"]  # SMAP keeps an empty znm in 2D data
    result.notes.append("SMAP _sml.mat: saveloc.loc fields in nm")
    return result


def _decode_meta(raw: RawTable) -> dict:
    for comment in reversed(raw.comments[:3]):
        text = comment.lstrip("#").strip()
        if text.startswith("{"):
            try:
                meta = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(meta, dict) and "xy_unit" in meta:
                return meta
    return {}


def _decode(raw: RawTable, options: ReadOptions) -> Plan:
    meta = _decode_meta(raw)
    unit = meta.get("xy_unit")
    if unit is not None and unit not in UNITS:
        raise LocalisationFormatError(f"{raw.path}: DECODE metadata gives xy_unit {unit!r}; expected nm or px")
    px_size = meta.get("px_size")
    from_file = float(px_size[0]) if isinstance(px_size, list) and px_size and px_size[0] is not None else None
    if (
        isinstance(px_size, list)
        and len(px_size) == 2
        and px_size[1] is not None
        and not np.isclose(px_size[0], px_size[1])
    ):
        raise LocalisationFormatError(f"{raw.path}: DECODE's px_size {px_size} is not square; refusing to guess")
    pixel_nm = _pixel_size(raw, options, from_file, "DECODE's px_size") if unit == "px" else options.camera_pixel_nm
    stated = {"x": unit, "y": unit, "z": "nm"} if unit else {"z": "nm"}
    defaults = {"x": "x", "y": "y", "z": ["z"], "particle": [], "precision": []}
    result = _common(raw, options, "decode", defaults, stated, pixel_nm, "DECODE's xy_unit")
    if "precision" not in options.columns and {"x_sig", "y_sig"} <= set(raw.columns):
        result.columns["precision"] = ("x_sig", "y_sig")
        result.nm_per_unit["precision"] = result.nm_per_unit["x"]
    result.notes.append(
        f"DECODE CSV: xy_unit {unit or 'not stated'}" + (f", px_size {pixel_nm:g} nm" if unit == "px" else "")
    )
    return result


_RULES = {"table": _table, "thunderstorm": _thunderstorm, "picasso": _picasso, "smap": _smap, "decode": _decode}
