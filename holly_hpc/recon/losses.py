"""Image losses between rendered and input images, shared by the pose and reconstruct kinds."""

from __future__ import annotations

import torch


def per_image_loss(rendered: torch.Tensor, target: torch.Tensor, kind: str, normalise: bool = False) -> torch.Tensor:
    """image_loss for each image: (..., H, W) -> (...)."""
    t_mean = target.flatten(-2).mean(dim=-1).clamp_min(1e-12)[..., None, None]
    r_mean = rendered.flatten(-2).mean(dim=-1).clamp_min(1e-12)[..., None, None] if normalise else t_mean
    diff = rendered / r_mean - target / t_mean
    return (diff.pow(2) if kind == "l2" else diff.abs()).flatten(-2).mean(dim=-1)


def best_of_hypotheses(candidates: torch.Tensor, render, target: torch.Tensor, kind: str, normalise: bool):
    """Several pose hypotheses per image (B, K, 3, 3): render all, keep the best per image.

    Training on the smallest of the K losses (multiple-choice learning) lets the heads settle on different
    local minima of the image loss instead of being dragged between them, which a single head suffers
    from on asymmetric structures. Returns (mean of the per-image minimum, best rotations (B, 3, 3), their
    renders (B, H, W)); with K = 1 this is the plain loss.
    """
    b, k = candidates.shape[:2]
    rendered = render(candidates.reshape(b * k, 3, 3), k).reshape(b, k, *target.shape[-2:])
    losses = per_image_loss(rendered, target[:, None], kind, normalise)  # (B, K)
    choice = losses.detach().argmin(dim=1)
    rows = torch.arange(b, device=target.device)
    return losses[rows, choice].mean(), candidates[rows, choice], rendered[rows, choice]


def image_loss(rendered: torch.Tensor, target: torch.Tensor, kind: str, normalise: bool = False) -> torch.Tensor:
    """Mean L1 or L2 difference per pixel, on images scaled to mean 1 so the loss does not depend on the
    image size or point count.

    normalise=False: both images are divided by the target's mean (their intensities are compared as they
    are). normalise=True: each image is divided by its own mean (equal total intensity), so only the
    distribution of intensity matters, as for real data whose brightness is arbitrary.
    """
    return per_image_loss(rendered, target, kind, normalise).mean()
