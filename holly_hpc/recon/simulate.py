"""Known structures and simulated SMLM-like images of them, rendered on the fly in batches.

A structure is an (N, 3) point cloud centred on its centroid and scaled so that its farthest point lies
at `radius` (in the renderer's [-1, 1] image frame), so any rotation stays inside the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.mesh import read_obj_vertices
from .geometry import random_rotations
from .render import render_images

# Built-in shapes and the symmetry their rotation error is measured modulo (see geometry.py).
BUILTIN_SYMMETRY = {"torus": "axial"}


def torus_points(num_points: int, major: float = 1.0, minor: float = 0.35) -> torch.Tensor:
    """Points spread evenly over a torus surface about the z axis (deterministic: a golden-angle lattice)."""
    k = torch.arange(num_points, dtype=torch.float64)
    u = 2 * math.pi * k / num_points  # around the axis
    v = 2 * math.pi * ((k * (math.sqrt(5) - 1) / 2) % 1.0)  # around the tube
    ring = major + minor * torch.cos(v)
    return torch.stack((ring * torch.cos(u), ring * torch.sin(u), minor * torch.sin(v)), dim=-1)


def normalise_structure(points: torch.Tensor, radius: float) -> torch.Tensor:
    centred = points - points.mean(dim=0, keepdim=True)
    extent = centred.norm(dim=-1).max()
    if extent <= 0:
        raise ValueError("structure has zero extent: all points coincide")
    return centred * (radius / extent)


@dataclass(frozen=True)
class Structure:
    points: torch.Tensor  # (N, 3) float32, normalised
    symmetry: str  # "axial" or "none"
    name: str


def load_structure(name_or_path: str, num_points: int, radius: float, base_dir: Path | None = None,
                   symmetry: str = "auto") -> Structure:
    """A built-in shape by name, or the vertices of an OBJ file (relative paths from base_dir).

    symmetry "auto" takes the built-in shape's own ("none" for an OBJ); "axial"/"none" override it.
    """
    if name_or_path in BUILTIN_SYMMETRY:
        raw = torus_points(num_points)
        own_symmetry = BUILTIN_SYMMETRY[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        raw = torch.from_numpy(read_obj_vertices(path))
        own_symmetry = "none"
    chosen = own_symmetry if symmetry == "auto" else symmetry
    return Structure(normalise_structure(raw, radius).float(), chosen, name_or_path)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator for one batch: a pure function of (seed, step), so the data position is the step."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return g


def simulate_batch(
    structure: Structure,
    batch_size: int,
    image_size: int,
    sigma_px: float,
    max_translation: float,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Random poses (uniform on SO(3), translations uniform in ±max_translation) and their images.

    Random numbers are drawn on the CPU from `generator` so a batch is identical on every device; the
    rendering runs on `device`, batched, with no per-image loop.
    """
    rotations = random_rotations(batch_size, generator)
    translations = (torch.rand(batch_size, 2, generator=generator) * 2 - 1) * max_translation
    rotations, translations = rotations.to(device), translations.to(device)
    with torch.no_grad():
        images = render_images(structure.points.to(device), rotations, sigma_px, image_size, translations)
    return {"images": images, "rotations": rotations, "translations": translations}
