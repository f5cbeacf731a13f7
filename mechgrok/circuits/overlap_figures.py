"""Figures of circuit overlap: Jaccard against circuit size, a heatmap of a statistic for every pair
of circuits, and circuits drawn side by side with their shared components highlighted. The
statistics they show come from ``mechgrok.circuits.overlap``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mechgrok.circuits.circuit import Circuit

__all__ = ["overlap_vs_k_figure", "overlap_heatmap", "draw_shared"]


def overlap_vs_k_figure(curves: Mapping[str, Mapping[str, Any]] | Mapping[str, Any], *, title: str = ""):
    """Jaccard against k/n for one ``overlap_vs_k`` result or a mapping label -> result, each with
    its random expectation dashed. Returns a matplotlib Figure (no pyplot)."""
    from mechgrok.report.figures import new_figure

    curves = {"a vs b": curves} if "k" in curves else curves
    fig, (ax,) = new_figure()
    for (label, c), colour in zip(curves.items(), [f"C{i}" for i in range(10)] * (1 + len(curves) // 10)):
        x = np.asarray(c["k"], dtype=float) / max(c["n"], 1)
        ax.plot(x, c["jaccard"], color=colour, lw=1.6, marker=".", label=label)
        ax.plot(x, c["random_jaccard"], color=colour, lw=1.0, ls="--", alpha=0.7, label=f"{label}: random")
    ax.set(xlabel="circuit size k / n", ylabel="Jaccard of top-k", ylim=(0, 1.02), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", framealpha=0.85, edgecolor="none")
    return fig


def overlap_heatmap(matrix: Mapping[str, Any], *, title: str = "", cmap: str = "viridis"):
    """Annotated heatmap of an ``overlap_matrix`` result: each cell its value and, with a baseline,
    the random mean and p-value. Returns a matplotlib Figure (no pyplot)."""
    from mechgrok.report.figures import new_figure

    names, values, m = matrix["names"], np.array(matrix["matrix"], dtype=float), len(matrix["names"])
    fig, (ax,) = new_figure(width=2.4 + 1.1 * m, height=1.6 + 0.9 * m)
    fig.subplots_adjust(left=0.2, right=0.9, bottom=0.18, top=0.88)
    scaled = matrix["stat"] != "intersection"
    lo = -1.0 if matrix["stat"] == "spearman" else 0.0
    im = ax.imshow(values, cmap=cmap, vmin=lo if scaled else None, vmax=1.0 if scaled else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    base, span = (lo, 1.0 - lo) if scaled else (np.nanmin(values), np.nanmax(values) - np.nanmin(values) or 1.0)
    for i in range(m):
        for j in range(m):
            text = f"{values[i, j]:.2f}"
            if matrix.get("p_values") and matrix["p_values"][i][j] is not None:
                text += f"\nrand {matrix['baseline_mean'][i][j]:.2f}\np={matrix['p_values'][i][j]:.2g}"
            dark = (values[i, j] - base) / span < 0.6 if np.isfinite(values[i, j]) else False
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(m), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(m), names, fontsize=8)
    ax.set_title(title or f"{matrix['stat']} (by {matrix['by']}, {matrix['n_draws']} random draws)", fontsize=9)
    return fig


def draw_shared(circuits: Mapping[str, Circuit], *, style: str = "auto", title: str = ""):
    """The circuits side by side with the components they share highlighted. Returns a matplotlib
    Figure (no pyplot).

    ``style="graph"``: one ``Circuit.draw`` panel per circuit, each component that at least one
    *other* circuit also holds outlined in orange (readable up to a few dozen drawn nodes).
    ``style="grid"``: one row per circuit, one column per component of any circuit, the cell
    coloured by sign · √(|score| / that circuit's largest |score|) (blank: not in the circuit); columns are grouped by how many circuits hold them (all first) and the groups are
    labelled, so hundreds of neurons stay legible. ``"auto"``: graph for node and edge circuits
    with at most 40 components in their union, grid otherwise.

    Raises ValueError for fewer than two circuits, circuits on different graphs, or an unknown style.
    """
    names = list(circuits)
    if len(names) < 2:
        raise ValueError(f"draw_shared needs at least two circuits, got {len(names)}")
    if style not in ("auto", "graph", "grid"):
        raise ValueError(f"unknown style {style!r}; choose 'auto', 'graph' or 'grid'")
    first = circuits[names[0]]
    for name in names[1:]:
        if circuits[name].graph_nodes != first.graph_nodes or circuits[name].level != first.level:
            raise ValueError(f"circuits {names[0]!r} and {name!r} come from different graphs or levels; "
                             "overlap is only defined on one graph")
    sets = {n: set(circuits[n].components) for n in names}
    union = set().union(*sets.values())
    if style == "auto":
        style = "graph" if first.level != "neuron" and len(union) <= 40 else "grid"
    fig = (_shared_graphs if style == "graph" else _shared_grid)(circuits, sets, union)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _shared_graphs(circuits: Mapping[str, Circuit], sets: Mapping[str, set], union: set):
    from mechgrok.report.figures import new_figure

    names, first = list(circuits), next(iter(circuits.values()))
    rows = len(set(first.graph_layer.values()))  # input, a row of heads and MLPs per layer, logits
    fig, axes = new_figure(len(names), width=min(6.0 * len(names), 40), height=1.6 + 1.0 * rows)
    fig.subplots_adjust(left=0.04, right=0.92, bottom=0.04, top=0.82, wspace=0.55)
    for ax, name in zip(axes, names):
        shared = sets[name] & set().union(*(sets[m] for m in names if m != name))
        circuits[name].draw(ax, highlight=shared, highlight_label="shared")
        ax.set_title(f"{name}: {len(sets[name])} components, {len(shared)} shared", fontsize=9)
    return fig


def _shared_grid(circuits: Mapping[str, Circuit], sets: Mapping[str, set], union: set):
    from mechgrok.report.figures import new_figure

    names = list(circuits)
    order = {c: i for i, c in enumerate(next(iter(circuits.values())).scores)}  # graph order
    count = {c: sum(c in sets[n] for n in names) for c in union}
    cols = sorted(union, key=lambda c: (-count[c], order[c]))
    grid = np.full((len(names), len(cols)), np.nan)
    for i, n in enumerate(names):
        top = max((abs(circuits[n].scores[c]) for c in sets[n]), default=0.0) or 1.0
        for j, c in enumerate(cols):
            if c in sets[n]:
                v = circuits[n].scores[c] / top
                grid[i, j] = math.copysign(math.sqrt(abs(v)), v)  # √ keeps the weak members visible
    fig, (ax,) = new_figure(width=min(3.0 + 0.06 * len(cols), 14), height=1.7 + 0.45 * len(names))
    fig.subplots_adjust(left=0.12, right=0.9, bottom=0.22, top=0.72)
    im = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="sign · √(|score| / max |score|)")
    ax.set_yticks(range(len(names)), [f"{n} ({len(sets[n])})" for n in names], fontsize=8)
    edges = [0] + [j for j in range(1, len(cols)) if count[cols[j]] != count[cols[j - 1]]] + [len(cols)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        k = count[cols[lo]]
        label = f"in all {k}" if k == len(names) else f"in {k}" if k > 1 else "in one"
        ax.text((lo + hi - 1) / 2, -0.6, f"{label}\n({hi - lo})", ha="center", va="bottom", fontsize=7,
                color="tab:orange" if k > 1 else "0.4", fontweight="bold" if k > 1 else "normal")
        if lo:
            ax.axvline(lo - 0.5, color="0.2", lw=1.0)
    if len(cols) <= 40:
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(cols)} components of any circuit, grouped by how many circuits hold them", fontsize=8)
    ax.tick_params(length=0)
    return fig
