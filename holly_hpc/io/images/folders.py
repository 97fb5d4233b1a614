"""The folder reader: FolderCollection, the TIFF and PNG files under a folder, one image per file (or per
Z plane, with data.planes.z_as: items), with labels from subfolders or a CSV and unusable files refused or
skipped by name. TIFF axes come from tifffile's series: ImageJ hyperstacks and OME-TIFFs say which pages
are channels (C, and S samples), Z planes and time points (T); data.planes says what becomes of Z and T."""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any
from xml.etree import ElementTree

import numpy as np
import tifffile
import zarr
from PIL import Image

from .base import BadFile, BadImageWarning, ImageCollection, ImageFormatError, Planes, _item, reduce_planes

TIFF_SUFFIXES = (".tif", ".tiff")
DEFAULT_EXTENSIONS = (".tif", ".tiff", ".png")
ON_BAD = ("fail", "skip")

# Channels per Pillow mode, for the modes a PNG (or another Pillow-read file) can open in.
_PIL_CHANNELS = {
    "1": 1, "L": 1, "P": 1, "I": 1, "I;16": 1, "I;16L": 1, "I;16B": 1, "F": 1,
    "LA": 2, "PA": 2, "RGB": 3, "RGBA": 4,
}  # fmt: skip


# What each of tifffile's axis letters is to this reader; Q and I (pages of unknown meaning) are channels
# only in a plain (pages, H, W) stack, as this reader has always read them.
_AXIS_ROLES = {"C": "channel", "S": "channel", "Q": "unknown", "I": "unknown", "Z": "z", "T": "t", "Y": "y", "X": "x"}


class _BadImage(Exception):
    """Internal: why a file cannot be used, without its name; callers add the name (and the item)."""


@dataclass(frozen=True)
class _Stack:
    """What a file's header says: its axes (tifffile's letters) and shape, the letters read as channels,
    channels (their product), Z planes, time points, height, width, and the channel names in its metadata."""

    axes: str
    shape: tuple[int, ...]
    channel_axes: str
    channels: int
    z: int
    t: int
    height: int
    width: int
    names: tuple[str, ...] | None = None

    def described(self) -> str:
        return f"axes {self.axes}, shape {self.shape}"


class FolderCollection(ImageCollection):
    """The TIFF and PNG files under `root` (searched recursively), one image per file.

    TIFF, by tifffile's axes: (H, W) -> 1 channel; C channels and S samples (RGB(A), interleaved or planar)
    -> channels; pages of unknown meaning (a plain (pages, H, W) stack) -> channels; Z planes and T time
    points as `planes` says (a Planes or a spec's data.planes mapping): a stack of several Z planes, or of
    several time points, with no option for them is refused, naming its axes and the keys to set.
    PNG: gray and palette -> 1, gray+alpha -> 2, RGB -> 3, RGBA -> 4 channels.
    labels: "none"; "folders" (root/<label>/.../file); or the path of a CSV file with a header row and
    columns file,label (file relative to root; an empty label marks an unlabelled image).
    on_bad: "fail" raises on the first unusable file; "skip" leaves it out, records it in `bad` and warns.
    Channel names: the first usable file's OME metadata, else ch0, ch1... (see name_channels).
    """

    def __init__(
        self,
        root: str | Path,
        channels: int | None = None,
        labels: str | Path = "none",
        on_bad: str = "fail",
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        planes: Planes | Mapping | None = None,
    ) -> None:
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {', '.join(ON_BAD)}; got {on_bad!r}")
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive integer or None; got {channels!r}")
        self.root = Path(root)
        self.on_bad = on_bad
        self.planes = Planes.of(planes)
        self.bad = []
        rels = _find_images(self.root, _normalise_extensions(extensions))
        label_of = self._label_files(rels, labels)
        stacks = self._check_headers([rel for rel in rels if rel in label_of], channels)
        if not stacks:
            shown = "; ".join(f"{b.path}: {b.reason}" for b in self.bad[:3])
            raise ImageFormatError(f"{self.root}: none of its {len(rels)} image file(s) is usable ({shown})")
        self._items: list[tuple[str, int | None]] = []  # (file, its Z plane or None for all of them)
        self.ids, self.labels, self._shapes, self._files = [], [], [], []
        for rel, stack in stacks.items():
            z_items = self.planes.z_items(stack.z)
            for z in z_items:
                self._items.append((rel, z))
                self.ids.append(rel if len(z_items) == 1 else f"{rel}#z{z}")
                self.labels.append(label_of[rel])
                self._shapes.append((self._out_channels(stack), stack.height, stack.width))
                self._files.append(rel)
        first = next(iter(stacks.values()))
        self.channels = self._out_channels(first)
        self.z_folded = first.z if self.planes.z_as == "channels" else 1
        self.base_channel_names = first.names
        sizes = {shape[1:] for shape in self._shapes}
        self.shape_hw = sizes.pop() if len(sizes) == 1 else None
        if self.bad:
            self._warn_skipped()

    @property
    def split_ids(self) -> list[str]:
        # The planes of one stack (z_as: items) show the same cells: they go to one split together, or the
        # held-out scores would be measured on the training cells' neighbouring planes.
        return self._files

    def read(self, index: int) -> np.ndarray:
        i = _item(index, len(self))
        rel, z = self._items[i]
        path = self.root / rel
        try:
            image = _decode(path, self.planes, z)
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

    def _out_channels(self, stack: _Stack) -> int:
        """The channels of an item of `stack`: its own, times its Z planes with z_as: channels."""
        return stack.channels * (stack.z if self.planes.z_as == "channels" else 1)

    def _check_headers(self, rels: list[str], channels: int | None) -> dict[str, _Stack]:
        """The header of every usable file, in order; the others go through _reject."""
        stacks: dict[str, _Stack] = {}
        first = None
        for rel in rels:
            try:
                stack = _header(self.root / rel)
            except _BadImage as exc:
                self._reject(rel, str(exc))
                continue
            why = self._planes_problem(stack) or self._channels_problem(stack, channels, first, stacks.get(first))
            if why:
                self._reject(rel, why)
                continue
            first = first or rel
            stacks[rel] = stack
        return stacks

    def _planes_problem(self, stack: _Stack) -> str | None:
        """Why data.planes cannot turn this stack into 2D images, or None."""
        planes = self.planes
        if stack.t > 1 and planes.time is None:
            return (
                f"a stack of {stack.t} time points ({stack.described()}): "
                f"set data.planes.time to the one to use (0 to {stack.t - 1})"
            )
        if stack.z > 1 and planes.z_key is None:
            return (
                f"a stack of {stack.z} Z planes ({stack.described()}): set one of data.planes.plane (one plane), "
                "data.planes.projection (max, mean or sum) or data.planes.z_as (channels or items)"
            )
        problem = planes.out_of_range(stack.z, stack.t)
        return f"{problem} ({stack.described()})" if problem else None

    def _channels_problem(
        self, stack: _Stack, channels: int | None, first: str | None, like: _Stack | None
    ) -> str | None:
        """Why the channels of this stack differ from those asked or from the first usable image's, or None."""
        count = self._out_channels(stack)
        folded = self.planes.z_as == "channels"
        shown = f"{count} channel(s)" + (f" ({stack.channels} x {stack.z} Z planes)" if folded else "")
        if channels is not None:
            return None if count == channels else f"has {shown}; expected {channels}, as asked by channels"
        if like is None:
            return None
        expected = self._out_channels(like)
        # With planes as channels, 2 channels x 3 planes is not 3 x 2: channel k would mean something else.
        if count != expected or (folded and (stack.channels, stack.z) != (like.channels, like.z)):
            expected_shown = f"{expected}" + (f" ({like.channels} x {like.z} Z planes)" if folded else "")
            return f"has {shown}; expected {expected_shown}, like {first}, the first usable image"
        return None

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


def csv_file_name(name: str) -> str:
    """A labels CSV's `file` cell as the path below the root that the collection uses."""
    # Backslashes: CSVs made on Windows; PurePosixPath drops './' and doubled slashes.
    return PurePosixPath(name.strip().replace("\\", "/")).as_posix()


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
                rel = csv_file_name(name)
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


def _header(path: Path) -> _Stack:
    """What an image file's header says of its axes and size, without decoding pixels."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                series = _one_series(tif)
                stack = _tiff_stack(tuple(series.shape), series.axes)
                xml = tif.ome_metadata if tif.is_ome else None
        except _BadImage:
            raise
        except Exception as exc:  # tifffile raises TiffFileError, OSError, ValueError, struct.error...
            raise _BadImage(f"cannot open as a TIFF file: {exc}") from exc
        names = _ome_channel_names(xml, stack.channels) if xml else None
        return replace(stack, names=names)
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
    channels = _PIL_CHANNELS[mode]
    axes, shape = ("YX", (height, width)) if channels == 1 else ("YXS", (height, width, channels))
    return _Stack(axes, shape, "S" if channels > 1 else "", channels, 1, 1, height, width)


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


def _tiff_stack(shape: tuple[int, ...], axes: str) -> _Stack:
    """Which axes of a TIFF series are channels, Z planes and time points; unusable layouts refused."""
    described = f"shape {shape} (axes {axes})"
    # Axes of length 1 say nothing (tifffile squeezes most of them already).
    kept = [(letter, n) for letter, n in zip(axes, shape, strict=True) if n > 1 or letter in "YX"]
    letters = "".join(letter for letter, _ in kept)
    if letters.count("Y") != 1 or letters.count("X") != 1:
        raise _BadImage(f"TIFF image has {described}; expected one Y and one X axis")
    other = sorted({letter for letter in letters if letter not in _AXIS_ROLES})
    if other:
        raise _BadImage(
            f"TIFF image has {described}: axis {', '.join(other)} is not supported; expected channels (C, S), "
            "Z planes (Z) and time points (T) besides Y and X"
        )
    if any(_AXIS_ROLES[letter] == "unknown" for letter in letters) and len(kept) > 3:
        raise _BadImage(
            f"TIFF image has {described}; expected (H, W), (pages, H, W) or (H, W, samples): pages whose "
            "meaning tifffile cannot tell (axis Q or I) are read as channels only in a plain page stack. "
            "Save it as an ImageJ hyperstack or an OME-TIFF, whose axes say which pages are Z planes, "
            "channels (C) or time points (T)"
        )
    repeated = sorted({letter for letter in letters if letters.count(letter) > 1})
    if repeated:
        raise _BadImage(f"TIFF image has {described}: axis {', '.join(repeated)} appears more than once")
    size = dict(kept)
    channel_axes = "".join(letter for letter in letters if _AXIS_ROLES[letter] in ("channel", "unknown"))
    channels = math.prod(size[letter] for letter in channel_axes)
    return _Stack(axes, shape, channel_axes, channels, size.get("Z", 1), size.get("T", 1), size["Y"], size["X"])


def _ome_channel_names(xml: str, count: int) -> tuple[str, ...] | None:
    """The Name of each Channel of the first Image of OME-XML, when there is one per channel; else None."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None  # names are a nicety: unreadable XML does not make the pixels unusable
    image = next((e for e in root if _local(e.tag) == "Image"), None)
    pixels = next((e for e in image if _local(e.tag) == "Pixels"), None) if image is not None else None
    if pixels is None:
        return None
    found = [(e.get("Name") or "").strip() for e in pixels if _local(e.tag) == "Channel"]
    # One Channel for several samples (an RGB OME-TIFF) names no single channel: keep ch0, ch1...
    if len(found) != count:
        return None
    return tuple(name or f"ch{i}" for i, name in enumerate(found))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # OME-XML elements live in the OME namespace


def _decode(path: Path, planes: Planes, z: int | None) -> np.ndarray:
    """The pixels of one item of an image file as a (C, H, W) array, native byte order: Z plane z (None:
    all of them) reduced as `planes` says; the file's own dtype except for mean and sum projections."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            with tifffile.TiffFile(path) as tif:
                series = _one_series(tif)
                stack = _tiff_stack(tuple(series.shape), series.axes)
                data = _read_tiff(series, stack, planes.time, z)
        except _BadImage:
            raise
        except Exception as exc:  # truncated or corrupt data: ValueError, zlib.error, codec errors...
            raise _BadImage(f"cannot decode TIFF data: {exc}") from exc
    else:
        try:
            with Image.open(path) as image:
                data = _pil_array(image)
        except _BadImage:
            raise
        except Exception as exc:  # "image file is truncated" (OSError), decoder errors...
            raise _BadImage(f"cannot decode image data: {exc}") from exc
        data = (data[None] if data.ndim == 2 else data.transpose(2, 0, 1))[:, None]
    data = reduce_planes(data, planes)
    return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))


def _read_tiff(series: Any, stack: _Stack, time: int | None, z: int | None) -> np.ndarray:
    """(C, Z, H, W) of a TIFF series: time point `time` and Z plane `z` only (None: every plane)."""
    index: list[int | slice] = []
    left = []  # the letters of the axes that remain after indexing, in order
    for letter, n in zip(stack.axes, stack.shape, strict=True):
        if n == 1 and letter not in "YX":
            index.append(0)
        elif letter == "T":
            if time is None:
                raise _BadImage(f"{stack.t} time points ({stack.described()}) and no data.planes.time")
            index.append(time)
        elif letter == "Z" and z is not None:
            index.append(z)
        else:
            index.append(slice(None))
            left.append(letter)
    if any(isinstance(i, int) and n > 1 for i, n in zip(index, stack.shape, strict=True)):
        # One plane or time point of a large stack: tifffile's zarr view decodes only the pages it needs.
        store = series.aszarr()
        try:
            data = np.asarray(zarr.open_array(store, mode="r")[tuple(index)])
        finally:
            store.close()
    else:
        data = series.asarray()[tuple(index)]
    order = [left.index(c) for c in stack.channel_axes] + [left.index(c) for c in "ZYX" if c in left]
    data = data.transpose(order)
    return data.reshape(stack.channels, -1, stack.height, stack.width)


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
