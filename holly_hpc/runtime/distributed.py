"""Multi-process training: one process per GPU (or CPU slot), set up from submitit's job environment.

Every rank builds the same model from the same seed and draws the same full batch from (seed, step); it
trains on its own rows of it (`DistInfo.rows`/`shard`: rank::world), and the gradients are averaged (by DDP,
or by `average_gradients` where DDP's hooks do not fit), so a step sees the whole batch. Only rank 0 writes
TensorBoard, zarr, checkpoints and registry rows.

This module is the one place that talks to torch.distributed. Every tensor handed to a collective lives on
the rank's training device: NCCL, the backend on CUDA, has no CPU tensors ("No backend type associated with
device type cpu"), and a CPU tensor under gloo would cost a copy from the GPU anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch

CPU = torch.device("cpu")


def initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of `tensor` over the ranks (itself when no process group runs). The tensor stays on
    its own device, the one it was computed on."""
    if initialised():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: rank `src`'s values on every rank (no-op without a process group)."""
    if initialised():
        torch.distributed.broadcast(tensor, src=src)
    return tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = CPU  # the rank's training device: where collectives' tensors live

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def on(self, device: torch.device | str) -> DistInfo:
        """The same ranks, with collectives placed on `device` (known once the task picked its device)."""
        return replace(self, device=torch.device(device))

    def rows(self, items: Any) -> Any:
        """This rank's rows (rank::world) of a tensor, array or sequence that every rank holds in full."""
        return items[self.rank :: self.world] if self.active else items

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's rows of every entry of a batch drawn identically on every rank."""
        return {key: self.rows(value) for key, value in batch.items()} if self.active else batch

    def agree(self, flag: bool, proposal: int) -> tuple[bool, int]:
        """One collective for two decisions, the same on every rank: whether any rank's flag is set (so all
        stop at the same step), and the smallest of the ranks' proposals (a positive int). Every rank must call
        it at the same step."""
        if not self.active:
            return flag, proposal
        t = torch.tensor([1.0 if flag else 0.0, -float(proposal)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)  # max of -proposal: min proposal
        any_flag, smallest = t.tolist()  # one copy back, not two
        return any_flag > 0, int(-smallest)

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Mean of each gradient over the ranks (what DDP does), for updates DDP's hooks do not allow: a GAN
        step runs the discriminator several times before one backward."""
        if not self.active:
            return
        for p in module.parameters():
            if p.grad is not None:
                all_sum(p.grad).div_(self.world)


def setup_distributed(device_type: str) -> DistInfo:
    """Join the job's process group when submitit started several tasks (tasks_per_node × nodes > 1)."""
    import submitit

    try:
        env = submitit.JobEnvironment()
        world = env.num_tasks
    except RuntimeError:  # not inside a submitit job
        return DistInfo()
    if world <= 1:
        return DistInfo()
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    # On CUDA, NCCL for the training tensors and gloo beside it, so a collective on a CPU tensor (from code
    # that forgot the rule above) still works instead of crashing the run.
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, init_method="env://")
    os.environ.setdefault("LOCAL_RANK", str(dist_env.local_rank))
    return DistInfo(dist_env.rank, dist_env.world_size, dist_env.local_rank)


def teardown_distributed() -> None:
    if initialised():
        torch.distributed.destroy_process_group()
