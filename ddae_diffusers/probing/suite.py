"""``ddae-probe --datasets A B C``: one model, several data sets, one configuration, one transfer table.

Each data set gets its own probe folder (``<output_dir>/<name>``: the grid with the pixel baseline), then the
same architecture at random init is probed at that data set's best cell (``<name>/random-init``). The transfer
table (``transfer.json``, ``transfer.md``) gives, per data set, the best cell's linear, kNN and logistic-regression
accuracy, the best fused probe, the pixels and the random init, each with its 95% interval, and the paired tests
of the best cell against the pixels and against the random init on the same test images.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from ..distributed import broadcast_from_main
from ..errors import UsageError
from ..io_utils import atomic_path
from .comparisons import compare_runs
from .engine import ProbeConfig, run_probe
from .report import comparison_row, percent
from .result import ProbeResult

TRANSFER_JSON, TRANSFER_MD = "transfer.json", "transfer.md"


def folder_name(dataset: str) -> str:
    """The probe folder of a data set: the last part of a local path, ``owner__name`` of a Hub id."""
    path = os.path.normpath(dataset)
    return os.path.basename(path) if os.path.isdir(dataset) else dataset.replace("/", "__")


def run_suite(config: ProbeConfig, datasets: list[str], accelerator=None) -> dict | None:
    """Probes ``config.model`` on each of ``datasets`` with ``config`` (its dataset and output folder replaced),
    with the pixel baseline and a random-init probe of the best cell; writes and returns the transfer table
    (None off the main process)."""
    names = [folder_name(dataset) for dataset in datasets]
    if len(set(names)) != len(names):
        raise UsageError(f"--datasets {datasets} give the same folder name twice ({names}): pass each once.")
    rows, is_main = [], accelerator is None or accelerator.is_main_process
    for dataset, name in zip(datasets, names, strict=True):
        folder = os.path.join(config.output_dir, name)
        cache = config.cache_dir or os.path.join(folder, "feature_cache")
        grid = replace(config, dataset=dataset, output_dir=folder, cache_dir=cache, pixel_baseline=True,
                       random_init=False)  # fmt: skip
        result = run_probe(grid, accelerator)
        best = broadcast_from_main(None if result is None else (result.best.layer, result.best.timestep), accelerator)
        baseline = replace(grid, output_dir=os.path.join(folder, "random-init"), random_init=True, layers=[best[0]],
                           timesteps=[best[1]], sigma_index=None, pixel_baseline=False, fused_probes=False,
                           logistic_cells=0, few_shot=None, search="exhaustive")  # fmt: skip
        random = run_probe(baseline, accelerator)
        if is_main:
            rows.append(transfer_row(name, result, random))
    if not is_main:
        return None
    table = {"model": config.model, "datasets": dict(zip(names, datasets, strict=True)), "rows": rows}
    with atomic_path(os.path.join(config.output_dir, TRANSFER_JSON)) as tmp, open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    with atomic_path(os.path.join(config.output_dir, TRANSFER_MD)) as tmp, open(tmp, "w") as f:
        f.write(transfer_markdown(table))
    return table


def transfer_row(name: str, result: ProbeResult, random: ProbeResult) -> dict:
    """One data set's line of the transfer table."""
    best = result.best
    fused = result.fused[0] if result.fused else None
    comparisons = {c["a"] + " vs " + c["b"]: c for c in result.comparisons}
    return {
        "dataset": name,
        "classes": result.num_labels,
        "train": result.num_train + result.num_val,
        "test": result.num_eval,
        "best_cell": best.key,
        "best": {name: getattr(best, name) for name in ("linear_acc", "linear_ci95", "knn_acc", "knn_ci95",
                                                          "logistic_acc", "logistic_ci95")},  # fmt: skip
        "fused": None if fused is None else {"name": fused["name"], "linear_acc": fused["linear_acc"],
                                             "linear_ci95": fused.get("linear_ci95")},  # fmt: skip
        "pixels": {name: result.baselines["pixels"].get(name) for name in ("linear_acc", "linear_ci95", "knn_acc",
                                                                          "knn_ci95")},  # fmt: skip
        "random_init": {name: getattr(random.best, name) for name in ("linear_acc", "linear_ci95", "knn_acc",
                                                                       "knn_ci95")},  # fmt: skip
        "vs_pixels": comparisons.get("best.linear vs pixels.linear"),
        "vs_random_init": _random_init_test(result, random),
    }


def _random_init_test(result: ProbeResult, random: ProbeResult) -> dict:
    """The best cell against the same cell at random init: both runs stored the test images they got right."""
    test = compare_runs(result, random, "best.linear")
    return {**test, "what": f"{result.best.key}: trained vs random init, linear"}


def transfer_markdown(table: dict) -> str:
    """``transfer.md``: one row per data set, then the paired tests."""
    lines = [
        f"# Transfer: {os.path.basename(str(table['model']).rstrip('/'))}",
        "",
        "Accuracies in % with 95% Wilson intervals on each data set's test split; the best cell is chosen on "
        "validation; pixels and random init use the same views, rows and heads (random init: the same architecture, "
        "freshly initialised, at the best cell).",
        "",
        "| data set | classes | train / test | best cell | linear | kNN (k=20) | logistic | best fused probe | "
        "pixels, linear | random init, linear |",
        "|---|---:|---|---|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        best, fused = row["best"], row["fused"]
        logistic = percent(best, "logistic") if best.get("logistic_acc") is not None else "-"
        fused_text = f"{percent(fused, 'linear')} ({fused['name']})" if fused else "-"
        lines.append(
            f"| {row['dataset']} | {row['classes']} | {row['train']:,} / {row['test']:,} | `{row['best_cell']}` | "
            f"{percent(best, 'linear')} | {percent(best, 'knn')} | {logistic} | {fused_text} | "
            f"{percent(row['pixels'], 'linear')} | {percent(row['random_init'], 'linear')} |"
        )
    lines += ["", "## Paired tests (same test images)", "",
              "Difference a - b with its paired-bootstrap 95% interval; p: exact McNemar test.", "",
              "| data set: comparison | a (%) | b (%) | a - b (points) [95% CI] | only a / only b | McNemar p |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for row in table["rows"]:
        for test in (row["vs_pixels"], row["vs_random_init"]):
            if test:
                lines.append(comparison_row({**test, "what": f"{row['dataset']}: {test['what']}"}))
    return "\n".join(lines) + "\n"


__all__ = ["TRANSFER_JSON", "TRANSFER_MD", "folder_name", "run_suite", "transfer_markdown", "transfer_row"]
