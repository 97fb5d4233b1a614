"""How much of what biologists label do embeddings carry? Probes on held-out folds that cannot leak.

Three classifiers (scikit-learn): logistic regression on standardised features (a linear probe), k nearest
neighbours by cosine similarity (what "similar cells lie close" means) and a random forest (non-linear,
scale-free). Each is fitted on a fold's training images and scored on its test images: balanced accuracy
and macro F1 over the classes that fold tests, reported as mean and std over the folds.

The folds (`split`):
  stratified  random stratified k-fold: only right when images are independent
  grouped     stratified group k-fold: the images of one group (a cell, a well, a time-lapse track) are all
              on one side, so a probe cannot score by recognising the group
  temporal    forward folds in time: train on the earlier time points, test on the next block, with a gap
              between them (neighbouring frames are near copies)
  auto        grouped where groups are known, else stratified

Every score comes with a baseline probed on the same folds, so a figure means something:
  pca     raw pixels reduced by PCA to the embedding's dimension (fitted inside each fold: no leakage)
  region  simple region properties of the masks (area, perimeter, axes, eccentricity, solidity), for
          the shape embedding
"""

from __future__ import annotations

import numpy as np

CLASSIFIERS = ("logreg", "knn", "forest")
SCORES = ("balanced_accuracy", "macro_f1")
SPLITS = ("auto", "stratified", "grouped", "temporal")
KNN_NEIGHBOURS = 10


def _pipeline(name: str, seed: int, pca_components: int | None = None, train_size: int = 0):
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()]
    if pca_components is not None:
        steps.append(PCA(n_components=pca_components, random_state=seed))
    if name == "logreg":
        steps += (
            [StandardScaler(), LogisticRegression(max_iter=2000)]
            if pca_components
            else [LogisticRegression(max_iter=2000)]
        )
    elif name == "knn":
        k = max(1, min(KNN_NEIGHBOURS, train_size))
        steps.append(KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance"))
    elif name == "forest":
        steps.append(RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1))
    else:
        raise ValueError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}")
    return make_pipeline(*steps)


def folds_for(labels: np.ndarray, folds: int) -> int:
    """As many folds as asked, but never more than the rarest class has members (sklearn's requirement)."""
    _, counts = np.unique(labels, return_counts=True)
    if len(counts) < 2:
        raise ValueError("evaluation needs at least two classes among the labelled images")
    if counts.min() < 2:
        raise ValueError(f"evaluation needs at least two images per class; the rarest class has {counts.min()}")
    return int(min(folds, counts.min()))


def resolve_split(split: str, groups, times) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if split == "auto":
        return "grouped" if groups is not None else "stratified"
    if split == "grouped" and groups is None:
        raise ValueError("split: grouped needs a group for every image (eval.group_by)")
    if split == "temporal" and times is None:
        raise ValueError("split: temporal needs a time for every image (eval.time_by)")
    return split


def make_folds(
    labels: np.ndarray,
    split: str,
    folds: int = 5,
    seed: int = 0,
    groups: np.ndarray | None = None,
    times: np.ndarray | None = None,
    gap: float = 0.0,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """[(train positions, test positions)] of the split, and a description of it for eval.json."""
    labels = np.asarray(labels)
    split = resolve_split(split, groups, times)
    described: dict = {"name": split}
    if split == "stratified":
        from sklearn.model_selection import StratifiedKFold

        k = folds_for(labels, folds)
        pairs = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels))
    elif split == "grouped":
        from sklearn.model_selection import StratifiedGroupKFold

        groups = np.asarray(groups).astype(str)
        n_groups = len(np.unique(groups))
        # A class held by one group is on one side only: every fold would train or test without it.
        per_class = {c: len(np.unique(groups[labels == c])) for c in np.unique(labels)}
        if len(per_class) < 2:
            raise ValueError("evaluation needs at least two classes among the labelled images")
        rare = min(per_class, key=per_class.get)
        if per_class[rare] < 2:
            raise ValueError(
                f"split: grouped needs every class in at least two groups; class {str(rare)!r} is in "
                f"{per_class[rare]} of the {n_groups} groups"
            )
        k = int(min(folds, *per_class.values()))
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        pairs = list(splitter.split(labels, labels, groups))
        described["groups"] = n_groups
    else:
        times = np.asarray(times, dtype=np.float64)
        distinct = np.unique(times)
        k = int(min(folds, len(distinct) - 1))
        if k < 1:
            raise ValueError("split: temporal needs at least two distinct time points")
        # Forward folds: the time line cut into k + 1 blocks of time points; fold j tests block j + 1 and
        # trains on everything at least `gap` earlier than that block's first time point.
        blocks = np.array_split(distinct, k + 1)
        pairs = []
        for block in blocks[1:]:
            test = np.flatnonzero((times >= block[0]) & (times <= block[-1]))
            train = np.flatnonzero(times < block[0] - gap)
            if len(train) and len(np.unique(labels[train])) >= 2:
                pairs.append((train, test))
        if not pairs:
            raise ValueError(f"split: temporal with gap {gap} leaves no fold with two classes to train on")
        described["gap"] = gap
    described["folds"] = len(pairs)
    return pairs, described


def probe(
    features: np.ndarray,
    labels: np.ndarray,
    pairs: list[tuple[np.ndarray, np.ndarray]],
    seed: int = 0,
    pca_components: int | None = None,
) -> dict[str, float]:
    """{"<classifier>_<score>": mean, "<classifier>_<score>_std": std} over the folds `pairs`, each score over
    the classes its test images hold."""
    from sklearn.metrics import f1_score

    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    labels = np.asarray(labels)
    per: dict[str, list[float]] = {f"{c}_{s}": [] for c in CLASSIFIERS for s in SCORES}
    for train, test in pairs:
        tested = np.unique(labels[test])
        for name in CLASSIFIERS:
            model = _pipeline(name, seed, pca_components, len(train)).fit(features[train], labels[train])
            predicted = model.predict(features[test])
            recalls = [np.mean(predicted[labels[test] == c] == c) for c in tested]
            per[f"{name}_balanced_accuracy"].append(float(np.mean(recalls)))
            per[f"{name}_macro_f1"].append(
                float(f1_score(labels[test], predicted, labels=tested, average="macro", zero_division=0))
            )
    out = {}
    for key, values in per.items():
        out[key], out[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    return out


def evaluate_readouts(
    readouts: dict[str, np.ndarray],
    labels,
    baseline_features: np.ndarray,
    baseline: str,
    folds: int = 5,
    seed: int = 0,
    split: str = "auto",
    groups=None,
    times=None,
    gap: float = 0.0,
) -> dict:
    """Probe each readout of the same images (e.g. "embedding" and "features") and its baseline, on the same
    labels and folds.

    baseline "pca": baseline_features are raw pixels (N, ...) reduced to each readout's dimension;
    baseline "region": baseline_features (N, k) are used as they are, one baseline for every readout.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    pairs, described = make_folds(labels, split, folds, seed, groups, times, gap)
    report: dict = {
        "images": len(labels),
        "classes": {str(c): int(n) for c, n in zip(classes, counts, strict=True)},
        "split": described,
        "folds": described["folds"],
        # Chance of a fold is 1 / the classes it tests (a temporal or grouped fold may test fewer than all).
        "chance_balanced_accuracy": float(np.mean([1 / len(np.unique(labels[test])) for _, test in pairs])),
    }
    smallest_train = min(len(train) for train, _ in pairs)
    baselines: dict = {}
    for name, values in readouts.items():
        dim = int(np.asarray(values).reshape(len(values), -1).shape[1])
        if baseline == "pca":
            pixels = np.asarray(baseline_features).reshape(len(baseline_features), -1)
            key = f"pca{int(min(dim, pixels.shape[1], smallest_train))}"
            if key not in baselines:
                baselines[key] = probe(pixels, labels, pairs, seed, pca_components=int(key[3:]))
        elif baseline == "region":
            key = "region_properties"
            if key not in baselines:
                baselines[key] = probe(baseline_features, labels, pairs, seed)
        else:
            raise ValueError(f"unknown baseline {baseline!r}: pca or region")
        report[name] = {"dim": dim, **probe(values, labels, pairs, seed), "baseline": {"name": key, **baselines[key]}}
    return report


def flat_scores(report: dict) -> dict[str, float]:
    """The report's scores as flat metric names for the registry: eval_<classifier>_<score> and
    baseline_<classifier>_<score> for the embedding, <readout>_… and <readout>_baseline_… for the others."""
    out = {}
    for name, entry in report.items():
        if not isinstance(entry, dict) or "baseline" not in entry:
            continue
        prefix, base = ("eval", "baseline") if name == "embedding" else (name, f"{name}_baseline")
        out.update({f"{prefix}_{k}": v for k, v in entry.items() if k not in ("dim", "baseline")})
        out.update({f"{base}_{k}": v for k, v in entry["baseline"].items() if k != "name"})
    return out
