"""Simulated picked SMLM particles (DNA-PAINT or STORM) with particle ids, as localisation tables in nm.

jobspecs/data/nup107/{dnapaint,storm} were made by `python -m holly_hpc.recon.smlm_particles
jobspecs/data/nup107/MODE --preset nup107 --mode MODE --particles 300 --seed 0` (a test checks they still are).

Each particle is one copy of a structure's labelling sites (nm, centred on the origin, symmetry axis z) as
a picking program hands it over: already cut out and carrying its id. Per particle:

- its radius (the structure's x, y) is scaled by U(1 - radius_jitter, 1 + radius_jitter); it is turned by a
  random rotation (`orientation`); its centre is off the pick's origin by N(0, centring_nm) in x and y;
- each site is present with probability `labelling`;
- a present site gives events: DNA-PAINT, Poisson(`repeats`) binding events (default 6), each one
  localisation; STORM, Geometric(mean `repeats`) switching events (default 2, at least one: a present dye is
  seen), each a burst of 1 + Poisson(1) localisations in consecutive frames (multi-blinking);
- each event sits at its site plus a linker offset, isotropic Gaussian with `linker_nm` 3D rms, drawn once
  per event (so the blinks of one STORM burst share it; a DNA-PAINT event is one localisation);
- each localisation has its own precision, U(precision_nm) (z 2.5× worse), written in the table, and is
  displaced by it: a burst's blinks scatter about their event by precision alone;
- background localisations, uniform over the particle's box (the structure's extent + 30 nm each side, the
  same in z), add up on average to a fraction `background` of the particle's localisations;
- a particle left with fewer than MIN_LOCALISATIONS localisations is dropped (and counted); ids are 0..P-1
  over the particles kept.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from .smlm_field import npc_sites, random_rotations

MIN_LOCALISATIONS = 5  # particles with fewer are dropped
MARGIN_NM = 30.0  # the box around a particle: its structure's extent and this much on every side
Z_PRECISION_FACTOR = 2.5  # z is this much less precise than x, y
FRAMES = 20000  # frames of the simulated acquisition
MODES = ("dnapaint", "storm")
ORIENTATIONS = ("uniform", "top", "side", "envelope")
DEFAULT_REPEATS = {"dnapaint": 6.0, "storm": 2.0}  # mean events per present site
TILT_SD_DEG = 15.0  # "top" and "side": the axis' spread about the view direction / the image plane
ENVELOPE_TOP = 0.6  # "envelope": the share of top-ish particles, the rest uniform


# ----------------------------------------------------------------------------------------------- structures
def npc(
    radius_nm: float = 50.0,
    ring_spacing_nm: float = 60.0,
    corners: int = 8,
    copies: int = 2,
    copy_spacing_nm: float = 12.0,
    ring_offset_deg: float = 0.0,
) -> np.ndarray:
    """A nuclear pore's double ring: `corners` corners per ring, `copies` sites per corner spread tangentially
    `copy_spacing_nm` apart, rings `ring_spacing_nm` apart in z, the upper one turned by `ring_offset_deg`."""
    return npc_sites(radius_nm, ring_spacing_nm, corners, copies, math.radians(ring_offset_deg), copy_spacing_nm)


def centriole(
    radius_nm: float = 100.0, blades: int = 9, sites_per_blade: int = 5, length_nm: float = 150.0
) -> np.ndarray:
    """A centriole's 9-fold cylinder: `blades` blades at `radius_nm`, each a line of `sites_per_blade` sites
    evenly along z over `length_nm`."""
    z = np.linspace(-length_nm / 2, length_nm / 2, sites_per_blade) if sites_per_blade > 1 else np.zeros(1)
    angles = 2 * np.pi * np.arange(blades) / blades
    return np.array([(radius_nm * math.cos(a), radius_nm * math.sin(a), h) for a in angles for h in z])


def tetrahedron(edge_nm: float = 100.0, sites_per_edge: int = 2) -> np.ndarray:
    """A DNA-origami tetrahedron, a vertex up z (its 3-fold axis): sites at the 4 vertices and
    `sites_per_edge` evenly inside each of the 6 edges."""
    circumradius = edge_nm * math.sqrt(6) / 4
    base = edge_nm / math.sqrt(3)  # the base vertices' distance from the axis
    vertices = [(0.0, 0.0, circumradius)] + [
        (base * math.cos(2 * math.pi * k / 3), base * math.sin(2 * math.pi * k / 3), -circumradius / 3)
        for k in range(3)
    ]
    vertices = np.array(vertices)
    steps = np.arange(1, sites_per_edge + 1) / (sites_per_edge + 1)
    inside = [vertices[i] + t * (vertices[j] - vertices[i]) for i in range(4) for j in range(i + 1, 4) for t in steps]
    return np.concatenate([vertices, np.reshape(inside, (-1, 3))])


STRUCTURES = {"npc": npc, "centriole": centriole, "tetrahedron": tetrahedron}
_COUNTS = {"corners": 1, "copies": 1, "blades": 1, "sites_per_blade": 1, "sites_per_edge": 0}  # least allowed
_MAY_BE_ZERO = {"ring_spacing_nm", "copy_spacing_nm", "length_nm"}
_ANY_SIGN = {"ring_offset_deg"}


def structure_sites(name: str, **params) -> np.ndarray:
    """Labelling sites (m, 3) float64 in nm of a built-in structure (STRUCTURES), centred on the origin."""
    if name not in STRUCTURES:
        raise ValueError(f"unknown structure {name!r}; expected one of {', '.join(STRUCTURES)}")
    build = STRUCTURES[name]
    known = list(inspect.signature(build).parameters)
    for key, value in params.items():
        if key not in known:
            raise ValueError(f"structure {name!r} has no parameter {key!r}; its parameters are {', '.join(known)}")
        if key in _COUNTS:
            if isinstance(value, bool) or not isinstance(value, Integral) or value < _COUNTS[key]:
                raise ValueError(f"structure {name!r}: {key} must be a whole number >= {_COUNTS[key]}, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"structure {name!r}: {key} must be a finite number, got {value!r}")
        elif key not in _ANY_SIGN and (value < 0 or (value == 0 and key not in _MAY_BE_ZERO)):
            raise ValueError(
                f"structure {name!r}: {key} must be {'>= 0' if key in _MAY_BE_ZERO else '> 0'}, got {value!r}"
            )
    sites = np.asarray(build(**params), dtype=np.float64)
    return sites - sites.mean(axis=0)  # centred (they are already, up to rounding)


# ---------------------------------------------------------------------------------------------- simulation
@dataclass
class ParticleSimulation:
    """Picked particles, localisations sorted by particle then frame.

    xyz (n, 3) nm: every localisation as measured, z included (`project`: the table leaves z out);
    precision (n,) nm (x, y; z is Z_PRECISION_FACTOR worse); particle (n,) ids 0..P-1; frame (n,);
    is_background (n,); site (n,) the site each came from (-1: background); rotations (P, 3, 3): structure
    to data frame; centres (P, 2) nm: each particle's true centre (its pick is at the origin); scales (P,):
    the radius (x, y) scale; present (P, m): which sites were labelled; sites (m, 3) nm: the structure."""

    xyz: np.ndarray
    precision: np.ndarray
    particle: np.ndarray
    frame: np.ndarray
    is_background: np.ndarray
    site: np.ndarray
    rotations: np.ndarray
    centres: np.ndarray
    scales: np.ndarray
    present: np.ndarray
    sites: np.ndarray
    mode: str
    project: bool
    dropped: int
    metadata: dict = field(default_factory=dict)

    @property
    def particles(self) -> int:
        return len(self.rotations)

    def counts(self) -> np.ndarray:
        """Localisations per particle (P,)."""
        return np.bincount(self.particle, minlength=self.particles)

    def summary(self) -> str:
        counts = self.counts()
        return (
            f"{self.particles} particles ({self.dropped} dropped with < {MIN_LOCALISATIONS} localisations), "
            f"{self.mode}, {len(self.xyz)} localisations, median {np.median(counts):g} per particle, "
            f"background {100 * self.is_background.mean():.1f}%"
        )


def _axis_rotations(tilt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotations whose structure axis (z) is tilted by `tilt` radians from the view direction z, towards a
    uniform azimuth, with a uniform spin about the structure's own axis: Rz(azimuth) Ry(tilt) Rz(spin)."""
    azimuth, spin = rng.uniform(0, 2 * np.pi, (2, len(tilt)))

    def rz(a):
        c, s, o, i = np.cos(a), np.sin(a), np.zeros_like(a), np.ones_like(a)
        return np.stack([np.stack([c, -s, o], -1), np.stack([s, c, o], -1), np.stack([o, o, i], -1)], 1)

    c, s, o, i = np.cos(tilt), np.sin(tilt), np.zeros_like(tilt), np.ones_like(tilt)
    ry = np.stack([np.stack([c, o, s], -1), np.stack([o, i, o], -1), np.stack([-s, o, c], -1)], 1)
    return rz(azimuth) @ ry @ rz(spin)


def orientations(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """n rotations (n, 3, 3): "uniform" (Haar on SO(3)), "top" (axis tilted N(0, 15°) off the view
    direction), "side" (axis N(0, 15°) off the image plane), "envelope" (60% top, 40% uniform)."""
    sd = math.radians(TILT_SD_DEG)
    if kind == "uniform":
        return random_rotations(n, rng)
    if kind == "top":
        return _axis_rotations(rng.normal(0, sd, n), rng)
    if kind == "side":
        return _axis_rotations(np.pi / 2 + rng.normal(0, sd, n), rng)
    if kind == "envelope":
        top = rng.random(n) < ENVELOPE_TOP
        rotations = random_rotations(n, rng)
        rotations[top] = _axis_rotations(rng.normal(0, sd, int(top.sum())), rng)
        return rotations
    raise ValueError(f"unknown orientation {kind!r}; expected one of {', '.join(ORIENTATIONS)}")


def _number(name: str, value, low: float, high: float = math.inf, low_open=False, high_open=False) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"simulate_particles: {name} must be a number in {span}, got {value!r}")
    return float(value)


def simulate_particles(
    sites: np.ndarray,
    particles: int = 300,
    mode: str = "dnapaint",
    labelling: float = 0.5,
    repeats: float | None = None,
    precision_nm: tuple[float, float] = (3.0, 12.0),
    linker_nm: float = 5.0,
    background: float = 0.03,
    radius_jitter: float = 0.05,
    orientation: str = "uniform",
    centring_nm: float = 5.0,
    project: bool = True,
    seed: int = 0,
) -> ParticleSimulation:
    """`particles` picked copies of `sites` (m, 3) nm, simulated as the module docstring says; deterministic
    for a seed. `repeats`: mean events per present site (None: 6 for dnapaint, 2 for storm)."""
    sites = np.asarray(sites, dtype=np.float64)
    if sites.ndim != 2 or sites.shape[1] != 3 or len(sites) == 0 or not np.isfinite(sites).all():
        raise ValueError(
            f"simulate_particles: sites must be a finite (m, 3) array with m >= 1, got shape {sites.shape}"
        )
    if isinstance(particles, bool) or not isinstance(particles, Integral) or particles < 1:
        raise ValueError(f"simulate_particles: particles must be a whole number >= 1, got {particles!r}")
    if mode not in MODES:
        raise ValueError(f"simulate_particles: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if orientation not in ORIENTATIONS:
        raise ValueError(
            f"simulate_particles: unknown orientation {orientation!r}; expected one of {', '.join(ORIENTATIONS)}"
        )
    labelling = _number("labelling", labelling, 0, 1, low_open=True)
    repeats = DEFAULT_REPEATS[mode] if repeats is None else repeats
    repeats = _number("repeats", repeats, 1 if mode == "storm" else 0, low_open=mode == "dnapaint")
    try:
        low, high = (float(v) for v in precision_nm)
    except (TypeError, ValueError):
        raise ValueError(
            f"simulate_particles: precision_nm must be a (low, high) pair of nm, got {precision_nm!r}"
        ) from None
    if not (math.isfinite(high) and 0 < low <= high):
        raise ValueError(
            f"simulate_particles: precision_nm must be (low, high) with 0 < low <= high, got {precision_nm!r}"
        )
    linker_nm = _number("linker_nm", linker_nm, 0)
    background = _number("background", background, 0, 1, high_open=True)
    radius_jitter = _number("radius_jitter", radius_jitter, 0, 1, high_open=True)
    centring_nm = _number("centring_nm", centring_nm, 0)
    if not isinstance(project, bool):
        raise ValueError(f"simulate_particles: project must be True or False, got {project!r}")

    rng = np.random.default_rng(seed)
    half = float(np.linalg.norm(sites, axis=1).max()) * (1 + radius_jitter) + MARGIN_NM  # the box's half-side
    rotations = orientations(particles, orientation, rng)
    scales = rng.uniform(1 - radius_jitter, 1 + radius_jitter, particles)
    centres = rng.normal(0, centring_nm, (particles, 2))
    m = len(sites)
    kept, parts = [], []
    for k in range(particles):
        present = rng.random(m) < labelling
        placed = sites * np.array([scales[k], scales[k], 1.0]) @ rotations[k].T + np.array([*centres[k], 0.0])
        index = np.flatnonzero(present)
        if mode == "dnapaint":
            events = rng.poisson(repeats, len(index))
            blinks = np.ones(events.sum(), dtype=np.int64)
        else:
            events = rng.geometric(1 / repeats, len(index))
            blinks = 1 + rng.poisson(1.0, events.sum())
        event_site = np.repeat(index, events)
        event_xyz = placed[event_site] + rng.normal(0, linker_nm / math.sqrt(3), (len(event_site), 3))
        start = rng.integers(0, FRAMES - blinks.max(initial=1) + 1, len(event_site))
        source = np.repeat(event_site, blinks)
        xyz = np.repeat(event_xyz, blinks, axis=0)
        offset = np.arange(len(xyz)) - np.repeat(np.cumsum(blinks) - blinks, blinks)  # 0, 1, ... in each burst
        frame = np.repeat(start, blinks) + offset
        n_background = rng.poisson(background / (1 - background) * len(xyz)) if background else 0
        stray = rng.uniform(-half, half, (n_background, 3))
        xyz = np.concatenate([xyz, stray])
        source = np.concatenate([source, np.full(n_background, -1)])
        frame = np.concatenate([frame, rng.integers(0, FRAMES, n_background)])
        precision = rng.uniform(low, high, len(xyz))
        xyz = xyz + rng.normal(size=xyz.shape) * precision[:, None] * np.array([1.0, 1.0, Z_PRECISION_FACTOR])
        if len(xyz) < MIN_LOCALISATIONS:
            continue
        order = np.lexsort((source, frame))  # in frame order, as a localisation program lists them
        parts.append((xyz[order], precision[order], frame[order], source[order], np.full(len(xyz), len(kept))))
        kept.append((k, present))
    if kept:
        xyz, precision, frame, source, particle = (np.concatenate(column) for column in zip(*parts, strict=True))
        chosen = np.array([k for k, _ in kept])
        present = np.array([p for _, p in kept])
    else:
        xyz, precision = np.empty((0, 3)), np.empty(0)
        frame, source, particle = (np.empty(0, dtype=np.int64) for _ in range(3))
        chosen, present = np.empty(0, dtype=np.int64), np.empty((0, m), dtype=bool)
    metadata = {
        "particles": particles,
        "mode": mode,
        "labelling": labelling,
        "repeats": repeats,
        "precision_nm": [low, high],
        "linker_nm": linker_nm,
        "background": background,
        "radius_jitter": radius_jitter,
        "orientation": orientation,
        "centring_nm": centring_nm,
        "project": project,
        "seed": seed,
        "box_half_nm": half,
        "frames": FRAMES,
        "dropped": particles - len(kept),
    }
    return ParticleSimulation(
        xyz=xyz,
        precision=precision,
        particle=particle.astype(np.int64),
        frame=frame.astype(np.int64),
        is_background=source < 0,
        site=source.astype(np.int64),
        rotations=rotations[chosen],
        centres=centres[chosen],
        scales=scales[chosen],
        present=present,
        sites=sites,
        mode=mode,
        project=project,
        dropped=particles - len(kept),
        metadata=metadata,
    )


# ------------------------------------------------------------------------------------------------- presets
PRESETS = {
    "nup107": {
        "structure": "npc",
        "params": {"radius_nm": 50.0, "ring_spacing_nm": 60.0, "corners": 8, "copies": 2, "ring_offset_deg": 0.0},
        "simulation": {"particles": 300, "mode": "dnapaint", "labelling": 0.5},
    },
    "centriole": {
        "structure": "centriole",
        "params": {"radius_nm": 100.0, "blades": 9, "sites_per_blade": 5, "length_nm": 150.0},
        "simulation": {"particles": 200, "mode": "dnapaint", "labelling": 0.5},
    },
    "tetrahedron": {
        "structure": "tetrahedron",
        "params": {"edge_nm": 100.0, "sites_per_edge": 2},
        "simulation": {"particles": 200, "mode": "dnapaint", "labelling": 0.8},  # origami staples: well labelled
    },
}


def preset(name: str, mode: str | None = None, **overrides) -> ParticleSimulation:
    """The simulation of a preset (PRESETS), in `mode` (None: the preset's), with simulate_particles keywords
    in `overrides` (particles=, seed=, ...). Its metadata adds the preset, structure and structure params."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    allowed = [p for p in inspect.signature(simulate_particles).parameters if p not in ("sites", "mode")]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"preset {name!r}: unknown parameter(s) {unknown}; expected some of {', '.join(allowed)}")
    entry = PRESETS[name]
    kwargs = {**entry["simulation"], **overrides}
    if mode is not None:
        kwargs["mode"] = mode
    sim = simulate_particles(structure_sites(entry["structure"], **entry["params"]), **kwargs)
    sim.metadata.update(preset=name, structure=entry["structure"], structure_params=dict(entry["params"]))
    return sim


# ------------------------------------------------------------------------------------------------- writers
def _fixed(value: float, decimals: int) -> str:
    """`value` with `decimals` decimals, never "-0.00"."""
    return f"{round(float(value), decimals) + 0.0:.{decimals}f}"


def write_particles(path: str | Path, sim: ParticleSimulation) -> Path:
    """The localisations as a generic CSV table (units in the header; z only when not projected), 2 decimals:
    `particle,frame,x [nm],y [nm][,z [nm]],precision [nm]`."""
    path = Path(path)
    columns = ["particle", "frame", "x [nm]", "y [nm]", *([] if sim.project else ["z [nm]"]), "precision [nm]"]
    coordinates = sim.xyz[:, :2] if sim.project else sim.xyz
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for pid, frame, point, sigma in zip(sim.particle, sim.frame, coordinates, sim.precision, strict=True):
            writer.writerow([int(pid), int(frame), *(_fixed(v, 2) for v in point), _fixed(sigma, 2)])
    return path


def write_truth(folder: str | Path, sim: ParticleSimulation) -> list[Path]:
    """truth_sites.csv (the structure's sites in nm) and truth_poses.csv (per particle its rotation, structure
    to data frame, row by row r00..r22; its true centre; its radius scale)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sites, poses = folder / "truth_sites.csv", folder / "truth_poses.csv"
    with sites.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["x [nm]", "y [nm]", "z [nm]"])
        writer.writerows([_fixed(v, 4) for v in point] for point in sim.sites)
    with poses.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["particle", *(f"r{i}{j}" for i in range(3) for j in range(3)), "cx [nm]", "cy [nm]", "scale"])
        for k in range(sim.particles):
            writer.writerow(
                [
                    k,
                    *(_fixed(v, 6) for v in sim.rotations[k].reshape(-1)),
                    *(_fixed(v, 2) for v in sim.centres[k]),
                    _fixed(sim.scales[k], 4),
                ]
            )
    return [sites, poses]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write particles.csv, truth_sites.csv, truth_poses.csv into")
    parser.add_argument("--preset", choices=list(PRESETS), default="nup107")
    parser.add_argument("--mode", choices=list(MODES), default=None, help="default: the preset's")
    parser.add_argument("--particles", type=int, default=None, help="default: the preset's")
    parser.add_argument("--orientation", choices=list(ORIENTATIONS), default=None, help="default: uniform")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed}
    if args.particles is not None:
        overrides["particles"] = args.particles
    if args.orientation is not None:
        overrides["orientation"] = args.orientation
    try:
        sim = preset(args.preset, mode=args.mode, **overrides)
    except ValueError as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    for path in [write_particles(args.out / "particles.csv", sim), *write_truth(args.out, sim)]:
        print(path)
    print(f"{args.preset}: {sim.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
