"""Self-supervised families (SimCLR, DINO), their views, and the normalisation modes of the embed kind."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.embed.data import EmbedDataset
from holly_hpc.embed.ssl import DINO, SimCLR, dino_loss, nt_xent, nt_xent_reference, teacher_momentum
from holly_hpc.embed.synthetic import SyntheticCells
from holly_hpc.embed.task import EmbedTask, build_model
from holly_hpc.embed.views import ViewOptions, draw, random_views, reference_view
from holly_hpc.io.images import FolderCollection
from holly_hpc.runtime.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from holly_hpc.runtime.task import run_task
from holly_hpc.spec import SpecError, load_spec

from .test_embed_task import EMBED_TINY, _config, _experiment, write_tiff_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SSL = {"model": {"family": "dino", "width": 4, "latent_dim": 8, "ssl": {"prototypes": 16, "local_crops": 2}}}
STILL = {"rotation_deg": 0.0, "gain": 0.0, "gamma": 0.0, "offset": 0.0, "blur_probability": 0.0, "noise": 0.0}


# ------------------------------------------------------------------------------------------ views
@settings(max_examples=25, deadline=None)
@given(
    size=st.sampled_from([16, 24, 40]),
    channels=st.integers(1, 3),
    clamp=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_vectorised_views_equal_the_per_image_reference(size, channels, clamp, seed):
    scale = 1 if clamp else 3  # unnormalised values span more: the float32 agreement is 1e-5 per unit
    images = torch.rand(5, channels, 32, 32, generator=torch.Generator().manual_seed(seed)) * scale
    options = ViewOptions(size=size, scale=(0.2, 1.0), rotation_deg=30, blur_probability=0.7, clamp=clamp)
    fast = random_views(images, options, torch.Generator().manual_seed(seed))
    draws = draw(5, channels, options, torch.Generator().manual_seed(seed))
    slow = torch.stack([reference_view(images[i], draws, i, options) for i in range(5)])
    assert fast.shape == (5, channels, size, size)
    torch.testing.assert_close(fast, slow, atol=1e-5 * scale, rtol=1e-5)


def test_a_full_crop_without_changes_is_the_image_and_turns_are_exact_symmetries():
    images = torch.rand(16, 2, 24, 24, generator=torch.Generator().manual_seed(0))
    identity = ViewOptions(size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), flips=False, rot90=False, **STILL)
    torch.testing.assert_close(random_views(images, identity, torch.Generator()), images, atol=1e-5, rtol=0)
    turned = ViewOptions(size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), flips=True, rot90=True, **STILL)
    views = random_views(images, turned, torch.Generator().manual_seed(1))
    symmetries = [image for k in range(4) for image in (images.rot90(k, (-2, -1)), images.rot90(k, (-2, -1)).flip(-1))]
    errors = torch.stack([(views - s).abs().amax(dim=(1, 2, 3)) for s in symmetries])  # (8, B)
    assert (errors.min(dim=0).values < 1e-5).all()  # every view is one of the square's 8 symmetries
    assert len(set(errors.argmin(dim=0).tolist())) > 3  # and they vary


def test_views_never_mix_channels_and_draw_in_a_fixed_order():
    images = torch.rand(8, 2, 32, 32, generator=torch.Generator().manual_seed(2))
    images[:, 1] = 0
    options = ViewOptions(size=32, offset=0.0, noise=0.0)
    views = random_views(images, options, torch.Generator().manual_seed(3))
    assert views[:, 1].abs().max() == 0 and views[:, 0].abs().max() > 0.1  # a dark channel stays dark
    quiet = draw(8, 2, ViewOptions(size=32, blur_probability=0.0, noise=0.0), torch.Generator().manual_seed(4))
    busy = draw(8, 2, ViewOptions(size=32), torch.Generator().manual_seed(4))
    assert torch.equal(quiet.centre, busy.centre) and torch.equal(quiet.angle, busy.angle)  # switching blur off
    assert torch.equal(quiet.noise, busy.noise)  # does not shift the other draws


# ------------------------------------------------------------------------------------------ objectives
def test_nt_xent_equals_the_papers_row_by_row_loss_and_finds_identical_positives():
    z1 = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    z2 = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    loss, _ = nt_xent(z1, z2, 0.3)
    assert loss.item() == pytest.approx(nt_xent_reference(z1, z2, 0.3), rel=1e-5)
    orthogonal = torch.eye(6)
    loss, accuracy = nt_xent(orthogonal, orthogonal, 0.1)
    assert accuracy.item() == 1.0 and loss.item() < 1e-3  # each view's positive is the one it equals


def test_dino_loss_teacher_schedule_centre_and_ema():
    teacher = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    student = [torch.tensor([[0.0, 0.0]])] * 3  # uniform: the cross-entropy is log 2 for every pair
    assert dino_loss(student, teacher, 1.0).item() == pytest.approx(math.log(2))
    assert teacher_momentum(0, 100, 0.99) == pytest.approx(0.99) and teacher_momentum(100, 100, 0.99) == 1.0
    assert 0.99 < teacher_momentum(50, 100, 0.99) < 1
    model = DINO(18, 1, 16, 8, width=4, prototypes=16, local_views=1)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    model.after_step(0, 100)  # m = 0.996 at step 0 (the default momentum)
    moved = [(t - b).mean().item() for t, b in zip(model.teacher.parameters(), before, strict=True)]
    assert all(m == pytest.approx(0.004, abs=1e-5) for m in moved)
    images = torch.rand(4, 1, 16, 16)
    model.train()
    out = model([images, images.flip(-1), images[..., :8, :8].contiguous()])
    assert model.center.abs().sum() > 0 and out["loss_terms"]["distillation"].requires_grad
    assert out["stats"]["teacher_entropy"] <= math.log(16) + 1e-5


@pytest.mark.parametrize("family", ["simclr", "dino"])
def test_self_supervised_families_expose_the_same_readouts(family):
    config = _config({"model": {**SSL["model"], "family": family}})
    model = build_model(config["model"], 2, 32, 0)
    assert isinstance(model, SimCLR if family == "simclr" else DINO)
    model.eval()
    out = model(torch.rand(3, 2, 32, 32))
    assert out["embedding"].shape == (3, 8) and out["features"].shape == (3, model.feature_dim) == (3, 32)
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(3))


# ------------------------------------------------------------------------------------------ the kind
@pytest.mark.parametrize("family", ["simclr", "dino"])
def test_self_supervised_runs_write_readouts_views_and_resume_exactly(write_spec, tmp_path, family):
    changes = {"model": {**SSL["model"], "family": family}}
    whole = _experiment(write_spec, tmp_path, f"whole-{family}", changes)
    cut = _experiment(write_spec, tmp_path, f"cut-{family}", changes)
    assert run_task(whole, 0, out=io.StringIO()).completed
    first = run_task(cut, 0, stop_after_step=4, out=io.StringIO())
    assert not first.completed and [s for s, _ in list_checkpoints(cut.task_dir(0) / "checkpoints")] == [3, 4]
    run_task(cut, 0, out=io.StringIO())
    a = load_checkpoint(latest_checkpoint(whole.task_dir(0) / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(cut.task_dir(0) / "checkpoints"))
    for key, tensor in a["kind"]["model"].items():  # DINO's teacher and centre included
        assert torch.equal(tensor, b["kind"]["model"][key]), key
    if family == "dino":
        assert any(key.startswith("teacher.") for key in a["kind"]["model"]) and "center" in a["kind"]["model"]
    task_dir = whole.task_dir(0)
    group = zarr.open_group(str(task_dir / "outputs.zarr"), mode="r")
    assert group["embeddings/train/embedding"].shape[1] == 8 and group["embeddings/train/features"].shape[1] == 32
    assert group["embeddings"].attrs["family"] == family
    assert (task_dir / "final" / "inputs_and_views.png").stat().st_size > 0
    import json

    final = json.loads((task_dir / "final" / "metrics.json").read_text())
    term = "eval_contrastive" if family == "simclr" else "eval_distillation"
    assert np.isfinite(final[term]) and "eval_logreg_balanced_accuracy" in final


def test_simclr_learns_to_tell_each_images_views_from_the_others():
    steps = 200
    config = _config(
        {"model": {**SSL["model"], "family": "simclr", "width": 8}, "train": {"steps": steps, "batch_size": 16}}
    )
    kind = EmbedTask(config, torch.device("cpu"), base_dir=None)
    losses = [float(kind.train_step(step)["train_contrastive"]) for step in range(steps)]
    chance = math.log(2 * 16 - 1)  # a view's positive among 2B - 1 candidates, none preferred
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < chance - 0.3 and last < first - 0.4, (first, last, chance)


def test_dino_teacher_is_not_optimised_but_is_compared_across_ranks():
    kind = EmbedTask(_config(SSL), torch.device("cpu"), base_dir=None)
    optimised = {id(p) for group in kind.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in kind.model.teacher.parameters())
    compared = {id(p) for p in kind.trained_parameters()}
    assert id(kind.model.center) in compared and all(id(p) in compared for p in kind.model.teacher.parameters())


def test_self_supervised_spec_errors_name_the_key(write_spec):
    import yaml

    def spec(model: dict, data: dict | None = None) -> str:
        doc = {"experiment": "bad", **EMBED_TINY, "model": model, "data": {**EMBED_TINY["data"], **(data or {})}}
        return yaml.safe_dump(doc, sort_keys=False)

    with pytest.raises(SpecError, match=r"bad.yaml:\d+:\d+: model.channel_mode.*use joint"):
        load_spec(write_spec(raw=spec({**SSL["model"], "channel_mode": "fold"}), name="bad.yaml"))
    with pytest.raises(SpecError, match=r"data.views.global_scale.*the first value is the smaller"):
        load_spec(write_spec(raw=spec(SSL["model"], {"views": {"global_scale": [0.9, 0.3]}}), name="bad.yaml"))


# ------------------------------------------------------------------------------------------ normalisation
def _two_brightness_folder(tmp_path):
    import tifffile

    root = tmp_path / "bright"
    root.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(100, 1000, size=(1, 20, 20)).astype(np.uint16)
    for i in range(6):
        tifffile.imwrite(root / f"dim{i}.tif", base)
        tifffile.imwrite(root / f"bright{i}.tif", base * 4)
    return root


def test_dataset_normalisation_keeps_brightness_that_per_image_normalisation_removes(tmp_path):
    root = _two_brightness_folder(tmp_path)
    collection = FolderCollection(root)
    base = _config({"data": {"source": "folder", "image_size": 20, "split": {"val": 0.0, "test": 0.0}}})["data"]
    ids = collection.ids
    dim, bright = ids.index("dim0.tif"), ids.index("bright0.tif")
    per_image = EmbedDataset(collection, base, 0)
    torch.testing.assert_close(per_image.prepare(dim), per_image.prepare(bright))
    dataset = EmbedDataset(collection, {**base, "normalise": {"mode": "dataset", "low": 0.0, "high": 100.0}}, 0)
    raw = np.asarray(collection.read(bright), dtype=np.float32)
    assert dataset.levels.shape == (1, 2) and dataset.levels[0, 1] == raw.max()
    assert dataset.prepare(bright).max() == 1.0 and dataset.prepare(dim).max() < 0.3  # 4x darker stays darker
    none = EmbedDataset(collection, {**base, "normalise": {"mode": "none", "low": 0.5, "high": 99.5}}, 0)
    assert torch.equal(none.prepare(bright), torch.from_numpy(raw))
    given_levels = EmbedDataset(
        collection,
        {**base, "normalise": {"mode": "dataset", "low": 0.5, "high": 99.5}},
        0,
        levels=torch.tensor([[0.0, 8.0]]),
    )
    assert given_levels.prepare(dim).max() == 1.0  # levels from elsewhere (the training run) are used as given


def test_new_images_are_embedded_with_the_training_runs_dataset_levels(write_spec, tmp_path, cli):
    changes = {"data": {"normalise": {"mode": "dataset"}}, "model": {**SSL["model"], "family": "simclr"}}
    exp = _experiment(write_spec, tmp_path, "levels", changes)
    run_task(exp, 0, out=io.StringIO())
    payload = load_checkpoint(latest_checkpoint(exp.task_dir(0) / "checkpoints"))
    levels = payload["kind"]["normalise_levels"]
    assert levels.shape == (2, 2) and (levels[:, 1] > levels[:, 0]).all()
    cells = SyntheticCells(4, 40, classes=2, seed=9)
    write_tiff_folder(cells, tmp_path / "new")
    out = tmp_path / "new.zarr"
    code, _, stderr = cli("embed", exp.root, "--task", "0", "--input", tmp_path / "new", "--output", out)
    assert code == 0, stderr
    config = exp.task(0).config
    model = build_model(config["model"], 2, 32, config["seed"])
    model.load_state_dict(payload["kind"]["model"])
    model.eval()
    data = {**config["data"], "split": {"val": 0.0, "test": 0.0}}
    dataset = EmbedDataset(FolderCollection(tmp_path / "new"), data, 0, levels=levels)
    with torch.no_grad():
        expected = model(dataset.load(range(4))[0])["embedding"].numpy()
    np.testing.assert_allclose(zarr.open_group(str(out), mode="r")["embeddings/embedding"][:], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------ holly-hpc embed
def test_holly_hpc_embed_prints_every_readout_and_writes_one_table_of_all_images(write_spec, tmp_path, cli):
    import csv

    exp = _experiment(write_spec, tmp_path, "table", {"model": {**SSL["model"], "family": "simclr"}})
    run_task(exp, 0, out=io.StringIO())
    table = tmp_path / "all.csv"
    code, stdout, stderr = cli("embed", exp.root, "--task", "0", "--table", table)
    assert code == 0, stderr
    assert "readouts: embedding (8), features (32)" in stdout and "48 rows" in stdout
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 48 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert len({r["id"] for r in rows}) == 48  # every image once
    group = zarr.open_group(str(exp.task_dir(0) / "outputs.zarr"), mode="r")
    stored = dict(zip(group["embeddings/val/id"][:], group["embeddings/val/features"][:], strict=True))
    row = next(r for r in rows if r["split"] == "val")
    np.testing.assert_allclose([float(row[f"features_{i}"]) for i in range(32)], stored[row["id"]], rtol=1e-6)
    code, _, stderr = cli("embed", exp.root, "--task", "0", "--table", table)
    assert code == 1 and "--overwrite" in stderr  # an existing table is kept
    code, _, stderr = cli("embed", exp.root, "--task", "0")
    assert code == 2 and "--input" in stderr and "--table" in stderr

    write_tiff_folder(SyntheticCells(5, 40, classes=2, seed=9), tmp_path / "new")
    new_table = tmp_path / "new.csv"
    code, stdout, stderr = cli(
        "embed", exp.root, "--task", "0", "--input", tmp_path / "new", "--labels", "folders", "--table", new_table
    )
    assert code == 0, stderr
    assert "readouts: embedding (8), features (32)" in stdout
    new_rows = list(csv.DictReader(new_table.open()))
    assert len(new_rows) == 5 and {r["split"] for r in new_rows} == {"input"} and all(r["label"] for r in new_rows)
