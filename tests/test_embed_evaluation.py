"""The final evaluation's folds cannot leak: grouped and temporal splits, probes, chance over tested classes,
and the eval section's rules (which group and time each image has) with errors that name the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.embed.evaluation import CLASSIFIERS, evaluate_readouts, make_folds, probe
from holly_hpc.embed.groups import GroupRuleError, image_keys, image_times
from holly_hpc.io.images import FolderCollection
from holly_hpc.runtime.task import run_task
from holly_hpc.spec import SpecError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@settings(max_examples=40, deadline=None)
@given(
    n_groups=st.integers(4, 12),
    per_group=st.integers(1, 6),
    folds=st.integers(2, 6),
    seed=st.integers(0, 1000),
)
def test_grouped_folds_never_put_one_group_on_both_sides(n_groups, per_group, folds, seed):
    groups = np.repeat([f"cell{g}" for g in range(n_groups)], per_group)
    labels = np.array([g % 2 for g in range(n_groups)]).repeat(per_group)
    pairs, described = make_folds(labels, "grouped", folds, seed, groups=groups)
    assert described == {"name": "grouped", "groups": n_groups, "folds": len(pairs)}
    tested = np.concatenate([test for _, test in pairs])
    assert sorted(tested.tolist()) == list(range(len(labels)))  # every image tested exactly once
    for train, test in pairs:
        assert not set(groups[train]) & set(groups[test])


def test_a_class_held_by_one_group_is_refused_by_name():
    labels, groups = np.array(["a", "a", "b", "b", "b"]), np.array(["c1", "c1", "c2", "c3", "c3"])
    with pytest.raises(ValueError, match="every class in at least two groups; class 'a' is in 1 of the 3 groups"):
        make_folds(labels, "grouped", 3, 0, groups=groups)


@settings(max_examples=40, deadline=None)
@given(times=st.lists(st.integers(0, 30), min_size=6, max_size=40), gap=st.integers(0, 3), folds=st.integers(1, 5))
def test_temporal_folds_train_on_the_past_only_with_the_gap(times, gap, folds):
    times = np.array(times, dtype=float)
    labels = np.arange(len(times)) % 2
    try:
        pairs, described = make_folds(labels, "temporal", folds, 0, times=times, gap=gap)
    except ValueError as exc:  # too few time points (or too few left before the gap) is said, not hidden
        assert "temporal" in str(exc)
        return
    assert described["name"] == "temporal" and described["gap"] == gap
    for train, test in pairs:
        assert times[train].max() < times[test].min() - gap


def _group_identity_features(seed=0, groups=20, per_group=8):
    """Each group (a cell) has a signature of its own and one label; the label is unrelated to the signature,
    so a probe can only score above chance by recognising a group it saw in training."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, 16))
    features = np.repeat(centres, per_group, axis=0) + 0.05 * rng.normal(size=(groups * per_group, 16))
    labels = np.repeat(rng.permutation(np.arange(groups) % 2), per_group)
    names = np.repeat([f"cell{g}" for g in range(groups)], per_group)
    return features, labels, names


def test_stratified_folds_leak_group_identity_and_grouped_folds_do_not():
    features, labels, groups = _group_identity_features()
    leaky, _ = make_folds(labels, "stratified", 5, 0)
    fair, _ = make_folds(labels, "grouped", 5, 0, groups=groups)
    leaked, honest = probe(features, labels, leaky), probe(features, labels, fair)
    assert leaked["knn_balanced_accuracy"] > 0.95  # neighbouring frames of one cell on both sides
    assert honest["knn_balanced_accuracy"] < 0.75  # what the features really know about the label: nothing
    assert set(honest) == {f"{c}_{s}{std}" for c in CLASSIFIERS for s in ("balanced_accuracy", "macro_f1")
                           for std in ("", "_std")}  # fmt: skip


def test_the_report_says_the_split_and_counts_chance_over_the_classes_tested():
    # Three classes, but the last time points hold only two of them: a temporal fold there tests two.
    times = np.arange(30, dtype=float)
    labels = np.array(["a", "b", "c"] * 6 + ["a", "b"] * 6)
    features = np.random.default_rng(1).normal(size=(30, 4))
    pixels = np.random.default_rng(2).normal(size=(30, 2, 5, 5))
    report = evaluate_readouts({"embedding": features}, labels, pixels, "pca", 2, 0, split="temporal", times=times)
    assert report["split"] == {"name": "temporal", "gap": 0.0, "folds": 2}
    assert report["chance_balanced_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert report["embedding"]["baseline"]["name"] == "pca4"
    assert 0 <= report["embedding"]["logreg_balanced_accuracy"] <= 1
    auto = evaluate_readouts({"embedding": features}, labels, pixels, "pca", 3, 0, groups=(np.arange(30) // 3))
    assert auto["split"]["name"] == "grouped" and auto["split"]["groups"] == 10  # auto: grouped when known
    plain = evaluate_readouts({"embedding": features}, labels, pixels, "pca", 3, 0)
    assert plain["split"]["name"] == "stratified" and plain["chance_balanced_accuracy"] == pytest.approx(1 / 3)


def _cells_folder(root, cells=6, frames=4):
    """root/<class>/cell<k>/t<j>.tif: one folder per cell, its frames over time; and a CSV naming them."""
    rows = ["file,label,track,frame"]
    rng = np.random.default_rng(0)
    for k in range(cells):
        label = "round" if k % 2 else "long"
        for j in range(frames):
            rel = f"{label}/cell{k}/t{j:04d}.tif"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / rel, rng.integers(0, 60000, (32, 32), dtype=np.uint16))
            rows.append(f"{rel},{label},track{k},{j}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_rules_give_each_image_its_group_and_time_and_name_what_is_missing(tmp_path):
    root = _cells_folder(tmp_path / "imgs")
    images = FolderCollection(root, labels=root / "labels.csv")
    every = range(len(images))
    by_folder = image_keys(images, every, {"folder": 1}, "eval.group_by")
    by_regex = image_keys(images, every, {"regex": r"/(?P<key>cell\d+)/"}, "eval.group_by")
    by_column = image_keys(images, every, {"column": "track"}, "eval.group_by", root / "labels.csv")
    assert len(set(by_folder)) == 6 and (by_regex == by_folder).all()
    assert [f"track{g[4:]}" for g in by_folder] == list(by_column)
    frames = image_times(images, every, {"regex": r"t(\d+)\.tif"}, "eval.time_by")
    assert sorted(set(frames)) == [0.0, 1.0, 2.0, 3.0]
    assert (image_times(images, every, {"column": "frame"}, "eval.time_by", root / "labels.csv") == frames).all()
    with pytest.raises(GroupRuleError, match=r"eval.group_by: .*t0000.tif has no folder at level 5"):
        image_keys(images, every, {"folder": 5}, "eval.group_by")
    with pytest.raises(GroupRuleError, match=r"eval.group_by: regex 'well\\d' does not match long/cell0/t0000.tif"):
        image_keys(images, every, {"regex": r"well\d"}, "eval.group_by")
    with pytest.raises(GroupRuleError, match=r"eval.time_by: .* has no column 'time' \(its columns: file, label"):
        image_times(images, every, {"column": "time"}, "eval.time_by", root / "labels.csv")
    with pytest.raises(GroupRuleError, match=r"eval\.time_by: a time must be a number"):
        image_times(images, every, {"folder": 1}, "eval.time_by")


EMBED_FOLDER = {
    "kind": "embed",
    "data": {
        "source": "folder",
        "folder": {"path": "imgs", "labels": "imgs/labels.csv"},
        "image_size": 32,
        "eval_size": 4,
        "split": {"val": 0.0, "test": 0.0},
    },
    "model": {"family": "ae", "width": 4},
    "train": {"steps": 2, "batch_size": 4, "log_every": 2, "checkpoint_every": 2, "eval_folds": 3},
}


def test_an_embed_run_splits_its_evaluation_by_cell_and_says_so(write_spec, tmp_path):
    from .test_embed_task import _experiment

    _cells_folder(tmp_path / "imgs")
    experiment = _experiment(write_spec, tmp_path, "grouped", {"eval": {"group_by": {"folder": 1}}}, EMBED_FOLDER)
    assert run_task(experiment, 0).completed
    report = json.loads((experiment.task_dir(0) / "final" / "eval.json").read_text())
    assert report["split"] == {"name": "grouped", "groups": 6, "folds": 3} and report["images"] == 24
    assert report["chance_balanced_accuracy"] == pytest.approx(0.5)
    metrics = json.loads((experiment.task_dir(0) / "final" / "metrics.json").read_text())
    assert 0 <= metrics["eval_knn_balanced_accuracy"] <= 1 and "eval_knn_balanced_accuracy_std" in metrics


def test_a_rule_that_misses_an_image_stops_the_run_before_it_trains(write_spec, tmp_path):
    from .test_embed_task import _experiment

    _cells_folder(tmp_path / "imgs")
    experiment = _experiment(
        write_spec, tmp_path, "miss", {"eval": {"group_by": {"regex": "cell[0-4]/"}}}, EMBED_FOLDER
    )
    with pytest.raises(GroupRuleError, match=r"does not match round/cell5/t0000\.tif"):
        run_task(experiment, 0)
    assert not list((experiment.task_dir(0)).glob("checkpoints/*"))  # nothing trained, nothing half-written


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"eval": {"split": "grouped"}}, "eval.split", "needs eval.group_by"),
        ({"eval": {"split": "temporal", "group_by": {"folder": 1}}}, "eval.split", "needs eval.time_by"),
        ({"eval": {"group_by": {"regex": "cell(\\d"}}}, "eval.group_by", "not a regular expression"),
        (
            {"eval": {"group_by": {"column": "track"}}, "data": {"folder": {"labels": "folders"}}},
            "eval.group_by",
            "labels CSV",
        ),
        ({"eval": {"group_by": {"well": 1}}}, "eval.group_by", ""),
    ],
)
def test_validate_names_the_eval_key_at_fault(write_spec, tmp_path, changes, key, words):
    from .test_embed_task import _experiment

    _cells_folder(tmp_path / "imgs")
    with pytest.raises(SpecError) as info:
        _experiment(write_spec, tmp_path, "bad", changes, EMBED_FOLDER)
    message = str(info.value)
    assert key in message and words in message, message
