"""The shared base of the image readers: the ImageCollection interface every reader implements, the
errors and records they report (ImageFormatError, BadImageWarning, BadFile), how stacks with Z and T
axes become 2D images (Planes, reduce_planes), and the helpers several readers use (item indexing,
opening a zarr group and one of its arrays)."""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import zarr


class ImageFormatError(ValueError):
    """An image file, store or folder that cannot be used; the message names it (and the item) and says why."""


class BadImageWarning(UserWarning):
    """Files were left out of a collection opened with on_bad="skip"; its `bad` list says which and why."""


@dataclass(frozen=True)
class BadFile:
    """A file left out of a collection, and why."""

    path: str
    reason: str


PROJECTIONS = ("max", "mean", "sum")
Z_AS = ("channels", "items")
Z_KEYS = ("plane", "projection", "z_as")  # at most one of them


@dataclass(frozen=True)
class Planes:
    """How a stack with Z (and T) planes becomes 2D images: a job spec's data.planes.

    At most one of plane (that Z plane), projection (max, mean or sum over Z) and z_as ("channels": every
    plane a channel, channel-major; "items": every plane an image of its own); time picks a time point.
    """

    plane: int | None = None
    projection: str | None = None
    z_as: str | None = None
    time: int | None = None

    def __post_init__(self) -> None:
        for key in ("plane", "time"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"data.planes.{key} must be a non-negative integer; got {value!r}")
        if self.projection not in (None, *PROJECTIONS):
            raise ValueError(f"data.planes.projection must be one of {', '.join(PROJECTIONS)}; got {self.projection!r}")
        if self.z_as not in (None, *Z_AS):
            raise ValueError(f"data.planes.z_as must be one of {', '.join(Z_AS)}; got {self.z_as!r}")
        chosen = [key for key in Z_KEYS if getattr(self, key) is not None]
        if len(chosen) > 1:
            raise ValueError(f"data.planes sets {' and '.join(chosen)}: set at most one of {', '.join(Z_KEYS)}")

    @classmethod
    def of(cls, options: Planes | Mapping | None) -> Planes:
        """Planes from a spec's data.planes mapping (None values: not set), or as given."""
        if isinstance(options, Planes):
            return options
        options = dict(options or {})
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"data.planes: unknown key(s) {unknown}; expected among plane, projection, z_as, time")
        return cls(**{key: value for key, value in options.items() if value is not None})

    @property
    def z_key(self) -> str | None:
        """The one of plane, projection, z_as that is set, or None."""
        return next((key for key in Z_KEYS if getattr(self, key) is not None), None)

    @property
    def reads_all_z(self) -> bool:
        """Whether an item needs every Z plane (a projection, or planes as channels) rather than one."""
        return self.projection is not None or self.z_as == "channels"

    def z_items(self, n_z: int) -> list[int | None]:
        """The Z plane of each item cut from a stack of n_z planes (None: the item uses them all)."""
        if self.reads_all_z:
            return [None]
        if self.plane is not None:
            return [self.plane]
        return list(range(n_z))

    def out_of_range(self, n_z: int, n_t: int) -> str | None:
        """Why the plane or time point asked is not in a stack of n_z planes and n_t time points, or None."""
        if self.time is not None and self.time >= n_t:
            return f"data.planes.time {self.time} asked, but it has {n_t} time point(s) (0 to {n_t - 1})"
        if self.plane is not None and self.plane >= n_z:
            return f"data.planes.plane {self.plane} asked, but it has {n_z} Z plane(s) (0 to {n_z - 1})"
        return None


def reduce_planes(stack: np.ndarray, planes: Planes) -> np.ndarray:
    """(C, Z, H, W) -> (C', H, W): a single plane as it is (Z is 1: the reader read only that one), the
    projection over Z, or every plane a channel (channel c, plane k -> channel c * Z + k)."""
    c, z, h, w = stack.shape
    if planes.projection == "max":
        return stack.max(axis=1)
    if planes.projection in ("mean", "sum"):
        # float32 whatever the file's dtype: a sum of 16-bit planes overflows 16 bits, a mean is fractional;
        # accumulated in float64 so that neither loses precision on the way.
        return getattr(stack, planes.projection)(axis=1, dtype=np.float64).astype(np.float32)
    if z != 1 and planes.z_as != "channels":
        raise ValueError(f"{z} Z planes and no data.planes option that reduces them")  # a reader's bug
    return stack.reshape(c * z, h, w)


def z_channel_names(names: Sequence[str], n_z: int) -> list[str]:
    """The names of channels with n_z planes folded in (z_as: channels), channel-major: '<name> z<k>'."""
    if n_z == 1:
        return list(names)
    return [f"{name} z{k}" for name in names for k in range(n_z)]


class ImageCollection(ABC):
    """An indexed set of images read lazily: len(), read(i) -> np.ndarray (C, H, W) in the file's own dtype
    (uint8/uint16/float32...), ids[i] a stable string naming the file (relative to the root) plus page/tile,
    labels[i] a str or None, bad: list[BadFile] of what was skipped, channel_names one name per channel."""

    channels: int
    ids: list[str]
    labels: list[str | None]
    bad: list[BadFile]
    # The (H, W) every item shares, or None when sizes differ; a default so that subclasses may leave it out.
    shape_hw: tuple[int, int] | None = None
    # The names of the file's own channels (from its metadata, or given), before Z planes were folded into
    # them (z_as: channels, z_folded planes each); None: ch0, ch1...
    base_channel_names: Sequence[str] | None = None
    z_folded: int = 1

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def read(self, index: int) -> np.ndarray: ...

    @property
    def channel_names(self) -> list[str]:
        """One name per channel of read(i), for captions: the metadata's, given ones, or ch0, ch1..."""
        base = self.base_channel_names or [f"ch{i}" for i in range(self.channels // self.z_folded)]
        return z_channel_names(base, self.z_folded)

    @property
    def split_ids(self) -> list[str]:
        """The id each item is assigned to a split by; items cut from one image share it (default: ids)."""
        return self.ids

    def name_channels(self, names: Sequence[str]) -> None:
        """Name the file's own channels (before any Z planes folded into them); a count that differs is refused."""
        names = [str(name) for name in names]
        count = self.channels // self.z_folded
        if len(names) != count:
            folded = f" ({self.channels} with its {self.z_folded} Z planes as channels)" if self.z_folded > 1 else ""
            raise ValueError(f"{len(names)} name(s) {names} given, but {self!r} has {count} channel(s){folded}")
        self.base_channel_names = names


def _item(index: int, n: int) -> int:
    i = operator.index(index)  # numpy integers too; a float index is a caller's bug
    if not -n <= i < n:
        raise IndexError(f"item {index} out of range for a collection of {n} image(s)")
    return i % n


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
