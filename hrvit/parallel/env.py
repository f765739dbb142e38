"""Who is this process in the job? Launcher environments -> RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT, which torch.distributed (through deepspeed.init_distributed) reads.

DeepSpeed reads no Slurm variable, and finds MPI ranks only through its own mpi4py probe; doing
it here gives every launcher one path and one set of errors. Precedence: explicit RANK (deepspeed
launcher, torchrun, by hand) > MPI (mpirun; Slurm variables inherited from an allocation are
wrong there) > Slurm (srun). None of them: a one-process run.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping

from hrvit.errors import ConfigError

RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


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


def _from_launcher(env: Mapping[str, str]) -> dict[str, str]:
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
        "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"],
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


def discover(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for this process from whatever started it."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        if "RANK" not in env:
            raise ConfigError("RANK is not set although WORLD_SIZE is: the launcher must set both")
        return _from_launcher(env)
    if any(name in env for name in MPI_MARKERS):
        found = _from_mpi4py(env)
        if found is not None:
            return found
        if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:  # mpirun: inherited Slurm variables are wrong
            return _from_mpi_env(env)
    if "SLURM_PROCID" in env and (env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1")) != "1":
        return _from_slurm(env)
    if "PMIX_RANK" in env:
        raise ConfigError("PMIX_RANK is set but not RANK: started by a PMIx launcher; "
                          "pip install 'hrvit[mpi]' (mpi4py) so hrvit can ask MPI for the ranks")
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}


def pick_device(local_rank: int) -> int:
    """The GPU of this process: with one GPU per task (srun --gpus-per-task=1) that is device 0
    whatever SLURM_LOCALID says. Returns the device index (local_rank unchanged without GPUs)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return local_rank
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return index
