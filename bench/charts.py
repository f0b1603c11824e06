"""Charts of BENCHMARKS.md, drawn from its tables: `uv run --group bench bench/charts.py`.

Each benchmark script that writes its table (`--write`) redraws them (bench/benchmark.py's
write_section), so the pictures always show the figures the text gives. They go to bench/charts/*.png,
which BENCHMARKS.md shows. Parsing needs nothing but this file (tests/test_benchmarks.py checks every
chart finds its figures); drawing needs matplotlib, in the bench dependency group.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
CHARTS = ROOT / "bench" / "charts"
KERNEL_COLOUR, OTHER_COLOUR, IDEAL_COLOUR = "#1f77b4", "#b0b0b0", "#ff7f0e"


def tables(section: str, text: str | None = None) -> list[list[dict[str, str]]]:
    """The tables between <!-- section --> and <!-- /section --> of BENCHMARKS.md: rows of column → cell."""
    text = BENCHMARKS.read_text() if text is None else text
    body = text.split(f"<!-- {section} -->", 1)[1].split(f"<!-- /{section} -->", 1)[0]
    found, lines = [], body.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ---") or line.startswith("| ---:"):
            header = [cell.strip() for cell in lines[i - 1].strip("|").split("|")]
            rows = []
            for row in lines[i + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")), strict=True)))
            found.append(rows)
    return found


def number(cell: str) -> float:
    return float(cell.replace(",", "").split()[0])


def label(cell: str, width: int = 48) -> str:
    plain = re.sub(r"[*`]", "", cell)
    return "\n".join(textwrap.wrap(plain, width)[:3])


def figures(text: str | None = None) -> dict[str, dict]:
    """What each chart shows, from the tables: name → title, axis, and the bars or lines."""
    noop, forwarding, slow = tables("table", text)
    [memory] = tables("memory", text)
    [scale_out] = tables("scale-out", text)
    return {
        "throughput": {
            "title": "No-op handler: messages/s (median, and the range of the runs)",
            "bars": [(label(r["consumer"]), number(r["messages/s"]), [number(x) for x in r["range"].split("–")],
                      r["consumer"].startswith("**kernel**")) for r in noop]},
        "forwarding": {
            "title": "Forwarding each message (committed once its output is confirmed): messages/s",
            "bars": [(label(r["consumer"]), number(r["messages/s"]), [number(x) for x in r["range"].split("–")],
                      r["consumer"].startswith("**kernel**")) for r in forwarding]},
        "concurrency": {
            "title": "Handler sleeping 20 ms: messages/s against KERNEL_CONCURRENCY",
            "x": [number(r["KERNEL_CONCURRENCY"]) for r in slow], "xlabel": "KERNEL_CONCURRENCY",
            "lines": {"kernel": [number(r["messages/s"]) for r in slow],
                      "ideal (concurrency / 0.020 s)": [number(r["ideal (concurrency / 0.020 s)"]) for r in slow]}},
        "memory": {
            "title": "Peak RSS of the kernel (VmHWM, MB) by message size, partitions, handler and concurrency",
            "bars": [(label(r["run"]), number(r["peak RSS of the kernel process, VmHWM (MB)"]), None,
                      "before" not in r["run"]) for r in memory]},
        "scale-out": {
            "title": "Replicas sharing 6 partitions (20 ms handler, concurrency 8): messages/s",
            "x": [number(r["replicas"]) for r in scale_out], "xlabel": "replicas",
            "lines": {"kernel": [number(r["messages/s"]) for r in scale_out],
                      "ideal (replicas × 400)": [number(r["replicas"]) * 400 for r in scale_out]}},
    }


def draw(directory: Path = CHARTS, text: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, chart in figures(text).items():
        if "bars" in chart:
            bars = chart["bars"]
            figure, axes = plt.subplots(figsize=(10, 0.9 + 0.55 * len(bars)))
            positions = range(len(bars))[::-1]
            colours = [KERNEL_COLOUR if b[3] else OTHER_COLOUR for b in bars]
            axes.barh(list(positions), [b[1] for b in bars], color=colours)
            for y, (_, value, low_high, _) in zip(positions, bars, strict=True):
                if low_high:
                    axes.plot(low_high, [y, y], color="black", linewidth=1)
                axes.text(max(low_high or [value]), y, f" {value:,.0f}", va="center", fontsize=8)
            axes.set_yticks(list(positions), [b[0] for b in bars], fontsize=7)
            axes.set_xlim(0, max(max(b[2] or [b[1]]) for b in bars) * 1.15)
        else:
            figure, axes = plt.subplots(figsize=(7, 4))
            for (line, values), colour in zip(chart["lines"].items(), (KERNEL_COLOUR, IDEAL_COLOUR), strict=True):
                axes.plot(chart["x"], values, marker="o", color=colour, label=line,
                          linestyle="-" if line == "kernel" else "--")
            axes.set_xlabel(chart["xlabel"])
            axes.set_xticks(chart["x"])
            axes.legend()
            axes.grid(alpha=0.3)
        axes.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        if "lines" in chart:
            axes.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        axes.set_title(chart["title"], fontsize=9)
        figure.tight_layout()
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: the same figures, the same file
        plt.close(figure)
        written.append(path)
    return written


def redraw() -> None:
    """Draw the charts again if matplotlib is here (the bench group), else say how."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("Charts not redrawn (matplotlib is in the bench group): uv run --group bench bench/charts.py")
        return
    for path in draw():
        print(f"Wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    if "--help" in sys.argv:
        sys.exit(print(__doc__))
    redraw()
