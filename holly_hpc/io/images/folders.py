"""The folder reader: FolderCollection, the TIFF and PNG files under a folder, one image per file, with
labels from subfolders or a CSV and unusable files refused or skipped by name."""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from .base import BadFile, BadImageWarning, ImageCollection, ImageFormatError, _item

TIFF_SUFFIXES = (".tif", ".tiff")
DEFAULT_EXTENSIONS = (".tif", ".tiff", ".png")
ON_BAD = ("fail", "skip")

# Channels per Pillow mode, for the modes a PNG (or another Pillow-read file) can open in.
_PIL_CHANNELS = {
    "1": 1, "L": 1, "P": 1, "I": 1, "I;16": 1, "I;16L": 1, "I;16B": 1, "F": 1,
    "LA": 2, "PA": 2, "RGB": 3, "RGBA": 4,
}  # fmt: skip


class _BadImage(Exception):
    """Internal: why a file cannot be used, without its name; callers add the name (and the item)."""


class FolderCollection(ImageCollection):
    """The TIFF and PNG files under `root` (searched recursively), one image per file.

    TIFF: (H, W) -> 1 channel; a page stack (pages, H, W) -> pages are channels; RGB(A) samples
    (H, W, S) -> S channels. PNG: gray and palette -> 1, gray+alpha -> 2, RGB -> 3, RGBA -> 4 channels.
    labels: "none"; "folders" (root/<label>/.../file); or the path of a CSV file with a header row and
    columns file,label (file relative to root; an empty label marks an unlabelled image).
    on_bad: "fail" raises on the first unusable file; "skip" leaves it out, records it in `bad` and warns.
    """

    def __init__(
        self,
        root: str | Path,
        channels: int | None = None,
        labels: str | Path = "none",
        on_bad: str = "fail",
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    ) -> None:
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {', '.join(ON_BAD)}; got {on_bad!r}")
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive integer or None; got {channels!r}")
        self.root = Path(root)
        self.on_bad = on_bad
        self.bad = []
        rels = _find_images(self.root, _normalise_extensions(extensions))
        label_of = self._label_files(rels, labels)
        headers = self._check_headers([rel for rel in rels if rel in label_of], channels)
        if not headers:
            shown = "; ".join(f"{b.path}: {b.reason}" for b in self.bad[:3])
            raise ImageFormatError(f"{self.root}: none of its {len(rels)} image file(s) is usable ({shown})")
        self.ids = list(headers)
        self.labels = [label_of[rel] for rel in self.ids]
        self.channels = channels if channels is not None else next(iter(headers.values()))[0]
        self._shapes = list(headers.values())
        sizes = {shape[1:] for shape in self._shapes}
        self.shape_hw = sizes.pop() if len(sizes) == 1 else None
        if self.bad:
            self._warn_skipped()

    def read(self, index: int) -> np.ndarray:
        i = _item(index, len(self))
        path = self.root / self.ids[i]
        try:
            image = _decode(path)
        except _BadImage as exc:
            raise ImageFormatError(f"{path} (item {i}): {exc}") from exc
        # The header said otherwise at construction: the file was replaced since, and a batch of
        # mismatched shapes would fail far from here.
        if image.shape != self._shapes[i]:
            raise ImageFormatError(
                f"{path} (item {i}): decoded shape {image.shape} (C, H, W) differs from {self._shapes[i]} "
                "read from its header when the collection was opened; was the file replaced?"
            )
        return image

    def __repr__(self) -> str:
        return f"FolderCollection({str(self.root)!r}, {len(self)} image(s), {self.channels} channel(s))"

    def _reject(self, rel: str, reason: str) -> None:
        path = self.root / rel
        if self.on_bad == "fail":
            raise ImageFormatError(f"{path}: {reason}")
        self.bad.append(BadFile(str(path), reason))

    def _label_files(self, rels: list[str], labels: str | Path) -> dict[str, str | None]:
        """The label of every file that has one; files refused for want of one go through _reject."""
        if isinstance(labels, str) and labels == "none":
            return dict.fromkeys(rels)
        if isinstance(labels, str) and labels == "folders":
            label_of: dict[str, str | None] = {}
            for rel in rels:
                parts = rel.split("/")
                if len(parts) < 2:
                    why = (
                        f"labels: folders needs every image in a subfolder named after its label "
                        f"({self.root}/<label>/file), but this one lies directly in {self.root}"
                    )
                    self._reject(rel, why)
                else:
                    label_of[rel] = parts[0]
            return label_of
        csv_path = Path(labels)
        if csv_path.suffix.lower() != ".csv":
            raise ValueError(f"labels must be 'none', 'folders' or the path of a .csv file; got {str(labels)!r}")
        table = _read_label_csv(csv_path, self.root, rels)
        for rel in rels:
            if rel not in table:
                self._reject(rel, f"no row for this image in the labels CSV {csv_path}")
        return table

    def _check_headers(self, rels: list[str], channels: int | None) -> dict[str, tuple[int, int, int]]:
        """(C, H, W) from the header of every usable file, in order; the others go through _reject."""
        headers: dict[str, tuple[int, int, int]] = {}
        first = None
        for rel in rels:
            try:
                shape = _header(self.root / rel)
            except _BadImage as exc:
                self._reject(rel, str(exc))
                continue
            expected = channels if channels is not None else (headers[first][0] if first else shape[0])
            if shape[0] != expected:
                why = "as asked by channels" if channels is not None else f"like {first}, the first usable image"
                self._reject(rel, f"has {shape[0]} channel(s); expected {expected}, {why}")
                continue
            first = first or rel
            headers[rel] = shape
        return headers

    def _warn_skipped(self) -> None:
        # One warning for the lot: a folder with thousands of unlabelled files would otherwise bury the log.
        shown = "; ".join(f"{b.path} ({b.reason})" for b in self.bad[:10])
        more = f"; and {len(self.bad) - 10} more" if len(self.bad) > 10 else ""
        warnings.warn(
            f"{self.root}: skipped {len(self.bad)} unusable file(s) (see .bad): {shown}{more}",
            BadImageWarning,
            stacklevel=3,
        )


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):  # a lone ".tif" would otherwise be taken letter by letter
        extensions = [extensions]
    out = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not out:
        raise ValueError("extensions is empty: no file could ever be an image")
    return out


def _find_images(root: Path, extensions: tuple[str, ...]) -> list[str]:
    """The image files under root as posix paths relative to it, in natural order (img2 before img10)."""
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder")
    if not root.is_dir():
        raise ImageFormatError(f"{root}: not a folder")
    rels = []
    seen_dirs = set()
    # followlinks: data sets on clusters are often assembled from symlinked folders; `seen_dirs` stops a
    # link back to a parent from looping forever.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_walk_error):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        # Hidden files and folders are skipped: macOS leaves `._name.tif` resource forks next to the
        # real files when copying to shared drives, and they are not images.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(extensions):
                rels.append((Path(dirpath) / name).relative_to(root).as_posix())
    if not rels:
        raise ImageFormatError(f"{root}: no image files ({', '.join(extensions)}) in this folder or below")
    return sorted(rels, key=_natural_key)


def _walk_error(exc: OSError) -> None:
    # os.walk passes over folders it cannot list unless told otherwise: the images in them would
    # vanish from the collection without a word.
    raise ImageFormatError(f"{exc.filename}: cannot list this folder: {exc.strerror or exc}") from exc


def _natural_key(rel: str) -> tuple:
    # Per path part, re.split with a group alternates text and digit runs, so keys compare element by
    # element (str with str, int with int); the path itself breaks ties such as img01 / img1.
    parts = tuple(
        tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", part.lower()))) for part in rel.split("/")
    )
    return parts, rel


def _read_label_csv(csv_path: Path, root: Path, rels: list[str]) -> dict[str, str | None]:
    """{file relative to root: label} from a CSV with a header row naming columns file and label."""
    images = set(rels)
    table: dict[str, str | None] = {}
    first_line: dict[str, int] = {}
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark, which would otherwise
        # become part of the first column's name.
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            found = [name.strip() for name in reader.fieldnames or []]
            if "file" not in found or "label" not in found:
                raise ImageFormatError(
                    f"{csv_path}: a labels CSV needs a header row with columns 'file' and 'label'; "
                    f"found {found or 'no header row'}"
                )
            reader.fieldnames = found
            for row in reader:
                line = reader.line_num
                name = (row["file"] or "").strip()
                if not name:
                    raise ImageFormatError(f"{csv_path}, line {line}: the 'file' column is empty")
                # Backslashes: CSVs made on Windows; PurePosixPath drops './' and doubled slashes.
                rel = PurePosixPath(name.replace("\\", "/")).as_posix()
                if rel in first_line:
                    raise ImageFormatError(
                        f"{csv_path}, line {line}: {name!r} is listed again (first on line {first_line[rel]})"
                    )
                if rel not in images:
                    why = "no such file" if not (root / rel).exists() else "not among the image files found"
                    raise ImageFormatError(f"{csv_path}, line {line}: {name!r}: {why} under {root}")
                first_line[rel] = line
                label = (row["label"] or "").strip()
                table[rel] = label or None
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{csv_path}: no such labels CSV file") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ImageFormatError(f"{csv_path}: cannot read labels CSV: {exc}") from exc
    return table


def _header(path: Path) -> tuple[int, int, int]:
    """(C, H, W) of an image file from its header, without decoding pixels."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                series = _one_series(tif)
                return _tiff_chw(tuple(series.shape), series.axes)
        except _BadImage:
            raise
        except Exception as exc:  # tifffile raises TiffFileError, OSError, ValueError, struct.error...
            raise _BadImage(f"cannot open as a TIFF file: {exc}") from exc
    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
            frames = getattr(image, "n_frames", 1)
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise _BadImage(f"cannot open as an image: {exc}") from exc
    if mode not in _PIL_CHANNELS:
        raise _BadImage(f"unsupported image mode {mode!r}; expected one of {', '.join(_PIL_CHANNELS)}")
    if frames != 1:
        raise _BadImage(f"animated image with {frames} frames; expected a single image")
    return _PIL_CHANNELS[mode], height, width


def _one_series(tif: tifffile.TiffFile) -> Any:
    series = tif.series
    if not series:
        raise _BadImage("no image in this TIFF file")
    # Several series (e.g. images of different sizes in one file) have no single (C, H, W) reading;
    # taking the first would silently drop the rest.
    if len(series) > 1:
        shapes = ", ".join(str(tuple(s.shape)) for s in series[:4])
        raise _BadImage(f"TIFF file holds {len(series)} image series ({shapes}); expected one image or page stack")
    return series[0]


def _tiff_chw(shape: tuple[int, ...], axes: str) -> tuple[int, int, int]:
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3:
        if axes.endswith("S"):  # interleaved samples (RGB, RGBA): (H, W, S)
            return shape[2], shape[0], shape[1]
        return shape[0], shape[1], shape[2]  # pages, or planar samples: (C, H, W)
    raise _BadImage(f"TIFF image has shape {shape} (axes {axes}); expected (H, W), (pages, H, W) or (H, W, samples)")


def _decode(path: Path) -> np.ndarray:
    """The pixels of an image file as a (C, H, W) array in its own dtype, native byte order."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                series = _one_series(tif)
                axes = series.axes
                data = series.asarray()
        except _BadImage:
            raise
        except Exception as exc:  # truncated or corrupt data: ValueError, zlib.error, codec errors...
            raise _BadImage(f"cannot decode TIFF data: {exc}") from exc
        _tiff_chw(data.shape, axes)  # refuses shapes other than 2D / 3D
        if data.ndim == 2:
            data = data[None]
        elif axes.endswith("S"):
            data = data.transpose(2, 0, 1)
    else:
        try:
            with Image.open(path) as image:
                data = _pil_array(image)
        except _BadImage:
            raise
        except Exception as exc:  # "image file is truncated" (OSError), decoder errors...
            raise _BadImage(f"cannot decode image data: {exc}") from exc
        data = data[None] if data.ndim == 2 else data.transpose(2, 0, 1)
    return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))


def _pil_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode not in _PIL_CHANNELS:
        raise _BadImage(f"unsupported image mode {mode!r}")
    if mode in ("1", "P"):
        # Bilevel -> 0/255; palette -> the luminance of its colours, not the palette indices, which
        # mean nothing as intensities.
        image = image.convert("L")
    elif mode == "PA":
        image = image.convert("LA")
    data = np.asarray(image)
    if mode == "I" and data.size and data.min() >= 0 and data.max() <= np.iinfo(np.uint16).max:
        # Pillow may open 16-bit gray as 32-bit mode I; give back the file's own 16 bits.
        data = data.astype(np.uint16)
    return data
