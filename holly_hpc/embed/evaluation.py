"""How much of what biologists label do embeddings carry? Linear and non-linear probes with stratified k-fold.

Two classifiers (scikit-learn): logistic regression on standardised features (a linear probe) and a
random forest (non-linear, scale-free). Scores are out-of-fold predictions over stratified folds:
balanced accuracy (chance = 1 / classes whatever the class sizes) and macro F1.

Every score comes with a baseline probed the same way, so a figure means something:
  pca     raw pixels reduced by PCA to the embedding's dimension (fitted inside each fold: no leakage)
  region  simple region properties of the masks (area, perimeter, axes, eccentricity, solidity), for
          the shape embedding
"""

from __future__ import annotations

import numpy as np

CLASSIFIERS = ("logreg", "forest")
SCORES = ("balanced_accuracy", "macro_f1")


def _pipeline(name: str, seed: int, pca_components: int | None = None):
    from sklearn.decomposition import PCA
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
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


def probe(
    features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0, pca_components: int | None = None
) -> dict[str, float]:
    """{"<classifier>_<score>": value} from out-of-fold predictions of each classifier."""
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    features = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    labels = np.asarray(labels)
    splitter = StratifiedKFold(n_splits=folds_for(labels, folds), shuffle=True, random_state=seed)
    out = {}
    for name in CLASSIFIERS:
        predicted = cross_val_predict(_pipeline(name, seed, pca_components), features, labels, cv=splitter)
        out[f"{name}_balanced_accuracy"] = float(balanced_accuracy_score(labels, predicted))
        out[f"{name}_macro_f1"] = float(f1_score(labels, predicted, average="macro"))
    return out


def evaluate_readouts(
    readouts: dict[str, np.ndarray], labels, baseline_features: np.ndarray, baseline: str, folds: int = 5, seed: int = 0
) -> dict:
    """Probe each readout of the same images (e.g. "embedding" and "features") and its baseline, on the same
    labels and folds.

    baseline "pca": baseline_features are raw pixels (N, ...) reduced to each readout's dimension;
    baseline "region": baseline_features (N, k) are used as they are, one baseline for every readout.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    report: dict = {
        "images": len(labels),
        "classes": {str(c): int(n) for c, n in zip(classes, counts, strict=True)},
        "folds": folds_for(labels, folds),
        "chance_balanced_accuracy": 1 / len(classes),
    }
    baselines: dict = {}
    for name, values in readouts.items():
        dim = int(np.asarray(values).reshape(len(values), -1).shape[1])
        if baseline == "pca":
            pixels = np.asarray(baseline_features).reshape(len(baseline_features), -1)
            train_size = len(labels) - len(labels) // report["folds"]
            key = f"pca{int(min(dim, pixels.shape[1], train_size))}"
            if key not in baselines:
                baselines[key] = probe(pixels, labels, folds, seed, pca_components=int(key[3:]))
        elif baseline == "region":
            key = "region_properties"
            if key not in baselines:
                baselines[key] = probe(baseline_features, labels, folds, seed)
        else:
            raise ValueError(f"unknown baseline {baseline!r}: pca or region")
        report[name] = {"dim": dim, **probe(values, labels, folds, seed), "baseline": {"name": key, **baselines[key]}}
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
