"""matplotlib for files only (the Agg backend: no display needed), and the one way every plot is finished."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, ax, path: Path, legend_size: int | None = 8, grid_axis: str | None = "both") -> str:
    """Grid (``grid_axis`` None: none), legend (``legend_size`` None: none), tight layout, PNG at 120 dpi;
    closes the figure and returns the file name."""
    if grid_axis:
        ax.grid(alpha=0.3, axis=grid_axis)
    if legend_size is not None:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path.name
