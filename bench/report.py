"""Benchmark output: the terminal table, the JSON results file, the figures (a PNG per family
of ops, see ``plot``) and the README's markdown table.

``python -m bench.report RESULTS.json`` prints the markdown table of a results file;
``python -m bench.report RESULTS.json --plot`` draws its figures again, beside it, without
running the benchmark."""
import argparse
import json
import os
import subprocess
import textwrap
import zlib
from collections import namedtuple
from fnmatch import fnmatchcase
from itertools import groupby

import torch

from .runner import is_kronops
from .suite import FAMILIES


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def error_cell(row: dict) -> str:
    """The ``rel err`` cell: the error, "n/a" (not checked: a floor or another function) or
    "overflow" (Inf/NaN in the result); out of tolerance, "FAIL" for a kronops provider
    (the run exits 1) and "(baseline)" for any other (marked only)."""
    if row.get("overflow"):
        text = "overflow"
    elif row["rel_error"] is None:
        return "n/a"
    else:
        text = format(row["rel_error"], ".1e")
    if row["error_ok"]:
        return text
    return text + (" FAIL" if row.get("kronops", is_kronops(row["provider"])) else " (baseline)")


def table(rows: list[dict]) -> str:
    """A plain-text table, one line per (case, provider); failing numerics marked FAIL. GPU
    rows add the host-inclusive median beside the CUDA-graph times ("*": the provider could
    not be captured, its times are host-inclusive)."""
    has_roofline = any("roofline_pct" in r for r in rows)
    has_host = any(r.get("host_ms") is not None for r in rows)
    has_tokens = any(r.get("tokens_per_s") is not None for r in rows)
    head = ["op", "mode", "shape", "dtype", "provider", "median ms", "min ms", "p20-p80 ms"] + \
        (["host ms"] if has_host else []) + (["tokens/s"] if has_tokens else []) + \
        ["GB/s", "TFLOP/s"] + \
        (["% roof", "% GEMM"] if has_roofline else []) + ["x naive", "peak MiB", "rel err"]
    lines = []
    for r in rows:
        mem = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2 ** 20
        cells = [r["op"], r["mode"], r["shape"], r["dtype"], r["provider"],
                 _fmt(r["median_ms"], ".3f"), _fmt(r.get("min_ms"), ".3f"),
                 f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"]
        if has_host:  # the host-inclusive median; "*": not a CUDA-graph replay
            cells.append(_fmt(r.get("host_ms"), ".3f") + ("" if r.get("cuda_graph") else "*"))
        if has_tokens:
            cells.append(_fmt(r.get("tokens_per_s"), ".0f"))
        cells += [_fmt(r["gbps"], ".1f"), _fmt(r["tflops"], ".2f")]
        if has_roofline:
            cells += [_fmt(r.get("roofline_pct"), ".0f"), _fmt(r.get("gemm_pct"), ".0f")]
        cells += [_fmt(r["speedup_vs_naive"], ".2f"), _fmt(mem, ".1f"), error_cell(r)]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt_line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt_line(head), fmt_line(["-" * w for w in widths])] + [fmt_line(c) for c in lines])


def environment(device: torch.device) -> dict:
    """Device name, versions and git commit the results were measured with."""
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, git_commit=commit)


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    """Write atomically: a crash mid-write leaves any earlier file intact."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta, results=rows), f, indent=1)
    os.replace(tmp, path)


# How each provider is drawn, the same in every panel and figure: the first pattern (fnmatch)
# that matches its name. kronops' own in blues, purples and teals, the baselines in warm
# colours and greens, the naive references grey. A style with a line style is a reference
# drawn as a line across its panel (a floor or a limit), not a bar.
Style = namedtuple("Style", "colour label line", defaults=(None,))
STYLES = {
    "kronops": Style("#1f77b4", "kronops"),
    "kronops (native)": Style("#08306b", "kronops, native kernels"),
    "kronops (native, KRONOPS_CPU_ISA=*)": Style("#4292c6", "kronops, native kernels, lower level"),
    "kronops (PyTorch kernels)": Style("#17becf", "kronops, PyTorch kernels"),
    "kronops (fused)": Style("#aec7e8", "kronops, fused path"),
    "kronops (three-kernel backward)": Style("#9edae5", "kronops, three-kernel backward"),
    "kronops (persistent forward)": Style("#393b79", "kronops, persistent forward"),
    "kronops (merged weight)": Style("#6b6ecf", "kronops, merged weight"),
    "kronops (separate adapter)": Style("#c5b0d5", "kronops, separate adapter"),
    "kronops (Δ products)": Style("#dadaeb", "kronops, Δ products (S²FT op)"),
    "kronops S²FT in-place": Style("#9467bd", "kronops S²FT in-place"),
    "kronops S²FT adapter": Style("#cf9fe8", "kronops S²FT adapter"),
    "kronops AdapterBank (one mixed batch)": Style("#2a9d8f", "kronops AdapterBank"),
    "kronops bank.merge, S²FT (switch)": Style("#005f56", "kronops bank.merge, S²FT"),
    "kronops bank.merge, KronA (switch)": Style("#8fd5c6", "kronops bank.merge, KronA"),
    "kronops collect": Style("#0b6e99", "kronops K-FAC collect"),
    "composite": Style("#ff7f0e", "composite (PyTorch path)"),
    "composite (plain PyTorch)": Style("#fdae6b", "composite (plain PyTorch)"),
    "curvlinops KFACLinearOperator": Style("#66c2a4", "curvlinops KFAC"),
    "nngeometry PMatKFAC": Style("#1b7837", "nngeometry PMatKFAC"),
    "torch autograd, same expression": Style("#ffbb78", "torch autograd, same expression"),
    "plain PyTorch (A @ X @ Bᵀ)": Style("#e6550d", "plain PyTorch, A @ X @ Bᵀ"),
    "FastKron (pyfastkron)": Style("#e377c2", "FastKron"),
    "PEFT LoKr": Style("#2ca02c", "PEFT LoKr"),
    "PEFT * LoKr adapter_names= (one batch)": Style("#98df8a", "PEFT LoKr, adapter_names= batch"),
    "PEFT * LoKr, one sub-batch per adapter (set_adapter)":
        Style("#00441b", "PEFT LoKr, a sub-batch per adapter"),
    "PEFT LoRA r=*": Style("#bcbd22", "PEFT LoRA"),
    "LyCORIS LoKr (bypass)": Style("#d95f02", "LyCORIS LoKr, bypass mode"),
    "full fine-tuning": Style("#8c564b", "full fine-tuning"),
    "torch AdamW on a delta": Style("#d62728", "torch AdamW on a delta"),
    "naive*": Style("#7f7f7f", "naive reference"),
    "nn.Linear (base only)": Style("black", "base alone, no adapter (floor)", "--"),
    "kronops KronA": Style("#3182bd", "kronops KronA (vLLM)"),
    "kronops LoKr (PEFT folders)": Style("#6baed6", "kronops LoKr, PEFT folders (vLLM)"),
    "kronops S²FT": Style("#756bb1", "kronops S²FT (vLLM)"),
    "vLLM LoRA r=*": Style("#dbdb8d", "vLLM LoRA (PEFT)"),
    "base rows, LoRA enabled (no adapter)": Style("#555555", "base rows, LoRA enabled", ":"),
    "base model alone (no adapters, floor)": Style("black", "base alone, no adapter (floor)", "--"),
    "copy of every base weight": Style("#555555", "copy of every base weight", "-."),
}
ROOFLINE = Style("#8b0000", "roofline: bytes / copy BW or flops / GEMM rate", ":")
# Providers not named above: a colour from these, by a hash of the name.
FALLBACK = ("#bf812d", "#f781bf", "#e6ab02", "#66a61e", "#a6761d", "#e7298a")
# One figure per family of ops (suite.FAMILIES, the names --ops takes), and its title.
FIGURES = {"kron": "Kronecker-product adapters",
           "s2ft": "S²FT: structured-sparse fine-tuning",
           "serving": "Serving: many adapters in one batch, adapter switch",
           "cpu_backends": "CPU backends: native kernels, PyTorch kernels, autograd, FastKron",
           "vllm": "Serving in vLLM: a batch with n adapters, prefill and decode"}
COLUMNS = 3       # panels per row of a figure's grid
PANEL_IN = 5.4    # a panel's width in inches, provider names included
SLOT_IN = 0.3     # inches per bar or line of a panel (less where a figure would pass MAX_IN)
MAX_IN = 14.5     # a figure's height in inches at most (1600 px at DPI)
FONT = 7.5        # points: provider names and labels; titles and legend larger, ticks smaller
DPI = 110


def style(provider: str) -> Style:
    """How ``provider`` is drawn (STYLES); a provider not named there gets a FALLBACK colour."""
    for pattern, found in STYLES.items():
        if fnmatchcase(provider, pattern):
            return found
    return Style(FALLBACK[zlib.crc32(provider.encode()) % len(FALLBACK)], provider)


def families(rows: list[dict]) -> dict[str, tuple[str, list[dict]]]:
    """The rows per figure, {family: (title, rows)} in order of first appearance; the ops of
    no family in FIGURES go to "other"."""
    family_of = {op: family for family in FIGURES for op in FAMILIES[family]}
    found = {}
    for r in rows:
        family = family_of.get(r["op"], "other")
        found.setdefault(family, (FIGURES.get(family, "Other ops"), []))[1].append(r)
    return found


def _short(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _fastest(row: dict) -> float:
    """The bar's time: the minimum, or the median where the results hold no minimum."""
    return row["median_ms"] if row.get("min_ms") is None else row["min_ms"]


def _cases(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped per case (op, mode, shape), in order of first appearance."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["shape"]), []).append(r)
    return list(groups.values())


def _grid(cases: list[list[dict]], columns: int) -> list[list[list[dict]]]:
    """The cases in rows of at most ``columns`` panels; the modes of one op and shape share a
    row where they fit in one."""
    grid = [[]]
    for _, same in groupby(cases, key=lambda case: (case[0]["op"], case[0]["shape"])):
        same = list(same)
        if grid[-1] and len(grid[-1]) + len(same) > columns:
            grid.append([])
        for case in same:
            if len(grid[-1]) == columns:
                grid.append([])
            grid[-1].append(case)
    return grid


def _marks(case: list[dict]) -> tuple[list[dict], list[tuple[str, float, Style]]]:
    """A case's bars (its rows) and reference lines (name, ms, style): the providers styled
    as lines, and on a GPU the roofline (the case's least possible time)."""
    bars = [r for r in case if style(r["provider"]).line is None]
    lines = [(r["provider"], _fastest(r), style(r["provider"])) for r in case
             if style(r["provider"]).line is not None]
    roofline = [r["median_ms"] * r["roofline_pct"] / 100 for r in case
                if r.get("roofline_pct") is not None]
    if roofline:
        lines.append(("roofline", roofline[0], ROOFLINE))
    return bars, lines


def _title(case: list[dict]) -> str:
    r = case[0]
    return "\n".join([f"{r['op']} · {r['mode']}", *textwrap.wrap(r["shape"], 46)])


def _panel(ax, case: list[dict], slots: int) -> None:
    """One case: a bar per provider from 0 to its fastest call, the median as a tick, the
    20th-80th percentile as a whisker, labelled with the time and the speedup over naive;
    the reference lines below the bars."""
    bars, lines = _marks(case)
    naive = next((_fastest(r) for r in case if r["provider"].startswith("naive")), None)
    ax.barh(range(len(bars)), [_fastest(r) for r in bars], height=0.7,
            color=[style(r["provider"]).colour for r in bars],
            edgecolor=["none" if r["error_ok"] else "red" for r in bars], linewidth=1.2)
    for y, r in enumerate(bars):
        ax.hlines(y, r["p20_ms"], r["p80_ms"], color="black", lw=0.8)
        if r.get("min_ms") is not None:
            ax.plot(r["median_ms"], y, marker="|", markersize=9, mew=1.6, color="black")
        text = f"{_short(_fastest(r))} ms"
        if naive is not None and not r["provider"].startswith("naive"):
            text += f"   {_short(naive / _fastest(r))}x"
        if not r["error_ok"]:
            text += "   " + error_cell(r)
        ax.annotate(text, (max(_fastest(r), r["p80_ms"]), y), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=FONT)
    for y, (_, ms, line) in enumerate(lines, start=len(bars)):
        ax.axvline(ms, color=line.colour, ls=line.line, lw=1.2)
        ax.annotate(f"{_short(ms)} ms", (ms, y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=FONT, fontstyle="italic")
    names = [r["provider"] for r in bars] + [name for name, _, _ in lines]
    ax.set_yticks(range(len(names)), [textwrap.fill(n, 32) for n in names], fontsize=FONT)
    for label in ax.get_yticklabels()[len(bars):]:
        label.set_fontstyle("italic")
    ax.set_ylim(slots - 0.5, -0.5)  # top to bottom; bars as thick in every panel of a row
    ax.set_xlim(0, max([r["p80_ms"] for r in bars] + [ms for _, ms, _ in lines]) * 1.02)
    ax.set_title(_title(case), fontsize=FONT + 1, loc="left")
    ax.tick_params(axis="x", labelsize=FONT - 0.5)
    ax.locator_params(axis="x", nbins=6)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def _make_room(fig) -> None:
    """Widen each panel's x range so that the labels right of its bars and lines end inside it."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        right = ax.get_xlim()[1]
        for t in ax.texts:  # x=0 at the left edge: a label at x ends at x/right*width + its width
            width = t.get_window_extent(renderer).x1 - ax.transData.transform((t.xy[0], 0))[0]
            right = max(right, t.xy[0] * box.width / max(box.width - width, 1.0))
        ax.set_xlim(0, right * 1.03)


def _legend(fig, rows: list[dict], columns: int, title: str) -> None:
    """On top, under ``title``: the providers' styles in STYLES order (the lines last), and
    what the marks mean."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    known = [*STYLES.values(), ROOFLINE]
    shown = {style(r["provider"]) for r in rows}
    if any(r.get("roofline_pct") is not None for r in rows):
        shown.add(ROOFLINE)
    shown = sorted(shown, key=lambda s: (s.line is not None,
                                         known.index(s) if s in known else len(known), s.label))
    handles = [Line2D([], [], color=s.colour, ls=s.line, lw=1.2, label=s.label) if s.line else
               Patch(color=s.colour, label=s.label) for s in shown]
    if any(r.get("min_ms") is not None for r in rows):
        handles.append(Line2D([], [], color="black", marker="|", markersize=9, mew=1.6, ls="none",
                              label="median"))
    handles.append(Line2D([], [], color="black", lw=0.8, label="20th-80th percentile"))
    if any(not r["error_ok"] for r in rows):
        handles.append(Patch(facecolor="white", edgecolor="red", label="out of tolerance"))
    fig.legend(handles=handles, loc="outside upper center", ncols=columns * 2, fontsize=FONT + 1,
               frameon=False, title=title, title_fontsize=FONT + 2.5)


def figure(meta: dict, rows: list[dict], title: str = "kronops benchmark"):
    """A grid of panels, one per case (op, mode, shape; a case's modes side by side), each
    on its own linear scale: per provider, a bar to its fastest call (the median where the
    results hold no minimum), the median as a tick, the 20th-80th percentile as a whisker,
    labelled with the time and the speedup over the case's naive reference. Floors and
    limits (STYLES with a line style; the roofline on a GPU) are lines, not bars. Bars with
    a red edge are out of tolerance. The legend is on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = _grid(_cases(rows), COLUMNS)
    columns = max(map(len, grid))
    slots = [max(sum(map(len, _marks(case))) for case in row) for row in grid]
    title_lines = [max(_title(case).count("\n") + 1 for case in row) for row in grid]
    # Inches per row of panels: its bars and lines, 1.5 slots for the x axis, its title; and
    # 1 inch for the legend; all rows shrunk alike where that would pass MAX_IN.
    heights = [SLOT_IN * (n + 1.5) + 0.13 * lines for n, lines in zip(slots, title_lines)]
    shrink = min(1.0, (MAX_IN - 1.0) / sum(heights))
    heights = [h * shrink for h in heights]
    fig = Figure(figsize=(PANEL_IN * columns, sum(heights) + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(grid), columns, squeeze=False, gridspec_kw=dict(height_ratios=heights))
    for row, row_axes, n in zip(grid, axes, slots):
        for i, ax in enumerate(row_axes):
            if i < len(row):
                _panel(ax, row[i], n)
            else:
                ax.remove()
    bar = ("fastest call (min)" if all(r.get("min_ms") is not None for r in rows)
           else "median (no minimum recorded)")
    heading = [title, f"{meta['device']} · torch {meta['torch']} · triton {meta['triton']} · "
               f"{meta['dtype']}", "ms per call, each panel on its own scale, shorter is faster; "
               f"bar: {bar}, labelled with its ms and the speedup over naive"]
    _legend(fig, rows, columns,  # about 13 characters of the heading an inch
            "\n".join(textwrap.fill(line, int(13 * PANEL_IN * columns)) for line in heading))
    _make_room(fig)
    return fig


def plot(path: str, meta: dict, rows: list[dict]) -> list[str]:
    """Write a PNG per family of ops (``families``) and return their paths: ``path`` itself
    when the rows hold one family, else ``path`` with the family's name before the extension
    (cpu.png: cpu-kron.png, cpu-s2ft.png, cpu-serving.png, cpu-cpu_backends.png)."""
    groups = families(rows)
    stem, ext = os.path.splitext(path)
    paths = []
    for family, (title, family_rows) in groups.items():
        paths.append(path if len(groups) == 1 else f"{stem}-{family}{ext}")
        figure(meta, family_rows, title).savefig(paths[-1], dpi=DPI)
    return paths


def markdown(rows: list[dict]) -> str:
    """The rows as the README's markdown table (median and min ms, speedup, error)."""
    has_roofline = any("roofline_pct" in r for r in rows)
    head = ["op", "mode", "shape", "provider", "median ms", "min ms"] + \
        (["% roofline", "% GEMM"] if has_roofline else []) + ["vs naive", "rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["mode"], r["shape"], r["provider"], _fmt(r["median_ms"], ".3f"),
                 _fmt(r.get("min_ms"), ".3f")]
        if has_roofline:
            cells += [_fmt(r.get("roofline_pct"), ".0f"), _fmt(r.get("gemm_pct"), ".0f")]
        speedup = r["speedup_vs_naive"]
        cells += ["-" if speedup is None else f"{speedup:.2f}x", error_cell(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    p.add_argument("results", help="a results JSON written by python -m bench")
    p.add_argument("--plot", action="store_true",
                   help="instead, draw its figures again (a PNG per family of ops, beside "
                        "RESULTS) and print their paths")
    args = p.parse_args(argv)
    with open(args.results) as f:
        meta = json.load(f)
    if args.plot:
        print("\n".join(plot(os.path.splitext(args.results)[0] + ".png", meta, meta["results"])))
    else:
        print(markdown(meta["results"]))


if __name__ == "__main__":
    main()
