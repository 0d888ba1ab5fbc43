"""Training checkpoints: ``checkpoint-N`` folders, written whole or not at all, found and resumed by name."""

from __future__ import annotations

import math
import os
import re
import shutil

from accelerate import Accelerator

from ..errors import UsageError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_MARKER = "optimizer.bin"  # written by accelerator.save_state into every checkpoint

def list_checkpoints(output_dir: str) -> list[str]:
    """Complete ``checkpoint-N`` folders in ``output_dir``, oldest (smallest N) first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if CHECKPOINT_PATTERN.match(n)]
    names.sort(key=lambda n: int(CHECKPOINT_PATTERN.match(n).group(1)))
    return [os.path.join(output_dir, n) for n in names if os.path.isdir(os.path.join(output_dir, n))]


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str) -> str | None:
    """The checkpoint folder for ``--resume_from_checkpoint`` (a path, a folder name, or ``latest``).

    ``latest`` with no checkpoint yet returns None (start fresh); a missing path raises ``ValueError``.
    """
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (resume_from_checkpoint, os.path.join(output_dir, resume_from_checkpoint)):
        if os.path.isdir(candidate):
            if not os.path.isfile(os.path.join(candidate, STATE_MARKER)):
                kind = "a model folder" if os.path.isfile(os.path.join(candidate, "model_index.json")) else "a folder"
                raise UsageError(
                    f"--resume_from_checkpoint {resume_from_checkpoint!r} is {kind}, not a training checkpoint (no "
                    f"{STATE_MARKER}): give a checkpoint-N folder of this script, or 'latest'; to continue from "
                    "a model's weights with a new optimiser, pass it as --pretrained_model_name_or_path."
                )
            return candidate
    raise UsageError(
        f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist: give a checkpoint-N folder, "
        f"or 'latest' for the newest one in {output_dir!r}."
    )


def checkpoint_step(path: str) -> int:
    """N of a ``checkpoint-N`` folder."""
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise UsageError(f"{path!r} is not a checkpoint-N folder.")
    return int(match.group(1))


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>``, atomically, on every process.

    The state is written to a hidden temporary folder and renamed once every process has
    finished, so a kill never leaves a half-written ``checkpoint-N``. Then the oldest
    checkpoints beyond ``total_limit`` are removed.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class StepHistory:
    """Every result of a run by step and the best one; checkpointed with ``accelerator.register_for_checkpointing``.

    Subclasses build the records; ``higher_is_better`` says which way the judged value improves. Ties keep the earlier
    step, and an infinite or NaN value never wins."""

    higher_is_better = True

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.best: dict | None = None

    def record(self, record: dict, metric: str, value: float) -> bool:
        """Adds ``record`` (a dict with ``step``; a result of the same step is replaced), judged by ``value`` of
        ``metric``; returns True if it is the new best."""
        self.records = [r for r in self.records if r["step"] != record["step"]] + [record]
        if not math.isfinite(value):
            return False
        if self.best is None or (value > self.best["value"] if self.higher_is_better else value < self.best["value"]):
            self.best = {"step": record["step"], "metric": metric, "value": value}
            return True
        return False

    def state_dict(self) -> dict:
        return {"records": [dict(r) for r in self.records], "best": dict(self.best) if self.best else None}

    def load_state_dict(self, state: dict) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.best = dict(state["best"]) if state["best"] else None
