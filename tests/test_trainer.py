"""The shared Trainer on the pose kind: exact resume, TensorBoard and zarr read back, final files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import zarr

from holly_hpc.experiment import freeze
from holly_hpc.registry import open_registry
from holly_hpc.runtime.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from holly_hpc.runtime.task import run_task
from holly_hpc.spec import load_spec
from holly_hpc.sweep import expand


def _experiment(write_spec, tmp_path, name: str, changes: dict | None = None):
    spec = load_spec(write_spec({"experiment": name, **(changes or {})}, name=f"{name}.yaml"))
    url = f"sqlite:///{tmp_path / 'runs' / 'registry.sqlite'}"
    exp = freeze(spec, expand(spec), tmp_path / "runs", url)
    reg = open_registry(url)
    reg.init()
    return exp, reg


def _final_state(exp) -> dict:
    return load_checkpoint(latest_checkpoint(exp.task_dir(0) / "checkpoints"))


def test_resume_reproduces_the_uninterrupted_run_exactly(write_spec, tmp_path):
    whole, _ = _experiment(write_spec, tmp_path, "whole")
    cut, _ = _experiment(write_spec, tmp_path, "cut")
    assert whole.task(0).config == cut.task(0).config

    run_task(whole, 0, out=io.StringIO())
    first = run_task(cut, 0, stop_after_step=7, out=io.StringIO())  # "preempted" after step 7
    assert not first.completed and first.step == 7
    assert [s for s, _ in list_checkpoints(cut.task_dir(0) / "checkpoints")] == [7]
    log = io.StringIO()
    second = run_task(cut, 0, out=log)
    assert second.completed and "resumed from step_00000007.pt (step 7)" in log.getvalue()

    a, b = _final_state(whole), _final_state(cut)
    assert a["step"] == b["step"] == 20
    for key, tensor in a["kind"]["net"].items():
        assert torch.equal(tensor, b["kind"]["net"][key]), key
    for pa, pb in zip(a["kind"]["optimizer"]["state"].values(), b["kind"]["optimizer"]["state"].values(), strict=True):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # The metrics logged across the interruption equal the uninterrupted run's.
    za = zarr.open_group(str(whole.task_dir(0) / "outputs.zarr"), mode="r")
    zb = zarr.open_group(str(cut.task_dir(0) / "outputs.zarr"), mode="r")
    np.testing.assert_array_equal(za["metrics/loss"][:], zb["metrics/loss"][:])


def test_outputs_readable_back(write_spec, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp, reg = _experiment(write_spec, tmp_path, "outs")
    reg.upsert_experiment(exp.name, "", "", str(exp.root))
    reg.upsert_runs(
        exp.name,
        [
            {
                "task_index": 0,
                "task_id": exp.task(0).task_id,
                "config": "{}",
                "config_hash": "",
                "seed": 0,
                "out_dir": "",
            }
        ],
    )
    result = run_task(exp, 0, registry=reg, out=io.StringIO())
    task_dir = exp.task_dir(0)

    # TensorBoard: scalars at every log interval, image grids, hparams, all in the task's own run.
    tb = task_dir / "tb"
    assert [p for p in tb.iterdir() if p.is_dir()] == []  # no stray hparams subfolder
    ea = EventAccumulator(str(tb), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    # grouped by where they come from: the training step's, the held-out evaluation's
    assert {"train/loss", "train/lr", "eval/rot_err_median_deg", "eval/loss"} <= set(tags["scalars"])
    assert [e.step for e in ea.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.step for e in ea.Images("eval/inputs_vs_renders")] == [5, 10, 15, 20]
    hp = ea.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hp)
    # TensorBoard stores float32
    assert ea.Scalars("hparams/rot_err_median_deg")[-1].value == pytest.approx(
        result.final_metrics["rot_err_median_deg"], rel=1e-6
    )

    # zarr v3: one slot per log interval, plus the task's arrays.
    group = zarr.open_group(str(task_dir / "outputs.zarr"), mode="r")
    assert group.metadata.zarr_format == 3
    assert list(group["metrics/step"][:]) == [5, 10, 15, 20]
    assert np.isfinite(group["metrics/rot_err_median_deg"][:]).all()
    assert group["eval/rotations_pred"].shape == (16, 3, 3)
    assert group["structure/points"].shape == (40, 3)
    errors = group["eval/rotation_error_deg"][:]
    assert float(np.median(errors)) == pytest.approx(result.final_metrics["rot_err_median_deg"], rel=1e-6)

    # final/ and checkpoints/
    final = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert final["step"] == 20 and final["rot_err_median_deg"] == result.final_metrics["rot_err_median_deg"]
    for name in ("structure.ply", "structure.obj", "renders.png"):
        assert (task_dir / "final" / name).stat().st_size > 0
    assert (task_dir / "final" / "structure.ply").read_text().startswith("ply\nformat ascii 1.0\n")
    assert [s for s, _ in list_checkpoints(task_dir / "checkpoints")] == [10, 20]  # keep_checkpoints: 2

    # registry: metrics rows per log interval, heartbeat with the last step and loss
    rows = reg.metrics(exp.name, 0)
    assert sorted({s for s, _, _ in rows}) == [5, 10, 15, 20]
    (run,) = reg.runs(exp.name)
    assert run.last_step == 20 and run.last_loss == pytest.approx(ea.Scalars("train/loss")[-1].value, rel=1e-6)


def test_a_failing_registry_does_not_stop_training_and_nothing_is_lost(write_spec, tmp_path):
    from holly_hpc.registry.spool import SPOOL_FILE, SpooledRegistry

    exp, good = _experiment(write_spec, tmp_path, "noreg")
    good.upsert_experiment(exp.name, "", "", str(exp.root))
    good.upsert_runs(
        exp.name,
        [
            {
                "task_index": 0,
                "task_id": exp.task(0).task_id,
                "config": "{}",
                "config_hash": "",
                "seed": 0,
                "out_dir": "",
            }
        ],
    )
    # A database that is away: every write raises.
    broken = open_registry(f"sqlite:///{tmp_path / 'missing-dir' / 'nested' / 'r.sqlite'}")
    spool = exp.task_dir(0) / SPOOL_FILE
    result = run_task(exp, 0, registry=SpooledRegistry(broken, spool), out=io.StringIO())
    assert result.completed and (exp.task_dir(0) / "final" / "metrics.json").exists()
    assert SpooledRegistry(broken, spool).pending() == 2  # one batch of metrics + one heartbeat
    # The database is back: the spool replays in order, once.
    back = SpooledRegistry(good, spool)
    assert back.replay() and not spool.exists()
    assert sorted({s for s, _, _ in good.metrics(exp.name, 0)}) == [5, 10, 15, 20]
    (run,) = good.runs(exp.name)
    assert run.last_step == 20


def test_scalar_tags_group_training_and_evaluation():
    from holly_hpc.runtime.outputs import scalar_tags

    tags = scalar_tags({"loss": 1.0, "train_commitment": 2.0, "lr": 0.1}, {"eval_loss": 3.0, "codebook/used": 4.0})
    assert tags == {"train/loss": 1.0, "train/commitment": 2.0, "train/lr": 0.1, "eval/loss": 3.0, "codebook/used": 4.0}


def test_hparams_show_the_swept_keys_and_the_kinds_main_ones_with_booleans_as_booleans(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    from holly_hpc.runtime.outputs import TensorBoardSink, chosen_hparams

    config = {
        "kind": "pose",
        "seed": 3,
        "data": {"structure": "torus", "sigma": 1.5, "image_size": 32, "flag": True},
        "train": {"lr": 0.001, "batch_size": 8, "steps": 20, "log_every": 5},
        "model": {"channels": [4, 8], "hypotheses": 2},
    }
    chosen = chosen_hparams(config, ["data.flag", "model.channels"])
    assert chosen == {
        "kind": "pose",
        "seed": 3,
        "train.lr": 0.001,
        "train.batch_size": 8,
        "train.steps": 20,
        "data.structure": "torus",
        "data.sigma": 1.5,
        "model.hypotheses": 2,
        "data.flag": True,
        "model.channels": "[4, 8]",
    }
    assert "data.image_size" in chosen_hparams(config, None)  # no sweep known: every key

    sink = TensorBoardSink(tmp_path)
    sink.hparams(chosen, {"rot_err_median_deg": 2.0}, 20)
    sink.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["data.flag"].WhichOneof("kind") == "bool_value"
    assert start.session_start_info.hparams["data.flag"].bool_value is True
    assert start.session_start_info.hparams["train.lr"].number_value == 0.001
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    types = {info.name: info.type for info in experiment.hparam_infos}
    assert types["data.flag"] == api_pb2.DATA_TYPE_BOOL and types["train.lr"] == api_pb2.DATA_TYPE_FLOAT64


def test_a_sweep_names_each_tensorboard_run_after_its_overrides(write_spec, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    sweep = {"sweep": {"grid": {"train.lr": [0.003, 0.001], "data.sigma": [2]}}, "train": {"steps": 5, "log_every": 5}}
    exp, _ = _experiment(write_spec, tmp_path, "named", sweep)
    for task in exp.tasks:
        run_task(exp, task.index, out=io.StringIO())
    # TensorBoard over the experiment's tasks/ (the README's command) lists runs that say what differs.
    mux = EventMultiplexer().AddRunsFromDirectory(str(exp.root / "tasks"))
    mux.Reload()
    assert sorted(mux.Runs()) == sorted(f"{t.task_id}/tb/lr={t.overrides['train.lr']} sigma=2" for t in exp.tasks)
    for run in mux.Runs():
        events = EventAccumulator(str(exp.root / "tasks" / run)).Reload()
        assert "train/loss" in events.Tags()["scalars"]


def test_tensorboard_run_names_stay_one_folder_whatever_the_override_says():
    from hypothesis import given
    from hypothesis import strategies as st

    from holly_hpc.runtime.outputs import tensorboard_run_name

    assert tensorboard_run_name({}) == ""
    assert tensorboard_run_name({"data.sigma": 2, "model.sigma": 1}) == "data.sigma=2 model.sigma=1"
    assert tensorboard_run_name({"data.structure": "../../etc/passwd"}) == "structure=.._.._etc_passwd"

    @given(st.dictionaries(st.text(min_size=1, max_size=20), st.one_of(st.text(), st.floats(), st.integers())))
    def check(overrides):
        name = tensorboard_run_name(overrides)
        assert "/" not in name and "\x00" not in name and name not in (".", "..") and len(name) <= 120
        assert name == name.strip()

    check()
