"""Task kind `reconstruct`: HOLLy's method. Learn an unknown 3D point cloud and every image's pose at once.

A CNN predicts each image's rotation (6D), optional shift and optional blur; the learnable point cloud is
drawn at that pose by the differentiable Gaussian renderer; an image loss trains both, the network and the
points with separate learning rates. The blur follows a sigma curriculum: coarse images first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import missing, resolve_path
from ..io.mesh import read_obj_vertices, write_obj, write_ply
from ..runtime.captions import add_scale_bar, caption_grid
from ..runtime.distributed import DistInfo
from ..runtime.kinds import TaskKind, WeightsCache, evaluating, make_lr_scheduler, optimiser_step, wrap_ddp
from ..runtime.outputs import image_rows, save_png, to_unit_range
from .curriculum import sigma_at
from .geometry import principal_axes
from .losses import best_of_hypotheses
from .metrics import aligned_rotation_errors, rotation_error_summary, structure_error
from .posenet import PoseNet
from .render import render_images
from .simulate import BUILTIN_SHAPES, structure_problem
from .sources import make_source

N_SHOWN = 8  # images per row in the input-vs-render grids
VIEW_SIZE = 128  # pixels of each orthogonal view of the point cloud
BUILTIN_INITS = ("cube", "gaussian")  # model.init without an OBJ file (see initial_points)


def initial_points(model: dict, base_dir: Path, generator: torch.Generator) -> torch.Tensor:
    n, scale, init = model["num_points"], model["init_scale"], model["init"]
    if init == "cube":
        return (torch.rand(n, 3, generator=generator) * 2 - 1) * scale
    if init == "gaussian":
        return torch.randn(n, 3, generator=generator) * scale
    vertices = torch.from_numpy(read_obj_vertices(resolve_path(init, base_dir))).float()
    return vertices[torch.randint(len(vertices), (n,), generator=generator)] if len(vertices) != n else vertices


def _at(config_path: tuple, problem: str | None) -> list[tuple[tuple, str]]:
    return [(config_path, problem)] if problem else []


def _check_path(config_path: tuple, value: str, base_dir: Path, what: str) -> list[tuple[tuple, str]]:
    return _at(config_path, missing(resolve_path(value, base_dir), f"an existing {what}"))


def localisation_problems(cfg: dict, base_dir: Path) -> list[tuple[tuple, str]]:
    """validate's look at localisation files: each file's header (not its data) against the spec's format,
    columns and units; a problem points at the key that would fix it."""
    from ..io.localisations import LocalisationFormatError, expand_paths, inspect
    from .particles import read_options

    where = ("data", "localisations")
    try:
        options = read_options(cfg)
        paths = expand_paths(resolve_path(cfg["path"], base_dir))
    except ValueError as exc:  # a bad option, or a pattern that matches nothing
        key = getattr(exc, "key", None)
        return [((*where, *(key or "path").split(".")), str(exc))]
    problems = []
    for path in paths:
        if not path.is_file():
            problems += _check_path((*where, "path"), str(path), base_dir, "localisation table")
            continue
        try:
            inspect(path, options)
        except LocalisationFormatError as exc:
            problems.append(((*where, *(exc.key or "path").split(".")), str(exc)))
    return problems


class ReconstructModel(nn.Module):
    """The pose network and the learnable point cloud as one module, so DDP can wrap (and sync) both."""

    def __init__(self, net: PoseNet, points: torch.Tensor, image_size: int, loss: str, normalise: bool):
        super().__init__()
        self.net, self.points, self.image_size = net, nn.Parameter(points), image_size
        self.loss_kind, self.normalise = loss, normalise

    def forward(self, images: torch.Tensor, sigma: float):
        """-> (prediction with the best hypothesis as its rotations, its renders, the loss)."""
        pred = self.net(images)
        used = pred.sigma if pred.sigma is not None else sigma

        def render(rotations: torch.Tensor, k: int) -> torch.Tensor:
            s = used.repeat_interleave(k) if torch.is_tensor(used) else used
            t = None if pred.translations is None else pred.translations.repeat_interleave(k, dim=0)
            return render_images(self.points, rotations, s, self.image_size, t)

        loss, pred.rotations, rendered = best_of_hypotheses(
            pred.candidates, render, images, self.loss_kind, self.normalise
        )
        return pred, rendered, loss


class ReconstructTask(TaskKind):
    @classmethod
    def check_config(cls, config: dict, base_dir: Path) -> list[tuple[tuple, str]]:
        data, model = config["data"], config["model"]
        problems: list[tuple[tuple, str]] = []
        source = data["source"]
        if source == "simulate":
            expected = f"an existing OBJ file or a built-in shape ({', '.join(BUILTIN_SHAPES)})"
            problem = structure_problem(data["simulate"]["structure"], base_dir, BUILTIN_SHAPES, expected)
            problems += _at(("data", "simulate", "structure"), problem)
        elif source == "fits":
            fits = data["fits"]
            if bool(fits.get("folder")) == bool(fits.get("folders")):
                problems.append(
                    (
                        ("data", "fits"),
                        "expected exactly one of 'folder' (blurred on the fly) or 'folders' (one per sigma)",
                    )
                )
            folders = {("folder",): fits["folder"]} if fits.get("folder") else {}
            folders.update({("folders", sigma): f for sigma, f in (fits.get("folders") or {}).items()})
            for key, folder in folders.items():
                problems += _check_path(("data", "fits", *key), folder, base_dir, "folder of FITS images")
        elif source == "localisations":
            path = data["localisations"].get("path")
            if not path:
                problems.append((("data", "localisations"), "'path' is required with source: localisations"))
            else:
                problems += localisation_problems(data["localisations"], base_dir)
        expected = "an existing OBJ file, 'cube' or 'gaussian'"
        problems += _at(("model", "init"), structure_problem(model["init"], base_dir, BUILTIN_INITS, expected))
        return problems

    def __init__(self, config: dict, device: torch.device, base_dir: Path, dist: DistInfo | None = None):
        self.config, self.device, self.dist = config, device, dist or DistInfo()
        data, model, train = config["data"], config["model"], config["train"]
        self.source = make_source(data, config["seed"], device, base_dir)
        net = PoseNet(
            model["channels"],
            model["hidden"],
            data["max_translation"],
            max_sigma=model["max_sigma"] if model["predict_sigma"] else 0.0,
            hypotheses=model["hypotheses"],
        )
        g = torch.Generator().manual_seed(config["seed"])
        self.model = ReconstructModel(
            net, initial_points(model, base_dir, g), data["image_size"], train["loss"], train["normalise"]
        ).to(device)
        self.net, self.points = self.model.net, self.model.points
        # DDP averages the gradients of the network and the points across ranks.
        self.trained = wrap_ddp(self.model, self.dist, device)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.net.parameters(), "lr": train["lr"], "weight_decay": train["weight_decay"]},
                {"params": [self.points], "lr": train["points_lr"], "weight_decay": 0.0},
            ]
        )
        self.scheduler = make_lr_scheduler(self.optimizer, train)
        self.step_done = 0  # progress of the curriculum, restored with the checkpoint
        self.weights = WeightsCache()  # the held-out predictions, until the weights change

    # ------------------------------------------------------------------ training
    def sigma(self) -> float:
        return sigma_at(
            self.step_done / self.config["train"]["steps"],
            self.config["data"]["sigma"],
            self.config["data"]["sigma_end"],
        )

    def train_step(self, step: int) -> dict[str, torch.Tensor | float]:
        sigma = self.sigma()
        batch = self.dist.shard(self.source.train_batch(step, self.config["train"]["batch_size"], sigma))
        self.model.train()
        pred, _, loss = self.trained(batch["images"], sigma)
        lr, lr_points = optimiser_step(loss, self.optimizer, self.scheduler, weights=self.weights)
        self.step_done = step + 1
        # Tensors, not floats: the Trainer converts them only when it logs (no device sync every step).
        metrics = {"loss": loss.detach(), "sigma": sigma, "lr": lr, "lr_points": lr_points}
        if pred.sigma is not None:
            metrics["sigma_predicted"] = pred.sigma.detach().mean()
        return metrics

    # ------------------------------------------------------------------ evaluation
    def _eval(self):
        """(held-out batch, prediction, renders, loss), computed once per weights: evaluate, image_grids and
        write_outputs all ask for it at the same step."""
        return self.weights.get("eval", self._compute_eval)

    @torch.no_grad()
    def _compute_eval(self):
        sigma = self.sigma()
        batch = self.source.eval_batch(sigma)
        with evaluating(self.model):
            pred, rendered, loss = self.model(batch["images"], sigma)  # the unwrapped module: no collective ops
        return batch, pred, rendered, loss

    def evaluate(self) -> dict[str, float]:
        batch, pred, _, loss = self._eval()
        metrics = {"eval_loss": loss.item()}
        truth = self.source.ground_truth
        if truth is not None:
            metrics["structure_error"] = structure_error(self.points.detach(), truth.points)
            errors = aligned_rotation_errors(pred.rotations, batch["rotations"], truth.symmetry)
            metrics.update(rotation_error_summary(errors))
        return metrics

    def image_grids(self) -> dict[str, torch.Tensor]:
        batch, _, rendered, _ = self._eval()
        inputs = batch["images"][:N_SHOWN]
        grid = image_rows([to_unit_range(inputs), to_unit_range(rendered[:N_SHOWN])])
        title = f"held-out images (sigma {self.sigma():.2g} px)"
        return {
            "eval/inputs_vs_renders": caption_grid(grid, ["input", "render"], title=title),
            "structure/views": self.orthogonal_views(),
        }

    def point_clouds(self) -> dict[str, torch.Tensor]:
        return {"structure/points": self.points.detach().cpu()}

    def orthogonal_views(self) -> torch.Tensor:
        """The point cloud seen along its three principal axes (least spread first: a ring is seen face-on),
        side by side at a 1-pixel blur, labelled, with a scale bar in nm (or in input pixels)."""
        points = self.points.detach()
        axes = principal_axes(points)  # rows: most, middle, least spread
        first, second, third = axes[0], axes[1], axes[2]
        # Each view: its rows are the screen's right, up and the viewing direction (a rotation, det +1).
        views = [
            torch.stack((first, second, third)),
            torch.stack((first, third, -second)),
            torch.stack((second, third, first)),
        ]
        with torch.no_grad():
            rendered = render_images(points - points.mean(0), torch.stack(views).to(points), 1.0, VIEW_SIZE)
        labels = ["along axis 3 (least spread)", "along axis 2", "along axis 1 (most spread)"]
        grid = caption_grid(image_rows([to_unit_range(rendered)]), col_labels=labels)
        if self.source.nm_per_unit is not None:
            return add_scale_bar(grid, 2 * self.source.nm_per_unit / VIEW_SIZE, "nm", at=(2, VIEW_SIZE))
        return add_scale_bar(grid, self.config["data"]["image_size"] / VIEW_SIZE, "px", at=(2, VIEW_SIZE))

    # ------------------------------------------------------------------ state and outputs
    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "points": self.points.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step_done": self.step_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        with torch.no_grad():
            self.points.copy_(state["points"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_done = state["step_done"]
        self.weights.changed()

    def on_checkpoint(self, step: int, store) -> None:
        """Keep the point cloud of every checkpoint in outputs.zarr (slot = checkpoint number)."""
        every, steps = self.config["train"]["checkpoint_every"], self.config["train"]["steps"]
        slots = -(-steps // every)
        slot = min(-(-step // every), slots) - 1
        store.write_slot("structure/points_by_checkpoint", slot, slots, self.points.detach().cpu().numpy())
        store.write_slot("structure/checkpoint_steps", slot, slots, step)

    def write_outputs(self, final_dir: Path, store) -> dict[str, float]:
        batch, pred, _, _ = self._eval()
        points = self.points.detach().cpu().numpy()
        store.write_array("structure/points", points)
        store.write_array("eval/rotations_pred", pred.rotations.cpu().numpy())
        if pred.translations is not None:
            store.write_array("eval/translations_pred", pred.translations.cpu().numpy())
        if pred.sigma is not None:
            store.write_array("eval/sigma_pred", pred.sigma.cpu().numpy())
        if self.source.ground_truth is not None:
            store.write_array("structure/ground_truth", self.source.ground_truth.points.numpy())
            store.write_array("eval/rotations_true", batch["rotations"].cpu().numpy())
        nm_per_unit = self.source.nm_per_unit
        if nm_per_unit is not None:  # the input was in nm: so is the structure
            store.write_array("structure/points_nm", points * nm_per_unit)
            write_ply(final_dir / "structure.ply", points * nm_per_unit, units="nm")
            write_obj(final_dir / "structure.obj", points * nm_per_unit, units="nm")
        else:
            write_ply(final_dir / "structure.ply", points, units="image frame (the image spans -1 to 1)")
            write_obj(final_dir / "structure.obj", points, units="image frame (the image spans -1 to 1)")
        grids = self.image_grids()
        save_png(final_dir / "renders.png", grids["eval/inputs_vs_renders"], scale=3)
        save_png(final_dir / "views.png", grids["structure/views"], scale=2)
        metrics = self.evaluate()
        if nm_per_unit is not None:
            metrics["nm_per_unit"] = float(nm_per_unit)
        return metrics

    def data_report(self) -> list[str]:
        return list(self.source.report_lines)

    def write_data_files(self, folder: Path) -> list[Path]:
        return self.source.write_report(folder)
