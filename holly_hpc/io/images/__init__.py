"""Image collections for the embedding task: folders of TIFF/PNG files, zarr arrays and OME-Zarr tiles.

A collection is an indexed set of images read lazily: building one reads only headers and metadata
(file headers, zarr array shapes, OME-NGFF attributes), so that a bad file or a wrong option stops a
task at once with a message naming the file, and `read(i)` then decodes that one item only. Data sets
of microscopy images are often larger than memory; nothing here ever loads a whole folder or array.

Every item is returned as a (C, H, W) array in the file's own dtype (uint8, uint16, float32...):
normalisation is the model's business, and a 16-bit image squeezed into 8 bits here would lose data.
(Mean and sum projections of Z planes are float32: a sum of 16-bit planes does not fit 16 bits.)
Stacks with Z and T axes become 2D images as `Planes` (a spec's data.planes) says, and every collection
names its channels (`channel_names`: from OME metadata, given ones, or ch0, ch1...).
"""

from __future__ import annotations

from pathlib import Path

from .. import resolve_path
from .base import PROJECTIONS, Z_AS, Z_KEYS, BadFile, BadImageWarning, ImageCollection, ImageFormatError, Planes
from .folders import DEFAULT_EXTENSIONS, ON_BAD, TIFF_SUFFIXES, FolderCollection
from .ome_zarr import OME_AXES, OmeZarrCollection, write_ome_zarr
from .zarr_arrays import ZarrCollection

__all__ = [
    "DEFAULT_EXTENSIONS",
    "OME_AXES",
    "ON_BAD",
    "PROJECTIONS",
    "TIFF_SUFFIXES",
    "Z_AS",
    "Z_KEYS",
    "BadFile",
    "BadImageWarning",
    "FolderCollection",
    "ImageCollection",
    "ImageFormatError",
    "OmeZarrCollection",
    "Planes",
    "ZarrCollection",
    "open_collection",
    "write_ome_zarr",
]

_OPTIONS = {
    "folder": {"path", "channels", "labels", "on_bad", "extensions", "planes", "channel_names"},
    "zarr": {"path", "array", "labels_array", "ids_array", "channel_names"},
    "ome_zarr": {"path", "tile", "level", "channels", "planes", "channel_names"},
}


def open_collection(kind: str, options: dict, base_dir: str | Path) -> ImageCollection:
    """The collection of `kind` ("folder", "zarr", "ome_zarr") described by a job spec's `options`.

    Relative paths (the data, and a labels CSV) are resolved against `base_dir`, usually the folder of
    the spec, so that a spec means the same data wherever the job is started from. `planes` (folder,
    ome_zarr) is a spec's data.planes; `channel_names` replaces the names the files' metadata give.
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
    names = opts.pop("channel_names", None)
    collection = _open(kind, path, opts, base_dir)
    if names is not None:
        try:
            collection.name_channels(names)
        except ValueError as exc:
            raise ValueError(f"{kind} collection: option 'channel_names': {exc}") from None
    return collection


def _open(kind: str, path: Path, opts: dict, base_dir: Path) -> ImageCollection:
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
