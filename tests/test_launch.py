"""Launchers: which of the deepspeed launcher, Slurm and MPI started a process (hrvit/parallel/env.py),
which GPU each rank takes, and the launch scripts (with stand-ins for srun, scontrol and module)."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import PY, REPO, TINY, free_port, hrvit

from hrvit.errors import ConfigError
from hrvit.parallel import env as penv
from hrvit.parallel.dist import share_cores
from hrvit.parallel.env import discover, first_host, gpu_for_rank, launched_by, local_tasks, slurm_port

RECIPE = "launch/recipes/quickstart.yaml"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)

STEP = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8"}
"""Task 3 of an 8-task srun step."""
ALLOC = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}
"""What a batch script (and anything it starts without srun) inherits."""
OMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "MASTER_ADDR": "m", "MASTER_PORT": "6"}
SLURM_RANKS = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
               "MASTER_PORT": slurm_port("1234")}
MPI_RANKS = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "m", "MASTER_PORT": "6"}


def _mpi4py(monkeypatch, allowed: bool) -> None:
    """mpi4py as if not installed; asking it at all fails the test unless allowed (under a Cray srun an
    mpi4py built against another MPI would initialise each task as a one-rank world)."""
    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if not allowed:
                raise AssertionError(f"mpi4py.{name} consulted")
            raise ImportError("mpi4py hidden by the test")

    monkeypatch.setitem(sys.modules, "mpi4py", Stub("mpi4py"))


@pytest.mark.parametrize("nodelist, host", [
    ("node07", "node07"), ("node[01-04]", "node01"), ("node[03,05-06],gpu1", "node03"),
    ("gpu1,node[1-2]", "gpu1"), ("frontier[00123-00125]", "frontier00123"), ("rack[2-3]-n[10-11]", "rack2-n10"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


LAUNCHER = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"}


@pytest.mark.parametrize("env, kind, ranks", [
    # the deepspeed launcher / torchrun inside an srun step (slurm.sbatch HRVIT_LAUNCHER=deepspeed)
    ({**STEP, "PMI_RANK": "3", "PMI_SIZE": "8", **OMPI, **LAUNCHER}, "launcher", LAUNCHER),
    ({**STEP}, "slurm", SLURM_RANKS),
    ({**STEP, "SLURM_STEPID": "0", "SLURM_STEP_ID": ""}, "slurm", SLURM_RANKS),  # older Slurm's name
    # Cray srun exports PMI_RANK/PMI_SIZE; an MPI that is not Cray's would report a singleton
    ({**STEP, "PMI_RANK": "3", "PMI_SIZE": "8"}, "slurm", SLURM_RANKS),
    ({**STEP, "PMI_RANK": "0", "PMI_SIZE": "1"}, "slurm", SLURM_RANKS),
    ({**STEP, "PMIX_RANK": "3"}, "slurm", SLURM_RANKS),  # srun --mpi=pmix
    # mpirun in the batch script: SLURM_* inherited from the allocation, no step (or the batch pseudo-step)
    ({**ALLOC, **OMPI}, "mpi", MPI_RANKS),
    ({**ALLOC, "SLURM_STEP_ID": "batch", **OMPI}, "mpi", MPI_RANKS),
    ({**ALLOC, "SLURM_STEP_ID": str(0xFFFFFFFB), **OMPI}, "mpi", MPI_RANKS),
    # mpirun over 2 nodes: its daemons are a 2-task srun step whose SLURM_PROCID the ranks inherit
    ({**STEP, "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", **OMPI}, "mpi", MPI_RANKS),
    ({**STEP, "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "PMI_RANK": "5", "PMI_SIZE": "8",
      "MPI_LOCALRANKID": "1", "MASTER_ADDR": "m", "MASTER_PORT": "6"}, "mpi", MPI_RANKS),  # MPICH/Intel hydra
    ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "m", "MASTER_PORT": "6"}, "mpi",
     MPI_RANKS),
    ({**OMPI}, "mpi", MPI_RANKS),
    # a batch script running hrvit without srun, or a one-task step: one process, no rendezvous
    ({**ALLOC}, "none", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}),
    ({**STEP, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "1"}, "slurm",
     {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}),
    ({}, "none", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}),
])
def test_discover_follows_the_launcher_precedence(monkeypatch, env, kind, ranks):
    """Launcher variables > a Slurm task step (mpi4py never asked there) > MPI > one process."""
    _mpi4py(monkeypatch, allowed=kind == "mpi")
    assert launched_by(env) == kind
    found = discover(env)
    assert {key: found[key] for key in ranks} == ranks


def test_slurm_rendezvous_comes_from_the_job(monkeypatch):
    _mpi4py(monkeypatch, allowed=False)
    assert discover({**STEP, "MASTER_PORT": "4000", "MASTER_ADDR": "10.0.0.1"})["MASTER_ADDR"] == "10.0.0.1"
    assert discover({**STEP, "SLURM_STEP_NODELIST": "gpu08"})["MASTER_ADDR"] == "gpu08"  # a step on part of the job


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2"}, "RANK is not set although WORLD_SIZE is"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"},
     "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"},
     "SLURM_JOB_ID is not set"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "MASTER_ADDR is not set: started by MPI"),
    ({"PMIX_RANK": "0"}, "PMIX_RANK is set but not RANK"),
])
def test_missing_rendezvous_variables_are_named(monkeypatch, env, message):
    _mpi4py(monkeypatch, allowed=True)
    with pytest.raises(ConfigError, match=message):
        discover(env)


# ---------------------------------------------------------------- one GPU per rank


@pytest.mark.parametrize("local_rank, count, tasks, device", [
    (0, 0, None, 0), (5, 1, None, 0), (5, 1, ("SLURM_STEP_TASKS_PER_NODE", 8), 0),  # srun --gpus-per-task=1
    (3, 8, ("LOCAL_SIZE", 8), 3), (3, 4, None, 3), (1, 8, ("SLURM_STEP_TASKS_PER_NODE", 4), 1),
])
def test_each_rank_gets_a_gpu_of_its_own(local_rank, count, tasks, device):
    assert gpu_for_rank(local_rank, count, tasks) == device


@pytest.mark.parametrize("local_rank, tasks, message", [
    (5, None, "LOCAL_RANK=5 has no GPU of its own: this process sees 4 GPUs \\(CUDA_VISIBLE_DEVICES=0,1,2,3\\)"),
    (0, ("SLURM_STEP_TASKS_PER_NODE", 8), "SLURM_STEP_TASKS_PER_NODE=8: 8 tasks on this node but this process sees "
                                          "only 4 GPUs"),
])
def test_more_ranks_than_gpus_on_a_node_is_an_error(local_rank, tasks, message):
    with pytest.raises(ConfigError, match=message) as err:
        gpu_for_rank(local_rank, 4, tasks, "CUDA_VISIBLE_DEVICES=0,1,2,3")
    assert "--ntasks-per-node=4" in str(err.value) and "srun --gpus-per-task=1" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("env, tasks", [
    ({**STEP, "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS_PER_NODE": "8"}, ("SLURM_STEP_TASKS_PER_NODE", 4)),
    ({**STEP, "SLURM_STEP_TASKS_PER_NODE": "5,3", "SLURM_NTASKS_PER_NODE": "8"}, ("SLURM_NTASKS_PER_NODE", 8)),
    ({**STEP, "SLURM_STEP_TASKS_PER_NODE": "5,3"}, None),
    ({**LAUNCHER, "LOCAL_SIZE": "2", "SLURM_STEP_TASKS_PER_NODE": "1"}, ("LOCAL_SIZE", 2)),  # deepspeed launcher
    ({**LAUNCHER, "LOCAL_WORLD_SIZE": "2"}, ("LOCAL_WORLD_SIZE", 2)),  # torchrun
    ({**OMPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, ("OMPI_COMM_WORLD_LOCAL_SIZE", 4)),
    ({}, None),
])
def test_local_task_count_comes_from_the_launcher_that_started_us(env, tasks):
    assert local_tasks(env) == tasks


@pytest.mark.parametrize("env, share", [
    ({**LAUNCHER, "LOCAL_SIZE": "2"}, 2),  # the deepspeed launcher: each rank its share of the cores
    ({**LAUNCHER, "LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, None),  # the user's setting wins
    ({**LAUNCHER, "LOCAL_SIZE": "1"}, None),
    ({**STEP, "SLURM_STEP_TASKS_PER_NODE": "4"}, None),  # srun gives each task its own cores
])
def test_ranks_of_a_launcher_share_the_cores(env, share):
    import torch

    before = torch.get_num_threads()
    try:
        got = share_cores(env)
        expected = None if share is None else max(1, len(os.sched_getaffinity(0)) // share)
        assert got == expected and torch.get_num_threads() == (expected or before)
    finally:
        torch.set_num_threads(before)


def test_pick_device_refuses_a_second_rank_on_one_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    env = {**STEP, "SLURM_LOCALID": "2", "SLURM_STEP_TASKS_PER_NODE": "3", "ROCR_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(ConfigError, match=r"SLURM_STEP_TASKS_PER_NODE=3: .* sees only 2 GPUs \(ROCR_VISIBLE_DEVICES"):
        penv.pick_device(2, env)
    assert penv.pick_device(1, {**env, "SLURM_STEP_TASKS_PER_NODE": "2"}) == 1


# ---------------------------------------------------------------- end to end


def test_unreachable_master_is_an_error_not_a_hang(slides, tmp_path):
    env = {**ENV, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([PY, "-m", "hrvit", "train", RECIPE, *TINY, f"data.manifest={slides}",
                           f"output.dir={tmp_path / 'run'}", "parallel.timeout_s=3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not join the process group at MASTER_ADDR=127.0.0.1" in proc.stderr
    assert "parallel.timeout_s=3" in proc.stderr and "Traceback" not in proc.stderr


FAKE_SRUN = r"""#!/usr/bin/env bash
# test stand-in for srun: -n/--ntasks (else SLURM_NTASKS) copies of the command, each in its own process
# group with what srun gives a task, plus PMI_RANK=0 PMI_SIZE=1: what an MPI other than Cray's reports
# under a Cray srun. With FAKE_USR1_WHEN=FILE it sends SIGUSR1 to every process of the step once FILE
# exists, as Slurm's --signal does.
n=$SLURM_NTASKS
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in -n) n=$2; shift;; --ntasks=*) n=${1#*=};; -N|-c|-A|-t) shift;; esac
  shift
done
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_STEP_ID=0 SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_NTASKS=$n SLURM_STEP_NUM_TASKS=$n \
    SLURM_STEP_TASKS_PER_NODE=$n SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST PMI_RANK=0 PMI_SIZE=1 setsid "$@" &
  pids+=($!)
done
if [[ -n ${FAKE_USR1_WHEN:-} ]]; then
  while [[ ! -e $FAKE_USR1_WHEN ]]; do sleep 0.1; done
  for p in "${pids[@]}"; do kill -USR1 -- "-$p"; done
fi
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def _stand_ins(folder: Path, calls: Path) -> Path:
    """srun (FAKE_SRUN) and scontrol (host names of a one-node job, `requeue` recorded) in folder."""
    folder.mkdir(exist_ok=True)
    (folder / "srun").write_text(FAKE_SRUN)
    (folder / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> {calls}\n'
                                     '[ "$1 $2" = "show hostnames" ] && echo localhost\nexit 0\n')
    for name in ("srun", "scontrol"):
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.slow
def test_slurm_sbatch_tasks_train_as_one_sp_group_whatever_pmi_says(slides, tmp_path):
    """launch/slurm.sbatch as Slurm runs it, with a stand-in srun that gives each task what a Cray srun
    does (SLURM_PROCID/LOCALID/STEP_ID/STEP_NUM_TASKS, the node list, the job id, and PMI_RANK=0 PMI_SIZE=1
    as a non-Cray MPI would see it; no RANK/WORLD_SIZE/MASTER_*): the two tasks train as one SP = 2 group,
    and `hrvit eval` of the checkpoint they wrote (one process) reproduces the full-resolution Dice the SP
    group computed."""
    fake = _stand_ins(tmp_path / "bin", tmp_path / "calls")
    job = next(j for j in range(os.getpid(), os.getpid() + 20000) if _port_free(int(slurm_port(str(j)))))
    env = {**ENV, "PATH": f"{fake}{os.pathsep}{ENV['PATH']}", "SLURM_JOB_ID": str(job), "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(REPO)}
    run = tmp_path / "run"
    proc = subprocess.run(["bash", "launch/slurm.sbatch", RECIPE, *TINY, f"data.manifest={slides}",
                           f"output.dir={run}", "train.steps=2", "eval.max_cases=1", "output.picture=false",
                           "parallel.sp_size=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sp_size"] == 2 and summary["steps"] == 2
    hrvit("eval", run)
    assert json.loads((run / "eval_val.json").read_text())["dice_mean"] == pytest.approx(summary["dice_mean"], abs=1e-4)


FAKE_LAUNCHER = """#!/usr/bin/env bash
# stand-in for the deepspeed launcher: starts one rank and, like the real one, has no SIGUSR1 handler
"$REAL_PYTHON" -c "$RANK_CODE" &
wait $!
"""
RANK_CODE = """import os, pathlib, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))  # as hrvit does: checkpoint, exit 75
pathlib.Path(os.environ["FAKE_USR1_WHEN"]).touch()
time.sleep(60)
"""


def test_slurm_sbatch_deepspeed_launcher_survives_the_preemption_signal(tmp_path):
    """HRVIT_LAUNCHER=deepspeed: Slurm's SIGUSR1 reaches every process of the step; the launcher must outlive
    it so that the ranks' exit 75 (checkpoint written) becomes the step's status and the job requeues."""
    calls = tmp_path / "calls"
    fake = _stand_ins(tmp_path / "bin", calls)
    submit = tmp_path / "submit"  # the script runs `$SLURM_SUBMIT_DIR/.venv/bin/python -m deepspeed.launcher.runner`
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "python").write_text(FAKE_LAUNCHER)
    (submit / ".venv" / "bin" / "python").chmod(0o755)
    env = {**ENV, "PATH": f"{fake}{os.pathsep}{ENV['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(submit),
           "HRVIT_LAUNCHER": "deepspeed", "TMPDIR": str(tmp_path), "REAL_PYTHON": PY, "RANK_CODE": RANK_CODE,
           "FAKE_USR1_WHEN": str(tmp_path / "rank-ready")}
    proc = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), RECIPE], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scontrol requeue 42" in calls.read_text() and "preempted after a checkpoint" in proc.stdout


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _mpirun() -> str | None:
    path = shutil.which("mpirun", path=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return path


@pytest.mark.slow
@pytest.mark.skipif(_mpirun() is None, reason="mpirun or mpi4py not installed (pip install -e '.[mpi]')")
def test_mpirun_ranks_are_discovered_through_mpi4py(slides, tmp_path):
    run = tmp_path / "run"
    cmd = [_mpirun(), "--allow-run-as-root", "-np", "2", PY, "-m", "hrvit", "train", RECIPE, *TINY,
           f"data.manifest={slides}", f"output.dir={run}", "train.steps=2", "eval.max_cases=0",
           "output.picture=false", "parallel.sp_size=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sp_size"] == 2


@pytest.mark.parametrize("script", ["launch/local.sh", "launch/slurm.sbatch", "launch/frontier.sbatch"])
def test_launch_scripts_parse_and_explain_their_usage(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0
    proc = subprocess.run(["bash", script], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.parametrize("module, rocm, message", [
    (None, None, "no 'module' command: launch/frontier.sbatch is for OLCF Frontier"),
    ("exit 1", None, "module load rocm/6.2.4 failed"),
    ("exit 1", "6.3.1", "module load rocm/6.3.1 failed (see module avail rocm): set HRVIT_ROCM"),
])
def test_frontier_sbatch_stops_without_its_rocm_module(tmp_path, module, rocm, message):
    """No silent `|| true`: a missing module command or ROCm module stops the job with status 2."""
    env = {k: v for k, v in ENV.items() if not k.startswith("BASH_FUNC_")}  # no inherited Lmod `module` function
    env.update(PATH=f"{tmp_path}{os.pathsep}/usr/bin{os.pathsep}/bin", SLURM_SUBMIT_DIR=str(REPO))
    if rocm:
        env["HRVIT_ROCM"] = rocm
    if module:
        (tmp_path / "module").write_text(f"#!/bin/sh\n{module}\n")
        (tmp_path / "module").chmod(0o755)
    elif shutil.which("module", path=env["PATH"]):
        pytest.skip("this machine has a module command")
    proc = subprocess.run(["bash", "launch/frontier.sbatch", RECIPE], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the srun command lines the scripts run

RECORDING_SRUN = """#!{py}
# stand-in srun: appends its command line and environment as one JSON line to $FAKE_SRUN_LOG. A `bash -c
# SCRIPT` step (slurm.sbatch's one deepspeed launcher per node) runs SCRIPT once per task, with the task's
# SLURM_NODEID/SLURM_PROCID; any other step's command is not run.
import json, os, subprocess, sys

argv = sys.argv[1:]
with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
    f.write(json.dumps({{"argv": argv, "env": dict(os.environ)}}) + "\\n")
i = 0
while i < len(argv) and argv[i].startswith("-"):
    i += 2 if argv[i] in ("-N", "-n", "-c", "-A", "-t") else 1
command = argv[i:]
if command[:2] == ["bash", "-c"]:
    ntasks = int(next(a.split("=")[1] for a in argv if a.startswith("--ntasks=")))
    for task in range(ntasks):
        env = {{**os.environ, "SLURM_STEP_ID": "0", "SLURM_NODEID": str(task), "SLURM_PROCID": str(task),
               "SLURM_LOCALID": "0"}}
        subprocess.run(command, env=env, check=True)
"""

EXPANDING_SCONTROL = """#!{py}
# stand-in scontrol: `show hostnames LIST` expands a Slurm node list (prefix[003-004,7],other) one host a line
import re, sys

if sys.argv[1:3] == ["show", "hostnames"]:
    for prefix, ranges in re.findall(r"([^,\\[]+)(?:\\[([^\\]]*)\\])?", sys.argv[3]):
        for part in ranges.split(",") if ranges else [""]:
            lo, _, hi = part.partition("-")
            print(*(f"{{prefix}}{{n:0{{len(lo)}}d}}" for n in range(int(lo), int(hi or lo) + 1)) if lo else prefix,
                  sep="\\n")
"""

NODELIST, JOB = "node[003-004]", "271828"
BATCH = {"SLURM_JOB_ID": JOB, "SLURM_JOB_NODELIST": NODELIST, "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
         "SLURM_NTASKS": "16", "SLURM_NPROCS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)",
         "SLURM_GPUS_PER_TASK": "1", "SLURM_CPUS_PER_TASK": "8", "USER": "tester"}
"""What `sbatch -N 2 launch/slurm.sbatch` gives the batch script (its #SBATCH lines: 8 tasks per node, one GPU
and 8 CPUs each) on nodes node003 and node004."""
SRUN_READS = {"nodes": "SLURM_NNODES", "ntasks": "SLURM_NTASKS", "ntasks-per-node": "SLURM_NTASKS_PER_NODE",
              "gpus-per-task": "SLURM_GPUS_PER_TASK", "cpus-per-task": "SRUN_CPUS_PER_TASK"}
"""The input variables srun takes an option from when it is not on the command line (Slurm >= 22.05 reads
SRUN_CPUS_PER_TASK, no longer SLURM_CPUS_PER_TASK, so an sbatch's --cpus-per-task does not reach the step)."""
SHORT = {"-N": "nodes", "-n": "ntasks", "-c": "cpus-per-task"}


def _slurm_bin(folder: Path) -> Path:
    """The recording srun and the node-list expanding scontrol in folder."""
    folder.mkdir(exist_ok=True)
    for name, text in (("srun", RECORDING_SRUN), ("scontrol", EXPANDING_SCONTROL)):
        (folder / name).write_text(text.format(py=PY))
        (folder / name).chmod(0o755)
    return folder


def _srun_calls(log: Path) -> list[dict]:
    """Each recorded srun call as {"options": {long name: value}, "command": [...], "env": {...}}."""
    calls = []
    for line in log.read_text().splitlines():
        call = json.loads(line)
        argv, options, i = call["argv"], {}, 0
        while i < len(argv) and argv[i].startswith("-"):
            arg = argv[i]
            if arg in SHORT:
                options[SHORT[arg]], i = argv[i + 1], i + 2
                continue
            if arg[:2] in SHORT and not arg.startswith("--"):
                options[SHORT[arg[:2]]] = arg[2:]
            else:
                name, _, value = arg[2:].partition("=")
                options[name] = value
            i += 1
        calls.append({"options": options, "command": argv[i:], "env": call["env"]})
    return calls


def _step(call: dict, name: str) -> str | None:
    """The value of srun option `name` for the step: from its command line, else from the variable srun reads."""
    return call["options"].get(name, call["env"].get(SRUN_READS.get(name, "")))


def _task_view(call: dict, procid: int, per_node: int) -> dict:
    """discover() in task `procid` of that step, with the variables srun gives each task."""
    ntasks = int(_step(call, "ntasks"))
    task = {**call["env"], "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % per_node),
            "SLURM_NODEID": str(procid // per_node), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{ntasks // per_node})", "SLURM_STEP_NODELIST": NODELIST}
    return discover(task)


def _batch_env(tmp_path: Path, **extra) -> tuple[dict, Path]:
    log = tmp_path / "srun.jsonl"
    fake = _slurm_bin(tmp_path / "bin")
    env = {k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "BASH_FUNC_", "SRUN_", "OMP_"))}
    env.update(BATCH, PATH=f"{fake}{os.pathsep}{env['PATH']}", FAKE_SRUN_LOG=str(log), TMPDIR=str(tmp_path), **extra)
    return env, log


def test_sbatch_directives_are_what_the_readme_promises():
    """README: slurm.sbatch starts 8 tasks per node with one GPU each; both scripts ask for SIGUSR1 120 s before
    the limit and requeue (the BATCH environment of the tests below is what these lines make sbatch set)."""
    slurm = {line.split()[1] for line in (REPO / "launch/slurm.sbatch").read_text().splitlines()
             if line.startswith("#SBATCH")}
    assert {"--ntasks-per-node=8", "--gpus-per-task=1", "--cpus-per-task=8", "--signal=USR1@120",
            "--requeue"} <= slurm
    frontier = {line.split()[1] for line in (REPO / "launch/frontier.sbatch").read_text().splitlines()
                if line.startswith("#SBATCH")}
    assert {"--signal=USR1@120", "--requeue"} <= frontier


def test_slurm_sbatch_srun_step_one_task_per_gpu_and_rendezvous_on_the_first_node(tmp_path):
    """slurm.sbatch on 2 nodes: one srun step of 16 tasks, 8 per node, one GPU each, running `python -m hrvit
    train RECIPE overrides`; each task's rendezvous (what hrvit computes from srun's variables) is node003, the
    first host of node[003-004], on port 29500 + job id % 20000, and ranks follow SLURM_PROCID."""
    env, log = _batch_env(tmp_path, SLURM_SUBMIT_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), RECIPE, "train.steps=3", "output.dir=a b"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (call,) = _srun_calls(log)
    assert call["command"] == ["python", "-m", "hrvit", "train", RECIPE, "train.steps=3", "output.dir=a b"]
    assert (_step(call, "ntasks"), _step(call, "ntasks-per-node"), _step(call, "gpus-per-task")) == ("16", "8", "1")
    assert "kill-on-bad-exit" not in call["options"] and "K" not in call["options"]
    assert call["env"]["OMP_NUM_THREADS"] == "8"
    for procid, local in ((0, 0), (9, 1), (15, 7)):
        seen = _task_view(call, procid, per_node=8)
        assert seen == {**seen, "RANK": str(procid), "WORLD_SIZE": "16", "LOCAL_RANK": str(local),
                        "MASTER_ADDR": "node003", "MASTER_PORT": str(29500 + int(JOB) % 20000)}


def test_slurm_sbatch_srun_step_keeps_the_cpus_per_task(tmp_path):
    """The 8 CPUs per task that #SBATCH --cpus-per-task asks for must reach the srun step (since Slurm 22.05 srun
    does not inherit it: each task got 1 CPU while OMP_NUM_THREADS=8)."""
    env, log = _batch_env(tmp_path, SLURM_SUBMIT_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), RECIPE], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (call,) = _srun_calls(log)
    assert _step(call, "cpus-per-task") == "8"


FAKE_RUNNER = """#!{py}
# stand-in for $SLURM_SUBMIT_DIR/.venv/bin/python -m deepspeed.launcher.runner: records its arguments and the
# hostfile they name, one JSON file per node
import json, os, sys

args = sys.argv[1:]
hosts = open(args[args.index("--hostfile") + 1]).read()
with open(os.path.join(os.environ["FAKE_RUNNER_DIR"], "node" + os.environ["SLURM_NODEID"] + ".json"), "w") as f:
    json.dump({{"args": args, "hostfile": hosts}}, f)
"""


def test_slurm_sbatch_deepspeed_launcher_per_node_with_the_first_node_as_master(tmp_path):
    """HRVIT_LAUNCHER=deepspeed on 2 nodes with 4 tasks per node: one srun task per node holding all 4 GPUs and
    4 x 8 CPUs; each starts the deepspeed runner with the allocation as hostfile (slots=4), its node rank, and
    node003:29500 + job id % 20000 as master; the overrides reach hrvit intact (a space in one)."""
    submit = tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "python").write_text(FAKE_RUNNER.format(py=PY))
    (submit / ".venv" / "bin" / "python").chmod(0o755)
    env, log = _batch_env(tmp_path, SLURM_SUBMIT_DIR=str(submit), HRVIT_LAUNCHER="deepspeed",
                          SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4", SLURM_TASKS_PER_NODE="4(x2)",
                          FAKE_RUNNER_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch"), RECIPE, "output.dir=a b", "train.steps=3"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (call,) = _srun_calls(log)
    assert call["options"] == {"ntasks-per-node": "1", "ntasks": "2", "gpus-per-task": "4", "cpus-per-task": "32"}
    port = str(29500 + int(JOB) % 20000)
    for node in (0, 1):
        seen = json.loads((tmp_path / f"node{node}.json").read_text())
        args = seen["args"]
        assert seen["hostfile"] == "node003 slots=4\nnode004 slots=4\n"
        assert args[:2] == ["-m", "deepspeed.launcher.runner"] and "--no_ssh" in args
        assert {k: args[args.index(k) + 1] for k in ("--node_rank", "--master_addr", "--master_port")} == {
            "--node_rank": str(node), "--master_addr": "node003", "--master_port": port}
        assert args[args.index("--module"):] == ["--module", "hrvit", "train", RECIPE, "output.dir=a b",
                                                 "train.steps=3"]


def test_frontier_sbatch_srun_step_binds_gcds_and_exports_the_rendezvous(tmp_path):
    """frontier.sbatch on 2 nodes: ROCm module loaded, then 16 tasks, 8 per node, 7 cores and one GCD each bound
    to the closest GCD, running the venv's python; MASTER_ADDR/MASTER_PORT exported to the step are node003 (first
    of node[003-004]) and 29500 + job id % 20000, and every task's rendezvous agrees."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV={venv} PATH="{venv}/bin:$PATH"\n')
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "python").chmod(0o755)
    modules = tmp_path / "modules"
    # Lmod's `module` is a shell function that changes the caller's environment; bash imports it from here
    env, log = _batch_env(tmp_path, SLURM_SUBMIT_DIR=str(REPO), HRVIT_VENV=str(venv), AWS_OFI_RCCL="/ofi/lib",
                          **{"BASH_FUNC_module%%": f'() {{ echo "$*" >> {modules}; '
                                                   'export LD_LIBRARY_PATH=/opt/rocm/lib; }'})
    env.pop("LD_LIBRARY_PATH", None)
    proc = subprocess.run(["bash", "launch/frontier.sbatch", RECIPE, "train.steps=3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert modules.read_text().split() == ["load", "PrgEnv-gnu", "craype-accel-amd-gfx90a", "rocm/6.2.4"]
    mkdir, train = _srun_calls(log)
    assert mkdir["command"] == ["mkdir", "-p", f"/tmp/miopen-tester-{JOB}"] and mkdir["options"] == {
        "ntasks-per-node": "1"}
    assert train["command"] == ["python", "-m", "hrvit", "train", RECIPE, "train.steps=3"]
    assert shutil.which("python", path=train["env"]["PATH"]) == str(venv / "bin" / "python")
    assert train["options"] == {"nodes": "2", "ntasks": "16", "ntasks-per-node": "8", "cpus-per-task": "7",
                                "gpus-per-task": "1", "gpu-bind": "closest"}
    port = str(29500 + int(JOB) % 20000)
    step = train["env"]
    assert (step["MASTER_ADDR"], step["MASTER_PORT"], step["OMP_NUM_THREADS"]) == ("node003", port, "7")
    assert step["LD_LIBRARY_PATH"] == "/ofi/lib:/opt/rocm/lib" and step["MIOPEN_USER_DB_PATH"].startswith("/tmp/")
    for procid in (0, 13):
        seen = _task_view(train, procid, per_node=8)
        assert (seen["RANK"], seen["WORLD_SIZE"], seen["MASTER_ADDR"], seen["MASTER_PORT"]) == (
            str(procid), "16", "node003", port)


FAKE_PYTHON = """#!/bin/sh
# stand-in for the checkout's .venv/bin/python: records the deepspeed launcher command line
printf '%s\\n' "$@" > "$FAKE_ARGS"
"""


@pytest.mark.parametrize("port", [None, "31234"])
def test_local_sh_starts_n_ranks_through_the_deepspeed_launcher(tmp_path, port):
    """launch/local.sh N RECIPE overrides = the checkout's python running the deepspeed launcher with N
    accelerators, MASTER_PORT (default 29500) as rendezvous port, and hrvit train with the overrides intact."""
    (tmp_path / "launch").mkdir()
    shutil.copy(REPO / "launch/local.sh", tmp_path / "launch/local.sh")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").write_text(FAKE_PYTHON)
    (tmp_path / ".venv" / "bin" / "python").chmod(0o755)
    (tmp_path / "recipe.yaml").write_text("{}\n")
    env = {**ENV, "FAKE_ARGS": str(tmp_path / "args")}
    if port:
        env["MASTER_PORT"] = port
    proc = subprocess.run(["bash", str(tmp_path / "launch/local.sh"), "3", "recipe.yaml", "output.dir=a b", "p=8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "args").read_text().splitlines() == [
        "-m", "deepspeed.launcher.runner", "--num_accelerators", "3", "--master_port", port or "29500",
        "--module", "hrvit", "train", "recipe.yaml", "output.dir=a b", "p=8"]
