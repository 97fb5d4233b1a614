"""Synthetic two-channel cells with class-dependent morphology and texture: a dataset that needs no files.

Channel 0 is the cell body (cytoplasm plus a brighter membrane rim), channel 1 the nucleus (DNA), as a
16-bit camera records them: background offset, per-cell gain, shot-like noise. Classes differ in what a
biologist would look at, never in a pixel position, since every cell is placed, sized and turned at random:

    0 round       near-circular cell, round central nucleus
    1 elongated   ellipse of aspect 1.7–2.3, elongated nucleus along the same axis
    2 lobed       radius modulated by 4–6 lobes (blebbing, irregular outline)
    3 punctate    round cell like 0 whose nucleus carries bright foci (a texture class)

Item i is a pure function of (seed, i): any subset can be read in any order, by any process, and the
dataset is as large as asked without holding anything in memory. Labels are i mod classes (balanced).
"""

from __future__ import annotations

import numpy as np

from ..io.images import ImageCollection

CLASS_NAMES = ("round", "elongated", "lobed", "punctate")
BACKGROUND = 100.0  # camera offset in counts
FULL_SCALE = 3000.0  # counts of a fully bright pixel before the per-cell gain


class SyntheticCells(ImageCollection):
    """`count` cells of `size`² pixels, `classes` (2–4) classes, uint16 (C=2) arrays."""

    channels = 2

    def __init__(self, count: int, size: int = 64, classes: int = 4, seed: int = 0):
        if not 2 <= classes <= len(CLASS_NAMES):
            raise ValueError(f"synthetic cells have 2 to {len(CLASS_NAMES)} classes, got {classes}")
        if size < 16:
            raise ValueError(f"synthetic cells need at least 16x16 pixels, got {size}")
        self.count, self.size, self.classes, self.seed = count, size, classes, seed
        self.ids = [f"synthetic/{i}" for i in range(count)]
        self.labels = [CLASS_NAMES[i % classes] for i in range(count)]
        self.bad = []
        self.shape_hw = (size, size)

    def read(self, index: int) -> np.ndarray:
        return self.render(index)[0]

    def mask(self, index: int) -> np.ndarray:
        """The cell's binary mask (size, size), the ground truth of the shape embedding."""
        return self.render(index)[1]

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.count:
            raise IndexError(f"synthetic cell {index} out of range 0..{self.count - 1}")
        rng = np.random.default_rng([self.seed, index])
        cls = index % self.classes
        s = self.size
        # Cell frame: random centre (kept inside), size, orientation.
        radius = s * rng.uniform(0.22, 0.30)
        aspect = rng.uniform(1.7, 2.3) if cls == 1 else rng.uniform(1.0, 1.15)
        major, minor = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
        angle = rng.uniform(0, np.pi)
        margin = major * 1.05 + 2
        centre = rng.uniform(margin, s - margin, size=2) if s - 2 * margin > 0 else np.full(2, s / 2)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5
        dy, dx = yy - centre[0], xx - centre[1]
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        rho = np.hypot(u / major, v / minor)  # 1 on the outline of the plain ellipse
        theta = np.arctan2(v / minor, u / major)
        outline = np.ones_like(rho)
        if cls == 2:
            lobes = rng.integers(4, 7)
            outline = 1 + rng.uniform(0.18, 0.26) * np.cos(lobes * theta + rng.uniform(0, 2 * np.pi))
        else:
            outline = 1 + 0.04 * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))  # no cell is a perfect ellipse
        edge = (outline - rho) * minor  # signed distance to the outline, about in pixels
        body = 1 / (1 + np.exp(-np.clip(edge * 2.0, -50, 50)))
        rim = np.exp(-((edge - 1.0) / 1.2) ** 2)
        mask = edge > 0

        # Nucleus: a smaller ellipse along the cell's axis, a little off centre.
        scale = rng.uniform(0.40, 0.50)
        shift = rng.normal(0, 0.05, size=2) * radius
        nu, nv = u - shift[0], v - shift[1]
        n_aspect = np.sqrt(aspect) if cls == 1 else 1.0
        n_rho = np.hypot(nu / (scale * radius * n_aspect), nv / (scale * radius / n_aspect))
        nucleus = 1 / (1 + np.exp(-np.clip((1 - n_rho) * scale * radius * 2.0, -50, 50)))
        nucleus *= 0.55 + 0.15 * rng.standard_normal((s, s)).clip(-2, 2) * 0.3  # chromatin grain
        if cls == 3:
            foci = rng.integers(5, 9)
            for _ in range(foci):
                r, a = scale * radius * 0.8 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
                fy, fx = r * np.sin(a), r * np.cos(a)
                nucleus += 1.1 * np.exp(-((nu - fx) ** 2 + (nv - fy) ** 2) / (2 * 1.1 ** 2))

        signal = np.stack([0.45 * body + 0.55 * rim * body.clip(0.2, 1), nucleus])
        gain = rng.uniform(0.6, 1.4, size=(2, 1, 1))
        counts = BACKGROUND + FULL_SCALE * gain * signal
        counts = rng.poisson(counts / 4.0) * 4.0 + rng.normal(0, 6.0, size=counts.shape)  # shot + read noise
        return counts.clip(0, 65535).astype(np.uint16), mask


def write_tiff_folder(cells: SyntheticCells, root, indices=None) -> None:
    """Write cells as 16-bit two-page TIFFs in one folder per class, `<label>/cell_<i>.tif`: a labelled
    folder dataset for tests and examples."""
    from pathlib import Path

    import tifffile

    root = Path(root)
    for i in range(len(cells)) if indices is None else indices:
        folder = root / cells.labels[i]
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / f"cell_{i:05d}.tif", cells.read(i))
