"""A dependency-free accelerate tracker: one JSON object per ``log`` call in ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
import time

import torch
from accelerate.tracking import GeneralTracker


class JSONLinesTracker(GeneralTracker):
    """An accelerate tracker that appends one JSON object per ``log`` call to ``<logging_dir>/metrics.jsonl``.

    Needs nothing beyond the standard library; the first line holds the run configuration.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.run_name = run_name
        self.path = os.path.join(logging_dir, run_name, "metrics.jsonl")

    @property
    def tracker(self) -> str:
        return self.path

    def _write(self, record: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def store_init_configuration(self, values: dict) -> None:
        self._write({"config": values, "time": time.time()})

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        self._write({"step": step, **values, "time": time.time()})


def read_jsonl(path: str) -> list[dict]:
    """The records of a :class:`JSONLinesTracker` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
