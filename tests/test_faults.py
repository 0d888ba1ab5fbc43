"""Fault injection: each row of a table is (fault, where, expected outcome), run by one parametrised test.

To cover a new fault, add a function that injects it into a finished feature cache and a row to
``CACHE_FAULTS``; the test checks the outcome: the damaged unit is named in one log line and recomputed,
and the features equal the undamaged run's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_unet

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.probing.cache import FeatureCache, View
from ddae_diffusers.probing.engine import ProbeConfig, run_probe

LAYERS = ["mid_block", "up_blocks.0.resnets.1"]


def features_file(unit: Path) -> Path:
    return unit / "features.npy"


def empty(path: Path) -> None:
    path.write_bytes(b"")


def truncate_half(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a numpy or json file\xff" * 3)


def delete(path: Path) -> None:
    path.unlink()


# (fault, file of the unit it hits, expected words in the one log line)
CACHE_FAULTS = [
    (empty, "features.npy", "features.npy is unreadable"),
    (truncate_half, "features.npy", "features.npy is unreadable"),
    (garbage, "features.npy", "features.npy is unreadable"),
    (delete, "features.npy", "features.npy is missing"),
    (empty, "meta.json", "meta.json is unreadable"),
    (garbage, "meta.json", "meta.json is unreadable"),
    (truncate_half, "meta.json", "meta.json is unreadable"),
]


@pytest.fixture(scope="module")
def backbone():
    return DDAEBackbone(make_tiny_unet())


@pytest.fixture(scope="module")
def cifar16(cifar_small):
    return cifar_small.select(range(16))


def extract(backbone, dataset, cache_dir, image_column="img", **changes):
    settings = dict(layers=LAYERS, timesteps=[10], resolution=16, seed=3, dtype=None)
    settings.update(changes)
    view = settings.pop("view", View(0, 0, True))
    cache = FeatureCache(str(cache_dir), backbone, **settings)
    return dict(cache.extract(dataset, "train", image_column, view, batch_size=8, progress=False))


@pytest.mark.parametrize(("fault", "target", "logged"), CACHE_FAULTS,
                         ids=[f"{f.__name__}:{t}" for f, t, _ in CACHE_FAULTS])
def test_damaged_cache_file_is_named_and_recomputed(fault, target, logged, backbone, cifar16, tmp_path, caplog):
    reference = extract(backbone, cifar16, tmp_path)
    (unit,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    fault(unit / target)
    with caplog.at_level(logging.WARNING, logger="ddae_diffusers.probing.cache"):
        repaired = extract(backbone, cifar16, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "ddae_diffusers.probing.cache"]
    assert len(lines) == 1 and logged in lines[0] and unit.name in lines[0], lines
    for key in reference:
        assert torch.equal(reference[key], repaired[key])
    caplog.clear()
    extract(backbone, cifar16, tmp_path)  # healed: a third run reuses it without a word
    assert not [r for r in caplog.records if r.name == "ddae_diffusers.probing.cache"]


def unit_names(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def two_columns(cifar16):
    """The same rows with a second, different image column (the images mirrored)."""
    return cifar16.map(lambda row: {"mirrored": row["img"].transpose(0)})


# Everything that changes a feature, changed alone: each must miss the cache (a new unit).
KEY_CHANGES = {
    "image column": dict(image_column="mirrored"),
    "resolution": dict(resolution=8),
    "noise seed": dict(seed=4),
    "view": dict(view=View(0, 1, True)),
    "augmentation": dict(view=View(0, 0, False)),
    "dtype": dict(dtype=torch.bfloat16),
    "noise level": dict(timesteps=[50]),
    "layers": dict(layers=LAYERS[:1]),
    "rows": dict(rows=range(8)),
    "weights": dict(weights=1),
}


@pytest.fixture(scope="module")
def any_size_backbone():
    """A UNet without a fixed sample size, so that the resolution can change alone."""
    return DDAEBackbone(make_tiny_unet(sample_size=None))


@pytest.mark.parametrize("change", list(KEY_CHANGES))
def test_every_feature_setting_is_in_the_cache_key(change, any_size_backbone, two_columns, tmp_path):
    extract(any_size_backbone, two_columns, tmp_path)
    before = unit_names(tmp_path)
    settings = dict(KEY_CHANGES[change])
    dataset = two_columns.select(settings.pop("rows")) if "rows" in settings else two_columns
    model = any_size_backbone
    if "weights" in settings:
        model = DDAEBackbone(make_tiny_unet(seed=settings.pop("weights"), sample_size=None))
    extract(model, dataset, tmp_path, **settings)
    assert len(unit_names(tmp_path) - before) == 1
    extract(any_size_backbone, two_columns, tmp_path)  # the original settings still hit their own unit
    assert len(unit_names(tmp_path) - before) == 1


# ------------------------------------------------------------------ training: non-finite weights are never saved
@pytest.mark.parametrize("learning_rate", ["1e30", "1e9"])
def test_diverged_training_saves_nothing_non_finite(learning_rate, tmp_path):
    from safetensors.torch import load_file
    from test_train_unconditional import run

    from ddae_diffusers.pretraining.training_step import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"Start over with a lower --learning_rate"):
        run(tmp_path, "--max_train_steps", "4", "--checkpointing_steps", "1", "--learning_rate", learning_rate,
            "--lr_scheduler", "constant", "--probe_every_n_steps", "0", "--use_ema")
    out = tmp_path / "out"
    assert not (out / "model_index.json").exists()
    for checkpoint in out.glob("checkpoint-*"):
        for file in checkpoint.glob("*.safetensors"):
            assert all(torch.isfinite(w).all() for w in load_file(file).values()), file


def test_resume_with_another_learning_rate_is_refused(tmp_path):
    from test_train_unconditional import run

    from ddae_diffusers.errors import UsageError

    run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "1", "--probe_every_n_steps", "0",
        "--learning_rate", "1e-4", "--lr_scheduler", "constant")
    with pytest.raises(UsageError, match=r"--learning_rate 0.001 differs from the 0.0001 of .*checkpoint-2"):
        run(tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "1", "--probe_every_n_steps", "0",
            "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--resume_from_checkpoint", "latest")


# ------------------------------------------------------------------ non-finite inputs and weights are refused
def test_nan_pixel_is_refused_naming_the_image(backbone):
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    images[1, 0, 4, 4] = float("nan")
    with pytest.raises(ValueError, match="first in image 1 of the batch"):
        backbone.features(images, LAYERS, [10])


def test_nan_weight_is_refused_naming_layer_and_example(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler

    from ddae_diffusers.probing.cli import console_main

    unet = make_tiny_unet()
    with torch.no_grad():
        unet.mid_block.resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"features of 'mid_block' at t=10 are NaN or inf for example 5"):
        DDAEBackbone(unet).features(torch.zeros(2, 3, 16, 16), ["mid_block"], [10], example_ids=[5, 6])
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "nan-model")
    from conftest import CIFAR10_SAMPLE

    out = tmp_path / "probe"
    with pytest.raises(SystemExit) as exit_info:
        console_main(["--model", str(tmp_path / "nan-model"), "--dataset", CIFAR10_SAMPLE, "--train_split",
                      "train[:40]", "--eval_split", "test[:20]", "--layers", "mid_block", "--timesteps", "10",
                      "--output_dir", str(out)])
    assert exit_info.value.code == 2
    assert "NaN or inf" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (out / "results.json").exists() and not (out / "heads.safetensors").exists()


# ------------------------------------------------------------------ damaged model files are named in one line
MODEL_FAULTS = [
    (empty, "unet/diffusion_pytorch_model.safetensors", "Cannot load the unet of"),
    (truncate_half, "unet/diffusion_pytorch_model.safetensors", "truncated or corrupt"),
    (garbage, "unet/diffusion_pytorch_model.safetensors", "truncated or corrupt"),
    (empty, "model_index.json", "model_index.json is not valid JSON"),
    (garbage, "unet/config.json", "unet/config.json' is not a valid JSON file"),
    (truncate_half, "scheduler/scheduler_config.json", "scheduler_config.json' is not a valid JSON file"),
]


@pytest.mark.parametrize(("fault", "target", "message"), MODEL_FAULTS,
                         ids=[f"{f.__name__}:{t}" for f, t, _ in MODEL_FAULTS])
def test_damaged_model_file_is_one_line_naming_it(fault, target, message, tiny_unet_pipeline_dir, tmp_path, capsys):
    import shutil

    from conftest import CIFAR10_SAMPLE

    from ddae_diffusers.probing.cli import console_main

    model = tmp_path / "model"
    shutil.copytree(tiny_unet_pipeline_dir, model)
    fault(model / target)
    out = tmp_path / "probe"
    with pytest.raises(SystemExit) as exit_info:
        console_main(["--model", str(model), "--dataset", CIFAR10_SAMPLE, "--output_dir", str(out)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and line.startswith("ddae-probe: error: ") and message in line, line
    assert not (out / "results.json").exists()


# ------------------------------------------------------------------ a probe folder is always one whole run
class Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def kill(*args, **kwargs):
    raise Killed


# (where the run dies, what is patched to die there); the first run into the folder always completes.
PROBE_KILLS = {
    "extracting features": ("ddae_diffusers.probing.cache.FeatureCache._compute", True),
    "training heads": ("ddae_diffusers.probing.engine.train_heads", True),
    "writing results.json (after the other files)": ("ddae_diffusers.probing.result.ProbeResult.save", False),
}


@pytest.mark.parametrize("stage", list(PROBE_KILLS))
def test_killed_probe_leaves_one_whole_run(stage, tiny_unet_pipeline_dir, tmp_path, monkeypatch):
    from unittest import mock

    from conftest import CIFAR10_SAMPLE

    from ddae_diffusers import DDAEForImageClassification, DDAEPipeline
    from ddae_diffusers.probing.cli import main as probe
    from ddae_diffusers.probing.result import ProbeResult

    out = tmp_path / "probe"
    common = ["--model", tiny_unet_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--train_split", "train[:60]",
              "--eval_split", "test[:30]", "--layers", "mid_block", "--epochs", "2", "--output_dir", str(out),
              "--cache_dir", str(tmp_path / "cache")]
    first = probe([*common, "--timesteps", "10"])
    target, old_run_survives = PROBE_KILLS[stage]
    with mock.patch(target, kill), pytest.raises(Killed):
        probe([*common, "--timesteps", "50"])  # another grid into the same folder, killed on the way
    if old_run_survives:  # nothing of the new run was written: the old run is whole and loads
        assert ProbeResult.load(out).best_cell().timestep == first["best"]["timestep"] == 10
        DDAEForImageClassification.from_probe(out)
    else:  # the new heads are in place beside the old results.json: refused by every reader
        for load in (ProbeResult.load, DDAEForImageClassification.from_probe,
                     lambda folder: DDAEPipeline.from_pretrained(tiny_unet_pipeline_dir, classifier=str(folder))):
            with pytest.raises(ValueError, match="do not belong together"):
                load(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".report.")]  # no staging folder left behind
    again = probe([*common, "--timesteps", "50"])  # a rerun heals the folder
    assert ProbeResult.load(out).best_cell().timestep == again["best"]["timestep"] == 50


# ------------------------------------------------------------------ surprising inputs: refused, or said in one line
def test_evaluating_on_the_training_split_is_refused(tiny_unet_pipeline_dir, tmp_path):
    from conftest import CIFAR10_SAMPLE

    from ddae_diffusers.probing.engine import ProbeConfig, prepare

    config = ProbeConfig(model=tiny_unet_pipeline_dir, dataset=CIFAR10_SAMPLE, output_dir=str(tmp_path),
                         train_split="train[:40]", eval_split="train[:40]")
    with pytest.raises(ValueError, match="is the training split"):
        prepare(config)


def test_converted_images_are_said_in_one_line(tiny_unet_pipeline_dir, cifar_small, tmp_path, caplog):
    """Grayscale 32x32 images for a 16x16 RGB model: converted and resized, and the log says so."""
    from ddae_diffusers.probing.engine import ProbeConfig, prepare

    gray = cifar_small.select(range(40)).map(lambda row: {"img": row["img"].convert("L")})
    folder = tmp_path / "gray"
    for split, rows in (("train", range(30)), ("test", range(30, 40))):
        (folder / "data").mkdir(parents=True, exist_ok=True)
        gray.select(rows).to_parquet(str(folder / "data" / f"{split}-00000.parquet"))
    config = ProbeConfig(model=tiny_unet_pipeline_dir, dataset=str(folder), output_dir=str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING, logger="ddae_diffusers.probing.engine"):
        prepare(config)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "ddae_diffusers.probing.engine"]
    assert "32x32 L images are converted from L to RGB and resized" in line and "to 16x16" in line


@pytest.mark.parametrize("fault", [empty, truncate_half, garbage], ids=lambda f: f.__name__)
# (random_states_0.pkl is not needed: every step reseeds from --seed and its index, so accelerate's warning on a
# damaged one is harmless.)
@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.bin", "scheduler.bin"])
def test_damaged_checkpoint_is_named_with_the_fix(fault, target, tmp_path):
    from test_train_unconditional import run

    from ddae_diffusers.errors import UsageError

    run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "1", "--probe_every_n_steps", "0")
    fault(tmp_path / "out" / "checkpoint-2" / target)
    with pytest.raises(UsageError, match=r"checkpoint-2 is damaged .*resume from an earlier checkpoint-N"):
        run(tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "1", "--probe_every_n_steps", "0",
            "--resume_from_checkpoint", "latest")


# ------------------------------------------------------------------ two runs on one cache at once
def test_concurrent_probes_share_one_cache_safely(tiny_unet_pipeline_dir, tmp_path):
    """Two ddae-probe processes (same model) and a third (another model) on one --cache_dir at the same time:
    all finish, each result equals a run on a private cache, and the shared cache is complete afterwards."""
    import json
    import subprocess
    import sys

    from conftest import CIFAR10_SAMPLE
    from diffusers import DDPMPipeline, DDPMScheduler

    from ddae_diffusers.probing.engine import ProbeConfig, run_probe

    other = tmp_path / "other-model"
    DDPMPipeline(unet=make_tiny_unet(seed=5), scheduler=DDPMScheduler()).save_pretrained(other)
    grid = ["--dataset", CIFAR10_SAMPLE, "--train_split", "train[:96]", "--eval_split", "test[:48]",
            "--layers", "mid_block", "--timesteps", "10", "50", "--batch_size", "8", "--epochs", "3"]
    probe = os.path.join(os.path.dirname(sys.executable), "ddae-probe")
    shared = tmp_path / "shared-cache"
    runs = {name: (model, tmp_path / name) for name, model in
            [("a", tiny_unet_pipeline_dir), ("b", tiny_unet_pipeline_dir), ("c", str(other))]}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([probe, "--model", model, *grid, "--output_dir", str(out), "--cache_dir", str(shared)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for model, out in runs.values()]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]

    def cells(folder: Path) -> list:
        return [(c["layer"], c["timestep"], c["linear_acc"], c["knn_acc"])
                for c in json.loads((folder / "results.json").read_text())["cells"]]

    assert cells(runs["a"][1]) == cells(runs["b"][1])
    for name in ("a", "c"):
        model, out = runs[name]
        private = tmp_path / f"private-{name}"
        subprocess.run([probe, "--model", model, *grid, "--output_dir", str(private)], env=env, check=True,
                       capture_output=True)
        assert cells(out) == cells(private), name
    computed = []
    config = ProbeConfig(model=tiny_unet_pipeline_dir, dataset=CIFAR10_SAMPLE, output_dir=str(tmp_path / "again"),
                         cache_dir=str(shared), train_split="train[:96]", eval_split="test[:48]", layers=["mid_block"],
                         timesteps=[10, 50], batch_size=8, epochs=3)
    run_probe(config, on_batch=lambda start, stop: computed.append((start, stop)), progress=False)
    assert computed == []  # every unit the concurrent runs wrote is complete and valid


def test_nan_classifier_is_refused_by_the_pipeline():
    from ddae_diffusers import DDAEForImageClassification, DDAEPipeline

    unet = make_tiny_unet()
    classifier = DDAEForImageClassification.from_diffusers(unet, layer="mid_block", num_labels=3)
    with torch.no_grad():
        classifier.classifier.weight[0, 0] = float("nan")
    pipe = DDAEPipeline(unet=unet, classifier=classifier)
    with pytest.raises(ValueError, match="logits are NaN or inf for image 0"):
        pipe.classify(torch.rand(2, 3, 16, 16) * 2 - 1)


@pytest.mark.slow
def test_two_process_groups_fill_one_cache_like_two_machines(tiny_unet_pipeline_dir, tmp_path):
    """Two `accelerate launch` groups of two processes each (two machines sharing a --cache_dir) probe the same grid
    at once: both finish with the result of a run on a private cache, and the shared cache is complete after."""
    import json
    import subprocess
    import sys

    from conftest import CIFAR10_SAMPLE

    grid = ["--dataset", CIFAR10_SAMPLE, "--train_split", "train[:160]", "--eval_split", "test[:64]",
            "--layers", "mid_block", "--timesteps", "10", "50", "--batch_size", "8", "--epochs", "3"]
    shared = tmp_path / "shared-cache"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def group(port: int, out: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
                   "--dynamo_backend", "no", "-m", "ddae_diffusers.probing.cli", "--model", tiny_unet_pipeline_dir,
                   *grid, "--output_dir", str(out), "--cache_dir", str(shared)]  # fmt: skip
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    groups = [group(29517, tmp_path / "a"), group(29519, tmp_path / "b")]
    for proc in groups:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]

    def cells(folder: Path) -> list:
        return [(c["layer"], c["timestep"], c["linear_acc"], c["knn_acc"])
                for c in json.loads((folder / "results.json").read_text())["cells"]]

    private = tmp_path / "private"
    subprocess.run([sys.executable, "-m", "ddae_diffusers.probing.cli", "--model", tiny_unet_pipeline_dir, *grid,
                    "--output_dir", str(private)], env=env, check=True, capture_output=True)  # fmt: skip
    assert cells(tmp_path / "a") == cells(tmp_path / "b") == cells(private)
    computed = []
    config = ProbeConfig(model=tiny_unet_pipeline_dir, dataset=CIFAR10_SAMPLE, output_dir=str(tmp_path / "again"),
                         cache_dir=str(shared), train_split="train[:160]", eval_split="test[:64]",
                         layers=["mid_block"], timesteps=[10, 50], batch_size=8, epochs=3)  # fmt: skip
    run_probe(config, on_batch=lambda start, stop: computed.append((start, stop)), progress=False)
    assert computed == []  # every unit the two groups wrote is complete and valid
