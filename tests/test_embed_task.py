"""The embed kind end to end on small data: the data pipeline, training, embeddings in zarr equal to the
checkpoint's encoder output, TensorBoard's projector, evaluation files, exact resume, `holly-hpc embed`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.embed.data import (
    EmbedDataset,
    augment,
    fit_to_size,
    make_collection,
    split_of,
    step_generator,
)
from holly_hpc.embed.synthetic import (
    BACKGROUND,
    CLASS_NAMES,
    STAGE_NAMES,
    InfectedRedCells,
    SyntheticCells,
    write_tiff_folder,
)
from holly_hpc.embed.task import EmbedTask, build_model, reindex_matrices
from holly_hpc.experiment import freeze
from holly_hpc.io.images import FolderCollection, ImageFormatError
from holly_hpc.runtime.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from holly_hpc.runtime.task import run_task
from holly_hpc.spec import SpecError, apply_defaults, load_spec
from holly_hpc.sweep import expand

EMBED_TINY = {
    "kind": "embed",
    "data": {
        "source": "synthetic",
        "image_size": 32,
        "synthetic": {"count": 48, "classes": 2},
        "eval_size": 8,
        "split": {"val": 0.2, "test": 0.2},
    },
    "model": {"family": "vqvae", "width": 4, "grid": 2, "code_dim": 4, "codebook_size": 16},
    "train": {
        "steps": 6,
        "batch_size": 8,
        "lr": 0.003,
        "log_every": 3,
        "checkpoint_every": 3,
        "projector_images": 20,
        "eval_folds": 2,
        "embed_batch_size": 16,
    },
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(changes: dict | None = None) -> dict:
    from .conftest import deep_update

    spec = deep_update({"experiment": "e", "seed": 3, "device": "cpu", **EMBED_TINY}, changes or {})
    return apply_defaults(spec)


def _experiment(write_spec, tmp_path, name: str, changes: dict | None = None, sections: dict | None = None):
    """Freeze an experiment of TINY's launch settings with the kind sections (default: EMBED_TINY)."""
    import yaml

    from .conftest import TINY, deep_update

    # TINY's launch and resources, the embed kind's own data, model and train sections
    base = {
        **{k: v for k, v in TINY.items() if k not in ("data", "model", "train")},
        "experiment": name,
        "output_root": str(tmp_path / "runs"),
        **(sections or EMBED_TINY),
    }
    raw = yaml.safe_dump(deep_update(base, changes or {}), sort_keys=False)
    spec = load_spec(write_spec(raw=raw, name=f"{name}.yaml"))
    return freeze(spec, expand(spec), tmp_path / "runs", f"sqlite:///{tmp_path / 'runs' / 'registry.sqlite'}")


# ------------------------------------------------------------------------------------------ data
def test_synthetic_cells_are_16_bit_two_channel_balanced_and_reproducible():
    cells = SyntheticCells(8, 48, classes=4, seed=1)
    image = cells.read(5)
    assert image.shape == (2, 48, 48) and image.dtype == np.uint16 and image.max() > 255
    np.testing.assert_array_equal(image, SyntheticCells(8, 48, classes=4, seed=1).read(5))
    assert not np.array_equal(image, SyntheticCells(8, 48, classes=4, seed=2).read(5))
    assert cells.labels == list(CLASS_NAMES) * 2
    mask = cells.mask(5)
    assert mask.dtype == bool and 0.05 < mask.mean() < 0.6  # one cell, inside the frame
    with pytest.raises(ValueError, match="2 to 4 classes"):
        SyntheticCells(8, 48, classes=5)


def _dna_spots(dna: np.ndarray) -> tuple[int, int, int]:
    """(bright pixels, separate peaks, connected bright regions) of a DNA channel: what a biologist looks at
    to stage a parasite."""
    from scipy import ndimage

    bright = dna > BACKGROUND + 0.35 * (dna.max() - BACKGROUND)
    smooth = ndimage.gaussian_filter(dna, 1.0)  # peaks of nuclei, not of shot noise
    peaks = (smooth == ndimage.maximum_filter(smooth, size=5)) & (
        smooth > BACKGROUND + 0.3 * (smooth.max() - BACKGROUND)
    )
    return int(bright.sum()), int(peaks.sum()), ndimage.label(ndimage.binary_opening(bright))[1]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), item=st.integers(0, 10_000))
def test_infected_red_cells_differ_in_kind_by_stage(seed, item):
    """Whatever the seed and item: an uninfected cell has nothing in the DNA channel; a ring is one small
    spot, a trophozoite one large nucleus, a schizont several smaller ones; the parasite lies inside the
    cell, and the cell sits near the centre of the frame (flow cytometry)."""
    cells = InfectedRedCells(10_004, 64, classes=4, seed=seed)
    stage = item % 4
    image, mask = cells.render(item)
    assert cells.labels[item] == STAGE_NAMES[stage] and image.shape == (2, 64, 64) and image.dtype == np.uint16
    dna = np.asarray(image[1], np.float64)
    if stage == 0:
        assert dna.max() < BACKGROUND + 200  # background and noise (sd 20 counts) only
        return
    area, peaks, regions = _dna_spots(dna)
    assert mask[np.unravel_index(dna.argmax(), dna.shape)]
    if stage == 1:
        assert area < 80 and peaks == 1, (area, peaks)  # measured on 4,000 cells: 45–61 pixels
    elif stage == 2:
        assert area > 280 and regions == 1, (area, regions)  # 294–370 pixels
    else:
        assert area < 250 and peaks >= 2, (area, peaks)  # 86–224 pixels, 2–11 peaks
    ys, xs = np.nonzero(mask)
    assert abs(ys.mean() - 32) < 8 and abs(xs.mean() - 32) < 8


def test_infected_red_cells_are_reproducible_and_name_their_stages():
    cells = InfectedRedCells(8, 32, classes=3, seed=4)
    assert cells.labels == ["uninfected", "ring", "trophozoite"] * 2 + ["uninfected", "ring"]
    np.testing.assert_array_equal(cells.read(7), InfectedRedCells(8, 32, classes=3, seed=4).read(7))
    with pytest.raises(ValueError, match=r"infected_rbc has 2 to 4 classes .*schizont"):
        InfectedRedCells(8, 32, classes=1)


def test_the_spec_chooses_the_generated_dataset_by_name(write_spec):
    path = write_spec(raw="experiment: e\nkind: embed\ndata:\n  synthetic:\n    dataset: malaria\n", name="e.yaml")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "e.yaml:5:14: data.synthetic.dataset" in str(err.value) and "infected_rbc" in str(err.value)
    data = apply_defaults(
        {
            "experiment": "e",
            "kind": "embed",
            "data": {"synthetic": {"dataset": "infected_rbc", "count": 6, "classes": 3}},
        }
    )["data"]
    collection = make_collection(data, seed=0, base_dir=Path("."))
    assert isinstance(collection, InfectedRedCells) and collection.labels[:3] == list(STAGE_NAMES[:3])
    assert isinstance(
        make_collection(apply_defaults({"experiment": "e", "kind": "embed"})["data"], 0, Path(".")), SyntheticCells
    )  # the default dataset


def test_fit_to_size_crops_centred_and_pads_around():
    image = torch.arange(2 * 6 * 8, dtype=torch.float32).view(2, 6, 8)
    cropped = fit_to_size(image, 4)
    assert torch.equal(cropped, image[:, 1:5, 2:6])
    padded = fit_to_size(image[:, :3, :3], 5)
    assert (
        padded.shape == (2, 5, 5)
        and torch.equal(padded[:, 1:4, 1:4], image[:, :3, :3])
        and padded[:, 0].abs().sum() == 0
    )


def test_splits_depend_on_the_id_only():
    ids = [f"plate1/cell_{i}.tif" for i in range(2000)]
    names = [split_of(i, 0.1, 0.2) for i in ids]
    assert abs(names.count("test") / 2000 - 0.2) < 0.03 and abs(names.count("val") / 2000 - 0.1) < 0.03
    assert [split_of(i, 0.1, 0.2) for i in reversed(ids)] == names[::-1]  # order does not matter


def test_training_batches_are_a_pure_function_of_the_step_and_cover_each_epoch():
    config = _config()
    dataset = EmbedDataset(SyntheticCells(48, 32, 2, 0), config["data"], seed=3)
    train = dataset.splits["train"]
    batch = 8
    steps = -(-len(train) // batch) * 2
    seen = np.concatenate([dataset.train_indices(s, batch) for s in range(steps)])
    first_epoch = seen[: len(train)]
    assert sorted(first_epoch) == sorted(train)  # every training image once per epoch
    again = EmbedDataset(SyntheticCells(48, 32, 2, 0), config["data"], seed=3)
    np.testing.assert_array_equal(again.train_indices(5, batch), dataset.train_indices(5, batch))
    assert not np.array_equal(
        EmbedDataset(SyntheticCells(48, 32, 2, 0), config["data"], seed=4).train_indices(0, batch),
        dataset.train_indices(0, batch),
    )
    assert set(seen) <= set(train)


def test_augment_is_seeded_and_only_moves_pixels_without_jitter():
    x = torch.rand(16, 2, 12, 12)
    a = augment(x, step_generator(0, 2, 5), True, True, 0.0)
    b = augment(x, step_generator(0, 2, 5), True, True, 0.0)
    assert torch.equal(a, b)
    # flips and quarter turns permute each image's pixels: per-image sorted values are unchanged
    assert torch.equal(a.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)
    assert not torch.equal(a, x)
    jittered = augment(x, step_generator(0, 2, 5), False, False, 0.2)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.equal(jittered, x)
    # gain 1 ± 0.2 and offset ± 0.1: above 0.5 every value stays within [0.8x - 0.1, 1.2x + 0.1]
    bright = x > 0.5
    assert torch.all(jittered[bright] >= 0.8 * x[bright] - 0.1 - 1e-6)
    assert torch.all(jittered[bright] <= (1.2 * x[bright] + 0.1).clamp_max(1) + 1e-6)
    # one gain and offset per image and channel: the map is affine within each (image, channel)
    inside = (jittered > 0) & (jittered < 1)
    for b, c in [(0, 0), (3, 1), (9, 0)]:
        xs, ys = x[b, c][inside[b, c]], jittered[b, c][inside[b, c]]
        design = torch.stack([xs, torch.ones_like(xs)], 1)
        fit = torch.linalg.lstsq(design, ys[:, None]).solution
        assert torch.allclose(design @ fit, ys[:, None], atol=1e-5)


def test_folder_of_16_bit_tiffs_with_folder_labels_is_normalised_per_channel(tmp_path):
    cells = SyntheticCells(12, 40, classes=3, seed=0)
    write_tiff_folder(cells, tmp_path / "cells")
    collection = FolderCollection(tmp_path / "cells", labels="folders")
    assert collection.channels == 2 and len(collection) == 12
    assert sorted(set(collection.labels)) == ["elongated", "lobed", "round"]
    config = _config({"data": {"image_size": 32}})
    dataset = EmbedDataset(collection, config["data"], seed=0)
    items, kept = dataset.load(range(12))
    assert items.shape == (12, 2, 32, 32) and items.dtype == torch.float32 and list(kept) == list(range(12))
    assert items.min() == 0 and items.max() == 1
    assert (items.flatten(2).amax(-1) > 0.99).all()  # every channel reaches the top of the range


def test_a_file_that_breaks_at_read_time_is_skipped_or_named(tmp_path):
    cells = SyntheticCells(6, 32, classes=2, seed=0)
    write_tiff_folder(cells, tmp_path / "cells")
    victim = sorted((tmp_path / "cells").rglob("*.tif"))[2]
    collection = FolderCollection(tmp_path / "cells", labels="folders")
    data = tifffile.imread(victim)
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) - data.nbytes // 2])  # truncated after indexing
    failing = EmbedDataset(collection, _config({"data": {"on_bad_file": "fail"}})["data"], seed=0)
    with pytest.raises(ImageFormatError, match=victim.name):
        failing.load(range(6))
    skipping = EmbedDataset(collection, _config({"data": {"on_bad_file": "skip"}})["data"], seed=0)
    with pytest.warns(UserWarning, match=victim.name):
        items, kept = skipping.load(range(6))
    assert len(items) == 5 and 2 not in kept and skipping.bad[-1][0].endswith(victim.name)


def test_shape_reindexing_is_a_symmetric_permutation():
    points = torch.randn(4, 10, 2)
    matrices = torch.cdist(points, points)[:, None]
    shuffled = reindex_matrices(matrices, torch.Generator().manual_seed(0))
    assert shuffled.shape == matrices.shape
    assert torch.allclose(shuffled, shuffled.transpose(-1, -2)) and torch.all(shuffled.diagonal(dim1=-2, dim2=-1) == 0)
    assert torch.allclose(shuffled.flatten(1).sort(-1).values, matrices.flatten(1).sort(-1).values)


# ------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize(
    "family,mode,dim",
    [
        ("ae", "joint", 6),
        ("vae", "joint", 6),
        ("vqvae", "joint", 4 * 2 * 2),
        ("vae", "fold", 2 * 6),
        ("vqvae", "fold", 2 * 4 * 2 * 2),
    ],
)
def test_build_model_gives_every_family_and_channel_mode(family, mode, dim):
    config = _config({"model": {"family": family, "channel_mode": mode, "latent_dim": 6, "beta": 4.0}})
    model = build_model(config["model"], channels=2, image_size=32, seed=0)
    out = model(torch.rand(3, 2, 32, 32))
    assert out["reconstruction"].shape == (3, 2, 32, 32) and out["embedding"].shape == (3, dim)
    # encoder features: 8 x width channels (width 4), once per channel when folded
    assert out["features"].shape == (3, model.feature_dim) and model.feature_dim == 32 * (2 if mode == "fold" else 1)
    loss = model.loss(torch.rand(3, 2, 32, 32), out)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if family == "vae":
        inner = getattr(model, "model", model)
        assert inner.beta == 4.0


def test_schema_and_semantic_checks_name_the_key(write_spec, tmp_path):
    path = write_spec(
        raw="experiment: bad\nkind: embed\ndata:\n  source: folder\n  folder:\n    path: nowhere\n"
        "model:\n  family: shape\n  channel_mode: fold\n  latnet_dim: 8\n",
        name="bad.yaml",
    )
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "bad.yaml:10:3: model.latnet_dim" in str(err.value) and "latent_dim" in str(err.value)  # did you mean
    path.write_text(path.read_text().replace("  latnet_dim: 8\n", ""))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    text = str(err.value)
    assert "bad.yaml:6:11: data.folder.path" in text and "nowhere does not exist" in text
    assert "bad.yaml:9:17: model.channel_mode" in text and "use joint" in text


# ------------------------------------------------------------------------------------------ the kind
def test_training_writes_embeddings_equal_to_the_checkpoint_encoder_output(write_spec, tmp_path):
    exp = _experiment(write_spec, tmp_path, "emb")
    result = run_task(exp, 0, out=io.StringIO())
    assert result.completed
    task_dir = exp.task_dir(0)
    payload = load_checkpoint(latest_checkpoint(task_dir / "checkpoints"))
    config = exp.task(0).config
    model = build_model(config["model"], payload["kind"]["channels"], 32, config["seed"])
    model.load_state_dict(payload["kind"]["model"])
    model.eval()
    kind = EmbedTask(config, torch.device("cpu"), exp.spec_dir)
    group = zarr.open_group(str(task_dir / "outputs.zarr"), mode="r")
    total = 0
    for split in ("train", "val", "test"):
        stored = group[f"embeddings/{split}/embedding"][:]
        index = group[f"embeddings/{split}/index"][:]
        np.testing.assert_array_equal(index, kind.dataset.splits[split])
        items, _ = kind.dataset.load(index)
        with torch.no_grad():
            expected = model(items)
        np.testing.assert_allclose(stored, expected["embedding"].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            group[f"embeddings/{split}/features"][:], expected["features"].numpy(), rtol=1e-5, atol=1e-6
        )
        assert list(group[f"embeddings/{split}/id"][:]) == [f"synthetic/{i}" for i in index]
        assert list(group[f"embeddings/{split}/label"][:]) == [kind.dataset.labels[i] for i in index]
        total += len(index)
    assert total == 48
    assert group["embeddings"].attrs["label_names"] == ["elongated", "round"]

    final = json.loads((task_dir / "final" / "metrics.json").read_text())
    report = json.loads((task_dir / "final" / "eval.json").read_text())
    assert report["images"] == 48 and report["folds"] == 2
    assert report["embedding"]["dim"] == 16 and report["embedding"]["baseline"]["name"] == "pca16"
    # encoder features: 8 x width = 32 wide, a PCA baseline capped by the 24 training images of a fold
    assert report["features"]["dim"] == 32 and report["features"]["baseline"]["name"] == "pca24"
    for key in (
        "eval_logreg_balanced_accuracy",
        "eval_forest_macro_f1",
        "baseline_logreg_balanced_accuracy",
        "features_logreg_balanced_accuracy",
        "features_baseline_forest_macro_f1",
        "eval_perplexity",
        "eval_codes_used",
        "eval_recon",
    ):
        assert key in final and np.isfinite(final[key]), key
    assert (task_dir / "final" / "inputs_vs_reconstructions.png").stat().st_size > 0
    # TensorBoard: projector with labels and thumbnails, codebook histogram, losses
    projector = (task_dir / "tb" / "projector_config.pbtxt").read_text()
    assert "metadata.tsv" in projector and "sprite.png" in projector
    metadata = next((task_dir / "tb").rglob("metadata.tsv")).read_text().splitlines()
    assert len(metadata) == 20 and set(metadata) <= {"elongated", "round"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(task_dir / "tb"), size_guidance={"histograms": 0}).Reload()
    assert "codebook/codes_used_by_held_out_images" in events.Tags()["histograms"]
    assert {"train/loss", "eval/loss", "eval/perplexity", "train/commitment"} <= set(events.Tags()["scalars"])
    assert "eval/inputs_vs_reconstructions" in events.Tags()["images"]


def test_resume_reproduces_the_uninterrupted_run_exactly(write_spec, tmp_path):
    whole = _experiment(write_spec, tmp_path, "whole")
    cut = _experiment(write_spec, tmp_path, "cut")
    run_task(whole, 0, out=io.StringIO())
    first = run_task(cut, 0, stop_after_step=4, out=io.StringIO())
    assert not first.completed and [s for s, _ in list_checkpoints(cut.task_dir(0) / "checkpoints")] == [3, 4]
    run_task(cut, 0, out=io.StringIO())
    a = load_checkpoint(latest_checkpoint(whole.task_dir(0) / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(cut.task_dir(0) / "checkpoints"))
    for key, tensor in a["kind"]["model"].items():  # the EMA codebook included
        assert torch.equal(tensor, b["kind"]["model"][key]), key


def test_checkpoints_carry_the_codebook_restart_generator():
    """Dead-code restarts draw from the quantiser's own generator: a resumed run must continue its stream."""
    import copy

    from holly_hpc.embed.task import quantiser_of

    kind = EmbedTask(_config(), torch.device("cpu"), base_dir=None)
    generator = quantiser_of(kind.model).generator
    saved = copy.deepcopy(kind.state_dict())
    first = torch.rand(4, generator=generator)
    kind.load_state_dict(saved)
    assert torch.equal(torch.rand(4, generator=generator), first)
    # and the codebook buffers are among what the ranks' digests compare
    assert any(p is quantiser_of(kind.model).codebook for p in kind.trained_parameters())


def test_vq_codebook_uses_several_codes_per_image():
    config = _config({"train": {"steps": 30}})
    kind = EmbedTask(config, torch.device("cpu"), base_dir=None)
    for step in range(30):
        kind.train_step(step)
    codes = kind._held_out()["codes"].flatten(1)  # (images, grid²)
    distinct = torch.tensor([len(row.unique()) for row in codes], dtype=torch.float32)
    assert distinct.mean() > 1.5, distinct
    assert kind.evaluate()["eval_codes_used"] > 2


def test_holly_hpc_embed_embeds_new_images_with_the_trained_model(write_spec, tmp_path, cli):
    exp = _experiment(write_spec, tmp_path, "emb")
    run_task(exp, 0, out=io.StringIO())
    cells = SyntheticCells(7, 40, classes=2, seed=9)
    write_tiff_folder(cells, tmp_path / "new")
    (tmp_path / "new" / "round" / "broken.tif").write_bytes(b"not a tiff")
    out = tmp_path / "new-embeddings.zarr"

    code, stdout, stderr = cli("embed", exp.root, "--task", "0", "--input", tmp_path / "new", "--output", out)
    assert code == 1 and "broken.tif" in stderr and not out.exists()  # the run says fail: nothing written

    code, stdout, stderr = cli(
        "embed",
        exp.root,
        "--task",
        "0",
        "--input",
        tmp_path / "new",
        "--output",
        out,
        "--labels",
        "folders",
        "--skip-bad",
    )
    assert code == 0, stderr
    assert "7 image(s) embedded" in stdout and "1 skipped" in stdout
    group = zarr.open_group(str(out), mode="r")
    stored = group["embeddings/embedding"][:]
    assert stored.shape == (7, 16) and np.isfinite(stored).all()
    payload = load_checkpoint(latest_checkpoint(exp.task_dir(0) / "checkpoints"))
    config = exp.task(0).config
    model = build_model(config["model"], 2, 32, config["seed"])
    model.load_state_dict(payload["kind"]["model"])
    model.eval()
    dataset = EmbedDataset(
        FolderCollection(tmp_path / "new", labels="folders", on_bad="skip"),
        {**config["data"], "split": {"val": 0.0, "test": 0.0}},
        0,
    )
    with torch.no_grad():
        expected = model(dataset.load(range(7))[0])["embedding"].numpy()
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)
    assert sorted(set(group["embeddings/label"][:])) == ["elongated", "round"]
    assert group.attrs["checkpoint_step"] == 6

    code, _, stderr = cli("embed", exp.root, "--task", "0", "--input", tmp_path / "new", "--output", out, "--skip-bad")
    assert code == 1 and "--overwrite" in stderr
    assert zarr.open_group(str(out), mode="r")["embeddings/embedding"].shape == (7, 16)  # untouched


def test_shape_family_trains_on_cell_masks_and_is_probed_against_region_properties(write_spec, tmp_path):
    exp = _experiment(
        write_spec,
        tmp_path,
        "shapes",
        {
            "data": {"synthetic": {"count": 40, "classes": 2}},
            "model": {"family": "shape", "latent_dim": 5, "shape": {"points": 24, "normalise_scale": True}},
        },
    )
    assert run_task(exp, 0, out=io.StringIO()).completed
    task_dir = exp.task_dir(0)
    group = zarr.open_group(str(task_dir / "outputs.zarr"), mode="r")
    sizes = [group[f"embeddings/{s}/embedding"].shape for s in ("train", "val", "test")]
    assert sum(n for n, _ in sizes) == 40 and {d for _, d in sizes} == {5}
    report = json.loads((task_dir / "final" / "eval.json").read_text())
    assert report["embedding"]["baseline"]["name"] == "region_properties" and report["embedding"]["dim"] == 5
    final = json.loads((task_dir / "final" / "metrics.json").read_text())
    assert {"eval_recon", "eval_diagonal", "eval_symmetry", "eval_nonnegative"} <= set(final)
    assert (task_dir / "final" / "matrices_and_contours.png").stat().st_size > 0


def test_the_shape_transform_outlines_the_synthetic_cell():
    from holly_hpc.embed.shape import classical_mds, rigid_rmsd
    from holly_hpc.embed.task import ShapeTransform

    config = _config({"data": {"image_size": 48}})
    cells = SyntheticCells(4, 48, classes=4, seed=0)
    dataset = EmbedDataset(cells, config["data"], seed=0)
    transform = ShapeTransform(points=48, mask_channel=0, normalise_scale=False)
    for i in range(4):
        image = dataset.prepare(i)
        mask = transform.mask(image)
        truth = cells.mask(i)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.85  # Otsu finds the cell the generator drew
        matrix = transform(image)
        assert matrix.shape == (1, 48, 48)
        contour = classical_mds(matrix[0].numpy())
        # the matrix decodes back to a closed outline of the cell's size (radius 0.22–0.30 of the image)
        radius = np.linalg.norm(contour - contour.mean(0), axis=1).mean()
        assert 0.15 * 48 < radius < 0.45 * 48
        assert rigid_rmsd(classical_mds(transform(image)[0].numpy()), contour) < 1e-6


@pytest.mark.parametrize("source", ["zarr", "ome_zarr"])
def test_the_kind_trains_from_zarr_and_ome_zarr(write_spec, tmp_path, source):
    from holly_hpc.io.images import write_ome_zarr

    cells = SyntheticCells(12, 32, classes=2, seed=0)
    stack = np.stack([cells.read(i) for i in range(12)])  # (N, 2, 32, 32) uint16
    if source == "zarr":
        group = zarr.open_group(str(tmp_path / "cells.zarr"), mode="w", zarr_format=3)
        group.create_array("images", data=stack, chunks=(1, 2, 32, 32))
        group.create_array("labels", shape=(12,), dtype=str)[:] = np.array(cells.labels)
        data = {"source": "zarr", "zarr": {"path": "cells.zarr", "labels_array": "labels"}}
    else:
        mosaic = stack.reshape(3, 4, 2, 32, 32).transpose(2, 0, 3, 1, 4).reshape(2, 96, 128)  # a 3x4 tile mosaic
        write_ome_zarr(tmp_path / "cells.ome.zarr", mosaic, axes="cyx", version="0.5")
        data = {"source": "ome_zarr", "ome_zarr": {"path": "cells.ome.zarr"}}
    exp = _experiment(
        write_spec,
        tmp_path,
        f"from-{source}",
        {"data": {**data, "eval_size": 4}, "train": {"steps": 3, "log_every": 3}},
    )
    kind = EmbedTask(exp.task(0).config, torch.device("cpu"), exp.spec_dir)
    assert len(kind.dataset.collection) == 12 and kind.channels == 2
    first, _ = kind.dataset.load([0])
    expected = normalise_reference(stack[0])
    np.testing.assert_allclose(first[0].numpy(), expected, atol=1e-6)  # tile 0 is cell 0, in either store
    assert run_task(exp, 0, out=io.StringIO()).completed
    labels = kind.dataset.label_names
    assert labels == (["elongated", "round"] if source == "zarr" else [])


def normalise_reference(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """numpy's percentile normalisation, per channel: the oracle of the pipeline's."""
    image = image.astype(np.float64)
    lo = np.percentile(image, low, axis=(1, 2), keepdims=True)
    hi = np.percentile(image, high, axis=(1, 2), keepdims=True)
    return np.clip((image - lo) / (hi - lo), 0, 1)


def test_embed_input_may_be_a_folder_a_zarr_group_or_an_ome_zarr_image(tmp_path):
    from holly_hpc.embed.infer import open_input
    from holly_hpc.io.images import OmeZarrCollection, ZarrCollection, write_ome_zarr

    config = _config()
    stack = np.stack([SyntheticCells(4, 32, 2, 0).read(i) for i in range(4)])
    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    group.create_array("images", data=stack, chunks=(1, 2, 32, 32))
    plain = open_input(tmp_path / "plain.zarr", config, 2, "none", "fail")
    assert isinstance(plain, ZarrCollection) and len(plain) == 4
    np.testing.assert_array_equal(plain.read(3), stack[3])
    write_ome_zarr(tmp_path / "image.ome.zarr", stack.transpose(1, 0, 2, 3).reshape(2, 128, 32), axes="cyx")
    ome = open_input(tmp_path / "image.ome.zarr", config, 2, "none", "fail")
    assert isinstance(ome, OmeZarrCollection) and len(ome) == 4  # four 32² tiles at the run's image size
    np.testing.assert_array_equal(ome.read(2), stack[2])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_input(tmp_path / "nowhere", config, 2, "none", "fail")
