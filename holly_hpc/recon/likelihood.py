"""The localisation likelihood: how probable a particle's localisations are under the model at a pose.

The model's points, rotated and projected, are the centres of a Gaussian mixture in the image plane; each
localisation is scored under it with its own variance (its precision² plus the model's blur², so a
precise localisation counts for more), mixed with a uniform background (the few % of localisations that
belong to no structure, which would otherwise drag points out). This is what particle-fusion methods fit
instead of an image loss: on a sparse particle (30-180 localisations) an image L2 between blurred speckles
is weak and noisy, the likelihood is not.

Two forms:
- localisation_nll: exact, per particle, differentiable in the points, the poses and the shifts.
- grid_scores: the same log-likelihood for every particle at every rotation of a grid, at once, through
  pixels: each particle's localisations counted in an image (P, H·W) times each rotated model's
  log-density image (R, H·W) is one matrix product. Used for the coarse pose search, and with a
  logsumexp over the grid as the pose-marginalised likelihood that fits a structure from scratch.
  localisation_nll_reference in tests holds it to the exact form at a fine grid.
"""

from __future__ import annotations

import math

import torch

from .render import project, render_images


def localisation_nll(
    points: torch.Tensor,
    rotations: torch.Tensor,
    shifts: torch.Tensor | None,
    locs: torch.Tensor,
    mask: torch.Tensor,
    blur: float,
    precision: torch.Tensor | None = None,
    background: float = 0.05,
    area: float = 4.0,
) -> torch.Tensor:
    """Mean negative log-likelihood per localisation of each particle -> (P,).

    points (K, 3) model (image-frame units); rotations (P, 3, 3); shifts (P, 2) or None; locs (P, L, 2)
    localisations (padded); mask (P, L) 1 for real localisations, 0 for padding; blur: the model's own
    Gaussian width (frame units, > 0); precision (P, L) per localisation (frame units) or None; background:
    the share of localisations drawn uniformly over `area` (the image frame spans 2 × 2 units).
    """
    mu = project(points, rotations, shifts)  # (P, K, 2)
    var = torch.full_like(mask, blur * blur) if precision is None else precision.pow(2) + blur * blur
    # |x - mu|² as x² + mu² - 2 x·mu: one batched matrix product, no (P, L, K, 2) tensor.
    d2 = (locs.pow(2).sum(-1, keepdim=True) + mu.pow(2).sum(-1)[:, None, :] - 2 * locs @ mu.transpose(1, 2)).clamp_min(
        0
    )
    log_blob = -d2 / (2 * var[..., None]) - torch.log(2 * math.pi * var)[..., None]  # (P, L, K)
    log_model = torch.logsumexp(log_blob, dim=-1) - math.log(points.shape[0])
    log_p = torch.logaddexp(log_model + math.log1p(-background), torch.tensor(math.log(background / area)).to(locs))
    return -(log_p * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def count_images(locs: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:
    """Each particle's localisations counted into a size × size pixel grid of the image frame -> (P, size²).

    Pixel (row, col) covers x in [col, col+1)·2/size - 1, y from the top, as the renderer lays images out;
    localisations outside the frame are not counted."""
    col = torch.floor((locs[..., 0] + 1) * size / 2).long()
    row = torch.floor((1 - locs[..., 1]) * size / 2).long()
    inside = (col >= 0) & (col < size) & (row >= 0) & (row < size) & (mask > 0)
    flat = torch.where(inside, row * size + col, 0)
    counts = torch.zeros(locs.shape[0], size * size, dtype=locs.dtype, device=locs.device)
    return counts.scatter_add_(1, flat, inside.to(locs.dtype))


def log_density_images(
    points: torch.Tensor, rotations: torch.Tensor, blur_px: float, size: int, background: float
) -> torch.Tensor:
    """log of the model's mixture density (with background) per pixel, at each rotation -> (R, size²)."""
    images = render_images(points, rotations, blur_px, size) / points.shape[0]  # each rotation's mass ~1
    return torch.log((1 - background) * images + background / (size * size)).flatten(1)


def grid_scores(
    points: torch.Tensor,
    rotations: torch.Tensor,
    counts: torch.Tensor,
    blur_px: float,
    size: int,
    background: float = 0.05,
    chunk: int = 1024,
) -> torch.Tensor:
    """Log-likelihood (up to a constant per particle) of every particle at every grid rotation -> (P, R)."""
    scores = [
        counts @ log_density_images(points, rotations[i : i + chunk], blur_px, size, background).T
        for i in range(0, rotations.shape[0], chunk)
    ]
    return torch.cat(scores, dim=1)


def marginal_nll(scores: torch.Tensor, counts_per_particle: torch.Tensor) -> torch.Tensor:
    """Pose-marginalised NLL per localisation (uniform prior over the grid) from grid_scores -> (P,): every
    pose contributes by its posterior weight, so a structure can be fitted before any pose is known."""
    log_marginal = torch.logsumexp(scores, dim=1) - math.log(scores.shape[1])
    return -log_marginal / counts_per_particle.clamp_min(1)


def spun_counts(locs: torch.Tensor, mask: torch.Tensor, angles: torch.Tensor, size: int) -> torch.Tensor:
    """Each particle's counts after turning it by -angle, for every angle -> (P, A, size²): a particle that
    matches a view turned by +angle matches the unturned view after this (see factored_grid_scores)."""
    c, s = angles.cos().to(locs), angles.sin().to(locs)
    x, y = locs[..., 0], locs[..., 1]
    out = []
    for ca, sa in zip(c, s, strict=True):  # A angles (tens), not the batch: each a vectorised count
        turned = torch.stack((ca * x + sa * y, -sa * x + ca * y), dim=-1)
        out.append(count_images(turned, mask, size))
    return torch.stack(out, dim=1)


def factored_grid_scores(
    points: torch.Tensor,
    views: torch.Tensor,
    spun: torch.Tensor,
    blur_px: float,
    size: int,
    background: float = 0.05,
) -> torch.Tensor:
    """grid_scores over the factored grid (geometry.factored_so3_grid) -> (P, A·V), rotation a·V + v.

    The projection at in_plane(θ) @ view is the view's projection turned by θ, so scoring the particle
    turned by -θ against the view's log-density image is the same score: one render per view (V of them)
    instead of one per rotation (A·V), the saving that makes the search cheap. Agrees with grid_scores on
    factored_rotations up to the pixel binning (tests/test_likelihood.py)."""
    p, a, hw = spun.shape
    log_views = log_density_images(points, views, blur_px, size, background)  # (V, S²)
    return (spun.reshape(p * a, hw) @ log_views.T).reshape(p, -1)
