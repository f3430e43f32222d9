"""The analysis plots (PNG, Agg backend): one function per picture, each taking one group's runs.

Every plot has a title, axes with units and a legend; axes switch to log scale when the values span
a factor of 10 or more. Files are written atomically (temp file + rename), so a reader never sees a
half-written PNG and re-running replaces them in place.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display needed; analysis runs on clusters and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from retrieval.decomposition_plot import loss_plot  # noqa: E402
from retrieval.frame import completed, main_runs, recall_columns, speed_column  # noqa: E402
from retrieval.io import atomic_path  # noqa: E402
from retrieval.metrics import DIRECTION_NAMES  # noqa: E402
from retrieval.runs import SEARCH_KNOB, codec_label, family_label, index_label, precision_order  # noqa: E402
from retrieval.tables import pareto_frontier  # noqa: E402


def palette(precisions: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    # tab10 without its grey (grey marks dims and reference points in the legends), then more hues.
    colours = [c for i, c in enumerate(sns.color_palette("tab10")) if i != 7] + list(sns.color_palette("tab20b"))
    return {p: colours[i % len(colours)] for i, p in enumerate(precision_order(precisions))}


def _log_if_wide(ax, values, axis="x", base=10):
    values = np.asarray([v for v in values if v is not None and not pd.isna(v) and v > 0], dtype=float)
    if values.size and values.max() / values.min() >= 10:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=base)
        _plain_ticks(ax, axis)
        return True
    return False


def _plain_ticks(ax, axis="x"):
    """Log axes labelled 8, 16, 0.5 ... instead of 2^3 or 5x10^-1 (read at a glance)."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    if target.get_scale() == "log" and getattr(target.get_major_locator(), "_base", 10) == 10:
        low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
        # 1-2-5 ticks when the axis spans under two decades; more would crowd the labels.
        wide = low > 0 and high / low >= 100
        target.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 and float(v).is_integer()
                                             else f"{v:,g}"))
    target.set_minor_formatter(NullFormatter())


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _error(data, col):
    """yerr [2, n] from the bootstrap columns of `col` (None when the runs have no intervals): the distance
    from the value down to the interval's low end and up to its high end, never negative."""
    low, high = f"{col}_ci_low", f"{col}_ci_high"
    if low not in data or not data[low].notna().any():
        return None
    values = data[col].to_numpy(dtype=float)
    below = np.clip(values - data[low].to_numpy(dtype=float), 0, None)
    above = np.clip(data[high].to_numpy(dtype=float) - values, 0, None)
    return np.nan_to_num(np.vstack([below, above]))


def _directions(recall_cols):
    return [d for d in DIRECTION_NAMES if any(c.startswith(d + "_") for c in recall_cols)]


def _metric_name(col):
    if "_" not in col:
        return col
    direction, metric = col.split("_", 1)
    return f"{DIRECTION_NAMES.get(direction, direction)} {metric}"


def recall_vs_cost(main: pd.DataFrame, recall_k: int, cost: str, path: str, title: str, xlabel: str,
                   lower_is_better: bool = True, frontier: pd.DataFrame | None = None) -> str | None:
    """Scatter of R@K (one panel per direction) against a cost column, with the Pareto line."""
    data = main.dropna(subset=[cost])
    directions = [d for d in _directions(main.columns) if f"{d}_R@{recall_k}" in data]
    if data.empty or not directions:
        return None
    colours = palette(data["precision"].unique())
    dims = sorted(data["dim"].dropna().unique(), reverse=True)
    markers = dict(zip(dims, ["o", "s", "^", "D", "v", "P", "X", "*"] * 4))
    fig, axes = plt.subplots(1, len(directions), figsize=(6.2 * len(directions), 4.8), squeeze=False)
    for ax, direction in zip(axes[0], directions):
        col = f"{direction}_R@{recall_k}"
        # Speed of the same direction as the recall (each direction is timed on its own gallery).
        cost = cost if cost == "bytes_per_vector" else speed_column(data, cost.split("_", 1)[1]
                                                                    if cost.startswith(("t2i_", "i2t_")) else cost,
                                                                    direction)
        points = data.dropna(subset=[col, cost])
        for (precision, dim), part in points.groupby(["precision", "dim"], sort=False):
            # Speeds carry their 95% interval over timing rounds (x), recall its bootstrap interval (y).
            ax.errorbar(part[cost], part[col], yerr=_error(part, col), xerr=_error(part, cost), fmt="none",
                        ecolor=colours[precision], elinewidth=0.9, alpha=0.7)
            ax.scatter(part[cost], part[col], color=colours[precision], marker=markers.get(dim, "o"),
                       s=46, alpha=0.85, edgecolor="black", linewidth=0.4, zorder=3)
        front = pareto_frontier(points, cost, col, lower_cost_is_better=lower_is_better)
        if len(front):
            # 'post': from each frontier point to the next one, its recall is the best on offer.
            ax.step(front[cost], front[col], where="post", color="black",
                    linewidth=1.3, label="Pareto frontier")
        if cost == "bytes_per_vector":
            _total_memory(ax, points, col, colours)
        exact = points[points["exact"]]
        if len(exact):
            ax.axhline(exact[col].max(), color="grey", linestyle="--", linewidth=1, label="fp32 exact")
        spread = points[cost]
        if cost == "bytes_per_vector":  # the hollow total-memory points share the axis
            spread = pd.concat([spread, points["total_bytes_per_vector"]])
        _log_if_wide(ax, spread, "x", base=2 if cost == "bytes_per_vector" else 10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{_metric_name(col)} (%)")
        ax.set_title(_metric_name(col))
        ax.grid(True, which="major", alpha=0.3)
    handles = [plt.Line2D([], [], color=colours[p], marker="o", linestyle="", label=p) for p in colours
               if p in set(data["precision"])]
    handles += [plt.Line2D([], [], color="grey", marker=markers[d], linestyle="", label=f"{int(d)}-d") for d in dims]
    handles += [plt.Line2D([], [], color="black", label="Pareto frontier"),
                plt.Line2D([], [], color="grey", linestyle="--", label="fp32 exact")]
    if cost == "bytes_per_vector" and (data["total_bytes_per_vector"] > data["bytes_per_vector"]).any():
        handles += [plt.Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle=":",
                               label="same run, + re-rank vectors"),
                    plt.Line2D([], [], color="black", linestyle="--", label="frontier, index + re-rank vectors")]
    if _error(data, f"{directions[0]}_R@{recall_k}") is not None:
        handles.append(plt.Line2D([], [], color="grey", marker="|", linestyle="", markersize=12,
                                  label="bootstrap interval"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="precision / dim")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _total_memory(ax, points, col, colours):
    """Re-ranked runs again at their total memory (index + fp32 re-rank vectors): hollow markers joined to
    the index-only point, and the Pareto frontier of that total as a dashed line."""
    moved = points[points["total_bytes_per_vector"] > points["bytes_per_vector"]]
    if len(moved):
        ax.hlines(moved[col], moved["bytes_per_vector"], moved["total_bytes_per_vector"], color="grey",
                  linestyle=":", linewidth=0.6)
        ax.scatter(moved["total_bytes_per_vector"], moved[col], facecolor="none", s=40, linewidth=1.0, zorder=3,
                   edgecolor=[colours[p] for p in moved["precision"]])
        front = pareto_frontier(points, "total_bytes_per_vector", col)
        ax.step(front["total_bytes_per_vector"], front[col], where="post", color="black", linestyle="--",
                linewidth=1.0)


def heatmap_dim_precision(main: pd.DataFrame, recall_k: int, path: str, title: str) -> str | None:
    """R@K heatmap dim × precision: a row of panels per candidate setting, a column per direction.

    The fp32 exact baseline is a single cell, so it is quoted in the title instead of a panel.
    """
    directions = [d for d in _directions(main.columns) if f"{d}_R@{recall_k}" in main]
    data = main[~main["exact"]]
    candidates = _candidate_order(data)
    if data.empty or not directions or not candidates:
        return None
    precisions = precision_order(data["precision"].dropna())
    dims = sorted(data["dim"].dropna().unique(), reverse=True)
    values = main[[f"{d}_R@{recall_k}" for d in directions]].to_numpy(dtype=float)
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    exact = main[main["exact"]]
    if len(exact):
        quoted = ", ".join(f"{DIRECTION_NAMES[d]} {exact[f'{d}_R@{recall_k}'].max():.1f}" for d in directions)
        title += f"\nfp32 exact baseline: {quoted}"
    fig, axes = plt.subplots(len(candidates), len(directions), squeeze=False,
                             figsize=(1.6 + (0.8 * len(precisions) + 1.2) * len(directions),
                                      1.2 + (0.45 * len(dims) + 0.9) * len(candidates)))
    for r, cand in enumerate(candidates):
        for c, direction in enumerate(directions):
            col = f"{direction}_R@{recall_k}"
            ax = axes[r][c]
            part = data[data["candidate"] == cand]
            table = part.pivot_table(index="dim", columns="precision", values=col, aggfunc="max")
            table = table.reindex(index=dims, columns=precisions)
            sns.heatmap(table, ax=ax, annot=True, fmt=".1f", cmap="viridis", vmin=vmin, vmax=vmax,
                        cbar=c == len(directions) - 1, cbar_kws={"label": f"R@{recall_k} (%)"},
                        annot_kws={"fontsize": 9}, mask=table.isna())
            ax.set_title(f"{DIRECTION_NAMES[direction]}, {cand}", fontsize=10)
            ax.set_xlabel("precision" if r == len(candidates) - 1 else "")
            ax.set_ylabel("dim (dimensions)" if c == 0 else "")
            ax.set_yticklabels([str(int(d)) for d in dims], rotation=0)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _candidate_order(frame):
    labels = list(dict.fromkeys(frame["candidate"]))
    sizes = sorted({int(s) for s, rr in zip(frame["candidate_size"], frame["rerank"]) if rr and pd.notna(s)})
    order = [c for c in ("exact", "no rerank") if c in labels] + [f"C={s}" for s in sizes if f"C={s}" in labels]
    return order + [c for c in labels if c not in order]


def candidates_plot(main: pd.DataFrame, recall_k: int, path: str, title: str) -> str | None:
    """Recall and p50 latency vs candidate size C (re-ranked runs), one line per precision, a row per dim.

    Dotted lines: the same precision without re-ranking; dashed grey: fp32 exact. Flat indexes only when
    there are re-ranked flat runs (IVF / HNSW runs at several knob values would zigzag; knob_curves shows them).
    """
    flat = main[main["index"].fillna("flat") == "flat"]
    main = flat if flat["rerank"].any() else main
    # One line per codec: pq / opq / rq at several --pq_subdim values are codes of their own ('pq8x8').
    main = main.assign(precision=[codec_label(row) for _, row in main.iterrows()])
    reranked = main[main["rerank"]].dropna(subset=["candidate_size"])
    if reranked.empty:
        return None
    directions = [d for d in _directions(main.columns) if f"{d}_R@{recall_k}" in main]
    latency = speed_column(main, "latency_p50_ms", directions[0]) if directions else "latency_p50_ms"
    columns = [f"{d}_R@{recall_k}" for d in directions] + [latency]
    dims = sorted(reranked["dim"].dropna().unique(), reverse=True)
    colours = palette(main["precision"].unique())
    fig, axes = plt.subplots(len(dims), len(columns), figsize=(5.0 * len(columns), 3.6 * len(dims)), squeeze=False)
    exact = main[main["exact"]]
    for r, dim in enumerate(dims):
        for c, col in enumerate(columns):
            ax = axes[r][c]
            for precision in precision_order(reranked["precision"]):
                part = reranked[(reranked["dim"] == dim) & (reranked["precision"] == precision)]
                part = part.dropna(subset=[col]).sort_values("candidate_size")
                if part.empty:
                    continue
                ax.errorbar(part["candidate_size"], part[col], yerr=_error(part, col), marker="o",
                            color=colours[precision], label=precision, capsize=2, elinewidth=0.8)
                plain = main[(main["dim"] == dim) & (main["precision"] == precision) & ~main["rerank"]
                             & ~main["exact"]].dropna(subset=[col])
                if len(plain):
                    ax.axhline(plain[col].iloc[0], color=colours[precision], linestyle=":", linewidth=1.2)
            if len(exact) and col in exact and exact[col].notna().any():
                ax.axhline(exact[col].iloc[0], color="grey", linestyle="--", linewidth=1)
            _log_if_wide(ax, reranked["candidate_size"], "x")
            if col == latency:
                _log_if_wide(ax, reranked[col], "y")
                ax.set_ylabel("single-query p50 latency (ms)")
                where = DIRECTION_NAMES.get(col.split("_")[0], "")
                ax.set_title(f"{int(dim)}-d: {where} latency".replace("  ", " "))
            else:
                ax.set_ylabel(f"R@{recall_k} (%)")
                ax.set_title(f"{int(dim)}-d: {_metric_name(col)}")
            ax.set_xlabel("candidates re-ranked, C (items)")
            ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], color=colours[p], marker="o", label=f"{p}, re-ranked")
               for p in precision_order(reranked["precision"])]
    handles += [plt.Line2D([], [], color="black", linestyle=":", label="same precision, no re-ranking"),
                plt.Line2D([], [], color="grey", linestyle="--", label="fp32 exact")]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def retention_bars(main: pd.DataFrame, recall_k: int, path: str, title: str) -> str | None:
    """Retention (% of fp32 exact R@K) per precision and dim; a panel per candidate setting and direction."""
    directions = [d for d in _directions(main.columns) if f"retention_{d}_R@{recall_k}" in main]
    data = main[~main["exact"]]
    candidates = [c for c in _candidate_order(data)]
    if data.empty or not directions or not candidates:
        return None
    if not any(data[f"retention_{d}_R@{recall_k}"].notna().any() for d in directions):
        return None
    precisions = precision_order(data["precision"])
    dims = [int(d) for d in sorted(data["dim"].dropna().unique(), reverse=True)]
    fig, axes = plt.subplots(len(candidates), len(directions), squeeze=False, sharey=True,
                             figsize=(1.5 + (0.25 * len(precisions) * max(2, len(dims)) + 1.0) * len(directions),
                                      1.0 + 2.6 * len(candidates)))
    colours = dict(zip(dims, sns.color_palette("crest", n_colors=len(dims))))
    # Zoom on the range the bars span (bars do not start at 0; the axis says where they start).
    kept = data[[f"retention_{d}_R@{recall_k}" for d in directions]].to_numpy(dtype=float)
    bottom, highest = np.nanmin(kept), np.nanmax(kept)
    for c, direction in enumerate(directions):
        col = f"retention_{direction}_R@{recall_k}"
        for r, cand in enumerate(candidates):
            ax = axes[r][c]
            part = data[data["candidate"] == cand].dropna(subset=[col])
            width = 0.8 / max(1, len(dims))
            for i, dim in enumerate(dims):
                cells = [part[(part["precision"] == p) & (part["dim"] == dim)] for p in precisions]
                best = [cell.loc[cell[col].idxmax()] if len(cell) else None for cell in cells]
                values = [np.nan if row is None else row[col] for row in best]
                errors = _retention_error(best, col[len("retention_"):])
                ax.bar(np.arange(len(precisions)) + (i - (len(dims) - 1) / 2) * width, values, width,
                       color=colours[dim], label=f"{dim}-d", yerr=errors, error_kw={"elinewidth": 0.8, "capsize": 2})
                if errors is not None:
                    highest = np.nanmax([highest, *(np.asarray(values, dtype=float) + errors[1])])
                    bottom = np.nanmin([bottom, *(np.asarray(values, dtype=float) - errors[0])])
            ax.axhline(100, color="grey", linestyle="--", linewidth=1)
            ax.set_xticks(np.arange(len(precisions)), precisions, rotation=30)
            ax.set_title(f"{DIRECTION_NAMES[direction]}, {cand}", fontsize=10)
            ax.set_ylabel(f"R@{recall_k} kept (% of fp32 exact)" if c == 0 else "")
            ax.set_xlabel("precision" if r == len(candidates) - 1 else "")
            ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylim(max(0.0, 10 * math.floor((bottom - 2) / 10)), max(101.0, highest + 1))  # shared by all panels
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[d], label=f"{d}-d") for d in dims]
    handles.append(plt.Line2D([], [], color="grey", linestyle="--", label="fp32 exact = 100%"))
    if highest > np.nanmax(kept):
        handles.append(plt.Line2D([], [], color="black", marker="|", linestyle="", markersize=10,
                                  label="interval of the difference\nto fp32, in % of fp32"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="dim")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _retention_error(rows, metric):
    """yerr of retention bars: the paired interval of the difference to fp32, in % of the fp32 value
    (None when no bar has one)."""
    errors = np.zeros((2, len(rows)))
    for i, row in enumerate(rows):
        if row is None or pd.isna(row.get(f"{metric}_delta_ci_low")) or pd.isna(row.get(f"{metric}_delta")):
            continue
        base = row[metric] - row[f"{metric}_delta"]
        if base:
            errors[:, i] = [100 * (row[f"{metric}_delta"] - row[f"{metric}_delta_ci_low"]) / base,
                            100 * (row[f"{metric}_delta_ci_high"] - row[f"{metric}_delta"]) / base]
    return np.clip(errors, 0, None) if errors.any() else None


def scaling_plot(done: pd.DataFrame, recall_k: int, path: str, title: str, max_lines: int = 10) -> str | None:
    """R@K, batch QPS and p50 latency vs gallery size for configs measured at several sizes."""
    data = done.dropna(subset=["gallery_size"])
    labels = [label for label, part in data.groupby("label", sort=True) if part["gallery_size"].nunique() > 1]
    if not labels:
        return None
    # Keep the legend readable: the exact baseline first, then the configs with the most sizes.
    counts = data[data["label"].isin(labels)].groupby("label")["gallery_size"].nunique()
    labels = sorted(labels, key=lambda lab: (not lab.startswith("fp32") or "exact" not in lab, -counts[lab], lab))
    labels = labels[:max_lines]
    direction = next((d for d in _directions(data.columns) if f"{d}_R@{recall_k}" in data), None)
    columns = ([f"{direction}_R@{recall_k}"] if direction else []) + ["qps", "latency_p50_ms"]
    fig, axes = plt.subplots(1, len(columns), figsize=(5.0 * len(columns), 4.2), squeeze=False)
    colours = sns.color_palette("tab10", n_colors=max(10, len(labels)))
    for ax, col in zip(axes[0], columns):
        for i, label in enumerate(labels):
            part = data[data["label"] == label].dropna(subset=[col]).sort_values("gallery_size")
            ax.plot(part["gallery_size"], part[col], marker="o", color=colours[i], label=label)
        ax.set_xscale("log")
        _plain_ticks(ax, "x")
        ax.set_xlabel("gallery size (items)")
        if col == "qps":
            ax.set_ylabel("batch throughput (queries/s)")
            _log_if_wide(ax, data[col], "y")
        elif col == "latency_p50_ms":
            ax.set_ylabel("single-query p50 latency (ms)")
            _log_if_wide(ax, data[col], "y")
        else:
            ax.set_ylabel(f"{_metric_name(col)} (%)")
        ax.set_title({"qps": "batch throughput", "latency_p50_ms": "single-query latency"}.get(col, _metric_name(col)))
        ax.grid(True, alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), title="configuration")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def knob_lines(main: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{line name: runs} for IVF / HNSW runs, one line per index, precision, dim, candidate setting and build
    knob through the search knob's values (nprobe / ef_search); only lines with >= 2 values."""
    graphs = main[main["index"].isin(list(SEARCH_KNOB))]
    lines = {}
    for _, row in graphs.iterrows():
        name = f"{family_label(row)} {row['candidate']}{index_label(row, search_knob=False)}"
        lines.setdefault(name, []).append(row)
    out = {}
    for name, rows in lines.items():
        part = pd.DataFrame(rows)
        knob = SEARCH_KNOB[part["index"].iloc[0]]
        if part[knob].nunique() >= 2:
            out[name] = part.sort_values(knob)
    return out


def knob_curves(main: pd.DataFrame, recall_k: int, cost: str, path: str, title: str, xlabel: str) -> str | None:
    """R@K against batch QPS or p50 latency along the search knob: a row of panels per index type (IVF
    along nprobe, HNSW along ef_search), a column per direction, one line per precision / dim / build knob
    through the knob's values (written at the points). Only the lists without re-ranking: what the index
    itself trades (re-ranking is the candidates plot's subject). Flat indexes are the reference points."""
    plain = main[~main["rerank"] & ~main["exact"]]
    lines = knob_lines(plain) or knob_lines(main)
    directions = [d for d in _directions(main.columns) if f"{d}_R@{recall_k}" in main]
    if not lines or not directions:
        return None
    index_types = [i for i in SEARCH_KNOB if any(part["index"].iloc[0] == i for part in lines.values())]
    colours = palette(main["precision"].unique())
    dims = sorted(main["dim"].dropna().unique(), reverse=True)
    markers = dict(zip(dims, ["o", "s", "^", "D", "v", "P", "X", "*"] * 4))
    fig, axes = plt.subplots(len(index_types), len(directions), squeeze=False,
                             figsize=(6.4 * len(directions), 4.4 * len(index_types)))
    flat = plain[plain["index"].fillna("flat") == "flat"]
    for row, index_type in enumerate(index_types):
        chosen = [part for part in lines.values() if part["index"].iloc[0] == index_type]
        for ax, direction in zip(axes[row], directions):
            _knob_panel(ax, chosen, flat, main, f"{direction}_R@{recall_k}", speed_column(main, cost, direction),
                        colours, markers)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{_metric_name(f'{direction}_R@{recall_k}')} (%)")
            ax.set_title(f"{_metric_name(f'{direction}_R@{recall_k}')}: {index_type} along "
                         f"{SEARCH_KNOB[index_type]}, no re-ranking")
    handles = [plt.Line2D([], [], color=colours[p], marker="o", label=p) for p in colours]
    handles += [plt.Line2D([], [], color="grey", marker=markers[d], linestyle="", label=f"{int(d)}-d") for d in dims]
    handles.append(plt.Line2D([], [], color="grey", marker="X", linestyle="", label="flat index (reference)"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="precision / dim")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _knob_panel(ax, lines, flat, main, col, x, colours, markers):
    """One panel of knob_curves: the lines, their knob values, the flat reference points."""
    for part in lines:
        part = part.dropna(subset=[col, x])
        if part.empty:
            continue
        index, precision, dim = part["index"].iloc[0], part["precision"].iloc[0], part["dim"].iloc[0]
        ax.errorbar(part[x], part[col], yerr=_error(part, col), color=colours[precision],
                    marker=markers.get(dim, "o"), markersize=5, capsize=2, elinewidth=0.6)
        for _, row in part.iterrows():
            ax.annotate(f"{int(row[SEARCH_KNOB[index]])}", (row[x], row[col]), fontsize=6.5,
                        textcoords="offset points", xytext=(3, 3))
    for precision, part in flat.dropna(subset=[col, x]).groupby("precision", sort=False):
        ax.errorbar(part[x], part[col], yerr=_error(part, col), fmt="X", color=colours[precision],
                    markersize=7, markeredgecolor="black", markeredgewidth=0.4, elinewidth=0.6)
    _log_if_wide(ax, main[x], "x")
    ax.grid(True, which="major", alpha=0.3)


def group_plots(group: Mapping[str, Any], frame: pd.DataFrame, plots_dir: str,
                recall_k: int | None = None) -> list[tuple[str, str]]:
    """All plots of one group into plots_dir/<group>/; returns [(title, path), ...] of those written."""
    done, main = completed(frame), main_runs(frame, group["main_gallery_size"])
    if main.empty:
        return []
    ks = sorted({int(c.split("@")[1]) for c in recall_columns(main) if main[c].notna().any()})
    if not ks:
        return []
    k = recall_k if recall_k in ks else ks[0]
    where = os.path.join(plots_dir, group["group"])
    source = f"{group['dataset']} {group['split']}, {group['model']}"
    gallery = f", gallery {group['main_gallery_size']:,}" if group["main_gallery_size"] else ""
    jobs = [
        ("Recall vs memory", lambda p: recall_vs_cost(
            main, k, "bytes_per_vector", p, f"R@{k} vs memory per vector ({source}{gallery})",
            "memory per vector (bytes): index (filled), index + re-rank vectors (hollow)"), "recall_vs_memory.png"),
        ("Recall vs batch throughput", lambda p: recall_vs_cost(
            main, k, "qps", p, f"R@{k} vs batch throughput ({source}{gallery})",
            "batch throughput (queries/s)", lower_is_better=False), "recall_vs_qps.png"),
        ("Recall vs single-query latency", lambda p: recall_vs_cost(
            main, k, "latency_p50_ms", p, f"R@{k} vs single-query p50 latency ({source}{gallery})",
            "single-query p50 latency (ms)"), "recall_vs_latency.png"),
        ("R@K heatmap dim x precision", lambda p: heatmap_dim_precision(
            main, k, p, f"R@{k} (%) by dim and precision, per candidate setting ({source}{gallery})"),
         "heatmap_dim_precision.png"),
        ("Recall and latency vs candidate size", lambda p: candidates_plot(
            main, k, p, f"Re-ranking: R@{k} and latency vs candidate size ({source}{gallery})"),
         "candidates.png"),
        ("Retention vs fp32", lambda p: retention_bars(
            main, k, p, f"R@{k} kept vs fp32 exact ({source}{gallery})"), "retention.png"),
        ("Where the loss comes from", lambda p: loss_plot(
            group, p, f"Difference to fp32 exact, by part ({source}{gallery})"), "loss_decomposition.png"),
        ("Gallery-size scaling", lambda p: scaling_plot(
            done, k, p, f"Scaling with gallery size ({source})"), "scaling.png"),
        ("Recall vs batch throughput along the index knobs", lambda p: knob_curves(
            main, k, "qps", p, f"R@{k} vs batch throughput, IVF nprobe / HNSW ef_search ({source}{gallery})",
            "batch throughput (queries/s)"), "knobs_recall_vs_qps.png"),
        ("Recall vs single-query latency along the index knobs", lambda p: knob_curves(
            main, k, "latency_p50_ms", p, f"R@{k} vs single-query p50 latency, IVF nprobe / HNSW ef_search "
            f"({source}{gallery})", "single-query p50 latency (ms)"), "knobs_recall_vs_latency.png"),
    ]
    written = []
    for title, make, name in jobs:
        path = make(os.path.join(where, name))
        if path:
            written.append((title, path))
        elif os.path.exists(os.path.join(where, name)):
            os.remove(os.path.join(where, name))  # left from an earlier sweep; it would no longer be true
    return written
