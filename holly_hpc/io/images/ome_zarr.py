"""The OME-Zarr reader: OmeZarrCollection, tiles of one level of an OME-NGFF v0.4 / v0.5 image, and
write_ome_zarr, which writes such an image (the tests build their OME-Zarr data with it)."""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .base import ImageCollection, ImageFormatError, Planes, _get_array, _item, _open_group, reduce_planes

OME_AXES = ("t", "c", "z", "y", "x")


class OmeZarrCollection(ImageCollection):
    """Non-overlapping tile x tile tiles of every (t, z) plane of one level of an OME-Zarr image.

    OME-NGFF v0.4 (zarr format 2, attrs["multiscales"]) and v0.5 (zarr format 3, attrs["ome"]["multiscales"]).
    Axes: any of t, c, z with y, x last. Tiles run over t, then z, then rows, then columns; the remainder
    at the bottom and right edges is dropped. All channels, or those listed in `channels`, are kept.
    `planes` (a Planes or a spec's data.planes mapping): time keeps one time point; plane one Z plane,
    projection the max, mean or sum over Z, z_as: channels every Z plane as a channel (channel-major);
    none of them (or z_as: items) keeps one item per plane. Channel names: omero.channels[].label.
    """

    def __init__(
        self,
        path: str | Path,
        tile: int,
        level: int = 0,
        channels: Sequence[int] | None = None,
        planes: Planes | Mapping | None = None,
    ) -> None:
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile must be a positive integer; got {tile!r}")
        self.path = Path(path)
        self.tile = tile
        self.level = level
        self.planes = Planes.of(planes)
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
        height, width = sizes["y"], sizes["x"]
        if height < tile or width < tile:
            raise ImageFormatError(
                f"{self.path}: level {level} image is {height}x{width} (height x width), "
                f"smaller than the {tile}x{tile} tile"
            )
        n_t, n_z = sizes.get("t", 1), sizes.get("z", 1)
        if n_t * n_z == 0:
            raise ImageFormatError(f"{self.path}: level {level} array has shape {shape}: no (t, z) plane")
        problem = self.planes.out_of_range(n_z, n_t)
        if problem:
            raise ImageFormatError(f"{self.path}: {problem} (axes {''.join(self.axes)}, shape {shape})")
        self._times = [self.planes.time] if self.planes.time is not None else list(range(n_t))
        self._zs = self.planes.z_items(n_z)
        self.z_folded = n_z if self.planes.z_as == "channels" else 1
        self.channels = len(self._channels) * self.z_folded
        labels = _omero_labels(group)
        if labels is not None and len(labels) == sizes.get("c", 1):
            self.base_channel_names = [labels[c] for c in self._channels]
        self._grid = (len(self._times), len(self._zs), height // tile, width // tile)
        _, _, n_y, n_x = self._grid
        self.ids = [
            f"{self.path.name}/{level}/t{t}{self._z_name(z)}y{ty * tile}x{tx * tile}"
            for t in self._times
            for z in self._zs
            for ty in range(n_y)
            for tx in range(n_x)
        ]
        self.labels = [None] * len(self.ids)
        self.bad = []
        self.shape_hw = (tile, tile)

    def _z_name(self, z: int | None) -> str:
        # A plane's tiles keep the ids they have without options; reduced ones say how they were made.
        if z is not None:
            return f"z{z}"
        return f"z{self.planes.projection}" if self.planes.projection else ""

    def read(self, index: int) -> np.ndarray:
        i = _item(index, len(self))
        _, n_z, n_y, n_x = self._grid
        t, rest = divmod(i, n_z * n_y * n_x)
        z, rest = divmod(rest, n_y * n_x)
        ty, tx = divmod(rest, n_x)
        plane = self._zs[z]
        where = {
            "t": self._times[t],
            "z": slice(None) if plane is None else plane,
            "c": self._channels,
            "y": slice(ty * self.tile, (ty + 1) * self.tile),
            "x": slice(tx * self.tile, (tx + 1) * self.tile),
        }
        try:
            # Orthogonal indexing reads only the chunks that hold this tile and these channels.
            data = np.asarray(self._array.oindex[tuple(where[name] for name in self.axes)])
        except Exception as exc:  # corrupt chunk, vanished store...
            raise ImageFormatError(f"{self.path}: cannot read tile {i} ({self.ids[i]}): {exc}") from exc
        left = [name for name in self.axes if name != "t" and not (name == "z" and plane is not None)]
        for name in ("c", "z"):  # (C, Z, H, W), with length-1 axes for those the image lacks or indexed
            if name not in left:
                data, left = data[None], [name, *left]
        data = reduce_planes(data.transpose([left.index(name) for name in ("c", "z", "y", "x")]), self.planes)
        return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))

    def __repr__(self) -> str:
        return f"OmeZarrCollection({str(self.path)!r}, tile={self.tile}, level={self.level}, {len(self)} tile(s))"


def _omero_labels(group: zarr.Group) -> list[str] | None:
    """The label of every channel in the omero metadata (v0.4 attrs["omero"], v0.5 attrs["ome"]["omero"])."""
    attrs = group.attrs.asdict()
    ome = attrs.get("ome")
    omero = attrs.get("omero") or (ome.get("omero") if isinstance(ome, dict) else None)
    channels = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(channels, list):
        return None
    labels = [c.get("label") if isinstance(c, dict) else None for c in channels]
    return [label.strip() if isinstance(label, str) and label.strip() else f"ch{i}" for i, label in enumerate(labels)]


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
    channel_names: Sequence[str] | None = None,
) -> Path:
    """Write `data` as an OME-Zarr image (NGFF v0.4 on zarr format 2, or v0.5 on zarr format 3).

    axes: the letters of the data's axes in NGFF order, t? c? z? y x (e.g. "cyx", "tczyx").
    levels > 1 adds levels downsampled 2x in y and x by 2x2 block means (cast back to the dtype).
    chunks: per axis; default 1 along t, c, z and up to 256 along y, x. Refuses an existing path.
    channel_names: written as the omero metadata's channel labels (one per channel).
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
    n_channels = data.shape[axes.index("c")] if "c" in axes else 1
    if channel_names is not None and len(channel_names) != n_channels:
        raise ValueError(f"{len(channel_names)} channel name(s) for {n_channels} channel(s)")
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
    omero = {"omero": {"channels": [{"label": str(name)} for name in channel_names]}} if channel_names else {}
    if version == "0.4":
        group.update_attributes({"multiscales": [{"version": "0.4", **multiscale}], **omero})
    else:
        group.update_attributes({"ome": {"version": "0.5", "multiscales": [multiscale], **omero}})
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
