"""Probe artefacts: ``results.json``, ``results.md``, ``heatmap.png``, ``knn_heatmap.png``, ``heads.safetensors``
(and with ``--alignment``, ``alignment_heatmap.png`` and ``uniformity_heatmap.png``).

``heads.safetensors`` holds every cell's chosen head: ``"{layer}@{t}.weight"`` (C, D),
``"{layer}@{t}.bias"`` (C,) and, with standardisation, ``"{layer}@{t}.mean"``/``".var"`` (D,):
the head input is ``(x - mean) / sqrt(var + 1e-5)``, a ``BatchNorm1d(D, affine=False)`` in
eval mode. Every file is written atomically.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Mapping

from ..errors import UsageError
from ..noise import NoiseAxis, axis_class
from .geometry import GEOMETRY_ROWS
from .heads import LinearHead
from .heatmap import grid_heatmap
from .knn import KNN_K, KNN_TEMPERATURE
from .result import HEADS_FILE, ProbeResult, cell_key, file_digest, parse_cell_key
from .stats import format_interval
from .sweep import edge_of


def head_tensors(heads: Mapping[tuple[str, int], LinearHead]) -> dict:
    """The ``heads.safetensors`` dict of every cell's head."""
    tensors = {}
    for (layer, t), head in heads.items():
        key = cell_key(layer, t)
        tensors[f"{key}.weight"] = head.weight.contiguous()
        tensors[f"{key}.bias"] = head.bias.contiguous()
        if head.mean is not None:
            tensors[f"{key}.mean"] = head.mean.contiguous()
            tensors[f"{key}.var"] = head.var.contiguous()
    return tensors


def load_heads(folder: str | os.PathLike) -> dict[tuple[str, int], LinearHead]:
    """Reads ``heads.safetensors`` back into ``{(layer, t): LinearHead}`` (the one reader of that file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(os.fspath(folder), HEADS_FILE)
    try:
        tensors = load_file(path)
    except SafetensorError as error:
        raise UsageError(
            f"{path} is truncated or corrupt ({' '.join(str(error).split())}): run ddae-probe into its folder again."
        ) from None
    heads = {}
    for name in tensors:
        if name.endswith(".weight"):
            prefix = name[: -len(".weight")]
            heads[parse_cell_key(prefix)] = LinearHead(
                tensors[name], tensors[f"{prefix}.bias"], tensors.get(f"{prefix}.mean"), tensors.get(f"{prefix}.var")
            )
    return heads


PARTS = {"down_blocks": "encoder", "mid_block": "mid block", "up_blocks": "decoder"}


def part_of(layer: str) -> str:
    """The part of the denoiser a layer belongs to: encoder, mid block, decoder (UNet) or its first name."""
    root = layer.split(".", 1)[0]
    return PARTS.get(root, root)


def best_per_part(cells: list[dict]) -> dict[str, dict]:
    """The best cell (on validation) of each part, in order of first appearance."""
    best: dict[str, dict] = {}
    for cell in cells:
        part = part_of(cell["layer"])
        rank = (cell["val_acc"], cell["linear_acc"])
        if part not in best or rank > (best[part]["val_acc"], best[part]["linear_acc"]):
            best[part] = cell
    return best


def model_title(results: dict) -> str:
    name = os.path.basename(str(results["model"]).rstrip("/"))
    return f"{name} (random init, seed {results['seed']})" if results.get("random_init") else name


def percent(entry: dict, probe: str) -> str:
    """``entry[probe_acc]`` in % with its 95% interval when recorded: ``"54.32 [53.34, 55.30]"``."""
    return format_interval(entry[f"{probe}_acc"], entry.get(f"{probe}_ci95"), unit="")


def _row(name: str, t, c: dict) -> str:
    return (
        f"| {name} | {t} | {c['feature_dim']} | {percent(c, 'linear')} | {percent(c, 'knn')} | "
        f"{100 * c['val_acc']:.2f} | {c['lr']:g} |"
    )


def level_axis(results: dict) -> type[NoiseAxis]:
    """The noise axis of a probe's cells (``results.json`` without an objective is a DDPM run's)."""
    return axis_class(results.get("objective", "ddpm"))


def level_unit(results: dict) -> str:
    """The name of the noise level in a probe's cells: ``t`` (DDPM timestep index) or ``sigma`` (EDM, flow)."""
    return level_axis(results).unit


def noise_axis_table(results: dict) -> list[str]:
    """Each noise level of the grid with its variance-exploding sigma and log-SNR (lines of markdown)."""
    levels = results.get("noise_levels") or []
    if not levels:
        return []
    unit = level_unit(results)
    lines = [
        "## Noise levels on one axis",
        "",
        f"Each {unit} with its variance-exploding equivalent (the noise std over the signal scale; for DDPM "
        "sqrt((1 - a) / a) with a = alphas_cumprod[t]) and log-SNR = -2 ln sigma_VE, so DDPM and EDM grids line up.",
        "",
        f"| {unit} | VE sigma | log-SNR |",
        "|---|---|---|",
    ]
    lines += [f"| {lv['level']} | {lv['ve_sigma']:.4g} | {lv['log_snr']:.2f} |" for lv in levels]
    return lines + [""]


def views_lines(results: dict) -> list[str]:
    """What each pass over the data was: clean or augmented, and its noise (lines of markdown)."""
    views = results.get("views") or []
    if not views:
        return []
    lines = ["## Views", "", "| split | view | images | noise |", "|---|---|---|---|"]
    lines += [f"| {v['split']} | {v['index']} | {v['images']} | {v['noise']} |" for v in views]
    return lines + [""]


def markdown_table(results: dict) -> str:
    """``results.md``: the run's settings, the noise axis, the best cell per part, the baselines and every cell."""
    cells = sorted(results["cells"], key=lambda c: (-c["val_acc"], -c["linear_acc"]))
    best = results["best"]
    unit = level_unit(results)
    header = [f"| layer | {unit} | dim | linear acc (%) [95% CI] | kNN acc (%) [95% CI] | val acc (%) | lr |",
              "|---|---|---|---|---|---|---|"]
    lines = [
        f"# Probe grid: {model_title(results)} on {results['dataset']}",
        "",
        f"Protocol `{results['protocol']}` (recipe `{results['recipe']}`, normalization "
        f"`{results['normalization']}`), {results['num_train']} train / {results['num_val']} validation / "
        f"{results['num_eval']} {results['eval_split']} examples, resolution {results['resolution']}, "
        f"seed {results['seed']}. Best cell (chosen on validation): "
        f"**{best['layer']} @ {level_axis(results).label(best['timestep'])}**, "
        f"linear {percent(best, 'linear')}%, kNN {percent(best, 'knn')}% (k={KNN_K}); intervals are 95% Wilson "
        "intervals over the test images.",
        "",
        *views_lines(results),
        *noise_axis_table(results),
    ]
    parts = best_per_part(results["cells"])
    if len(parts) > 1 or results.get("baselines"):
        lines += ["## Best cell per part, and baselines", "", *header]
        lines += [_row(f"{part}: {c['layer']}", c["timestep"], c) for part, c in parts.items()]
        lines += [_row(f"baseline: {name}", "-", c) for name, c in results.get("baselines", {}).items()]
        lines += ["", "## All cells", ""]
    lines += header + [_row(c["layer"], c["timestep"], c) for c in cells]
    extra = (sweep_lines(results) + knn_lines(results) + logistic_lines(results) + few_shot_lines(results)
             + comparison_lines(results) + geometry_lines(results) + fused_lines(results)
             + search_lines(results))  # fmt: skip
    return "\n".join(lines + extra) + "\n"


def sweep_lines(results: dict) -> list[str]:
    """Which cells needed the learning-rate sweep extended past its grid, and which still chose an edge."""
    cells = [c for c in results["cells"] if c.get("lrs")]
    if not cells or len(results.get("lrs") or []) < 2:
        return []
    grid = set(results["lrs"])
    extended = [c for c in cells if set(c["lrs"]) - grid]
    at_edge = [c for c in cells if edge_of(c["lr"], c["lrs"], c["val_accs"])]
    lines = ["", "## Learning-rate sweep", "",
             f"Grid: {', '.join(f'{lr:g}' for lr in results['lrs'])}. A cell whose best rate on validation was at "
             "an edge (and beat its neighbour) got the next rates out, up to 3 times."]  # fmt: skip
    if extended:
        lines.append(f"Extended for {len(extended)} of {len(cells)} cells: "
                     + "; ".join(f"{c['layer']} @ {c['timestep']} (lr {c['lr']:g})" for c in extended) + ".")
    lines.append("No cell's chosen rate is at the edge of what it tried." if not at_edge else
                 f"Still at an edge after the extensions: {len(at_edge)} cells ("
                 + "; ".join(f"{c['layer']} @ {c['timestep']} (lr {c['lr']:g})" for c in at_edge) + ").")
    return lines


def knn_lines(results: dict) -> list[str]:
    """The best cell's kNN accuracy at every k recorded."""
    accs = results["best"].get("knn_accs")
    if not accs:
        return []
    return ["", "## kNN at several k (best cell)", "",
            f"Temperature {KNN_TEMPERATURE:g}; k={KNN_K} is the headline. " + ", ".join(
                f"k={k}: {100 * acc:.2f}%" for k, acc in accs.items()) + "."]  # fmt: skip


def logistic_lines(results: dict) -> list[str]:
    """The cells with a logistic regression beside their linear head."""
    cells = [c for c in results["cells"] if c.get("logistic_acc") is not None]
    if not cells:
        return []
    unit = level_unit(results)
    lines = ["", "## Logistic regression (L-BFGS, the best cells on validation)", "",
             f"| layer | {unit} | linear acc (%) [95% CI] | logistic acc (%) [95% CI] | C | logistic val acc (%) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['layer']} | {c['timestep']} | {percent(c, 'linear')} | {percent(c, 'logistic')} | "
              f"{c['logistic_C']:g} | {100 * c['logistic_val_acc']:.2f} |" for c in cells]  # fmt: skip
    return lines


def few_shot_lines(results: dict) -> list[str]:
    """The few-shot probes of the best cell: per shot count, mean and std over draws and the t-interval."""
    few = results.get("few_shot") or {}
    if not few.get("results"):
        return []
    lines = ["", f"## Few-shot ({few['probe']} regression on {few['cell']}, clean view)", "",
             "| images per class | draws | mean acc (%) | std | 95% CI of the mean | each draw (%) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for entry in few["results"]:
        low, high = entry["ci95"]
        draws = ", ".join(f"{100 * acc:.2f}" for acc in entry["accs"])
        lines.append(f"| {entry['shots']} | {len(entry['accs'])} | {100 * entry['mean']:.2f} | "
                     f"{100 * entry['std']:.2f} | [{100 * low:.2f}, {100 * high:.2f}] | {draws} |")  # fmt: skip
    return lines


def geometry_lines(results: dict) -> list[str]:
    """``--alignment``: every cell's alignment and uniformity, with their formulas."""
    cells = [c for c in results["cells"] if c.get("alignment") is not None]
    if not cells:
        return []
    unit = level_unit(results)
    lines = ["", "## Alignment and uniformity", "",
             f"On {GEOMETRY_ROWS:,} training images (or all, if fewer), L2-normalised features: alignment = "
             "mean ||f(x) - f(x')||^2 over two noise draws x, x' of the same image (lower: the noise moves the "
             "feature less); uniformity = log mean exp(-2 ||f(x_i) - f(x_j)||^2) over pairs of images (lower: more "
             "spread out). Heatmaps: `alignment_heatmap.png`, `uniformity_heatmap.png`.", "",
             f"| layer | {unit} | alignment | uniformity | linear acc (%) |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['layer']} | {c['timestep']} | {c['alignment']:.3f} | {c['uniformity']:.3f} | "
              f"{100 * c['linear_acc']:.2f} |" for c in cells]  # fmt: skip
    return lines


def comparison_lines(results: dict) -> list[str]:
    """The paired tests computed between this run's entries on the same test images."""
    comparisons = results.get("comparisons") or []
    if not comparisons:
        return []
    lines = ["", "## Paired tests (same test images)", "",
             "Difference a - b with its paired-bootstrap 95% interval; p: exact McNemar test on the images only one "
             "of the two gets right.", "",
             "| comparison | a (%) | b (%) | a - b (points) [95% CI] | only a / only b | McNemar p |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [comparison_row(c) for c in comparisons]
    return lines


def comparison_row(c: dict) -> str:
    """One row of a paired-tests table (see :func:`comparison_lines`)."""
    low, high = c["diff_ci95"]
    return (f"| {c['what']} | {100 * c['a_acc']:.2f} | {100 * c['b_acc']:.2f} | {100 * c['diff']:+.2f} "
            f"[{100 * low:+.2f}, {100 * high:+.2f}] | {c['a_only']} / {c['b_only']} | {p_text(c['p_value'])} |")


def p_text(p_value: float) -> str:
    """A p-value for a table: two significant digits; one below the smallest float64 shows as ``< 1e-300``."""
    return f"{p_value:.2g}" if p_value > 0 else "< 1e-300"


def search_lines(results: dict) -> list[str]:
    """The rungs of ``--search halving``: per rung, each noise level's best cell on validation and what was kept."""
    search = results.get("search") or {}
    if search.get("method") != "halving":
        return []
    unit = level_unit(results)
    lines = [
        "", "## Search: successive halving", "",
        f"Each rung scored every cell on a random share of the train split and kept the best 1/{search['eta']} of "
        f"the {unit} levels (by their best cell on validation); the grid above finished "
        f"{', '.join(map(str, search['finished']))} on the full splits. Forwards (image x {unit}, on an empty "
        f"cache): {search['forwards']:,} against {search['exhaustive_forwards']:,} for the exhaustive grid "
        f"({search['exhaustive_forwards'] / search['forwards']:.1f}x fewer).", "",
        f"| rung | fit rows | val rows | {unit}: best layer, val acc (%) | kept |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for index, rung in enumerate(search["rungs"]):
        scores = "; ".join(f"{lv['level']}: {lv['best_layer']} {100 * lv['val_acc']:.2f}" for lv in rung["levels"])
        lines.append(f"| {index} | {rung['fit_rows']} | {rung['val_rows']} | {scores} | "
                     f"{', '.join(map(str, rung['kept']))} |")  # fmt: skip
    return lines


def fused_lines(results: dict) -> list[str]:
    """The fused probes' table, best on validation first, with the test gain over the best single cell."""
    fused = results.get("fused") or []
    if not fused:
        return []
    best = results["best"]
    lines = [
        "", "## Fused probes", "",
        f"One {results.get('config', {}).get('fused_head', 'linear')} head on the concatenated features of several "
        f"cells, chosen on validation like a cell. Gain: test "
        f"accuracy minus the best single cell's ({100 * best['linear_acc']:.2f}%).", "",
        "| fusion | cells | dim | linear acc (%) [95% CI] | gain (points) | kNN acc (%) [95% CI] | val acc (%) | lr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in fused:
        gain = 100 * (f["linear_acc"] - best["linear_acc"])
        lines.append(
            f"| {f['name']} | {', '.join(f['cells'])} | {f['feature_dim']} | {percent(f, 'linear')} | "
            f"{gain:+.2f} | {percent(f, 'knn')} | {100 * f['val_acc']:.2f} | {f['lr']:g} |"
        )
    return lines


def heatmap(results: dict, metric: str, path: str, title: str, marked: tuple[str, int] | None,
            percent: bool = True) -> bool:  # fmt: skip
    """Layers (execution order) x noise levels, annotated in % (or as is), with ``marked`` outlined; PNG at ``path``
    (nothing, and False, when no cell has ``metric``)."""
    return grid_heatmap(results["cells"], path, metric, title=title, marked=marked, layers=results["layers"],
                        noise_levels=results.get("noise_levels"), unit=level_unit(results), percent=percent)


def write_report(output_dir: str, result: ProbeResult, heads: Mapping[tuple[str, int], LinearHead]) -> None:
    """Writes all artefacts of a finished run into ``output_dir``, as one run.

    Every file is written into a staging folder first; then each is renamed into place, ``results.json``
    last. ``results.json`` records the SHA-256 of the others (``files``), so a folder left half-old,
    half-new by a kill is refused on load (:meth:`ProbeResult.load`) instead of mixing two runs.
    """
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(output_dir, ".report.*")):  # staging left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    results = result.to_dict()
    best = results["best"]
    name = model_title(results)
    top_knn = max(results["cells"], key=lambda c: c["knn_acc"])
    with tempfile.TemporaryDirectory(prefix=".report.", dir=output_dir) as staging:
        save_file(head_tensors(heads), os.path.join(staging, HEADS_FILE),
                  metadata={"best": cell_key(best["layer"], best["timestep"])})
        with open(os.path.join(staging, "results.md"), "w") as f:
            f.write(markdown_table(results))
        heatmap(results, "linear_acc", os.path.join(staging, "heatmap.png"),
                f"linear probe accuracy, {name} (box: best on validation)", (best["layer"], best["timestep"]))
        heatmap(results, "knn_acc", os.path.join(staging, "knn_heatmap.png"),
                f"kNN accuracy (k={KNN_K}, T={KNN_TEMPERATURE:g}), {name} (box: highest)",
                (top_knn["layer"], top_knn["timestep"]))
        for metric, better in (("alignment", "lower: the noise moves the feature less"),
                               ("uniformity", "lower: features spread over the sphere")):  # fmt: skip
            heatmap(results, metric, os.path.join(staging, f"{metric}_heatmap.png"),
                    f"{metric} ({better}), {name}", None, percent=False)
        result.files = {file: file_digest(os.path.join(staging, file)) for file in sorted(os.listdir(staging))}
        for file in result.files:
            os.replace(os.path.join(staging, file), os.path.join(output_dir, file))
        result.save(output_dir)
