"""The comparison report's plots, drawn with matplotlib and inlined as SVG (the page stays one
self-contained file): the main metric against trainable parameters, peak memory and training
time with the Pareto front marked, the loss curves, and per-task bars with their intervals.

Each figure is an `<svg class="plot" data-plot="...">` element; colours follow the methods'
order in the report (`COLOURS`), so a method has one colour in every plot.
"""

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]


@dataclass
class Point:
    """One method in a plot: its label, colour index, and values with intervals."""

    label: str
    colour: int
    value: float
    low: float
    high: float
    dashed: bool = False  # impl: peft


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9})
    return plt.subplots(figsize=(width, height))


def _svg(fig, name: str) -> str:
    from matplotlib import pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG sits inside HTML
    return re.sub(r"<svg ", f'<svg class="plot" data-plot="{name}" ', text, count=1)


def colour(index: int) -> str:
    return COLOURS[index % len(COLOURS)]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both: a lower x (cost) and a higher y (metric)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        dominated = any(x2 <= x and y2 >= y and (x2 < x or y2 > y)
                        for j, (x2, y2) in enumerate(points) if j != i and math.isfinite(x2) and math.isfinite(y2))
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def tradeoff_svg(metric: str, points: list[Point], costs: dict[str, list[float]]) -> str:
    """The metric (with its interval) against each cost, one panel per cost, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9})
    fig, axes = plt.subplots(1, len(costs), figsize=(4.2 * len(costs), 3.6), squeeze=False)
    for axis, (cost, xs) in zip(axes[0], costs.items()):
        for point, x in zip(points, xs):
            if not (math.isfinite(x) and math.isfinite(point.value)):
                continue
            axis.errorbar([x], [point.value], yerr=[[point.value - point.low], [point.high - point.value]],
                          fmt="s" if point.dashed else "o", color=colour(point.colour), capsize=3, markersize=6)
            axis.annotate(point.label, (x, point.value), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = pareto_front([(x, p.value) for p, x in zip(points, xs)])
        if len(front) > 1:
            axis.plot([xs[i] for i in front], [points[i].value for i in front], color="#555", linestyle=":",
                      linewidth=1.2, label="Pareto front")
            axis.legend(loc="lower right", fontsize=8)
        if cost.startswith("trainable"):
            axis.set_xscale("log")
        axis.set_xlabel(cost)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    return _svg(fig, "tradeoff")


def loss_svg(curves: list[tuple[str, int, bool, list[tuple[int, float]]]]) -> str:
    """Training loss against step: (label, colour, dashed, [(step, loss)]) per run."""
    fig, axis = _figure(7.5, 3.8)
    for label, index, dashed, points in curves:
        points = [(s, v) for s, v in points if math.isfinite(v)]
        if points:
            axis.plot(*zip(*points), color=colour(index), linestyle="--" if dashed else "-", linewidth=1.4,
                      label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.grid(alpha=0.3)
    if curves:
        axis.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    return _svg(fig, "loss")


def bars_svg(metric: str, points: list[Point]) -> str:
    """One horizontal bar per method with its 95 % interval."""
    fig, axis = _figure(7.5, 0.5 + 0.32 * len(points))
    ys = list(range(len(points)))[::-1]
    values = [p.value if math.isfinite(p.value) else 0.0 for p in points]
    errors = [[max(p.value - p.low, 0) if math.isfinite(p.low) else 0 for p in points],
              [max(p.high - p.value, 0) if math.isfinite(p.high) else 0 for p in points]]
    axis.barh(ys, values, xerr=errors, color=[colour(p.colour) for p in points], capsize=3, height=0.6,
              hatch=None)
    axis.set_yticks(ys, [p.label for p in points])
    axis.set_xlabel(metric + " (95 % interval)")
    axis.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _svg(fig, metric)
