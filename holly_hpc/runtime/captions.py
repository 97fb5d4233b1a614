"""Words on pictures: row and column captions around an image grid, and a scale bar.

The grids that go to TensorBoard and to final/*.png are (3, H, W) tensors in [0, 1]; these helpers return
a larger tensor of the same kind, so one captioned picture serves both sinks. Text is drawn with PIL's
built-in bitmap font (no font files to ship or find on a cluster node).
"""

from __future__ import annotations

import torch

CAPTION_PX = 12  # height of one line of the built-in font, with a pixel to spare
_INK = (0, 0, 0)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def text_width(text: str) -> int:
    """Pixels that `text` takes in the caption font."""
    from PIL import Image, ImageDraw

    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font())
    return int(right - left)


def _to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array.copy())


def _to_tensor(picture) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def caption_grid(
    grid: torch.Tensor,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    title: str | None = None,
    pad: int = 2,
) -> torch.Tensor:
    """`grid` (3, H, W) of equal tiles with `pad`-pixel gutters (as runtime.outputs.rgb_grid makes it), with
    a white margin on the left holding each row's label, one on top holding each column's, and a title."""
    from PIL import Image, ImageDraw

    _, height, width = grid.shape
    rows, cols = len(row_labels or []), len(col_labels or [])
    left = max((text_width(t) for t in row_labels or []), default=-4) + 4 if rows else 0
    top = (CAPTION_PX if cols else 0) + (CAPTION_PX if title else 0)
    canvas = Image.new("RGB", (width + left, height + top), (255, 255, 255))
    canvas.paste(_to_pil(grid), (left, top))
    draw, font = ImageDraw.Draw(canvas), _font()
    if title:
        draw.text((left + pad, 0), title, fill=_INK, font=font)
    if rows:
        tile_h = (height - pad) / rows
        for r, label in enumerate(row_labels):
            y = top + pad + r * tile_h + (tile_h - pad - CAPTION_PX) / 2
            draw.text((2, y), label, fill=_INK, font=font)
    if cols:
        tile_w = (width - pad) / cols
        for c, label in enumerate(col_labels):
            x = left + pad + c * tile_w + max(0.0, (tile_w - pad - text_width(label)) / 2)
            draw.text((x, top - CAPTION_PX), label, fill=_INK, font=font)
    return _to_tensor(canvas)


def channel_legend(names: list[str]) -> str:
    """Which colour shows which channel in runtime.outputs.to_rgb's composites: grey for one channel,
    green + magenta for two, red, green, blue for the first three of more."""
    if len(names) == 1:
        return f"grey: {names[0]}"
    if len(names) == 2:
        return f"green: {names[0]}, magenta: {names[1]}"
    shown = ", ".join(f"{colour}: {name}" for colour, name in zip(("red", "green", "blue"), names, strict=False))
    return shown + (f" (of {len(names)} channels)" if len(names) > 3 else "")


def nice_length(limit: float) -> float:
    """The largest 1, 2 or 5 × 10^k not above `limit` (> 0): a scale bar's length."""
    if limit <= 0:
        raise ValueError(f"a scale bar needs a positive length, got {limit}")
    exponent = 10 ** int(torch.floor(torch.log10(torch.tensor(float(limit)))).item())
    return max(m * exponent for m in (1, 2, 5) if m * exponent <= limit * (1 + 1e-9))


def add_scale_bar(
    image: torch.Tensor, units_per_pixel: float, unit: str, at: tuple[int, int] | None = None
) -> torch.Tensor:
    """`image` (3, H, W) with a bar of a round length (about a quarter of the width) and its label under it,
    in a white strip added at the bottom; `at` = (left, width) of the panel the bar measures (default: all)."""
    from PIL import Image, ImageDraw

    _, height, width = image.shape
    left, span = at or (0, width)
    length = nice_length(span * units_per_pixel / 4)
    bar = max(1, round(length / units_per_pixel))
    canvas = Image.new("RGB", (width, height + CAPTION_PX + 6), (255, 255, 255))
    canvas.paste(_to_pil(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = left + 4
    draw.rectangle((x0, height + 2, x0 + bar - 1, height + 4), fill=_INK)
    label = f"{length:g} {unit}"
    draw.text((x0 + bar + 4, height - 1), label, fill=_INK, font=_font())
    return _to_tensor(canvas)
