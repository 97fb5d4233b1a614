"""From a file's plan to localisations in nm: the flat table of a file, and its particles."""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .columns import numeric_column, require_finite
from .formats import Plan, ReadOptions, plan
from .raw import LocalisationFormatError

# Fewer localisations than this give no usable centroid or shape; such particles are dropped.
MIN_LOCALISATIONS = 3


@dataclass
class Localisations:
    """One file's localisations in nm: xyz (n, 2|3) float64, precision (n,) nm or None (the file has none),
    particle (n,) int64 or None (a field of view: particles still to be picked)."""

    xyz: np.ndarray
    precision: np.ndarray | None
    particle: np.ndarray | None
    source: str
    format: str
    notes: list[str] = field(default_factory=list)

    @property
    def has_z(self) -> bool:
        return self.xyz.shape[1] == 3

    def __len__(self) -> int:
        return len(self.xyz)


@dataclass
class LocalisationTable:
    """Localisations per particle id: (n, 2) or (n, 3) float64 arrays of x, y[, z] in nm, and per
    localisation precision in nm (None where the file has none)."""

    particles: dict[int, np.ndarray]
    source: str
    has_z: bool
    dropped: list[int] = field(default_factory=list)  # ids of particles with < MIN_LOCALISATIONS rows
    precision: dict[int, np.ndarray] | None = None

    def counts(self) -> dict[int, int]:
        """Localisations per particle id."""
        return {pid: len(points) for pid, points in self.particles.items()}


def expand_paths(path: str | Path) -> list[Path]:
    """The files a spec's `path` names: one file, or the sorted matches of a glob pattern (*, ?, [)."""
    text = str(path)
    if not any(ch in text for ch in "*?["):
        return [Path(text)]
    matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    if not matches:
        raise LocalisationFormatError(f"{text}: no file matches this pattern", key="path")
    return matches


def load(path: str | Path, options: ReadOptions | None = None) -> Localisations:
    """Read one localisation file of any known format into nm."""
    return _values(plan(Path(path), options or ReadOptions()))


def inspect(path: str | Path, options: ReadOptions | None = None) -> Plan:
    """The plan for a file from its header alone: raises LocalisationFormatError naming what is wrong."""
    return plan(Path(path), options or ReadOptions(), header_only=True)


def _values(p: Plan) -> Localisations:
    raw = p.raw
    columns = {}
    for role, name in p.columns.items():
        if isinstance(name, tuple):  # x and y precision: their RMS
            first, second = (numeric_column(raw, n) for n in name)
            columns[role] = np.sqrt((first**2 + second**2) / 2)
        else:
            columns[role] = numeric_column(raw, name)
    lengths = {role: len(v) for role, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise LocalisationFormatError(f"{raw.path}: columns differ in length: {lengths}")
    if lengths["x"] == 0:
        raise LocalisationFormatError(f"{raw.path}: the table has no localisations")
    for role in ("x", "y", "z", "particle"):
        if role in columns:
            require_finite(raw, _shown(p.columns[role]), columns[role])
    if "z" in columns and not columns["z"].any():
        del columns["z"]  # DECODE (and others) write z = 0 for 2D data: that is no z
        p.notes.append(f"z column {p.columns['z']!r} is 0 everywhere: read as 2D")
    xyz = np.stack([columns[r] * p.nm_per_unit[r] for r in ("x", "y", "z") if r in columns], axis=1)
    precision = None
    if "precision" in columns:
        precision = columns["precision"] * p.nm_per_unit["precision"]
        if not np.isfinite(precision).all():
            precision = (
                None  # DECODE and others write NaN where a fit gave none: no precision is better than a wrong one
            )
            p.notes.append(f"precision column {_shown(p.columns['precision'])} has non-finite values: not used")
    particle = None
    if "particle" in columns:
        ids = columns["particle"]
        fractional = np.flatnonzero(ids != np.round(ids))
        if fractional.size:
            row = fractional[0]
            raise LocalisationFormatError(f"{raw.where(row)}: particle id {ids[row]} is not a whole number")
        particle = ids.astype(np.int64)
    return Localisations(xyz, precision, particle, str(raw.path), p.format, list(p.notes))


def _shown(name: str | tuple[str, str]) -> str:
    return " and ".join(name) if isinstance(name, tuple) else name


def group_particles(locs: Localisations, particle: np.ndarray | None = None) -> LocalisationTable:
    """Group by particle id (sorted; every row particle 0 without ids), dropping particles with too few rows;
    refused when none is left. `particle` overrides the file's ids (picked particles; -1 rows are left out)."""
    table = split_particles(locs, particle)
    if not table.particles:
        raise LocalisationFormatError(
            f"{locs.source}: every particle ({len(table.dropped)}) has fewer than {MIN_LOCALISATIONS} localisations"
        )
    return table


def split_particles(locs: Localisations, particle: np.ndarray | None = None) -> LocalisationTable:
    """group_particles without the refusal: the table may hold no particle (one file of several may)."""
    ids = particle if particle is not None else locs.particle
    if ids is None:
        ids = np.zeros(len(locs), dtype=np.int64)
    keep = ids >= 0 if particle is not None else np.ones(len(ids), dtype=bool)
    ids, xyz = ids[keep], locs.xyz[keep]
    precision = locs.precision[keep] if locs.precision is not None else None
    order = np.argsort(ids, kind="stable")  # stable: each particle keeps its rows in file order
    unique, starts = np.unique(ids[order], return_index=True)
    split = starts[1:]
    groups = dict(zip(unique.tolist(), np.split(xyz[order], split), strict=True))
    sigmas = (
        dict(zip(unique.tolist(), np.split(precision[order], split), strict=True)) if precision is not None else None
    )
    particles = {pid: g for pid, g in groups.items() if len(g) >= MIN_LOCALISATIONS}
    dropped = [pid for pid, g in groups.items() if len(g) < MIN_LOCALISATIONS]
    kept_sigmas = {pid: sigmas[pid] for pid in particles} if sigmas is not None else None
    return LocalisationTable(particles, locs.source, locs.has_z, dropped, kept_sigmas)


def read_localisations(
    path: str | Path,
    columns: dict | None = None,
    dataset: str | None = None,
    format: str = "auto",
    units: str | None = None,
    camera_pixel_nm: float | None = None,
) -> LocalisationTable:
    """Read a localisation table and group it by particle (sorted ids), dropping particles with too few rows."""
    options = ReadOptions(format, dict(columns or {}), dataset, units, camera_pixel_nm)
    return group_particles(load(path, options))


def centre_particles(table: LocalisationTable) -> LocalisationTable:
    """The same table with every particle moved so that its centroid is at the origin."""
    centred = {pid: points - points.mean(axis=0) for pid, points in table.particles.items()}
    return LocalisationTable(centred, table.source, table.has_z, list(table.dropped), table.precision)
