"""Command-line mistakes: one ``<prog>: error: ...`` line, exit status 2, no traceback, nothing computed.

Add a row to ``MISTAKES`` to cover a new mistake: (command, arguments, a fragment the one line must hold).
``{model}`` is a tiny diffusers pipeline folder, ``{data}`` the embedded CIFAR-10 sample.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import CIFAR10_SAMPLE, REPO_ROOT
from test_finetune_ddae import finetune
from test_train_unconditional import train_unconditional

from ddae_diffusers.errors import UsageError, run_command
from ddae_diffusers.probing import cli as probe_cli

COMMANDS = {
    "ddae-probe": probe_cli.console_main,
    "train_unconditional.py": train_unconditional.cli,
    "finetune.py": finetune.cli,
}
PROBE = ["--model", "{model}", "--dataset", "{data}", "--output_dir", "{out}"]
TRAIN = ["--dataset_name", "{data}", "--model_config", "ddpm-tiny", "--output_dir", "{out}"]
FINETUNE = ["--model_name_or_path", "{model}", "--layer", "mid_block", "--dataset_name", "{data}",
            "--output_dir", "{out}", "--use_cpu", "--report_to", "none"]


def replace(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag``'s value set to ``value`` (None drops the flag and its value)."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:] if value is None else argv[:i + 1] + [value] + argv[i + 2:]


MISTAKES = [
    ("ddae-probe", replace(PROBE, "--model", None), "the following arguments are required: --model"),
    ("ddae-probe", replace(PROBE, "--model", "examples/ddae-cifar10-cpu-typo"), "is not a folder (no such path)"),
    ("ddae-probe", replace(PROBE, "--model", "./missing-model"), "--model './missing-model' is not a folder"),
    ("ddae-probe", replace(PROBE, "--model", "~/no-such-model-here"), "is not a folder"),
    ("ddae-probe", replace(PROBE, "--model", "a/b/c"), "neither an existing folder nor a valid Hub id"),
    ("ddae-probe", replace(PROBE, "--model", "{data}"), "holds no diffusers config"),
    ("ddae-probe", replace(PROBE, "--dataset", "data/cifar10-smaple"), "--dataset 'data/cifar10-smaple' is not a"),
    ("ddae-probe", replace(PROBE, "--dataset", "uoft-cs/cifar10"), "Offline, pass a local copy"),
    ("ddae-probe", replace(PROBE, "--dataset", None), "data/cifar10-sample in this repository"),
    ("ddae-probe", [*PROBE, "--timesteps", "5000"], "out of range"),
    ("ddae-probe", [*PROBE, "--timesteps", "0.06"], "is a float, but this is a DDPM model"),
    ("ddae-probe", [*PROBE, "--timesteps", "ten"], "invalid noise_level value: 'ten'"),
    ("ddae-probe", [*PROBE, "--sigma_index", "4"], "--sigma_index indexes EDM's sampling schedule"),
    ("finetune.py", [*FINETUNE, "--timestep", "0.06"], "is a float, but this is a DDPM model"),
    ("ddae-probe", [*PROBE, "--layers", "mid_blok"], "Did you mean mid_block"),
    ("ddae-probe", [*PROBE, "--batch_size", "0"], "must be >= 1"),
    ("ddae-probe", [*PROBE, "--batch_size", "many"], "invalid int value: 'many'"),
    ("ddae-probe", [*PROBE, "--dtype", "float8"], "invalid choice: 'float8'"),
    ("ddae-probe", [*PROBE, "--image_column", "picture"], "--image_column 'picture' is not a column"),
    ("ddae-probe", [*PROBE, "--eval_split", "validation"], "Could not load split 'validation'"),
    ("ddae-probe", replace(PROBE, "--dataset", "{model}"), "It is a model folder, not a data set"),
    ("ddae-probe", [*PROBE, "--seed", "-1"], "--seed must be >= 0, got -1"),
    ("train_unconditional.py", [*TRAIN, "--seed", "-1"], "--seed must be >= 0, got -1"),
    ("train_unconditional.py", [*TRAIN, "--resume_from_checkpoint", "{model}"], "is a model folder, not a training"),
    ("train_unconditional.py", replace(TRAIN, "--dataset_name", None), "Give exactly one of --dataset_name"),
    ("train_unconditional.py", replace(TRAIN, "--dataset_name", "./no-data"), "is not a folder"),
    ("train_unconditional.py", [*TRAIN, "--learning_rate", "0"], "--learning_rate must be a finite number > 0"),
    ("train_unconditional.py", [*TRAIN, "--learning_rate", "inf"], "must be a finite number > 0, got inf"),
    ("train_unconditional.py", [*TRAIN, "--learning_rate", "nan"], "must be a finite number > 0, got nan"),
    ("train_unconditional.py", [*TRAIN, "--max_train_minutes", "0"], "--max_train_minutes must be a finite"),
    ("train_unconditional.py", replace(TRAIN, "--model_config", "ddpm-huge"), "Unknown model config"),
    ("train_unconditional.py", [*TRAIN, "--train_batch_size", "eight"], "invalid int value"),
    ("train_unconditional.py", [*TRAIN, "--train_data_dir", "images"], "Give exactly one of"),
    ("train_unconditional.py", [*TRAIN, "--resume_from_checkpoint", "checkpoint-9"], "does not exist"),
    ("finetune.py", replace(FINETUNE, "--model_name_or_path", "./no-model"), "--model_name_or_path './no-model'"),
    ("finetune.py", replace(FINETUNE, "--dataset_name", "data/no-such-data"), "is not a folder"),
    ("finetune.py", [*FINETUNE, "--lora_r", "-1"], "--lora_r must be >= 0"),
    ("finetune.py", [*FINETUNE, "--seed", "-1"], "--seed must be >= 0, got -1"),
    ("finetune.py", replace(FINETUNE, "--dataset_name", "{model}"), "It is a model folder, not a data set"),
    ("finetune.py", [*FINETUNE, "--eval_split", "train"], "is the training split"),
    ("finetune.py", [*FINETUNE, "--num_train_epochs", "few"], "invalid float value"),
    ("finetune.py", replace(FINETUNE, "--layer", "nope"), "Unknown layer"),
    # --push_to_hub: the repository is checked (and created) before any work; the Hub is offline here
    ("ddae-probe", [*PROBE, "--push_to_hub", "--hub_model_id", "me/a/b"], "is not a Hub repository id"),
    ("ddae-probe", [*PROBE, "--push_to_hub", "--hub_model_id", "me/probe"], "Cannot reach the Hub"),
    ("ddae-probe", [*PROBE, "--push_cell", "mid_block@10"], "need --push_to_hub"),
    ("ddae-probe", [*PROBE, "--push_to_hub", "--push_cell", "mid_block"], "is not LAYER@LEVEL"),
    ("train_unconditional.py", [*TRAIN, "--push_to_hub", "--hub_model_id", "bad id"], "is not a Hub repository"),
    ("finetune.py", [*FINETUNE, "--push_to_hub", "--hub_model_id", "me/ft"], "Cannot reach the Hub"),
]


@pytest.mark.parametrize(("command", "argv", "fragment"), MISTAKES, ids=[f"{c}:{f}" for c, _, f in MISTAKES])
def test_mistake_is_one_line_and_status_2(command, argv, fragment, tiny_unet_pipeline_dir, tmp_path, capsys,
                                          monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv("DDAE_TRACEBACK", raising=False)
    out = tmp_path / "out"
    argv = [a.format(model=tiny_unet_pipeline_dir, data=CIFAR10_SAMPLE, out=out) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command](argv)
    stderr = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert stderr and stderr[-1].startswith(f"{command}: error: ") and fragment in stderr[-1], stderr[-3:]
    assert not any("Traceback" in line for line in stderr)
    # Nothing was computed for nothing: no features, checkpoints or models in the output folder.
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_traceback_on_request_and_for_real_bugs(monkeypatch):
    def usage():
        raise UsageError("bad flag")

    monkeypatch.setenv("DDAE_TRACEBACK", "1")
    with pytest.raises(UsageError, match="bad flag"):
        run_command("ddae-probe", usage)
    monkeypatch.delenv("DDAE_TRACEBACK")

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command("ddae-probe", bug)


@pytest.mark.parametrize("command", [
    ["ddae-probe", "--model", "./missing", "--dataset", CIFAR10_SAMPLE, "--output_dir", "out"],
    [sys.executable, "training/train_unconditional.py", "--dataset_name", "./missing", "--output_dir", "out"],
], ids=["ddae-probe", "train_unconditional.py"])
def test_installed_commands_print_one_line(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DDAE_TRACEBACK"}
    executable = os.path.join(os.path.dirname(sys.executable), command[0]) if command[0] == "ddae-probe" else None
    done = subprocess.run([executable or command[0], *command[1:]], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("give an existing local folder or a Hub id (owner/name).")
    assert "Traceback" not in done.stderr


def test_two_process_launch_prints_the_mistake_once(tmp_path):
    """Under ``accelerate launch`` every process meets the mistake; only the main one prints it. (The launcher
    then adds its own failure report, which the child cannot suppress.)"""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    env.pop("DDAE_TRACEBACK", None)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    done = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "-m", "ddae_diffusers.probing.cli",
         "--model", "./missing", "--dataset", CIFAR10_SAMPLE, "--output_dir", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("ddae-probe: error: ")]
    assert ours == ["ddae-probe: error: --model './missing' is not a folder (no such path): give an existing local "
                    "folder or a Hub id (owner/name)."]
    assert "exitcode  : 2" in done.stderr
