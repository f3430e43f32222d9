"""The loss-decomposition plot (PNG): per configuration, its difference to fp32 exact split into the parts of
decomposition.py, stacked (losses to the left of 0, gains to the right) with the total as a black mark; one panel
per direction, configurations grouped by family (codec, dim and index) as the table lists them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from retrieval.decomposition import PARTS, PART_WORDS  # noqa: E402
from retrieval.io import atomic_path  # noqa: E402

MAX_BARS = 60   # more configurations than this would not be readable; the largest losses are kept
COLOURS = {"dimension": "#4c72b0", "quantization": "#dd8452", "index": "#55a868", "reranking": "#c44e52",
           "merged": "#8c8c8c"}


def _bars(entry: Mapping[str, Any], direction: int) -> list[tuple[str, float]]:
    """(colour key, value) of each segment of one direction (a merged segment is grey)."""
    return [(s["parts"][0] if len(s["parts"]) == 1 else "merged", s["value"])
            for s in entry["directions"][direction]["segments"]]


def loss_plot(group: Mapping[str, Any], path: str, title: str) -> str | None:
    table = list(group.get("decomposition") or [])
    if not table:
        return None
    if len(table) > MAX_BARS:
        table = sorted(table, key=lambda e: e["directions"][0]["total"])[:MAX_BARS]
    table = sorted(table, key=lambda e: e["label"])
    n_dirs = len(table[0]["directions"])
    fig, axes = plt.subplots(1, n_dirs, figsize=(6 * n_dirs, 1.5 + 0.22 * len(table)), sharey=True, squeeze=False)
    y = np.arange(len(table))
    for d, ax in enumerate(axes[0]):
        left_pos, left_neg = np.zeros(len(table)), np.zeros(len(table))
        for i, entry in enumerate(table):
            for key, value in _bars(entry, d):
                start = left_pos[i] if value >= 0 else left_neg[i] + value
                ax.barh(i, abs(value), left=start, color=COLOURS[key], height=0.7)
                if value >= 0:
                    left_pos[i] += value
                else:
                    left_neg[i] += value
        ax.scatter([e["directions"][d]["total"] for e in table], y, marker="D", color="black", s=14, zorder=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{table[0]['directions'][d]['metric'].replace('_', ' ')} minus fp32 exact (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, [e["label"] for e in table], fontsize=7)
    axes[0][0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[p]) for p in PARTS + ("merged",)]
    names = [PART_WORDS[p] for p in PARTS] + ["merged (a reference run missing)"]
    handles.append(plt.Line2D([], [], marker="D", color="black", linestyle=""))
    axes[0][-1].legend(handles, names + ["total"], loc="lower right", fontsize=7, framealpha=0.9)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
