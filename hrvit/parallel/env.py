"""Who is this process in the job? Launcher environments -> RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, which torch.distributed (through deepspeed.init_distributed) reads.

DeepSpeed reads no Slurm variable, and finds MPI ranks only through its own mpi4py probe; doing
it here gives every launcher one path and one set of errors. Precedence (`launched_by`):

1. RANK/WORLD_SIZE set: the deepspeed launcher, torchrun or a user set them; they win over any
   Slurm or MPI variable the process also inherited (the deepspeed launcher runs inside srun).
2. A Slurm job step (numeric SLURM_STEP_ID and SLURM_PROCID, set by srun for each task): the Slurm
   variables are the truth, even next to PMI_RANK/PMI_SIZE (Cray srun exports them) or PMIX_*
   (srun --mpi=pmix), and mpi4py is not asked: an mpi4py built against another MPI initialises
   each task of a Cray srun as a one-rank world, so every task would train alone. The batch
   script's own step ("batch" or no step id) is no task step. Exception, an mpirun inside the step
   (its per-node daemons are the step's tasks and the ranks inherit their SLURM_* variables):
   OMPI_COMM_WORLD_SIZE set (Open MPI's mpirun/prterun; srun never sets it) or PMI_SIZE greater
   than the step's task count (MPICH/Intel hydra) means MPI.
3. MPI (OMPI_*, PMI_*, PMIX_*; mpirun outside a step, e.g. from the batch script): ranks from
   mpi4py when installed, else from the variables.
4. Nothing of these: a one-process run (also a one-task Slurm step).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

from hrvit.errors import ConfigError

RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
VISIBLE_DEVICES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")
LOCAL_TASKS = {"launcher": ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"),  # torchrun, deepspeed launcher
               "mpi": ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"),
               "slurm": ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")}
"""Where each launcher says how many tasks it started on this node."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'node[01-04,07],gpu2' -> 'node01', 'a[1-2]-b[3-4]' -> 'a1-b3'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())
    if not host:
        raise ConfigError(f"SLURM_JOB_NODELIST: cannot read a host name from {nodelist!r}")
    return host


def slurm_port(job_id: str) -> str:
    """A port every task of a job derives alike, different for jobs that share a node."""
    return str(29500 + int(job_id) % 20000)


def _need(env: Mapping[str, str], name: str, why: str) -> str:
    if not env.get(name):
        raise ConfigError(f"{name} is not set: {why}")
    return env[name]


def _step_tasks(env: Mapping[str, str]) -> int:
    return int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    """srun started this task. Pseudo-steps (batch, extern, interactive) are 0xFFFFFFF0 and up, or words."""
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or ""
    return "SLURM_PROCID" in env and step.isdigit() and int(step) < 0xFFFFFFF0


def _mpirun_inside_step(env: Mapping[str, str]) -> bool:
    pmi_size = env.get("PMI_SIZE", "")
    return "OMPI_COMM_WORLD_SIZE" in env or (pmi_size.isdigit() and int(pmi_size) > _step_tasks(env))


def launched_by(env: Mapping[str, str]) -> str:
    """'launcher', 'slurm', 'mpi' or 'none', in the module docstring's precedence."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return "launcher"
    if _in_slurm_step(env) and not _mpirun_inside_step(env):
        return "slurm"
    if any(name in env for name in MPI_MARKERS):
        return "mpi"
    return "none"


def _from_launcher(env: Mapping[str, str]) -> dict[str, str]:
    if "RANK" not in env:
        raise ConfigError("RANK is not set although WORLD_SIZE is: the launcher must set both")
    why = "RANK is set, so a launcher started this process, and it must also set " + ", ".join(RENDEZVOUS)
    out = {name: _need(env, name, why) for name in RENDEZVOUS}
    out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
    return out


def _from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not env.get("MASTER_ADDR") and not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is not set (nor MASTER_ADDR): cannot tell which node hosts rank 0")
    port = env.get("MASTER_PORT") or slurm_port(_need(
        env, "SLURM_JOB_ID", "under Slurm the rendezvous port comes from the job id (or set MASTER_PORT)"))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(_step_tasks(env)),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": port,
    }


def _from_mpi4py(env: Mapping[str, str]) -> dict[str, str] | None:
    """Ranks from MPI itself; rank 0 picks the port and tells the others. None without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    hosts = comm.allgather(socket.gethostname())
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    out = {"RANK": str(rank), "WORLD_SIZE": str(comm.Get_size()), "LOCAL_RANK": str(local.Get_rank()),
           "MASTER_ADDR": env.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0]),
           "MASTER_PORT": comm.bcast(env.get("MASTER_PORT") or (str(free_port()) if rank == 0 else None))}
    local.Free()
    return out


def _from_mpi_env(env: Mapping[str, str]) -> dict[str, str]:
    why = "started by MPI without mpi4py: pip install 'hrvit[mpi]', or set MASTER_ADDR and MASTER_PORT"
    return {"RANK": env.get("OMPI_COMM_WORLD_RANK") or _need(env, "PMI_RANK", why),
            "WORLD_SIZE": env.get("OMPI_COMM_WORLD_SIZE") or _need(env, "PMI_SIZE", why),
            "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID", "0"),
            "MASTER_ADDR": _need(env, "MASTER_ADDR", why), "MASTER_PORT": _need(env, "MASTER_PORT", why)}


def _alone(env: Mapping[str, str]) -> dict[str, str]:
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}


def discover(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for this process from whatever started it."""
    env = os.environ if env is None else env
    kind = launched_by(env)
    if kind == "launcher":
        return _from_launcher(env)
    if kind == "slurm":
        return _from_slurm(env) if _step_tasks(env) > 1 else _alone(env)
    if kind == "mpi":
        found = _from_mpi4py(env)
        if found is not None:
            return found
        if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
            return _from_mpi_env(env)
        raise ConfigError("PMIX_RANK is set but not RANK: started by a PMIx launcher; "
                          "pip install 'hrvit[mpi]' (mpi4py) so hrvit can ask MPI for the ranks")
    return _alone(env)


def local_tasks(env: Mapping[str, str]) -> tuple[str, int] | None:
    """(variable, value): how many tasks the launcher that started us put on this node, if it says."""
    for name in LOCAL_TASKS.get(launched_by(env), ()):
        value = env.get(name, "")
        if name.startswith("SLURM_"):  # '8', '8(x4)' or '8(x3),7': only one count for all nodes is usable
            counts = {re.sub(r"\(x\d+\)$", "", part) for part in value.split(",")}
            value = counts.pop() if len(counts) == 1 else ""
        if value.isdigit():
            return name, int(value)
    return None


def gpu_for_rank(local_rank: int, device_count: int, tasks: tuple[str, int] | None = None,
                 visible: str = "") -> int:
    """The GPU index for a rank. One visible GPU (srun --gpus-per-task=1, --gpu-bind=closest) is the
    task's own whatever its LOCAL_RANK; with several, rank i takes GPU i, and a rank without a GPU of
    its own is an error: NCCL/RCCL refuses two ranks on one GPU (it used to be local_rank % count)."""
    if device_count <= 1:
        return 0
    fix = (f"launch at most {device_count} tasks per node (--ntasks-per-node={device_count}, as many as "
           "--gpus-per-node), or give each task its own GPU (srun --gpus-per-task=1)")
    if tasks is not None and tasks[1] > device_count:
        raise ConfigError(f"{tasks[0]}={tasks[1]}: {tasks[1]} tasks on this node but this process sees only "
                          f"{device_count} GPUs ({visible or 'no *_VISIBLE_DEVICES set'}); {fix}")
    if local_rank >= device_count:
        raise ConfigError(f"LOCAL_RANK={local_rank} has no GPU of its own: this process sees {device_count} "
                          f"GPUs ({visible or 'no *_VISIBLE_DEVICES set'}); {fix}")
    return local_rank


def pick_device(local_rank: int, env: Mapping[str, str] | None = None) -> int:
    """Select this process's GPU (see gpu_for_rank); returns its index, or local_rank unchanged without GPUs."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return local_rank
    env = os.environ if env is None else env
    visible = ", ".join(f"{name}={env[name]}" for name in VISIBLE_DEVICES if name in env)
    index = gpu_for_rank(local_rank, torch.cuda.device_count(), local_tasks(env), visible)
    torch.cuda.set_device(index)
    return index
