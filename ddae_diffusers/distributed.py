"""Waiting on the main process without a collective timeout.

Under ``accelerate launch`` the main process alone trains the probe heads, samples images or writes a pipeline while
the other ranks wait. A plain ``accelerator.wait_for_everyone()`` is a barrier of the device's process group:
with NCCL it is cancelled by the collective watchdog after the group's timeout (10 minutes by default), which
the heads of a large grid exceed. Here the ranks wait in a CPU (gloo) group of their own whose timeout is
:data:`HOST_WAIT_TIMEOUT`, and the device's process group has no collective in flight meanwhile.
"""

from __future__ import annotations

import atexit
from datetime import timedelta

import torch.distributed as dist

HOST_WAIT_TIMEOUT = timedelta(days=2)  # the longest the other ranks wait for the main process
_host_groups: dict[int, object] = {}


def host_group():
    """The gloo process group over every rank used for long waits; None when no process group is initialised.

    Creating it is itself a wait bounded by the default timeout, so call it once where every rank arrives together
    (right after the ``Accelerator`` is made); later calls return the same group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = id(dist.group.WORLD)
    if world not in _host_groups:
        _host_groups[world] = dist.new_group(backend="gloo", timeout=HOST_WAIT_TIMEOUT)
        atexit.register(_destroy_host_groups)  # before the interpreter tears down gloo's threads
    return _host_groups[world]


def _destroy_host_groups() -> None:
    while _host_groups:
        _, group = _host_groups.popitem()
        if dist.is_initialized():
            dist.destroy_process_group(group)


def wait_for_main(accelerator=None) -> None:
    """Every rank waits here until all have arrived, however long the main process works before it comes.

    Call it on every rank, like ``accelerator.wait_for_everyone()``; without an accelerator or with one process it
    returns at once."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    group = host_group()
    if group is None:
        accelerator.wait_for_everyone()
        return
    dist.barrier(group=group)


def broadcast_from_main(value, accelerator=None):
    """``value`` of the main process (a picklable object), returned on every rank; the others wait on the host
    (see :func:`wait_for_main`) while the main process computes it."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    group = host_group()
    if group is None:
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]
    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=group)
    return holder[0]


__all__ = ["HOST_WAIT_TIMEOUT", "broadcast_from_main", "host_group", "wait_for_main"]
