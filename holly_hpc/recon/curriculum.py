"""The blur-sigma curriculum: coarse images first, sharp ones later (HOLLy's schedule, made continuous)."""

from __future__ import annotations


def sigma_at(progress: float, sigmas: float | list[float], end: float) -> float:
    """Sigma (pixels) at `progress` in [0, 1] of training.

    A list is interpolated linearly at equal spacing between progress 0 and `end`, then holds its last
    value; a single number is constant.
    """
    if isinstance(sigmas, (int, float)):
        return float(sigmas)
    if len(sigmas) == 1:
        return float(sigmas[0])
    position = min(max(progress, 0.0) / end, 1.0) * (len(sigmas) - 1)
    i = min(int(position), len(sigmas) - 2)
    frac = position - i
    return float(sigmas[i] * (1 - frac) + sigmas[i + 1] * frac)
