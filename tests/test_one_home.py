"""Rules with one home each: the label of a noise level, EDM's sampling steps, the default layer, kNN's k and
temperature, the probe's flag checks, the pretraining summary and the named view roles."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import types

import datasets
import pytest
import torch
from conftest import CIFAR10_SAMPLE, make_tiny_unet
from ddae_diffusers.pipelines import DDAEPipeline
from diffusers import DDPMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler
from test_train_unconditional import train_unconditional

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.errors import UsageError
from ddae_diffusers.modelcard import PretrainingSummary, pipeline_model_card, pretraining_model_card, sampling_steps
from ddae_diffusers.noise import EDM_SAMPLING_STEPS, EDMNoise, axis_class, noise_axis
from ddae_diffusers.pretraining.monitor import ProbeHistory
from ddae_diffusers.probing import cli as probe_cli
from ddae_diffusers.probing.cache import EVAL_VIEW, FeatureCache, View, ViewRole
from ddae_diffusers.probing.engine import DTYPES, PROTOCOLS, RECIPES, SEARCHES, TRAIN_AUGMENTS, ProbeConfig
from ddae_diffusers.probing.fused import HEAD_KINDS
from ddae_diffusers.probing.heads import NORMALIZATIONS
from ddae_diffusers.probing.knn import KNN_K, KNN_TEMPERATURE, knn_accuracies, knn_accuracy, knn_predict
from ddae_diffusers.probing.report import level_unit
from ddae_diffusers.probing.result import cell_key, parse_cell_key

AXES = {
    "ddpm": (DDPMScheduler(num_train_timesteps=1000), 10, "t=10", "diffusers timestep 10 (the paper's t=11; "),
    "edm": (EDMEulerScheduler(), 0.06, "sigma=0.06", "sigma 0.06 (EDM; a variance-exploding sigma)"),
    "flow": (FlowMatchEulerDiscreteScheduler(), 0.05, "sigma=0.05", "flow-matching sigma 0.05 (variance-exploding "),
}


# ------------------------------------------------------------------ the label of a noise level
@pytest.mark.parametrize("objective", list(AXES))
def test_each_noise_axis_labels_its_levels(objective):
    scheduler, level, label, text = AXES[objective]
    axis = noise_axis(scheduler)
    assert axis.objective == objective and type(axis) is axis_class(objective)
    assert axis.label(level) == axis_class(objective).label(level) == label  # with or without the scheduler
    assert axis.level_text(level).startswith(text)
    assert level_unit({"objective": objective}) == axis.unit
    # a label writes the level as its cell key does: it reads back as the same level
    assert parse_cell_key(cell_key("mid_block", level)) == ("mid_block", level)
    assert label.split("=", 1)[1] == cell_key("mid_block", level).split("@", 1)[1]


def test_a_whole_sigma_stays_a_sigma_and_old_results_are_ddpm():
    assert axis_class("edm").label(10.0) == "sigma=10.0"  # "sigma=10" would read back as DDPM timestep 10
    assert level_unit({}) == "t"
    with pytest.raises(UsageError, match="Unknown objective 'vp': use one of ddpm, edm, flow"):
        axis_class("vp")


# ------------------------------------------------------------------ EDM's sampling steps, the default layer
def test_edm_sampling_steps_come_from_the_noise_axis():
    assert sampling_steps("edm") == EDM_SAMPLING_STEPS == 18 and sampling_steps("ddpm") == 50
    assert inspect.signature(EDMNoise.sigma_at_index).parameters["num_steps"].default == EDM_SAMPLING_STEPS
    card = pipeline_model_card(DDAEPipeline(unet=make_tiny_unet(), scheduler=EDMEulerScheduler()))
    assert f"num_inference_steps={EDM_SAMPLING_STEPS}" in card.content


def test_pipeline_card_shows_the_familys_default_layer():
    pipe = DDAEPipeline(unet=make_tiny_unet(), scheduler=DDPMScheduler())
    layer = pipe.backbone.default_layer()
    assert layer == pipe.backbone.family.default_layer(pipe.unet)
    assert f'layers=["{layer}"], timesteps=[10]' in pipeline_model_card(pipe).content


# ------------------------------------------------------------------ kNN's k and temperature, the class count
def test_knn_defaults_are_the_module_constants():
    for function in (knn_accuracies, knn_accuracy, knn_predict):
        parameters = inspect.signature(function).parameters
        assert parameters["k"].default == KNN_K and parameters["temperature"].default == KNN_TEMPERATURE


def test_knn_accuracies_take_the_runs_class_count():
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(40, 8, generator=generator), torch.randn(20, 8, generator=generator)
    bank_labels, query_labels = torch.arange(40) % 3, torch.arange(20) % 3
    derived = knn_accuracies({"x": bank}, bank_labels, {"x": queries}, query_labels)
    given = knn_accuracies({"x": bank}, bank_labels, {"x": queries}, query_labels, num_classes=10)
    assert derived == given  # classes no row holds get no votes


# ------------------------------------------------------------------ ProbeConfig checks its own flags
FLAG_MISTAKES = {
    "seed": ({"seed": -1}, ["--seed", "-1"]),
    "halving": ({"search": "halving", "halving_eta": 1}, ["--search", "halving", "--halving_eta", "1"]),
    "fused_online": ({"fused_probes": True, "protocol": "online"}, ["--fused_probes", "--protocol", "online"]),
    "levels_twice": ({"timesteps": [10], "sigma_index": [4]}, ["--timesteps", "10", "--sigma_index", "4"]),
    "views": ({"train_views": 0}, ["--train_views", "0"]),
    "lrs": ({"lrs": [-1.0]}, ["--lrs", "-1"]),
}


@pytest.mark.parametrize("case", list(FLAG_MISTAKES))
def test_probe_config_rejects_a_bad_flag_as_the_command_does(case, tiny_unet_pipeline_dir, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.delenv("DDAE_TRACEBACK", raising=False)
    fields, flags = FLAG_MISTAKES[case]
    out = tmp_path / "out"
    with pytest.raises(UsageError) as from_python:
        ProbeConfig(model=tiny_unet_pipeline_dir, dataset=CIFAR10_SAMPLE, output_dir=str(out), **fields)
    argv = ["--model", tiny_unet_pipeline_dir, "--dataset", CIFAR10_SAMPLE, "--output_dir", str(out), *flags]
    with pytest.raises(SystemExit) as exit_info:
        probe_cli.console_main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"ddae-probe: error: {from_python.value}"
    assert not out.exists()


def test_choices_have_one_home():
    with pytest.raises(UsageError, match=r"--protocol must be one of \('cached', 'online'\), got 'bogus'"):
        ProbeConfig(model="m", dataset="d", output_dir="o", protocol="bogus")
    choices = {action.dest: action.choices for action in probe_cli.build_parser()._actions if action.choices}
    assert choices == {
        "train_augment": TRAIN_AUGMENTS, "normalization": NORMALIZATIONS, "recipe": RECIPES, "protocol": PROTOCOLS,
        "dtype": list(DTYPES), "fused_head": HEAD_KINDS, "search": SEARCHES,
    }


# ------------------------------------------------------------------ the pretraining summary
def _summary(**changes) -> PretrainingSummary:
    fields = dict(
        model_name="ddae-tiny", model_class="UNet2DModel", num_params=2_587_491, dataset="data/cifar10-sample",
        hub_dataset=None, command="train_unconditional.py --objective edm", steps=6, images_seen=48,
        wall_time_s=95.0, total_batch_size=8, mixed_precision="no", objective="edm", probe_layer="mid_block",
        probe_timestep=0.05995, probe_level_text="sigma 0.05995 (EDM; a variance-exploding sigma)",
        probe_description="60 images of split 'train', 40 of split 'test'",
        history=[{"step": 6, "images_seen": 48, "knn_acc": 0.25, "linear_acc": 0.3}],
        best={"step": 6, "metric": "linear_acc", "value": 0.3}, use_ema=True, repo_or_path="out",
    )
    return PretrainingSummary(**{**fields, **changes})


def test_pretraining_summary_round_trips_and_is_what_the_card_shows():
    summary = _summary()
    assert PretrainingSummary(**json.loads(json.dumps(dataclasses.asdict(summary)))) == summary
    card = pretraining_model_card(summary).content
    assert "at sigma 0.05995 (EDM; a variance-exploding sigma), the EMA weights." in card
    assert "| 6 | 48 | 0.2500 | 0.3000 |" in card  # no test-set size: no interval
    with_n = pretraining_model_card(_summary(probe_eval_images=40)).content
    assert "95% Wilson interval over the 40 test images" in with_n
    assert "| 6 | 48 | 0.2500 [0.1419, 0.4019] | 0.3000 [0.1807, 0.4543] |" in with_n
    assert f"kNN (k={KNN_K}, cosine)" in card and f"num_inference_steps={EDM_SAMPLING_STEPS}" in card
    assert "| 6 | 48 | 0.2500 | 0.3000 |" in card and "| wall time | 1m 35s |" in card


def test_the_training_script_builds_the_summary_from_the_runs_state(tmp_path):
    denoiser = make_tiny_unet()
    backbone = DDAEBackbone(denoiser, DDPMScheduler(num_train_timesteps=1000))
    args = argparse.Namespace(output_dir=str(tmp_path / "ddae-tiny"), dataset_name=CIFAR10_SAMPLE, train_data_dir=None,
                              command="train_unconditional.py ...", probe_timestep=10)
    state = train_unconditional.TrainState()
    state.global_step, state.images_seen, state.wall_time = 6, 48, 12.5
    history = ProbeHistory()
    history.add(6, 48, {"knn_acc": 0.25})
    summary = train_unconditional.pretraining_summary(
        args, denoiser, backbone, state, history, None, backbone.default_layer(), 8, "no", False, None
    )
    assert summary.model_name == "ddae-tiny" and summary.hub_dataset is None and summary.objective == "ddpm"
    assert (summary.steps, summary.images_seen, summary.wall_time_s) == (6, 48, 12.5)
    assert summary.probe_level_text == backbone.noise_axis.level_text(10)
    assert summary.probe_description == "probe monitor off" and summary.best["metric"] == "knn_acc"
    history.add(7, 56, {"knn_acc": 0.5})
    assert len(summary.history) == 1  # the summary holds its own copy of the records
    assert "the paper's t=11" in pretraining_model_card(summary).content


# ------------------------------------------------------------------ named view roles, unchanged cache keys
def test_view_roles_are_named_and_cache_folders_unchanged(tmp_path):
    assert View(0, 0, False).role is ViewRole.TRAIN and EVAL_VIEW == View(1, 0, False)
    assert EVAL_VIEW.role is ViewRole.EVAL and View(2, 3, True).role is ViewRole.ONLINE
    backbone = DDAEBackbone(make_tiny_unet(), DDPMScheduler(num_train_timesteps=1000))
    data = datasets.load_dataset(CIFAR10_SAMPLE, split="test").select(range(4))
    cache = FeatureCache(str(tmp_path), backbone, ["mid_block"], [10], 16, seed=0)
    for role, index, augment in ((0, 0, False), (0, 2, True), (1, 0, False)):
        plain = types.SimpleNamespace(role=role, index=index, augment=augment)  # what the key was built from
        named = [os.path.basename(unit.folder) for unit in cache.units(data, "x", View(role, index, augment), "img")]
        assert named == [os.path.basename(unit.folder) for unit in cache.units(data, "x", plain, "img")]
        assert named[0].startswith(f"{'train' if role == 0 else 'eval'}-v{index}-t10-")
        assert View(role, index, augment).noise_seed(0) == View(ViewRole(role), index, augment).noise_seed(0)
