"""Task kind `generate`: an InfoGAN that learns to generate cell images and discovers interpretable factors
as latent codes. Reads images exactly as the embed kind does (folders, zarr, OME-Zarr, generated cells).

Each step: one discriminator update (real vs generated, plus the information loss so the Q head learns to
read the codes), then one generator update (fool D, plus the information loss so the codes show in the
image). Codes and noise come from the step's own generator, real images from the seeded epoch order, so a
resumed run continues exactly. Under DDP each rank reads its share of the batch and gradients are averaged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..embed.data import (
    EmbedDataset,
    augment,
    data_problems,
    make_collection,
    step_generator,
)
from ..runtime.captions import caption_grid, channel_legend
from ..runtime.distributed import DistInfo
from ..runtime.kinds import TaskKind, WeightsCache, evaluating, make_lr_scheduler, optimiser_step
from .metrics import cluster_accuracy, mean_pairwise_distance
from .models import (
    VALID_SIZES,
    CodeSpec,
    Discriminator,
    Generator,
    code_cross_entropies,
    discriminator_loss,
    generator_loss,
    info_loss,
    mi_estimates,
)
from .traversal import sample_grid, traversal_frames, traversal_grid, write_gif

CODES_STREAM, FIXED_STREAM, NOISE_STREAM = 4, 5, 6  # step_generator streams (1 and 2 are the data's)


def build_generator(config: dict, channels: int) -> tuple[Generator, CodeSpec]:
    model = config["model"]
    codes = CodeSpec(model["noise_dim"], model["categorical"], model["continuous"])
    return Generator(codes.dim, channels, config["data"]["image_size"], model["generator_width"]), codes


class GenerateTask(TaskKind):
    @classmethod
    def check_config(cls, config: dict, base_dir: Path) -> list[tuple[tuple, str]]:
        problems = data_problems(config["data"], base_dir)
        if config["data"]["image_size"] not in VALID_SIZES:
            sizes = ", ".join(map(str, VALID_SIZES))
            problems.append(
                (
                    ("data", "image_size"),
                    f"the generator grows images from a 4–7 pixel seed by doubling: use one of {sizes}",
                )
            )
        model = config["model"]
        if not model["categorical"] and model["continuous"] == 0:
            problems.append((("model",), "InfoGAN needs at least one code: model.categorical or model.continuous"))
        return problems

    def __init__(self, config: dict, device: torch.device, base_dir: Path, dist: DistInfo | None = None):
        self.config, self.device, self.dist = config, device, dist or DistInfo()
        data, model, train = config["data"], config["model"], config["train"]
        self.dataset = EmbedDataset(make_collection(data, config["seed"], base_dir), data, config["seed"])
        self.channels = self.dataset.collection.channels
        self.channel_names = self.dataset.collection.channel_names  # the colour legend of the sample grids
        self.generator, self.codes = build_generator(config, self.channels)
        self.generator.to(device)
        self.discriminator = Discriminator(
            self.codes, self.channels, data["image_size"], model["discriminator_width"], model["q_hidden"]
        ).to(device)
        betas = tuple(train["betas"])
        self.opt_g = torch.optim.AdamW(
            self.generator.parameters(), lr=train["lr"], betas=betas, weight_decay=train["weight_decay"]
        )
        self.opt_d = torch.optim.AdamW(
            self.discriminator.parameters(),
            lr=train["lr_discriminator"],
            betas=betas,
            weight_decay=train["weight_decay"],
        )
        self.sched_g, self.sched_d = make_lr_scheduler(self.opt_g, train), make_lr_scheduler(self.opt_d, train)
        held_out = self.dataset.splits["val"] if len(self.dataset.splits["val"]) else self.dataset.splits["train"]
        self.real_eval, self.real_eval_indices = self.dataset.load(held_out[: data["eval_size"]])
        self.real_eval = self.real_eval.to(device)
        self.fixed = self._codes(train["samples"], FIXED_STREAM, 0)  # the same latents at every log
        self._real_diversity = mean_pairwise_distance(self.real_eval)
        self._warned_collapse = False
        self._steps_done = 0
        self.weights = WeightsCache()  # the fixed latents' samples, until the weights change

    # ------------------------------------------------------------------ training
    def _codes(self, batch: int, stream: int, step: int) -> dict[str, torch.Tensor]:
        codes = self.codes.sample(batch, step_generator(self.config["seed"], stream, step))
        return {k: v.to(self.device) for k, v in codes.items()}

    def train_step(self, step: int) -> dict[str, Any]:
        train, model = self.config["train"], self.config["model"]
        self._steps_done = step + 1
        # Each rank its share of the images and of the latents.
        indices = self.dist.rows(self.dataset.train_indices(step, train["batch_size"]))
        codes = self.dist.shard(self._codes(train["batch_size"], CODES_STREAM, step))
        real, _ = self.dataset.load(indices)
        aug = self.config["data"]["augment"]
        real = augment(
            real.to(self.device),
            step_generator(self.config["seed"], 2, step),
            aug["flips"],
            aug["rot90"],
            aug["intensity_jitter"],
        )
        self.generator.train()
        self.discriminator.train()
        latent = self.codes.latent(codes)
        lam_cat, lam_cont, loss_kind = model["lambda_categorical"], model["lambda_continuous"], model["loss"]

        # Instance noise on everything the discriminator sees: a code hidden in faint pixel patterns would
        # drown in it, so the generator has to express the codes in the visible structure of the cell.
        noise_std = train["instance_noise"]
        noise = step_generator(self.config["seed"], NOISE_STREAM, step)
        jitter = (
            (lambda x: x + noise_std * torch.randn(x.shape, generator=noise).to(x)) if noise_std > 0 else (lambda x: x)
        )

        # Discriminator (and Q): real vs generated, and read the codes back from the generated images.
        fake = self.generator(latent).detach()
        real_logits, _ = self.discriminator(jitter(real))
        fake_logits, q = self.discriminator(jitter(fake))
        ce_d = code_cross_entropies(q, codes, self.codes)
        loss_d = discriminator_loss(real_logits, fake_logits, loss_kind) + info_loss(ce_d, lam_cat, lam_cont)
        # DDP's hooks do not allow D's several forwards before one backward: the gradients are averaged here.
        optimiser_step(loss_d, self.opt_d, self.sched_d, lambda: self.dist.average_gradients(self.discriminator))

        # Generator: fool D, and make the codes readable.
        fake_logits, q = self.discriminator(jitter(self.generator(latent)))
        ce_g = code_cross_entropies(q, codes, self.codes)
        adversarial = generator_loss(fake_logits, loss_kind)
        loss_g = adversarial + info_loss(ce_g, lam_cat, lam_cont)
        (lr,) = optimiser_step(
            loss_g, self.opt_g, self.sched_g, lambda: self.dist.average_gradients(self.generator), self.weights
        )
        metrics: dict[str, Any] = {
            "loss": (loss_d + loss_g).detach(),
            "loss_d": loss_d.detach(),
            "loss_g_adversarial": adversarial.detach(),
            "lr": lr,
        }
        metrics.update({f"train_ce_{k}": v.detach() for k, v in ce_g.items()})
        return metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _generate(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        with evaluating(self.generator):
            return self.generator(self.codes.latent(codes))

    @torch.no_grad()
    def _q(self, images: torch.Tensor) -> dict:
        with evaluating(self.discriminator):
            _, q = self.discriminator(images)
        return q

    def _fixed_samples(self) -> torch.Tensor:
        """The generator's images of the fixed latents, once per weights version (evaluate, the grids and
        the final outputs all show them)."""
        return self.weights.get("samples", lambda: self._generate(self.fixed))

    def evaluate(self) -> dict[str, float]:
        samples = self._fixed_samples()
        cross_entropies = code_cross_entropies(self._q(samples), self.fixed, self.codes)
        metrics = {f"mi_{name}": value for name, value in mi_estimates(cross_entropies, self.codes).items()}
        metrics.update({f"mi_{name}_max": value for name, value in self.codes.entropies().items()})
        diversity = mean_pairwise_distance(samples)
        metrics["sample_diversity"] = diversity
        metrics["diversity_ratio"] = diversity / max(self._real_diversity, 1e-12)
        settled = self._steps_done >= 0.1 * self.config["train"]["steps"]  # early samples are alike anyway
        if (
            settled
            and metrics["diversity_ratio"] < self.config["train"]["collapse_warning"]
            and not self._warned_collapse
        ):
            self._warned_collapse = True  # once per run; the scalar stays in TensorBoard and zarr
            print(
                f"warning: possible mode collapse: generated images are {metrics['diversity_ratio']:.2f}x as "
                f"diverse as real ones (mean pairwise distance {diversity:.3g} vs {self._real_diversity:.3g})",
                file=sys.stderr,
                flush=True,
            )
        if self.codes.categorical and self.dataset.label_names:
            labels = [self.dataset.labels[i] for i in self.real_eval_indices]
            if all(label is not None for label in labels):
                predicted = self._q(self.real_eval)["cat_logits"][0].argmax(1).cpu().numpy()
                metrics["cluster_accuracy"] = cluster_accuracy(predicted, labels)
        return metrics

    def image_grids(self) -> dict[str, torch.Tensor]:
        grids = {"samples": self._samples_picture(self._fixed_samples()[:32])}
        for name in self.codes.names():
            grids[f"traversal/{name}"] = traversal_grid(self._traversal(name))
        return grids

    def _samples_picture(self, samples: torch.Tensor) -> torch.Tensor:
        """A grid of samples titled with which colour shows which channel."""
        return caption_grid(sample_grid(samples, columns=8), title=channel_legend(self.channel_names))

    def _traversal(self, name: str) -> torch.Tensor:
        """(rows, values, C, H, W): each row one fixed latent, each column one value of code `name`."""
        train = self.config["train"]
        rows = {k: v[: train["traversal_rows"]] for k, v in self.fixed.items()}
        return torch.stack(
            [
                self._generate(codes)
                for codes in traversal_frames(
                    rows, name, self.codes, train["traversal_steps"], train["traversal_range"]
                )
            ],
            1,
        )

    # ------------------------------------------------------------------ checkpoints and outputs
    def trained_parameters(self) -> list[torch.Tensor]:
        return [*self.generator.parameters(), *self.discriminator.parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
            "channels": self.channels,
            "channel_names": self.channel_names,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.weights.changed()
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])

    def write_outputs(self, final_dir: Path, store) -> dict[str, float]:
        from ..runtime.outputs import save_png

        folder = final_dir / "traversals"
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.codes.names():
            grid = self._traversal(name)
            save_png(folder / f"{name}.png", traversal_grid(grid), scale=2)
            if name.startswith("cont"):
                write_gif(folder / f"{name}.gif", grid)
        samples = self._fixed_samples()
        save_png(final_dir / "samples.png", self._samples_picture(samples), scale=2)
        store.write_array("samples/images", samples.cpu().numpy().astype(np.float32))
        for key, value in self.fixed.items():
            store.write_array(f"samples/{key}", value.cpu().numpy())
        torch.save(
            {
                "generator": self.generator.state_dict(),
                "config": self.config,
                "channels": self.channels,
                "channel_names": self.channel_names,
            },
            final_dir / "generator.pt",
        )
        metrics = self.evaluate()
        if self.codes.categorical and self.dataset.label_names:
            metrics.update(self.cluster_accuracy_all())
        return metrics

    def cluster_accuracy_all(self) -> dict[str, float]:
        """Q's first categorical code as a clustering of every labelled image (up to eval_max_images)."""
        labelled = np.array([i for i in range(len(self.dataset.labels)) if self.dataset.labels[i] is not None])
        limit = self.config["train"]["eval_max_images"]
        if len(labelled) > limit:
            labelled = np.sort(np.random.default_rng([self.config["seed"], 6]).choice(labelled, limit, replace=False))
        predicted, labels = [], []
        for kept, images in self.dataset.batches(labelled, 256):
            predicted.append(self._q(images.to(self.device))["cat_logits"][0].argmax(1).cpu().numpy())
            labels += [self.dataset.labels[i] for i in kept]
        predicted = np.concatenate(predicted)
        classes = len(set(labels))
        return {
            "cluster_accuracy_all": cluster_accuracy(predicted, labels),
            "cluster_chance": 1 / classes,
            "cluster_images": float(len(labels)),
        }
