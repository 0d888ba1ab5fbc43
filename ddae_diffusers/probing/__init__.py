"""The probe engine: layer x timestep grid of linear and kNN probes on a resumable feature cache."""

from .cache import FeatureCache, View
from .engine import ProbeConfig, default_layers, prepare, run_probe
from .heads import PAPER_RECIPE, ProbeRecipe, linear_probe_accuracy, train_heads
from .knn import knn_accuracies, knn_accuracy, knn_predict
from .table import FeatureTable

__all__ = [
    "PAPER_RECIPE",
    "FeatureCache",
    "FeatureTable",
    "ProbeConfig",
    "ProbeRecipe",
    "View",
    "default_layers",
    "knn_accuracies",
    "knn_accuracy",
    "knn_predict",
    "linear_probe_accuracy",
    "prepare",
    "run_probe",
    "train_heads",
]
