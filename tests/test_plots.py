"""Charts as pictures: their shape and range, where their colours land, and their refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from holly_hpc.runtime.plots import (
    BAR_COLOUR,
    HIGHLIGHT_COLOUR,
    MARKER_COLOUR,
    PALETTE,
    REFERENCE_COLOUR,
    bar_plot,
    line_plot,
    nice_ticks,
    tick_labels,
)


def _pixels(picture: torch.Tensor) -> np.ndarray:
    return (picture.permute(1, 2, 0).numpy() * 255).round().astype(np.int64)  # (H, W, 3)


def _is(picture: torch.Tensor, colour) -> np.ndarray:
    return (_pixels(picture) == np.array(colour)).all(-1)


def _frame(picture: torch.Tensor) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the axes box: the black lines running most of the picture."""
    black = _is(picture, (0, 0, 0))
    cols = np.flatnonzero(black.mean(0) > 0.4)
    rows = np.flatnonzero(black.mean(1) > 0.4)
    return int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())


def _valid(picture: torch.Tensor, size=(360, 240)) -> None:
    assert picture.shape == (3, size[1], size[0])
    assert picture.dtype == torch.float32
    assert torch.isfinite(picture).all()
    assert picture.min() >= 0 and picture.max() <= 1


def test_line_plot_is_a_picture_of_the_asked_size():
    x = torch.linspace(0, 0.25, 40)
    picture = line_plot(
        x,
        {"FSC": torch.exp(-((x / 0.08) ** 2)), "other": 0.5 * torch.cos(30 * x)},
        title="FSC",
        x_label="spatial frequency (1/nm)",
        y_label="FSC",
        hlines={"0.143": 0.143},
        vlines={"19.8 nm": 1 / 19.8},
    )
    _valid(picture)
    assert _is(picture, PALETTE[0]).any() and _is(picture, PALETTE[1]).any()
    _valid(line_plot([1, 2, 3], {"a": [3, 1, 2]}, size=(200, 120)), size=(200, 120))


def test_vertical_marker_sits_at_its_data_column():
    x = np.arange(11.0)  # the x axis spans the data exactly: 0 at the box's left edge, 10 at its right
    picture = line_plot(x, {"y": x**2}, vlines={"5 nm": 5.0, "2.5 nm": 2.5}, title="t", x_label="x", y_label="y")
    left, top, right, bottom = _frame(picture)
    marker = _is(picture, MARKER_COLOUR)[top + 1 : bottom]  # inside the box: the labels sit above it
    columns = set(np.flatnonzero(marker.any(0)).tolist())
    expected = {round(left + f * (right - left)) for f in (0.5, 0.25)}
    assert columns and all(min(abs(c - e) for e in expected) <= 1 for c in columns)
    assert all(any(abs(c - e) <= 1 for c in columns) for e in expected)
    # The labels, in the marker colour (anti-aliased: reddish), are above the box.
    above = _pixels(picture)[:top]
    assert ((above[..., 0] > above[..., 1] + 60) & (above[..., 0] > above[..., 2] + 60)).any()


def test_series_and_reference_lines_sit_at_their_data_rows():
    x = np.linspace(-1.0, 1.0, 21)
    picture = line_plot(x, {"low": np.full(21, 0.25), "high": np.full(21, 0.75)}, hlines={"0.5": 0.5}, y_range=(0, 1))
    left, top, right, bottom = _frame(picture)
    middle = (left + right) // 2  # away from the legend at the top right
    for colour, value in ((PALETTE[0], 0.25), (PALETTE[1], 0.75), (REFERENCE_COLOUR, 0.5)):
        expected = bottom - value * (bottom - top)
        rows = np.flatnonzero(_is(picture, colour)[top + 1 : bottom, left + 1 : middle].any(1)) + top + 1
        assert rows.size and np.abs(rows - expected).max() <= 2, (colour, rows, expected)
    # The reference line is dashed: gaps along its row.
    row = round(bottom - 0.5 * (bottom - top))
    along = _is(picture, REFERENCE_COLOUR)[row, left + 1 : middle]
    assert 0.3 < along.mean() < 0.9


def test_non_finite_values_are_left_out_and_break_the_line():
    x = np.arange(11.0)
    y = x / 10
    y[5] = math.nan
    with_inf = y.copy()
    with_inf[5] = math.inf
    x_inf = x.copy()
    x_inf[5] = -math.inf
    for xs, ys in ((x, y), (x, with_inf), (x_inf, x / 10)):
        picture = line_plot(xs, {"y": ys}, y_range=(0, 1))
        _valid(picture)
        left, top, right, bottom = _frame(picture)
        at = [round(left + v / 10 * (right - left)) for v in (1, 4, 4.3, 5.7, 6, 9)]
        series = _is(picture, PALETTE[0])[top + 1 : bottom]
        assert series[:, at[2] : at[3]].sum() == 0  # no segment into or out of the missing point
        assert series[:, at[0] : at[1]].any() and series[:, at[4] : at[5]].any()
    # A series with nothing finite still makes a picture: axes and legend, no line.
    picture = line_plot(x, {"none": np.full(11, math.nan), "some": y}, hlines={"inf": math.inf})
    _valid(picture)


def test_a_point_alone_between_gaps_is_drawn_as_a_dot():
    y = np.full(9, math.nan)
    y[4] = 0.5
    picture = line_plot(np.arange(9.0), {"y": y}, y_range=(0, 1))
    left, top, right, bottom = _frame(picture)
    inside = _is(picture, PALETTE[0])[top + 1 : bottom, left + 1 : (left + right) // 2 + 4]
    assert inside.any()


def test_empty_or_mismatched_input_is_refused_clearly():
    with pytest.raises(ValueError, match="at least one series"):
        line_plot([1, 2], {})
    with pytest.raises(ValueError, match="at least one x value"):
        line_plot([], {"a": []})
    with pytest.raises(ValueError, match="has 2 values for 3 x values"):
        line_plot([1, 2, 3], {"a": [1, 2]})
    with pytest.raises(ValueError, match="one-dimensional"):
        line_plot([[1, 2]], {"a": [[1, 2]]})
    with pytest.raises(ValueError, match="y_range"):
        line_plot([1, 2], {"a": [1, 2]}, y_range=(1, 1))
    with pytest.raises(ValueError, match="at least"):
        line_plot([1, 2], {"a": [1, 2]}, size=(40, 30))
    with pytest.raises(ValueError, match="at least one bar"):
        bar_plot([], [])
    with pytest.raises(ValueError, match="2 labels for 3 values"):
        bar_plot(["a", "b"], [1, 2, 3])
    with pytest.raises(ValueError, match="not a bar index"):
        bar_plot(["a", "b"], [1, 2], highlight=2)


def test_bar_plot_highlights_one_bar():
    values = [3.0, 5.5, -1.0, math.nan, 2.0]
    picture = bar_plot(["alpha", "beta", "a rather long label", "d", "e"], values, title="t", y_label="v", highlight=1)
    _valid(picture)
    left, top, right, bottom = _frame(picture)
    slot = (right - left) / len(values)
    for i, value in enumerate(values):
        column = _pixels(picture)[top + 1 : bottom, round(left + (i + 0.5) * slot)]
        has = lambda colour: (column == np.array(colour)).all(-1).any()  # noqa: E731, B023
        if math.isnan(value):
            assert not has(BAR_COLOUR) and not has(HIGHLIGHT_COLOUR)
        elif i == 1:
            assert has(HIGHLIGHT_COLOUR) and not has(BAR_COLOUR)
        else:
            assert has(BAR_COLOUR) and not has(HIGHLIGHT_COLOUR)
    # Taller bars are taller: the 5.5 bar reaches higher than the 3 one.
    pixels = _is(picture, HIGHLIGHT_COLOUR) | _is(picture, BAR_COLOUR)
    top_of = lambda i: np.flatnonzero(pixels[:, round(left + (i + 0.5) * slot)]).min()  # noqa: E731
    assert top_of(1) < top_of(0) < top_of(4)
    _valid(bar_plot([f"label {i}" for i in range(30)], list(range(30)), highlight=-1))


def test_ticks_are_round_and_labels_distinct():
    assert nice_ticks(0, 0.25, 5) == pytest.approx([0, 0.05, 0.1, 0.15, 0.2, 0.25])
    assert tick_labels(nice_ticks(0, 0.25, 5)) == ["0", "0.05", "0.1", "0.15", "0.2", "0.25"]
    assert tick_labels(nice_ticks(-0.2, 1.05, 5)) == ["0", "0.25", "0.5", "0.75", "1"]
    assert tick_labels([0.0, 2e7, 4e7]) == ["0", "2e+07", "4e+07"]


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-1e300, 1e300), width=st.floats(1e-6, 1e300), target=st.integers(2, 10))
def test_ticks_lie_in_the_range_for_any_finite_range(lo, width, target):
    hi = lo + width * max(1.0, abs(lo))
    if not (math.isfinite(hi) and lo < hi):
        return
    ticks = nice_ticks(lo, hi, target)
    assert len(ticks) >= 2 and ticks == sorted(ticks)
    span = hi - lo
    assert all(lo - 1e-6 * span <= t <= hi + 1e-6 * span for t in ticks)
    labels = tick_labels(ticks)
    assert len(set(labels)) == len(labels)


_finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 25),
    n_series=st.integers(1, 3),
    with_lines=st.booleans(),
    y_range=st.one_of(st.none(), st.tuples(st.floats(-1e6, 1e6), st.floats(1e-3, 1e6))),
)
def test_any_finite_data_gives_a_valid_line_plot(data, n, n_series, with_lines, y_range):
    x = data.draw(st.lists(_finite, min_size=n, max_size=n))
    series = {f"s{i}": data.draw(st.lists(_finite, min_size=n, max_size=n)) for i in range(n_series)}
    lines = data.draw(st.dictionaries(st.text("abc.0123 nm", max_size=8), _finite, max_size=3)) if with_lines else None
    fixed = None if y_range is None else (y_range[0], y_range[0] + y_range[1])
    _valid(line_plot(x, series, title="t", x_label="x", y_label="y", hlines=lines, vlines=lines, y_range=fixed))


@settings(max_examples=30, deadline=None)
@given(values=st.lists(_finite, min_size=1, max_size=20), data=st.data())
def test_any_finite_data_gives_a_valid_bar_plot(values, data):
    highlight = data.draw(st.one_of(st.none(), st.integers(0, len(values) - 1)))
    labels = [f"bar {i}" for i in range(len(values))]
    _valid(bar_plot(labels, values, title="t", y_label="y", highlight=highlight))
