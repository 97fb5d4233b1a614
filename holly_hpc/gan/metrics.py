"""How good is a generator: does a categorical code cluster real images as their labels do, and are the
samples diverse (a collapsed generator draws near-identical images whatever the latent)?"""

from __future__ import annotations

import numpy as np
import torch


def cluster_accuracy(predicted, labels) -> float:
    """Accuracy of cluster ids `predicted` against `labels` under the best one-to-one matching of clusters
    to classes (the Hungarian method on the contingency table). Clusters left unmatched count as wrong."""
    from scipy.optimize import linear_sum_assignment

    predicted = np.asarray(predicted)
    classes, label_ids = np.unique(np.asarray(labels), return_inverse=True)
    clusters, cluster_ids = np.unique(predicted, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(table, (cluster_ids, label_ids), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(predicted))


def cluster_accuracy_reference(predicted, labels) -> float:
    """The definition by brute force over every one-to-one map of clusters to classes (small cases only)."""
    import itertools

    predicted, labels = list(predicted), list(labels)
    clusters, classes = sorted(set(predicted)), sorted(set(labels))
    best = 0
    for chosen in itertools.permutations(classes, min(len(clusters), len(classes))):
        for subset in itertools.combinations(clusters, len(chosen)):
            mapping = dict(zip(subset, chosen, strict=True))
            best = max(best, sum(mapping.get(p) == y for p, y in zip(predicted, labels, strict=True)))
    return best / len(predicted)


@torch.no_grad()
def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean Euclidean distance between distinct images of a batch, per pixel (RMS difference)."""
    flat = images.flatten(1).float()
    n = flat.shape[0]
    if n < 2:
        return 0.0
    distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(distances.sum() / (n * (n - 1)))
