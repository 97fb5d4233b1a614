"""Random views of microscopy images for self-supervised training (SimCLR's pairs, DINO's multi-crop).

A view is one image seen through a random crop, turn, flip and small rotation (one bilinear resampling
of the whole batch through an affine grid), an intensity change per channel (gain, gamma, offset: stains
and cameras vary, but no colour jitter that mixes channels, which carry different markers), a Gaussian
blur (focus) and Gaussian noise (shot and read noise). Everything is vectorised over the batch; every
random number is drawn on the CPU from the caller's generator in a fixed order whatever is switched on,
so a resumed run draws the same views (batches are a function of seed and step).

`reference_view` is the plain per-image version of `random_views` (torch.rot90, slicing, conv per
image), kept as the reference the vectorised path is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewOptions:
    """How one kind of view is drawn (the spec's data.views, with the crop scale of global or local views)."""

    size: int  # output side in pixels
    scale: tuple[float, float] = (0.35, 1.0)  # fraction of the image's area the crop covers
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratios, drawn log-uniformly
    flips: bool = True
    rot90: bool = True
    rotation_deg: float = 15.0  # a small rotation on top of the quarter turns, uniform in ±this
    gain: float = 0.2  # per channel: x · exp(U(-gain, gain))
    gamma: float = 0.2  # per channel: x ** exp(U(-gamma, gamma))
    offset: float = 0.05  # per channel: + U(-offset, offset)
    blur_probability: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # pixels of the output
    noise: float = 0.03  # Gaussian noise of std U(0, noise) per image
    clamp: bool = True  # keep values in [0, 1] (normalised images); off for data.normalise.mode none

    @classmethod
    def from_spec(cls, views: dict, augment: dict, size: int, scale, clamp: bool) -> ViewOptions:
        return cls(
            size=size,
            scale=(float(scale[0]), float(scale[1])),
            flips=augment["flips"],
            rot90=augment["rot90"],
            rotation_deg=views["rotation_deg"],
            gain=views["gain"],
            gamma=views["gamma"],
            offset=views["offset"],
            blur_probability=views["blur_probability"],
            blur_sigma=(float(views["blur_sigma"][0]), float(views["blur_sigma"][1])),
            noise=views["noise"],
            clamp=clamp,
        )


@dataclass(frozen=True)
class ViewDraws:
    """The random numbers of one batch of views (B images, C channels), all on the CPU."""

    centre: torch.Tensor  # (B, 2) crop centre (x, y) in [-1, 1] image coordinates
    half: torch.Tensor  # (B, 2) crop half-width and half-height in the same coordinates
    angle: torch.Tensor  # (B,) radians: quarter turns plus the small rotation
    flip: torch.Tensor  # (B,) bool: mirror left-right
    gain: torch.Tensor  # (B, C)
    gamma: torch.Tensor  # (B, C)
    offset: torch.Tensor  # (B, C)
    sigma: torch.Tensor  # (B,) blur sigma in output pixels, 0 where not blurred
    noise: torch.Tensor  # (B, 1, S, S) standard normal noise
    noise_std: torch.Tensor  # (B,)


def draw(batch: int, channels: int, options: ViewOptions, generator: torch.Generator) -> ViewDraws:
    """Every random number of a batch of views, in a fixed order (the same whatever is switched on)."""

    def uniform(shape, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    area = uniform(batch, *options.scale)
    log_ratio = uniform(batch, math.log(options.ratio[0]), math.log(options.ratio[1]))
    turns = torch.randint(0, 4, (batch,), generator=generator)
    small = uniform(batch, -1.0, 1.0)
    flip = torch.rand(batch, generator=generator) < 0.5
    where = uniform((batch, 2), -1.0, 1.0)
    gain, gamma, offset = (uniform((batch, channels), -1.0, 1.0) for _ in range(3))
    blurred = torch.rand(batch, generator=generator) < options.blur_probability
    sigma = uniform(batch, *options.blur_sigma)
    noise_std = uniform(batch, 0.0, 1.0) * options.noise
    noise = torch.randn((batch, 1, options.size, options.size), generator=generator)

    ratio = log_ratio.exp()
    half = torch.stack([(area * ratio).sqrt(), (area / ratio).sqrt()], dim=1).clamp(max=1.0)
    centre = where * (1 - half)  # the crop stays inside the image
    angle = (turns * (math.pi / 2) if options.rot90 else torch.zeros(batch)) + small * math.radians(
        options.rotation_deg
    )
    return ViewDraws(
        centre=centre,
        half=half,
        angle=angle,
        flip=flip & options.flips,
        gain=(gain * options.gain).exp(),
        gamma=(gamma * options.gamma).exp(),
        offset=offset * options.offset,
        sigma=torch.where(blurred, sigma, torch.zeros(batch)),
        noise=noise,
        noise_std=noise_std,
    )


def affine(draws: ViewDraws) -> torch.Tensor:
    """(B, 2, 3) maps from the view's [-1, 1] coordinates to the image's (affine_grid's convention):
    x_image = R(angle) · diag(±half_x, half_y) · x_view + centre."""
    cos, sin = draws.angle.cos(), draws.angle.sin()
    sx = torch.where(draws.flip, -draws.half[:, 0], draws.half[:, 0])
    sy = draws.half[:, 1]
    rows = [
        torch.stack([cos * sx, -sin * sy, draws.centre[:, 0]], dim=1),
        torch.stack([sin * sx, cos * sy, draws.centre[:, 1]], dim=1),
    ]
    return torch.stack(rows, dim=1)


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2r+1) normalised 1D Gaussians; sigma 0 gives the identity (a delta)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    safe = sigma.clamp_min(1e-6)[:, None]
    kernels = torch.exp(-0.5 * (x[None] / safe) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def intensity(images: torch.Tensor, draws: ViewDraws, clamp: bool) -> torch.Tensor:
    """Per image and channel: gain · x^gamma + offset (sign kept for the gamma of unnormalised values)."""
    gain, gamma, offset = (t.to(images)[:, :, None, None] for t in (draws.gain, draws.gamma, draws.offset))
    powered = images.abs().pow(gamma) * images.sign()
    out = gain * powered + offset
    return out.clamp(0, 1) if clamp else out


def random_views(images: torch.Tensor, options: ViewOptions, generator: torch.Generator) -> torch.Tensor:
    """A batch (B, C, H, W) -> one random view of each image (B, C, size, size); the vectorised path."""
    batch, channels = images.shape[:2]
    draws = draw(batch, channels, options, generator)
    theta = affine(draws).to(images)
    grid = F.affine_grid(theta, [batch, channels, options.size, options.size], align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    views = intensity(views, draws, options.clamp)
    radius = max(1, math.ceil(3 * options.blur_sigma[1]))
    kernels = gaussian_kernels(draws.sigma, radius).to(images)  # (B, K)
    weights = kernels.repeat_interleave(channels, dim=0)  # one kernel per (image, channel) plane
    planes = views.reshape(1, batch * channels, options.size, options.size)
    planes = F.conv2d(
        F.pad(planes, (radius, radius, 0, 0), mode="replicate"), weights[:, None, None, :], groups=len(weights)
    )
    planes = F.conv2d(
        F.pad(planes, (0, 0, radius, radius), mode="replicate"), weights[:, None, :, None], groups=len(weights)
    )
    views = planes.view(batch, channels, options.size, options.size)
    views = views + draws.noise_std.to(images)[:, None, None, None] * draws.noise.to(images)
    return views.clamp(0, 1) if options.clamp else views


def reference_view(image: torch.Tensor, draws: ViewDraws, row: int, options: ViewOptions) -> torch.Tensor:
    """The plain version of random_views for one image (C, H, W) and row `row` of the draws: the
    sampling grid built point by point from the affine map, then a per-image blur and the noise."""
    channels = image.shape[0]
    size = options.size
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    angle, (hx, hy) = float(draws.angle[row]), draws.half[row].tolist()
    if bool(draws.flip[row]):
        hx = -hx
    cx, cy = draws.centre[row].tolist()
    u, v = hx * xs, hy * ys
    grid_x = math.cos(angle) * u - math.sin(angle) * v + cx
    grid_y = math.sin(angle) * u + math.cos(angle) * v + cy
    grid = torch.stack([grid_x, grid_y], dim=-1)[None].to(image)
    view = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    out = []
    radius = max(1, math.ceil(3 * options.blur_sigma[1]))
    kernel = gaussian_kernels(draws.sigma[row : row + 1], radius)[0].to(image)
    for c in range(channels):
        plane = view[c]
        plane = draws.gain[row, c] * plane.abs() ** draws.gamma[row, c] * plane.sign() + draws.offset[row, c]
        plane = plane.clamp(0, 1) if options.clamp else plane
        padded = F.pad(plane[None, None], (radius, radius, radius, radius), mode="replicate")[0, 0]
        plane = F.conv2d(padded[None, None], kernel[None, None, None, :])[0, 0]
        plane = F.conv2d(plane[None, None], kernel[None, None, :, None])[0, 0]
        out.append(plane)
    view = torch.stack(out) + draws.noise_std[row] * draws.noise[row].to(image)
    return view.clamp(0, 1) if options.clamp else view
