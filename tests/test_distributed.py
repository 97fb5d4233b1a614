"""The one distributed dialect (runtime/distributed.py): collectives on the rank's device, sharding, gradient
averaging and the ranks' agreement to stop; checked against a recording fake of torch.distributed that
refuses what NCCL refuses, and against a real 2-process gloo group."""

from __future__ import annotations

import io

import pytest
import torch
import torch.multiprocessing as mp

from holly_hpc.runtime import distributed
from holly_hpc.runtime.distributed import DistInfo, all_sum
from holly_hpc.runtime.kinds import TaskKind, optimiser_step
from holly_hpc.runtime.outputs import TaskPaths
from holly_hpc.runtime.preemption import Preempted, StopRequest
from holly_hpc.runtime.trainer import STOP_CHECK_EVERY, Trainer

NCCL_REFUSAL = "No backend type associated with device type cpu"


class _Recorded(Exception):
    """Raised by the fake after recording a collective on a meta tensor, which has no value to read back."""


class FakeCollectives:
    """torch.distributed for a 2-rank group whose other rank holds the same values. Like NCCL, it refuses a
    tensor that is not on its device (the backend's), with NCCL's message; it records every call."""

    def __init__(self, monkeypatch, device: str, world: int = 2):
        self.device, self.world, self.calls = torch.device(device), world, []
        for name in ("all_reduce", "broadcast"):
            monkeypatch.setattr(torch.distributed, name, getattr(self, name))
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "is_available", lambda: True)

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        self.calls.append((name, tensor.device, tuple(tensor.shape)))
        if tensor.device.type != self.device.type:
            raise RuntimeError(f"{NCCL_REFUSAL} (got a tensor on {tensor.device})")
        if tensor.device.type == "meta":
            raise _Recorded(name)

    def all_reduce(self, tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        self._check("all_reduce", tensor)
        if op == torch.distributed.ReduceOp.SUM:
            tensor.mul_(self.world)  # every rank holds the same values

    def broadcast(self, tensor, src=0, group=None, async_op=False):
        self._check("broadcast", tensor)


# ------------------------------------------------------------------ each helper on a non-CPU device
def test_the_stop_agreement_is_a_collective_on_the_training_device_not_on_the_cpu(monkeypatch):
    """The bug this guards against: DistInfo.any built its tensor on the CPU, which NCCL refuses, so every
    multi-GPU run crashed at step 1. The meta device stands in for CUDA on a machine without one."""
    fake = FakeCollectives(monkeypatch, "meta")
    with pytest.raises(_Recorded):
        DistInfo(rank=1, world=2, device=torch.device("meta")).any(True)
    assert fake.calls == [("all_reduce", torch.device("meta"), (1,))]


def test_gradient_averaging_and_sums_stay_on_the_tensors_device(monkeypatch):
    fake = FakeCollectives(monkeypatch, "meta")
    layer = torch.nn.Linear(3, 2, device="meta")
    layer(torch.ones(4, 3, device="meta")).sum().backward()
    with pytest.raises(_Recorded):
        DistInfo(rank=0, world=2, device=torch.device("meta")).average_gradients(layer)
    with pytest.raises(_Recorded):
        all_sum(torch.zeros(5, device="meta"))
    assert [device.type for _, device, _ in fake.calls] == ["meta", "meta"]


def test_a_cpu_tensor_under_the_nccl_like_fake_is_refused_as_nccl_refuses_it(monkeypatch):
    """The fake is strict enough to catch the bug: the old DistInfo.any's CPU tensor fails exactly so."""
    FakeCollectives(monkeypatch, "meta")
    with pytest.raises(RuntimeError, match=NCCL_REFUSAL):
        torch.distributed.all_reduce(torch.tensor([1.0]))


def test_rows_and_shard_give_each_rank_its_own_rows():
    batch = {"images": torch.arange(10), "ids": list(range(10))}
    parts = [DistInfo(rank=r, world=3).shard(batch) for r in range(3)]
    assert [p["images"].tolist() for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [p["ids"] for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert DistInfo().shard(batch) is batch and DistInfo().rows(batch["ids"]) is batch["ids"]
    assert DistInfo(rank=1, world=2).on("meta").device == torch.device("meta")


def test_the_vq_codebook_statistics_are_summed_on_the_codes_device(monkeypatch):
    from holly_hpc.embed.models import EMAVectorQuantiser

    fake = FakeCollectives(monkeypatch, "cpu")
    quantiser = EMAVectorQuantiser(8, 4).train()
    quantiser(torch.randn(32, 4))
    # restart broadcasts (codebook, sums), then the EMA's all-reduced counts and sums
    assert [(name, shape) for name, _, shape in fake.calls] == [
        ("broadcast", (8, 4)),
        ("broadcast", (8, 4)),
        ("all_reduce", (8,)),
        ("all_reduce", (8, 4)),
    ]


# ------------------------------------------------------------------ the Trainer with two (fake) ranks
class LineFit(TaskKind):
    """y = w·x fitted by SGD: a kind small enough to follow every collective of the shared loop."""

    def __init__(self, config, device, base_dir=None, dist=None):
        self.dist = dist or DistInfo()
        self.model = torch.nn.Linear(4, 1, bias=False)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.scheduler = None

    def train_step(self, step):
        g = torch.Generator().manual_seed(step)
        x = self.dist.rows(torch.randn(8, 4, generator=g))
        loss = ((self.model(x).squeeze(1) - x.sum(1)) ** 2).mean()
        (lr,) = optimiser_step(loss, self.optimizer, before_step=lambda: self.dist.average_gradients(self.model))
        return {"loss": loss.detach(), "lr": lr}

    def evaluate(self):
        return {}

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def write_outputs(self, final_dir, store):
        return {"w_error": float((self.model.weight.detach() - 1).abs().max())}


CONFIG = {
    "seed": 0,
    "train": {"steps": 25, "log_every": 5, "checkpoint_every": 12, "keep_checkpoints": 2},
}


def _trainer(tmp_path, name, stop=None):
    torch.manual_seed(0)  # as run_task seeds before building: initial weights from the seed alone
    kind = LineFit(CONFIG, torch.device("cpu"), dist=DistInfo(rank=0, world=2))
    return Trainer(kind, CONFIG, TaskPaths(tmp_path / name), out=io.StringIO(), stop=stop, dist=kind.dist)


def test_the_ranks_agree_on_stopping_only_every_k_steps_and_at_checkpoints(monkeypatch, tmp_path):
    fake = FakeCollectives(monkeypatch, "cpu")
    trainer = _trainer(tmp_path, "whole")
    agreements = []
    real_any = DistInfo.any
    monkeypatch.setattr(DistInfo, "any", lambda self, flag: agreements.append(trainer.step) or real_any(self, flag))
    assert trainer.run().completed
    # 25 steps, not 25 all-reduces: at multiples of STOP_CHECK_EVERY and at the checkpoints (12, 24, 25).
    assert STOP_CHECK_EVERY == 10 and agreements == [10, 12, 20, 24]
    assert all(device == torch.device("cpu") for _, device, _ in fake.calls)
    assert {name for name, _, _ in fake.calls} == {"all_reduce"}


def test_a_stop_request_between_agreements_still_resumes_exactly(monkeypatch, tmp_path):
    FakeCollectives(monkeypatch, "cpu")
    whole = _trainer(tmp_path, "whole")
    whole.run()

    stop = StopRequest()
    cut = _trainer(tmp_path, "cut", stop=stop)
    real_step = cut.kind.train_step

    def step_then_signal(step):
        if step == 2:
            stop.signal_name = "SIGUSR2"  # what the signal handler records
        return real_step(step)

    cut.kind.train_step = step_then_signal
    with pytest.raises(Preempted) as stopped:
        cut.run()
    assert stopped.value.step == 10  # the next agreement, where both ranks checkpoint and stop together
    resumed = _trainer(tmp_path, "cut")
    assert resumed.run().completed and resumed.step == 25
    assert torch.equal(resumed.kind.model.weight, whole.kind.model.weight)


# ------------------------------------------------------------------ a real 2-process gloo group
def _gloo_rank(rank: int, world: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dist = DistInfo(rank=rank, world=world).on("cpu")
        layer = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            layer.weight.fill_(1.0)
        layer(torch.full((1, 2), float(rank + 1))).sum().backward()  # gradient (rank + 1) per weight
        dist.average_gradients(layer)
        results[rank] = {
            "any_of_rank1": dist.any(rank == 1),
            "any_of_none": dist.any(False),
            "sum": all_sum(torch.tensor([float(rank + 1)])).item(),
            "grad": layer.weight.grad.tolist(),
            "rows": dist.rows(list(range(5))),
        }
    finally:
        distributed.teardown_distributed()


def test_the_helpers_on_a_real_two_process_gloo_group(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_rank, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
        got = dict(results)
    for rank in (0, 1):
        assert got[rank]["any_of_rank1"] is True and got[rank]["any_of_none"] is False
        assert got[rank]["sum"] == 3.0
        assert got[rank]["grad"] == [[1.5, 1.5]]  # mean of 1 and 2
    assert got[0]["rows"] == [0, 2, 4] and got[1]["rows"] == [1, 3]
