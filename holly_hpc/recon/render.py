"""The differentiable Gaussian renderer: all of its maths lives in this file.

A point cloud is rotated, translated in the image plane, projected orthographically along z and drawn as
a sum of 2D Gaussians of standard deviation sigma (pixels), each normalised to unit mass in the
continuous plane (so a blob half outside the image loses half its mass, as a real camera would).

Coordinates: the image covers [-1, 1] x [-1, 1] of the structure's frame; x grows to the right along
columns, y grows upwards, so row 0 is the top of the image (y = +1).

Two implementations that must agree (tests/test_render.py):
- render_images: the fast path. A 2D Gaussian is separable, exp(-(dx²+dy²)/2s²) = exp(-dx²/2s²)·exp(-dy²/2s²),
  so the image is Gy^T @ Gx with Gy (B, N, H) and Gx (B, N, W): one batched matrix product, memory
  O(B·N·(H+W)) and no (B, N, H, W) tensor.
- render_images_reference: the plain definition, one dense (B, N, H, W) tensor of 2D Gaussians summed
  over points. Kept as the oracle; use it only on small inputs.
"""

from __future__ import annotations

import math
import numbers

import torch

from .geometry import rotate_points


def frame_shape(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of a data.image_size: one number for a square image, or [height, width]."""
    if isinstance(size, numbers.Integral):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def frame_pixels(size: int | tuple[int, int] | list[int]) -> int:
    """Pixels across the image frame's [-1, 1]: the shorter side. Pixels are square, so a longer side sees
    beyond ±1 (more field of view) and every point within ±1 is in every image, whatever its shape."""
    return min(frame_shape(size))


def pixel_centres(size, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of the pixel columns (x, increasing) and rows (y, decreasing from the top) in frame units:
    ±1 at the edges of the shorter side."""
    height, width = frame_shape(size)
    unit = frame_pixels(size)
    cx = (2 * torch.arange(width, device=device, dtype=dtype) + 1 - width) / unit
    cy = (2 * torch.arange(height, device=device, dtype=dtype) + 1 - height) / unit
    return cx, -cy


def project(points: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor | None) -> torch.Tensor:
    """Rotate points (N, 3) or (B, N, 3) by (B, 3, 3), shift by (B, 2) and drop z -> (B, N, 2)."""
    xy = rotate_points(points, rotations)[..., :2]
    if translations is not None:
        xy = xy + translations[:, None, :]
    return xy


def _sigma_world(sigma_px: torch.Tensor | float, batch: int, size, like: torch.Tensor) -> torch.Tensor:
    """Sigma in pixels -> image-frame units: a scalar or (B,) gives (B, 1, 1); (B, N), one sigma per blob (a
    localisation's own precision), gives (B, N, 1)."""
    s = torch.as_tensor(sigma_px, dtype=like.dtype, device=like.device) * (2.0 / frame_pixels(size))
    if s.dim() == 2:
        return s.expand(batch, like.shape[1])[..., None]
    return s.expand(batch).reshape(batch, 1, 1)


def render_images(
    points: torch.Tensor,
    rotations: torch.Tensor,
    sigma_px: torch.Tensor | float,
    size: int | tuple[int, int],
    translations: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Render (B, H, W) images of `points` seen at `rotations` (fast separable path); size is S or (H, W).

    sigma_px: one blur for all (a number), one per image (B,), or one per blob (B, N) pixels.
    weights (B, N), optional: each blob's mass (0 drops a point from that image, as a missed fluorophore).
    """
    xy = project(points, rotations, translations)
    batch = xy.shape[0]
    s = _sigma_world(sigma_px, batch, size, xy)
    cx, cy = pixel_centres(size, device=xy.device, dtype=xy.dtype)
    # Each 1D factor carries 1/(sqrt(2 pi) sigma_px) so the 2D blob integrates to one pixel-unit mass.
    norm = 1.0 / (math.sqrt(2 * math.pi) * s * (frame_pixels(size) / 2.0))
    gx = _gaussian_factor((xy[..., 0:1] - cx) / s) * norm  # (B, N, W)
    gy = _gaussian_factor((xy[..., 1:2] - cy) / s) * norm  # (B, N, H)
    if weights is not None:
        gx = gx * weights[..., None]
    return gy.transpose(1, 2) @ gx


# Far tails of the 1D factors are floored at exp(-40) ≈ 4e-18, so neither the factors nor their products
# in the matrix product (≥ 1.8e-35) fall into float32's denormal range, which makes a CPU's matrix product
# several times slower at small sigma. The floor adds < 1e-32 per pixel: far below the 1e-5 agreement.
_MAX_EXPONENT = 40.0


def _gaussian_factor(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-(0.5 * z * z).clamp_max(_MAX_EXPONENT))


def render_images_reference(
    points: torch.Tensor,
    rotations: torch.Tensor,
    sigma_px: torch.Tensor | float,
    size: int | tuple[int, int],
    translations: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition, written out: sum over points of a dense 2D Gaussian per pixel."""
    xy = project(points, rotations, translations)
    batch = xy.shape[0]
    s = _sigma_world(sigma_px, batch, size, xy)[..., None]  # (B, 1, 1, 1)
    cx, cy = pixel_centres(size, device=xy.device, dtype=xy.dtype)
    dx = xy[..., 0][:, :, None, None] - cx[None, None, None, :]  # (B, N, 1, W)
    dy = xy[..., 1][:, :, None, None] - cy[None, None, :, None]  # (B, N, H, 1)
    sigma_pixels = s * (frame_pixels(size) / 2.0)
    blobs = torch.exp(-(dx**2 + dy**2) / (2 * s**2)) / (2 * math.pi * sigma_pixels**2)
    if weights is not None:
        blobs = blobs * weights[:, :, None, None]
    return blobs.sum(dim=1)
