"""The zarr array reader: ZarrCollection, the items of one (N, C, H, W) or (N, H, W) array of a zarr
group, with optional ids and labels arrays beside it, read one item at a time."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import zarr

from .base import ImageCollection, ImageFormatError, _get_array, _item, _open_group


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
