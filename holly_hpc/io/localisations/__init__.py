"""Single-molecule localisation tables in, as the programs that fit localisations write them, always in nm.

Formats (see formats.py for each one's fields and units): ThunderSTORM CSV, Picasso HDF5 (+ YAML
sidecar), SMAP `_sml.mat`, DECODE CSV, and generic CSV/HDF5/MATLAB tables. `format: auto` tells them apart
by extension and header. Units are never guessed: they come from the column names, the format's rules
(Picasso's camera pixels × the sidecar's Pixelsize, DECODE's xy_unit and px_size) or the spec
(`units`, `camera_pixel_nm`); a table whose units cannot be known is an error that names the key to set.

- raw.py: the containers (CSV with '#' comments, HDF5, MAT v5/v7.3 with nested structs), header-only too
- columns.py: column names, their units, numeric conversion with the line of a bad cell
- formats.py: detection and each format's plan (role -> column, nm per unit)
- table.py: localisations in nm per file, grouped by particle
- writers.py: each format written as its program writes it (example data and tests)

Error messages name the file, and the CSV line or the 1-based row where they apply.
"""

from .columns import split_unit
from .formats import FORMATS, ROLES, UNITS, Plan, ReadOptions, detect
from .raw import LocalisationFormatError
from .table import (
    MIN_LOCALISATIONS,
    Localisations,
    LocalisationTable,
    centre_particles,
    expand_paths,
    group_particles,
    inspect,
    load,
    read_localisations,
    split_particles,
)

DEFAULT_COLUMNS = {"x": "x", "y": "y", "z": "z", "particle": "particle"}

__all__ = [
    "DEFAULT_COLUMNS",
    "FORMATS",
    "MIN_LOCALISATIONS",
    "ROLES",
    "UNITS",
    "LocalisationFormatError",
    "LocalisationTable",
    "Localisations",
    "Plan",
    "ReadOptions",
    "centre_particles",
    "detect",
    "expand_paths",
    "group_particles",
    "inspect",
    "load",
    "read_localisations",
    "split_particles",
    "split_unit",
]
