"""The decoder: a small seed grid (B, C, s, s) upsampled to an image (B, out_channels, S, S).

It mirrors ResNetEncoder: stages of ×2 upsampling + BasicBlocks whose widths halve from 8 x width down
to width, then a 3x3 conv to the image channels. Upsampling is nearest-neighbour followed by a conv,
not a transposed conv, which avoids checkerboard artefacts (Odena et al., Distill 2016).

Any image size works, powers of two or not: the decoder uses the fewest ×2 stages that take the seed to
at least S pixels and centre-crops the result to S. Cropping keeps every output pixel a conv output
(no resampling blur, unlike a final interpolate); the price is some computation on pixels cut away,
which `upsampling_plan` keeps small by choosing the seed size.

The decoder is as deep as a mirrored ResNet-18 whatever the encoder's depth: reconstruction is the
auxiliary task that shapes the encoder's latent, and a deeper decoder would mostly cost time.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import BasicBlock


def upsamples_needed(seed_size: int, image_size: int) -> int:
    """The fewest ×2 upsamplings that take seed_size cells to at least image_size pixels."""
    count = 0
    while seed_size * 2**count < image_size:
        count += 1
    return count


def upsampling_plan(image_size: int, max_seed: int = 4) -> tuple[int, int]:
    """(seed_size, upsamples) for a latent-vector decoder: the fewest ×2 stages from a seed of at most
    max_seed cells, then the smallest seed that still covers image_size, so the crop is small
    (48 -> seed 3, 4 stages, no crop; 50 -> seed 4, 4 stages, 64 cropped to 50)."""
    count = upsamples_needed(max_seed, image_size)
    return -(-image_size // 2**count), count


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size pixels of x (B, C, H, W) with H, W >= size."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


class LatentExpansion(nn.Module):
    """Latent vector (B, latent_dim) -> seed grid (B, channels, seed_size, seed_size), by one linear map:
    the inverse of the encoder's adaptive pooling + linear, so any latent size fits any backbone."""

    def __init__(self, latent_dim: int, channels: int, seed_size: int):
        super().__init__()
        self.shape = (channels, seed_size, seed_size)
        self.linear = nn.Linear(latent_dim, channels * seed_size * seed_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z).view(z.shape[0], *self.shape)


def up_stage(c_in: int, c_out: int, blocks: int) -> nn.Sequential:
    """×2 nearest upsampling, then `blocks` BasicBlocks (the first projects c_in -> c_out)."""
    layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest"), BasicBlock(c_in, c_out)]
    layers += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetDecoder(nn.Module):
    """Seed grid (B, in_channels, seed_size, seed_size) -> image (B, out_channels, image_size, image_size).

    The output is linear (no sigmoid): targets are intensities normalised to about [0, 1] and a linear
    output neither saturates nor flattens the gradient at the bright and dark ends.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        seed_size: int,
        width: int = 64,
        blocks_per_stage: int = 2,
    ):
        super().__init__()
        if min(in_channels, out_channels, image_size, seed_size, width, blocks_per_stage) < 1:
            raise ValueError("decoder sizes, channels, width and blocks_per_stage must be positive")
        self.image_size, self.seed_size = image_size, seed_size
        top = 8 * width  # the encoder's last stage width, mirrored
        self.entry = BasicBlock(in_channels, top)
        stages, c_in = [], top
        for index in range(upsamples_needed(seed_size, image_size)):
            c_out = max(width, top // 2 ** (index + 1))
            stages.append(up_stage(c_in, c_out, blocks_per_stage))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(c_in, out_channels, kernel_size=3, padding=1)

    def forward(self, seed: torch.Tensor) -> torch.Tensor:
        if tuple(seed.shape[-2:]) != (self.seed_size, self.seed_size):
            raise ValueError(
                f"decoder expects a {self.seed_size}x{self.seed_size} seed grid, got {tuple(seed.shape[-2:])}"
            )
        return centre_crop(self.head(self.stages(self.entry(seed))), self.image_size)
