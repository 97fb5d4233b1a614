"""The truth of a simulated localisation table (python -m holly_hpc.recon.smlm_particles writes it), read so
that a run on simulated particles reports structure and rotation errors beside the measures that need none."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import resolve_path

ROTATION_COLUMNS = [f"r{i}{j}" for i in range(3) for j in range(3)]


@dataclass
class LocalisationTruth:
    sites: torch.Tensor  # (M, 3) image-frame units
    rotations: torch.Tensor | None  # (P, 3, 3), in the order of the run's particles
    symmetry: str


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file") from None
        return [h.strip() for h in header], [row for row in reader if row]


def _columns(path: Path, header: list[str], names: list[str]) -> list[int]:
    missing = [n for n in names if n not in header]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(repr(m) for m in missing)} (columns: {', '.join(header)})")
    return [header.index(n) for n in names]


def read_sites_nm(path: Path) -> np.ndarray:
    header, rows = _rows(path)
    cols = _columns(path, header, ["x [nm]", "y [nm]", "z [nm]"])
    return np.array([[float(row[c]) for c in cols] for row in rows], dtype=np.float64)


def read_poses(path: Path) -> dict[int, np.ndarray]:
    header, rows = _rows(path)
    cols = _columns(path, header, ["particle", *ROTATION_COLUMNS])
    return {int(row[cols[0]]): np.array([float(row[c]) for c in cols[1:]]).reshape(3, 3) for row in rows}


def load_truth(cfg: dict, base_dir: Path, ids: list[tuple[int, int]], nm_per_unit: float) -> LocalisationTruth:
    """data.localisations.truth -> the sites in frame units and each particle's true rotation (by its id)."""
    sites = torch.from_numpy(read_sites_nm(resolve_path(cfg["sites"], base_dir)) / nm_per_unit).float()
    rotations = None
    if cfg.get("poses"):
        path = resolve_path(cfg["poses"], base_dir)
        poses = read_poses(path)
        absent = [pid for _, pid in ids if pid not in poses]
        if absent:
            raise ValueError(f"{path}: no pose for particle(s) {absent[:5]}{' ...' if len(absent) > 5 else ''}")
        rotations = torch.from_numpy(np.stack([poses[pid] for _, pid in ids])).float()
    return LocalisationTruth(sites, rotations, cfg.get("symmetry", "none"))
