"""Benchmark output: the terminal table, the JSON results file, the PNG plot, and the
README's markdown table (``python -m bench.report RESULTS.json``)."""
import json
import math
import os
import subprocess
import sys

import torch

from .runner import is_kronops


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
    head = ["op", "mode", "shape", "dtype", "provider", "median ms", "min ms", "p20-p80 ms"] + \
        (["host ms"] if has_host else []) + ["GB/s", "TFLOP/s"] + \
        (["% roof"] if has_roofline else []) + ["x naive", "peak MiB", "rel err"]
    lines = []
    for r in rows:
        mem = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2 ** 20
        cells = [r["op"], r["mode"], r["shape"], r["dtype"], r["provider"],
                 _fmt(r["median_ms"], ".3f"), _fmt(r.get("min_ms"), ".3f"),
                 f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"]
        if has_host:  # the host-inclusive median; "*": not a CUDA-graph replay
            cells.append(_fmt(r.get("host_ms"), ".3f") + ("" if r.get("cuda_graph") else "*"))
        cells += [_fmt(r["gbps"], ".1f"), _fmt(r["tflops"], ".2f")]
        if has_roofline:
            cells.append(_fmt(r.get("roofline_pct"), ".0f"))
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


# Plot colours by kind of provider (first matching prefix wins).
COLOURS = [
    ("kronops S²FT adapter", "tab:cyan", "kronops S²FT adapter"),
    ("kronops", "tab:blue", "kronops"),
    ("composite", "tab:orange", "composite (PyTorch path)"),
    ("naive", "tab:gray", "naive reference"),
    ("PEFT LoKr", "tab:green", "PEFT LoKr"),
    ("PEFT LoRA", "tab:olive", "PEFT LoRA"),
    ("full fine-tuning", "tab:brown", "full fine-tuning / frozen base alone"),
    ("nn.Linear", "tab:brown", "full fine-tuning / frozen base alone"),
    ("torch AdamW", "tab:purple", "torch AdamW on a delta"),
]


def _colour(provider: str) -> tuple[str, str]:
    for prefix, colour, label in COLOURS:
        if provider.startswith(prefix):
            return colour, label
    return "tab:pink", "other"


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _cases(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped per case (op, mode, shape), in order of first appearance."""
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"], r["shape"]), []).append(r)
    return list(groups.values())


def plot(path: str, meta: dict, rows: list[dict]) -> None:
    """Write ``figure(meta, rows)`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(meta, rows)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def figure(meta: dict, rows: list[dict]):
    """Every provider of every case, grouped per case and coloured by kind: speedup over the
    case's naive reference (log scale; printed on each bar with the median time, and on a CPU
    the minimum) and, on a GPU, the achieved fraction of the roofline. Bars with a red edge
    are out of tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    from matplotlib.transforms import blended_transform_factory

    groups = _cases(rows)
    # y slots: one header line per case, one line per provider, a gap after each case.
    slots, headers, y = [], [], 0
    for group in groups:
        headers.append((y, group[0]))
        y += 1
        for r in group:
            slots.append((y, r))
            y += 1
        y += 0.5
    panels = [("speedup_vs_naive", "speedup over naive (x, log scale); bar text: speedup, median ms"
               + (" (min)" if any(r.get("device") == "cpu" for r in rows) else ""))]
    if any(r.get("roofline_pct") is not None for r in rows):
        panels.append(("roofline_pct", "% of roofline: max(bytes / copy BW, flops / GEMM rate)"))
    height = 0.2 * y + 1.6
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), height), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, (key, title) in zip(axes[0], panels):
        values = [r.get(key) for _, r in slots]
        shown = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
        if key == "speedup_vs_naive":
            lo, hi = min(shown + [1.0]) / 1.5, max(shown + [1.0])
            ax.set_xlim(lo, hi * (hi / lo) ** 0.35)  # room for the bar text, in log space
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.axvline(1.0, color="grey", lw=0.8)
        else:
            ax.set_xlim(0, max(shown + [1.0]) * 1.45)
        left = ax.get_xlim()[0]  # bars start at the axis (log scale has no 0), end at v
        bars = [(s, v, r) for (s, r), v in zip(slots, values) if v in shown]
        ax.barh([s for s, _, _ in bars], [v - left for _, v, _ in bars], height=0.8, left=left,
                color=[_colour(r["provider"])[0] for _, _, r in bars],
                edgecolor=["red" if not r["error_ok"] else "none" for _, _, r in bars],
                linewidth=1.2)
        for (s, r), v in zip(slots, values):
            if key == "speedup_vs_naive":
                text = ("n/a" if v is None else f"{v:.2f}x") + f"  {_ms(r['median_ms'])} ms"
                if r.get("device") == "cpu" and r.get("min_ms") is not None:
                    text += f" (min {_ms(r['min_ms'])})"  # CPU: the figure least moved by load
            else:
                text = "n/a" if v is None else f"{v:.0f}%"
            if not r["error_ok"]:
                text += "  " + error_cell(r)
            ax.annotate(text, (v if v in shown else ax.get_xlim()[0], s), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=6.5)
        ax.set_title(title, fontsize=8.5)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", color="0.9", lw=0.6)
        ax.set_axisbelow(True)
    ax0 = axes[0][0]
    ax0.set_ylim(y, -1)  # top to bottom
    ax0.set_yticks([s for s, _ in slots], [r["provider"] for _, r in slots], fontsize=7)
    header_at = blended_transform_factory(ax0.transAxes, ax0.transData)
    for s, r in headers:
        ax0.text(0.005, s, f"{r['op']} {r['mode']}   {r['shape']}", transform=header_at,
                 fontsize=7.5, fontweight="bold", va="center", ha="left")
    kinds = {_colour(r["provider"]) for _, r in slots}
    order = ["kronops"] + [label for _, _, label in COLOURS if label != "kronops"] + ["other"]
    legend = {label: Patch(color=colour, label=label)
              for colour, label in sorted(kinds, key=lambda k: order.index(k[1]))}
    if any(not r["error_ok"] for r in rows):
        legend["out"] = Patch(facecolor="white", edgecolor="red", label="out of tolerance")
    fig.legend(handles=list(legend.values()), loc="outside lower center",
               ncol=min(4, len(legend)), fontsize=7, frameon=False)
    fig.suptitle(f"kronops, {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['dtype']}", fontsize=9)
    return fig


def markdown(rows: list[dict]) -> str:
    """The rows as the README's markdown table (median and min ms, speedup, error)."""
    has_roofline = any("roofline_pct" in r for r in rows)
    head = ["op", "mode", "shape", "provider", "median ms", "min ms"] + \
        (["% roofline"] if has_roofline else []) + ["vs naive", "rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], r["mode"], r["shape"], r["provider"], _fmt(r["median_ms"], ".3f"),
                 _fmt(r.get("min_ms"), ".3f")]
        if has_roofline:
            cells.append(_fmt(r.get("roofline_pct"), ".0f"))
        speedup = r["speedup_vs_naive"]
        cells += ["-" if speedup is None else f"{speedup:.2f}x", error_cell(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)["results"]))
