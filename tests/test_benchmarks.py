"""BENCHMARKS.md's charts: each finds its figures in the page's tables (bench/charts.py parses them,
so a table whose columns change breaks this, not the next benchmark run), and the page shows every
chart bench/charts/ holds, each one drawn."""

from __future__ import annotations

import re

from bench import charts
from tests.fixtures import REPO


def test_every_chart_finds_its_figures_in_the_tables():
    found = charts.figures()
    assert sorted(found) == ["concurrency", "forwarding", "memory", "scale-out", "throughput"]
    for name, chart in found.items():
        values = [bar[1] for bar in chart["bars"]] if "bars" in chart else [v for line in chart["lines"].values() for v in line]
        assert values and all(value > 0 for value in values), name
    throughput = found["throughput"]["bars"]
    assert len(throughput) == 9 and sum(kernel for *_, kernel in throughput) == 4, "the kernel's four rows, told apart"
    assert all(low <= value <= high for _, value, (low, high), _ in throughput), "each median within its range"
    assert found["concurrency"]["x"] == [1, 8, 32, 64]


def test_the_page_shows_every_chart_and_each_is_drawn():
    shown = set(re.findall(r"!\[[^\]]+\]\((bench/charts/[\w-]+\.png)\)", (REPO / "BENCHMARKS.md").read_text()))
    assert shown == {f"bench/charts/{name}.png" for name in charts.figures()}
    for path in shown:
        assert (REPO / path).read_bytes().startswith(b"\x89PNG"), path


def test_the_ab_script_loads_and_says_how_to_run_it():
    """bench/ab.py (the no-op kernel against an earlier commit) imports what it uses and takes its arguments."""
    import subprocess
    import sys

    said = subprocess.run([sys.executable, str(REPO / "bench" / "ab.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert said.returncode == 0 and "commit" in said.stdout, said.stderr
    assert "--runs" in said.stdout and "--concurrency" in said.stdout and "--forward" in said.stdout


def test_the_forwarding_limits_script_finds_the_line_it_alters():
    """bench/forwarding_limits.py measures copies of main.py with its produce() line replaced: that line must
    still be there, once, or the script would measure nothing (it says so, and so does this test)."""
    import subprocess
    import sys

    from bench import forwarding_limits

    assert (REPO / "main.py").read_text().count(forwarding_limits.PRODUCE) == 1, "update PRODUCE in the script"
    said = subprocess.run([sys.executable, str(REPO / "bench" / "forwarding_limits.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert said.returncode == 0 and "--runs" in said.stdout, said.stderr
