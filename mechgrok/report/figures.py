"""Matplotlib helpers for the report: figures without pyplot or any global state.

Figures are made with ``matplotlib.figure.Figure()`` directly and rasterised through an explicit
Agg canvas, so building a report never touches the process-wide backend (``matplotlib.use`` is
not called) and is safe in notebooks, threads and headless machines alike.

>>> import numpy as np
>>> fig = line_figure(np.arange(1, 11), {"train": np.linspace(0, 1, 10)}, ylabel="accuracy")
>>> fig_to_png(fig)[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

__all__ = ["fig_to_png", "new_figure", "line_figure", "mark_phases", "PHASE_STYLE"]

DPI = 110
#: Line style of the phase markers; colours follow the order in which phases are given.
PHASE_STYLE = {"linestyle": "--", "linewidth": 1.0, "alpha": 0.8}
_PHASE_COLOURS = ("0.35", "tab:purple", "tab:brown", "tab:olive")


def fig_to_png(fig: MplFigure, *, dpi: int = DPI) -> bytes:
    """PNG bytes of ``fig``, rendered with the Agg canvas (deterministic: no metadata stamp)."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)  # attaches itself to fig; the global backend is left alone
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def new_figure(ncols: int = 1, *, width: float = 6.4, height: float = 3.6) -> tuple[MplFigure, list]:
    """A figure with ``ncols`` axes side by side, without pyplot.

    Margins are fixed rather than computed by a layout engine: constrained layout more than
    doubled the rendering time of these small figures.
    """
    fig = MplFigure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.14, top=0.91, wspace=0.3)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def mark_phases(ax, phases: Mapping[str, float | None]) -> None:
    """Draw one vertical dashed line per phase (``{"memorized": x, ...}``); ``None`` is skipped."""
    for (label, x), colour in zip(phases.items(), _PHASE_COLOURS):
        if x is not None:
            ax.axvline(x, color=colour, label=label, **PHASE_STYLE)


def line_figure(
    x: Sequence[float] | np.ndarray,
    series: Mapping[str, Sequence[float] | np.ndarray],
    *,
    xlabel: str = "step + 1",
    ylabel: str = "",
    title: str = "",
    logx: bool = True,
    logy: bool = False,
    ylim: tuple[float, float] | None = None,
    phases: Mapping[str, float | None] | None = None,
    styles: Mapping[str, Mapping] | None = None,
) -> MplFigure:
    """One panel of curves sharing ``x``; NaN values leave gaps; all-NaN series are skipped.

    Args:
        x: positions on the x axis, shape ``[n]`` (positive when ``logx``).
        series: label -> values of shape ``[n]``.
        phases: label -> x position of a vertical dashed phase marker.
        styles: label -> extra keyword arguments for ``Axes.plot`` (colour, line style).
    """
    fig, (ax,) = new_figure()
    x = np.asarray(x, dtype=float)
    for label, y in series.items():
        y = np.asarray(y, dtype=float)
        if logy:
            y = np.where(y > 0, y, np.nan)  # a log axis cannot show 0 or negative values
        if not np.isfinite(y).any():
            continue
        ax.plot(x, y, label=label, linewidth=1.6, **dict((styles or {}).get(label, {})))
    if phases:
        mark_phases(ax, phases)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", framealpha=0.85, edgecolor="none")
    return fig
