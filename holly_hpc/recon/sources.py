"""Where reconstruct's images come from: a simulation, FITS files, or localisation tables.

Every source hands out batches as a pure function of (seed, step) and the current curriculum sigma, so a
resumed run sees exactly the batches an uninterrupted one would, and holds out a fixed evaluation set.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import torch
import torch.nn.functional as F

from ..io import resolve_path
from .geometry import rotate_points
from .render import frame_pixels, frame_shape, render_images
from .simulate import (
    EVAL_STREAM,
    TEST_STREAM,
    LocalisationNoise,
    SimulatedItems,
    Structure,
    batch_generator,
    epoch_order,
    fixed_items,
    in_plane_rotations,
    load_structure,
    render_items,
    simulate_batch,
)


class ImageSource(ABC):
    """Images (B, S, S) for training and evaluation; ground truth where the source knows it."""

    ground_truth: Structure | None = None
    nm_per_unit: float | None = None  # nm per image-frame unit, where the source knows it (localisations)
    report_lines: tuple[str, ...] = ()  # what the source read, printed before training

    def write_report(self, folder: Path) -> list[Path]:
        """Files describing the data as read (e.g. picked particles); none by default."""
        return []

    @abstractmethod
    def train_batch(self, step: int, batch_size: int, sigma: float) -> dict[str, torch.Tensor]:
        """{"images": (B, S, S)} plus "rotations"/"translations" when the truth is known."""

    @abstractmethod
    def eval_batch(self, sigma: float) -> dict[str, torch.Tensor]:
        """The held-out images at `sigma` (the same images at every call)."""


# ------------------------------------------------------------------------------------------ simulate
class SimulatedSource(ImageSource):
    """A known structure at random poses. data.simulate.dataset_size 0: an endless stream, every step's batch
    drawn afresh from (seed, step); N > 0: a fixed set of N poses and noise draws (fixed by the seed), visited
    in a new order every epoch (a pure function of seed and epoch, so a resumed run sees the same batches).
    Either way the validation set (eval_batch) and the test set (test_batch, data.simulate.test_size) are
    draws of their own generator streams, never training items."""

    def __init__(self, data: dict, seed: int, device: torch.device, base_dir: Path):
        sim = data["simulate"]
        self.ground_truth = load_structure(sim["structure"], sim["num_points"], sim["radius"], base_dir)
        self.noise = LocalisationNoise(
            sim["wobble"], sim["dropout"], sim["spawn"], sim["spawn_spread"], int(sim.get("max_spawn", 1))
        )
        self.data, self.seed, self.device = data, seed, device
        self.dataset_size = int(sim.get("dataset_size", 0) or 0)
        self.validation_size = int(sim.get("validation_size", 0) or 0) or data["eval_size"]
        self.test_size = int(sim.get("test_size", 0) or 0)
        self.items: SimulatedItems | None = None
        self._orders: dict[int, torch.Tensor] = {}  # epoch -> its order (a cache: the order is a pure function)
        lines = []
        if self.dataset_size:
            self.items = fixed_items(self.ground_truth, self.dataset_size, data["max_translation"], seed, self.noise)
            lines.append(
                f"data: a fixed simulated set of {self.dataset_size} images (poses and noise fixed by seed {seed}), "
                "in a new order every epoch"
            )
        if self.dataset_size or self.test_size:
            held = f"data: {self.validation_size} simulated images held out for validation"
            lines.append(held + (f", {self.test_size} for the test at the end" if self.test_size else ""))
        self.report_lines = tuple(lines)

    def _batch(self, position: int, size: int, sigma: float, spin: bool = False) -> dict[str, torch.Tensor]:
        return simulate_batch(
            self.ground_truth,
            size,
            self.data["image_size"],
            sigma,
            self.data["max_translation"],
            batch_generator(self.seed, position),
            self.device,
            self.noise,
            spin,
        )

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if len(self._orders) >= 4:  # a batch spans at most a few epochs: keep the newest
                del self._orders[min(self._orders)]
            self._orders[epoch] = epoch_order(self.seed, epoch, self.dataset_size)
        return self._orders[epoch]

    def train_items(self, step: int, batch_size: int) -> torch.Tensor:
        """Indices (B,) of the fixed set's items in the batch of `step`: positions step·B … step·B + B - 1 of
        the endless sequence of epochs, each epoch one permutation of the N items (so every N consecutive
        positions from a multiple of N cover every item once; a batch may straddle two epochs)."""
        if not self.dataset_size:
            raise ValueError("train_items: data.simulate.dataset_size is 0 (an endless stream has no items)")
        n = self.dataset_size
        positions = step * batch_size + torch.arange(batch_size)
        epochs, offsets = positions // n, positions % n
        first = int(epochs[0])
        orders = torch.stack([self._order(e) for e in range(first, int(epochs[-1]) + 1)])
        return orders[epochs - first, offsets]

    def epoch(self, step: int, batch_size: int) -> float:
        """Epochs of the fixed set completed after `step` steps (0 for an endless stream)."""
        return step * batch_size / self.dataset_size if self.dataset_size else 0.0

    def train_batch(self, step, batch_size, sigma):
        if self.items is None:
            return self._batch(step, batch_size, sigma, spin=self.data["augment_in_plane"])
        items = self.items.take(self.train_items(step, batch_size))
        angles = None
        if self.data["augment_in_plane"]:  # a fresh spin each time an item is seen, from the step's generator
            angles = torch.rand(batch_size, generator=batch_generator(self.seed, step)) * 2 * math.pi
        return render_items(items, self.data["image_size"], sigma, self.device, angles)

    def eval_batch(self, sigma):
        return self._batch(EVAL_STREAM, self.validation_size, sigma)

    def test_batch(self, sigma: float) -> dict[str, torch.Tensor]:
        """The test set at `sigma` (the same images at every call): test_size draws of a stream of its own,
        disjoint from the training items and the validation set."""
        if not self.test_size:
            raise ValueError("test_batch: data.simulate.test_size is 0 (no test set)")
        return self._batch(TEST_STREAM, self.test_size, sigma)


# ----------------------------------------------------------------------------------- image utilities
def gaussian_blur(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Blur (B, H, W) images with a normalised Gaussian (separable, ±4 sigma, zero padding)."""
    if sigma_px <= 0:
        return images
    radius = max(1, math.ceil(4 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(images[:, None], kernel.view(1, 1, 1, -1), padding=(0, radius))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return out[:, 0]


def rotate_in_plane(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, W) images about their centres by `angles` (radians), bilinear, zeros outside."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    zero = torch.zeros_like(cos)
    # affine_grid's x and y run over ±1 of the width and of the height: for a non-square image a turn in
    # pixels is a turn with its off-diagonal terms scaled by the aspect ratio.
    height, width = images.shape[1:]
    theta = torch.stack(
        (torch.stack((cos, -sin * height / width, zero), -1), torch.stack((sin * width / height, cos, zero), -1)), 1
    )
    grid = F.affine_grid(theta.to(images.dtype), (images.shape[0], 1, *images.shape[1:]), align_corners=False)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def _split(n: int, eval_size: int, what: str) -> tuple[int, int]:
    """(training count, held-out count): the last eval_size items are held out, at most a fifth of them."""
    held = min(eval_size, n // 5)
    if n - held < 1 or held < 1:
        raise ValueError(f"{what}: {n} item(s) are too few to hold out an evaluation set (need at least 5)")
    return n - held, held


def _pick(step: int, seed: int, count: int, batch_size: int) -> tuple[torch.Tensor, torch.Generator]:
    g = batch_generator(seed, step)
    return torch.randint(count, (batch_size,), generator=g), g


# --------------------------------------------------------------------------------------------- fits
class FitsSource(ImageSource):
    """FITS images: one folder blurred on the fly, or HOLLy's one folder per sigma (nearest one used)."""

    def __init__(self, data: dict, seed: int, device: torch.device, base_dir: Path):
        from ..io.fits import read_fits_folder, read_fits_folders_by_sigma

        cfg, shape = data["fits"], frame_shape(data["image_size"])
        if cfg.get("folder"):
            self.by_sigma = None
            stack = torch.from_numpy(read_fits_folder(resolve_path(cfg["folder"], base_dir), expected_shape=shape))
            self.images = {0.0: stack.to(device)}
        else:
            stacks = read_fits_folders_by_sigma(
                {float(k): resolve_path(v, base_dir) for k, v in cfg["folders"].items()}, expected_shape=shape
            )
            self.images = {s: torch.from_numpy(v).to(device) for s, v in stacks.items()}
            self.by_sigma = sorted(self.images)
        n = next(iter(self.images.values())).shape[0]
        self.n_train, self.n_eval = _split(n, data["eval_size"], "FITS images")
        capped = (
            f" (eval_size {data['eval_size']} capped to a fifth of the images)"
            if self.n_eval < data["eval_size"]
            else ""
        )
        self.report_lines = (
            f"data: {n} FITS images of {shape[0]}x{shape[1]} px: {self.n_train} for training, {self.n_eval} held out{capped}",
        )
        self.data, self.seed = data, seed

    def _stack(self, sigma: float) -> tuple[torch.Tensor, bool]:
        """The stack to use at `sigma` and whether it still needs blurring."""
        if self.by_sigma is None:
            return self.images[0.0], True
        nearest = min(self.by_sigma, key=lambda s: abs(s - sigma))
        return self.images[nearest], False

    def train_batch(self, step, batch_size, sigma):
        stack, blur = self._stack(sigma)
        idx, g = _pick(step, self.seed, self.n_train, batch_size)
        images = stack[idx.to(stack.device)]
        if self.data["augment_in_plane"]:
            images = rotate_in_plane(images, (torch.rand(batch_size, generator=g) * 2 * math.pi).to(images.device))
        return {"images": gaussian_blur(images, sigma) if blur else images}

    def eval_batch(self, sigma):
        stack, blur = self._stack(sigma)
        images = stack[self.n_train : self.n_train + self.n_eval]
        return {"images": gaussian_blur(images, sigma) if blur else images}


# ------------------------------------------------------------------------------------ localisations
class LocalisationSource(ImageSource):
    """Per-particle localisations (nm), picked from a field of view where the file has no particle ids,
    rendered on the fly at random in-plane rotations and the current sigma: what HOLLy needed a separate
    pre-render step (and tens of GB of FITS) for."""

    def __init__(self, data: dict, seed: int, device: torch.device, base_dir: Path):
        from .particles import describe, load_particles

        cfg = data["localisations"]
        self.particles = load_particles(cfg, base_dir)
        particles = [torch.as_tensor(p, dtype=torch.float32) for p in self.particles.points]
        longest = max(len(p) for p in particles)
        points = torch.zeros(len(particles), longest, 3)
        weights = torch.zeros(len(particles), longest)
        # nm -> image frame ([-1, 1] spans image_size pixels); 2D tables get z = 0.
        self.nm_per_unit = cfg["pixel_size_nm"] * frame_pixels(data["image_size"]) / 2
        for i, p in enumerate(particles):
            points[i, : len(p), : p.shape[1]] = p / self.nm_per_unit
            weights[i, : len(p)] = 1.0
        # Per-localisation precision in image-frame units (0 where padded), for renderers that use it.
        self.precision = None
        if self.particles.precision is not None:
            self.precision = torch.zeros(len(particles), longest)
            for i, sigma in enumerate(self.particles.precision):
                self.precision[i, : len(sigma)] = torch.as_tensor(sigma, dtype=torch.float32) / self.nm_per_unit
            self.precision = self.precision.to(device)
        self.points, self.weights = points.to(device), weights.to(device)
        self.n_train, self.n_eval = _split(len(particles), data["eval_size"], f"particles in {cfg['path']}")
        self.report_lines, self.report = describe(
            self.particles, self.n_eval, data["eval_size"], data["image_size"], cfg["pixel_size_nm"]
        )
        self.data, self.seed, self.device = data, seed, device
        self.truth = None
        if cfg.get("truth"):
            from .truth import load_truth

            self.truth = load_truth(cfg["truth"], base_dir, self.particles.ids, self.nm_per_unit)

    def write_report(self, folder: Path) -> list[Path]:
        from .particles import write_report

        return write_report(folder, self.particles, self.report)

    def blob_sigma(self, idx: torch.Tensor, sigma: float) -> torch.Tensor | float:
        """Each localisation's blur in pixels: the curriculum's sigma and its own precision in quadrature
        (a precise localisation is drawn sharp), or the curriculum's alone without a precision column."""
        if self.precision is None:
            return sigma
        precision_px = self.precision[idx] * (frame_pixels(self.data["image_size"]) / 2)
        return (sigma * sigma + precision_px.pow(2)).sqrt()

    def _batch(self, idx: torch.Tensor, angles: torch.Tensor, sigma: float) -> dict[str, torch.Tensor]:
        """Images of the particles `idx` spun by `angles`, and their localisations as spun (for the likelihood)."""
        spin = in_plane_rotations(angles).to(self.device)
        idx = idx.to(self.device)
        points, weights = self.points[idx], self.weights[idx]
        with torch.no_grad():
            images = render_images(points, spin, self.blob_sigma(idx, sigma), self.data["image_size"], weights=weights)
            locs = rotate_points(points, spin)[..., :2]
        batch = {"images": images, "locs": locs, "mask": weights}
        if self.precision is not None:
            batch["precision"] = self.precision[idx]
        return batch

    def train_batch(self, step, batch_size, sigma):
        idx, g = _pick(step, self.seed, self.n_train, batch_size)
        angles = torch.rand(batch_size, generator=g) * 2 * math.pi
        return self._batch(idx, angles, sigma)

    def eval_batch(self, sigma):
        idx = torch.arange(self.n_train, self.n_train + self.n_eval)
        angles = torch.rand(self.n_eval, generator=batch_generator(self.seed, EVAL_STREAM)) * 2 * math.pi
        return self._batch(idx, angles, sigma)


SOURCES = {"simulate": SimulatedSource, "fits": FitsSource, "localisations": LocalisationSource}


def make_source(data: dict, seed: int, device: torch.device, base_dir: Path) -> ImageSource:
    return SOURCES[data["source"]](data, seed, device, base_dir)
