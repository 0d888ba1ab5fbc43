"""``ProbeResult``: the one reader and writer of a probe folder's ``results.json``.

A probe folder holds ``results.json`` (this object, as readable JSON: the run's settings, one entry per
(layer, timestep) cell, the best cell, the baselines, the full config and the stage timings) and
``heads.safetensors`` (each cell's head under ``"{layer}@{t}.weight|bias|mean|var"``, read by
``report.load_heads``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

from ..errors import UsageError
from ..io_utils import atomic_path
from ..noise import NoiseLevel, noise_level

RESULTS_FILE = "results.json"
HEADS_FILE = "heads.safetensors"


@dataclass
class ProbeCell:
    """One (layer, noise level) cell: test linear and kNN accuracy, the chosen lr and validation accuracies.

    ``timestep`` is the noise level in the model's units: a DDPM timestep index (int) or an EDM sigma (float)."""

    layer: str
    timestep: NoiseLevel
    feature_dim: int
    linear_acc: float
    knn_acc: float
    lr: float
    val_acc: float
    val_accs: list[float] | None = None  # validation accuracy of each lr of ``lrs``
    lrs: list[float] | None = None  # the lrs tried for this cell, ascending (the grid's, extended at an edge)
    linear_ci95: list[float] | None = None  # 95% Wilson intervals of the test accuracies
    knn_ci95: list[float] | None = None
    knn_accs: dict[str, float] | None = None  # kNN accuracy at each k of knn.KNN_KS ("20" is knn_acc)
    logistic_acc: float | None = None  # L-BFGS logistic regression (the best cells only, --logistic_cells)
    logistic_ci95: list[float] | None = None
    logistic_C: float | None = None  # its inverse regularisation, chosen on validation
    logistic_val_acc: float | None = None
    alignment: float | None = None  # --alignment: Wang and Isola's metrics (geometry.py)
    uniformity: float | None = None

    @property
    def key(self) -> str:
        """The cell's name in ``heads.safetensors``: ``"{layer}@{t}"``."""
        return cell_key(self.layer, self.timestep)

    def __getitem__(self, name: str):
        """Read access by ``results.json`` key: ``cell["linear_acc"]``."""
        return asdict(self)[name]


def _cell(data: dict) -> ProbeCell:
    return ProbeCell(**{f.name: data.get(f.name) for f in fields(ProbeCell) if f.name in data or f.default is MISSING})


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cell_key(layer: str, timestep: NoiseLevel) -> str:
    return f"{layer}@{timestep}"


def parse_cell_key(key: str) -> tuple[str, NoiseLevel]:
    """``"up_blocks.0.resnets.1@10"`` -> ``("up_blocks.0.resnets.1", 10)``; an EDM cell ``"mid_block@0.06"`` ->
    ``("mid_block", 0.06)``."""
    layer, t = key.rsplit("@", 1)
    return layer, noise_level(t)


@dataclass
class ProbeResult:
    """Everything a finished probe run reports; ``save``/``load`` write and read ``results.json``."""

    model: str
    dataset: str
    train_split: str
    eval_split: str
    image_column: str
    label_column: str
    resolution: int
    seed: int
    pooling: str
    protocol: str
    recipe: str
    normalization: str
    lrs: list[float]
    epochs: int
    head_batch_size: int
    train_views: int | None
    dtype: str
    num_processes: int
    num_train: int
    num_val: int
    num_eval: int
    num_labels: int
    id2label: dict[str, str]
    layers: list[str]
    timesteps: list[NoiseLevel]  # noise levels in the model's units (DDPM timesteps or EDM sigmas)
    random_init: bool
    cells: list[ProbeCell]
    best: ProbeCell
    baselines: dict[str, dict] = field(default_factory=dict)  # e.g. "pixels": a cell without layer/timestep
    config: dict = field(default_factory=dict)  # the ProbeConfig of the run
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {"wall_s", "cpu_s"}
    files: dict[str, str] = field(default_factory=dict)  # the run's other files -> SHA-256 (written last)
    objective: str = "ddpm"  # how the model noises its inputs: "ddpm" or "edm"
    # each level on the shared axis: {"level", "ve_sigma", "log_snr"} (noise.NoiseAxis.describe)
    noise_levels: list[dict] = field(default_factory=list)
    # each pass over the data: {"split", "index", "images" (clean or the augmentation), "noise"}
    views: list[dict] = field(default_factory=list)
    # fused probes (--fused_probes), best on validation first: {"name", "cells", "feature_dim", "linear_acc", ...}
    fused: list[dict] = field(default_factory=list)
    # how the grid was searched: {"method": "exhaustive"}, or halving's rungs and forwards (halving.py)
    search: dict = field(default_factory=dict)
    # --few_shot: {"cell", "probe", "view", "results": [{"shots", "accs", "mean", "std", "ci95", "Cs"}]}
    few_shot: dict = field(default_factory=dict)
    # which test images an entry got right ("best.linear", "best.knn", "best.logistic", "fused.linear",
    # "pixels.linear", ...), packed by stats.pack_correct: paired tests within and across runs
    correct: dict[str, str] = field(default_factory=dict)
    # paired tests between entries of this run (comparisons.in_run_comparisons)
    comparisons: list[dict] = field(default_factory=list)

    # ------------------------------------------------------------------ files
    @staticmethod
    def is_probe_folder(folder: str | os.PathLike) -> bool:
        """True for a folder that holds both files of a probe run."""
        folder = os.fspath(folder)
        return all(os.path.isfile(os.path.join(folder, name)) for name in (RESULTS_FILE, HEADS_FILE))

    def to_dict(self) -> dict:
        """The ``results.json`` content (key order is the field order)."""
        return asdict(self)

    def __getitem__(self, name: str):
        """Read access by ``results.json`` key, values as in the file: ``result["best"]["layer"]``."""
        return self.to_dict()[name]

    def save(self, folder: str | os.PathLike) -> str:
        """Writes ``results.json`` into ``folder`` atomically; returns its path."""
        path = os.path.join(os.fspath(folder), RESULTS_FILE)
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    @classmethod
    def from_dict(cls, data: dict) -> ProbeResult:
        """From ``results.json`` content; keys a shorter (older or hand-written) file lacks read as None."""
        values = {
            f.name: data.get(f.name)
            for f in fields(cls)
            if f.name in data or (f.default_factory is MISSING and f.default is MISSING)
        }
        values["cells"] = [_cell(cell) for cell in data["cells"]]
        values["best"] = _cell(data["best"])
        return cls(**values)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ProbeResult:
        """Reads ``folder/results.json``; a clear error if the folder is not a probe folder."""
        folder = os.fspath(folder)
        for name in (RESULTS_FILE, HEADS_FILE):
            if not os.path.isfile(os.path.join(folder, name)):
                raise UsageError(f"{folder!r} is not a probe output folder: {name} is missing.")
        try:
            with open(os.path.join(folder, RESULTS_FILE)) as f:
                result = cls.from_dict(json.load(f))
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(
                f"{folder}/{RESULTS_FILE} is damaged ({type(error).__name__}: {error}): run ddae-probe again."
            ) from None
        for name, digest in (result.files or {}).items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or file_digest(path) != digest:
                raise UsageError(
                    f"The files of {folder!r} do not belong together: {name} is not the one {RESULTS_FILE} was "
                    "written with (a run was interrupted while writing, or a file was replaced). Run ddae-probe "
                    "into this folder again."
                )
        return result

    @property
    def eval_noise_seed(self) -> int:
        """The seed of the test split's noise: example i (in split order) got ``example_noise`` of
        ``(eval_noise_seed, i)``."""
        from .cache import EVAL_VIEW

        return EVAL_VIEW.noise_seed(self.seed or 0)

    # ------------------------------------------------------------------ cells
    def best_cell(self, layer: str | None = None, timestep: NoiseLevel | None = None) -> ProbeCell:
        """The best cell on validation, or the best among those matching ``layer``/``timestep``."""
        if layer is None and timestep is None:
            return self.best
        cells = [
            c for c in self.cells
            if (layer is None or c.layer == layer) and (timestep is None or float(c.timestep) == float(timestep))
        ]
        if not cells:
            available = sorted({(c.layer, c.timestep) for c in self.cells})
            raise UsageError(
                f"The probe has no cell for layer={layer!r}, timestep={timestep!r}: available (layer, t) are "
                f"{available}."
            )
        return max(cells, key=lambda c: c.val_acc)
