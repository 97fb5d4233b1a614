"""`holly-hpc bench embed`: the JSON rows (tiny sizes: this checks shape, not speed), and that the plain
reference loop computes exactly what the framework's step computes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from holly_hpc.bench.embed import config, main, plain_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_json_rows(capsys):
    assert (
        main(
            [
                "--device",
                "cpu",
                "--sizes",
                "32",
                "--batch",
                "4",
                "--width",
                "4",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--families",
                "vqvae",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    (row,) = json.loads(captured.out)
    assert {"model", "size", "batch", "images_per_s", "plain_images_per_s", "ratio_vs_plain"} <= set(row)
    assert row["model"] == "vqvae" and row["size"] == 32 and row["batch"] == 4 and row["device"] == "cpu"
    for key in ("images_per_s", "plain_images_per_s", "ratio_vs_plain"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["ratio_vs_plain"] == pytest.approx(row["images_per_s"] / row["plain_images_per_s"], rel=1e-2)
    assert "images/s" in captured.err  # progress goes to stderr


def _task_and_plain_copy(family: str = "vqvae", augment: bool = False):
    """The framework's task (default: no augmentation) and a plain model + AdamW over its trainable parameters
    (not DINO's teacher) started from its initial weights."""
    from holly_hpc.embed.task import EmbedTask, build_model

    cfg = config(32, 4, 4, "cpu", augment=augment, family=family)
    torch.manual_seed(0)
    task = EmbedTask(cfg, torch.device("cpu"), base_dir=Path("."))
    model = build_model(cfg["model"], task.channels, 32, cfg["seed"])
    model.load_state_dict(task.model.state_dict())
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg["train"]["lr"], weight_decay=cfg["train"]["weight_decay"])
    return task, model, optimizer


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.allclose(sa[name].float(), sb[name].float(), rtol=1e-6, atol=1e-7), name


def test_plain_step_computes_the_framework_step():
    task, model, optimizer = _task_and_plain_copy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(2):  # two steps: the second also sees the optimizer state and the cleared gradients
        x, _ = task.dataset.load(task.dataset.train_indices(step, 4))  # the framework's batch of this step
        plain_step(model, optimizer, x)
        task.train_step(step)
        _assert_same_state(model, task.model)  # parameters and the codebook's EMA buffers
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("encoder" in k for k in moved) and any("decoder" in k for k in moved)  # the step did something


def test_the_comparison_notices_a_different_step():
    """A control: the same comparison fails for a step on other data, so the equality above means something."""
    task, model, optimizer = _task_and_plain_copy()
    x, _ = task.dataset.load(task.dataset.train_indices(0, 4))
    plain_step(model, optimizer, x.flip(-1))
    task.train_step(0)
    with pytest.raises(AssertionError):
        _assert_same_state(model, task.model)


@pytest.mark.parametrize("family", ["simclr", "dino"])
def test_plain_self_supervised_step_computes_the_framework_step(family):
    """The same views (the framework's generator of the step) through the plain step and the teacher update
    give the framework's parameters, DINO's teacher and centre included."""
    from holly_hpc.embed.data import step_generator
    from holly_hpc.embed.task import make_views

    task, model, optimizer = _task_and_plain_copy(family, augment=True)
    cfg = task.config
    for step in range(2):
        x, _ = task.dataset.load(task.dataset.train_indices(step, 4))
        plain_step(model, optimizer, make_views(model, x, cfg["data"], step_generator(cfg["seed"], 2, step)))
        if family == "dino":
            model.after_step(step, cfg["train"]["steps"])
        task.train_step(step)
        _assert_same_state(model, task.model)


def test_json_rows_cover_the_self_supervised_families(capsys):
    args = ["--device", "cpu", "--sizes", "32", "--batch", "4", "--width", "4", "--steps", "1", "--warmup", "1"]
    assert main([*args, "--families", "simclr", "dino", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["simclr", "dino"] and all(r["ratio_vs_plain"] > 0 for r in rows)
