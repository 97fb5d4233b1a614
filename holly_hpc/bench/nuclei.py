"""Real labelled nuclei from a package: crops of RPE-1 and U2OS nuclei from the images mnfinder ships.

mnfinder (PyPI, MIT; Hatch lab's micronucleus segmenter) ships its training, validation and test images
inside the wheel: single-channel 16-bit DNA-stain fields (768 x 869 px) of RPE-1 cells from five dates and
U2OS cells from one, each with a hand-corrected instance mask of the nuclei (an RGBA PNG, one colour per
nucleus). `build_crops` cuts a `size`-pixel crop of the raw field around every nucleus centroid that lies
far enough from the border, and writes it as a 16-bit TIFF under <out>/<cell line>/, named
<date>-<subset>-<field>-n<nucleus>.tif, so the folder reader labels each crop by its cell line and
`eval.group_by: {regex: '(?P<key>[^/]+)-n[0-9]+'}` groups the crops of one field (the probes never see
one field on both sides). Nothing is normalised or masked: neighbours and background stay as imaged.

The package is installed without its dependencies (`pip install --no-deps mnfinder==1.2.3`): only its
data files are read, the package is never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

CELL_LINES = ("RPE1", "U2OS")
GROUP_REGEX = "(?P<key>[^/]+)-n[0-9]+"


def mnfinder_root() -> Path:
    spec = importlib.util.find_spec("mnfinder")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the real-nuclei benchmark reads the images the mnfinder wheel ships: pip install --no-deps mnfinder==1.2.3"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def instance_ids(mask_rgba: np.ndarray) -> np.ndarray:
    """An RGBA instance mask (H, W, 4), one colour per object, -> integer ids (H, W), 0 for background."""
    visible = mask_rgba[..., 3] > 0
    colour = (mask_rgba[..., 0].astype(np.int64) << 16) | (mask_rgba[..., 1].astype(np.int64) << 8) | mask_rgba[..., 2]
    _, ids = np.unique(np.where(visible, colour + 1, 0), return_inverse=True)
    return ids.reshape(visible.shape)


def build_crops(out: Path, size: int = 48, min_area: int = 150) -> dict[str, int]:
    """Write the crops (see the module docstring); returns the count per cell line."""
    import tifffile
    from PIL import Image

    root = mnfinder_root()
    counts = dict.fromkeys(CELL_LINES, 0)
    half = size // 2
    for subset in ("training", "validation", "test"):
        for folder in sorted((root / f"{subset}-data").glob("*_*")):
            date, line = folder.name.split("_", 1)
            if line not in CELL_LINES:
                continue  # the "misc" folders mix microscopes and cell lines
            for image_path in sorted((folder / "images").glob("*.tif")):
                field = tifffile.imread(image_path)
                ids = instance_ids(np.asarray(Image.open(folder / "nucleus_masks" / f"{image_path.stem}.png")))
                target = out / line
                target.mkdir(parents=True, exist_ok=True)
                for nucleus in range(1, int(ids.max()) + 1):
                    rows, cols = np.nonzero(ids == nucleus)
                    if len(rows) < min_area:
                        continue
                    r, c = round(float(rows.mean())), round(float(cols.mean()))
                    if r < half or c < half or r + half > field.shape[0] or c + half > field.shape[1]:
                        continue
                    crop = field[r - half : r - half + size, c - half : c - half + size]
                    name = f"{date}-{subset}-{image_path.stem}-n{nucleus:03d}.tif"
                    tifffile.imwrite(target / name, crop.astype(np.uint16))
                    counts[line] += 1
    return counts
