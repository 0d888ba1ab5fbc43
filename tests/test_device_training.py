"""Pretraining and the probe run off the CPU: the EMA follows the model to its device, the feature cache records the
kernels' device, and the other ranks wait for the main process without a collective timeout.

No GPU here: the ``meta`` device stands in for CUDA where values are not needed (a CPU tensor mixed with a meta
tensor raises as one mixed with a CUDA tensor does), and two CPU processes with a short process-group timeout stand
in for NCCL's watchdog.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from accelerate import PartialState
from accelerate.checkpointing import load_custom_state, save_custom_state
from conftest import make_tiny_unet
from device_harness import launch_two_processes
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.pretraining.training_step import ema_step
from ddae_diffusers.probing.cache import FeatureCache, View, kernel_settings, weights_fingerprint


def test_meta_stands_in_for_a_second_device():
    with pytest.raises(RuntimeError):
        torch.ones(3) - torch.ones(3, device="meta")


def test_ema_built_before_the_model_moved_follows_it():
    model = make_tiny_unet()
    stale = EMAModel(model.parameters())  # on the CPU, as an EMA built before accelerator.prepare
    ema = EMAModel(model.parameters())
    model.to("meta")
    with pytest.raises(RuntimeError):
        stale.step(model.parameters())
    ema_step(ema, model)
    assert {p.device.type for p in ema.shadow_params} == {"meta"}
    assert ema.optimization_step == 1


def test_ema_resumed_from_a_checkpoint_follows_the_model(tmp_path):
    PartialState()  # accelerate's checkpoint helpers log through its state
    model = make_tiny_unet()
    ema = EMAModel(model.parameters())
    ema_step(ema, model)
    save_custom_state(ema, str(tmp_path))
    model.to("meta")
    resumed = EMAModel(model.parameters())
    load_custom_state(resumed, str(tmp_path))  # what accelerator.load_state does: the state lands on the CPU
    assert {p.device.type for p in resumed.shadow_params} == {"cpu"}
    ema_step(resumed, model)
    assert {p.device.type for p in resumed.shadow_params} == {"meta"}
    assert resumed.optimization_step == 2


def test_cache_units_of_another_device_or_tf32_setting_are_others(tmp_path):
    backbone = DDAEBackbone(make_tiny_unet(), DDPMScheduler())
    weights = weights_fingerprint(backbone)
    layers = backbone.layer_names()[:1]

    def folders(backbone: DDAEBackbone) -> list[str]:
        cache = FeatureCache(str(tmp_path), backbone, layers, [10], 16, seed=0, weights=weights)
        return [unit.folder for unit in cache.units([0] * 4, "train", View(0, 0, False), "img")]

    on_cpu = folders(backbone)
    assert folders(backbone) == on_cpu
    moved = DDAEBackbone(make_tiny_unet().to("meta"), DDPMScheduler())
    assert folders(moved) != on_cpu

    before = torch.backends.cuda.matmul.fp32_precision
    cuda = kernel_settings(torch.device("cuda"))
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee" if before == "tf32" else "tf32"  # TF32 matmuls on/off
        assert kernel_settings(torch.device("cuda")) != cuda
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert kernel_settings(torch.device("cuda")) == cuda
    assert kernel_settings(torch.device("cpu"))["device"] == "cpu"


WAITER = """
import sys, time
from datetime import timedelta
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from ddae_diffusers.distributed import broadcast_from_main, host_group, wait_for_main

accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=10))])
host_group()
if accelerator.is_main_process:
    time.sleep(20)  # the main process works longer than the process group's timeout
wait_for_main(accelerator)
value = broadcast_from_main(accelerator.num_processes * 10 if accelerator.is_main_process else None, accelerator)
print("rank", accelerator.process_index, "got", value)
"""


@pytest.mark.slow  # intermittent: about 1 run in 3 here the main process aborts (SIGABRT), cause not yet found
def test_other_ranks_wait_for_the_main_process_past_the_collective_timeout(tmp_path):
    script = tmp_path / "waiter.py"
    script.write_text(textwrap.dedent(WAITER))
    done = launch_two_processes(str(script), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank")) == [
        "rank 0 got 20",
        "rank 1 got 20",
    ]
