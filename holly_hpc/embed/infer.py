"""`holly-hpc embed RUN --input DIR`: embed new images with a trained task's newest checkpoint.

The images are read, normalised and sized exactly as the task's own were (its frozen config), then
written to a zarr store with the layout of embeddings/<split> (see export.py). The store is assembled in a
temporary folder beside the output and renamed into place at the end: an interrupted run leaves nothing
half-written, and an existing output is only replaced with --overwrite.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..experiment import Experiment
from ..io.images import (
    FolderCollection,
    ImageCollection,
    OmeZarrCollection,
    ZarrCollection,
)
from ..runtime.evaluate import newest_task_checkpoint
from .data import EmbedDataset
from .export import write_embeddings
from .task import ShapeTransform, build_model


def open_input(path: Path, config: dict, channels: int, labels: str, on_bad: str) -> ImageCollection:
    """A folder of TIFF/PNG images, a zarr group with an `images` array, or an OME-Zarr image."""
    data = config["data"]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or zarr store")
    if (path / "zarr.json").exists() or (path / ".zgroup").exists():
        import zarr

        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        if "multiscales" in attrs or "multiscales" in attrs.get("ome", {}):
            return OmeZarrCollection(path, tile=data["image_size"], planes=data.get("planes"))
        return ZarrCollection(path)
    # New images are stacks of the same kind as the run's: its data.planes reduces their Z and T alike.
    return FolderCollection(path, channels=channels, labels=labels, on_bad=on_bad, planes=data.get("planes"))


def embed_new_images(
    experiment: Experiment,
    index: int,
    input_path: Path,
    output: Path,
    labels: str = "none",
    batch_size: int | None = None,
    overwrite: bool = False,
    device: str | None = None,
    skip_bad: bool | None = None,
) -> dict:
    """Embed every image of input_path into the zarr store `output`; skip_bad None: as the run's spec says."""
    from ..runtime.task import select_device

    task = experiment.task(index)
    config = task.config
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; give --overwrite to replace it")
    payload = newest_task_checkpoint(experiment, index, kind="embed")
    state = payload["kind"]
    dev = select_device(device or config["device"])
    model = build_model(config["model"], state["channels"], config["data"]["image_size"], config["seed"])
    model.load_state_dict(state["model"])
    model.to(dev)

    on_bad = config["data"]["on_bad_file"] if skip_bad is None else ("skip" if skip_bad else "fail")
    collection = open_input(input_path, config, state["channels"], labels, on_bad)
    if collection.channels != state["channels"]:
        raise ValueError(
            f"{input_path}: images have {collection.channels} channel(s); the model was trained on {state['channels']}"
        )
    data = {
        **config["data"],
        "split": {"val": 0.0, "test": 0.0},
        "on_bad_file": on_bad,
    }  # every new image is simply embedded
    shape = config["model"]["shape"]
    transform = (
        ShapeTransform(shape["points"], shape["mask_channel"], shape["normalise_scale"])
        if config["model"]["family"] == "shape"
        else None
    )
    # data.normalise.mode dataset: the training images' levels, not the new images' own.
    dataset = EmbedDataset(collection, data, config["seed"], transform, levels=state.get("normalise_levels"))

    import zarr

    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        embeddings = write_embeddings(
            group,
            "embeddings",
            model,
            dataset,
            np.arange(len(collection)),
            batch_size or config["train"]["embed_batch_size"],
            dev,
        )
        group.attrs.update(
            {
                "experiment": experiment.name,
                "task": index,
                "task_id": task.task_id,
                "checkpoint_step": int(payload["step"]),
                "input": str(input_path.resolve()),
                "family": config["model"]["family"],
                "bad_files": [list(b) for b in dataset.bad],
            }
        )
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    embeddings = embeddings["embedding"]
    skipped = int(np.isnan(embeddings).any(axis=1).sum()) if len(embeddings) else 0
    return {
        "images": len(collection),
        "embedded": len(collection) - skipped,
        "skipped": skipped + len(collection.bad),
        "dim": model.embedding_dim,
        "step": int(payload["step"]),
        "output": str(output),
    }
