"""Plots, where a picture says more: the divergence score along a swept knob."""
from __future__ import annotations

import math

from .errors import LosscmpError
from .sweep import SweepResult


class PlotError(LosscmpError, ValueError):
    """Plotting is unavailable."""


def plot_sweep(result: SweepResult, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib (pip install matplotlib)") from None
    points = result.evaluated or result.points
    xs = [p.value for p in points]
    # inf scores (NaN on one side, exceptions) are drawn at the top of the axis.
    finite = [p.verdict.score for p in points if math.isfinite(p.verdict.score) and p.verdict.score > 0]
    ceiling = max(finite + [10.0]) * 10
    ys = [p.verdict.score if math.isfinite(p.verdict.score) else ceiling for p in points]
    ys = [max(y, 1e-12) for y in ys]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o", color="black", linewidth=1)
    for x, y, p in zip(xs, ys, points):
        ax.plot([x], [y], marker="o", color="tab:red" if p.verdict.kind else "tab:green")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="tolerance (score = 1)")
    for b in result.boundaries:
        ax.axvline(b.value, color="tab:red", linestyle=":", linewidth=1.5, label=f"boundary {result.knob.shown} = {b.value:.4g}")
    if result.knob.log:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(result.knob.shown)
    ax.set_ylabel("divergence score (|a-b| / allowed)")
    ax.set_title(str(result.pair))
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:  # /dev/full, a disk that filled during the sweep
        raise PlotError(f"--plot {path}: cannot write: {e.strerror or type(e).__name__}") from None
    finally:
        plt.close(fig)
