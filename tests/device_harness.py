"""A second device for tests on a machine without one: the ``meta`` device under :class:`SameDevice`.

Most ops that mix CPU and meta tensors raise as they would with CUDA tensors, but some do not (matmuls, in-place
arithmetic, ``scatter_add_``, ``gather``): under :class:`SameDevice` every torch function whose tensor arguments are on
two devices raises, as CUDA does, except the copies between devices and indexing with CPU indices, which CUDA allows.
Code run on ``meta`` tensors under it proves that every tensor it touches was moved; values are checked elsewhere, on
the CPU in fp16/bf16.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

META = torch.device("meta")
# copies between devices, indexing with CPU indices (CUDA allows both), and nn.Module.to swapping a parameter
CROSSING = {"to", "cpu", "cuda", "copy_", "__getitem__", "__setitem__", "as_tensor", "tensor",
            "_has_compatible_shallow_copy_type"}  # fmt: skip


def tensor_leaves(value) -> list[torch.Tensor]:
    """The tensors in nested lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensor_leaves(item)]
    if isinstance(value, dict):
        return tensor_leaves(list(value.values()))
    return []


class SameDevice(TorchFunctionMode):
    """Raises on any torch function whose tensor arguments are on different devices (CPU 0-dim scalars aside, as
    CUDA allows). ``ops`` counts the functions seen per device type."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = tensor_leaves((args, kwargs))
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1 and getattr(func, "__name__", None) not in CROSSING:
            raise RuntimeError(f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devices))}")
        for device in devices:
            self.ops[device.type] = self.ops.get(device.type, 0) + 1
        return func(*args, **kwargs)


class DtypeRecorder(TorchFunctionMode):
    """Records the dtype of every tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.dtypes.update(tensor.dtype for tensor in tensor_leaves(out))
        return out


def launch_two_processes(*arguments: str, timeout: int = 300):
    """Runs ``accelerate launch`` with two CPU processes (gloo) on ``arguments`` (a script and its arguments) from the
    repository root; returns the ``subprocess.CompletedProcess`` with its text output."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *arguments]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
