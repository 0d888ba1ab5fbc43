"""The layer x noise-level heatmap of a probe grid (matplotlib, PNG), for reports and model cards."""

from __future__ import annotations


def grid_heatmap(
    cells: list[dict],
    path: str,
    metric: str = "linear_acc",
    title: str | None = None,
    marked: tuple[str, int | float] | None = None,
    layers: list[str] | None = None,
    noise_levels: list[dict] | None = None,
    unit: str = "t",
    percent: bool = True,
) -> bool:
    """Writes a layers x noise levels heatmap of ``metric`` (annotated in %, or as is without ``percent``) as a PNG
    at ``path``.

    ``layers`` fixes the row order (default: first appearance in ``cells``); ``marked`` (layer, level) is
    outlined. With ``noise_levels`` (``{"level", "ve_sigma", ...}`` per level) each column also shows its
    variance-exploding sigma, so DDPM (``unit="t"``) and EDM (``unit="sigma"``) heatmaps share one axis.
    Returns False, writing nothing, when no cell has ``metric``.
    """
    cells = [c for c in cells if c.get(metric) is not None]
    if not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = layers or list(dict.fromkeys(c["layer"] for c in cells))
    steps = sorted({c["timestep"] for c in cells})
    grid = np.full((len(layers), len(steps)), np.nan)
    for c in cells:
        grid[layers.index(c["layer"]), steps.index(c["timestep"])] = (100 if percent else 1) * c[metric]
    fig, ax = plt.subplots(figsize=(1.1 * len(steps) + 3.5, 0.38 * len(layers) + 1.6))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ve = {lv["level"]: lv["ve_sigma"] for lv in noise_levels or []}
    ticks = [f"{t:g}" + (f"\nVE {ve[t]:.3g}" if t in ve and unit != "sigma" else "") for t in steps]
    ax.set_xticks(range(len(steps)), ticks)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.set_xlabel("EDM sigma (= VE sigma)" if unit == "sigma" else
                  "timestep (diffusers index; paper t = index + 1)" + (" / VE sigma" if ve else ""))
    if title:
        ax.set_title(title, fontsize=10)
    middle = np.nanmean(grid)
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            color = "black" if value > middle else "white"
            ax.text(j, i, f"{value:.1f}" if percent else f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color=color)
    if marked is not None:
        row, col = layers.index(marked[0]), steps.index(marked[1])
        ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    fig.colorbar(image, ax=ax, label=f"{metric} (%)" if percent else metric)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return True
