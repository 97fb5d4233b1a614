"""Generated two-channel 16-bit cell datasets with known classes: data that need no files.

Two datasets (`data.synthetic.dataset`), both recorded as a 16-bit camera would (background offset,
per-cell gain, shot and read noise), with balanced classes (item i has class i mod classes).

`cells`: channel 0 the cell body (cytoplasm plus a brighter membrane rim), channel 1 the nucleus (DNA).
Classes differ in what a biologist would look at, never in a pixel position, since every cell is placed,
sized and turned at random. They are subtle on purpose (outline and texture), a test for embeddings:

    0 round       near-circular cell, round central nucleus
    1 elongated   ellipse of aspect 1.7–2.3, elongated nucleus along the same axis
    2 lobed       radius modulated by 4–6 lobes (blebbing, irregular outline)
    3 punctate    round cell like 0 whose nucleus carries bright foci (a texture class)

`infected_rbc`: red blood cells from a malaria culture imaged by flow cytometry (cells centred in the
frame), channel 0 brightfield, channel 1 a DNA stain. Red cells have no nucleus, so the DNA channel shows
only the parasite, and the stages differ in kind rather than by degree:

    0 uninfected   a biconcave disc, darker at its thick rim; nothing in the DNA channel
    1 ring         one small compact parasite nucleus anywhere in the cell
    2 trophozoite  one large irregular nucleus, and a dark haemozoin (pigment) spot in brightfield
    3 schizont     8–14 small merozoite nuclei in a cluster, pigment at its centre

Item i is a pure function of (seed, i): any subset can be read in any order, by any process, and the
dataset is as large as asked without holding anything in memory.
"""

from __future__ import annotations

import numpy as np

from ..io.images import ImageCollection

CLASS_NAMES = ("round", "elongated", "lobed", "punctate")
STAGE_NAMES = ("uninfected", "ring", "trophozoite", "schizont")
BACKGROUND = 100.0  # camera offset in counts
FULL_SCALE = 3000.0  # counts of a fully bright pixel before the per-cell gain


def camera(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a 16-bit camera records of `expected` counts: shot noise (4 counts per photo-electron) plus read
    noise, clipped to the 16-bit range."""
    counts = rng.poisson(expected / 4.0) * 4.0 + rng.normal(0, 6.0, size=expected.shape)
    return counts.clip(0, 65535).astype(np.uint16)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -50, 50)))


def cell_frame(s: int, centre: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) of the pixel centres of an s x s image in the cell's frame: origin at `centre`
    (y, x), u along the direction `angle`."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) + 0.5
    dy, dx = yy - centre[0], xx - centre[1]
    return dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)


class GeneratedCells(ImageCollection):
    """`count` two-channel uint16 images of `size`² pixels in `classes` classes; subclasses draw one item."""

    channels = 2
    dataset_name = ""  # its name in data.synthetic.dataset
    class_names: tuple[str, ...] = ()
    base_channel_names: tuple[str, ...] = ()  # what the two channels show (captions, TensorBoard)

    def __init__(self, count: int, size: int = 64, classes: int = 4, seed: int = 0):
        if not 2 <= classes <= len(self.class_names):
            raise ValueError(
                f"{self.dataset_name} has 2 to {len(self.class_names)} classes "
                f"({', '.join(self.class_names)}), got {classes}"
            )
        if size < 16:
            raise ValueError(f"generated cells need at least 16x16 pixels, got {size}")
        self.count, self.size, self.classes, self.seed = count, size, classes, seed
        self.ids = [f"synthetic/{i}" for i in range(count)]
        self.labels = [self.class_names[i % classes] for i in range(count)]
        self.bad = []
        self.shape_hw = (size, size)

    def read(self, index: int) -> np.ndarray:
        return self.render(index)[0]

    def mask(self, index: int) -> np.ndarray:
        """The cell's binary mask (size, size), the ground truth of the shape embedding."""
        return self.render(index)[1]

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (2, size, size) uint16, mask (size, size) bool) of item `index`."""
        if not 0 <= index < self.count:
            raise IndexError(f"synthetic cell {index} out of range 0..{self.count - 1}")
        return self.draw(np.random.default_rng([self.seed, index]), index % self.classes, self.size)

    def draw(self, rng: np.random.Generator, cls: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class SyntheticCells(GeneratedCells):
    """Dataset `cells`: round, elongated, lobed and punctate cells (see the module's docstring)."""

    dataset_name = "cells"
    class_names = CLASS_NAMES
    base_channel_names = ("body", "nucleus")

    def draw(self, rng, cls, s):
        # Cell frame: random centre (kept inside), size, orientation.
        radius = s * rng.uniform(0.22, 0.30)
        aspect = rng.uniform(1.7, 2.3) if cls == 1 else rng.uniform(1.0, 1.15)
        major, minor = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
        angle = rng.uniform(0, np.pi)
        margin = major * 1.05 + 2
        centre = rng.uniform(margin, s - margin, size=2) if s - 2 * margin > 0 else np.full(2, s / 2)
        u, v = cell_frame(s, centre, angle)
        rho = np.hypot(u / major, v / minor)  # 1 on the outline of the plain ellipse
        theta = np.arctan2(v / minor, u / major)
        if cls == 2:
            lobes = rng.integers(4, 7)
            outline = 1 + rng.uniform(0.18, 0.26) * np.cos(lobes * theta + rng.uniform(0, 2 * np.pi))
        else:
            outline = 1 + 0.04 * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))  # no cell is a perfect ellipse
        edge = (outline - rho) * minor  # signed distance to the outline, about in pixels
        body = sigmoid(edge * 2.0)
        rim = np.exp(-(((edge - 1.0) / 1.2) ** 2))
        mask = edge > 0

        # Nucleus: a smaller ellipse along the cell's axis, a little off centre.
        scale = rng.uniform(0.40, 0.50)
        shift = rng.normal(0, 0.05, size=2) * radius
        nu, nv = u - shift[0], v - shift[1]
        n_aspect = np.sqrt(aspect) if cls == 1 else 1.0
        n_rho = np.hypot(nu / (scale * radius * n_aspect), nv / (scale * radius / n_aspect))
        nucleus = sigmoid((1 - n_rho) * scale * radius * 2.0)
        nucleus *= 0.55 + 0.15 * rng.standard_normal((s, s)).clip(-2, 2) * 0.3  # chromatin grain
        if cls == 3:
            foci = rng.integers(5, 9)
            for _ in range(foci):
                r, a = scale * radius * 0.8 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
                fy, fx = r * np.sin(a), r * np.cos(a)
                nucleus += 1.1 * np.exp(-((nu - fx) ** 2 + (nv - fy) ** 2) / (2 * 1.1**2))

        signal = np.stack([0.45 * body + 0.55 * rim * body.clip(0.2, 1), nucleus])
        gain = rng.uniform(0.6, 1.4, size=(2, 1, 1))
        return camera(BACKGROUND + FULL_SCALE * gain * signal, rng), mask


class InfectedRedCells(GeneratedCells):
    """Dataset `infected_rbc`: uninfected, ring, trophozoite and schizont red cells (see the module's
    docstring). Sizes are fractions of the image, so the stages look alike at any `size`."""

    dataset_name = "infected_rbc"
    class_names = STAGE_NAMES
    base_channel_names = ("brightfield", "DNA")

    def draw(self, rng, cls, s):
        radius = s * rng.uniform(0.28, 0.34)
        aspect = rng.uniform(1.0, 1.15)  # a disc seen slightly tilted
        major, minor = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
        angle = rng.uniform(0, np.pi)
        centre = s / 2 + rng.normal(0, 0.03 * s, size=2)  # the flow cell centres every cell
        u, v = cell_frame(s, centre, angle)
        rho = np.hypot(u / major, v / minor)
        edge = (1 - rho) * minor
        body = sigmoid(edge * 2.0)
        thickness = body * (0.55 + 0.45 * np.clip(rho, 0, 1) ** 2)  # biconcave: thin centre, thick rim
        halo = np.exp(-(((edge + 1.0) / 1.0) ** 2))  # the bright defocus halo just outside the cell

        def spot(at: tuple[float, float], sigma: float) -> np.ndarray:
            return np.exp(-((u - at[1]) ** 2 + (v - at[0]) ** 2) / (2 * sigma**2))

        def somewhere(within: float) -> tuple[float, float]:
            """A point uniform over the disc of radius `within` around the cell's centre."""
            r, a = within * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            return r * np.sin(a), r * np.cos(a)

        dna, pigment = np.zeros((s, s)), np.zeros((s, s))
        if cls == 1:  # ring
            dna += spot(somewhere(0.65 * radius), 0.045 * s)
        elif cls == 2:  # trophozoite: three overlapping lobes make one irregular nucleus
            y, x = somewhere(0.35 * radius)
            for dy, dx in rng.normal(0, 0.03 * s, size=(3, 2)):
                dna += 0.6 * spot((y + dy, x + dx), 0.1 * s)
            pigment += spot((y + rng.normal(0, 0.05 * s), x + rng.normal(0, 0.05 * s)), 0.04 * s)
        elif cls == 3:  # schizont
            y, x = somewhere(0.2 * radius)
            for _ in range(rng.integers(8, 15)):
                dy, dx = somewhere(0.6 * radius)
                dna += spot((y + dy, x + dx), 0.025 * s)
            pigment += spot((y, x), 0.05 * s)
        dna = dna.clip(0, 1.3) * body
        transmitted = 1.0 - 0.35 * thickness - 0.5 * pigment * body + 0.12 * halo
        gain = rng.uniform(0.7, 1.3, size=(2, 1, 1))
        expected = BACKGROUND + gain * np.stack([1500 * transmitted, FULL_SCALE * dna])
        return camera(expected, rng), body > 0.5


SYNTHETIC_DATASETS = {cls.dataset_name: cls for cls in (SyntheticCells, InfectedRedCells)}


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
