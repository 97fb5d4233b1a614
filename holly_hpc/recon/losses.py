"""Image losses between rendered and input images, shared by the pose and reconstruct kinds."""

from __future__ import annotations

import torch


def image_loss(rendered: torch.Tensor, target: torch.Tensor, kind: str, normalise: bool = False) -> torch.Tensor:
    """Mean L1 or L2 difference per pixel, on images scaled to mean 1 so the loss does not depend on the
    image size or point count.

    normalise=False: both images are divided by the target's mean (their intensities are compared as they
    are). normalise=True: each image is divided by its own mean (equal total intensity), so only the
    distribution of intensity matters, as for real data whose brightness is arbitrary.
    """
    t_mean = target.flatten(1).mean(dim=1).clamp_min(1e-12)[:, None, None]
    r_mean = rendered.flatten(1).mean(dim=1).clamp_min(1e-12)[:, None, None] if normalise else t_mean
    diff = rendered / r_mean - target / t_mean
    return diff.pow(2).mean() if kind == "l2" else diff.abs().mean()
