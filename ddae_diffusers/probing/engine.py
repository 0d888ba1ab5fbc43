"""The probe grid: every (layer, noise level) cell scored by linear probes and kNN.

Noise levels are in the model's units (DDPM timestep indices, EDM sigmas; see ``noise.py``); the
results also place each level on the shared variance-exploding axis.

``prepare`` checks every input (model, layers, noise levels, resolution, data set, labels,
folders) before any feature is computed; ``run_probe`` extracts features into the cache
(sharded across processes under ``accelerate launch``), trains all heads together, scores
kNN and writes the report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from ..capture import EXTRACTION_BATCH_SIZE, DDAEBackbone, autocast_to
from ..data import (
    conversion_note,
    default_num_workers,
    detect_eval_split,
    detect_image_column,
    detect_label_column,
    label_names,
    load_split,
    read_labels,
)
from ..distributed import broadcast_from_main, host_group, wait_for_main
from ..errors import UsageError
from ..io_utils import check_writable_dir
from ..noise import DEFAULT_DDPM_LEVELS, EDMNoise, NoiseLevel
from .baselines import pixel_features, random_init
from .cache import EVAL_VIEW, PAIR_VIEW, FeatureCache, View, ViewRole, weights_fingerprint
from .comparisons import in_run_comparisons
from .fewshot import FEW_SHOT_SEEDS, few_shot
from .fused import HEAD_KINDS, fused_candidates, fused_entry, train_mlp_heads
from .geometry import GEOMETRY_ROWS, geometry
from .halving import successive_halving
from .heads import PAPER_RECIPE, ProbeRecipe, choose_lr, head_correct, train_heads
from .knn import KNN_K, KNN_KS, knn_correct
from .logistic import train_logistic
from .result import ProbeCell, ProbeResult
from .stats import accuracy_entry, pack_correct, t_interval
from .sweep import sweep_heads
from .table import FeatureTable

logger = logging.getLogger(__name__)
DEFAULT_TIMESTEPS = DEFAULT_DDPM_LEVELS  # the DDPM grid; EDM models default to EDMNoise.default_levels()
PROTOCOLS = ("cached", "online")
RECIPES = ("converge", "paper")
TRAIN_AUGMENTS = ("crop_flip", "none")
SEARCHES = ("auto", "exhaustive", "halving")
# --search auto halves the noise levels from this many training images on (docs/scaling.md: on ImageNet-1k it cuts
# a 7-level grid's forwards 3.3x, its cache 3.1x and its head training 2.5x; below, the exhaustive grid is cheap)
HALVING_FROM_ROWS = 200_000
DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGISTIC_CELLS = 3  # logistic regression on the best cells: a full-batch fit per cell (minutes on a CPU)
CUDA_BATCH_SIZE = 256  # extraction batch on CUDA, where small batches leave the accelerator idle


@dataclass
class ProbeConfig:
    """Everything a probe run needs; the CLI flags of ``ddae-probe`` map one to one onto these fields."""

    model: str
    dataset: str
    output_dir: str
    cache_dir: str | None = None  # default: <output_dir>/feature_cache
    image_column: str | None = None
    label_column: str | None = None
    train_split: str = "train"
    eval_split: str | None = None  # default: the first of test/validation/valid/val the data set has
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    layers: list[str] | None = None  # default: default_layers(backbone)
    timesteps: list[NoiseLevel] | None = None  # default: the model's (DDPM: DEFAULT_TIMESTEPS; EDM: indices 2..8)
    sigma_index: list[int] | None = None  # EDM: levels as indices of the 18-step schedule (DDAE paper: 3, 4, 5)
    resolution: int | None = None  # default: the model's sample size
    batch_size: int | None = None  # None: auto_defaults (16 on CPU, 256 on CUDA)
    num_workers: int | None = None  # image-loading processes; None: auto_defaults (0 on CPU, min(8, cores) on CUDA)
    train_views: int = 1  # view 0: the clean images; views 1..: augmented with train_augment, fresh noise
    train_augment: str = "crop_flip"
    lrs: list[float] = field(default_factory=lambda: list(ProbeRecipe().lrs))
    epochs: int = ProbeRecipe().epochs
    head_batch_size: int = ProbeRecipe().batch_size
    normalization: str = "standardize"
    recipe: str = "converge"  # "paper": raw features, Adam lr 1e-3, 15 epochs, batch 128
    protocol: str = "cached"
    dtype: str = "float32"
    seed: int = 0
    val_fraction: float = 0.1
    random_init: bool = False  # baseline: the same architecture, freshly initialised with `seed`
    pixel_baseline: bool = False  # baseline: also probe the flattened raw pixels
    prompt: str | None = None  # text-conditioned models: the prompt (default: the empty prompt)
    fused_probes: bool = False  # also heads on concatenations of cells (fused.py), chosen on validation
    fused_head: str = "linear"  # or "mlp": one hidden layer of 512
    search: str = "auto"  # "halving" (successive halving over noise levels, halving.py) from HALVING_FROM_ROWS train
    # images on with --protocol cached and 3+ levels, else "exhaustive"
    halving_eta: int = 3  # halving: keep 1/eta of the levels per rung, grow the rows eta-fold
    logistic_cells: int | None = None  # L-BFGS logistic regression on this many best cells (None: 3 when cached)
    few_shot: list[int] | None = None  # images per class of the few-shot probes of the best cell, e.g. 1 5 10 25
    few_shot_seeds: int = FEW_SHOT_SEEDS  # random draws per shot count
    alignment: bool = False  # alignment and uniformity of every cell on GEOMETRY_ROWS training images

    def __post_init__(self):
        """Checks every flag that needs neither the model nor the data, from Python as from ``ddae-probe``."""
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"--protocol must be one of {PROTOCOLS}, got {self.protocol!r}.")
        if self.recipe not in RECIPES:
            raise UsageError(f"--recipe must be one of {RECIPES}, got {self.recipe!r}.")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}.")
        if self.train_views < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise UsageError("--train_views and --batch_size must be >= 1.")
        if self.num_workers is not None and self.num_workers < 0:
            raise UsageError(f"--num_workers must be >= 0 (0: load in the main process), got {self.num_workers}.")
        if self.train_augment not in TRAIN_AUGMENTS:
            raise UsageError(f"--train_augment must be one of {TRAIN_AUGMENTS}, got {self.train_augment!r}.")
        if self.pixel_baseline and self.protocol != "cached":
            raise UsageError("--pixel_baseline runs with --protocol cached; drop one of the two.")
        if self.fused_probes and self.protocol != "cached":
            raise UsageError("--fused_probes runs on the feature cache (--protocol cached); drop one of the two.")
        if self.fused_head not in HEAD_KINDS:
            raise UsageError(f"--fused_head must be one of {HEAD_KINDS}, got {self.fused_head!r}.")
        if self.search not in SEARCHES:
            raise UsageError(f"--search must be one of {SEARCHES}, got {self.search!r}.")
        if self.search == "halving" and (self.protocol != "cached" or self.halving_eta < 2):
            raise UsageError(
                f"--search halving needs --protocol cached and --halving_eta >= 2 (got {self.protocol!r}, "
                f"{self.halving_eta}); or use --search exhaustive."
            )
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}.")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.logistic_cells is None:  # the online protocol has no cached features to fit them on
            self.logistic_cells = LOGISTIC_CELLS if self.protocol == "cached" else 0
        if self.logistic_cells < 0 or self.few_shot_seeds < 1 or any(k < 1 for k in self.few_shot or []):
            raise UsageError(
                f"--logistic_cells must be >= 0, --few_shot counts and --few_shot_seeds >= 1 (got "
                f"{self.logistic_cells}, {self.few_shot}, {self.few_shot_seeds})."
            )
        if (self.logistic_cells or self.few_shot or self.alignment) and self.protocol != "cached":
            raise UsageError("--logistic_cells, --few_shot and --alignment run on the feature cache: pass "
                             "--logistic_cells 0 and neither of the others with --protocol online.")  # fmt: skip
        if self.sigma_index is not None and self.timesteps is not None:
            raise UsageError("Give --timesteps or --sigma_index, not both: each sets the noise levels.")
        self.probe_recipe()  # validates lrs, epochs, normalization

    def probe_recipe(self) -> ProbeRecipe:
        if self.recipe == "paper" or self.protocol == "online":
            return PAPER_RECIPE
        return ProbeRecipe(tuple(self.lrs), self.epochs, self.head_batch_size, self.normalization)


def auto_defaults(device: torch.device | str) -> dict[str, int]:
    """The extraction settings left to the device: ``{"batch_size", "num_workers"}``, 16 and 0 on CPU (the measured
    fastest batch; the cores run the forward), 256 and ``min(8, os.cpu_count())`` on CUDA."""
    batch_size = CUDA_BATCH_SIZE if torch.device(device).type == "cuda" else EXTRACTION_BATCH_SIZE
    return {"batch_size": batch_size, "num_workers": default_num_workers(device)}


def resolve_defaults(config: ProbeConfig, device: torch.device | str) -> ProbeConfig:
    """``config`` with its automatic (None) ``batch_size`` and ``num_workers`` set for ``device``, the device the
    run extracts on."""
    auto = auto_defaults(device)
    return replace(config, **{name: value for name, value in auto.items() if getattr(config, name) is None})


def train_views(config: ProbeConfig) -> list[View]:
    """The passes over the train split: view 0 is the clean images with their fixed noise (as the test split is
    seen), views 1..K-1 are augmented (``train_augment``) with fresh noise."""
    augment = config.train_augment == "crop_flip"
    return [View(ViewRole.TRAIN, 0, False)] + [View(ViewRole.TRAIN, k, augment) for k in range(1, config.train_views)]


def describe_views(config: ProbeConfig) -> list[dict]:
    """``results.json["views"]``: what each view of the run was."""
    crop_flip = "random crop (4-pixel padding) + horizontal flip"
    rows = [{"split": config.eval_split, "index": 0, "images": "clean", "noise": "fixed per example"}]
    if config.protocol == "online":
        return rows + [{"split": config.train_split, "index": "epoch", "images": crop_flip,
                        "noise": "fresh every epoch"}]
    for view in train_views(config):
        rows.append({"split": config.train_split, "index": view.index,
                     "images": crop_flip if view.augment else "clean",
                     "noise": "fixed per example" if view.index == 0 else "fresh (another draw per view)"})
    return rows


def default_layers(backbone: DDAEBackbone) -> list[str]:
    """Every resnet and attention output of the encoder, mid block and decoder (execution order).

    Whole ``up_blocks.i`` outputs are left out: they come after the upsampler. DiT: every block.
    """
    names = backbone.layer_names()
    fine = [name for name in names if ".resnets." in name or ".attentions." in name]
    return fine or names


@dataclass
class Prepared:
    """Checked inputs of a run: model, data, labels and the held-out validation rows."""

    config: ProbeConfig
    backbone: DDAEBackbone
    train: object
    eval: object
    image_column: str
    label_column: str
    train_labels: torch.Tensor
    eval_labels: torch.Tensor
    num_labels: int
    id2label: dict[str, str]
    layers: list[str]
    timesteps: list[NoiseLevel]
    resolution: int
    fit_rows: list[int]
    val_rows: list[int]
    weights: str | None = None  # the model's weights fingerprint (main process), for the feature cache


def _labels(dataset, column: str, split: str) -> torch.Tensor:
    """(N,) int64 class ids of ``column``, read in one call; ``UsageError`` for non-integer or negative labels."""
    labels = torch.from_numpy(read_labels(dataset, column))
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise UsageError(f"Labels of {split!r} ({column!r}) must be integer class ids, got {labels.dtype}.")
    if labels.numel() and labels.min() < 0:
        raise UsageError(
            f"The {split!r} split has negative labels in {column!r} (e.g. -1 for 'no label'): "
            "probing needs a labelled split; choose another --train_split/--eval_split."
        )
    return labels.long()


def noise_levels(config: ProbeConfig, backbone: DDAEBackbone) -> list[NoiseLevel]:
    """The grid's noise levels in the model's units: ``timesteps``, or ``sigma_index`` turned into EDM sigmas, or
    the model's default grid."""
    axis = backbone.noise_axis
    if config.sigma_index is not None:
        if not isinstance(axis, EDMNoise):
            raise UsageError("--sigma_index indexes EDM's sampling schedule, but this is a DDPM model: use "
                             "--timesteps with diffusers timestep indices (e.g. 10).")
        return [axis.sigma_at_index(index) for index in config.sigma_index]
    return list(config.timesteps) if config.timesteps is not None else axis.default_levels()


@dataclass
class ModelSetup:
    """A checked model on its device: its layers and noise levels in execution order, the image side, the weights'
    fingerprint (main process; None elsewhere) and the test forward's features ``{(layer, t): (1, ...)}`` at the
    first level."""

    backbone: DDAEBackbone
    layers: list[str]
    timesteps: list[NoiseLevel]
    resolution: int
    weights: str | None
    test_features: dict


def setup_model(config, backbone: DDAEBackbone, accelerator=None, pooling: str = "avg") -> ModelSetup:
    """Fingerprints the weights where they were loaded (main process only), moves the model to
    ``accelerator.device``, encodes the prompt there, then checks layers, noise levels and resolution with the layer
    catalogue and one test forward of a zero image under the run's dtype. ``config`` holds ``layers``,
    ``timesteps``, ``sigma_index``, ``resolution``, ``prompt`` and ``dtype`` (a ``ProbeConfig`` or an export's)."""
    weights = weights_fingerprint(backbone) if accelerator is None or accelerator.is_main_process else None
    if accelerator is not None:
        backbone.to(accelerator.device)
    dtype = DTYPES[config.dtype]
    if config.prompt is not None:
        backbone.set_prompt(config.prompt)
    backbone.conditioning  # noqa: B018  (encoded now, on the device, by the text encoders in their own dtype)
    with autocast_to(backbone.device, dtype):  # the layer catalogue's forward
        layers = backbone.check_layers(config.layers if config.layers else default_layers(backbone))
    timesteps = backbone.check_timesteps(noise_levels(config, backbone))
    resolution = config.resolution or backbone.image_size or 32
    if backbone.image_size is not None and resolution != backbone.image_size:
        raise UsageError(
            f"--resolution {resolution} does not fit the model, which takes {backbone.image_size}x"
            f"{backbone.image_size} images: pass --resolution {backbone.image_size}."
        )
    probe_image = torch.zeros(1, backbone.image_channels, resolution, resolution, device=backbone.device)
    try:
        test_features = backbone.features(probe_image, layers, timesteps[:1], pooling=pooling, dtype=dtype)
    except UsageError:
        raise  # already says what is wrong (non-finite weights, say)
    except (RuntimeError, ValueError) as error:
        raise UsageError(
            f"The model cannot take {resolution}x{resolution} images ({error}): change --resolution."
        ) from None
    return ModelSetup(backbone, layers, timesteps, resolution, weights, test_features)


def prepare(config: ProbeConfig, backbone: DDAEBackbone | None = None, accelerator=None) -> Prepared:
    """Validates the inputs ``ProbeConfig`` cannot check alone (folders, model, data) and loads model and data;
    raises ``ValueError`` before any extraction.

    The model's weights are fingerprinted for the feature cache where they were loaded (on the main process only),
    then the model moves to ``accelerator.device``; the prompt's conditioning, the layer catalogue and a test
    forward run there (the last two under the run's dtype)."""
    check_writable_dir(config.output_dir, "--output_dir")
    check_writable_dir(config.cache_dir or os.path.join(config.output_dir, "feature_cache"), "--cache_dir")

    if backbone is None:
        backbone = DDAEBackbone.from_pretrained(config.model)
    if config.random_init:
        backbone = random_init(backbone, config.seed)
    model = setup_model(config, backbone, accelerator)
    backbone, layers, timesteps, resolution = model.backbone, model.layers, model.timesteps, model.resolution

    config = replace(config, eval_split=detect_eval_split(config.dataset, None, config.eval_split))
    if config.eval_split == config.train_split:
        raise UsageError(
            f"--eval_split {config.eval_split!r} is the training split: the test accuracy would be measured on "
            "training images. Pass a held-out split (e.g. --eval_split test)."
        )
    train = load_split(config.dataset, config.train_split, config.max_train_samples)
    evaluation = load_split(config.dataset, config.eval_split, config.max_eval_samples)
    image_column = detect_image_column(train, config.image_column)
    label_column = detect_label_column(train, config.label_column)
    detect_image_column(evaluation, image_column)
    detect_label_column(evaluation, label_column)
    note = conversion_note(train[0][image_column], resolution)
    if note:
        logger.warning(f"{note} for the model ({config.train_split!r}, first image).")
    train_labels = _labels(train, label_column, config.train_split)
    eval_labels = _labels(evaluation, label_column, config.eval_split)
    names = label_names(train, label_column)
    highest = int(max(train_labels.max(), eval_labels.max()))
    num_labels = len(names) if names else highest + 1  # the run's one count of classes
    if train_labels.unique().numel() < 2:
        raise UsageError(
            f"The training split has {train_labels.unique().numel()} class(es) in {label_column!r}: "
            "a probe needs at least two (raise --max_train_samples or pick another split)."
        )
    if highest >= num_labels:
        raise UsageError(f"Labels in {label_column!r} exceed the {num_labels} class names of the data set.")
    id2label = {str(i): (names[i] if names else str(i)) for i in range(num_labels)}

    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    num_val = max(1, round(config.val_fraction * len(train)))
    if len(train) - num_val < 2:
        raise UsageError(f"{len(train)} training examples are too few to hold out a validation slice.")
    val_rows, fit_rows = sorted(order[:num_val]), sorted(order[num_val:])
    return Prepared(
        config, backbone, train, evaluation, image_column, label_column, train_labels, eval_labels,
        num_labels, id2label, layers, timesteps, resolution, fit_rows, val_rows, model.weights,
    )


class Stopwatch:
    """Wall and process-CPU seconds of consecutive stages: ``laps[name] = {"wall_s", "cpu_s"}``."""

    def __init__(self):
        self.laps: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"wall_s": round(wall - self._wall, 3), "cpu_s": round(cpu - self._cpu, 3)}
        self._wall, self._cpu = wall, cpu


def _accuracy(name: str, correct: torch.Tensor) -> dict:
    """``{name_acc, name_ci95}`` of per-image flags (N,) bool: the accuracy and its Wilson interval."""
    entry = accuracy_entry(correct)
    return {f"{name}_acc": entry["acc"], f"{name}_ci95": entry["ci95"]}


def _scores(
    fits: dict,
    knn_bank: FeatureTable,
    knn_labels: torch.Tensor,
    eval_x: FeatureTable,
    eval_y: torch.Tensor,
    device: torch.device | str | None = None,
    num_labels: int | None = None,
) -> tuple[dict, dict]:
    """``({key: entry of results.json}, {key: {"linear", "knn": (Q,) bool}})``: test linear accuracy and kNN accuracy
    at every k of ``KNN_KS`` (k = ``KNN_K`` as ``knn_acc``), each with its 95% interval, dim, chosen lr and validation
    accuracies; and which test images each got right. The test features are read in blocks, once for all heads and
    once per block of the kNN bank, and scored on ``device`` (the extraction device; default: the tables'); kNN
    votes over the run's ``num_labels`` classes (default: the largest label + 1)."""
    linear = head_correct({key: [fit.head] for key, fit in fits.items()}, eval_x, eval_y, device=device)
    knn = knn_correct(knn_bank, knn_labels, eval_x, eval_y, ks=KNN_KS, device=device, num_classes=num_labels)
    entries, correct = {}, {}
    for key, fit in fits.items():
        entries[key] = {
            "feature_dim": eval_x.dims[key],
            **_accuracy("linear", linear[key][0]),
            **_accuracy("knn", knn[key][KNN_K]),
            "knn_accs": {str(k): _accuracy("knn", flags)["knn_acc"] for k, flags in knn[key].items()},
            "lr": fit.lr,
            "val_acc": fit.val_acc,
            "val_accs": fit.val_accs,
            "lrs": list(fit.lrs),
        }
        correct[key] = {"linear": linear[key][0], "knn": knn[key][KNN_K]}
    return entries, correct


@dataclass
class FitRows:
    """The fit and validation rows of all train views, stacked, with their labels (N,)."""

    fit_x: FeatureTable
    fit_y: torch.Tensor
    val_x: FeatureTable
    val_y: torch.Tensor

    @classmethod
    def of(cls, prep: Prepared, views: list[FeatureTable]) -> FitRows:
        return cls(
            FeatureTable.concat_rows([view.subset(prep.fit_rows) for view in views]),
            prep.train_labels[prep.fit_rows].repeat(len(views)),
            FeatureTable.concat_rows([view.subset(prep.val_rows) for view in views]),
            prep.train_labels[prep.val_rows].repeat(len(views)),
        )


def _fit_heads(
    prep: Prepared, views: list[FeatureTable], recipe: ProbeRecipe, trainer: Callable | None = None
) -> tuple[dict, FeatureTable, torch.Tensor]:
    """Heads of every cell on the fit rows of all train views (lr chosen on their validation rows, the sweep
    extended past an edge by :func:`~.sweep.sweep_heads`); also the kNN bank (fit rows of the first view) and its
    labels. ``trainer``: ``train_heads`` (linear) or ``fused.train_mlp_heads``. The views are tables: nothing is
    copied, rows are read per mini-batch and moved to the extraction device (``prep.backbone.device``), where the
    heads train."""
    rows = FitRows.of(prep, views)
    fits = sweep_heads(rows.fit_x, rows.fit_y, prep.num_labels, recipe, rows.val_x, rows.val_y,
                       seed=prep.config.seed, device=prep.backbone.device, trainer=trainer or train_heads)  # fmt: skip
    return fits, views[0].subset(prep.fit_rows), prep.train_labels[prep.fit_rows]


def _logistic(prep: Prepared, views: list[FeatureTable], eval_features: FeatureTable, cells: list[ProbeCell]) -> dict:
    """L-BFGS logistic regression (:mod:`.logistic`) on the ``config.logistic_cells`` best cells on validation, on
    the fit rows of all views with C chosen on their validation rows; fills those cells' ``logistic_*`` fields and
    returns ``{key: (Q,) bool}``, the test images each got right."""
    ranked = sorted(cells, key=lambda c: (-c.val_acc, -c.linear_acc))[: prep.config.logistic_cells]
    keys = [(cell.layer, cell.timestep) for cell in ranked]
    rows = FitRows.of(prep, [view.select(keys) for view in views])
    device = prep.backbone.device
    fits = train_logistic(rows.fit_x, rows.fit_y, prep.num_labels, rows.val_x, rows.val_y, device=device)
    correct = head_correct({key: [fit.head] for key, fit in fits.items()}, eval_features.select(keys),
                           prep.eval_labels, device=device)  # fmt: skip
    for cell, key in zip(ranked, keys, strict=True):
        entry = _accuracy("logistic", correct[key][0])
        cell.logistic_acc, cell.logistic_ci95 = entry["logistic_acc"], entry["logistic_ci95"]
        cell.logistic_C, cell.logistic_val_acc = fits[key].C, fits[key].val_acc
    return {key: correct[key][0] for key in keys}


def _geometry_rows(prep: Prepared) -> list[int]:
    """The training rows alignment and uniformity are measured on: a seeded share of the fit rows, ascending."""
    order = torch.randperm(len(prep.fit_rows), generator=torch.Generator().manual_seed(prep.config.seed))
    return sorted(prep.fit_rows[i] for i in order[:GEOMETRY_ROWS].tolist())


def _few_shot(prep: Prepared, views: list[FeatureTable], eval_features: FeatureTable, best: ProbeCell) -> dict:
    """The few-shot probes of the best cell on the clean view (view 0), each shot count with its draws, mean,
    standard deviation and the 95% t-interval of the mean."""
    key = (best.layer, best.timestep)
    config = prep.config
    view = views[0].select([key])
    entries = few_shot(
        view.subset(prep.fit_rows), prep.train_labels[prep.fit_rows], view.subset(prep.val_rows),
        prep.train_labels[prep.val_rows], eval_features.select([key]), prep.eval_labels, prep.num_labels,
        config.few_shot, config.few_shot_seeds, config.seed, device=prep.backbone.device,
    )[key]
    for entry in entries:
        entry["ci95"] = list(t_interval(entry["accs"]))
    return {"cell": best.key, "probe": "logistic", "view": 0, "results": entries}


def _fused_probes(
    prep: Prepared, views: list[FeatureTable], eval_features: FeatureTable, cells: list[ProbeCell], recipe: ProbeRecipe
) -> tuple[list[dict], dict]:
    """Heads and kNN on concatenations of cells (see ``fused.py``), one entry each, best on validation first, and
    which test images the best one got right; trained and scored on the extraction device."""
    candidates = fused_candidates(cells)
    trainer = train_mlp_heads if prep.config.fused_head == "mlp" else train_heads
    fits, knn_bank, knn_labels = _fit_heads(prep, [view.fuse(candidates) for view in views], recipe, trainer)
    eval_fused = eval_features.fuse(candidates)
    scores, correct = _scores(fits, knn_bank, knn_labels, eval_fused, prep.eval_labels, prep.backbone.device,
                              prep.num_labels)  # fmt: skip
    entries = [fused_entry(name, keys, scores[name]) for name, keys in candidates.items()]
    entries = sorted(entries, key=lambda e: (-e["val_acc"], -e["linear_acc"]))
    return entries, correct[entries[0]["name"]]


def _pixel_baseline(prep: Prepared, recipe: ProbeRecipe, progress: bool) -> tuple[dict, dict]:
    """The grid's heads and kNN on flattened raw pixels of the same views and rows (held on the CPU, trained and
    scored on the extraction device a block at a time), and which test images they got right."""
    config = prep.config

    def pixels(dataset, view: View) -> FeatureTable:
        features = pixel_features(dataset, prep.image_column, view, prep.resolution, config.seed, progress=progress)
        return FeatureTable.from_tensors({"pixels": features})

    views = [pixels(prep.train, view) for view in train_views(config)]
    fits, knn_bank, knn_labels = _fit_heads(prep, views, recipe)
    eval_pixels = pixels(prep.eval, EVAL_VIEW)
    scores, correct = _scores(fits, knn_bank, knn_labels, eval_pixels, prep.eval_labels, prep.backbone.device,
                              prep.num_labels)  # fmt: skip
    return scores["pixels"], correct["pixels"]


def search_method(config: ProbeConfig, train_rows: int, num_levels: int) -> str:
    """``config.search``, with ``"auto"`` resolved: halving for a cached grid of 3+ noise levels over at least
    :data:`HALVING_FROM_ROWS` training images, exhaustive otherwise."""
    if config.search != "auto":
        return config.search
    large = train_rows >= HALVING_FROM_ROWS and num_levels >= 3 and config.protocol == "cached"
    return "halving" if large else "exhaustive"


def run_probe(
    config: ProbeConfig,
    accelerator=None,
    backbone: DDAEBackbone | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    progress: bool = True,
    prepared: Prepared | None = None,
) -> ProbeResult | None:
    """Runs the grid and writes the report to ``config.output_dir``; returns the results (main process only).

    ``prepared``: the checked inputs of ``prepare(config)`` when the caller already has them."""
    from .online import train_online
    from .report import write_report

    clock = Stopwatch()
    host_group()  # every rank, now: the others wait on it while the main process trains the heads
    prep = prepared or prepare(config, backbone, accelerator)
    clock.lap("prepare")
    backbone = prep.backbone
    if accelerator is not None:
        backbone.to(accelerator.device)  # a no-op when prepare moved it
    backbone.denoiser.eval()
    config = resolve_defaults(prep.config, backbone.device)  # recorded resolved in results.json
    is_main = accelerator is None or accelerator.is_main_process
    dtype = DTYPES[config.dtype]

    cache_for = FeatureCache(
        config.cache_dir or os.path.join(config.output_dir, "feature_cache"),
        backbone, prep.layers, prep.timesteps, prep.resolution, config.seed, dtype,
        weights=broadcast_from_main(prep.weights, accelerator),
    ).with_timesteps

    extract = dict(batch_size=config.batch_size, accelerator=accelerator, on_batch=on_batch, progress=progress,
                   num_workers=config.num_workers)
    recipe = config.probe_recipe()
    method = search_method(config, len(prep.train), len(prep.timesteps))
    search = {"method": method, **({"chosen_by": "--search auto"} if config.search == "auto" else {})}
    if method == "halving":
        levels, search = successive_halving(prep, cache_for, extract, recipe, accelerator)
        search = {**search, **({"chosen_by": "--search auto"} if config.search == "auto" else {})}
        prep = replace(prep, timesteps=levels)
        clock.lap("halving")
    cache = cache_for(prep.timesteps)
    eval_features = cache.extract(prep.eval, config.eval_split, prep.image_column, EVAL_VIEW, **extract)
    clock.lap("extract_eval")
    if config.protocol == "online":
        fits, knn_bank, knn_labels = train_online(
            backbone, prep.train, prep.image_column, prep.train_labels, prep.fit_rows, prep.val_rows,
            prep.layers, prep.timesteps, prep.resolution, prep.num_labels, config.seed, dtype, recipe,
            accelerator, progress, device=backbone.device,
        )
        clock.lap("online_train")
    else:
        views = [
            cache.extract(prep.train, config.train_split, prep.image_column, view, **extract)
            for view in train_views(config)
        ]
        clock.lap("extract_train")
        if config.alignment:
            geometry_rows = _geometry_rows(prep)
            pair_view = cache.extract(prep.train, config.train_split, prep.image_column, PAIR_VIEW,
                                      rows=geometry_rows, **extract)  # fmt: skip
            clock.lap("extract_pair")
        if is_main:
            fits, knn_bank, knn_labels = _fit_heads(prep, views, recipe)
            clock.lap("heads")
    if not is_main:
        wait_for_main(accelerator)
        return None

    knn_bank = FeatureTable.from_tensors(knn_bank)
    scores, correct = _scores(fits, knn_bank, knn_labels, eval_features, prep.eval_labels, backbone.device,
                              prep.num_labels)  # fmt: skip
    cells = [ProbeCell(layer, t, **scores[layer, t]) for layer in prep.layers for t in prep.timesteps]
    best = cells[choose_lr([cell.val_acc for cell in cells])]
    flags = {f"best.{probe}": value for probe, value in correct[best.layer, best.timestep].items()}
    clock.lap("score")
    if config.alignment:
        measured = geometry(views[0].subset(geometry_rows), pair_view, device=backbone.device)
        for cell in cells:
            cell.alignment = measured[cell.layer, cell.timestep]["alignment"]
            cell.uniformity = measured[cell.layer, cell.timestep]["uniformity"]
        clock.lap("alignment")
    few_shot_results = {}
    if config.protocol == "cached" and config.logistic_cells:
        logistic_correct = _logistic(prep, views, eval_features, cells)
        if (best.layer, best.timestep) in logistic_correct:
            flags["best.logistic"] = logistic_correct[best.layer, best.timestep]
        clock.lap("logistic")
    if config.protocol == "cached" and config.few_shot:
        few_shot_results = _few_shot(prep, views, eval_features, best)
        clock.lap("few_shot")
    fused = []
    if config.fused_probes:
        fused, fused_correct = _fused_probes(prep, views, eval_features, cells, recipe)
        flags.update({f"fused.{probe}": value for probe, value in fused_correct.items()})
        clock.lap("fused")
    baselines = {}
    if config.pixel_baseline:
        baselines["pixels"], pixel_correct = _pixel_baseline(prep, recipe, progress)
        flags.update({f"pixels.{probe}": value for probe, value in pixel_correct.items()})
        clock.lap("pixel_baseline")
    results = ProbeResult(
        model=config.model,
        dataset=config.dataset,
        train_split=config.train_split,
        eval_split=config.eval_split,
        image_column=prep.image_column,
        label_column=prep.label_column,
        resolution=prep.resolution,
        seed=config.seed,
        pooling="avg",
        protocol=config.protocol,
        recipe=config.recipe if config.protocol == "cached" else "paper",
        normalization=recipe.normalization,
        lrs=list(recipe.lrs),
        epochs=recipe.epochs,
        head_batch_size=recipe.batch_size,
        train_views=config.train_views if config.protocol == "cached" else None,
        dtype=config.dtype,
        num_processes=accelerator.num_processes if accelerator is not None else 1,
        num_train=len(prep.fit_rows),
        num_val=len(prep.val_rows),
        num_eval=len(prep.eval),
        num_labels=prep.num_labels,
        id2label=prep.id2label,
        layers=prep.layers,
        timesteps=prep.timesteps,
        objective=backbone.objective,
        noise_levels=[backbone.noise_axis.describe(t) for t in prep.timesteps],
        views=describe_views(config),
        fused=fused,
        search=search,
        random_init=config.random_init,
        cells=cells,
        best=best,
        baselines=baselines,
        few_shot=few_shot_results,
        correct={name: pack_correct(value) for name, value in flags.items()},
        comparisons=in_run_comparisons(flags, config.seed),
        config=asdict(config),
        timings=clock.laps,
    )
    write_report(config.output_dir, results, {(c.layer, c.timestep): fits[c.layer, c.timestep].head for c in cells})
    if accelerator is not None:
        wait_for_main(accelerator)
    return results


__all__ = ["ProbeConfig", "prepare", "run_probe", "default_layers", "auto_defaults", "resolve_defaults",
           "DEFAULT_TIMESTEPS"]

