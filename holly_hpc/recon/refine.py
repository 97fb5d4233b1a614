"""Per-particle pose refinement: every particle's rotation and shift as free parameters, fitted jointly with
the structure, for localisation data, where a few hundred particles are too few for the pose CNN alone.

The refinement takes over from the CNN at `train.refine.start` (a fraction of the steps). Its poses start
from the CNN's best hypothesis for each particle (init: cnn) or from a coarse search over a grid of
rotations (init: grid), which first fits the structure with each particle's pose marginalised over the
grid (the way cryo-EM ab-initio methods start from nothing), then takes each particle's most likely grid
rotation. Every `regrid_every` steps the grid search is run again and a particle moves to its grid pose
where that fits it better (a particle stuck in a wrong basin gets out).

For a gold-standard FSC the particles are split into two random halves and each half gets a structure and
poses of its own ("half1", "half2"), refined beside the structure of all particles ("all"), never mixing;
the halves start from the same structure as "all" (the CNN's, or the initial points).

Points that leave the frame or that no localisation claims any more (they get no gradient and would stay)
are re-spawned next to the busiest points, as dead codes of a VQ-VAE are; a soft bound keeps the others in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .geometry import factored_rotations, factored_so3_grid, rotation_from_6d
from .likelihood import count_images, factored_grid_scores, localisation_nll, marginal_nll, spun_counts
from .losses import per_image_loss
from .render import project, render_images
from .symmetry import expand, symmetrise

BOUND = 0.9  # frame units: points beyond it are pushed back (the image spans ±1, so they would leave views)
STRAY = 1.0  # beyond it a point is re-spawned
BOUND_WEIGHT = 10.0


@dataclass
class RefineOptions:
    start: float  # fraction of train.steps at which refinement takes over (0: no CNN phase)
    init: str  # cnn | grid
    grid: int  # rotations of the coarse grid
    search: float  # init grid: fraction of the refinement fitting the structure with marginalised poses
    regrid_every: int  # steps between grid re-searches (0: never)
    pose_lr: float
    shift_lr: float
    points_lr: float
    background: float
    fsc: bool
    respawn_every: int

    @classmethod
    def from_config(cls, config: dict) -> RefineOptions | None:
        """None when the refinement is off: `start: off`, or `auto` with a source other than localisations."""
        cfg = config["train"]["refine"]
        start = cfg["start"]
        if start == "off" or (start == "auto" and config["data"]["source"] != "localisations"):
            return None
        start = 0.4 if start == "auto" else float(start)
        keys = ("init", "grid", "search", "regrid_every", "pose_lr", "shift_lr", "points_lr", "background", "fsc")
        return cls(start, **{k: cfg[k] for k in keys}, respawn_every=config["train"]["respawn_every"])


def six_from_rotations(rotations: torch.Tensor) -> torch.Tensor:
    """The 6D parameters (first two columns) that rotation_from_6d maps back to `rotations`."""
    return torch.cat((rotations[..., :, 0], rotations[..., :, 1]), dim=-1)


def bound_penalty(points: torch.Tensor) -> torch.Tensor:
    """Zero inside the BOUND sphere, quadratic outside: keeps points where the images can see them."""
    return BOUND_WEIGHT * torch.relu(points.norm(dim=-1) - BOUND).pow(2).sum()


@dataclass
class Particles:
    """The particles as the refinement sees them, in image-frame units: localisations (P, L, 2) with a mask
    (P, L), precision (P, L) or None, and their counts in pixels of the image grid (P, S²)."""

    locs: torch.Tensor
    mask: torch.Tensor
    precision: torch.Tensor | None
    counts: torch.Tensor

    @classmethod
    def from_source(cls, points: torch.Tensor, weights: torch.Tensor, precision, size: int) -> Particles:
        locs = points[..., :2].contiguous()
        return cls(locs, weights, precision, count_images(locs, weights, size))

    def take(self, idx: torch.Tensor) -> Particles:
        precision = None if self.precision is None else self.precision[idx]
        return Particles(self.locs[idx], self.mask[idx], precision, self.counts[idx])


def split_halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random halves of range(n), fixed by the seed (the gold-standard split)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003))
    return order[0::2].sort().values, order[1::2].sort().values


class Refinement(nn.Module):
    """Structures (asymmetric units) and per-particle poses of the splits "all" (and "half1", "half2").

    `symmetry` is the group in use now: a search runs in C1 ("none") and `symmetrise` then turns each split's
    free structure into an asymmetric unit of the spec's group (posed: the poses are per particle now)."""

    def __init__(self, options: RefineOptions, unit: torch.Tensor, n_particles: int, symmetry: str, seed: int):
        super().__init__()
        self.options, self.symmetry, self.seed, self.posed = options, symmetry, seed, False
        splits = {"all": torch.arange(n_particles)}
        if options.fsc:
            splits["half1"], splits["half2"] = split_halves(n_particles, seed)
        self.names = list(splits)
        for name, idx in splits.items():
            self.register_buffer(f"idx_{name}", idx.to(unit.device))
        self.units = nn.ParameterList([nn.Parameter(unit.detach().clone()) for _ in splits])
        eye = six_from_rotations(torch.eye(3, dtype=unit.dtype, device=unit.device))
        self.six = nn.ParameterList([nn.Parameter(eye.repeat(len(idx), 1)) for idx in splits.values()])
        self.shifts = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(idx), 2, dtype=unit.dtype, device=unit.device)) for idx in splits.values()]
        )
        views, angles = factored_so3_grid(options.grid, dtype=unit.dtype)
        self.register_buffer("views", views.to(unit.device))
        self.register_buffer("angles", angles.to(unit.device))
        self.register_buffer("grid", factored_rotations(views, angles).to(unit.device))
        self._spun: dict[int, torch.Tensor] = {}  # each split's particles turned by every angle (constant)

    def state(self) -> dict:
        return {
            "symmetry": self.symmetry,
            "posed": self.posed,
            "units": [u.detach().clone() for u in self.units],
            "six": [t.detach().clone() for t in self.six],
            "shifts": [t.detach().clone() for t in self.shifts],
        }

    def load_state(self, state: dict) -> None:
        """Back to a saved state (the units' shapes may differ from the new object's: a symmetrised run)."""
        self.symmetry, self.posed = state["symmetry"], state["posed"]
        device = self.grid.device
        self.units = nn.ParameterList([nn.Parameter(u.to(device)) for u in state["units"]])
        with torch.no_grad():
            for mine, saved in zip([*self.six, *self.shifts], [*state["six"], *state["shifts"]], strict=True):
                mine.copy_(saved)

    @torch.no_grad()
    def symmetrise(self, name: str, unit_size: int) -> None:
        """Each split's free structure folded into an asymmetric unit of `name` (symmetry.symmetrise), its
        poses turned with it (the structure moved by A, so each rotation R becomes R Aᵀ)."""
        units = []
        for i in range(len(self.names)):
            unit, a = symmetrise(self.points(i), name, unit_size, seed=self.seed + i)
            units.append(nn.Parameter(unit.to(self.grid.device)))
            self.six[i].copy_(six_from_rotations(self.rotations(i) @ a.T.to(self.grid)))
        self.units, self.symmetry = nn.ParameterList(units), name

    def index(self, i: int) -> torch.Tensor:
        return getattr(self, f"idx_{self.names[i]}")

    def points(self, i: int) -> torch.Tensor:
        return expand(self.units[i], self.symmetry)

    def rotations(self, i: int) -> torch.Tensor:
        return rotation_from_6d(self.six[i])

    def parameter_groups(self) -> list[dict]:
        o = self.options
        return [
            {"params": list(self.units), "lr": o.points_lr, "weight_decay": 0.0},
            {"params": list(self.six), "lr": o.pose_lr, "weight_decay": 0.0},
            {"params": list(self.shifts), "lr": o.shift_lr, "weight_decay": 0.0},
        ]

    # ------------------------------------------------------------------ losses
    def loss(self, data: Particles, sigma_px: float, size: int, kind: str, searching: bool) -> torch.Tensor:
        """Sum over the splits (their parameters are disjoint, so each gets only its own gradient)."""
        total = 0.0
        for i in range(len(self.names)):
            part = data.take(self.index(i))
            if searching:
                nll = self.search_nll(i, part, sigma_px, size)
            else:
                nll = self.pose_loss(i, part, sigma_px, size, kind)
            total = total + nll.mean() + bound_penalty(self.units[i])
        return total

    def search_nll(self, i: int, part: Particles, sigma_px: float, size: int) -> torch.Tensor:
        scores = self.grid_scores(i, part, sigma_px, size)
        return marginal_nll(scores, part.mask.sum(-1))

    def grid_scores(self, i: int, part: Particles, sigma_px: float, size: int) -> torch.Tensor:
        """Split i's particles scored at every rotation of self.grid -> (P_i, R)."""
        if i not in self._spun:
            self._spun[i] = spun_counts(part.locs, part.mask, self.angles, size)
        return factored_grid_scores(self.points(i), self.views, self._spun[i], sigma_px, size, self.options.background)

    def pose_loss(self, i: int, part: Particles, sigma_px: float, size: int, kind: str) -> torch.Tensor:
        rotations, shifts = self.rotations(i), self.shifts[i]
        if kind == "likelihood":
            blur = sigma_px * 2 / size
            return localisation_nll(
                self.points(i), rotations, shifts, part.locs, part.mask, blur, part.precision, self.options.background
            )
        return per_image_loss(
            self.render(i, sigma_px, size), particle_images(part, sigma_px, size), kind, normalise=True
        )

    def render(self, i: int, sigma_px: float, size: int) -> torch.Tensor:
        return render_images(self.points(i), self.rotations(i), sigma_px, size, self.shifts[i])

    # ------------------------------------------------------------------ pose searches
    @torch.no_grad()
    def search_poses(self, data: Particles, sigma_px: float, size: int, only_better: bool) -> float:
        """Each particle's most likely grid rotation (shift 0); with only_better, taken only where its exact
        likelihood beats the particle's current pose. Returns the share of particles that moved."""
        moved, total = 0, 0
        for i in range(len(self.names)):
            part = data.take(self.index(i))
            best = self.grid[self.grid_scores(i, part, sigma_px, size).argmax(dim=1)]
            take = torch.ones(len(best), dtype=torch.bool, device=best.device)
            new_six, zero = six_from_rotations(best), torch.zeros_like(self.shifts[i])
            if only_better:
                blur, bg = sigma_px * 2 / size, self.options.background
                points = self.points(i)
                now = localisation_nll(points, self.rotations(i), self.shifts[i], part.locs, part.mask, blur,
                                       part.precision, bg)  # fmt: skip
                grid = localisation_nll(points, best, zero, part.locs, part.mask, blur, part.precision, bg)
                take = grid < now - 1e-3
            self.six[i][take] = new_six[take]
            self.shifts[i][take] = zero[take]
            moved, total = moved + int(take.sum()), total + len(take)
        return moved / max(total, 1)

    @torch.no_grad()
    def set_poses(self, rotations: torch.Tensor, shifts: torch.Tensor | None) -> None:
        """Poses of every particle (P, 3, 3) and (P, 2) (e.g. the CNN's), given to each split's members."""
        for i in range(len(self.names)):
            idx = self.index(i)
            self.six[i].copy_(six_from_rotations(rotations[idx]))
            if shifts is not None:
                self.shifts[i].copy_(shifts[idx])

    # ------------------------------------------------------------------ dead and stray points
    @torch.no_grad()
    def usage(self, i: int, data: Particles, sigma_px: float, size: int) -> torch.Tensor:
        """How many localisations each unit point explains (soft assignments, summed over its symmetry copies
        and over every particle) -> (K_unit,)."""
        part = data.take(self.index(i))
        points = self.points(i)
        blur = sigma_px * 2 / size
        mu = project(points, self.rotations(i), self.shifts[i])
        var = torch.full_like(part.mask, blur * blur) if part.precision is None else part.precision**2 + blur**2
        d2 = (part.locs[:, :, None, :] - mu[:, None, :, :]).pow(2).sum(-1)
        resp = torch.softmax(-d2 / (2 * var[..., None]), dim=-1) * part.mask[..., None]
        per_point = resp.sum((0, 1))
        return per_point.reshape(-1, self.units[i].shape[0]).sum(0)

    @torch.no_grad()
    def respawn(self, data: Particles, sigma_px: float, size: int, step: int, optimizer) -> int:
        """Move stray (outside STRAY) and starved (under 5% of the mean usage) unit points next to the busiest
        ones, with their optimiser state reset. Returns how many moved."""
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        moved = 0
        for i in range(len(self.names)):
            unit = self.units[i]
            use = self.usage(i, data, sigma_px, size)
            dead = (unit.norm(dim=-1) > STRAY) | (use < 0.05 * use.mean())
            n_dead = int(dead.sum())
            if n_dead == 0 or n_dead == len(unit):
                continue
            alive = (~dead).nonzero()[:, 0]
            donors = alive[use[alive].argsort(descending=True)[:n_dead]].cpu()
            donors = donors[torch.arange(n_dead) % len(donors)]
            jitter = torch.randn(n_dead, 3, generator=g, dtype=unit.dtype).to(unit.device) * (sigma_px * 2 / size)
            unit[dead] = unit[donors.to(unit.device)] + jitter
            reset_rows(optimizer, unit, dead)
            moved += n_dead
        return moved

    # ------------------------------------------------------------------ readouts
    @torch.no_grad()
    def nll(self, i: int, data: Particles, sigma_px: float, size: int) -> torch.Tensor:
        part = data.take(self.index(i))
        blur = sigma_px * 2 / size
        return localisation_nll(
            self.points(i), self.rotations(i), self.shifts[i], part.locs, part.mask, blur, part.precision,
            self.options.background,
        )  # fmt: skip


def particle_images(part: Particles, sigma_px: float, size: int) -> torch.Tensor:
    """Each particle drawn as it is (no spin), every localisation a blob of sqrt(sigma² + precision²) px."""
    points = torch.cat((part.locs, torch.zeros_like(part.locs[..., :1])), dim=-1)
    eye = torch.eye(3, dtype=points.dtype, device=points.device).expand(len(points), 3, 3)
    sigma = torch.as_tensor(sigma_px, dtype=points.dtype, device=points.device)
    if part.precision is not None:
        sigma = (sigma**2 + (part.precision * size / 2) ** 2).sqrt()
    with torch.no_grad():
        return render_images(points, eye, sigma, size, weights=part.mask)


def reset_rows(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, rows: torch.Tensor) -> None:
    """Forget Adam's moments of the given rows of `parameter` (a re-spawned point starts afresh)."""
    state = optimizer.state.get(parameter)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][rows] = 0.0
