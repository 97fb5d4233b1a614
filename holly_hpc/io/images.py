"""Image collections for the embedding task: folders of TIFF/PNG files, zarr arrays and OME-Zarr tiles.

A collection is an indexed set of images read lazily: building one reads only headers and metadata
(file headers, zarr array shapes, OME-NGFF attributes), so that a bad file or a wrong option stops a
task at once with a message naming the file, and `read(i)` then decodes that one item only. Data sets
of microscopy images are often larger than memory; nothing here ever loads a whole folder or array.

Every item is returned as a (C, H, W) array in the file's own dtype (uint8, uint16, float32...):
normalisation is the model's business, and a 16-bit image squeezed into 8 bits here would lose data.
"""

from __future__ import annotations

import csv
import operator
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import tifffile
import zarr
from PIL import Image

from . import resolve_path

TIFF_SUFFIXES = (".tif", ".tiff")
DEFAULT_EXTENSIONS = (".tif", ".tiff", ".png")
ON_BAD = ("fail", "skip")
OME_AXES = ("t", "c", "z", "y", "x")

# Channels per Pillow mode, for the modes a PNG (or another Pillow-read file) can open in.
_PIL_CHANNELS = {
    "1": 1, "L": 1, "P": 1, "I": 1, "I;16": 1, "I;16L": 1, "I;16B": 1, "F": 1,
    "LA": 2, "PA": 2, "RGB": 3, "RGBA": 4,
}  # fmt: skip


class ImageFormatError(ValueError):
    """An image file, store or folder that cannot be used; the message names it (and the item) and says why."""


class BadImageWarning(UserWarning):
    """Files were left out of a collection opened with on_bad="skip"; its `bad` list says which and why."""


@dataclass(frozen=True)
class BadFile:
    """A file left out of a collection, and why."""

    path: str
    reason: str


class ImageCollection(ABC):
    """An indexed set of images read lazily: len(), read(i) -> np.ndarray (C, H, W) in the file's own dtype
    (uint8/uint16/float32...), ids[i] a stable string naming the file (relative to the root) plus page/tile,
    labels[i] a str or None, bad: list[BadFile] of what was skipped."""

    channels: int
    ids: list[str]
    labels: list[str | None]
    bad: list[BadFile]
    # The (H, W) every item shares, or None when sizes differ; a default so that subclasses may leave it out.
    shape_hw: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def read(self, index: int) -> np.ndarray: ...


class _BadImage(Exception):
    """Internal: why a file cannot be used, without its name; callers add the name (and the item)."""


# --- folders of TIFF / PNG files -----------------------------------------------------------------------


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


# --- zarr arrays ----------------------------------------------------------------------------------------


class ZarrCollection(ImageCollection):
    """The items of one (N, C, H, W) or (N, H, W) array of a zarr group (format 2 or 3).

    labels_array / ids_array: 1-D arrays of N strings (or integers, for labels) in the same group.
    read(i) reads the chunks of item i only.
    """

    def __init__(
        self,
        path: str | Path,
        array: str = "images",
        labels_array: str | None = None,
        ids_array: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.array = array
        group = _open_group(self.path)
        self._array = _get_array(group, self.path, array)
        shape = tuple(self._array.shape)
        if len(shape) not in (3, 4):
            raise ImageFormatError(
                f"{self.path}: array {array!r} has shape {shape}; expected (N, C, H, W) or (N, H, W)"
            )
        n = shape[0]
        if n == 0:
            raise ImageFormatError(f"{self.path}: array {array!r} has shape {shape}: it holds no images")
        self.channels = 1 if len(shape) == 3 else shape[1]
        self.shape_hw = (shape[-2], shape[-1])
        self.bad = []
        if ids_array is None:
            self.ids = [f"{self.path.name}/{array}[{i}]" for i in range(n)]
        else:
            self.ids = _string_column(group, self.path, ids_array, n, what="ids", allow_int=False)
            dup = _first_duplicate(self.ids)
            if dup is not None:
                raise ImageFormatError(f"{self.path}: ids array {ids_array!r} holds {dup!r} more than once")
        if labels_array is None:
            self.labels = [None] * n
        else:
            self.labels = list(_string_column(group, self.path, labels_array, n, what="labels", allow_int=True))

    def read(self, index: int) -> np.ndarray:
        i = _item(index, len(self))
        try:
            data = np.asarray(self._array[i])
        except Exception as exc:  # missing store, corrupt chunk (codec errors of every kind)
            raise ImageFormatError(
                f"{self.path}: cannot read item {i} ({self.ids[i]}) of array {self.array!r}: {exc}"
            ) from exc
        if data.ndim == 2:
            data = data[None]
        return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))

    def __repr__(self) -> str:
        return f"ZarrCollection({str(self.path)!r}, array={self.array!r}, {len(self)} image(s))"


def _open_group(path: Path) -> zarr.Group:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such zarr store")
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:  # GroupNotFoundError, bad JSON metadata...
        raise ImageFormatError(f"{path}: cannot open as a zarr group: {exc}") from exc


def _get_array(group: zarr.Group, path: Path, key: str) -> zarr.Array:
    try:
        node = group[key]
    except KeyError:
        arrays = sorted(group.array_keys())
        raise ImageFormatError(f"{path}: no array {key!r} in this zarr group; its arrays: {arrays}") from None
    if not isinstance(node, zarr.Array):
        raise ImageFormatError(f"{path}: {key!r} is a group, not an array")
    return node


def _string_column(group: zarr.Group, path: Path, key: str, n: int, what: str, allow_int: bool) -> list[str]:
    column = _get_array(group, path, key)
    if column.ndim != 1 or column.shape[0] != n:
        raise ImageFormatError(
            f"{path}: {what} array {key!r} has shape {tuple(column.shape)}; expected ({n},), one per image"
        )
    values = np.asarray(column[:])
    kinds = "USOT" + ("iu" if allow_int else "")
    if values.dtype.kind not in kinds:
        expected = "strings or integers" if allow_int else "strings"
        raise ImageFormatError(f"{path}: {what} array {key!r} has dtype {values.dtype}; expected {expected}")
    if values.dtype.kind in "iu":
        return [str(int(v)) for v in values]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _first_duplicate(values: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


# --- OME-Zarr tiles ------------------------------------------------------------------------------------


class OmeZarrCollection(ImageCollection):
    """Non-overlapping tile x tile tiles of every (t, z) plane of one level of an OME-Zarr image.

    OME-NGFF v0.4 (zarr format 2, attrs["multiscales"]) and v0.5 (zarr format 3, attrs["ome"]["multiscales"]).
    Axes: any of t, c, z with y, x last. Tiles run over t, then z, then rows, then columns; the remainder
    at the bottom and right edges is dropped. All channels, or those listed in `channels`, are kept.
    """

    def __init__(self, path: str | Path, tile: int, level: int = 0, channels: Sequence[int] | None = None) -> None:
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be a positive integer; got {tile!r}")
        self.path = Path(path)
        self.tile = tile
        self.level = level
        group = _open_group(self.path)
        multiscale = _multiscale(group, self.path)
        self.axes = _axis_names(multiscale, self.path)
        self._array = _get_array(group, self.path, _dataset_path(multiscale, self.path, level))
        shape = tuple(self._array.shape)
        if len(shape) != len(self.axes):
            raise ImageFormatError(
                f"{self.path}: level {level} array has shape {shape}, but the axes are {''.join(self.axes)}"
            )
        sizes = dict(zip(self.axes, shape, strict=True))
        self._channels = _channel_selection(self.path, channels, sizes.get("c", 1))
        self.channels = len(self._channels)
        height, width = sizes["y"], sizes["x"]
        if height < tile or width < tile:
            raise ImageFormatError(
                f"{self.path}: level {level} image is {height}x{width} (height x width), "
                f"smaller than the {tile}x{tile} tile"
            )
        self._grid = (sizes.get("t", 1), sizes.get("z", 1), height // tile, width // tile)
        n_t, n_z, n_y, n_x = self._grid
        if n_t * n_z == 0:
            raise ImageFormatError(f"{self.path}: level {level} array has shape {shape}: no (t, z) plane")
        self.ids = [
            f"{self.path.name}/{level}/t{t}z{z}y{ty * tile}x{tx * tile}"
            for t in range(n_t)
            for z in range(n_z)
            for ty in range(n_y)
            for tx in range(n_x)
        ]
        self.labels = [None] * len(self.ids)
        self.bad = []
        self.shape_hw = (tile, tile)

    def read(self, index: int) -> np.ndarray:
        i = _item(index, len(self))
        _, n_z, n_y, n_x = self._grid
        t, rest = divmod(i, n_z * n_y * n_x)
        z, rest = divmod(rest, n_y * n_x)
        ty, tx = divmod(rest, n_x)
        where = {
            "t": t,
            "z": z,
            "c": self._channels,
            "y": slice(ty * self.tile, (ty + 1) * self.tile),
            "x": slice(tx * self.tile, (tx + 1) * self.tile),
        }
        try:
            # Orthogonal indexing reads only the chunks that hold this tile and these channels.
            data = np.asarray(self._array.oindex[tuple(where[name] for name in self.axes)])
        except Exception as exc:  # corrupt chunk, vanished store...
            raise ImageFormatError(f"{self.path}: cannot read tile {i} ({self.ids[i]}): {exc}") from exc
        if "c" not in self.axes:
            data = data[None]
        return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))

    def __repr__(self) -> str:
        return f"OmeZarrCollection({str(self.path)!r}, tile={self.tile}, level={self.level}, {len(self)} tile(s))"


def _multiscale(group: zarr.Group, path: Path) -> dict:
    attrs = group.attrs.asdict()
    ome = attrs.get("ome")
    if isinstance(ome, dict) and "multiscales" in ome:
        multiscales = ome["multiscales"]  # NGFF v0.5
    elif "multiscales" in attrs:
        multiscales = attrs["multiscales"]  # NGFF v0.4 and earlier
    else:
        raise ImageFormatError(
            f"{path}: no OME-NGFF multiscales metadata in the group attributes "
            "(looked for ['ome']['multiscales'], v0.5, and ['multiscales'], v0.4)"
        )
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise ImageFormatError(f"{path}: 'multiscales' metadata is not a non-empty list of objects")
    return multiscales[0]


def _axis_names(multiscale: dict, path: Path) -> list[str]:
    # NGFF v0.1/v0.2 had no axes: their images are 5D t, c, z, y, x. v0.3 listed names; v0.4+ objects.
    axes = multiscale.get("axes", list(OME_AXES))
    try:
        names = [axis["name"] if isinstance(axis, dict) else axis for axis in axes]
    except (KeyError, TypeError) as exc:
        raise ImageFormatError(f"{path}: unreadable 'axes' metadata {axes!r}") from exc
    if len(names) < 2 or names[-2:] != ["y", "x"] or len(set(names)) != len(names) or not set(names) <= set(OME_AXES):
        raise ImageFormatError(
            f"{path}: axes {names}; expected names among {', '.join(OME_AXES)}, each once, with y and x last"
        )
    return names


def _dataset_path(multiscale: dict, path: Path, level: int) -> str:
    datasets = multiscale.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise ImageFormatError(f"{path}: 'multiscales' metadata lists no datasets")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(datasets):
        raise ImageFormatError(
            f"{path}: level {level!r} asked, but the multiscales metadata lists {len(datasets)} level(s) "
            f"(0 to {len(datasets) - 1})"
        )
    entry = datasets[level]
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise ImageFormatError(f"{path}: dataset {level} of the multiscales metadata has no 'path'")
    return entry["path"]


def _channel_selection(path: Path, channels: Sequence[int] | None, count: int) -> list[int]:
    if channels is None:
        return list(range(count))
    chosen = [operator.index(c) for c in channels]
    if not chosen:
        raise ValueError("channels is empty: select at least one channel, or leave it out for all")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"channels {chosen} lists a channel more than once")
    for c in chosen:
        if not 0 <= c < count:
            raise ImageFormatError(
                f"{path}: channel {c} asked, but the image has {count} channel(s) (0 to {count - 1})"
            )
    return chosen


def write_ome_zarr(
    path: str | Path,
    data: np.ndarray,
    axes: str = "cyx",
    version: str = "0.4",
    chunks: tuple[int, ...] | None = None,
    levels: int = 1,
) -> Path:
    """Write `data` as an OME-Zarr image (NGFF v0.4 on zarr format 2, or v0.5 on zarr format 3).

    axes: the letters of the data's axes in NGFF order, t? c? z? y x (e.g. "cyx", "tczyx").
    levels > 1 adds levels downsampled 2x in y and x by 2x2 block means (cast back to the dtype).
    chunks: per axis; default 1 along t, c, z and up to 256 along y, x. Refuses an existing path.
    """
    path = Path(path)
    data = np.asarray(data)
    if not re.fullmatch(r"t?c?z?yx", axes) or len(axes) != data.ndim:
        raise ValueError(
            f"axes {axes!r} do not fit data of shape {data.shape}; expected letters t? c? z? y x, one per axis"
        )
    if version not in ("0.4", "0.5"):
        raise ValueError(f"version must be '0.4' or '0.5'; got {version!r}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive integer; got {levels!r}")
    if path.exists():
        raise FileExistsError(f"{path}: already exists; not overwriting it")
    if chunks is None:
        chunks = tuple(min(256, n) if a in "yx" else 1 for a, n in zip(axes, data.shape, strict=True))
    if len(chunks) != data.ndim:
        raise ValueError(f"chunks {chunks} has {len(chunks)} entries for {data.ndim}D data")
    zarr_format = 2 if version == "0.4" else 3
    # NGFF v0.4 requires '/' as the chunk-key separator on zarr v2; v0.5 asks for dimension_names.
    extra: dict[str, Any] = (
        {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
        if zarr_format == 2
        else {"dimension_names": list(axes)}
    )
    group = zarr.open_group(str(path), mode="w-", zarr_format=zarr_format)
    datasets = []
    level_data = data
    for k in range(levels):
        if k:
            level_data = _downsample_yx(level_data)
        level_chunks = tuple(max(1, min(c, n)) for c, n in zip(chunks, level_data.shape, strict=True))
        group.create_array(str(k), data=level_data, chunks=level_chunks, **extra)
        scale = [float(2**k) if a in "yx" else 1.0 for a in axes]
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    types = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    multiscale = {"name": path.stem, "axes": [{"name": a, "type": types[a]} for a in axes], "datasets": datasets}
    if version == "0.4":
        group.update_attributes({"multiscales": [{"version": "0.4", **multiscale}]})
    else:
        group.update_attributes({"ome": {"version": "0.5", "multiscales": [multiscale]}})
    return path


def _downsample_yx(data: np.ndarray) -> np.ndarray:
    height, width = data.shape[-2:]
    if height < 2 or width < 2:
        raise ValueError(f"image of {height}x{width} pixels is too small for another 2x downsampled level")
    h2, w2 = height // 2, width // 2
    blocks = data[..., : 2 * h2, : 2 * w2].reshape(*data.shape[:-2], h2, 2, w2, 2)
    mean = blocks.mean(axis=(-3, -1))
    if np.issubdtype(data.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(data.dtype)


# --- factory --------------------------------------------------------------------------------------------

_OPTIONS = {
    "folder": {"path", "channels", "labels", "on_bad", "extensions"},
    "zarr": {"path", "array", "labels_array", "ids_array"},
    "ome_zarr": {"path", "tile", "level", "channels"},
}


def open_collection(kind: str, options: dict, base_dir: str | Path) -> ImageCollection:
    """The collection of `kind` ("folder", "zarr", "ome_zarr") described by a job spec's `options`.

    Relative paths (the data, and a labels CSV) are resolved against `base_dir`, usually the folder of
    the spec, so that a spec means the same data wherever the job is started from.
    """
    if kind not in _OPTIONS:
        raise ValueError(f"unknown image collection kind {kind!r}; expected one of {', '.join(_OPTIONS)}")
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        raise ValueError(f"{kind} collection: unknown option(s) {unknown}; expected among {sorted(_OPTIONS[kind])}")
    # None stands for "not given" (a spec's optional field left empty): the default applies.
    opts = {key: value for key, value in options.items() if value is not None}
    if "path" not in opts:
        raise ValueError(f"{kind} collection: option 'path' is required")
    base_dir = Path(base_dir)
    path = resolve_path(opts.pop("path"), base_dir)
    if kind == "folder":
        labels = opts.get("labels", "none")
        if labels not in ("none", "folders"):
            opts["labels"] = resolve_path(labels, base_dir)
        return FolderCollection(path, **opts)
    if kind == "zarr":
        return ZarrCollection(path, **opts)
    if "tile" not in opts:
        raise ValueError("ome_zarr collection: option 'tile' is required")
    return OmeZarrCollection(path, **opts)


def _item(index: int, n: int) -> int:
    i = operator.index(index)  # numpy integers too; a float index is a caller's bug
    if not -n <= i < n:
        raise IndexError(f"item {index} out of range for a collection of {n} image(s)")
    return i % n
