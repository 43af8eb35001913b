"""The benchmark's figures (bench.report): drawn from the committed results, every provider in
one colour everywhere, floors as lines, bars from the minimum with the median as a tick, a
size that fits a laptop screen, the legend on top, no warnings; the file names and the CLI."""
import json
import os
import warnings
from fnmatch import fnmatchcase

import pytest
from matplotlib.colors import to_hex
from PIL import Image

from bench import report
from bench.report import (DPI, FALLBACK, PANEL_IN, ROOFLINE, STYLES, families, figure, plot,
                          style, write_json)

RESULTS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench", "results")
META = dict(device="CPU (test)", torch="t", triton="t", dtype="float32")
FLOORS = {"nn.Linear (base only)", "base model alone (no adapters, floor)",
          "copy of every base weight"}


def _load(name):
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure of the committed CPU and H100 results, saved as plot() saves them:
    {results file: (rows, [(figure, PNG path), ...])}, and the warnings raised meanwhile."""
    out = tmp_path_factory.mktemp("figures")
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ["cpu.json", "h100-full.json"]:
            meta = _load(name)
            figures = []
            for family, (title, rows) in families(meta["results"]).items():
                figures.append((figure(meta, rows, title), out / f"{name}-{family}.png"))
                figures[-1][0].savefig(figures[-1][1], dpi=DPI)
            results[name] = meta["results"], figures
    return dict(results=results, warnings=[str(w.message) for w in caught])


def _axes(figures):
    return [ax for fig, _ in figures for ax in fig.axes]


def _figures(drawn):
    return [fig for _, figures in drawn["results"].values() for fig, _ in figures]


def _bars(ax):
    """(provider, colour, bar) per bar of a panel, the provider read from the tick label."""
    names = {round(y): t.get_text().replace("\n", " ")
             for y, t in zip(ax.get_yticks(), ax.get_yticklabels())}
    return [(names[round(p.get_y() + p.get_height() / 2)], to_hex(p.get_facecolor()), p)
            for p in ax.patches]


def _reference_lines(ax):
    """(x, line style) of each line drawn across a panel: floors and limits."""
    return [(line.get_xdata()[0], line.get_linestyle()) for line in ax.get_lines()
            if line.get_linestyle() not in ("-", "None")]


def _median_ticks(ax):
    return [line.get_xdata()[0] for line in ax.get_lines() if line.get_marker() == "|"]


def test_the_committed_results_draw_without_warnings(drawn):
    assert drawn["warnings"] == []


def test_a_provider_has_one_colour_in_every_panel_and_figure(drawn):
    colours = {}
    for fig in _figures(drawn):
        for ax in fig.axes:
            bars = _bars(ax)
            assert len({c for _, c, _ in bars}) == len(bars)  # distinct in a panel
            for provider, colour, _ in bars:
                assert colours.setdefault(provider, colour) == colour, provider
    assert {"kronops (native)", "kronops (PyTorch kernels)", "FastKron (pyfastkron)",
            "torch autograd, same expression"} <= colours.keys()


def test_every_committed_provider_has_a_named_style():
    """No provider of the published results falls back to a hashed colour."""
    for name in ["cpu.json", "cpu-backends.json", "cpu-backends-bf16.json",
                 "cpu-backends-default.json", "cpu-backends-bf16-default.json", "serving-cpu.json",
                 "h100-full.json"]:
        for r in _load(name)["results"]:
            assert any(fnmatchcase(r["provider"], p) for p in STYLES), r["provider"]


def test_styles_name_distinct_colours_and_unknown_providers_get_others():
    bar_colours = [s.colour for s in STYLES.values() if s.line is None]
    assert len(set(bar_colours)) == len(bar_colours)
    unknown = style("a provider nobody named")
    assert unknown == style("a provider nobody named") and unknown.line is None
    assert unknown.colour in FALLBACK and unknown.colour not in bar_colours
    assert unknown.label == "a provider nobody named"
    assert style("PEFT 9.9.9 LoKr adapter_names= (one batch)").label == \
        "PEFT LoKr, adapter_names= batch"


def test_floors_and_limits_are_lines_not_bars(drawn):
    for rows, figures in drawn["results"].values():
        bars = [b for ax in _axes(figures) for b in _bars(ax)]
        lines = [x for ax in _axes(figures) for x in _reference_lines(ax)]
        assert not FLOORS & {provider for provider, _, _ in bars}
        floors = [r for r in rows if r["provider"] in FLOORS]
        for r in floors:
            assert (r.get("min_ms") or r["median_ms"], style(r["provider"]).line) in lines
        roofline = [x for x in lines if x[1] == ROOFLINE.line]
        assert len(roofline) == len({(r["op"], r["mode"], r["shape"]) for r in rows
                                     if "roofline_pct" in r})
        assert len(lines) == len(floors) + len(roofline)
    assert any(r["provider"] in FLOORS for r in drawn["results"]["cpu.json"][0])


def test_bars_are_the_minimum_and_the_median_a_tick(drawn):
    rows, figures = drawn["results"]["cpu.json"]
    competing = [r for r in rows if r["provider"] not in FLOORS]
    axes = _axes(figures)
    assert sorted(b.get_width() for ax in axes for _, _, b in _bars(ax)) == \
        sorted(r["min_ms"] for r in competing)
    assert all(b.get_x() == 0 for ax in axes for _, _, b in _bars(ax))
    assert sorted(x for ax in axes for x in _median_ticks(ax)) == \
        sorted(r["median_ms"] for r in competing)


def _case(min_ms, **fields):
    names = ["kronops", "naive (torch.kron)"]
    return [dict(op="kron_linear", mode="forward", shape="8x16->12", provider=name,
                 median_ms=3.0 * (i + 1), p20_ms=2.5 * (i + 1), p80_ms=4.0 * (i + 1),
                 min_ms=None if min_ms is None else min_ms * (i + 1), error_ok=True,
                 **fields) for i, name in enumerate(names)]


def test_one_bar_from_zero_to_the_minimum_median_tick_and_spread():
    (ax,) = figure(META, _case(2.0)).axes
    (_, _, bar), _ = _bars(ax)
    assert (bar.get_x(), bar.get_width()) == (0, 2.0)
    assert _median_ticks(ax) == [3.0, 6.0]
    whiskers = [[tuple(p) for p in c.get_segments()[0]] for c in ax.collections]
    assert whiskers == [[(2.5, 0), (4.0, 0)], [(5.0, 1), (8.0, 1)]]
    assert any(t.get_text().startswith("2 ms   2x") for t in ax.texts)


def test_without_a_minimum_the_bar_is_the_median_and_no_tick():
    """Older GPU results hold no minimum: the bar is the median, the roofline a line."""
    (ax,) = figure(META, _case(None, roofline_pct=25.0)).axes
    assert [b.get_width() for _, _, b in _bars(ax)] == [3.0, 6.0]
    assert _median_ticks(ax) == []
    assert _reference_lines(ax) == [(0.75, ":")]


def test_figures_fit_a_laptop_screen(drawn):
    for _, figures in drawn["results"].values():
        for _, path in figures:
            with Image.open(path) as png:
                width, height = png.size
            assert width <= 1800 and height <= 1600, (path, png.size)


def test_legend_above_the_panels_and_their_titles(drawn):
    for fig in _figures(drawn):
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)
        assert legend.get_window_extent(renderer).y0 >= top


def test_labels_stay_in_their_panel_and_do_not_overlap(drawn):
    """Values inside their panel, provider names apart, and the panels (titles and ticks
    included) apart and inside the figure, none squeezed by its title."""
    for fig in _figures(drawn):
        renderer = fig.canvas.get_renderer()
        panels = [ax.get_tightbbox(renderer) for ax in fig.axes]
        assert not any(a.overlaps(b) for i, a in enumerate(panels) for b in panels[i + 1:])
        assert all(fig.bbox.contains(p.x0, p.y0) and fig.bbox.contains(p.x1, p.y1) for p in panels)
        for ax in fig.axes:
            assert ax.get_window_extent(renderer).width >= 0.5 * PANEL_IN * fig.dpi
            box = ax.get_window_extent(renderer)
            for t in ax.texts:
                extent = t.get_window_extent(renderer)
                assert box.x0 <= extent.x0 and extent.x1 <= box.x1, t.get_text()
            names = sorted((t.get_window_extent(renderer) for t in ax.get_yticklabels()),
                           key=lambda e: e.y0)
            assert all(a.y1 <= b.y0 for a, b in zip(names, names[1:]))
            assert all(e.x1 <= box.x0 for e in names)


def test_plot_writes_a_png_per_family(tmp_path):
    s2ft = [dict(r, op="InPlaceAdamW") for r in _case(1.0)]
    assert plot(str(tmp_path / "r.png"), META, _case(1.0) + s2ft) == \
        [str(tmp_path / "r-kron.png"), str(tmp_path / "r-s2ft.png")]
    assert plot(str(tmp_path / "one.png"), META, _case(1.0)) == [str(tmp_path / "one.png")]
    assert sorted(os.listdir(tmp_path)) == ["one.png", "r-kron.png", "r-s2ft.png"]


def test_cli_redraws_the_figures_of_a_results_file(tmp_path, capsys):
    rows = [dict(r, rel_error=1e-7, speedup_vs_naive=1.0) for r in _case(1.0)]
    write_json(str(tmp_path / "r.json"), META, rows)
    report.main([str(tmp_path / "r.json"), "--plot"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "r.png")]
    assert (tmp_path / "r.png").stat().st_size > 0
    report.main([str(tmp_path / "r.json")])
    assert capsys.readouterr().out.startswith("| op | mode |")
