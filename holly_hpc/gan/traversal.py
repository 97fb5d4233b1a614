"""Latent traversals: vary one code, keep everything else fixed, and look at what changes.

A traversal is a tensor (rows, values, C, H, W): each row one fixed latent (noise and the other codes),
each column one value of the traversed code (every category, or evenly spaced values of a continuous code,
beyond the training range ±1 to show where the factor goes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..runtime.outputs import rgb_grid, to_rgb
from .models import CodeSpec


def traversal_frames(
    codes: dict[str, torch.Tensor], name: str, spec: CodeSpec, steps: int, value_range: float
) -> list[dict[str, torch.Tensor]]:
    """The latents of each column of a traversal of code `name` ("cat<i>" or "cont<j>")."""
    index = int(name[3:] if name.startswith("cat") else name[4:])
    frames = []
    if name.startswith("cat"):
        for value in range(spec.categorical[index]):
            cat = codes["cat"].clone()
            cat[:, index] = value
            frames.append({**codes, "cat": cat})
    else:
        for value in torch.linspace(-value_range, value_range, steps):
            cont = codes["cont"].clone()
            cont[:, index] = value
            frames.append({**codes, "cont": cont})
    return frames


def traversal_grid(traversal: torch.Tensor) -> torch.Tensor:
    """(rows, values, C, H, W) -> a (3, H', W') picture: rows are latents, columns the code's values."""
    rows, values = traversal.shape[:2]
    rgb = to_rgb(traversal.flatten(0, 1).float().cpu().clamp(0, 1))
    return rgb_grid(rgb.view(rows, values, *rgb.shape[1:]))


def sample_grid(images: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """(N, C, H, W) -> a (3, H', W') picture, `columns` images per row (the last row padded with white)."""
    rgb = to_rgb(images.float().cpu().clamp(0, 1))
    rows = -(-len(rgb) // columns)
    padded = torch.ones(rows * columns, *rgb.shape[1:])
    padded[: len(rgb)] = rgb
    return rgb_grid(padded.view(rows, columns, *rgb.shape[1:]))


def write_gif(path: Path, traversal: torch.Tensor, scale: int = 2, frame_ms: int = 120) -> None:
    """An animated GIF of a continuous code's traversal: frame v shows every row's image at value v, the
    values swept there and back, looping."""
    from PIL import Image

    values = traversal.shape[1]
    pictures = []
    for v in [*range(values), *range(values - 2, 0, -1)]:
        frame = sample_grid(traversal[:, v], columns=min(len(traversal), 8))
        array = (frame.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        picture = Image.fromarray(np.ascontiguousarray(array))
        pictures.append(picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.gif")
    pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
    tmp.replace(path)
