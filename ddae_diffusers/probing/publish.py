"""Publishing a probe run: one grid cell as a ``DDAEForImageClassification`` on the Hub, in one commit.

The uploaded repository holds the classifier (weights, config, remote code, image processor), a model card
whose ``model-index`` has the cell's test accuracy and kNN accuracy, the grid table and heatmap, and the run's
``results.json``.
"""

from __future__ import annotations

import os

from huggingface_hub import CommitInfo

from ..errors import UsageError
from ..noise import NoiseLevel
from .result import RESULTS_FILE, parse_cell_key


def parse_push_cell(text: str | None) -> tuple[str | None, NoiseLevel | None]:
    """``"up_blocks.0.resnets.1@10"`` -> (layer, level); None -> (None, None), the best cell."""
    if text is None:
        return None, None
    if "@" not in text:
        raise UsageError(f"--push_cell {text!r} is not LAYER@LEVEL: e.g. --push_cell up_blocks.1.resnets.2@10.")
    try:
        return parse_cell_key(text)
    except ValueError as error:
        raise UsageError(f"--push_cell {text!r}: {error}") from None


def check_cell_in_grid(text: str | None, layers: list[str], levels: list[NoiseLevel]) -> None:
    """Refuses a ``--push_cell`` that the grid will not contain, before any feature is computed."""
    layer, level = parse_push_cell(text)
    if layer is not None and layer not in layers:
        raise UsageError(f"--push_cell layer {layer!r} is not in the grid's layers {layers}: add it to --layers.")
    if level is not None and not any(float(level) == float(other) for other in levels):
        raise UsageError(f"--push_cell level {level} is not in the grid's noise levels {levels}: add it to them.")


def publish_probe(
    probe_folder: str | os.PathLike,
    repo_id: str,
    *,
    cell: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Pushes the best cell of the probe in ``probe_folder`` (or ``cell``, ``"LAYER@LEVEL"``) to ``repo_id``
    as a classifier with its card and the run's ``results.json``, in one commit."""
    from ..modeling_ddae import DDAEForImageClassification

    layer, level = parse_push_cell(cell)
    model = DDAEForImageClassification.from_probe(probe_folder, layer=layer, timestep=level)
    summary = model.config.training_summary or {}
    model.config.training_summary = {
        **(model.config.training_summary or {}),
        "model_name": repo_id.split("/")[-1],
        "hub_model_id": repo_id,
        "results_file": RESULTS_FILE,
    }
    chosen = "chosen with --push_cell" if cell else "the best cell on validation"
    return model.push_to_hub(
        repo_id,
        token=token,
        private=private,
        tags=tags,
        commit_message=f"Probe of {model.config.base_model}: {model.config.feature_layer}@{model.config.timestep}",
        commit_description=f"ddae-probe grid on {summary.get('dataset')}; {chosen}.",
        extra_files=[os.path.join(os.fspath(probe_folder), RESULTS_FILE)],
    )


__all__ = ["publish_probe", "check_cell_in_grid", "parse_push_cell"]
