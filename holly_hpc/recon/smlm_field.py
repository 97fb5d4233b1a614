"""A simulated SMLM field of view in nm, as a localisation program would report it, and the example files.

Particles of a structure (by default an NPC-like double ring) sit at random 3D orientations on a jittered
grid; each labelling site is present with probability `labelling`, is localised a Poisson number of times
(DNA-PAINT's repeated binding), each localisation displaced by a linker offset and by its own precision
(drawn per localisation and reported, as fitting programs do); a few % of background localisations fall
anywhere in the field. What comes out is a flat table without particle ids, to be picked, like real data.

`python -m holly_hpc.recon.smlm_field OUT_DIR` writes the same field in every supported format (the example
data in jobspecs/data/npc-field was made so; the tests make theirs the same way).
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Field:
    """xyz (n, 3) nm; precision (n,) nm; frame (n,); particle (n,) true ids (-1: background);
    centres (k, 2) nm: the true particle centres in x, y; size_nm: the field's side."""

    xyz: np.ndarray
    precision: np.ndarray
    frame: np.ndarray
    particle: np.ndarray
    centres: np.ndarray
    size_nm: float


def npc_sites(
    radius_nm=50.0, ring_spacing_nm=60.0, corners=8, copies=2, ring_offset=math.pi / 8, copy_spacing_nm=10.0
) -> np.ndarray:
    """Labelling sites (m, 3) of an NPC-like double ring: `corners` corners per ring, `copies` sites per corner
    spread tangentially, the two rings `ring_spacing_nm` apart in z and turned by `ring_offset` radians."""
    sites = []
    for ring, z in enumerate((-ring_spacing_nm / 2, ring_spacing_nm / 2)):
        for corner in range(corners):
            for copy in range(copies):
                tangential = (copy - (copies - 1) / 2) * copy_spacing_nm / radius_nm
                angle = 2 * math.pi * corner / corners + ring * ring_offset + tangential
                sites.append((radius_nm * math.cos(angle), radius_nm * math.sin(angle), z))
    return np.asarray(sites)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n rotation matrices uniform on SO(3) (from uniform unit quaternions)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def simulate_field(
    sites: np.ndarray | None = None,
    particles: int = 36,
    spacing_nm: float = 500.0,
    labelling: float = 0.5,
    locs_per_site: float = 6.0,
    precision_nm: tuple[float, float] = (3.0, 12.0),
    linker_nm: float = 5.0,
    background: float = 0.03,
    radius_jitter: float = 0.05,
    frames: int = 5000,
    seed: int = 0,
) -> Field:
    """A field of `particles` on a square grid `spacing_nm` apart (jittered by a tenth of it), with a
    margin of one spacing at every edge."""
    rng = np.random.default_rng(seed)
    sites = npc_sites() if sites is None else np.asarray(sites, dtype=np.float64)
    side = math.ceil(math.sqrt(particles))
    size = (side + 1) * spacing_nm
    grid = np.array([((i % side) + 1, (i // side) + 1) for i in range(particles)], dtype=np.float64) * spacing_nm
    centres = grid + rng.uniform(-0.1, 0.1, grid.shape) * spacing_nm
    rotations = random_rotations(particles, rng)
    xyz, owner = [], []
    for k in range(particles):
        scaled = sites * rng.uniform(1 - radius_jitter, 1 + radius_jitter)
        present = scaled[rng.random(len(sites)) < labelling] @ rotations[k].T
        counts = rng.poisson(locs_per_site, len(present))
        points = np.repeat(present, counts, axis=0)
        points = points + rng.normal(0, linker_nm / math.sqrt(3), points.shape)  # linker: ~linker_nm in 3D
        xyz.append(points + np.array([*centres[k], 0.0]))
        owner.append(np.full(len(points), k))
    xyz, owner = np.concatenate(xyz), np.concatenate(owner)
    n_background = round(background * len(xyz) / (1 - background))
    stray = np.column_stack([rng.uniform(0, size, (n_background, 2)), rng.uniform(-100, 100, n_background)])
    xyz, owner = np.concatenate([xyz, stray]), np.concatenate([owner, np.full(n_background, -1)])
    precision = rng.uniform(*precision_nm, len(xyz))
    xyz = xyz + rng.normal(size=xyz.shape) * precision[:, None] * np.array([1.0, 1.0, 2.5])  # z is 2.5x worse
    order = np.argsort(rng.random(len(xyz)))  # localisations come in frame order, not by particle
    frame = np.sort(rng.integers(0, frames, len(xyz)))
    return Field(xyz[order], precision[order], frame, owner[order], centres, size)


def write_examples(out: Path, field: Field, pixel_nm: float = 130.0) -> list[Path]:
    """The field as ThunderSTORM CSV, Picasso HDF5 + YAML, SMAP _sml.mat, DECODE CSV, and the truth."""
    from ..io.localisations.writers import write_decode, write_picasso, write_smap, write_thunderstorm

    out.mkdir(parents=True, exist_ok=True)
    xy = field.xyz[:, :2]  # what a 2D localisation program reports
    written = [
        write_thunderstorm(out / "thunderstorm.csv", xy, field.precision, field.frame),
        write_picasso(out / "picasso.hdf5", xy, field.precision, field.frame, pixel_nm),
        write_smap(out / "smap_sml.mat", xy, field.precision, field.frame),
        write_decode(out / "decode.csv", xy, field.precision, field.frame, px_size=pixel_nm),
    ]
    truth = out / "truth.csv"
    with truth.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["particle", "x [nm]", "y [nm]", "localisations"])
        for k, (cx, cy) in enumerate(field.centres):
            writer.writerow([k, f"{cx:.2f}", f"{cy:.2f}", int((field.particle == k).sum())])
    return [*written, truth]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the files into")
    parser.add_argument("--particles", type=int, default=36)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_examples(args.out, simulate_field(particles=args.particles, seed=args.seed)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
