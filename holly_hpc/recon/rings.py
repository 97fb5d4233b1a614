"""The geometry of a ring-like structure about its symmetry axis: radius and the spacing of stacked rings
(the D/R that nuclear-pore papers report), measured on a learned point cloud without any ground truth."""

from __future__ import annotations

import torch

MIN_SHARE = 0.2  # each of two rings holds at least this share of the points


def split_heights(h: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Two groups along the axis by 1D 2-means (the split of the sorted heights with the least within-group
    variance) -> (mask of the upper group, separation / pooled within-group std)."""
    order = h.sort().values
    n = len(order)
    best, best_cost = n // 2, float("inf")
    for i in range(max(1, int(MIN_SHARE * n)), n - max(1, int(MIN_SHARE * n)) + 1):
        cost = float(order[:i].var(unbiased=False) * i + order[i:].var(unbiased=False) * (n - i))
        if cost < best_cost:
            best, best_cost = i, cost
    threshold = float(order[best - 1] + order[best]) / 2 if 0 < best < n else float(order.median())
    upper = h > threshold
    if upper.all() or (~upper).all():
        return upper, 0.0
    pooled = (best_cost / n) ** 0.5
    return upper, float((h[upper].mean() - h[~upper].mean()).abs()) / max(pooled, 1e-12)


def ring_geometry(points: torch.Tensor, axis: torch.Tensor, suffix: str = "_nm") -> dict[str, float]:
    """{radius, ring_spacing (0 for a single ring), rings (1 or 2)} of (N, 3) points about `axis`.

    Two rings are reported when the heights split into two groups of at least a fifth of the points each,
    separated by more than three times their own spread; the radius is the median distance from the axis,
    measured through each ring's own centroid (a ring with sites missing has its centroid off the axis, but
    the pair of rings shares it better than the whole cloud's)."""
    p = points.detach().double().cpu()
    a = axis.detach().double().cpu()
    a = a / a.norm()
    p = p - p.mean(0)
    h = p @ a
    upper, separation = split_heights(h) if len(h) >= 4 else (torch.ones(len(h), dtype=torch.bool), 0.0)
    two = separation > 3.0 and min(int(upper.sum()), int((~upper).sum())) >= MIN_SHARE * len(h)
    groups = [upper, ~upper] if two else [torch.ones(len(h), dtype=torch.bool)]
    radii = []
    for g in groups:
        q = p[g] - p[g].mean(0)
        radii.append((q - (q @ a)[:, None] * a).norm(dim=1))
    spacing = float((h[upper].mean() - h[~upper].mean()).abs()) if two else 0.0
    return {
        f"radius{suffix}": float(torch.cat(radii).median()),
        f"ring_spacing{suffix}": spacing,
        "rings": float(len(groups)),
    }
