"""FITS images in: HOLLy's training data, square particle images, one folder of them per blur sigma.

Every check happens here, at the file boundary, so a bad file stops a task before training with a
message naming that file, instead of surfacing later as a NaN loss or a shape error in a batch.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

FITS_SUFFIXES = (".fits", ".fit", ".fts")


class ImageFormatError(ValueError):
    """An image file or folder that cannot be used; the message names it and says what is wrong."""


def read_fits_image(path: str | Path) -> np.ndarray:
    """The image of a FITS file as a float32 (S, S) array.

    The data are those of the first image HDU that has any (usually the primary one). A 3D cube is
    summed over its first axis: some HOLLy data sets stored each particle as a stack of frames.
    """
    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdus:
            # Read inside the `with`: astropy loads data lazily, and a truncated file fails only here.
            data = next((hdu.data for hdu in hdus if hdu.is_image and hdu.data is not None), None)
    except (OSError, ValueError, VerifyError) as exc:
        raise ImageFormatError(f"{path}: cannot read FITS file: {exc}") from exc
    if data is None:
        raise ImageFormatError(f"{path}: no image data in any HDU")
    if data.ndim not in (2, 3):
        raise ImageFormatError(
            f"{path}: expected a 2D image or a 3D stack, got {data.ndim}D data of shape {data.shape}"
        )
    # Sum in float64 so that a long stack of small values loses nothing before the cast.
    image = data.astype(np.float64).sum(axis=0) if data.ndim == 3 else data
    with np.errstate(over="ignore"):  # a sum too large for float32 becomes inf, refused below
        image = np.asarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        raise ImageFormatError(f"{path}: image has {bad} NaN or infinite pixel(s)")
    if not image.any():
        raise ImageFormatError(f"{path}: image is empty (every pixel is zero)")
    return image


def list_fits(folder: str | Path) -> list[Path]:
    """The FITS files of a folder (.fits, .fit, .fts in any case), in natural order: img2 before img10."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFormatError(f"{folder}: no such folder")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FITS_SUFFIXES]
    if not files:
        raise ImageFormatError(f"{folder}: no FITS files ({', '.join(FITS_SUFFIXES)}) in this folder")
    return sorted(files, key=_natural_key)


def read_fits_folder(folder: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Every image of a folder as a float32 (N, H, W) array, in `list_fits` order; all of one shape (height,
    width), `expected_shape` where given."""
    paths = list_fits(folder)
    images = [read_fits_image(path) for path in paths]
    ref = images[0].shape if expected_shape is None else tuple(expected_shape)
    why = f" like {paths[0].name}, the first image of the folder" if expected_shape is None else ""
    for path, image in zip(paths, images, strict=True):
        if image.shape != ref:
            raise ImageFormatError(f"{path}: image is {_hw(image.shape)} (height x width); expected {_hw(ref)}{why}")
    return np.stack(images)


def _hw(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)


def read_fits_folders_by_sigma(
    folders: dict[float, str | Path], expected_shape: tuple[int, int] | None = None
) -> dict[float, np.ndarray]:
    """The images of one folder per blur sigma, keyed by sigma in increasing order.

    HOLLy rendered the same particles at every sigma and saved them under the same file names, so
    image i of every folder must show the same particle: the folders must hold the same file names
    (checked before any image is read) and images of one size.
    """
    if not folders:
        raise ValueError("no folders given: expected one folder of FITS images per sigma")
    sigmas = sorted(folders)
    ref_sigma, ref_folder = sigmas[0], Path(folders[sigmas[0]])
    ref_names = [p.name for p in list_fits(ref_folder)]
    for sigma in sigmas[1:]:
        folder = Path(folders[sigma])
        names = [p.name for p in list_fits(folder)]
        where = f"{folder} (sigma {sigma}) and {ref_folder} (sigma {ref_sigma})"
        if len(names) != len(ref_names):
            raise ImageFormatError(
                f"{where} hold {len(names)} and {len(ref_names)} FITS files; expected the same files"
            )
        mismatch = next(((a, b) for a, b in zip(names, ref_names, strict=True) if a != b), None)
        if mismatch:
            raise ImageFormatError(
                f"{where} hold different file names: first mismatch {mismatch[0]!r} vs {mismatch[1]!r}"
            )
    stacks = {sigma: read_fits_folder(folders[sigma], expected_shape) for sigma in sigmas}
    ref_shape = stacks[ref_sigma].shape[1:]
    for sigma in sigmas[1:]:
        shape = stacks[sigma].shape[1:]
        if shape != ref_shape:
            raise ImageFormatError(
                f"{folders[sigma]} (sigma {sigma}): images are {_hw(shape)}, but those of "
                f"{ref_folder} (sigma {ref_sigma}) are {_hw(ref_shape)}"
            )
    return stacks


def _natural_key(path: Path) -> tuple:
    # re.split with a group alternates text and digit runs, so keys compare element by element
    # (str with str, int with int); the name itself breaks ties such as img01 / img1.
    parts = re.split(r"(\d+)", path.name.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), path.name
