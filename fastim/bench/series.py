"""Helpers of the scripts that run ``fastim bench`` many times and tabulate the runs
(``benchmarks/peers_e2e.py``, ``benchmarks/workers_scaling.py``): one run from its
command line, whether it succeeded, medians and table cells."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from .cli import add_bench_arguments
from .report import failed
from .runner import run


def run_argv(argv: list[str]) -> dict[str, Any]:
    """One ``fastim bench`` run in this process (its workers are child processes); a
    run the bench stops (SystemExit) is returned as ``{"failed": True, "errors": ...}``."""
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except SystemExit as e:  # the bench reports a broken run this way
        return {"errors": [f"bench failed: {e}"], "failed": True}


def succeeded(r: dict[str, Any]) -> bool:
    return not r.get("failed") and not failed(r)


def median(xs: list[Any]) -> float | None:
    """The median of the numbers in ``xs`` (None and NaN dropped); None if none."""
    ys = [float(x) for x in xs if x is not None and x == x]
    return statistics.median(ys) if ys else None


def cell(x: float | None, spec: str = ",.0f", unit: str = "") -> str:
    """A table cell: ``x`` formatted, or an en dash when unknown."""
    return "–" if x is None else f"{x:{spec}}{unit}"
