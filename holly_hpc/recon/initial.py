"""Where reconstruct's learnable points start: a Poisson-disc fill of a cube, or another run's checkpoint.

poisson_disc_points: `model.init: poisson`, num_points points in the cube of half-width init_scale, no two
closer than a spacing that lets them fill it evenly (dart throwing, vectorised; deterministic for the
generator). load_init: `model.init_from`, the points (and the pose network's weights, where they fit) of the
latest checkpoint of another run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..io import resolve_path
from ..runtime.checkpoint import CorruptCheckpoint, list_checkpoints, newest_intact_checkpoint, verified_checkpoint

# ------------------------------------------------------------------------------------------ poisson disc
# Random sequential addition of hard spheres jams at ~38% of the volume; 30% is reached in a few passes.
POISSON_PACKING = 0.3
_MAX_BATCH = 16384  # candidates drawn at once, at most
_MAX_KEPT = 1024  # candidates clear of the placed points checked against each other at once, at most
_STALLS = 4  # batches in a row that place nothing before the spacing shrinks (only if asked too much)
_SHRINK = 0.95


def poisson_spacing(n: int, half_width: float, packing: float = POISSON_PACKING) -> float:
    """The default least distance of n points in the cube of half-width `half_width`: the diameter of n equal
    spheres filling `packing` of its volume, (6·packing·V / (π n))^(1/3), about 0.83 of the spacing of a cubic
    lattice of n points (V/n)^(1/3). 0 for n <= 1."""
    if n <= 1:
        return 0.0
    return (6 * packing * (2 * half_width) ** 3 / (math.pi * n)) ** (1 / 3)


def _largest_spacing(n: int, half_width: float) -> float:
    """A spacing no n points of the cube can keep: balls of half that diameter around them would fill more
    than the densest packing (74%) of the cube grown by it, or it exceeds the cube's diagonal."""
    if n <= 1:
        return math.inf
    c = (0.7405 * 6 / (math.pi * n)) ** (1 / 3)  # spacing / (side + spacing) at that density
    bound = 2 * half_width * c / (1 - c) if c < 1 else math.inf
    return min(bound, 2 * math.sqrt(3) * half_width)


class _Grid:
    """Cells of side spacing/√3 (a cell's diagonal is the spacing, so it holds at most one point); a point
    closer than the spacing to x lies within two cells of x's along each axis."""

    def __init__(self, spacing: float, half_width: float, points: torch.Tensor):
        self.spacing, self.half_width = spacing, half_width
        self.side = spacing / math.sqrt(3) * (1 - 1e-9)
        self.size = max(1, math.ceil(2 * half_width / self.side))
        self.cells = torch.full((self.size + 4,) * 3, -1, dtype=torch.long)  # 2 cells of padding each side
        r = torch.arange(-2, 3)
        offsets = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
        # The 8 corner cells (±2, ±2, ±2) are a spacing or more away from every point of the middle one.
        offsets = offsets[(offsets.abs() == 2).sum(-1) < 3]
        w = self.size + 4
        self.steps = (offsets[:, 0] * w + offsets[:, 1]) * w + offsets[:, 2]  # (117,) flat offsets
        self.points = points
        self.count = 0

    def _cell(self, x: torch.Tensor) -> torch.Tensor:
        """The flat index of each point's cell in the padded grid."""
        c = ((x + self.half_width) / self.side).floor().long().clamp(0, self.size - 1) + 2
        w = self.size + 4
        return (c[:, 0] * w + c[:, 1]) * w + c[:, 2]

    def conflicts(self, x: torch.Tensor) -> torch.Tensor:
        """(m,) whether each candidate x (m, 3) lies closer than the spacing to a placed point."""
        flat = self.cells.view(-1)
        cell = self._cell(x)
        hit = flat[cell] >= 0  # a placed point in its own cell is closer than the cell's diagonal
        rest = (~hit).nonzero()[:, 0]
        idx = flat[cell[rest, None] + self.steps]  # (m', 117), -1 where empty
        rows, cols = (idx >= 0).nonzero(as_tuple=True)  # distances to the placed neighbours only
        d2 = (self.points[idx[rows, cols]] - x[rest[rows]]).pow(2).sum(-1)
        hit[rest[rows[d2 < self.spacing**2]]] = True
        return hit

    def add(self, x: torch.Tensor) -> None:
        self.points[self.count : self.count + len(x)] = x
        self.cells.view(-1)[self._cell(x)] = torch.arange(self.count, self.count + len(x))
        self.count += len(x)


def poisson_disc(
    n: int, half_width: float, generator: torch.Generator, spacing: float | None = None
) -> tuple[torch.Tensor, float]:
    """n points (n, 3) float32 in the cube [-half_width, half_width]³, no two closer than the spacing, and
    that spacing: `spacing`, or poisson_spacing(n, half_width) by default.

    Dart throwing with a vectorised rejection: each round draws a batch of uniform candidates, drops those
    closer than the spacing to a placed point (a grid lookup) or to an earlier candidate of the batch that
    survived it (conservative: no two kept ones conflict), and keeps the rest in draw order until there are
    n. The points are uniform, with no lattice or ordering bias, and the result is a pure function of the
    generator's state. Should the spacing be too large to fit n points (only if one is given: the default is
    well below jamming), it shrinks by 5% until they fit (and the spacing returned says so)."""
    if n < 0 or half_width <= 0:
        raise ValueError(f"poisson_disc: need n >= 0 and half_width > 0, got n={n}, half_width={half_width}")
    r = poisson_spacing(n, half_width) if spacing is None else min(float(spacing), _largest_spacing(n, half_width))
    points = torch.empty(n, 3, dtype=torch.float64)
    if n <= 1 or r <= 0:
        points = (torch.rand(n, 3, generator=generator, dtype=torch.float64) * 2 - 1) * half_width
        return points.float(), r
    grid = _Grid(r, half_width, points)
    stalls, free = 0, 1.0  # free: the share of the last batch's candidates clear of the placed points
    while grid.count < n:
        wanted = n - grid.count
        m = min(_MAX_BATCH, max(64, math.ceil(min(2 * wanted, _MAX_KEPT) / free)))
        x = (torch.rand(m, 3, generator=generator, dtype=torch.float64) * 2 - 1) * half_width
        x = x[~grid.conflicts(x)]
        free = max(len(x), 1) / m
        x = x[:_MAX_KEPT]  # the pairwise check below is quadratic
        if len(x) > 1:
            close = torch.cdist(x, x) < r
            x = x[~close.tril(diagonal=-1).any(dim=1)]
        x = x[:wanted]
        grid.add(x)
        stalls = 0 if len(x) else stalls + 1
        if stalls >= _STALLS:  # the cube is full at this spacing: shrink it, keep the points placed
            r *= _SHRINK
            placed = grid.count
            grid = _Grid(r, half_width, points)
            grid.add(points[:placed].clone())
            stalls, free = 0, 1.0
    return points.float(), r


def poisson_disc_points(n: int, half_width: float, generator: torch.Generator) -> torch.Tensor:
    """n points (n, 3) float32 filling the cube of half-width `half_width` evenly: a Poisson-disc sample, no
    two closer than poisson_spacing(n, half_width) (see poisson_disc)."""
    return poisson_disc(n, half_width, generator)[0]


# ------------------------------------------------------------------------------------------ init_from
INIT_FROM_KEY = "model.init_from"


class InitFromError(ValueError):
    """model.init_from names nothing usable; the message names the key and the path."""

    key = INIT_FROM_KEY


@dataclass(frozen=True)
class InitState:
    """What another run's checkpoint offers a new one: its points, its pose network's weights, and where
    they came from.

    points: (K, 3) float32, the asymmetric unit that run learned: the refinement's (split "all") when it
    had one, else the CNN phase's. Whether it is a unit of the new run's symmetry is the caller's problem:
    a run's symmetry is not in its checkpoint, except the refinement's (`symmetry`)."""

    points: torch.Tensor
    net_state: dict[str, torch.Tensor] | None
    source: Path  # the checkpoint file read
    step: int | None = None
    from_refinement: bool = False
    symmetry: str | None = None  # the refinement's symmetry when the points are its unit; else unknown

    def points_for(self, n: int, generator: torch.Generator, jitter: float = 0.01) -> torch.Tensor:
        """n points (n, 3) from the saved K: all of them when n == K; a random n of them (no repeats) when
        n < K; all K and n - K copies of random ones, each moved by a Gaussian `jitter` (image-frame units:
        two points at one place would get the same gradient and never part) when n > K."""
        k = len(self.points)
        if n == k:
            return self.points.clone()
        if n < k:
            return self.points[torch.randperm(k, generator=generator)[:n].sort().values].clone()
        extra = self.points[torch.randint(k, (n - k,), generator=generator)]
        extra = extra + jitter * torch.randn(n - k, 3, generator=generator)
        return torch.cat((self.points, extra))


def _folder_of_checkpoints(where: Path) -> Path | None:
    for folder in (where / "checkpoints", where):
        if list_checkpoints(folder):
            return folder
    return None


def find_init_checkpoint(path: str | Path, base_dir: Path) -> Path:
    """The checkpoint file `path` names (resolve_path: `~` expanded, relative to the spec's folder): the file
    itself, or the newest step_*.pt of a checkpoints/ folder or of a task folder's checkpoints/."""
    where = resolve_path(path, base_dir)
    if not where.exists():
        raise InitFromError(
            f"{INIT_FROM_KEY}: expected a task folder, its checkpoints/ folder or a checkpoint file, "
            f"but {where} does not exist"
        )
    if where.is_file():
        return where
    folder = _folder_of_checkpoints(where)
    if folder is None:
        raise InitFromError(
            f"{INIT_FROM_KEY}: no checkpoint (step_<step>.pt) in {where} or in {where / 'checkpoints'}: "
            "has that run written one yet?"
        )
    return list_checkpoints(folder)[-1][1]


def _read(path: str | Path, base_dir: Path) -> tuple[Path, dict]:
    """(file, payload): a named file as it is; for a folder its newest intact checkpoint (a corrupt newer
    one is passed over, never moved aside: the folder is another run's)."""
    file = find_init_checkpoint(path, base_dir)
    where = resolve_path(path, base_dir)
    if where.is_dir():
        found = newest_intact_checkpoint(file.parent, move_aside=False)
        if found is None:
            raise InitFromError(f"{INIT_FROM_KEY}: no intact checkpoint in {file.parent} (every one is corrupt)")
        return found
    try:
        return file, verified_checkpoint(file)
    except CorruptCheckpoint as exc:
        raise InitFromError(f"{INIT_FROM_KEY}: {file} is not a usable reconstruct checkpoint: {exc}") from None


def load_init(path: str | Path, base_dir: Path) -> InitState:
    """The InitState of the latest checkpoint at `path` (a task folder, its checkpoints/ folder or a
    checkpoint file; relative to base_dir). Raises InitFromError (a ValueError naming model.init_from and
    the path) when there is no checkpoint there or it is not a reconstruct checkpoint.

    The file is unpickled as a resume would (weights_only=False: it carries RNG states): name only files
    you trust, as for any checkpoint."""
    file, payload = _read(path, base_dir)
    state = payload.get("kind")
    points = state.get("points") if isinstance(state, dict) else None
    if not (torch.is_tensor(points) and points.dim() == 2 and points.shape[-1] == 3 and len(points) > 0):
        raise InitFromError(
            f"{INIT_FROM_KEY}: {file} is not a reconstruct checkpoint: it holds no learned points "
            "(its task state has no 'points' (N, 3) tensor)"
        )
    net = state.get("net")
    net = dict(net) if isinstance(net, dict) and all(torch.is_tensor(v) for v in net.values()) else None
    refinement = state.get("refinement")
    units = refinement.get("units") if isinstance(refinement, dict) else None
    if units and torch.is_tensor(units[0]) and units[0].dim() == 2 and units[0].shape[-1] == 3:
        return InitState(
            units[0].detach().float().cpu(), net, file, payload.get("step"), True, refinement.get("symmetry")
        )
    return InitState(points.detach().float().cpu(), net, file, payload.get("step"))


def init_from_problem(path: str | None, base_dir: Path) -> str | None:
    """validate's look at model.init_from: None when unset or usable, else the problem (load_init's)."""
    if not path:
        return None
    try:
        load_init(path, base_dir)
    except InitFromError as exc:
        return str(exc).removeprefix(f"{INIT_FROM_KEY}: ")
    return None


def take_matching(module: nn.Module, saved: dict[str, torch.Tensor] | None) -> tuple[list[str], list[str]]:
    """Load every tensor of `saved` whose name and shape match one of `module`'s (the rest keep their own
    initial values): (names taken, "name (why)" of those not taken, the module's missing ones included)."""
    own = module.state_dict()
    saved = saved or {}
    taken, skipped = {}, []
    for name, value in saved.items():
        if name not in own:
            skipped.append(f"{name} (not in this network)")
        elif own[name].shape != value.shape:
            skipped.append(f"{name} (shape {tuple(value.shape)} there, {tuple(own[name].shape)} here)")
        else:
            taken[name] = value
    skipped += [f"{name} (not in the checkpoint)" for name in own if name not in saved]
    module.load_state_dict(taken, strict=False)
    return list(taken), skipped


def init_report(state: InitState, n_points: int, taken: list[str], skipped: list[str]) -> list[str]:
    """Lines for the task's log saying what model.init_from took."""
    step = f" (step {state.step})" if state.step is not None else ""
    what = f"the refinement's asymmetric unit (symmetry {state.symmetry})" if state.from_refinement else "points"
    k = len(state.points)
    count = f"{k} points" if k == n_points else f"{k} points, {'some' if n_points < k else 'all'} of them as {n_points}"
    lines = [f"{INIT_FROM_KEY}: {what} from {state.source}{step}: {count}"]
    if not taken:
        why = "no weights in the checkpoint" if not state.net_state else "no tensor of the same name and shape"
        lines.append(f"{INIT_FROM_KEY}: pose network not taken ({why}): it starts afresh")
    elif not skipped:
        lines.append(f"{INIT_FROM_KEY}: pose network taken whole ({len(taken)} tensors)")
    else:
        shown = ", ".join(skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4 else "")
        lines.append(f"{INIT_FROM_KEY}: pose network: {len(taken)} tensors taken, kept afresh: {shown}")
    return lines
