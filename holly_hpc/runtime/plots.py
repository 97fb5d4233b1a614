"""Small charts as pictures: a line plot and a bar plot, drawn with PIL and the caption font.

They return (3, H, W) float tensors in [0, 1], the kind runtime.captions makes, so one chart goes both to
TensorBoard (add_image) and to final/*.png (runtime.outputs.save_png). No matplotlib: a cluster node's
environment need not have it, and these charts need only lines, ticks and words.

Reading a chart: the axes span the data (x exactly, y with a 5% margin; y_range fixes y), tick values are
round (1, 2, 2.5 or 5 × 10^k), non-finite values are left out (a line breaks there), horizontal reference
lines are grey and dashed, vertical markers are red with their labels in a strip above the plot.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from .captions import CAPTION_PX, _font, _to_tensor, text_width

# Series colours (tab10 without its red, kept for markers, and its grey, kept for reference lines).
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)
MARKER_COLOUR = (214, 39, 40)  # vertical markers (vlines) and their labels
REFERENCE_COLOUR = (127, 127, 127)  # horizontal reference lines (hlines) and their labels
BAR_COLOUR = PALETTE[0]
HIGHLIGHT_COLOUR = PALETTE[1]
AXIS_COLOUR = (0, 0, 0)
GRID_COLOUR = (232, 232, 232)
MIN_SIZE = (120, 80)

_WHITE = (255, 255, 255)
_TICK = 3
_MAX_FLOAT = float(np.finfo(np.float64).max)
_MAX_PX = 1e6  # pixel coordinates of far-off-range points are clamped here before clipping


def _values(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    width, height = int(size[0]), int(size[1])
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        raise ValueError(f"a chart needs at least {MIN_SIZE[0]}×{MIN_SIZE[1]} pixels, got {width}×{height}")
    return width, height


def _half_span(lo: float, hi: float) -> float:
    """(hi - lo) / 2 without overflow for any finite lo, hi."""
    return hi / 2 - lo / 2


def _padded_range(lo: float, hi: float, pad: float) -> tuple[float, float]:
    """[lo, hi] widened to a usable axis range: a degenerate one opened around its centre, then `pad` of the
    span added on each side; everything stays finite."""
    centre = lo / 2 + hi / 2
    half = _half_span(lo, hi)
    if abs(centre) < 1e-290 and half < 1e-290:
        lo, hi = centre - 1.0, centre + 1.0
    elif half <= abs(centre) * 1e-12:
        lo, hi = centre - abs(centre) * 0.1, centre + abs(centre) * 0.1
    half = _half_span(lo, hi)
    return max(-_MAX_FLOAT, lo - 2 * pad * half), min(_MAX_FLOAT, hi + 2 * pad * half)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (multiples of 1, 2, 2.5 or 5 × 10^k) inside [lo, hi], about `target` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        raise ValueError(f"ticks need a finite range lo < hi, got [{lo}, {hi}]")
    raw = 2 * _half_span(lo, hi) / max(1, target) if _half_span(lo, hi) < _MAX_FLOAT / 2 else _MAX_FLOAT / target
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9)), raw)
    ticks = []
    if math.isfinite(step) and step > 0:
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if last - first <= 4 * target + 4:
            ticks = [k * step for k in range(first, last + 1)]
    ticks = [t for t in ticks if math.isfinite(t) and lo - 1e-9 * abs(step) <= t <= hi + 1e-9 * abs(step)]
    return ticks if len(ticks) >= 2 else [lo, hi]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Short labels that tell the ticks apart and stay within 0.1% of a step of each value: fixed decimals
    (trailing zeros dropped) for everyday magnitudes, '%g' with as few digits as will do otherwise."""
    if len(ticks) < 2:
        return [f"{t:g}" for t in ticks]
    step = min(abs(b - a) for a, b in itertools.pairwise(ticks)) or 1.0
    fixed = max(abs(t) for t in ticks) < 1e6 and step >= 1e-5

    def fits(labels: list[str]) -> bool:
        return len(set(labels)) == len(labels) and all(
            abs(float(s) - t) <= 1e-3 * step for s, t in zip(labels, ticks, strict=True)
        )

    labels: list[str] = []
    for digits in range(18):
        if fixed:
            labels = [f"{t:.{digits}f}" for t in ticks]
            labels = [s.rstrip("0").rstrip(".") if "." in s else s for s in labels]
        else:
            labels = [f"{t:.{digits + 1}g}" for t in ticks]
        if fits(labels):
            break
    return ["0" if float(s) == 0 else s for s in labels]


class _Axes:
    """Data -> pixel coordinates of one plot rectangle [x0, x1] × [y0, y1] (pixels, y0 on top)."""

    def __init__(self, rect: tuple[int, int, int, int], x_range: tuple[float, float], y_range: tuple[float, float]):
        self.x0, self.y0, self.x1, self.y1 = rect
        self.x_range, self.y_range = x_range, y_range

    @staticmethod
    def _map(v: float, lo: float, hi: float, p_lo: float, p_hi: float) -> float:
        fraction = (v / 2 - lo / 2) / _half_span(lo, hi)
        return min(_MAX_PX, max(-_MAX_PX, p_lo + fraction * (p_hi - p_lo)))

    def px(self, x: float) -> float:
        return self._map(x, *self.x_range, self.x0, self.x1)

    def py(self, y: float) -> float:
        return self._map(y, *self.y_range, self.y1, self.y0)

    def clip(self, p: tuple[float, float], q: tuple[float, float]):
        """The part of segment p-q inside the rectangle (Liang–Barsky), or None."""
        (xa, ya), (xb, yb) = p, q
        dx, dy = xb - xa, yb - ya
        t0, t1 = 0.0, 1.0
        for edge_p, edge_q in ((-dx, xa - self.x0), (dx, self.x1 - xa), (-dy, ya - self.y0), (dy, self.y1 - ya)):
            if edge_p == 0:
                if edge_q < 0:
                    return None
                continue
            t = edge_q / edge_p
            if edge_p < 0:
                t0 = max(t0, t)
            else:
                t1 = min(t1, t)
            if t0 > t1:
                return None
        return (xa + t0 * dx, ya + t0 * dy), (xa + t1 * dx, ya + t1 * dy)


def _text(draw, xy: tuple[float, float], text: str, fill=AXIS_COLOUR) -> None:
    draw.text((round(xy[0]), round(xy[1])), text, fill=fill, font=_font())


def _dashed_hline(draw, x0: int, x1: int, y: int, fill, on: int = 4, off: int = 3) -> None:
    for start in range(x0, x1 + 1, on + off):
        draw.line((start, y, min(x1, start + on - 1), y), fill=fill, width=1)


def _rotated_label(canvas, text: str, left: int, centre_y: float) -> None:
    """`text` turned 90° anticlockwise (reading upwards), its box's left edge at `left`."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (text_width(text) + 2, CAPTION_PX), _WHITE)
    ImageDraw.Draw(strip).text((1, 0), text, fill=AXIS_COLOUR, font=_font())
    turned = strip.rotate(90, expand=True)
    canvas.paste(turned, (left, max(0, round(centre_y - turned.height / 2))))


def _layout(
    width: int,
    height: int,
    y_range: tuple[float, float],
    title: str,
    x_label: str,
    y_label: str,
    top_rows: int,
    bottom_rows: int,
) -> tuple[tuple[int, int, int, int], list[float], list[str]]:
    """The plot rectangle and the y ticks with their labels (their width sets the left margin)."""
    top = 4 + (CAPTION_PX + 2 if title else 0) + top_rows * CAPTION_PX
    bottom = height - 1 - (_TICK + 2 + bottom_rows * CAPTION_PX + (CAPTION_PX if x_label else 0) + 2)
    y_ticks = nice_ticks(*y_range, target=max(2, (bottom - top) // 40))
    y_labels = tick_labels(y_ticks)
    left = 2 + (CAPTION_PX + 2 if y_label else 0) + max(text_width(s) for s in y_labels) + _TICK + 3
    right = width - 1 - 12
    if right - left < 20 or bottom - top < 20:
        raise ValueError(f"a chart of {width}×{height} pixels leaves no room to plot; make it larger")
    return (left, top, right, bottom), y_ticks, y_labels


def _frame(canvas, draw, axes: _Axes, x_ticks, x_labels, y_ticks, y_labels, title, x_label, y_label) -> None:
    """Grid lines, the axes box, ticks, tick labels, the title and the axis labels."""
    for t in y_ticks:
        y = round(axes.py(t))
        draw.line((axes.x0 + 1, y, axes.x1 - 1, y), fill=GRID_COLOUR)
    for t in x_ticks:
        x = round(axes.px(t))
        draw.line((x, axes.y0 + 1, x, axes.y1 - 1), fill=GRID_COLOUR)
    for t, s in zip(y_ticks, y_labels, strict=True):
        y = round(axes.py(t))
        draw.line((axes.x0 - _TICK, y, axes.x0, y), fill=AXIS_COLOUR)
        _text(draw, (axes.x0 - _TICK - 2 - text_width(s), y - CAPTION_PX / 2 - 1), s)
    for t, s in zip(x_ticks, x_labels, strict=True):
        x = round(axes.px(t))
        draw.line((x, axes.y1, x, axes.y1 + _TICK), fill=AXIS_COLOUR)
        _text(draw, (x - text_width(s) / 2, axes.y1 + _TICK), s)
    if title:
        _text(draw, ((canvas.width - text_width(title)) / 2, 1), title)
    if x_label:
        _text(draw, ((axes.x0 + axes.x1 - text_width(x_label)) / 2, canvas.height - CAPTION_PX - 2), x_label)
    if y_label:
        _rotated_label(canvas, y_label, 1, (axes.y0 + axes.y1) / 2)


def _x_ticks(axes: _Axes) -> tuple[list[float], list[str]]:
    """X ticks as many as fit without their labels touching."""
    span = axes.x1 - axes.x0
    ticks, labels = [], []
    for target in range(max(2, span // 60), 1, -1):
        ticks = nice_ticks(*axes.x_range, target=target)
        labels = tick_labels(ticks)
        gap = min(abs(axes.px(b) - axes.px(a)) for a, b in itertools.pairwise(ticks))
        if gap >= max(text_width(s) for s in labels) + 6:
            break
    return ticks, labels


def _finite_range(*arrays: np.ndarray) -> tuple[float, float] | None:
    finite = [a[np.isfinite(a)] for a in arrays if a.size]
    finite = [a for a in finite if a.size]
    if not finite:
        return None
    joined = np.concatenate(finite)
    return float(joined.min()), float(joined.max())


def _stack_labels(spans: list[tuple[float, float]]) -> list[int]:
    """A row for each label box (left, right) so boxes in one row do not overlap (greedy, in order)."""
    rows: list[float] = []  # right edge of the last box in each row
    out = []
    for left, right in spans:
        row = next((i for i, end in enumerate(rows) if left > end + 3), len(rows))
        if row == len(rows):
            rows.append(right)
        else:
            rows[row] = right
        out.append(row)
    return out


def line_plot(
    x,
    series: dict[str, Sequence[float]],
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    hlines: dict[str, float] | None = None,
    vlines: dict[str, float] | None = None,
    y_range: tuple[float, float] | None = None,
    size: tuple[int, int] = (360, 240),
) -> torch.Tensor:
    """A line chart (3, H, W) in [0, 1] of each of `series` (name -> y values, one per x) against `x`.

    Series take PALETTE's colours in order, named in a legend at the top right. `hlines` (label -> y) are
    grey dashed reference lines labelled at their right end; `vlines` (label -> x) are red markers labelled
    above the plot. Non-finite x or y values are left out: the line breaks there. The x axis spans the
    finite data and the markers exactly; y spans the data and the reference lines with a 5% margin, unless
    `y_range` = (low, high) fixes it (lines beyond it are clipped). `size` = (width, height) in pixels.
    """
    from PIL import Image, ImageDraw

    width, height = _check_size(size)
    xs = _values(x, "x")
    if xs.size == 0:
        raise ValueError("line_plot needs at least one x value")
    if not series:
        raise ValueError("line_plot needs at least one series (a dict name -> y values)")
    ys = {}
    for name, values in series.items():
        ys[name] = _values(values, f"series {name!r}")
        if ys[name].shape != xs.shape:
            raise ValueError(f"series {name!r} has {ys[name].size} values for {xs.size} x values")
    hl = {k: float(v) for k, v in (hlines or {}).items() if math.isfinite(float(v))}
    vl = {k: float(v) for k, v in (vlines or {}).items() if math.isfinite(float(v))}
    if y_range is not None:
        y_lo, y_hi = (float(v) for v in y_range)
        if not (math.isfinite(y_lo) and math.isfinite(y_hi) and y_lo < y_hi):
            raise ValueError(f"y_range must be finite with low < high, got {y_range}")
    usable = [np.isfinite(xs) & np.isfinite(y) for y in ys.values()]
    x_data = _finite_range(*(xs[u] for u in usable), np.array(list(vl.values())))
    x_lo, x_hi = _padded_range(*(x_data or (0.0, 1.0)), pad=0.0)
    if y_range is None:
        y_data = _finite_range(*(y[u] for y, u in zip(ys.values(), usable, strict=True)), np.array(list(hl.values())))
        y_lo, y_hi = _padded_range(*(y_data or (0.0, 1.0)), pad=0.05)

    # Vertical marker labels sit in rows above the plot; their x positions need the plot's left edge, which
    # needs the y tick labels: lay out once with one row, place the labels, then with the rows they need.
    rows = 1 if vl else 0
    for _ in range(2):
        rect, y_ticks, y_labels = _layout(width, height, (y_lo, y_hi), title, x_label, y_label, rows, 1)
        axes = _Axes(rect, (x_lo, x_hi), (y_lo, y_hi))
        spans = []
        for label in vl:
            w = text_width(label)
            left = min(max(axes.px(vl[label]) - w / 2, 1), width - 1 - w)
            spans.append((left, left + w))
        label_rows = _stack_labels(spans)
        needed = max(label_rows, default=-1) + 1
        if needed <= rows:
            break
        rows = needed
    x_ticks, x_labels = _x_ticks(axes)

    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    _frame(canvas, draw, axes, x_ticks, x_labels, y_ticks, y_labels, title, x_label, y_label)
    for label, value in hl.items():
        y = round(axes.py(value))
        if axes.y0 < y < axes.y1:
            _dashed_hline(draw, axes.x0 + 1, axes.x1 - 1, y, REFERENCE_COLOUR)
            _text(draw, (axes.x1 - 3 - text_width(label), y - CAPTION_PX), label, fill=REFERENCE_COLOUR)
    for (label, value), (left, _), row in zip(vl.items(), spans, label_rows, strict=True):
        x = round(axes.px(value))
        if axes.x0 <= x <= axes.x1:
            x = min(max(x, axes.x0 + 1), axes.x1 - 1)  # a marker on the box's edge stays in sight
            draw.line((x, axes.y0 + 1, x, axes.y1 - 1), fill=MARKER_COLOUR, width=1)
        _text(draw, (left, axes.y0 - (rows - row) * CAPTION_PX), label, fill=MARKER_COLOUR)
    for i, y in enumerate(ys.values()):
        _draw_series(draw, axes, xs, y, PALETTE[i % len(PALETTE)])
    _legend(canvas, draw, axes, list(ys), [PALETTE[i % len(PALETTE)] for i in range(len(ys))])
    draw.rectangle((axes.x0, axes.y0, axes.x1, axes.y1), outline=AXIS_COLOUR)
    return _to_tensor(canvas)


def _draw_series(draw, axes: _Axes, xs: np.ndarray, ys: np.ndarray, colour) -> None:
    """Consecutive finite points joined (clipped to the plot); a finite point alone between gaps as a dot."""
    ok = np.isfinite(xs) & np.isfinite(ys)
    points = [(axes.px(float(a)), axes.py(float(b))) if good else None for a, b, good in zip(xs, ys, ok, strict=True)]
    for i, p in enumerate(points):
        if p is None:
            continue
        prev_ok = i > 0 and points[i - 1] is not None
        next_ok = i + 1 < len(points) and points[i + 1] is not None
        if next_ok:
            segment = axes.clip(p, points[i + 1])
            if segment is not None:
                (xa, ya), (xb, yb) = segment
                draw.line((xa, ya, xb, yb), fill=colour, width=2)
        elif not prev_ok and axes.x0 <= p[0] <= axes.x1 and axes.y0 <= p[1] <= axes.y1:
            draw.rectangle((round(p[0]) - 1, round(p[1]) - 1, round(p[0]) + 1, round(p[1]) + 1), fill=colour)


def _legend(canvas, draw, axes: _Axes, names: list[str], colours: list) -> None:
    """Names with a stroke of their colour, in a white box in the plot's corner that hides the least of
    what is drawn (top right when all are equally clear)."""
    sample = 14
    box_w = sample + 4 + max(text_width(n) for n in names) + 6
    box_h = len(names) * CAPTION_PX + 4
    pixels = np.asarray(canvas, dtype=np.int16)
    drawn = (pixels != np.array(_WHITE)).any(-1) & (pixels != np.array(GRID_COLOUR)).any(-1)
    corners = []
    for y_try in (axes.y0 + 4, axes.y1 - 4 - box_h):
        for x_try in (axes.x1 - 4 - box_w, axes.x0 + 4):
            x, y = max(axes.x0 + 2, x_try), max(axes.y0 + 2, y_try)
            corners.append((int(drawn[y : y + box_h + 1, x : x + box_w + 1].sum()), x, y))
    _, left, top = min(corners, key=lambda c: c[0])  # first of the least covered: top right on ties
    draw.rectangle((left, top, left + box_w, top + box_h), fill=_WHITE, outline=GRID_COLOUR)
    for i, (name, colour) in enumerate(zip(names, colours, strict=True)):
        y = top + 2 + i * CAPTION_PX
        draw.line((left + 3, y + CAPTION_PX // 2, left + 3 + sample, y + CAPTION_PX // 2), fill=colour, width=2)
        _text(draw, (left + 3 + sample + 4, y - 1), name)


def _fit_text(text: str, room: float) -> str:
    """`text`, shortened with '..' to fit `room` pixels."""
    if text_width(text) <= room:
        return text
    while text and text_width(text + "..") > room:
        text = text[:-1]
    return text + ".." if text else ""


def bar_plot(
    labels: list[str],
    values: Sequence[float],
    title: str = "",
    y_label: str = "",
    highlight: int | None = None,
    size: tuple[int, int] = (360, 240),
) -> torch.Tensor:
    """A bar chart (3, H, W) in [0, 1]: one bar per label from 0 to its value, labels under the bars (in two
    staggered rows, shortened with '..', when they do not fit), values over them where there is room; the
    bar at index `highlight` in HIGHLIGHT_COLOUR, the others in BAR_COLOUR. A non-finite value draws no bar."""
    from PIL import Image, ImageDraw

    width, height = _check_size(size)
    vs = _values(values, "values")
    labels = [str(s) for s in labels]
    if not labels:
        raise ValueError("bar_plot needs at least one bar (labels and values are empty)")
    if len(labels) != vs.size:
        raise ValueError(f"bar_plot got {len(labels)} labels for {vs.size} values")
    if highlight is not None and not -len(labels) <= highlight < len(labels):
        raise ValueError(f"highlight {highlight} is not a bar index (there are {len(labels)} bars)")
    if highlight is not None:
        highlight %= len(labels)
    finite = vs[np.isfinite(vs)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = max(0.0, float(finite.max())) if finite.size else 1.0
    y_lo, y_hi = _padded_range(lo, hi, pad=0.12)  # room for the values over the bars
    if lo == 0.0 and hi > 0:
        y_lo = 0.0
    if hi == 0.0 and lo < 0:
        y_hi = 0.0

    n = len(labels)
    plot_w = width - 60  # a first guess of the plot width, to decide between one and two label rows
    stagger = max(text_width(s) for s in labels) > plot_w / n - 4 and n > 1
    rect, y_ticks, y_labels = _layout(width, height, (y_lo, y_hi), title, "", y_label, 0, 2 if stagger else 1)
    axes = _Axes(rect, (0.0, float(n)), (y_lo, y_hi))
    slot = (axes.x1 - axes.x0) / n
    room = (2 * slot if stagger else slot) - 4

    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    _frame(canvas, draw, axes, [], [], y_ticks, y_labels, title, "", y_label)
    base = round(min(max(axes.py(0.0), axes.y0), axes.y1))
    if axes.y0 < base < axes.y1:
        draw.line((axes.x0, base, axes.x1, base), fill=AXIS_COLOUR)
    bar_w = max(1.0, 0.7 * slot)
    for i, (label, value) in enumerate(zip(labels, vs, strict=True)):
        centre = axes.x0 + (i + 0.5) * slot
        left, right = round(centre - bar_w / 2), round(centre + bar_w / 2) - 1
        if math.isfinite(value):
            top = round(min(max(axes.py(float(value)), axes.y0 + 1), axes.y1 - 1))
            if top != base:
                colour = HIGHLIGHT_COLOUR if i == highlight else BAR_COLOUR
                draw.rectangle((left, min(top, base), max(left, right), max(top, base)), fill=colour)
        else:
            top = base
        number = f"{value:.3g}"
        if text_width(number) <= slot - 2:
            y = top - CAPTION_PX if not math.isfinite(value) or value >= 0 else top + 1
            y = min(max(y, axes.y0 + 1), axes.y1 - CAPTION_PX)
            _text(draw, (centre - text_width(number) / 2, y - 1), number)
        shown = _fit_text(label, room)
        row = i % 2 if stagger else 0
        _text(draw, (centre - text_width(shown) / 2, axes.y1 + _TICK + row * CAPTION_PX), shown)
        draw.line((round(centre), axes.y1, round(centre), axes.y1 + _TICK), fill=AXIS_COLOUR)
    draw.rectangle((axes.x0, axes.y0, axes.x1, axes.y1), outline=AXIS_COLOUR)
    return _to_tensor(canvas)
