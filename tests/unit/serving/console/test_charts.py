"""The console's SVG charts: well-formed, proportional, escaped, and free of inline style."""

from __future__ import annotations

import itertools
import math
import xml.etree.ElementTree as ET

import pytest

from serving.console.charts import PALETTE, bars, sparkline, stacked_bars

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    assert "style=" not in svg
    assert "<script" not in svg.lower()
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert root.get("role") == "img"
    assert root.get("width") == "100%"
    assert root.get("viewBox")
    title, desc = root.find(f"{SVG}title"), root.find(f"{SVG}desc")
    assert title is not None and desc is not None
    assert root.get("aria-labelledby") == f"{title.get('id')} {desc.get('id')}"
    return root


def bar_rects(root: ET.Element) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if "chart-bar" in r.get("class", "").split()]


def tick_values(root: ET.Element) -> list[float]:
    axis = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-axis")
    labels = [t.text or "" for t in axis.findall(f"{SVG}text") if t.get("text-anchor") == "end"]
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}
    return [float(s[:-1]) * scale[s[-1]] if s[-1] in scale else float(s) for s in labels]


def height(rect: ET.Element) -> float:
    return float(rect.get("height", "nan"))


def test_bar_heights_are_proportional_to_values() -> None:
    root = parse(bars(["mon", "tue"], [1, 3], title="Requests", unit="req"))
    low, high = bar_rects(root)
    assert height(high) == pytest.approx(3 * height(low), abs=0.5)
    assert float(low.get("y", "0")) + height(low) == pytest.approx(
        float(high.get("y", "0")) + height(high)
    )  # one baseline
    assert [r.findtext(f"{SVG}title") for r in (low, high)] == ["mon: 1 req", "tue: 3 req"]


def test_stack_parts_add_up_to_the_total_and_sit_on_each_other() -> None:
    series = {"acme": [1.5, 0.0, 2.0], "globex": [0.5, 4.0, 1.0], "idle": [2.0, 1.0, 0.25]}
    root = parse(
        stacked_bars(["d1", "d2", "d3"], series, title="GPU-hours", unit="h", muted={"idle"})
    )
    rects = bar_rects(root)
    assert len(rects) == 8  # the zero is not drawn
    by_x: dict[str, list[ET.Element]] = {}
    for rect in rects:
        by_x.setdefault(rect.get("x", ""), []).append(rect)
    stacks = list(by_x.values())
    px_per_hour = sum(map(height, stacks[0])) / 4.0
    for stack, total in zip(stacks, [4.0, 5.0, 3.25], strict=True):
        assert sum(map(height, stack)) == pytest.approx(total * px_per_hour, abs=0.05)
        for lower, upper in itertools.pairwise(stack):  # each part starts where the last ended
            assert float(upper.get("y", "0")) + height(upper) == pytest.approx(
                float(lower.get("y", "0")), abs=0.01
            )
    idle = [r for r in rects if "chart-bar-muted" in r.get("class", "")]
    assert len(idle) == 3 and all(r.get("fill", "").startswith("url(#") for r in idle)
    assert all(stack[-1] in idle for stack in stacks)  # idle on top
    assert stacks[0][0].findtext(f"{SVG}title") == "d1, acme: 1.5 h"
    legend = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-legend")
    assert [t.text for t in legend.iter(f"{SVG}text")] == ["acme", "globex", "idle"]


@pytest.mark.parametrize("maximum", [0.07, 1, 3, 9.5, 10, 47, 999, 1001, 123456, 2.5e9])
def test_the_axis_top_is_a_round_number_at_least_the_maximum(maximum: float) -> None:
    ticks = tick_values(parse(bars(["a", "b"], [maximum / 3, maximum], title="t", unit="u")))
    assert ticks[0] == 0 and ticks[-1] >= maximum * (1 - 1e-6)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(mantissa == pytest.approx(m) for m in (1, 2, 5))
    assert 3 <= len(ticks) <= 11


def test_titles_and_labels_are_escaped() -> None:
    nasty = "<b>&\"'</b>"
    svg = stacked_bars(
        [nasty, "d2"], {nasty: [1, 2], "b": [1, 1]}, title=nasty, unit="<u>", muted=()
    )
    assert "<b>" not in svg
    root = parse(svg)
    assert root.findtext(f"{SVG}title") == nasty
    assert bar_rects(root)[0].findtext(f"{SVG}title") == f"{nasty}, {nasty}: 1 <u>"
    assert nasty in (root.findtext(f"{SVG}desc") or "")


def test_long_labels_are_clipped_with_the_full_text_kept_in_a_title() -> None:
    label = "a-model-version-with-a-very-long-name-2025-01-01"
    root = parse(stacked_bars([label], {label: [1], "b": [2]}, title="t", unit="u"))
    texts = [t for t in root.iter(f"{SVG}text") if t.findtext(f"{SVG}title") == label]
    assert len(texts) == 2  # the x label and the legend
    for text in texts:
        shown = "".join(text.itertext()).removeprefix(label)
        assert shown.endswith("\u2026") and len(shown) < len(label)
    assert bar_rects(root)[0].findtext(f"{SVG}title") == f"{label}, {label}: 1 u"


@pytest.mark.parametrize(
    ("days", "values"), [([], []), (["d1", "d2"], [0, 0]), (["d1"], [0])], ids=str
)
def test_no_data_draws_the_axes_and_says_so(days: list[str], values: list[float]) -> None:
    for svg in (
        bars(days, values, title="t", unit="u"),
        stacked_bars(days, {"a": values, "b": values}, title="t", unit="u"),
        stacked_bars(days, {}, title="t", unit="u"),
    ):
        root = parse(svg)
        assert bar_rects(root) == []
        assert [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "chart-empty"] == [
            "No data"
        ]
        assert len(root.findall(f".//{SVG}g[@class='chart-axis']/{SVG}line")) >= 2
        assert "No data" in (root.findtext(f"{SVG}desc") or "") or "no data" in svg


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_negative_and_non_finite_values_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        bars(["a", "b"], [1, bad], title="t", unit="u")
    with pytest.raises(ValueError, match="finite"):
        stacked_bars(["a"], {"x": [bad]}, title="t", unit="u")
    with pytest.raises(ValueError, match="finite"):
        sparkline([1, bad], title="t")


def test_series_of_the_wrong_length_are_refused() -> None:
    with pytest.raises(ValueError, match="2 values for 3 labels"):
        stacked_bars(["a", "b", "c"], {"x": [1, 2]}, title="t", unit="u")


def test_one_day_is_one_bar_of_bounded_width() -> None:
    root = parse(bars(["2025-01-01"], [5], title="t", unit="u"))
    (rect,) = bar_rects(root)
    assert 0 < float(rect.get("width", "0")) <= 64


def test_a_leap_year_of_days_fits_with_thinned_labels() -> None:
    days = [f"2024-{i // 31 + 1:02}-{i % 31 + 1:02}" for i in range(366)]
    root = parse(bars(days, [float(i % 7) for i in range(366)], title="t", unit="u"))
    rects = bar_rects(root)
    assert len(rects) == 366 - 53  # the zero days are not drawn
    view_width = float((root.get("viewBox") or "").split()[2])
    assert all(0 <= float(r.get("x", "-1")) <= view_width for r in rects)
    x_labels = [t for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "middle"]
    assert 5 <= len(x_labels) <= 20
    positions = sorted(float(t.get("x", "0")) for t in x_labels)
    assert min(b - a for a, b in itertools.pairwise(positions)) >= 10 * 7  # no overlap


def test_phone_width_still_lays_out() -> None:
    series = {f"tenant-{i}": [1.0, 2.0] for i in range(3)}
    root = parse(stacked_bars(["d1", "d2"], series, title="t", unit="u", width=360, height=320))
    assert len(bar_rects(root)) == 6


def test_many_series_fold_into_others_and_colours_come_from_the_palette() -> None:
    series = {f"tenant-{i}": [float(i + 1)] for i in range(12)}
    root = parse(stacked_bars(["d1"], series, title="t", unit="u", muted={"tenant-0"}))
    fills = [r.get("fill") for r in bar_rects(root)]
    assert len(fills) == len(PALETTE) + 1  # four kept, the others, and the muted one
    assert set(fills[:-1]) == set(PALETTE)
    legend = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-legend")
    names = [t.text for t in legend.iter(f"{SVG}text")]
    assert names == ["tenant-8", "tenant-9", "tenant-10", "tenant-11", "7 others", "tenant-0"]


def test_sparkline_runs_from_zero_to_the_maximum() -> None:
    root = parse(sparkline([0, 2, 4], title="Requests <today>", width=100, height=44))
    line = root.find(f"{SVG}polyline")
    assert line is not None and line.get("class") == "chart-line"
    points = [tuple(map(float, p.split(","))) for p in (line.get("points") or "").split()]
    assert [x for x, _ in points] == [2, 50, 98]
    assert [y for _, y in points] == [42, 22, 2]
    assert root.findtext(f"{SVG}title") == "Requests <today>"


@pytest.mark.parametrize("values", [[], [3.0], [0.0, 0.0]], ids=str)
def test_sparkline_edge_cases_draw_a_level_line(values: list[float]) -> None:
    root = parse(sparkline(values, title="t"))
    line = root.find(f"{SVG}polyline")
    assert line is not None
    ys = {float(p.split(",")[1]) for p in (line.get("points") or "").split()}
    assert len(ys) == 1


def test_ids_are_stable_and_differ_between_charts() -> None:
    first = bars(["a"], [1], title="one", unit="u")
    assert first == bars(["a"], [1], title="one", unit="u")
    assert parse(first).get("aria-labelledby") != parse(
        bars(["a"], [1], title="two", unit="u")
    ).get("aria-labelledby")
