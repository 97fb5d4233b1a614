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
from ..runtime.distributed import DistInfo, all_sum
from ..runtime.kinds import TaskKind, WeightsCache, evaluating, make_lr_scheduler, optimiser_step, wrap_ddp
from ..runtime.outputs import image_rows, save_png, to_unit_range
from .curriculum import sigma_at
from .geometry import axial_error_deg, principal_axes
from .initial import init_from_problem, init_report, load_init, poisson_disc_points, take_matching
from .likelihood import localisation_nll
from .losses import best_of_hypotheses
from .metrics import aligned_rotation_fit, rotation_error_summary, self_mirror, structure_error
from .posenet import PoseNet
from .refine import BOUND, Particles, Refinement, RefineOptions, bound_penalty, reset_rows
from .render import frame_pixels, render_images
from .schedules import PlateauSchedule
from .simulate import BUILTIN_SHAPES, structure_problem
from .sources import make_source
from .symmetry import detect_symmetry, expand, group_rotations, symmetric_rotation_errors

N_SHOWN = 8  # images per row in the input-vs-render grids
VIEW_SIZE = 128  # pixels of each orthogonal view of the point cloud
BUILTIN_INITS = ("cube", "gaussian", "poisson")  # model.init without an OBJ file (see initial_points)


def initial_points(model: dict, base_dir: Path, generator: torch.Generator) -> torch.Tensor:
    n, scale, init = model["num_points"], model["init_scale"], model["init"]
    if init == "cube":
        return (torch.rand(n, 3, generator=generator) * 2 - 1) * scale
    if init == "gaussian":
        return torch.randn(n, 3, generator=generator) * scale
    if init == "poisson":
        return poisson_disc_points(n, scale, generator)
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


def loss_kind(config: dict) -> str:
    """train.loss, with auto resolved: the likelihood for localisation sources, the L2 image loss otherwise."""
    loss = config["train"]["loss"]
    if loss == "auto":
        return "likelihood" if config["data"]["source"] == "localisations" else "l2"
    return loss


def method_problems(config: dict, base_dir: Path) -> list[tuple[tuple, str]]:
    """The method's options against the data: what needs localisations, the symmetry's point count."""
    data, model, train = config["data"], config["model"], config["train"]
    problems: list[tuple[tuple, str]] = []
    group = len(group_rotations(model["symmetry"]))
    if model["num_points"] % group:
        problems.append(
            (
                ("model", "num_points"),
                f"{model['num_points']} points cannot be split into the {group} copies of symmetry "
                f"{model['symmetry']}: use a multiple of {group}",
            )
        )
    localisations = data["source"] == "localisations"
    if train["loss"] == "likelihood" and not localisations:
        problems.append((("train", "loss"), "likelihood scores localisations: it needs data.source: localisations"))
    refine = train["refine"]
    if refine["start"] not in ("auto", "off") and not localisations:
        problems.append((("train", "refine", "start"), "per-particle refinement needs data.source: localisations"))
    options = RefineOptions.from_config(config) if localisations else None
    if options is not None and options.init == "cnn" and options.start == 0:
        problems.append((("train", "refine", "init"), "init: cnn needs a CNN phase first: set refine.start > 0"))
    truth = (data.get("localisations") or {}).get("truth") or {}
    for key in ("sites", "poses"):
        if truth.get(key):
            problems += _check_path(("data", "localisations", "truth", key), truth[key], base_dir, "CSV file")
    return problems


class ReconstructModel(nn.Module):
    """The pose network and the learnable point cloud as one module, so DDP can wrap (and sync) both.

    `points` is the asymmetric unit: the structure is expand(points, symmetry) (the unit itself for none)."""

    def __init__(
        self, net: PoseNet, points: torch.Tensor, image_size, loss: str, normalise: bool, symmetry: str = "none"
    ):
        super().__init__()
        self.net, self.points, self.image_size = net, nn.Parameter(points), image_size
        self.loss_kind, self.normalise, self.symmetry = loss, normalise, symmetry

    def structure(self) -> torch.Tensor:
        return expand(self.points, self.symmetry)

    def forward(self, images: torch.Tensor, sigma: float, batch: dict | None = None):
        """-> (prediction with the best hypothesis as its rotations, its renders, the loss)."""
        pred = self.net(images)
        used = pred.sigma if pred.sigma is not None else sigma
        points = self.structure()

        def render(rotations: torch.Tensor, k: int) -> torch.Tensor:
            s = used.repeat_interleave(k) if torch.is_tensor(used) else used
            t = None if pred.translations is None else pred.translations.repeat_interleave(k, dim=0)
            return render_images(points, rotations, s, self.image_size, t)

        if self.loss_kind == "likelihood":
            loss, pred.rotations = self._likelihood(pred, points, sigma, batch)
            rendered = render(pred.rotations, 1)
        else:
            loss, pred.rotations, rendered = best_of_hypotheses(
                pred.candidates, render, images, self.loss_kind, self.normalise
            )
        return pred, rendered, loss + bound_penalty(self.points)

    def _likelihood(self, pred, points: torch.Tensor, sigma: float, batch: dict):
        """The localisation NLL of each hypothesis; the best one per image is trained (as best_of_hypotheses)."""
        b, k = pred.candidates.shape[:2]

        def repeat(t):
            return None if t is None else t.repeat_interleave(k, dim=0)

        nll = localisation_nll(
            points,
            pred.candidates.reshape(b * k, 3, 3),
            repeat(pred.translations),
            repeat(batch["locs"]),
            repeat(batch["mask"]),
            sigma * 2 / frame_pixels(self.image_size),
            repeat(batch.get("precision")),
        ).reshape(b, k)
        choice = nll.detach().argmin(dim=1)
        rows = torch.arange(b, device=nll.device)
        return nll[rows, choice].mean(), pred.candidates[rows, choice]


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
            if not isinstance(data["image_size"], int):  # particles are round: the refinement's grids are square
                problems.append((("data", "image_size"), "source localisations renders square images: give one number"))
            path = data["localisations"].get("path")
            if not path:
                problems.append((("data", "localisations"), "'path' is required with source: localisations"))
            else:
                problems += localisation_problems(data["localisations"], base_dir)
        expected = "an existing OBJ file, 'cube', 'gaussian' or 'poisson'"
        problems += _at(("model", "init"), structure_problem(model["init"], base_dir, BUILTIN_INITS, expected))
        problems += _at(("model", "init_from"), init_from_problem(model.get("init_from"), base_dir))
        return problems + method_problems(config, base_dir)

    def __init__(self, config: dict, device: torch.device, base_dir: Path, dist: DistInfo | None = None):
        self.config, self.device, self.dist = config, device, dist or DistInfo()
        data, model, train = config["data"], config["model"], config["train"]
        self.source = make_source(data, config["seed"], device, base_dir)
        truth = self.source.ground_truth  # its mirror, if any: the image-equivalent pose (_rotation_metrics)
        self._truth_mirror = self_mirror(truth.points) if truth is not None and truth.symmetry == "none" else None
        sites = getattr(getattr(self.source, "truth", None), "sites", None)  # a simulated table's truth
        self._sites_mirror = None if sites is None else self_mirror(sites)  # pores with rings in register have one
        self.symmetry = model["symmetry"]
        net = PoseNet(
            model["channels"],
            model["hidden"],
            data["max_translation"],
            max_sigma=model["max_sigma"] if model["predict_sigma"] else 0.0,
            hypotheses=model["hypotheses"],
        )
        g = torch.Generator().manual_seed(config["seed"])
        unit_size = model["num_points"] // len(group_rotations(self.symmetry))
        # model.init_from: another run's points (and its pose network's weights where they fit) instead.
        self.init_state = load_init(model["init_from"], base_dir) if model.get("init_from") else None
        if self.init_state is not None:
            points = self.init_state.points_for(unit_size, g)
        else:
            points = initial_points({**model, "num_points": unit_size}, base_dir, g)
        self.model = ReconstructModel(
            net,
            points,
            data["image_size"],
            loss_kind(config),
            train["normalise"],
            self.symmetry,
        ).to(device)
        self.net, self.points = self.model.net, self.model.points
        self.init_lines: list[str] = []
        if self.init_state is not None:  # before wrap_ddp, on every rank alike
            taken, skipped = take_matching(self.net, self.init_state.net_state)
            self.init_lines = init_report(self.init_state, unit_size, taken, skipped)
        # DDP averages the gradients of the network and the points across ranks.
        self.trained = wrap_ddp(self.model, self.dist, device)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.net.parameters(), "lr": train["lr"], "weight_decay": train["weight_decay"]},
                {"params": [self.points], "lr": train["points_lr"], "weight_decay": 0.0},
            ]
        )
        self.scheduler = make_lr_scheduler(self.optimizer, train)
        self.plateau: PlateauSchedule | None = None  # train.points_lr_schedule: plateau (the points' group, 1)
        if train.get("points_lr_schedule", "constant") == "plateau":
            p = train["plateau"]
            self.plateau = PlateauSchedule(
                self.optimizer,
                1,
                p["patience"],
                p["factor"],
                p["min_lr"],
                p["check_every"],
                scheduler=self.scheduler,
                reduce=self._mean_over_ranks if self.dist.active else None,
            )
        self.step_done = 0  # progress of the curriculum, restored with the checkpoint
        self.weights = WeightsCache()  # the held-out predictions, until the weights change
        self.respawned = 0
        # Per-particle refinement (localisation sources): built when its phase begins.
        self.refine_options = RefineOptions.from_config(config) if data["source"] == "localisations" else None
        self.refinement: Refinement | None = None
        self.refine_optimizer: torch.optim.Optimizer | None = None
        if self.refine_options is not None:
            o, steps = self.refine_options, train["steps"]
            self.cnn_end = round(o.start * steps)
            self.search_end = self.cnn_end + (round(o.search * (steps - self.cnn_end)) if o.init == "grid" else 0)
            src = self.source
            self.particles = Particles.from_source(src.points, src.weights, src.precision, data["image_size"])

    # ------------------------------------------------------------------ training
    def sigma(self) -> float:
        return sigma_at(
            self.step_done / self.config["train"]["steps"],
            self.config["data"]["sigma"],
            self.config["data"]["sigma_end"],
        )

    def in_refinement(self, step: int) -> bool:
        return self.refine_options is not None and step >= self.cnn_end

    def train_step(self, step: int) -> dict[str, torch.Tensor | float]:
        if self.in_refinement(step):
            return self._refine_step(step)
        sigma = self.sigma()
        batch = self.dist.shard(self.source.train_batch(step, self.config["train"]["batch_size"], sigma))
        self.model.train()
        pred, _, loss = self.trained(batch["images"], sigma, batch)
        lr, lr_points = optimiser_step(loss, self.optimizer, self.scheduler, weights=self.weights)
        if self.plateau is not None:  # after the shared schedule's step; reads the loss every check_every steps
            self.plateau.step(loss.detach())
        self.step_done = step + 1
        every = self.config["train"]["respawn_every"]
        if every and self.step_done % every == 0:
            self._respawn_strays()
        # Tensors, not floats: the Trainer converts them only when it logs (no device sync every step).
        metrics = {"loss": loss.detach(), "sigma": sigma, "lr": lr, "lr_points": lr_points}
        if self.plateau is not None:
            metrics["points_lr_scale"] = self.plateau.scale
        if getattr(self.source, "dataset_size", 0):
            metrics["epoch"] = self.source.epoch(step + 1, self.config["train"]["batch_size"])
        if pred.sigma is not None:
            metrics["sigma_predicted"] = pred.sigma.detach().mean()
        return metrics

    def _mean_over_ranks(self, total: torch.Tensor) -> torch.Tensor:
        """The plateau's window sum averaged over the ranks (each saw its own shard), so all drop together."""
        return all_sum(total.to(self.dist.device)) / self.dist.world

    @torch.no_grad()
    def _respawn_strays(self) -> None:
        """Points outside the image frame get almost no gradient and stay there: move them next to random
        points inside (deterministic for the seed and step), with their optimiser state reset."""
        points = self.points
        stray = points.norm(dim=-1) > 1.0
        inside = (~stray).nonzero()[:, 0]
        if not bool(stray.any()) or len(inside) == 0:
            return
        g = torch.Generator().manual_seed(self.config["seed"] * 7919 + self.step_done)
        donors = inside[torch.randint(len(inside), (int(stray.sum()),), generator=g).to(inside.device)]
        jitter = torch.randn(len(donors), 3, generator=g).to(points) * (
            2.0 / frame_pixels(self.config["data"]["image_size"])
        )
        points[stray] = (points[donors] + jitter).clamp(-BOUND, BOUND)
        reset_rows(self.optimizer, points, stray)
        self.respawned += int(stray.sum())
        self.weights.changed()

    def _refine_step(self, step: int) -> dict[str, torch.Tensor | float]:
        o, size = self.refine_options, self.config["data"]["image_size"]
        sigma = self.sigma()
        if self.refinement is None:
            self._begin_refinement(step, sigma)
        searching = step < self.search_end
        if not searching and not self.refinement.posed:
            self._end_search(sigma)
        elif not searching and o.regrid_every and step > self.search_end and step % o.regrid_every == 0:
            self.refinement.search_poses(self.particles, sigma, size, only_better=True)
        kind = "likelihood" if searching else loss_kind(self.config)
        loss = self.refinement.loss(self.particles, sigma, size, kind, searching)
        optimiser_step(loss, self.refine_optimizer, weights=self.weights)
        self.step_done = step + 1
        if self.config["train"]["respawn_every"] and self.step_done % self.config["train"]["respawn_every"] == 0:
            self.respawned += self.refinement.respawn(self.particles, sigma, size, step, self.refine_optimizer)
        return {"loss": loss.detach(), "sigma": sigma, "phase": 1.0 if searching else 2.0}

    def _begin_refinement(self, step: int, sigma: float) -> None:
        """The refinement takes over: its structures start from the CNN phase's (or the initial points); a
        grid search runs in C1 and is symmetrised when it ends, init cnn keeps the symmetric unit."""
        o = self.refine_options
        searching = step < self.search_end
        symmetry = "none" if searching else self.symmetry
        unit = self.model.structure() if searching else self.points
        self.refinement = Refinement(o, unit.detach(), len(self.particles.locs), symmetry, self.config["seed"]).to(
            self.device
        )
        if o.init == "cnn":
            rotations, shifts = self._cnn_poses(sigma)
            self.refinement.set_poses(rotations, shifts)
            self.refinement.posed = True
        self.refine_optimizer = torch.optim.Adam(self.refinement.parameter_groups())

    @torch.no_grad()
    def _cnn_poses(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The CNN's best hypothesis for every particle, each seen as it is (no spin)."""
        n = len(self.particles.locs)
        idx = torch.arange(n)
        batch = self.source._batch(idx, torch.zeros(n), sigma)
        with evaluating(self.model):
            pred, _, _ = self.model(batch["images"], sigma, batch)
        return pred.rotations, pred.translations

    def _end_search(self, sigma: float) -> None:
        """Each particle takes its most likely grid rotation; with a symmetry, the free structures found are
        folded into asymmetric units (what cryo-EM tools do after an ab-initio run in C1)."""
        size = self.config["data"]["image_size"]
        self.refinement.search_poses(self.particles, sigma, size, only_better=False)
        if self.refinement.symmetry != self.symmetry:
            self.refinement.symmetrise(self.symmetry, self.points.shape[0])
        self.refinement.posed = True
        self.refine_optimizer = torch.optim.Adam(self.refinement.parameter_groups())

    # ------------------------------------------------------------------ the structure now
    def structure(self, split: int = 0) -> torch.Tensor:
        """The current structure (image-frame units): the refinement's (split 0: all particles) once it runs."""
        if self.refinement is not None:
            return self.refinement.points(split).detach()
        return self.model.structure().detach()

    # ------------------------------------------------------------------ evaluation
    def _eval(self):
        """(held-out batch, prediction, renders, loss), computed once per weights: evaluate, image_grids and
        write_outputs all ask for it at the same step."""
        return self.weights.get("eval", self._compute_eval)

    @torch.no_grad()
    def _compute_eval(self):
        sigma = self.sigma()
        batch = self.source.eval_batch(sigma)
        if self.refinement is not None:  # the refined poses of the held-out particles, drawn as they are
            size = self.config["data"]["image_size"]
            idx = torch.arange(self.source.n_train, self.source.n_train + self.source.n_eval)
            plain = self.source._batch(idx, torch.zeros(len(idx)), sigma)
            rendered = self.refinement.render(0, sigma, size)[idx.to(self.device)]
            nll = self.refinement.nll(0, self.particles, sigma, size)
            return plain, None, rendered, nll.mean()
        with evaluating(self.model):
            pred, rendered, loss = self.model(batch["images"], sigma, batch)  # the unwrapped module: no collectives
        return batch, pred, rendered, loss

    def evaluate(self) -> dict[str, float]:
        batch, pred, _, loss = self._eval()
        metrics = {("nll_per_localisation" if self.refinement is not None else "eval_loss"): loss.item()}
        structure = self.structure()
        truth = self.source.ground_truth
        if truth is not None:
            metrics["structure_error"] = structure_error(structure, truth.points)
            metrics.update(self._rotation_metrics(pred.rotations, batch["rotations"]))
        metrics.update(self._quality(structure))
        if self.respawned:
            metrics["points_respawned"] = float(self.respawned)
        return metrics

    def _rotation_metrics(self, predicted: torch.Tensor, true: torch.Tensor, prefix: str = "") -> dict[str, float]:
        """Rotation errors after the global alignment; where the true structure has a mirror plane (a teapot),
        modulo the pose each image cannot tell from its own (metrics.self_mirror), with the share of images
        in it and the strict median beside."""
        truth = self.source.ground_truth
        errors, flipped = aligned_rotation_fit(predicted, true, truth.symmetry, self._truth_mirror)
        metrics = rotation_error_summary(errors)
        if self._truth_mirror is not None:
            strict, _ = aligned_rotation_fit(predicted, true, truth.symmetry)
            metrics["rot_flipped_share"] = float(flipped.double().mean())
            metrics["rot_err_strict_median_deg"] = float(strict.double().median())
        return {prefix + key: value for key, value in metrics.items()}

    def _quality(self, structure: torch.Tensor) -> dict[str, float]:
        """Measures that need no ground truth (detected symmetry, ring geometry in nm), and the errors against
        a simulated table's truth where the spec names it."""
        from .rings import ring_geometry

        scale = self.source.nm_per_unit or 1.0
        detected = detect_symmetry(structure.double().cpu() * scale, axis=self.imposed_axis())
        metrics = {k: float(v) for k, v in detected.as_metrics().items()}
        metrics.update(
            ring_geometry(
                structure.double().cpu() * scale, detected.axis, suffix="_nm" if self.source.nm_per_unit else ""
            )
        )
        truth = getattr(self.source, "truth", None)
        if truth is not None:
            metrics["structure_error"] = structure_error(structure, truth.sites.to(structure))
            if truth.rotations is not None and self.refinement is not None and self.refinement.posed:
                rotations = self.refinement.rotations(0).detach().cpu()
                errors = symmetric_rotation_errors(
                    rotations, truth.rotations, truth.symmetry, mirror=self._sites_mirror
                )
                metrics.update(rotation_error_summary(errors))
                if truth.symmetry != "none":  # the axis alone: what the views show best
                    axis = detected.axis.to(rotations)
                    axial = axial_error_deg(rotations, truth.rotations, pred_axis=axis)
                    metrics["axis_err_median_deg"] = float(axial.median())
                    metrics["axis_within_10deg"] = float((axial < 10).float().mean())
        return metrics

    def imposed_axis(self) -> torch.Tensor | None:
        """z when a symmetry is imposed (the group acts about the model's z), else None (detect it)."""
        if self.symmetry == "none" or (self.refinement is not None and self.refinement.symmetry == "none"):
            return None
        return torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)

    def image_grids(self) -> dict[str, torch.Tensor]:
        batch, _, rendered, _ = self._eval()
        inputs = batch["images"][:N_SHOWN]
        grid = image_rows([to_unit_range(inputs), to_unit_range(rendered[:N_SHOWN])])
        posed = "refined pose" if self.refinement is not None else "CNN pose"
        title = f"held-out images (sigma {self.sigma():.2g} px), render at the {posed}"
        return {
            "eval/inputs_vs_renders": caption_grid(grid, ["input", "render"], title=title),
            "structure/views": self.orthogonal_views(),
        }

    def point_clouds(self) -> dict[str, torch.Tensor]:
        return {"structure/points": self.structure().cpu()}

    def orthogonal_views(self) -> torch.Tensor:
        """The point cloud seen along its three principal axes (least spread first: a ring is seen face-on),
        side by side at a 1-pixel blur, labelled, with a scale bar in nm (or in input pixels)."""
        points = self.structure()
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
        return add_scale_bar(grid, frame_pixels(self.config["data"]["image_size"]) / VIEW_SIZE, "px", at=(2, VIEW_SIZE))

    # ------------------------------------------------------------------ state and outputs
    def state_dict(self) -> dict[str, Any]:
        state = {
            "net": self.net.state_dict(),
            "points": self.points.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step_done": self.step_done,
            "respawned": self.respawned,
        }
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        if self.refinement is not None:
            state["refinement"] = self.refinement.state()
            state["refine_optimizer"] = self.refine_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        with torch.no_grad():
            self.points.copy_(state["points"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.plateau is not None and "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])
        self.step_done = state["step_done"]
        self.respawned = state.get("respawned", 0)
        if "refinement" in state:
            saved = state["refinement"]
            self.refinement = Refinement(
                self.refine_options,
                saved["units"][0].to(self.device),
                len(self.particles.locs),
                saved["symmetry"],
                self.config["seed"],
            ).to(self.device)
            self.refinement.load_state(saved)
            self.refine_optimizer = torch.optim.Adam(self.refinement.parameter_groups())
            self.refine_optimizer.load_state_dict(state["refine_optimizer"])
        self.weights.changed()

    def on_checkpoint(self, step: int, store) -> None:
        """Keep the point cloud of every checkpoint in outputs.zarr (slot = checkpoint number)."""
        every, steps = self.config["train"]["checkpoint_every"], self.config["train"]["steps"]
        slots = -(-steps // every)
        slot = min(-(-step // every), slots) - 1
        structure = self.structure().cpu().numpy()
        if structure.shape[0] == self.config["model"]["num_points"]:  # a C1 search holds as many points
            store.write_slot("structure/points_by_checkpoint", slot, slots, structure)
        store.write_slot("structure/checkpoint_steps", slot, slots, step)

    def write_outputs(self, final_dir: Path, store) -> dict[str, float]:
        from .report import write_final

        batch, pred, _, _ = self._eval()
        points = self.structure().cpu().numpy()
        store.write_array("structure/points", points)
        if pred is not None:
            store.write_array("eval/rotations_pred", pred.rotations.cpu().numpy())
            if pred.translations is not None:
                store.write_array("eval/translations_pred", pred.translations.cpu().numpy())
            if pred.sigma is not None:
                store.write_array("eval/sigma_pred", pred.sigma.cpu().numpy())
        if self.source.ground_truth is not None:
            store.write_array("structure/ground_truth", self.source.ground_truth.points.numpy())
            store.write_array("eval/rotations_true", batch["rotations"].cpu().numpy())
        nm_per_unit = self.source.nm_per_unit
        scale = nm_per_unit if nm_per_unit is not None else 1.0
        units = "nm" if nm_per_unit is not None else "image frame (the image spans -1 to 1)"
        if nm_per_unit is not None:  # the input was in nm: so is the structure
            store.write_array("structure/points_nm", points * nm_per_unit)
        write_ply(final_dir / "structure.ply", points * scale, units=units)
        write_obj(final_dir / "structure.obj", points * scale, units=units)
        grids = self.image_grids()
        save_png(final_dir / "renders.png", grids["eval/inputs_vs_renders"], scale=3)
        save_png(final_dir / "views.png", grids["structure/views"], scale=2)
        metrics = self.evaluate()
        if getattr(self.source, "test_size", 0):
            metrics.update(self._test_metrics(store))
        if nm_per_unit is not None:
            metrics["nm_per_unit"] = float(nm_per_unit)
        halves = None
        if self.refinement is not None:
            store.write_array("refine/rotations", self.refinement.rotations(0).detach().cpu().numpy())
            store.write_array("refine/shifts", (self.refinement.shifts[0].detach() * scale).cpu().numpy())
            if len(self.refinement.names) == 3:
                halves = [self.structure(1).cpu() * scale, self.structure(2).cpu() * scale]
                for name, half in zip(("half1", "half2"), halves, strict=True):
                    store.write_array(f"structure/{name}", half.numpy())
                    write_ply(final_dir / f"structure_{name}.ply", half.numpy(), units=units)
        metrics.update(write_final(final_dir, self, metrics, halves, units))
        return metrics

    @torch.no_grad()
    def _test_metrics(self, store) -> dict[str, float]:
        """The simulated test set (data.simulate.test_size), scored once with the final network: test_loss and
        the rotation errors as test_*; its poses go to outputs.zarr under test/."""
        sigma = self.sigma()
        batch = self.source.test_batch(sigma)
        with evaluating(self.model):
            pred, _, loss = self.model(batch["images"], sigma, batch)
        store.write_array("test/rotations_pred", pred.rotations.cpu().numpy())
        store.write_array("test/rotations_true", batch["rotations"].cpu().numpy())
        return {"test_loss": loss.item(), **self._rotation_metrics(pred.rotations, batch["rotations"], "test_")}

    def data_report(self) -> list[str]:
        return list(self.source.report_lines) + self.init_lines

    def write_data_files(self, folder: Path) -> list[Path]:
        return self.source.write_report(folder)
