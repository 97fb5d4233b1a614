"""ResNet encoders written here (no torchvision): BasicBlock, Bottleneck and ResNetEncoder.

The stem differs from ImageNet ResNets on purpose. ImageNet's 7x7 stride-2 conv plus max-pool divides a
224 px image by 4 before the first residual stage; on the 32-128 px crops usual in microscopy that throws
away most of the resolution (a 32 px crop would leave an 8x8 map for stage 1 and 1x1 at the end). Here
the stem is one 3x3 stride-1 conv and no max-pool, as in the CIFAR ResNets, so the encoder's total
stride is 8 (stages 2-4 each halve): a 32 px crop ends at 4x4, a 64 px crop at 8x8.
"""

from __future__ import annotations

import torch
from torch import nn

#: depth -> (block type name, blocks per stage), as in He et al. 2016.
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


def shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else a 1x1 conv + BatchNorm projection (ResNet option B)."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convs; out_channels = planes."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        c_out = planes * self.expansion
        self.residual = nn.Sequential(
            conv3x3(c_in, planes, stride),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            conv3x3(planes, c_out),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = shortcut(c_in, c_out, stride)
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as in torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        c_out = planes * self.expansion
        self.residual = nn.Sequential(
            conv1x1(c_in, planes),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            conv3x3(planes, planes, stride),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            conv1x1(planes, c_out),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = shortcut(c_in, c_out, stride)
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


BLOCKS: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(block: type[BasicBlock | Bottleneck], c_in: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` blocks; only the first changes the resolution and channel count."""
    layers = [block(c_in, planes, stride)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetEncoder(nn.Module):
    """ResNet-18/34/50 trunk: image (B, in_channels, H, W) -> feature map (B, out_channels, h, w).

    Any H, W and channel count work: h = ceil(H / 8), w = ceil(W / 8) (`stride` = 8). Stage widths are
    width x (1, 2, 4, 8), so out_channels = 8 x width (x 4 for depth 50). No pooling or head: the models
    decide how to turn the map into a latent.
    """

    def __init__(self, depth: int, in_channels: int, width: int = 64):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        if in_channels < 1 or width < 1:
            raise ValueError(f"in_channels and width must be positive, got {in_channels} and {width}")
        block_name, layout = RESNET_LAYOUTS[depth]
        block = BLOCKS[block_name]
        self.depth, self.in_channels, self.width = depth, in_channels, width
        self.stem = nn.Sequential(conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, c_in = [], width
        for index, blocks in enumerate(layout):
            planes = width * 2**index
            stages.append(make_stage(block, c_in, planes, blocks, stride=1 if index == 0 else 2))
            c_in = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.out_channels = c_in
        self.stride = 2 ** (len(layout) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
