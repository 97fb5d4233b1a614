"""Particles from localisation files: read (any format, in nm), picked where a file is a whole field of
view, centred, and described, so that the user sees what training will see before it starts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import resolve_path
from ..io.localisations import (
    MIN_LOCALISATIONS,
    LocalisationFormatError,
    Localisations,
    ReadOptions,
    centre_particles,
    expand_paths,
    load,
    split_particles,
)
from .picking import Picked, PickingOptions, diameter_nm, pick_particles, picked_picture, write_picked_csv


def read_options(cfg: dict) -> ReadOptions:
    """The reading keys of a spec's data.localisations."""
    return ReadOptions(
        cfg.get("format") or "auto",
        dict(cfg.get("columns") or {}),
        cfg.get("dataset"),
        cfg.get("units"),
        cfg.get("camera_pixel_nm"),
    )


@dataclass
class FileParticles:
    """One file's contribution: its localisations, and the picking of it (None: the file had particle ids)."""

    locs: Localisations
    picked: Picked | None
    first_id: int  # its picked clusters are numbered from here on in picked.csv (ids unique across files)


@dataclass
class ParticleSet:
    """Centred particles (each (n, 2|3) float64 nm) in a fixed order, their precisions (nm, or None), and
    where they came from."""

    points: list[np.ndarray]
    precision: list[np.ndarray] | None
    ids: list[tuple[int, int]]  # (file index, particle id in that file: its own id, or the picked cluster's)
    files: list[FileParticles]
    has_z: bool
    dropped_small: int = 0  # particles with < MIN_LOCALISATIONS localisations (file ids only)
    notes: list[str] = field(default_factory=list)

    @property
    def localisations(self) -> int:
        return sum(len(f.locs) for f in self.files)

    def counts(self) -> np.ndarray:
        return np.array([len(p) for p in self.points])

    def diameters_nm(self) -> np.ndarray:
        """Per particle, the diameter of the circle (in x, y) about its centroid holding 90% of it."""
        return np.array([diameter_nm(p[:, :2]) for p in self.points])


def load_particles(cfg: dict, base_dir: Path) -> ParticleSet:
    """Every file that data.localisations.path names (a glob gives several), read and picked or grouped."""
    options = read_options(cfg)
    picking = PickingOptions.from_spec(cfg.get("picking"))
    points, sigmas, ids, files = [], [], [], []
    dropped_small, notes, offset = 0, [], 0
    for index, path in enumerate(expand_paths(resolve_path(cfg["path"], base_dir))):
        locs = load(path, options)
        notes += [f"{path.name}: {note}" for note in locs.notes]
        picked = pick_particles(locs.xyz[:, :2], picking) if locs.particle is None else None
        table = centre_particles(split_particles(locs, picked.labels if picked is not None else None))
        dropped_small += len(table.dropped)
        for pid, particle in table.particles.items():
            points.append(particle)
            sigmas.append(table.precision[pid] if table.precision is not None else None)
            ids.append((index, pid))
        files.append(FileParticles(locs, picked, offset))
        offset += len(picked.clusters) if picked is not None else 0
    if not points:
        raise LocalisationFormatError(
            f"{cfg['path']}: no particle found (see the picking report: {_picking_hint(files)})", key="path"
        )
    has_z = all(f.locs.has_z for f in files)
    if not has_z:
        points = [p[:, :2] for p in points]
    precision = sigmas if all(s is not None for s in sigmas) else None
    return ParticleSet(points, precision, ids, files, has_z, dropped_small, notes)


def _picking_hint(files: list[FileParticles]) -> str:
    parts = []
    for f in files:
        if f.picked is not None:
            parts.append(
                f"{Path(f.locs.source).name}: {len(f.picked.clusters)} clusters, dropped {f.picked.dropped_by_reason()}"
            )
    return "; ".join(parts) or "every particle has too few localisations"


def describe(
    particles: ParticleSet, held_out: int, asked_eval: int, image_size: int, pixel_size_nm: float
) -> tuple[list[str], dict]:
    """Lines to print before training, and the same as a dict for data/summary.json."""
    counts, diameters = particles.counts(), particles.diameters_nm()
    fov = image_size * pixel_size_nm
    picked = [f.picked for f in particles.files if f.picked is not None]
    found = sum(len(p.clusters) for p in picked)
    dropped: dict[str, int] = {}
    for p in picked:
        for reason, n in p.dropped_by_reason().items():
            dropped[reason] = dropped.get(reason, 0) + n
    if particles.dropped_small:
        dropped[f"< {MIN_LOCALISATIONS} localisations"] = particles.dropped_small
    lines = [
        f"data: {len(particles.files)} file(s) read: {', '.join(Path(f.locs.source).name for f in particles.files)}",
        f"data: {particles.localisations} localisations"
        + (", with precision" if particles.precision is not None else ", no precision column")
        + (", 3D" if particles.has_z else ", 2D"),
    ]
    lines += [f"data: {note}" for note in particles.notes]
    if picked:
        lines.append(f"data: picked {found} cluster(s); kept {len(particles.points)}; dropped {dropped or 'none'}")
    else:
        lines.append(f"data: {len(particles.points)} particle(s) from the file's ids; dropped {dropped or 'none'}")
    lines.append(
        f"data: {len(particles.points) - held_out} for training, {held_out} held out"
        + (f" (eval_size {asked_eval} capped to a fifth of the particles)" if held_out < asked_eval else "")
    )
    lines.append(
        f"data: per particle median {np.median(counts):.0f} localisations (range {counts.min()}-{counts.max()}), "
        f"median diameter {np.median(diameters):.1f} nm"
    )
    lines.append(f"data: each image is {image_size} px x {pixel_size_nm:g} nm = {fov:g} nm across")
    if np.median(diameters) > 0.8 * fov:
        lines.append(
            f"data: WARNING particles ({np.median(diameters):.0f} nm) fill most of the {fov:g} nm image: raise data.localisations.pixel_size_nm"
        )
    elif np.median(diameters) < 4 * pixel_size_nm:
        lines.append(
            f"data: WARNING particles ({np.median(diameters):.0f} nm) span under 4 pixels: lower data.localisations.pixel_size_nm"
        )
    report = {
        "files": [f.locs.source for f in particles.files],
        "formats": [f.locs.format for f in particles.files],
        "localisations": particles.localisations,
        "clusters_found": found if picked else None,
        "particles_kept": len(particles.points),
        "dropped": dropped,
        "particles_train": len(particles.points) - held_out,
        "particles_held_out": held_out,
        "eval_size_asked": asked_eval,
        "median_localisations": float(np.median(counts)),
        "median_diameter_nm": float(np.median(diameters)),
        "image_field_of_view_nm": fov,
        "has_precision": particles.precision is not None,
        "has_z": particles.has_z,
    }
    return lines, report


def write_report(folder: Path, particles: ParticleSet, report: dict) -> list[Path]:
    """data/summary.json, and for picked files picked.csv (every cluster, kept or not) and picked.png (one per
    file: picked-<name>.png when there are several)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    tmp = folder / ".summary.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(folder / "summary.json")
    written.append(folder / "summary.json")
    picked_files = [f for f in particles.files if f.picked is not None]
    if not picked_files:
        return written
    rows_path = folder / "picked.csv"
    from .picking import Cluster

    merged = Picked(np.zeros(0, dtype=np.int64), [], picked_files[0].picked.field_nm)
    sources = []
    for f in picked_files:
        for c in f.picked.clusters:
            merged.clusters.append(
                Cluster(c.particle + f.first_id, c.x_nm, c.y_nm, c.localisations, c.diameter_nm, c.kept, c.reason)
            )
            sources.append(Path(f.locs.source).name)
    write_picked_csv(rows_path, merged, sources)
    written.append(rows_path)
    for f in picked_files:
        name = "picked.png" if len(picked_files) == 1 else f"picked-{Path(f.locs.source).stem}.png"
        picture = picked_picture(f.locs.xyz[:, :2], f.picked)
        tmp = folder / f".{name}.tmp.png"
        picture.save(tmp)
        tmp.replace(folder / name)
        written.append(folder / name)
    return written
