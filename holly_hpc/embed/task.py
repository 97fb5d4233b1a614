"""Task kind `embed`: learn a representation of microscopy images (or of cell shapes) that biologists can
use to compare cells, then embed every image and measure what the embedding knows.

Training minimises the family's loss (reconstruction plus its terms) on augmented batches of the training
split. At the end: embeddings of every image to outputs.zarr (embeddings/<split>/…), TensorBoard's
projector with thumbnails and labels, and, when images carry labels, classifier probes of the embedding
against a baseline of the same dimension (final/eval.json, and the scores among the final metrics).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..io import resolve_path
from ..runtime.captions import caption_grid
from ..runtime.distributed import DistInfo
from ..runtime.kinds import TaskKind, WeightsCache, evaluating, make_lr_scheduler, optimiser_step, wrap_ddp
from ..runtime.outputs import image_rows, save_png, to_rgb
from .data import (
    SPLITS,
    EmbedDataset,
    augment,
    data_problems,
    make_collection,
    step_generator,
)
from .evaluation import evaluate_readouts, flat_scores
from .export import write_embeddings
from .groups import image_keys, image_times, rule_problem
from .models import VAE, VQVAE, AutoEncoder, ChannelFoldingWrapper, EmbeddingModel
from .ssl import DINO, SimCLR
from .views import ViewOptions, random_views

SELF_SUPERVISED = ("simclr", "dino")  # the families that learn from views, not by reconstructing
N_SHOWN = 8  # images per row of the reconstruction grids
THUMBNAIL = 32  # projector sprite size (pixels)


# ------------------------------------------------------------------------------------------ the model
def build_model(model: dict, channels: int, image_size: int, seed: int) -> EmbeddingModel:
    """The spec's model section as an EmbeddingModel for images of `channels` x image_size²."""
    family = model["family"]
    if family == "shape":
        from .shape import DistanceMatrixAutoEncoder

        shape = model["shape"]
        return DistanceMatrixAutoEncoder(
            shape["points"],
            model["latent_dim"],
            model["depth"],
            model["width"],
            shape["diagonal_weight"],
            shape["symmetry_weight"],
            shape["nonnegative_weight"],
        )
    if family in SELF_SUPERVISED:
        ssl = model["ssl"]
        if family == "simclr":
            return SimCLR(
                model["depth"],
                channels,
                image_size,
                model["latent_dim"],
                model["width"],
                ssl["hidden"],
                ssl["temperature"],
            )
        return DINO(
            model["depth"],
            channels,
            image_size,
            model["latent_dim"],
            model["width"],
            ssl["hidden"],
            ssl["prototypes"],
            ssl["student_temperature"],
            ssl["teacher_temperature"],
            ssl["teacher_momentum"],
            ssl["center_momentum"],
            ssl["local_crops"],
        )
    generator = torch.Generator().manual_seed(seed)  # dead-code restarts draw from it: seeded, resumable
    if family == "ae":
        factory = functools.partial(
            AutoEncoder, model["depth"], image_size=image_size, latent_dim=model["latent_dim"], width=model["width"]
        )
    elif family == "vae":
        factory = functools.partial(
            VAE,
            model["depth"],
            image_size=image_size,
            latent_dim=model["latent_dim"],
            beta=model["beta"],
            width=model["width"],
        )
    elif family == "vqvae":
        factory = functools.partial(
            VQVAE,
            model["depth"],
            image_size=image_size,
            codebook_size=model["codebook_size"],
            code_dim=model["code_dim"],
            grid=model["grid"],
            ema_decay=model["ema_decay"],
            dead_code_threshold=model["dead_code_threshold"],
            commitment_weight=model["commitment_weight"],
            width=model["width"],
            generator=generator,
        )
    else:
        raise ValueError(f"unknown embed family {family!r}")
    if model["channel_mode"] == "fold":
        return ChannelFoldingWrapper(factory, channels, model["consistency_weight"])
    return factory(in_channels=channels)


def view_options(data: dict, global_view: bool) -> ViewOptions:
    """The spec's data.views for the global views (image_size) or DINO's local crops."""
    views, size = data["views"], data["image_size"]
    local_size = views["local_size"] or max(16, size // 2)
    scale = views["global_scale"] if global_view else views["local_scale"]
    return ViewOptions.from_spec(
        views, data["augment"], size if global_view else local_size, scale, clamp=data["normalise"]["mode"] != "none"
    )


def make_views(model: EmbeddingModel, images: torch.Tensor, data: dict, generator: torch.Generator) -> list:
    """Two global views of every image, then the model's local crops (DINO's multi-crop)."""
    global_options, local_options = view_options(data, True), view_options(data, False)
    views = [random_views(images, global_options, generator) for _ in range(2)]
    views += [random_views(images, local_options, generator) for _ in range(getattr(model, "local_views", 0))]
    return views


def quantiser_of(model: EmbeddingModel):
    """The VQ-VAE's quantiser (also inside a channel-folding wrapper), or None."""
    inner = getattr(model, "model", model)
    return getattr(inner, "quantiser", None)


# ------------------------------------------------------------------------------------------ shapes
class ShapeTransform:
    """A prepared image (C, S, S) -> the distance matrix (1, N, N) of its mask's longest contour; the mask is
    the Otsu threshold of one channel."""

    def __init__(self, points: int, mask_channel: int, normalise_scale: bool):
        self.points, self.mask_channel, self.normalise_scale = points, mask_channel, normalise_scale

    def mask(self, image: torch.Tensor) -> np.ndarray:
        from skimage.filters import threshold_otsu

        if self.mask_channel >= image.shape[0]:
            raise ValueError(
                f"model.shape.mask_channel {self.mask_channel} but the image has {image.shape[0]} channel(s)"
            )
        channel = image[self.mask_channel].numpy()
        if channel.max() <= channel.min():
            raise ValueError("the mask channel is constant: no cell to outline")
        return channel > threshold_otsu(channel)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from .shape import contour_distance_matrix

        matrix, _ = contour_distance_matrix(self.mask(image), self.points, self.normalise_scale)
        return torch.from_numpy(np.asarray(matrix, dtype=np.float32))[None]


def reindex_matrices(matrices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random cyclic start and direction per matrix (B, 1, N, N): the same contour, read from another point
    and the other way round (augmentation for the shape family)."""
    batch, n = matrices.shape[0], matrices.shape[-1]
    shift = torch.randint(0, n, (batch, 1), generator=generator)
    flip = torch.rand(batch, 1, generator=generator) < 0.5
    position = torch.arange(n)[None]
    order = torch.where(flip, shift - position, shift + position) % n  # (B, N)
    order = order.to(matrices.device)
    rows = matrices[:, 0].gather(1, order[:, :, None].expand(-1, -1, n))
    return rows.gather(2, order[:, None, :].expand(-1, n, -1))[:, None]


def contour_picture(points: np.ndarray, size: int) -> torch.Tensor:
    """A contour (N, 2) drawn as a closed outline in a (size, size) image, scaled to fit."""
    centred = points - points.mean(0)
    scale = (size / 2 - 2) / max(np.abs(centred).max(), 1e-9)
    corners = centred * scale + size / 2
    ends = np.roll(corners, -1, axis=0)
    steps = np.linspace(0, 1, 2 * size, endpoint=False)[None, :, None]  # dense enough for unbroken edges
    trace = (corners[:, None] + steps * (ends - corners)[:, None]).reshape(-1, 2)
    rows, cols = np.clip(np.rint(trace), 0, size - 1).astype(int).T
    picture = torch.zeros(size, size)
    picture[rows, cols] = 1.0
    return picture


def composite(images: torch.Tensor, size: int = THUMBNAIL) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 3, size, size) colour thumbnails: grey for 1 channel, green + magenta
    for 2 (body, nucleus), the first three as RGB otherwise."""
    return F.interpolate(to_rgb(images).float(), size=(size, size), mode="area").clamp(0, 1)


# ------------------------------------------------------------------------------------------ the kind
class EmbedTask(TaskKind):
    @classmethod
    def check_config(cls, config: dict, base_dir: Path) -> list[tuple[tuple, str]]:
        data, model = config["data"], config["model"]
        problems = data_problems(data, base_dir)
        problems += eval_problems(config)
        if model["family"] == "shape" and model["channel_mode"] == "fold":
            problems.append((("model", "channel_mode"), "the shape family embeds one mask per cell: use joint"))
        if model["family"] in SELF_SUPERVISED and model["channel_mode"] == "fold":
            problems.append(
                (("model", "channel_mode"), f"{model['family']} learns from views of the whole cell: use joint")
            )
        if model["family"] in SELF_SUPERVISED:
            for key in ("global_scale", "local_scale", "blur_sigma"):
                low, high = data["views"][key]
                if low > high:
                    problems.append((("data", "views", key), f"[{low}, {high}]: the first value is the smaller"))
        if model["family"] == "vqvae" and model["grid"] > data["image_size"]:
            problems.append(
                (("model", "grid"), f"a grid of {model['grid']} codes does not fit {data['image_size']}-pixel images")
            )
        return problems

    def __init__(self, config: dict, device: torch.device, base_dir: Path, dist: DistInfo | None = None):
        self.config, self.device, self.dist = config, device, dist or DistInfo()
        self.base_dir = base_dir  # the spec's folder: relative paths of the eval rules' labels CSV
        data, model, train = config["data"], config["model"], config["train"]
        self.family = model["family"]
        collection = make_collection(data, config["seed"], base_dir)
        self.shape = (
            ShapeTransform(model["shape"]["points"], model["shape"]["mask_channel"], model["shape"]["normalise_scale"])
            if self.family == "shape"
            else None
        )
        self.dataset = EmbedDataset(collection, data, config["seed"], self.shape)
        self.channels = collection.channels
        self.channel_names = collection.channel_names  # row captions of the reconstruction grids
        self.model = build_model(model, self.channels, data["image_size"], config["seed"]).to(device)
        self.trained = wrap_ddp(self.model, self.dist, device)
        self.self_supervised = self.family in SELF_SUPERVISED
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # not DINO's teacher: an EMA moves it
        self.optimizer = torch.optim.AdamW(trainable, lr=train["lr"], weight_decay=train["weight_decay"])
        self.scheduler = make_lr_scheduler(self.optimizer, train)
        self._eval_keys()  # a rule that misses an image fails now, not after the training
        held_out = self.dataset.splits["val"] if len(self.dataset.splits["val"]) else self.dataset.splits["train"]
        self.eval_inputs, self.eval_indices = self.dataset.load(held_out[: data["eval_size"]])
        self.eval_inputs = self.eval_inputs.to(device)
        self.weights = WeightsCache()  # the held-out outputs, until the weights change
        self._projector: dict[str, dict] = {}

    # ------------------------------------------------------------------ training
    def train_step(self, step: int) -> dict[str, Any]:
        batch_size = self.config["train"]["batch_size"]
        indices = self.dist.rows(self.dataset.train_indices(step, batch_size))  # each rank reads only its own images
        items, _ = self.dataset.load(indices)
        x = items.to(self.device, non_blocking=True)
        generator = step_generator(self.config["seed"], 2, step)
        if self.self_supervised:
            x = make_views(self.model, x, self.config["data"], generator)  # the views are one another's targets
        elif self.shape is not None:
            x = reindex_matrices(x, generator) if self.config["data"]["augment"]["flips"] else x
        else:
            aug = self.config["data"]["augment"]
            x = augment(x, generator, aug["flips"], aug["rot90"], aug["intensity_jitter"])
        self.model.train()
        out = self.trained(x)
        loss = self.model.loss(x, out)
        (lr,) = optimiser_step(loss, self.optimizer, self.scheduler, weights=self.weights)
        if hasattr(self.model, "after_step"):
            self.model.after_step(step, self.config["train"]["steps"])  # DINO's teacher follows the student
        # Tensors, not floats: the Trainer converts them only when it logs (no device sync every step).
        metrics: dict[str, Any] = {"loss": loss.detach(), "lr": lr}
        metrics.update({f"train_{k}": v.detach() for k, v in out["loss_terms"].items()})
        metrics.update({f"train_{k}": v for k, v in out["stats"].items()})
        return metrics

    def _held_out_views(self) -> list:
        """The same views of the held-out images at every evaluation (a fixed generator)."""
        return make_views(self.model, self.eval_inputs, self.config["data"], step_generator(self.config["seed"], 4, 0))

    def _held_out(self) -> dict:
        """The model's outputs and loss on the held-out images, once per weights version."""
        return self.weights.get("held_out", self._compute_held_out)

    @torch.no_grad()
    def _compute_held_out(self) -> dict:
        with evaluating(self.model):
            if self.self_supervised:  # the objective on fixed views: comparable from one evaluation to the next
                out = self.model(self._held_out_views())
                out["loss"] = self.model.loss(None, out)
                return out
            out = self.model(self.eval_inputs)
            out["loss"] = self.model.loss(self.eval_inputs, out)
        return out

    def evaluate(self) -> dict[str, float]:
        out = self._held_out()
        metrics = {"eval_loss": out["loss"].item()}
        metrics.update({f"eval_{k}": v.item() for k, v in out["loss_terms"].items()})
        metrics.update({f"eval_{k}": float(v) for k, v in out["stats"].items()})
        return metrics

    def histograms(self) -> dict[str, torch.Tensor]:
        out = self._held_out()
        if "codes" in out:
            return {"codebook/codes_used_by_held_out_images": out["codes"].flatten()}
        folded = out.get("folded", {})
        return {"codebook/codes_used_by_held_out_images": folded["codes"].flatten()} if "codes" in folded else {}

    def image_grids(self) -> dict[str, torch.Tensor]:
        if self.self_supervised:
            return self._view_grids()
        out = self._held_out()
        inputs, recon = self.eval_inputs[:N_SHOWN].cpu(), out["reconstruction"][:N_SHOWN].float().cpu()
        if self.shape is not None:
            scale = inputs.amax().clamp_min(1e-9)
            rows = [inputs[:, 0] / scale, (recon[:, 0] / scale).clamp(0, 1)]
            size = inputs.shape[-1]
            from .shape import classical_mds

            rows.append(torch.stack([contour_picture(classical_mds(m[0].numpy()), size) for m in inputs]))
            with evaluating(self.model), torch.no_grad():
                decoded = self.model.decode_contours(out["embedding"][:N_SHOWN]).cpu().numpy()
            rows.append(torch.stack([contour_picture(c, size) for c in decoded]))
            captions = ["input matrix", "reconstruction", "input contour (MDS)", "decoded contour"]
            return {"eval/matrices_and_contours": caption_grid(image_rows(rows), captions)}
        rows, captions = [], []
        for c, name in zip(range(inputs.shape[1]), self.channel_names, strict=True):
            rows += [inputs[:, c], recon[:, c].clamp(0, 1)]
            captions += [f"{name} input", f"{name} reconstruction"]
        title = "held-out images: inputs vs reconstructions"
        return {"eval/inputs_vs_reconstructions": caption_grid(image_rows(rows), captions, title=title)}

    def _view_grids(self) -> dict[str, torch.Tensor]:
        """What the self-supervised model learns from: held-out images and two of their random views."""
        views = [v[:N_SHOWN].float().cpu() for v in self._held_out_views()[:2]]
        inputs = self.eval_inputs[:N_SHOWN].float().cpu()
        rows, captions = [], []
        for c, name in zip(range(inputs.shape[1]), self.channel_names, strict=True):
            rows += [inputs[:, c], views[0][:, c].clamp(0, 1), views[1][:, c].clamp(0, 1)]
            captions += [f"{name} input", f"{name} view 1", f"{name} view 2"]
        title = "held-out images and two random views of each"
        return {"eval/inputs_and_views": caption_grid(image_rows(rows), captions, title=title)}

    def trained_parameters(self) -> list[torch.Tensor]:
        """The optimiser's parameters plus what moves without gradients and every rank must keep identical
        too: the EMA codebook, DINO's teacher and centre."""
        quantiser = quantiser_of(self.model)
        buffers = list(quantiser.buffers()) if quantiser is not None else []
        if isinstance(self.model, DINO):
            buffers += [*self.model.teacher.parameters(), self.model.center]
        return super().trained_parameters() + buffers

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "channels": self.channels,
            "label_names": self.dataset.label_names,
            "normalise_levels": self.dataset.levels,  # data.normalise.mode dataset: new images need the same
        }
        quantiser = quantiser_of(self.model)
        if quantiser is not None and quantiser.generator is not None:
            state["codebook_generator"] = quantiser.generator.get_state()  # dead-code restarts draw from it
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.weights.changed()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        quantiser = quantiser_of(self.model)
        if "codebook_generator" in state and quantiser is not None and quantiser.generator is not None:
            quantiser.generator.set_state(state["codebook_generator"])

    # ------------------------------------------------------------------ final outputs
    def projector(self) -> dict[str, dict]:
        return self._projector

    def write_outputs(self, final_dir: Path, store) -> dict[str, float]:
        train = self.config["train"]
        group = store.group.require_group("embeddings")
        readouts = {
            split: write_embeddings(
                group,
                split,
                self.model,
                self.dataset,
                self.dataset.splits[split],
                train["embed_batch_size"],
                self.device,
            )
            for split in SPLITS
        }
        group.attrs.update(
            {
                "label_names": self.dataset.label_names,
                "family": self.family,
                "embedding_dim": self.model.embedding_dim,
                "feature_dim": self.model.feature_dim,
            }
        )
        for tag, image in self.image_grids().items():
            save_png(final_dir / f"{tag.split('/')[-1]}.png", image)
        metrics = self.evaluate()
        indices = np.concatenate([self.dataset.splits[s] for s in SPLITS])
        joined = {name: np.concatenate([readouts[s][name] for s in SPLITS]) for name in ("embedding", "features")}
        readable = ~np.isnan(joined["embedding"]).any(axis=1)
        indices, joined = indices[readable], {name: values[readable] for name, values in joined.items()}
        self._projector = self._projector_view(indices, joined["embedding"])
        labelled = np.array([self.dataset.labels[i] is not None for i in indices], dtype=bool)
        if labelled.sum() and len({self.dataset.labels[i] for i in indices[labelled]}) >= 2:
            report = self._evaluate(indices[labelled], {name: v[labelled] for name, v in joined.items()})
            (final_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
            metrics.update(flat_scores(report))
        return metrics

    def _subset(self, indices: np.ndarray, count: int, stream: int) -> np.ndarray:
        """A seeded subset of positions into `indices` (all of them when there are few)."""
        if len(indices) <= count:
            return np.arange(len(indices))
        rng = np.random.default_rng([self.config["seed"], stream])
        return np.sort(rng.choice(len(indices), count, replace=False))

    def _projector_view(self, indices: np.ndarray, embeddings: np.ndarray) -> dict[str, dict]:
        count = self.config["train"]["projector_images"]
        if count == 0 or len(indices) == 0:
            return {}
        chosen = self._subset(indices, count, 3)
        images, _ = self.dataset.load(indices[chosen], transformed=False)
        labels = [self.dataset.labels[i] or "" for i in indices[chosen]]
        return {
            "embedding": {
                "embeddings": torch.from_numpy(embeddings[chosen]),
                "labels": labels if any(labels) else None,
                "thumbnails": composite(images),
            }
        }

    def _evaluate(self, indices: np.ndarray, readouts: dict[str, np.ndarray]) -> dict:
        train = self.config["train"]
        labels = np.array([self.dataset.labels[i] for i in indices])
        chosen = self._stratified_subset(labels, train["eval_max_images"])
        indices, labels = indices[chosen], labels[chosen]
        readouts = {name: values[chosen] for name, values in readouts.items()}
        images = torch.cat([items for _, items in self.dataset.batches(indices, 256, transformed=False)])
        if self.shape is not None:
            from .shape import region_properties

            baseline = np.stack([region_properties(self.shape.mask(image)) for image in images])
            kind = "region"
        else:
            baseline, kind = images.numpy(), "pca"
        how = self.config["eval"]
        groups, times = self._eval_keys(indices)
        return evaluate_readouts(
            readouts, labels, baseline, kind, train["eval_folds"], self.config["seed"],
            split=how["split"], groups=groups, times=times, gap=how["gap"],
        )  # fmt: skip

    def _eval_keys(self, indices=None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The group and time of each image at `indices` (every labelled image by default) by the eval rules."""
        how, data = self.config["eval"], self.config["data"]
        if indices is None:
            indices = [i for i, label in enumerate(self.dataset.labels) if label is not None]
        csv = data.get("folder", {}).get("labels")
        named = data["source"] == "folder" and csv not in (None, "none", "folders")
        csv = resolve_path(csv, self.base_dir) if named else None
        collection = self.dataset.collection
        groups = image_keys(collection, indices, how["group_by"], "eval.group_by", csv)
        times = image_times(collection, indices, how["time_by"], "eval.time_by", csv)
        return groups, times

    def _stratified_subset(self, labels: np.ndarray, count: int) -> np.ndarray:
        if len(labels) <= count:
            return np.arange(len(labels))
        from sklearn.model_selection import train_test_split

        chosen, _ = train_test_split(
            np.arange(len(labels)), train_size=count, stratify=labels, random_state=self.config["seed"]
        )
        return np.sort(chosen)


def eval_problems(config: dict) -> list[tuple[tuple, str]]:
    """The eval section's rules checked against the data source, and a split that needs a rule it lacks."""
    how, data = config["eval"], config["data"]
    labels = data.get("folder", {}).get("labels", "none")
    problems = []
    for key in ("group_by", "time_by"):
        problem = rule_problem(how[key], f"eval.{key}", data["source"], labels)
        if problem:
            problems.append((("eval", key), problem))
    needs = {"grouped": "group_by", "temporal": "time_by"}.get(how["split"])
    if needs and how[needs] is None:
        problems.append((("eval", "split"), f"split: {how['split']} needs eval.{needs} (which images belong together)"))
    return problems
