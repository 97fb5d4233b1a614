"""Task kinds are plugins behind one small interface; the Trainer loop is shared by all of them.

Adding a kind = a new module with a TaskKind subclass + one line in kind_names.KINDS + its section in the schema.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..kind_names import KINDS  # kind name -> "module:Class", imported only when a task of that kind runs


class TaskKind(ABC):
    """What the shared Trainer needs from a kind. Built from the task config on the training device."""

    @classmethod
    def check_config(cls, config: dict, base_dir: Path) -> list[tuple[tuple, str]]:
        """Semantic checks beyond the schema: [(key path, message)]. base_dir: the spec's folder."""
        return []

    @abstractmethod
    def __init__(self, config: dict, device: torch.device, base_dir: Path, dist=None):
        """dist: a runtime.distributed.DistInfo; with several ranks the kind wraps its trained module with
        wrap_ddp and trains on dist.shard(batch)."""

    @abstractmethod
    def train_step(self, step: int) -> dict[str, float]:
        """One optimiser step on the data of position `step`; returns scalars, 'loss' among them."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, without touching any training state or RNG."""

    def image_grids(self) -> dict[str, torch.Tensor]:
        """Named (3, H, W) images in [0, 1] for TensorBoard, e.g. inputs above renders."""
        return {}

    def trained_parameters(self) -> list[torch.Tensor]:
        """The tensors the optimiser(s) update (what DDP keeps identical across ranks)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def point_clouds(self) -> dict[str, torch.Tensor]:
        """Named (N, 3) point clouds for TensorBoard's mesh dashboard."""
        return {}

    def histograms(self) -> dict[str, torch.Tensor]:
        """Named 1-D tensors for TensorBoard's histogram dashboard, e.g. how often each code is used."""
        return {}

    def projector(self) -> dict[str, dict]:
        """Named embeddings for TensorBoard's projector, written once at the end: {tag: {"embeddings":
        (N, D), "labels": [str] or None, "thumbnails": (N, 3, h, w) in [0, 1] or None}}."""
        return {}

    def final_images(self) -> dict[str, torch.Tensor]:
        """Pictures made by write_outputs (e.g. an FSC curve), for TensorBoard at the last step."""
        return dict(getattr(self, "final_pictures", {}) or {})

    def final_report(self) -> list[str]:
        """Lines that sum up the result (made by write_outputs), printed at the end of the task's log."""
        return list(getattr(self, "final_lines", []) or [])

    def data_report(self) -> list[str]:
        """Lines saying what data the task read (files, counts, units, held-out split), printed before training."""
        return []

    def write_data_files(self, folder: Path) -> list[Path]:
        """Files describing the data as read (e.g. picked particles, a summary) into the task's data/ folder."""
        return []

    def on_checkpoint(self, step: int, store) -> None:
        """Called after each checkpoint is saved, e.g. to keep a snapshot in outputs.zarr."""
        return  # an optional hook: most kinds keep nothing per checkpoint

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Models and optimisers (RNG states and the step are the Trainer's business)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def write_outputs(self, final_dir: Path, zarr_group) -> dict[str, float]:
        """Write final/ files and the kind's arrays; return the final metrics."""
        return self.evaluate()


def make_lr_scheduler(optimizer: torch.optim.Optimizer, train: dict) -> torch.optim.lr_scheduler.LRScheduler:
    """The train section's learning-rate schedule, shared by every kind (stepped once per train step)."""
    if train["lr_schedule"] == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    steps, floor = train["steps"], train["lr_final_fraction"]

    def cosine(step: int) -> float:
        progress = min(step / max(steps - 1, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def optimiser_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    before_step: Callable[[], None] | None = None,
    weights: WeightsCache | None = None,
) -> list[float]:
    """One update, written once for every kind: zero_grad, backward, `before_step` (e.g. averaging gradients
    over the ranks, or clipping), the optimiser's step, then the schedule's. `weights` learns that the weights
    changed. Returns the learning rate of each parameter group as this step used it (before the schedule
    moved on). The kinds keep control of their loop: a GAN calls this once per optimiser."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    if weights is not None:
        weights.changed()
    lrs = [group["lr"] for group in optimizer.param_groups]
    if scheduler is not None:
        scheduler.step()
    return lrs


class WeightsCache:
    """Values computed from the current weights (held-out predictions that evaluate, image_grids and
    write_outputs all ask for at the same step), kept until the weights change: an optimiser step or a
    checkpoint load calls `changed()`."""

    def __init__(self) -> None:
        self.version = 0
        self._kept: dict[str, Any] = {}

    def changed(self) -> None:
        self.version += 1
        self._kept.clear()

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self._kept:
            self._kept[name] = compute()
        return self._kept[name]


@contextlib.contextmanager
def evaluating(*modules: torch.nn.Module) -> Iterator[None]:
    """The modules in eval mode inside the block, each back in the mode it had before afterwards (a module
    evaluated mid-training goes back to training, one already in eval mode stays there)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def wrap_ddp(module: torch.nn.Module, dist, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `module` when several ranks train, else the module itself."""
    if dist is None or not dist.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def get_kind(name: str) -> type[TaskKind]:
    try:
        target = KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r}; known kinds: {', '.join(sorted(KINDS))}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
