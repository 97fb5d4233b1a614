"""The embed kind's data: a collection of images, split, normalised, brought to one size, batched, augmented.

Batches are a pure function of (seed, step), like every kind's: training walks a seeded permutation of
the training split epoch by epoch, and augmentations draw from the step's own generator, so a resumed run
sees exactly the batches an uninterrupted one would. Nothing is read before it is needed (a dataset larger
than memory streams from disk); when the whole dataset fits in data.cache_mb, prepared items are kept.

Splits are assigned per image from a hash of its id, so they do not depend on file order, on the seed, or
on images added later; each image's split is written beside its embedding.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..io import missing, resolve_path
from ..io.images import Z_KEYS, ImageCollection, ImageFormatError, open_collection
from .models import normalise_per_channel, percentiles, scale_between
from .synthetic import SYNTHETIC_DATASETS

SPLITS = ("train", "val", "test")


PLANE_SOURCES = ("folder", "ome_zarr")  # the sources whose images may have Z and T axes


def make_collection(data: dict, seed: int, base_dir: Path) -> ImageCollection:
    """The spec's data source as an ImageCollection, its channels named by data.channel_names if given."""
    collection = _open_source(data, seed, base_dir)
    names = data.get("channel_names")
    if names:
        try:
            collection.name_channels(names)
        except ValueError as exc:
            raise ValueError(f"data.channel_names: {exc}") from None
    return collection


def _open_source(data: dict, seed: int, base_dir: Path) -> ImageCollection:
    source = data["source"]
    if source == "synthetic":
        options = data["synthetic"]
        generated = SYNTHETIC_DATASETS[options.get("dataset", "cells")]
        return generated(
            options["count"],
            options.get("size") or data["image_size"],
            options["classes"],
            options["seed"] if options.get("seed") is not None else seed,
        )
    options = dict(data[source])
    if source == "folder":
        options.setdefault("on_bad", data["on_bad_file"])
        options.setdefault("channels", data.get("channels"))
    if source == "ome_zarr":
        options.setdefault("tile", data["image_size"])
    if source in PLANE_SOURCES:
        options.setdefault("planes", data.get("planes") or {})  # frozen specs older than data.planes lack it
    return open_collection(source, options, base_dir)


def planes_problems(data: dict) -> list[tuple[tuple, str]]:
    """data.planes and data.channel_names as far as they can be checked without opening the images."""
    planes = {key: value for key, value in (data.get("planes") or {}).items() if value is not None}
    problems = []
    chosen = [key for key in Z_KEYS if key in planes]
    for key in chosen[1:]:  # each key after the first, at its own line
        problems.append((("data", "planes", key), f"{chosen[0]} is set too: set at most one of {', '.join(Z_KEYS)}"))
    source = data["source"]
    if planes and source not in PLANE_SOURCES:
        problems.append(
            (
                ("data", "planes"),
                f"data.source is {source}, whose images have no Z or T axis: data.planes applies to "
                f"{' and '.join(PLANE_SOURCES)} only",
            )
        )
    names = data.get("channel_names")
    if names and source == "synthetic":
        dataset = SYNTHETIC_DATASETS[data["synthetic"].get("dataset", "cells")]
        if len(names) != dataset.channels:
            problems.append(
                (
                    ("data", "channel_names"),
                    f"{len(names)} name(s) given, but generated {dataset.dataset_name} images have "
                    f"{dataset.channels} channels ({', '.join(dataset.base_channel_names)})",
                )
            )
    return problems


def data_problems(data: dict, base_dir: Path) -> list[tuple[tuple, str]]:
    """Checks of an image data section a schema cannot make (shared by the kinds that read images)."""
    problems = []
    source = data["source"]
    if source != "synthetic":
        if "path" not in data.get(source, {}):
            problems.append((("data", source), f"data.source is {source}: expected data.{source}.path"))
        else:
            problem = missing(resolve_path(data[source]["path"], base_dir), f"an existing {source} of images")
            if problem:
                problems.append((("data", source, "path"), problem))
    labels = data.get("folder", {}).get("labels", "none")
    if source == "folder" and labels not in ("none", "folders"):
        csv = resolve_path(labels, base_dir)
        problem = missing(csv, "none, folders or a CSV file")
        if problem or not csv.is_file():
            problems.append(
                (
                    ("data", "folder", "labels"),
                    problem or f"expected none, folders or a CSV file, but {csv} is not a file",
                )
            )
    problems += planes_problems(data)
    if data["normalise"]["low"] >= data["normalise"]["high"]:
        problems.append((("data", "normalise"), "low must be below high"))
    if data["split"]["val"] + data["split"]["test"] >= 1:
        problems.append((("data", "split"), "val + test must leave images to train on (< 1)"))
    return problems


def split_of(item_id: str, val: float, test: float) -> str:
    """train, val or test from a hash of the id: stable whatever the order or number of other images."""
    u = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, stream, step)."""
    digest = hashlib.sha256(f"{seed}:{stream}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def fit_to_size(image: torch.Tensor, size: int, offset: tuple[int, int] | None = None) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): crop (at `offset`, else centred) when larger, zero-pad around when smaller."""
    _, h, w = image.shape
    if h > size or w > size:
        top, left = offset if offset is not None else ((h - size) // 2, (w - size) // 2)
        top, left = max(0, min(top, h - size)), max(0, min(left, w - size))
        image = (
            image[:, top : top + size, left : left + size]
            if h > size and w > size
            else image[:, top : top + size, :]
            if h > size
            else image[:, :, left : left + size]
        )
        _, h, w = image.shape
    if h < size or w < size:
        pad_h, pad_w = size - h, size - w
        image = torch.nn.functional.pad(image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return image


def augment(images: torch.Tensor, generator: torch.Generator, flips: bool, rot90: bool, jitter: float) -> torch.Tensor:
    """Microscopy-safe augmentations of a batch (B, C, S, S) in [0, 1], vectorised over the batch: random
    horizontal flips and quarter turns (a cell has no up or down), and a small gain/offset jitter per image
    and channel (stains vary). Draws from `generator` always in the same order, whatever is switched on."""
    batch = images.shape[0]
    flip = torch.rand(batch, generator=generator) < 0.5
    turns = torch.randint(0, 4, (batch,), generator=generator)
    gain = 1 + jitter * (2 * torch.rand(batch, images.shape[1], 1, 1, generator=generator) - 1)
    offset = 0.5 * jitter * (2 * torch.rand(batch, images.shape[1], 1, 1, generator=generator) - 1)
    if flips:
        images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
    if rot90:
        turned = torch.stack([images.rot90(k, dims=(-2, -1)) for k in range(4)])  # (4, B, C, S, S)
        images = turned[turns.to(images.device), torch.arange(batch, device=images.device)]
    if jitter > 0:
        images = (images * gain.to(images) + offset.to(images)).clamp(0, 1)
    return images


class EmbedDataset:
    """Items of a collection as float tensors (C, S, S) in [0, 1], split and batched.

    transform: an optional map from a prepared image (C, S, S) to the model's input (the shape family turns
    images into distance matrices); load(..., transformed=False) returns the images themselves.

    data.normalise.mode: image (percentiles of each image and channel), dataset (percentiles of each
    channel over the training split, `levels` (C, 2); pass the training run's levels when embedding new
    images, or they are measured here) or none (the stored values).
    """

    def __init__(
        self,
        collection: ImageCollection,
        data: dict,
        seed: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        levels: torch.Tensor | None = None,
    ):
        self.collection, self.data, self.seed, self.transform = collection, data, seed, transform
        self.size = data["image_size"]
        self.low, self.high = data["normalise"]["low"], data["normalise"]["high"]
        self.mode = data["normalise"].get("mode", "image")  # frozen specs older than the modes lack it
        self.skip_bad = data["on_bad_file"] == "skip"
        split = data["split"]
        # split_ids: the planes cut from one stack share one split
        names = np.array([split_of(i, split["val"], split["test"]) for i in collection.split_ids])
        self.split_names = names
        self.splits = {name: np.flatnonzero(names == name) for name in SPLITS}
        if len(self.splits["train"]) == 0:
            raise ValueError(f"no training images: {len(collection)} images, all assigned to val/test by data.split")
        self.labels = list(collection.labels)
        self.label_names = sorted({label for label in self.labels if label is not None})
        self.bad: list[tuple[str, str]] = [(b.path, b.reason) for b in collection.bad]
        self.workers = data["workers"]
        self._cache: dict[tuple[int, bool], torch.Tensor] = {}
        item_bytes = collection.channels * self.size * self.size * 4
        self.caching = len(collection) * item_bytes <= data["cache_mb"] * 2**20
        self._permutation: tuple[int, torch.Tensor] | None = None
        self.levels = None
        if self.mode == "dataset":
            self.levels = levels if levels is not None else self.dataset_levels()

    def dataset_levels(self, sample: int = 256) -> torch.Tensor:
        """(C, 2): the low-th and high-th percentile of each channel over the pixels of (a seeded sample of
        at most `sample`) training images, read raw."""
        train = self.splits["train"]
        rng = np.random.default_rng([self.seed, 5])
        chosen = np.sort(rng.choice(train, min(sample, len(train)), replace=False))
        planes = []
        for index in chosen:
            try:
                raw = np.asarray(self.collection.read(int(index)), dtype=np.float32)
            except (ImageFormatError, ValueError, OSError):
                if not self.skip_bad:
                    raise
                continue  # load() reports it when the image is used
            planes.append(torch.from_numpy(raw).flatten(1))
        if not planes:
            raise ImageFormatError("data.normalise.mode dataset: no training image could be read to measure levels")
        pixels = torch.cat(planes, dim=1)  # (C, all pixels of the sample)
        return percentiles(pixels, torch.tensor([self.low, self.high]))

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """A raw image (C, H, W) float32 -> the model's input scale, by data.normalise.mode."""
        if self.mode == "image":
            return normalise_per_channel(raw[None], self.low, self.high)[0]
        if self.mode == "dataset":
            return scale_between(raw, self.levels[:, :1, None], self.levels[:, 1:, None])
        return raw

    # ------------------------------------------------------------------ items
    def prepare(self, index: int, transformed: bool = True) -> torch.Tensor:
        """One item, normalised (data.normalise.mode) and centred to image_size (plus the transform)."""
        key = (index, transformed and self.transform is not None)
        if key in self._cache:
            return self._cache[key]
        raw = np.asarray(self.collection.read(index), dtype=np.float32)  # exact for 16-bit data
        item = fit_to_size(self.normalise(torch.from_numpy(raw)), self.size)
        if key[1]:
            item = self.transform(item)
        if self.caching:
            self._cache[key] = item
        return item

    def load(self, indices, transformed: bool = True) -> tuple[torch.Tensor, np.ndarray]:
        """A batch (B, ...) of the given items and the indices actually loaded (bad files are dropped
        under on_bad_file: skip, with a warning naming them; otherwise the error names the file)."""

        def one(index: int):
            try:
                return self.prepare(int(index), transformed)
            except (ImageFormatError, ValueError, OSError) as exc:
                if not self.skip_bad:
                    if isinstance(exc, ImageFormatError):
                        raise
                    raise ImageFormatError(f"{self.collection.ids[int(index)]}: {exc}") from exc
                self.bad.append((self.collection.ids[int(index)], str(exc)))
                warnings.warn(f"skipping {self.collection.ids[int(index)]}: {exc}", stacklevel=2)
                return None

        indices = list(indices)
        if self.workers > 0 and len(indices) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                items = list(pool.map(one, indices))
        else:
            items = [one(i) for i in indices]
        kept = [(i, item) for i, item in zip(indices, items, strict=True) if item is not None]
        if not kept:
            raise ImageFormatError(f"every image of a batch failed to load (first: {self.collection.ids[indices[0]]})")
        return torch.stack([item for _, item in kept]), np.array([i for i, _ in kept], dtype=np.int64)

    # ------------------------------------------------------------------ batches
    def train_indices(self, step: int, batch_size: int) -> np.ndarray:
        """The training items of `step`: positions step·B … step·B+B-1 of an endless sequence of seeded
        epoch permutations of the training split."""
        train = self.splits["train"]
        n = len(train)
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(positions // n):
            if self._permutation is None or self._permutation[0] != epoch:
                order = torch.randperm(n, generator=step_generator(self.seed, 1, int(epoch))).numpy()
                self._permutation = (int(epoch), order)
            chosen = positions // n == epoch
            out[chosen] = train[self._permutation[1][positions[chosen] % n]]
        return out

    def batches(self, indices, batch_size: int, transformed: bool = True) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(loaded indices, items) in order, for embedding or evaluating a whole split."""
        indices = np.asarray(indices)
        for start in range(0, len(indices), batch_size):
            items, kept = self.load(indices[start : start + batch_size], transformed)
            yield kept, items
