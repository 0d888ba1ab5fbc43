"""training/train_unconditional.py: real runs on tiny models and real CIFAR-10 images.

In-process runs call ``main(parse_args([...]))``; the resume (SIGKILL) and 2-process tests start the
script as real subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import CIFAR10_SAMPLE, REPO_ROOT, TINY_DIT_CONFIG, make_tiny_unet, save_tiny_resnet
from ddae_diffusers.pipelines import DDAEPipeline
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoUrl
from safetensors.torch import load_file

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.pretraining.tracking import read_jsonl
from ddae_diffusers.pretraining.training_step import NonFiniteLossError, train_step

SCRIPT = REPO_ROOT / "training" / "train_unconditional.py"
_spec = importlib.util.spec_from_file_location("train_unconditional", SCRIPT)
train_unconditional = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_unconditional)

# 64 CIFAR-10 images, ddpm-tiny (2.6M, dropout 0.1), small probe subsets.
BASE = [
    "--dataset_name", CIFAR10_SAMPLE, "--max_train_samples", "64", "--model_config", "ddpm-tiny",
    "--train_batch_size", "8", "--lr_warmup_steps", "0", "--save_images_epochs", "0",
    "--probe_train_samples", "60", "--probe_eval_samples", "40", "--probe_linear_epochs", "10",
]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator (mixed precision differs between tests)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(tmp_path, *extra: str, name: str = "out") -> str:
    out = str(tmp_path / name)
    return train_unconditional.main(train_unconditional.parse_args([*BASE, "--output_dir", out, *extra]))


def metrics(out: str) -> list[dict]:
    return read_jsonl(os.path.join(out, "logs", "train_unconditional", "metrics.jsonl"))


def test_loss_falls_when_overfitting_a_fixed_batch(cifar_small):
    """The script's train_step (bf16 autocast) drives the loss on one fixed batch and noise down."""
    from ddae_diffusers.data import images_to_tensor

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = make_tiny_unet(sample_size=16).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    batch = images_to_tensor(cifar_small[:8]["img"], 16)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    losses = []
    for _ in range(40):
        generator = torch.Generator().manual_seed(0)  # same noise and timesteps every step
        losses.append(train_step(accelerator, model, optimizer, lr_scheduler, scheduler, batch, generator).item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_unet_run_outputs_probe_history_and_card(tmp_path):
    out = run(tmp_path, "--max_train_steps", "6", "--checkpointing_steps", "3", "--probe_every_n_steps", "2",
              "--use_ema", "--mixed_precision", "no", "--learning_rate", "1e-3")
    # The pipeline loads in diffusers and in the capture core, with the EMA weights.
    pipeline = DDPMPipeline.from_pretrained(out)
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    backbone = DDAEBackbone.from_pretrained(out)
    assert isinstance(backbone.denoiser, UNet2DModel)
    raw = load_file(os.path.join(out, "checkpoint-6", "model.safetensors"))
    ema_state = torch.load(os.path.join(out, "checkpoint-6", "custom_checkpoint_2.pkl"), weights_only=False)
    saved = dict(pipeline.unet.named_parameters())
    names = [n for n, _ in pipeline.unet.named_parameters()]
    torch.testing.assert_close(saved[names[0]].data, ema_state["shadow_params"][0])
    assert not torch.allclose(saved[names[0]].data, raw[names[0]])  # EMA, not the raw weights

    # Probe numbers are logged at steps 2, 4, 6 and are not all the same.
    probes = [r for r in metrics(out) if "probe/knn_acc" in r]
    assert [r["step"] for r in probes] == [2, 4, 6]
    values = {(r["probe/knn_acc"], r["probe/linear_acc"]) for r in probes}
    assert all(0.0 <= a <= 1.0 and 0.0 <= b <= 1.0 for a, b in values)
    assert len(values) > 1, probes
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))

    # best-probe/ is a loadable pipeline; the card has the command, steps, images seen and history.
    assert isinstance(DDAEBackbone.from_pretrained(os.path.join(out, "best-probe")).denoiser, UNet2DModel)
    card = open(os.path.join(out, "README.md")).read()
    assert "library_name: diffusers" in card and "- ddae" in card and "unconditional-image-generation" in card
    assert "--max_train_steps 6" in card and "| optimiser steps | 6 |" in card and "| images seen | 48 |" in card
    for row in probes:
        assert f"| {row['step']} | {row['step'] * 8} | {row['probe/knn_acc']:.4f} [" in card  # with its interval
    assert sorted(os.listdir(out)) == sorted(
        ["README.md", "best-probe", "checkpoint-3", "checkpoint-6", "logs", "model_index.json", "scheduler", "unet"]
    )


def test_edm_run_saves_an_edm_pipeline(tmp_path, tiny_unet_pipeline_dir):
    """--objective edm: the DDPM++ layout trains with EDM's loss; the folder is a DDAEPipeline with an
    EDMEulerScheduler that every loader reads as EDM; samples come from 18 Euler steps."""
    out = run(tmp_path, "--objective", "edm", "--model_config", "ddpmpp-tiny", "--max_train_steps", "4",
              "--checkpointing_steps", "2", "--probe_every_n_steps", "2", "--use_ema", "--learning_rate", "1e-3",
              "--save_images_epochs", "1", "--eval_batch_size", "2")
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["_class_name"] == "DDAEPipeline" and index["scheduler"] == ["diffusers", "EDMEulerScheduler"]
    scheduler_config = json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))
    assert (scheduler_config["sigma_min"], scheduler_config["sigma_max"], scheduler_config["sigma_data"]) == (
        0.002, 80.0, 0.5)
    backbone = DDAEBackbone.from_pretrained(out)
    assert backbone.objective == "edm" and backbone.denoiser.config.upsample_type == "resnet"
    assert DDAEBackbone.from_pretrained(os.path.join(out, "best-probe")).objective == "edm"
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)  # EDM's weighting: about 1 at the start
    assert [r["step"] for r in metrics(out) if "probe/knn_acc" in r] == [2, 4]
    card = open(os.path.join(out, "README.md")).read()
    assert "with EDM's objective" in card and "at sigma 0.05995" in card and "DDAEPipeline.from_pretrained" in card
    assert os.path.isfile(os.path.join(out, "samples", "epoch-0001.png"))

    continued = ["--dataset_name", CIFAR10_SAMPLE, "--max_train_samples", "16", "--objective", "edm",
                 "--pretrained_model_name_or_path", tiny_unet_pipeline_dir, "--max_train_steps", "1",
                 "--output_dir", str(tmp_path / "continued")]
    with pytest.raises(ValueError, match="is a DDPM model but --objective is edm: pass --objective ddpm"):
        train_unconditional.main(train_unconditional.parse_args(continued))


def test_dit_trains_and_loads(tmp_path):
    config = tmp_path / "dit.json"
    config.write_text(json.dumps({"_class_name": "DiTTransformer2DModel", **TINY_DIT_CONFIG}))
    out = run(tmp_path, "--model_config", str(config), "--max_train_steps", "3", "--probe_every_n_steps", "3",
              "--use_ema", "--checkpointing_steps", "10")
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert json.load(open(os.path.join(out, "model_index.json")))["_class_name"] == "DDAEPipeline"
    backbone = DDAEBackbone.from_pretrained(out)
    assert type(backbone.denoiser).__name__ == "DiTTransformer2DModel" and backbone.image_size == 8
    assert [r["step"] for r in metrics(out) if "probe/knn_acc" in r] == [3]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset_name", "/nonexistent/data"], "Give exactly one of --dataset_name"),  # with BASE's: two given
        (["--image_column", "label"], "not images"),
        (["--image_column", "picture"], "not a column"),
        (["--resolution", "30"], "multiple of 4"),
        (["--model_config", "ddpm-huge"], "Unknown model config"),
        (["--num_epochs", "1", "--max_train_steps", "3"], "not both"),
        (["--pretrained_model_name_or_path", "/nonexistent"], "not both"),
        (["--probe_layer", "up_blocks.9"], "Unknown layer"),
        (["--probe_timestep", "1000"], "out of range"),
        (["--logger", "tensorboard"], "tensorboard installed"),
        (["--probe_train_samples", "60000"], "lower it"),
        (["--probe_timestep", "0.06"], "is a float, but this is a DDPM model"),
        (["--objective", "edm", "--probe_timestep", "10"], "is an integer, but this is an EDM model"),
        (["--objective", "edm", "--probe_timestep", "200.0"], "outside this model's range"),
        (["--objective", "edm", "--prediction_type", "v_prediction"], "applies to --objective ddpm"),
        (["--objective", "edm", "--edm_sigma_min", "0"], "must be positive"),
        (["--objective", "diffusion"], "invalid choice"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, extra, message, capsys):
    if extra[:2] == ["--objective", "diffusion"]:  # argparse: exits with status 2 and one usage line
        with pytest.raises(SystemExit):
            train_unconditional.parse_args([*BASE, "--output_dir", str(tmp_path / "o"), *extra])
        assert message in capsys.readouterr().err
        return
    if extra[0] == "--dataset_name":
        args = [*BASE, "--train_data_dir", "/nonexistent", "--output_dir", str(tmp_path / "o")]
    else:
        args = [*BASE, "--output_dir", str(tmp_path / "o"), "--max_train_steps", "2", *extra]
    with pytest.raises(ValueError, match=message):
        train_unconditional.main(train_unconditional.parse_args(args))
    assert not any(n.startswith("checkpoint") or n == "unet" for n in os.listdir(tmp_path / "o")) if (
        tmp_path / "o").exists() else True


def test_missing_dataset_is_a_clear_error(tmp_path):
    args = [a if a != CIFAR10_SAMPLE else str(tmp_path / "no-such-data") for a in BASE]
    with pytest.raises(ValueError, match="is not a folder"):
        train_unconditional.main(train_unconditional.parse_args([*args, "--output_dir", str(tmp_path / "o")]))


def test_world_size_without_process_group_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but accelerate sees 1 process"):
        run(tmp_path, "--max_train_steps", "2")


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    # An absurd learning rate blows the weights up after the first update: step 2's loss is not finite.
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*checkpoint-1"):
        run(tmp_path, "--max_train_steps", "5", "--checkpointing_steps", "1", "--learning_rate", "1e30",
            "--lr_scheduler", "constant", "--probe_every_n_steps", "0")
    out = tmp_path / "out"
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1"]
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model_index.json").exists()


def test_push_to_hub_uploads_the_pipeline_without_checkpoints(tmp_path):
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["repo_id"] = repo_id
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def fake_validate_yaml(self, content, **kwargs):  # the Hub's /api/validate-yaml: parse it here
        uploaded["metadata"] = yaml.safe_load(content.split("---")[1])

    def fake_create_commit(self, repo_id, operations, **kwargs):
        uploaded["files"] = sorted(op.path_in_repo for op in operations)
        return mock.MagicMock()

    # Only the Hub's HTTP endpoints are faked: create-repo, validate-yaml and the commit (upload_folder's
    # classic path; the streamed xet path would talk to a storage server instead).
    with mock.patch("huggingface_hub.hf_api.is_xet_available", lambda: False), \
            mock.patch.object(HfApi, "create_repo", fake_create_repo), \
            mock.patch.object(HfApi, "_validate_yaml", fake_validate_yaml), \
            mock.patch.object(HfApi, "create_commit", fake_create_commit):
        run(tmp_path, "--max_train_steps", "2", "--checkpointing_steps", "1", "--probe_every_n_steps", "0",
            "--push_to_hub", "--hub_model_id", "me/ddae-tiny", "--hub_token", "hf_secret")
    assert uploaded["repo_id"] == "me/ddae-tiny"
    assert uploaded["metadata"]["library_name"] == "diffusers" and "ddae" in uploaded["metadata"]["tags"]
    files = uploaded["files"]
    assert {"README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json"} <= set(files)
    assert not [f for f in files if "checkpoint" in f or f.startswith(".")], files
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "hf_secret" not in card and "me/ddae-tiny" in card


def _script(*args: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *args]


@pytest.mark.parametrize(("objective", "precision"), [
    ("ddpm", "no"),
    # the resume mechanism is the objective's and DDPM's alike; EDM training runs in the default suite elsewhere
    pytest.param("edm", "no", marks=pytest.mark.slow),
    # bf16 autocast is emulated, so several times slower than fp32, on CPUs without avx512_bf16
    pytest.param("ddpm", "bf16", marks=pytest.mark.slow),
])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, objective, precision):
    """Kill -9 after checkpoint-4 (mid-epoch 1 of 4), resume from latest: same final (EMA) weights, same
    raw weights, same probe history as an uninterrupted run. 48 images / batch 8 / accumulation 2."""
    args = [*BASE, "--objective", objective, "--max_train_samples", "48", "--gradient_accumulation_steps", "2",
            "--max_train_steps", "12", "--checkpointing_steps", "4", "--probe_every_n_steps", "3", "--use_ema",
            "--random_flip", "--mixed_precision", precision, "--learning_rate", "1e-3", "--lr_warmup_steps", "2"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    reference = subprocess.Popen(_script(*args, "--output_dir", str(ref)), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_script(*args, "--output_dir", str(killed)), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4").is_dir():
        assert victim.poll() is None and time.time() < deadline, "the run ended before checkpoint-4"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (killed / "model_index.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(_script(*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"),
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    _, ref_err = reference.communicate()
    assert reference.returncode == 0, ref_err[-3000:]

    final_ref = UNet2DModel.from_pretrained(ref / "unet").state_dict()
    final_resumed = UNet2DModel.from_pretrained(killed / "unet").state_dict()
    for name, value in final_ref.items():
        torch.testing.assert_close(final_resumed[name], value, msg=name)
    raw_ref = load_file(ref / "checkpoint-12" / "model.safetensors")
    raw_resumed = load_file(killed / "checkpoint-12" / "model.safetensors")
    for name, value in raw_ref.items():
        torch.testing.assert_close(raw_resumed[name], value, msg=name)
    table = [line for line in (ref / "README.md").read_text().splitlines() if line.startswith("| ")]
    assert table[-4:] == [
        line for line in (killed / "README.md").read_text().splitlines() if line.startswith("| ")
    ][-4:]


@pytest.mark.parametrize(("objective", "precision"), [
    ("ddpm", "no"),
    ("edm", "no"),
    pytest.param("ddpm", "bf16", marks=pytest.mark.slow),  # emulated bf16 is slow without avx512_bf16
])
def test_two_process_gloo_run(tmp_path, objective, precision):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no", str(SCRIPT),
               *BASE, "--objective", objective, "--max_train_steps", "4", "--checkpointing_steps", "2",
               "--probe_every_n_steps", "2", "--use_ema", "--output_dir", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x 8" in result.stderr
    records = metrics(str(out))
    assert [r["images_seen"] for r in records if "loss" in r] == [16, 32, 48, 64]  # 2 processes x 8 per step
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(out / "checkpoint-4"))
    assert isinstance(DDAEPipeline.from_pretrained(out).unet, UNet2DModel)
    assert DDAEBackbone.from_pretrained(out).objective == objective
    assert [r["step"] for r in records if "probe/knn_acc" in r] == [2, 4]


@pytest.mark.slow
def test_torchrun_without_accelerate_cpu_is_refused(tmp_path):
    """The real bad launch: torchrun starts 2 processes that accelerate does not join on CPU."""
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), *BASE,
               "--max_train_steps", "2", "--output_dir", str(tmp_path / "o")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "WORLD_SIZE=2 but accelerate sees 1 process" in result.stderr
    assert not (tmp_path / "o" / "model_index.json").exists()


def test_train_data_dir_without_labels_random_crops_non_square_images(tmp_path):
    """An unlabelled imagefolder of 40x24 RGBA/grayscale PNGs: resized, randomly cropped, probe monitor off."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        mode = "L" if i % 2 else "RGBA"
        channels = 1 if mode == "L" else 4
        pixels = rng.integers(0, 256, (24, 40, channels), dtype=np.uint8).squeeze()
        Image.fromarray(pixels, mode).save(folder / f"{i}.png")
    out = str(tmp_path / "out")
    args = ["--train_data_dir", str(folder), "--model_config", "ddpm-tiny", "--resolution", "16",
            "--train_batch_size", "4", "--max_train_steps", "3", "--save_images_epochs", "0",
            "--lr_warmup_steps", "0", "--output_dir", out]
    train_unconditional.main(train_unconditional.parse_args(args))
    records = metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert not any("probe/knn_acc" in r for r in records)
    assert DDAEBackbone.from_pretrained(out).image_size == 16
    assert "No probe was run." in open(os.path.join(out, "README.md")).read()


def test_time_budget_stops_with_a_final_probe_and_save(tmp_path):
    out = run(tmp_path, "--max_train_steps", "100000", "--max_train_minutes", "0.02", "--probe_every_n_steps",
              "1000", "--mixed_precision", "no", "--checkpointing_steps", "1000")  # fmt: skip
    steps = [r for r in metrics(out) if "loss" in r]
    assert 1 <= len(steps) < 100000 and steps[-1]["step"] == len(steps)
    probes = [r for r in metrics(out) if "probe/linear_acc" in r]
    assert [r["step"] for r in probes] == [steps[-1]["step"]]  # the last step is probed, as at max_train_steps
    assert isinstance(DDAEBackbone.from_pretrained(out).denoiser, UNet2DModel)  # the final pipeline is saved
    assert f"| optimiser steps | {len(steps)} |" in open(os.path.join(out, "README.md")).read()


# ---------------------------------------------------------------------------------------------- generation score
@pytest.fixture(scope="module")
def feature_model_dir(tmp_path_factory) -> str:
    """A tiny real ResNetForImageClassification (16 penultimate features) with its image processor."""
    return save_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"))


def fid_flags(feature_model_dir: str, cache: str) -> list[str]:
    return ["--fid_every_n_steps", "2", "--fid_num_samples", "6", "--fid_num_inference_steps", "2",
            "--fid_reference_samples", "20", "--fid_kid_subset_size", "4", "--fid_feature_model", feature_model_dir,
            "--fid_cache_dir", cache]  # fmt: skip


def test_fid_monitor_logs_scores_keeps_best_fid_and_fills_the_card(tmp_path, feature_model_dir):
    out = run(tmp_path, "--max_train_steps", "5", "--checkpointing_steps", "4", "--probe_every_n_steps", "2",
              "--use_ema", "--mixed_precision", "no", "--learning_rate", "1e-3",
              *fid_flags(feature_model_dir, str(tmp_path / "fid-cache")))  # fmt: skip
    name = f"FD_{os.path.basename(feature_model_dir)}"
    scores = [r for r in metrics(out) if f"fid/{name}" in r]
    assert [r["step"] for r in scores] == [2, 4, 5]  # every 2 steps and the last one
    values = [r[f"fid/{name}"] for r in scores]
    assert all(v > 0 and torch.isfinite(torch.tensor(v)) for v in values) and len(set(values)) == 3
    assert all(f"fid/KD_{name[3:]}_mean" in r for r in scores) and not any("fid/FID" in r for r in scores)
    assert len(os.listdir(tmp_path / "fid-cache")) == 1  # the reference features, computed once

    best_step = scores[values.index(min(values))]["step"]
    assert isinstance(DDAEBackbone.from_pretrained(os.path.join(out, "best-fid")).denoiser, UNet2DModel)
    card = open(os.path.join(out, "README.md")).read()
    assert f"| step | images seen | kNN accuracy | linear-probe accuracy | {name} |" in card
    assert f"Lowest {name}: step {best_step} ({min(values):.4g}), saved in `best-fid/`." in card
    rows = {line.split(" | ")[0][2:]: line for line in card.splitlines() if line.startswith("| ") and "[" in line}
    assert sorted(rows, key=int) == ["2", "4", "5"]  # probed and scored at the same steps: one row each
    for record in scores:
        row = rows[str(record["step"])]
        assert row.startswith(f"| {record['step']} | {record['step'] * 8} | ")
        assert row.endswith(f" {record[f'fid/{name}']:.4g} |")
    assert "6 samples (DDIMScheduler, 2 steps, seed 0) vs 20 images of split 'test'" in card
    # the score history is part of the checkpoint (registered last, after the EMA)
    saved = torch.load(os.path.join(out, "checkpoint-4", "custom_checkpoint_3.pkl"), weights_only=False)
    assert [r["step"] for r in saved["records"]] == [2, 4]


def test_fid_monitor_inputs_fail_before_training(tmp_path, feature_model_dir, monkeypatch):
    base = [*BASE, "--max_train_steps", "2", "--probe_every_n_steps", "0"]
    flags = fid_flags(feature_model_dir, str(tmp_path / "cache"))
    cases = [
        (["--fid_every_n_steps", "1"], "torch-fidelity"),  # the default Inception, without torch-fidelity
        ([*flags, "--fid_kid_subset_size", "8"], "subsets of 8"),
        ([*flags, "--fid_split", "validation"], "not a split"),
        ([*flags, "--fid_num_inference_steps", "2000"], "more than the 1000"),
        ([*flags, "--fid_num_samples", "1"], ">= 2"),
        ([*flags, "--objective", "edm", "--fid_sampler", "ddim"], "drop --fid_sampler"),
    ]
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # its import fails even where it is installed
    for index, (extra, message) in enumerate(cases):
        out = tmp_path / f"o{index}"
        with pytest.raises(ValueError, match=message):
            train_unconditional.main(train_unconditional.parse_args([*base, "--output_dir", str(out), *extra]))
        assert not out.exists() or not any(n.startswith("checkpoint") or n == "unet" for n in os.listdir(out))
    assert not (tmp_path / "cache").exists()  # no reference feature was computed


def test_two_process_run_with_fid_monitor(tmp_path, feature_model_dir):
    """Under a 2-process gloo launch the main process samples and scores while the other waits."""
    out = tmp_path / "ddp-fid"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
               *BASE, "--max_train_steps", "4", "--checkpointing_steps", "4", "--probe_every_n_steps", "0",
               "--use_ema", "--output_dir", str(out), *fid_flags(feature_model_dir, str(tmp_path / "cache"))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    name = f"FD_{os.path.basename(feature_model_dir)}"
    records = metrics(str(out))
    assert [r["step"] for r in records if f"fid/{name}" in r] == [2, 4]
    assert [r["images_seen"] for r in records if "loss" in r] == [16, 32, 48, 64]
    assert isinstance(DDAEBackbone.from_pretrained(out / "best-fid").denoiser, UNet2DModel)
