"""Start torch.distributed through DeepSpeed, as one process or under any launcher (see env.py)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from hrvit.errors import ConfigError, HrvitError
from hrvit.parallel.env import discover, launched_by, local_tasks, pick_device


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Join (or, run alone, create) the process group; returns (rank, world_size).

    A run started without a launcher becomes a one-rank group on a free local port, so the
    same code path (and DeepSpeed) serves single-process and multi-process runs. The rendezvous
    and every collective give up after `timeout_s` seconds with an error instead of hanging.
    The backend is the accelerator's (NCCL/RCCL on GPUs, gloo on CPU); HRVIT_DIST_BACKEND=gloo
    overrides it (tools/memory_sp.py uses that to put several ranks on one GPU).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        share_cores(os.environ)
        env = discover()
        backend = os.environ.get("HRVIT_DIST_BACKEND") or get_accelerator().communication_backend_name()
        check_backend(backend, get_accelerator().device_name())
        env["LOCAL_RANK"] = str(pick_device(int(env["LOCAL_RANK"])))
        os.environ.update(env)
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):  # DeepSpeed prints "... shm_comm_op built successfully" each start
                deepspeed.init_distributed(dist_backend=backend,
                                           timeout=timedelta(seconds=timeout_s), verbose=False)
        except (RuntimeError, ValueError, OSError) as err:
            raise HrvitError(
                f"parallel: rank {env['RANK']} of {env['WORLD_SIZE']} could not join the process group at "
                f"MASTER_ADDR={env['MASTER_ADDR']} MASTER_PORT={env['MASTER_PORT']} within parallel.timeout_s="
                f"{timeout_s} s: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        finally:
            sys.stdout.write("".join(line for line in said.getvalue().splitlines(keepends=True)
                                     if "built successfully" not in line))
    return dist.get_rank(), dist.get_world_size()


def share_cores(env) -> int | None:
    """Under a launcher that starts every rank of a node with the node's cores (the deepspeed launcher), give
    each rank its share of torch threads, as torchrun does with OMP_NUM_THREADS=1: by default each rank would
    start a thread per core, and on CPU the ranks then fight over the cores (the 2-rank quick start ran 10 to
    20 % slower). OMP_NUM_THREADS, when set, wins; Slurm and MPI tasks are left alone (each gets its own
    cores there). Returns the threads set, or None."""
    import torch

    tasks = local_tasks(env)
    if "OMP_NUM_THREADS" in env or launched_by(env) != "launcher" or tasks is None or tasks[1] < 2:
        return None
    threads = max(1, len(os.sched_getaffinity(0)) // tasks[1])
    torch.set_num_threads(threads)
    return threads


def check_backend(backend: str, device: str) -> None:
    """ConfigError when the backend needs GPUs that this process cannot see (NCCL/RCCL without GPUs)."""
    import torch

    if backend == "nccl" and not torch.cuda.is_available():
        hint = f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} is set" if "DS_ACCELERATOR" in os.environ else \
            f"DeepSpeed chose its {device} accelerator"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("ROCR_VISIBLE_DEVICES"))
        raise ConfigError(f"parallel: {hint}, whose backend NCCL needs GPUs, but torch sees none (torch "
                          f"{torch.__version__}, CUDA_VISIBLE_DEVICES={visible!r}); run on a GPU node, or set "
                          "DS_ACCELERATOR=cpu to train on the CPU with gloo")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def leave(code: int) -> int:
    """End a process that joined a process group with status `code`, skipping the interpreter's teardown.

    Every rank has passed the run's last barrier and written and closed its files by now. Process groups that
    DeepSpeed still holds are otherwise destroyed during interpreter teardown, where gloo's threads sometimes abort
    a finished run ('terminate called without an active exception', status -6: about once per 150 rank exits in
    this test suite, destroy_process_group or not), which a scheduler would take for a failure. MPI is finalized
    first. Without a process group this returns `code`.
    """
    if not dist.is_initialized():
        return code
    mpi = sys.modules.get("mpi4py.MPI")  # started by mpirun: MPI counts a rank that skips Finalize as aborted
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def release_shm_buffers(port: str | int | None = None) -> None:
    """Unlink DeepSpeed's CPU all-reduce buffers of the job on `port` (default: this job's MASTER_PORT).

    DeepSpeed (0.19) leaves /dev/shm/deepspeed_allreduce_buffer_* (66 MB per rank) behind after every
    multi-rank CPU run, and /dev/shm is memory: a day of test runs filled 16 GB. Safe once every rank
    has mapped them (a mapping outlives its name) or exited.
    """
    port = port or os.environ.get("MASTER_PORT")
    if port:
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            path.unlink(missing_ok=True)
