"""The pose CNN: one image in, a rotation (6D parameterisation) and an optional bounded translation out."""

from __future__ import annotations

import torch
from torch import nn

from .geometry import rotation_from_6d


def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class PoseNet(nn.Module):
    """Conv stages (each halves the resolution), global average pool, MLP head.

    channels: width of each stage, e.g. [16, 32, 64, 128]. max_translation > 0 adds a translation head
    bounded by tanh × max_translation (image-frame units, the image spans [-1, 1]).
    """

    def __init__(self, channels: list[int], hidden: int, max_translation: float = 0.0, in_channels: int = 1):
        super().__init__()
        stages, c_in = [], in_channels
        for c_out in channels:
            stages += [_conv_block(c_in, c_out, stride=2), _conv_block(c_out, c_out, stride=1)]
            c_in = c_out
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True))
        self.rotation = nn.Linear(hidden, 6)
        self.max_translation = float(max_translation)
        self.translation = nn.Linear(hidden, 2) if self.max_translation > 0 else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, H, W) or (B, C, H, W) -> rotations (B, 3, 3), translations (B, 2) or None."""
        if images.dim() == 3:
            images = images[:, None]
        h = self.head(self.features(images))
        rotations = rotation_from_6d(self.rotation(h))
        translations = None
        if self.translation is not None:
            translations = torch.tanh(self.translation(h)) * self.max_translation
        return rotations, translations
