"""Column names and their units: "x [nm]", "X (px)", "x_nm", "xnm" and "x" all name an x coordinate, the
first four with a unit. A name matches a role exactly, else case-insensitively, else by its stem (the name
without its unit, spaces, '_' and '-'). Units are never guessed: a coordinate column without one takes the
unit the format or the spec states, and is an error where neither does."""

from __future__ import annotations

import difflib
import re

import numpy as np

from .raw import LocalisationFormatError, RawTable

# Units a coordinate may be in, by every spelling found in the wild.
_UNIT_SPELLINGS = {
    "nm": "nm",
    "nanometer": "nm",
    "nanometers": "nm",
    "nanometre": "nm",
    "nanometres": "nm",
    "px": "px",
    "pix": "px",
    "pixel": "px",
    "pixels": "px",
    "um": "um",
    "µm": "um",
    "μm": "um",
    "micron": "um",
    "microns": "um",
    "micrometer": "um",
    "micrometers": "um",
}
NM_PER = {"nm": 1.0, "um": 1000.0}  # px depends on the camera: it needs a pixel size
# Stems that may carry a unit glued on with no separator ("xnm", SMAP's "locprecnm").
_GLUED_STEMS = {"x", "y", "z", "locprec", "locprecz"}


def split_unit(name: str) -> tuple[str, str | None]:
    """(stem, unit) of a column name; unit is nm, px, um, another bracketed word (e.g. 'photon'), or None."""
    lower = name.strip().lower()
    bracketed = re.match(r"^(.*?)\s*[\[(]\s*([^\])]*?)\s*[\])]$", lower)
    if bracketed:
        return _squash(bracketed.group(1)), _UNIT_SPELLINGS.get(bracketed.group(2), bracketed.group(2))
    separated = re.match(r"^(.+?)[\s_\-]+([a-zµμ]+)$", lower)
    if separated and separated.group(2) in _UNIT_SPELLINGS:
        return _squash(separated.group(1)), _UNIT_SPELLINGS[separated.group(2)]
    glued = re.match(r"^(.+?)(nm|px|um|µm|μm)$", _squash(lower))
    if glued and glued.group(1) in _GLUED_STEMS:
        return glued.group(1), _UNIT_SPELLINGS[glued.group(2)]
    return _squash(lower), None


def _squash(text: str) -> str:
    return re.sub(r"[\s_\-]", "", text)


def find_column(raw: RawTable, role: str, wanted: str | int | list[str], required: bool, key: str) -> str | None:
    """The name of the column that plays `role`: `wanted` is a name or position the spec gave, or the
    stems a format looks for (first match wins). None where an optional role has no column."""
    names = list(raw.columns)
    path = raw.path
    if isinstance(wanted, (int, np.integer)):
        if 0 <= wanted < len(names):
            return names[wanted]
        raise LocalisationFormatError(
            f"{path}: {role}: no column at position {wanted}; the table has {len(names)} columns", key=key
        )
    candidates = [wanted] if isinstance(wanted, str) else list(wanted)
    for candidate in candidates:
        for match in (lambda n, c=candidate: n == c, lambda n, c=candidate: n.lower() == c.lower()):
            found = [n for n in names if match(n)]
            if len(found) == 1:
                return found[0]
        stem = split_unit(candidate)[0]
        found = [n for n in names if split_unit(n)[0] == stem]
        if len(found) == 1:
            return found[0]
        if found:
            raise LocalisationFormatError(
                f"{path}: {role}: several columns match {candidate!r}: {', '.join(found)}; name one in data.localisations.{key}",
                key=key,
            )
    if not required:
        return None
    listing = ", ".join(names) or "none"
    hint = _did_you_mean(candidates[0], names)
    raise LocalisationFormatError(
        f"{path}: {role}: no column {candidates[0]!r}; the columns are: {listing}{hint} (set data.localisations.{key})",
        key=key,
    )


def _did_you_mean(wanted: str, names: list[str]) -> str:
    stems = {}
    for name in names:
        stems.setdefault(split_unit(name)[0], name)
    close = difflib.get_close_matches(split_unit(wanted)[0], stems, n=1, cutoff=0.5)
    return f"; did you mean {stems[close[0]]!r}?" if close else ""


def numeric_column(raw: RawTable, name: str) -> np.ndarray:
    """A column as a float64 vector; text (CSV) converted in one go, errors pointing at the first bad cell."""
    values = np.asarray(raw.columns[name])
    if values.ndim == 2 and 1 in values.shape:  # MATLAB vectors are (n, 1) or (1, n) matrices
        values = values.reshape(-1)
    if values.ndim == 0:
        values = values.reshape(1)
    if values.ndim != 1:
        raise LocalisationFormatError(f"{raw.path}: column {name!r} is not a vector: shape {values.shape}")
    if values.dtype.kind in "iufb":
        return values.astype(np.float64)
    if raw.container != "csv" or values.dtype.kind not in "OUS":
        raise LocalisationFormatError(f"{raw.path}: column {name!r} is not numeric (dtype {values.dtype})")
    # An empty cell is a missing value (pandas writes NaN so, as in DECODE's files); required columns refuse it later.
    values = np.where(np.char.strip(values.astype(str)) == "", "nan", values)
    try:
        return values.astype(np.float64)
    except ValueError:
        for row, text in enumerate(values):  # only to say where: the conversion above failed somewhere
            try:
                float(text)
            except ValueError:
                raise LocalisationFormatError(f"{raw.where(row)}: column {name!r}: {text!r} is not a number") from None
        raise


def require_finite(raw: RawTable, name: str, values: np.ndarray) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise LocalisationFormatError(f"{raw.where(bad[0])}: column {name!r}: {values[bad[0]]} is not a finite number")
    return values
