"""The shared base of the image readers: the ImageCollection interface every reader implements, the
errors and records they report (ImageFormatError, BadImageWarning, BadFile), and the helpers several
readers use (item indexing, opening a zarr group and one of its arrays)."""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
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
