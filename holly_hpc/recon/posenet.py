"""The pose CNN: one image in; a rotation (6D parameterisation), an optional bounded translation and an
optional blur sigma out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .geometry import rotation_from_6d


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@dataclass
class PosePrediction:
    rotations: torch.Tensor  # (B, 3, 3): the first hypothesis (or the best, once a kind has chosen)
    translations: torch.Tensor | None  # (B, 2), image-frame units
    sigma: torch.Tensor | None  # (B,), pixels
    candidates: torch.Tensor | None = None  # (B, K, 3, 3): every rotation hypothesis


MIN_SIGMA_PX = 0.5  # a predicted blur below half a pixel would alias


class PoseNet(nn.Module):
    """Conv stages (each halves the resolution), global average pool, MLP head.

    channels: width of each stage, e.g. [16, 32, 64, 128]. max_translation > 0 adds a translation head
    bounded by tanh × max_translation (image-frame units, the image spans [-1, 1]). max_sigma > 0 adds a
    blur head predicting sigma in (MIN_SIGMA_PX, max_sigma) pixels.
    """

    def __init__(
        self,
        channels: list[int],
        hidden: int,
        max_translation: float = 0.0,
        in_channels: int = 1,
        max_sigma: float = 0.0,
        hypotheses: int = 1,
    ):
        super().__init__()
        stages, c_in = [], in_channels
        for c_out in channels:
            stages += [_conv_block(c_in, c_out, stride=2), _conv_block(c_out, c_out, stride=1)]
            c_in = c_out
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True))
        self.hypotheses = int(hypotheses)
        self.rotation = nn.Linear(hidden, 6 * self.hypotheses)
        self.max_translation = float(max_translation)
        self.translation = nn.Linear(hidden, 2) if self.max_translation > 0 else None
        self.max_sigma = float(max_sigma)
        self.sigma = nn.Linear(hidden, 1) if self.max_sigma > 0 else None

    def forward(self, images: torch.Tensor) -> PosePrediction:
        """images (B, H, W) or (B, C, H, W) -> the pose (and blur) of each image."""
        if images.dim() == 3:
            images = images[:, None]
        h = self.head(self.features(images))
        candidates = rotation_from_6d(self.rotation(h).reshape(-1, self.hypotheses, 6))  # (B, K, 3, 3)
        rotations = candidates[:, 0]
        translations = sigma = None
        if self.translation is not None:
            translations = torch.tanh(self.translation(h)) * self.max_translation
        if self.sigma is not None:
            sigma = MIN_SIGMA_PX + torch.sigmoid(self.sigma(h)[:, 0]) * (self.max_sigma - MIN_SIGMA_PX)
        return PosePrediction(rotations, translations, sigma, candidates)
