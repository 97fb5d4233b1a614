"""Multi-process training: one process per GPU (or CPU slot), set up from submitit's job environment.

Every rank builds the same model from the same seed and draws the same full batch from (seed, step); it
trains on its own rows of it (rank::world), and DDP averages the gradients, so a step sees the whole
batch. Only rank 0 writes TensorBoard, zarr, checkpoints and registry rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a batch drawn identically on every rank."""
        if not self.active:
            return batch
        return {key: value[self.rank :: self.world] for key, value in batch.items()}

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (so all ranks stop at the same step)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)


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
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, init_method="env://")
    os.environ.setdefault("LOCAL_RANK", str(dist_env.local_rank))
    return DistInfo(dist_env.rank, dist_env.world_size, dist_env.local_rank)


def teardown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
