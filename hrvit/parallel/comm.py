"""Every collective hrvit runs, in one place, on a device the process group can use.

DeepSpeed starts the group with NCCL on NVIDIA GPUs (RCCL under the same name on ROCm), and
torch maps `nccl` to device tensors only: an all-reduce of a CPU tensor there fails with "No
backend type associated with device type cpu". gloo (CPU runs) takes CPU tensors. So each
function here moves its tensor to `device()` and back, and code elsewhere never calls
torch.distributed's collectives itself (tests/test_comm.py fails if it does). Object
collectives (pickled Python values) are torch's, which already stage them on the current device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

SUM, MAX, MIN = dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN
_HOST_BACKENDS = ("gloo", "mpi", "ccl")
"""Backends that take CPU tensors; any other (nccl, hccl, xccl, ...) takes only accelerator tensors."""


def device(group=None) -> torch.device:
    """Where a tensor must live to be communicated over `group` (default: the world)."""
    backend = str(dist.get_backend(group))
    if backend in _HOST_BACKENDS or "cpu:" in backend:
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce(tensor: torch.Tensor, op=SUM, group=None) -> torch.Tensor:
    """Reduce `tensor` in place over `group` wherever it lives; returns it."""
    on = device(group)
    if tensor.device == on:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(on)
    dist.all_reduce(moved, op=op, group=group)
    tensor.copy_(moved)
    return tensor


def reduce_values(values: list[float], op=SUM, group=None) -> list[float]:
    """Plain numbers (losses, counts, flags) reduced over `group` in one collective."""
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device(group)), op, group).tolist()


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all), in rank order, on the device `tensor` is on."""
    on = device(group)
    local = tensor.contiguous().to(on)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return [p.to(tensor.device) for p in parts]


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable `obj`, in rank order."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(group=None) -> None:
    dist.barrier(group=group)


def ring_shift(tensor: torch.Tensor, group) -> Callable[[], torch.Tensor]:
    """Start one step around the ring of `group`: `tensor` goes to the next rank, the previous rank's
    tensor (same shape) comes in. Returns `wait`, which gives the received tensor on `tensor`'s device;
    ring attention computes on the block it holds meanwhile. Point-to-point, which gloo and NCCL both have."""
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) == 1:
        return lambda: tensor
    on = device(group)
    me = ranks.index(dist.get_rank())
    send = tensor.contiguous().to(on)
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, ranks[(me + 1) % len(ranks)], group),
           dist.P2POp(dist.irecv, recv, ranks[(me - 1) % len(ranks)], group)]
    requests = dist.batch_isend_irecv(ops)

    def wait() -> torch.Tensor:
        for request in requests:
            request.wait()
        return recv.to(tensor.device)

    return wait
