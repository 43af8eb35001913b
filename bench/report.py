"""Benchmark output: the terminal table, the JSON results file and the PNG plot."""
import json
import os
import subprocess

import torch


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """A plain-text table, one line per (case, provider); failing numerics marked FAIL."""
    has_roofline = any("roofline_pct" in r for r in rows)
    head = ["op", "mode", "shape", "dtype", "provider", "median ms", "p20-p80 ms", "GB/s",
            "TFLOP/s"] + (["% roof"] if has_roofline else []) + ["x naive", "peak MiB", "rel err"]
    lines = []
    for r in rows:
        mem = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2 ** 20
        err = "n/a" if r["rel_error"] is None else format(r["rel_error"], ".1e")
        cells = [r["op"], r["mode"], r["shape"], r["dtype"], r["provider"],
                 _fmt(r["median_ms"], ".3f"), f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}",
                 _fmt(r["gbps"], ".1f"), _fmt(r["tflops"], ".2f")]
        if has_roofline:
            cells.append(_fmt(r.get("roofline_pct"), ".0f"))
        cells += [_fmt(r["speedup_vs_naive"], ".2f"), _fmt(mem, ".1f"),
                  err + ("" if r["error_ok"] else " FAIL")]
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


def plot(path: str, meta: dict, rows: list[dict]) -> None:
    """One bar per kronops row: speedup over the naive reference and, on a GPU, the
    achieved fraction of the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["provider"] == "kronops"]
    panels = [("speedup_vs_naive", "speedup vs naive (x), log scale")]
    if any("roofline_pct" in r for r in mine):
        panels.append(("roofline_pct", "% of roofline: max(bytes/copy BW, flops/GEMM rate)"))
    labels = [f"{r['op']} {r['mode']}  {r['shape']}" for r in mine]
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 0.28 * len(mine) + 1.6),
                             squeeze=False, sharey=True)
    for ax, (key, title) in zip(axes[0], panels):
        ax.barh(range(len(mine)), [r.get(key) or 0 for r in mine], color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
        if key == "speedup_vs_naive":
            ax.set_xscale("log")
            ax.axvline(1.0, color="grey", lw=0.8)
    axes[0][0].set_yticks(range(len(mine)), labels, fontsize=7)
    fig.suptitle(f"kronops, {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
