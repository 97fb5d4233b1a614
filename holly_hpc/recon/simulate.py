"""Known structures and simulated SMLM-like images of them, rendered on the fly in batches.

A structure is an (N, 3) point cloud centred on its centroid and scaled so that its farthest point lies
at `radius` (in the renderer's [-1, 1] image frame), so any rotation stays inside the image.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import missing, resolve_path
from ..io.mesh import MeshFormatError, read_obj_vertices
from .geometry import random_rotations
from .render import render_images


def torus_points(num_points: int, major: float = 1.0, minor: float = 0.35) -> torch.Tensor:
    """Points spread evenly over a torus surface about the z axis (deterministic: a golden-angle lattice)."""
    k = torch.arange(num_points, dtype=torch.float64)
    u = 2 * math.pi * k / num_points  # around the axis
    v = 2 * math.pi * ((k * (math.sqrt(5) - 1) / 2) % 1.0)  # around the tube
    ring = major + minor * torch.cos(v)
    return torch.stack((ring * torch.cos(u), ring * torch.sin(u), minor * torch.sin(v)), dim=-1)


def nuclear_pore_points(num_points: int, rings: float = 0.35, spread: float = 0.04) -> torch.Tensor:
    """Two stacked 8-fold rings, like a nuclear pore complex's: sites at radius 1, rings ±`rings` apart in z,
    num_points spread over the 16 sites (deterministic jitter of `spread` around each)."""
    sites = []
    for z in (rings, -rings):
        for k in range(8):
            a = 2 * math.pi * k / 8 + (math.pi / 8 if z < 0 else 0.0)  # the rings are staggered
            sites.append((math.cos(a), math.sin(a), z))
    sites_t = torch.tensor(sites, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    idx = torch.arange(num_points) % len(sites)
    return sites_t[idx] + spread * torch.randn(num_points, 3, generator=g, dtype=torch.float64)


def tetrahedron_points(num_points: int) -> torch.Tensor:
    """Points evenly along the six edges of a regular tetrahedron."""
    v = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    edges = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    t = (torch.arange(num_points, dtype=torch.float64) // len(edges)) / max(num_points // len(edges), 1)
    out = [v[edges[k % 6][0]] * (1 - t[k]) + v[edges[k % 6][1]] * t[k] for k in range(num_points)]
    return torch.stack(out)


def asymmetric_points(num_points: int) -> torch.Tensor:
    """A fixed random cloud of five clusters of unequal sizes at unequal distances: no rotation or
    mirror maps it onto itself."""
    g = torch.Generator().manual_seed(1234)
    centres = torch.tensor(
        [[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.2, 0.7, 0.1], [-0.3, -0.2, 0.8], [-0.6, 0.5, -0.5]], dtype=torch.float64
    )
    widths = torch.tensor([0.15, 0.08, 0.12, 0.05, 0.1], dtype=torch.float64)
    share = torch.tensor([0.3, 0.15, 0.25, 0.1, 0.2])
    which = torch.multinomial(share, num_points, replacement=True, generator=g)
    return centres[which] + widths[which, None] * torch.randn(num_points, 3, generator=g, dtype=torch.float64)


def teapot_points(num_points: int) -> torch.Tensor:
    """A teapot-like cloud (HOLLy's test shape, without its OBJ): a squat body, a spout rising on +x, a
    handle loop on -x and a knob on the lid. One mirror plane (y = 0, through spout and handle), exactly:
    half the points are the other half's mirror images, so every image has two poses (metrics.self_mirror)."""
    g = torch.Generator().manual_seed(4321)
    half = (num_points + 1) // 2
    share = torch.tensor([0.55, 0.2, 0.18, 0.07])  # body, spout, handle, knob
    which = torch.multinomial(share, half, replacement=True, generator=g)
    u = torch.rand(half, 2, generator=g, dtype=torch.float64)
    theta, phi = 2 * math.pi * u[:, 0], torch.acos(1 - 2 * u[:, 1])
    body = torch.stack((0.6 * torch.sin(phi) * torch.cos(theta), 0.6 * torch.sin(phi) * torch.sin(theta),
                        0.42 * torch.cos(phi)), -1)  # fmt: skip
    t = u[:, 0]  # along the spout (from the body's side up and out) and around the handle
    ring = 0.05 * torch.stack((torch.cos(theta), torch.sin(theta)), -1)
    spout = torch.stack((0.5 + 0.45 * t + ring[:, 0], ring[:, 1], -0.1 + 0.45 * t), -1)
    arc = math.pi * (t - 0.5)
    handle = torch.stack((-0.6 - 0.28 * torch.cos(arc) + ring[:, 0], ring[:, 1], 0.28 * torch.sin(arc)), -1)
    knob = torch.stack((0.08 * torch.sin(phi) * torch.cos(theta), 0.08 * torch.sin(phi) * torch.sin(theta),
                        0.5 + 0.06 * torch.cos(phi)), -1)  # fmt: skip
    parts = torch.stack((body, spout, handle, knob))  # (4, half, 3)
    points = parts[which, torch.arange(half)]
    mirrored = points * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    return torch.cat((points, mirrored))[:num_points]


# Built-in shapes: their points, and the symmetry their rotation error is measured modulo (geometry.py).
BUILTIN_SHAPES = {
    "torus": (torus_points, "axial"),
    "npc": (nuclear_pore_points, "none"),
    "tetrahedron": (tetrahedron_points, "none"),
    "asymmetric": (asymmetric_points, "none"),
    "teapot": (teapot_points, "none"),
}
BUILTIN_SYMMETRY = {name: sym for name, (_, sym) in BUILTIN_SHAPES.items()}


def structure_problem(value: str, base_dir: Path, builtins: Collection[str], expected: str | None = None) -> str | None:
    """None if a spec's `value` is one of `builtins` or an existing, readable OBJ file (resolve_path: `~`
    expanded, relative to base_dir) whose vertices have an extent; else the problem: the file is missing
    ("expected <expected>, but ... does not exist"; by default "a built-in shape (<builtins>) or an existing
    OBJ file") or the OBJ reader's complaint (its file and line)."""
    if value in builtins:
        return None
    path = resolve_path(value, base_dir)
    problem = missing(path, expected or f"a built-in shape ({', '.join(builtins)}) or an existing OBJ file")
    if problem:
        return problem
    try:
        read_obj_vertices(path)
    except MeshFormatError as exc:
        return str(exc)
    return None


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


def load_structure(
    name_or_path: str, num_points: int, radius: float, base_dir: Path | None = None, symmetry: str = "auto"
) -> Structure:
    """A built-in shape by name, or the vertices of an OBJ file (resolve_path: `~` expanded, relative paths
    from base_dir, or from the working directory without one).

    symmetry "auto" takes the built-in shape's own ("none" for an OBJ); "axial"/"none" override it.
    """
    if name_or_path in BUILTIN_SHAPES:
        make, own_symmetry = BUILTIN_SHAPES[name_or_path]
        raw = make(num_points)
    else:
        path = resolve_path(name_or_path, base_dir if base_dir is not None else Path())
        raw = torch.from_numpy(read_obj_vertices(path))
        own_symmetry = "none"
    chosen = own_symmetry if symmetry == "auto" else symmetry
    return Structure(normalise_structure(raw, radius).float(), chosen, name_or_path)


EVAL_STREAM = 2**31  # generator position of a held-out set: never reached by a training step
TEST_STREAM = EVAL_STREAM + 1  # ... of the test set: disjoint from the training and validation draws
DATASET_STREAM = 2**40  # ... of chunk c of a fixed training set (DATASET_STREAM + c)
SHUFFLE_STREAM = 2**41  # ... of epoch e's order of a fixed training set (SHUFFLE_STREAM + e)
DATASET_CHUNK = 1024  # items of a fixed set drawn per generator: item i depends on the seed and i alone


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator for one batch: a pure function of (seed, step), so the data position is the step."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return g


def in_plane_rotations(angles: torch.Tensor) -> torch.Tensor:
    """Rotations (B, 3, 3) about the view axis z by `angles` (radians)."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    return torch.stack((cos, -sin, zero, sin, cos, zero, zero, zero, one), -1).view(-1, 3, 3)


@dataclass(frozen=True)
class LocalisationNoise:
    """How real SMLM data departs from the ideal structure, drawn afresh for every image.

    wobble: std of a Gaussian jitter of every point (image-frame units; the image spans [-1, 1]).
    dropout: probability that a point is missing (fluorophore never detected).
    spawn: probability of each of a site's `max_spawn` possible extra fluorophores (HOLLy's max_spawn), so a
    site shows Binomial(max_spawn, spawn) extras; each lies `spawn_spread` away (Gaussian std, around the
    wobbled site).
    """

    wobble: float = 0.0
    dropout: float = 0.0
    spawn: float = 0.0
    spawn_spread: float = 0.02
    max_spawn: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.max_spawn, bool) or not isinstance(self.max_spawn, int) or self.max_spawn < 0:
            raise ValueError(f"max_spawn must be a whole number >= 0, got {self.max_spawn!r}")

    @property
    def spawning(self) -> bool:
        return self.spawn > 0 and self.max_spawn > 0

    @property
    def active(self) -> bool:
        return self.wobble > 0 or self.dropout > 0 or self.spawning

    def points_per_image(self, n: int) -> int:
        """M, the points of every noisy copy of an n-point structure (the sites, then max_spawn slots each)."""
        return n * (1 + self.max_spawn) if self.spawning else n


def noisy_points(
    points: torch.Tensor, batch: int, noise: LocalisationNoise, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-image copies of `points` (N, 3) with noise: points (B, M, 3) and blob weights (B, M) or None.

    Dropped points keep their place with weight 0 and spawned ones are appended with weight 0 or 1, so
    every image of the batch has the same M and the whole batch renders in one call. With K = max_spawn,
    the extras are K blocks of N (extra k of site i at column N + k·N + i), all drawn in one call: for
    K = 1 the draws are those of a single extra per site.
    """
    if not noise.active:
        return points, None
    n = points.shape[0]
    out = points.expand(batch, n, 3)
    if noise.wobble > 0:
        out = out + noise.wobble * torch.randn(batch, n, 3, generator=generator, dtype=points.dtype)
    weights = (torch.rand(batch, n, generator=generator) >= noise.dropout).to(points.dtype)
    if noise.spawning:
        k = noise.max_spawn
        sites = out.repeat(1, k, 1)  # (B, K·N, 3): K copies of the (wobbled) sites
        extra = sites + noise.spawn_spread * torch.randn(batch, k * n, 3, generator=generator, dtype=points.dtype)
        extra_weights = (torch.rand(batch, k * n, generator=generator) < noise.spawn).to(points.dtype)
        out, weights = torch.cat((out, extra), dim=1), torch.cat((weights, extra_weights), dim=1)
    return out, weights


@dataclass(frozen=True)
class SimulatedItems:
    """Drawn images before rendering: poses and (with noise) each image's own points and blob weights."""

    rotations: torch.Tensor  # (B, 3, 3)
    translations: torch.Tensor  # (B, 2)
    points: torch.Tensor  # (B, M, 3), or the structure's (N, 3) shared by all without noise
    weights: torch.Tensor | None  # (B, M) or None

    def __len__(self) -> int:
        return self.rotations.shape[0]

    def take(self, idx: torch.Tensor) -> SimulatedItems:
        """The items `idx` (a 1-D index tensor), in that order."""
        per_image = self.weights is not None
        return SimulatedItems(
            self.rotations[idx],
            self.translations[idx],
            self.points[idx] if per_image else self.points,
            self.weights[idx] if per_image else None,
        )


def draw_items(
    structure: Structure,
    count: int,
    max_translation: float,
    generator: torch.Generator,
    noise: LocalisationNoise | None = None,
) -> SimulatedItems:
    """`count` random poses (uniform on SO(3), translations uniform in ±max_translation) and noisy copies of
    the structure, drawn on the CPU from `generator` in that order (what simulate_batch draws first)."""
    rotations = random_rotations(count, generator)
    translations = (torch.rand(count, 2, generator=generator) * 2 - 1) * max_translation
    points, weights = noisy_points(structure.points, count, noise or LocalisationNoise(), generator)
    return SimulatedItems(rotations, translations, points, weights)


def fixed_items(
    structure: Structure, count: int, max_translation: float, seed: int, noise: LocalisationNoise | None = None
) -> SimulatedItems:
    """A fixed training set of `count` items: chunks of DATASET_CHUNK drawn from generator positions
    DATASET_STREAM + chunk, so item i is a function of the seed and i alone (a larger set only adds items)."""
    chunks = [
        draw_items(structure, DATASET_CHUNK, max_translation, batch_generator(seed, DATASET_STREAM + c), noise)
        for c in range(-(-count // DATASET_CHUNK))
    ]
    per_image = bool(chunks) and chunks[0].weights is not None
    return SimulatedItems(
        torch.cat([c.rotations for c in chunks])[:count],
        torch.cat([c.translations for c in chunks])[:count],
        torch.cat([c.points for c in chunks])[:count] if per_image else structure.points,
        torch.cat([c.weights for c in chunks])[:count] if per_image else None,
    )


def epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    """The order (a permutation of range(count)) in which epoch `epoch` visits a fixed training set."""
    return torch.randperm(count, generator=batch_generator(seed, SHUFFLE_STREAM + epoch))


def render_items(
    items: SimulatedItems,
    image_size: int,
    sigma_px: float | torch.Tensor,
    device: torch.device,
    spin_angles: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The images of `items` on `device`, batched; `spin_angles` (B,) spin each pose about the view axis
    first (see simulate_batch), and the returned rotations include the spin."""
    rotations = items.rotations
    if spin_angles is not None:
        rotations = in_plane_rotations(spin_angles) @ rotations
    rotations, translations = rotations.to(device), items.translations.to(device)
    points = items.points.to(device)
    weights = None if items.weights is None else items.weights.to(device)
    with torch.no_grad():
        images = render_images(points, rotations, sigma_px, image_size, translations, weights)
    return {"images": images, "rotations": rotations, "translations": translations}


def simulate_batch(
    structure: Structure,
    batch_size: int,
    image_size: int,
    sigma_px: float | torch.Tensor,
    max_translation: float,
    generator: torch.Generator,
    device: torch.device,
    noise: LocalisationNoise | None = None,
    spin: bool = False,
) -> dict[str, torch.Tensor]:
    """Random poses (uniform on SO(3), translations uniform in ±max_translation) and their images.

    Random numbers are drawn on the CPU from `generator` so a batch is identical on every device; the
    rendering runs on `device`, batched, with no per-image loop.

    spin: in-plane augmentation. For a simulated image it is exactly a spin of the pose about the view
    axis, applied before rendering: no resampling, and the returned rotations include it. Its angles are
    drawn last, so the same (seed, step) gives the same poses and noise with or without it.
    """
    items = draw_items(structure, batch_size, max_translation, generator, noise)
    angles = torch.rand(batch_size, generator=generator) * 2 * math.pi if spin else None
    return render_items(items, image_size, sigma_px, device, angles)
