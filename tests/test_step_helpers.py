"""The update sequence and its companions, written once in runtime/kinds.py and used by every kind."""

from __future__ import annotations

import pytest
import torch

from holly_hpc.runtime.kinds import WeightsCache, evaluating, make_lr_scheduler, optimiser_step

COSINE = {"lr_schedule": "cosine", "steps": 10, "lr_final_fraction": 0.1}


def _model_and_optimiser(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, optimizer, make_lr_scheduler(optimizer, COSINE)


def _loss(model, step):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
    return model(x).pow(2).mean()


def test_optimiser_step_equals_the_sequence_written_out():
    """The helper against the plain reference it replaced in each kind (zero_grad, backward, step, lr, schedule)."""
    helped, opt_h, sched_h = _model_and_optimiser()
    plain, opt_p, sched_p = _model_and_optimiser()
    for step in range(5):
        (lr,) = optimiser_step(_loss(helped, step), opt_h, sched_h)
        loss = _loss(plain, step)
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        opt_p.step()
        expected_lr = opt_p.param_groups[0]["lr"]
        sched_p.step()
        assert lr == expected_lr
    for a, b in zip(helped.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert sched_h.state_dict() == sched_p.state_dict()


def test_optimiser_step_runs_before_step_between_backward_and_step_and_reports_each_group():
    model, _, _ = _model_and_optimiser()
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}], lr=1)
    seen = []

    def before_step():
        seen.append(model[0].weight.grad is not None)
        model[0].weight.grad.zero_()  # e.g. clipping, or averaging over ranks: the step must use the result

    before = model[0].weight.detach().clone()
    weights = WeightsCache()
    lrs = optimiser_step(_loss(model, 0), optimizer, None, before_step, weights)
    assert seen == [True] and lrs == [0.1, 1]
    assert torch.equal(model[0].weight, before)  # its zeroed gradient moved nothing
    assert weights.version == 1


def test_the_weights_cache_computes_once_per_weights():
    cache, calls = WeightsCache(), []
    compute = lambda: calls.append(cache.version) or len(calls)  # noqa: E731
    assert cache.get("eval", compute) == 1 and cache.get("eval", compute) == 1
    cache.changed()
    assert cache.get("eval", compute) == 2 and calls == [0, 1]
    assert cache.get("other", compute) == 3  # each name its own value


def test_evaluating_restores_each_modules_own_mode_even_after_an_error():
    training, evaluated = torch.nn.Linear(2, 2).train(), torch.nn.Linear(2, 2).eval()
    with evaluating(training, evaluated):
        assert not training.training and not evaluated.training
    assert training.training and not evaluated.training
    with pytest.raises(RuntimeError), evaluating(training):
        raise RuntimeError("boom")
    assert training.training


def test_the_recon_kinds_return_tensors_and_leave_the_model_mode_alone(write_spec, tmp_path):
    """No .item() per step (a device sync); the Trainer converts at log steps. Evaluating a model that is in
    eval mode leaves it there (reconstruct's _eval used to force train())."""
    from holly_hpc.runtime.kinds import get_kind
    from holly_hpc.spec import load_spec
    from holly_hpc.sweep import expand

    from .test_reconstruct import _spec

    specs = {"pose": load_spec(write_spec({"experiment": "pose"}, name="pose.yaml")), "reconstruct": _spec(tmp_path)}
    for kind_name, spec in specs.items():
        config = expand(spec)[0].config
        kind = get_kind(kind_name)(config, torch.device("cpu"), tmp_path)
        metrics = kind.train_step(0)
        assert torch.is_tensor(metrics["loss"]) and not metrics["loss"].requires_grad, kind_name
        model = kind.net if kind_name == "pose" else kind.model
        model.eval()
        kind.evaluate()
        assert not model.training, kind_name
        model.train()
        kind.weights.changed()
        kind.evaluate()
        assert model.training, kind_name
