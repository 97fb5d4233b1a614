"""Embeddings of every image into zarr, shared by the end of training and by `holly-hpc embed`.

Layout, one group per split (or per input folder):

    <group>/embedding  (N, D) float32   row r is the image split_indices[r]; NaN where it could not be read
            /features   (N, F) float32   the encoder's spatially averaged features of the same images
            /index      (N,) int64      the image's index in its collection (-1 where skipped)
            /id         (N,) str        the image's id (file path relative to its root, page/tile)
            /label      (N,) str        its label ("" when it has none)

Rows are written a chunk at a time and every write covers whole chunks (chunk = batch), so several
processes embedding disjoint ranges of one array never write the same chunk.
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime.kinds import evaluating
from .data import EmbedDataset


@torch.no_grad()
def embed_items(model, dataset: EmbedDataset, indices: np.ndarray, batch_size: int, device: torch.device):
    """Yield (row offset, kept mask, wanted indices, embeddings (b, D), features (b, F)) over `indices` in
    batches, the model in eval mode (VAE: the posterior mean; VQ-VAE: the quantised grid)."""
    with evaluating(model):
        for start in range(0, len(indices), batch_size):
            wanted = indices[start : start + batch_size]
            items, kept = dataset.load(wanted)
            out = model(items.to(device))
            yield (
                start,
                np.isin(wanted, kept),
                wanted,
                out["embedding"].float().cpu().numpy(),
                out["features"].float().cpu().numpy(),
            )


def write_embeddings(
    group, name: str, model, dataset: EmbedDataset, indices: np.ndarray, batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
    """Embed dataset items `indices` into group/name (layout above); returns {"embedding": (N, D),
    "features": (N, F)} in memory as well, NaN rows where an image was skipped."""
    indices = np.asarray(indices, dtype=np.int64)
    n, dims = len(indices), {"embedding": model.embedding_dim, "features": model.feature_dim}
    chunk = (max(min(batch_size, n), 1),)
    sub = group.require_group(name)
    arrays = {
        readout: sub.create_array(
            readout, shape=(n, dim), dtype="f4", chunks=(chunk[0], dim), fill_value=np.nan, overwrite=True
        )
        for readout, dim in dims.items()
    }
    arrays.update(
        {
            "index": sub.create_array("index", shape=(n,), dtype="i8", chunks=chunk, fill_value=-1, overwrite=True),
            "id": sub.create_array("id", shape=(n,), dtype=str, chunks=chunk, overwrite=True),
            "label": sub.create_array("label", shape=(n,), dtype=str, chunks=chunk, overwrite=True),
        }
    )
    out = {readout: np.full((n, dim), np.nan, dtype=np.float32) for readout, dim in dims.items()}
    ids, labels = dataset.collection.ids, dataset.labels
    for start, kept, wanted, *values in embed_items(model, dataset, indices, batch_size, device):
        rows = slice(start, start + len(wanted))
        for readout, value in zip(dims, values, strict=True):
            block = np.full((len(wanted), dims[readout]), np.nan, dtype=np.float32)
            block[kept] = value
            out[readout][rows] = block
            arrays[readout][rows] = block
        arrays["index"][rows] = np.where(kept, wanted, -1)
        arrays["id"][rows] = np.array([ids[i] for i in wanted])
        arrays["label"][rows] = np.array([labels[i] or "" for i in wanted])
    sub.attrs.update(
        {
            "images": n,
            "skipped": int(np.isnan(out["embedding"][:, 0]).sum()) if n else 0,
            "dim": dims["embedding"],
            "feature_dim": dims["features"],
        }
    )
    return out


READOUTS = ("embedding", "features")


def readouts_of(sub) -> dict[str, int]:
    """The readouts a stored group holds and their dimensions, in the order every family writes them."""
    return {name: int(sub[name].shape[1]) for name in READOUTS if name in sub}


def write_table(path, parts: list[tuple[str, object]], overwrite: bool = False) -> int:
    """One CSV row per image of every stored group in `parts` [(split name, zarr group)], so a user need not
    join the train/val/test groups by id: split, index, id, label, then embedding_0… and features_0….
    Written beside the target and renamed into place (nothing half-written). Returns the rows written."""
    import csv
    import os
    from pathlib import Path

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; give --overwrite to replace it")
    dims = readouts_of(parts[0][1])
    header = ["split", "index", "id", "label"] + [f"{name}_{i}" for name, dim in dims.items() for i in range(dim)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    rows = 0
    try:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for split, sub in parts:
                values = [sub[name][:] for name in dims]
                for r, (index, item_id, label) in enumerate(
                    zip(sub["index"][:], sub["id"][:], sub["label"][:], strict=True)
                ):
                    numbers = [f"{v:.7g}" for block in values for v in block[r]]
                    writer.writerow([split, int(index), str(item_id), str(label), *numbers])
                    rows += 1
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return rows
