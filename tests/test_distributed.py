"""The one distributed dialect (runtime/distributed.py): collectives on the rank's device, sharding, gradient
averaging and the ranks' agreement to stop; checked against a recording fake of torch.distributed that
refuses what NCCL refuses, and against a real 2-process gloo group."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.multiprocessing as mp

from holly_hpc.runtime import distributed
from holly_hpc.runtime.distributed import DistInfo, all_sum
from holly_hpc.runtime.kinds import TaskKind, optimiser_step
from holly_hpc.runtime.outputs import TaskPaths
from holly_hpc.runtime.preemption import Preempted, StopRequest
from holly_hpc.runtime.trainer import STOP_CHECK_MAX_STEPS, STOP_CHECK_SECONDS, Trainer

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
    """The bug this guards against: the stop agreement (DistInfo.any, now agree) built its tensor on the CPU,
    which NCCL refuses, so every multi-GPU run crashed at step 1. The meta device stands in for CUDA on a
    machine without one."""
    fake = FakeCollectives(monkeypatch, "meta")
    with pytest.raises(_Recorded):
        DistInfo(rank=1, world=2, device=torch.device("meta")).agree(True, 3)
    assert fake.calls == [("all_reduce", torch.device("meta"), (2,))]


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
    """The fake is strict enough to catch the bug: the old DistInfo.any's CPU tensor fails exactly so, and so
    does a VQ reduction that moved its statistics to the CPU."""
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


def test_the_vq_codebook_statistics_are_reduced_where_the_codes_are(monkeypatch):
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
    # On another device (meta for CUDA), each collective gets that device's tensors, none moved to the CPU.
    fake = FakeCollectives(monkeypatch, "meta")
    on_meta = EMAVectorQuantiser(8, 4).to("meta").train()
    z = torch.empty(32, 4, device="meta")
    with pytest.raises(_Recorded):
        on_meta.reinitialise(torch.ones(8, dtype=torch.bool, device="meta"), z)
    codes = torch.zeros(32, dtype=torch.long, device="meta")
    with pytest.raises(_Recorded):
        on_meta.update_ema(z, codes, torch.empty(8, device="meta"))
    assert [(name, device.type) for name, device, _ in fake.calls] == [("broadcast", "meta"), ("all_reduce", "meta")]


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


def _trainer(tmp_path, name, stop=None, seconds_per_step=0.0):
    """A Trainer of LineFit on rank 0 of 2, its clock advancing `seconds_per_step` each step."""
    torch.manual_seed(0)  # as run_task seeds before building: initial weights from the seed alone
    kind = LineFit(CONFIG, torch.device("cpu"), dist=DistInfo(rank=0, world=2))
    trainer = Trainer(kind, CONFIG, TaskPaths(tmp_path / name), out=io.StringIO(), stop=stop, dist=kind.dist)
    trainer.clock = lambda: trainer.step * seconds_per_step
    return trainer


def _agreements(monkeypatch, trainer) -> list[int]:
    """The steps after which the ranks agreed on stopping, over a whole run."""
    steps, real = [], DistInfo.agree
    monkeypatch.setattr(DistInfo, "agree", lambda self, *a: steps.append(trainer.step) or real(self, *a))
    assert trainer.run().completed
    return steps


def test_the_ranks_agree_on_stopping_every_few_steps_when_steps_are_fast(monkeypatch, tmp_path):
    fake = FakeCollectives(monkeypatch, "cpu")
    trainer = _trainer(tmp_path, "whole")
    # 25 steps, 5 all-reduces, not 24: after the first step, then STOP_CHECK_MAX_STEPS apart, and at the
    # checkpoints (12 and 24; at 25 the run ends anyway).
    assert STOP_CHECK_MAX_STEPS == 10 and _agreements(monkeypatch, trainer) == [1, 11, 12, 22, 24]
    assert all(device == torch.device("cpu") for _, device, _ in fake.calls)
    shapes = [shape for name, _, shape in fake.calls if name == "all_reduce"]
    assert shapes.count((2,)) == 5 and shapes.count((1, 4)) == 25  # 5 agreements; each step's gradient mean


@pytest.mark.parametrize(
    ("seconds_per_step", "expected"),
    [
        (2.0, [1, 3, 5, 7, 9, 11, 12, 14, 16, 18, 20, 22, 24]),  # two steps fit in STOP_CHECK_SECONDS
        (10.0, list(range(1, 25))),  # slow steps: every step (the sync costs nothing next to them)
    ],
)
def test_slow_steps_bring_the_agreements_closer(monkeypatch, tmp_path, seconds_per_step, expected):
    FakeCollectives(monkeypatch, "cpu")
    assert STOP_CHECK_SECONDS == 5.0
    assert _agreements(monkeypatch, _trainer(tmp_path, "slow", seconds_per_step=seconds_per_step)) == expected


def test_the_ranks_take_the_smallest_proposal(monkeypatch, tmp_path):
    """The other rank's steps are slower: its proposal (every step) wins, so both call the collective at the
    same steps."""
    fake = FakeCollectives(monkeypatch, "cpu")
    real_all_reduce = fake.all_reduce

    def other_rank_proposes_one(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        real_all_reduce(tensor, op)
        if op == torch.distributed.ReduceOp.MAX:  # the agreement: MAX over -proposals, the other rank's is -1
            tensor[1] = torch.maximum(tensor[1], torch.tensor(-1.0))

    monkeypatch.setattr(torch.distributed, "all_reduce", other_rank_proposes_one)
    assert _agreements(monkeypatch, _trainer(tmp_path, "mixed")) == list(range(1, 25))


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
    assert stopped.value.step == 11  # the next agreement, where both ranks checkpoint and stop together
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
            "any_of_rank1": dist.agree(rank == 1, 4 + rank),
            "any_of_none": dist.agree(False, 7),
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
        assert got[rank]["any_of_rank1"] == (True, 4) and got[rank]["any_of_none"] == (False, 7)
        assert got[rank]["sum"] == 3.0
        assert got[rank]["grad"] == [[1.5, 1.5]]  # mean of 1 and 2
    assert got[0]["rows"] == [0, 2, 4] and got[1]["rows"] == [1, 3]


# ------------------------------------------------------------------ where the ranks' device comes from
def test_run_task_hands_kind_and_trainer_the_ranks_training_device(write_spec, tmp_path, monkeypatch):
    """run_task places the DistInfo on the device the task trains on: without that, collectives would stay
    on the DistInfo's default device (the CPU), which NCCL refuses. Started here on meta, it must end on cpu."""
    from holly_hpc.experiment import freeze
    from holly_hpc.runtime.task import run_task
    from holly_hpc.runtime.trainer import TrainResult
    from holly_hpc.spec import load_spec
    from holly_hpc.sweep import expand

    spec = load_spec(write_spec())
    exp = freeze(spec, expand(spec), tmp_path / "runs", f"sqlite:///{tmp_path / 'r.sqlite'}")
    seen = {}

    def run(self, stop_after_step=None):
        seen["trainer"], seen["kind"] = self.dist.device, self.kind.dist.device
        return TrainResult(True, 0, {})

    monkeypatch.setattr(Trainer, "run", run)
    run_task(exp, 0, dist=DistInfo(device=torch.device("meta")), out=io.StringIO())
    assert seen == {"trainer": torch.device("cpu"), "kind": torch.device("cpu")}


class _JobEnvironment:
    num_tasks = 2


class _TorchEnvironment:
    def export(self, set_cuda_visible_devices=True):
        return type("Exported", (), {"rank": 1, "world_size": 2, "local_rank": 1})()


@pytest.mark.parametrize(("device_type", "backend"), [("cuda", "cpu:gloo,cuda:nccl"), ("cpu", "gloo")])
def test_the_process_group_pairs_nccl_with_gloo_on_cuda(monkeypatch, device_type, backend):
    import submitit

    from holly_hpc.runtime.distributed import setup_distributed

    created = []
    monkeypatch.setattr(submitit, "JobEnvironment", _JobEnvironment)
    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", _TorchEnvironment)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, init_method: created.append(backend))
    # setup_distributed exports LOCAL_RANK: set it through monkeypatch first so that it is undone after the
    # test (later SLURM jobs inherit this process's environment, and submitit refuses a preset LOCAL_RANK).
    monkeypatch.setenv("LOCAL_RANK", "")
    monkeypatch.delenv("LOCAL_RANK")
    assert setup_distributed(device_type) == DistInfo(rank=1, world=2, local_rank=1)
    assert created == [backend]
    assert os.environ["LOCAL_RANK"] == "1"
