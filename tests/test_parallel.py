"""Sequence parallelism (Ulysses) with ZeRO, proven equal to one process; launcher environments.

The end-to-end tests run the real training (tests/sp_probe.py wraps `hrvit train` and saves each
rank's parameters) under the deepspeed launcher, srun-like Slurm variables and mpirun, on CPU/gloo.
Uniform windows of 56 px at p = 8 give 49 tokens and the adaptive budget is 47 tokens (real leaves
then masked padding): odd counts, so SP = 2 always pads the sequence too.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PY, REPO, TINY, free_port, hrvit

from hrvit.errors import ConfigError
from hrvit.parallel.dist import release_shm_buffers
from hrvit.parallel.env import discover, first_host, slurm_port
from hrvit.parallel.shard import shard_batch
from hrvit.parallel.topology import check_parallel

RECIPE = "launch/recipes/quickstart.yaml"
SMALL = [*TINY, "parallel.sp_size=1", "patching.mode=uniform", "data.window=56", "train.steps=5",
         "train.lr=3e-3", "train.grad_clip=0.05", "eval.max_cases=1", "output.picture=false"]
"""5 optimizer steps; grad_clip this small clips every step, so the gradient norm is under test too."""
VOLUME = [*TINY, "parallel.sp_size=1", "patching.mode=uniform", "data.window=12", "patching.patch_size=4",
          "model.decoder_channels=[16,16]", "train.steps=5", "train.micro_batch=1", "eval.max_cases=1",
          "eval.batch=8"]
"""3-D: 12^3 windows at p = 4 give 27 tokens (odd, so SP = 2 pads)."""
PATCHING = {"uniform": [], "adaptive": ["patching.mode=adaptive", "patching.tokens=47", "data.window=null"]}
"""Adaptive: quadtree leaves of each whole 192^2 slide, 47 tokens per sample."""
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)


# ---------------------------------------------------------------- helpers


def probe(out: Path, *overrides, ranks: int = 1, recipe: str = RECIPE) -> dict:
    """Train with tests/sp_probe.py on `ranks` processes; returns losses, summary and each rank's parameters."""
    script = ["tests/sp_probe.py", str(out), recipe, f"output.dir={out / 'run'}", *map(str, overrides)]
    if ranks == 1:
        cmd = [PY, *script]
    else:
        port = free_port()
        cmd = [str(Path(PY).parent / "deepspeed"), "--num_accelerators", str(ranks), "--master_port", str(port),
               *script]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    finally:
        if ranks > 1:
            release_shm_buffers(port)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = out / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"losses": {r["step"]: r["loss"] for r in rows if "loss" in r},
            "summary": json.loads((run / "summary.json").read_text()),
            "params": [torch.load(out / f"params_rank{r}.pt") for r in range(ranks)]}


def assert_same_training(ref: dict, got: dict, tol: float = 1e-5) -> None:
    assert sorted(got["losses"]) == sorted(ref["losses"]) == [1, 2, 3, 4, 5]
    for step, loss in ref["losses"].items():
        assert abs(got["losses"][step] - loss) <= tol, (step, ref["losses"], got["losses"])
    first = ref["params"][0]
    for name, value in got["params"][0].items():
        diff = (value - first[name]).abs().max().item()
        assert diff <= tol, f"{name} differs by {diff}"
    assert got["params"][0].keys() == first.keys()


def assert_ranks_identical(got: dict) -> None:
    for r, params in enumerate(got["params"][1:], start=1):
        for name, value in params.items():
            assert torch.equal(value, got["params"][0][name]), f"rank {r} holds a different {name}"


def assert_same_eval(ref: dict, got: dict) -> None:
    """Full-resolution Dice under SP equals the one-process Dice of (nearly) the same weights."""
    a, b = ref["summary"], got["summary"]
    assert a["dice_mean"] is not None and abs(a["dice_mean"] - b["dice_mean"]) <= 1e-4, (a, b)
    for name, value in a["dice_per_class"].items():
        other = b["dice_per_class"][name]
        assert (value is None) == (other is None) and (value is None or abs(value - other) <= 1e-4), (name, a, b)


@pytest.fixture(scope="module")
def references(slides, tmp_path_factory):
    """One-process runs, made once per ZeRO stage and shared by the tests that compare against them."""
    cache = {}

    def get(stage: int, patching: str) -> dict:
        if (stage, patching) not in cache:
            cache[stage, patching] = probe(tmp_path_factory.mktemp(f"ref{stage}{patching}"), *SMALL,
                                           *PATCHING[patching], f"data.manifest={slides}",
                                           f"deepspeed.config=ds_configs/zero{stage}.json")
        return cache[stage, patching]

    return get


# ---------------------------------------------------------------- training equals one process


@pytest.mark.slow
@pytest.mark.parametrize("stage, checkpoint, patching", [
    (1, False, "uniform"), (2, False, "uniform"), (3, True, "uniform"), (2, True, "adaptive")])
def test_sp2_training_matches_one_process(references, slides, tmp_path, stage, checkpoint, patching):
    """SP = 2 on 2 ranks vs 1 process on the same data, ZeRO 1/2/3, 5 steps: losses and every
    parameter within 1e-5, parameters bit-identical on both SP ranks, the same full-resolution Dice.
    Activation checkpointing is on in some runs and off in others: both match one process."""
    got = probe(tmp_path, *SMALL, *PATCHING[patching], f"data.manifest={slides}",
                f"deepspeed.config=ds_configs/zero{stage}.json", "parallel.sp_size=2",
                f"model.checkpoint_activations={str(checkpoint).lower()}", ranks=2)
    assert got["summary"]["sp_size"] == 2 and got["summary"]["dp_size"] == 1
    assert got["summary"]["patching"] == patching
    ref = references(stage, patching)
    assert_same_training(ref, got)
    assert_ranks_identical(got)
    assert_same_eval(ref, got)


@pytest.mark.slow
def test_dp2_x_sp2_on_4_ranks_matches_dp2(slides, tmp_path):
    """4 ranks as 2 data-parallel x 2 sequence-parallel vs 2 data-parallel ranks (ZeRO-2, 2 micro-batches
    accumulated per step): losses and parameters within 1e-5, identical on all 4 ranks."""
    common = [*SMALL, f"data.manifest={slides}", "eval.max_cases=0", "train.micro_batch=1", "train.grad_accum=2"]
    ref = probe(tmp_path / "dp2", *common, ranks=2)
    got = probe(tmp_path / "dp2sp2", *common, "parallel.sp_size=2", ranks=4)
    assert got["summary"]["dp_size"] == 2 and got["summary"]["world_size"] == 4
    assert_same_training(ref, got)
    assert_ranks_identical(got)


@pytest.mark.slow
def test_3d_sp2_training_matches_one_process(volumes, tmp_path):
    recipe = "launch/recipes/quickstart3d.yaml"
    common = [*VOLUME, f"data.root={volumes}", "deepspeed.config=ds_configs/zero1.json"]
    ref = probe(tmp_path / "one", *common, recipe=recipe)
    got = probe(tmp_path / "sp2", *common, "parallel.sp_size=2", "model.checkpoint_activations=true",
                ranks=2, recipe=recipe)
    assert_same_training(ref, got)
    assert_ranks_identical(got)
    assert_same_eval(ref, got)


# ---------------------------------------------------------------- model level: attention, loss, drop-path


def _model_worker(rank, world, port, ndim, checkpoint):
    """Each rank runs the whole model once alone and once as part of the SP group, and compares."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from hrvit.engine.losses import loss_from_sums, segmentation_loss, segmentation_sums
    from hrvit.models import build_model
    from hrvit.parallel.attention import ulysses_core
    from hrvit.parallel.dist import init_distributed
    from hrvit.parallel.shard import gather_tokens, sum_over_group
    from hrvit.parallel.topology import SequenceParallel

    init_distributed(60)
    sp = SequenceParallel(world)
    p, length = 4, 11
    torch.manual_seed(0)
    model = build_model("nano", ndim=ndim, patch_size=p, in_chans=2, num_classes=3, embed_dim=32, depth=4,
                        num_heads=4, decoder_channels=[8, 8], drop_path=0.3, checkpoint_activations=checkpoint)
    pixels = torch.randn(2, length, 2, *(p,) * ndim)
    boxes = torch.cat([torch.randint(0, 60, (2, length, ndim)), torch.full((2, length, ndim), p)], -1)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[0, 3] = valid[1, 5] = False  # padding inside the sequence, as adaptive patching leaves it
    valid[0, 8:] = False
    target = torch.randint(-1, 3, (2, length, *(p,) * ndim))
    shape = torch.full((2, ndim), 64)

    torch.manual_seed(1)  # drop-path draws: the same on every rank and in the reference
    ref_logits = model(pixels, boxes, valid, shape)
    ref_loss = segmentation_loss(ref_logits[valid], target[valid])
    ref_loss.backward()
    ref_grads = {n: q.grad.clone() for n, q in model.named_parameters()}
    model.zero_grad()

    model.encoder.set_attention_core(ulysses_core(sp.group))
    local = shard_batch({"pixels": pixels, "boxes": boxes, "valid": valid, "target": target}, world, sp.sp_rank)
    torch.manual_seed(1)
    logits = model(local["pixels"], local["boxes"], local["valid"], shape, local["key_valid"])
    lv = local["valid"]
    loss = loss_from_sums(sum_over_group(segmentation_sums(logits[lv], local["target"][lv]), sp.group))
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    full = gather_tokens(logits.detach(), sp.group, length)
    torch.testing.assert_close(full[valid], ref_logits.detach()[valid], rtol=0, atol=1e-5)
    for name, q in model.named_parameters():
        dist.all_reduce(q.grad)  # what ZeRO 0-2 do over an SP group
        torch.testing.assert_close(q.grad, ref_grads[name], rtol=0, atol=1e-5, msg=name)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("ndim, checkpoint", [(2, False), (2, True), (3, True)])
def test_ulysses_model_matches_one_process(ndim, checkpoint):
    """Whole model (encoder with Ulysses attention + per-token decoder + Dice/CE from summed counts),
    with padding inside the sequence and drop-path on: logits, loss and summed gradients on 2 ranks
    equal the one-process ones (1e-5)."""
    torch.multiprocessing.spawn(_model_worker, args=(2, free_port(), ndim, checkpoint), nprocs=2)


def test_loss_from_split_sums_equals_whole_loss():
    from hrvit.engine.losses import loss_from_sums, segmentation_loss, segmentation_sums

    logits = torch.randn(7, 3, 4, 4, requires_grad=True)
    target = torch.randint(-1, 3, (7, 4, 4))
    whole = segmentation_loss(logits, target, 0.7, 1.3)
    split = loss_from_sums(segmentation_sums(logits[:3], target[:3]) + segmentation_sums(logits[3:], target[3:]),
                           0.7, 1.3)
    g_whole, = torch.autograd.grad(whole, logits)
    g_split, = torch.autograd.grad(split, logits)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-7)
    empty = segmentation_loss(logits, torch.full_like(target, -1))
    assert empty.item() == 0.0 and empty.requires_grad


def test_shard_batch_pads_with_invalid_tokens_and_keeps_the_whole_mask():
    valid = torch.tensor([[True, True, False, True, True]])
    batch = {"pixels": torch.arange(5.0).view(1, 5, 1), "valid": valid, "target": torch.zeros(1, 5, 2).long()}
    parts = [shard_batch(batch, 2, r) for r in range(2)]
    assert [p["pixels"].flatten().tolist() for p in parts] == [[0, 1, 2], [3, 4, 0]]
    assert parts[1]["valid"].tolist() == [[True, True, False]] and parts[1]["target"][0, 2].tolist() == [-1, -1]
    for p in parts:
        assert p["key_valid"].tolist() == [[True, True, False, True, True, False]]
    with pytest.raises(ConfigError, match="parallel.sp_size: 8 is more than the 5 token"):
        shard_batch(batch, 8, 0)


# ---------------------------------------------------------------- topology and config errors


@pytest.mark.parametrize("sp, world, heads, message", [
    (2, 2, 3, "does not divide the model's 3 attention heads"),
    (4, 2, 4, "needs at least 4 ranks, but 2 were launched"),
    (2, 3, 4, "does not divide the 3 launched ranks"),
])
def test_bad_topology_is_a_config_error(sp, world, heads, message):
    with pytest.raises(ConfigError, match=message):
        check_parallel(sp, world, heads)
    check_parallel(2, 4, 4)


def test_sp_size_larger_than_the_launch_exits_2_and_writes_nothing(slides, tmp_path):
    run = tmp_path / "run"
    proc = hrvit("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "parallel.sp_size=2",
                 check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel.sp_size: 2 needs at least 2 ranks, but 1 was launched" in proc.stderr
    assert "Traceback" not in proc.stderr and not run.exists()


def test_zero3_without_reduce_scatter_is_refused_under_sp():
    from hrvit.parallel.topology import grad_sum_factor

    assert grad_sum_factor({"zero_optimization": {"stage": 2}}, 2) == 1
    assert grad_sum_factor({"zero_optimization": {"stage": 3}}, 2) == 2
    with pytest.raises(ConfigError, match="reduce_scatter=false"):
        grad_sum_factor({"zero_optimization": {"stage": 3, "reduce_scatter": False}}, 2)


# ---------------------------------------------------------------- launcher environments


@pytest.mark.parametrize("nodelist, host", [
    ("node07", "node07"), ("node[01-04]", "node01"), ("node[03,05-06],gpu1", "node03"),
    ("gpu1,node[1-2]", "gpu1"), ("frontier[00123-00125]", "frontier00123"), ("rack[2-3]-n[10-11]", "rack2-n10"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_discover_maps_each_launcher():
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_JOB_ID": "1234"}
    assert discover(slurm) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                               "MASTER_PORT": slurm_port("1234")}
    assert discover({**slurm, "MASTER_PORT": "4000", "MASTER_ADDR": "10.0.0.1"})["MASTER_ADDR"] == "10.0.0.1"
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"}
    assert discover(launcher) == launcher
    assert discover({})["WORLD_SIZE"] == "1"
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})["WORLD_SIZE"] == "1"  # one task: no rendezvous


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2"}, "RANK is not set although WORLD_SIZE is"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}, "SLURM_JOB_NODELIST is not set"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"}, "SLURM_JOB_ID is not set"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "MASTER_ADDR is not set: started by MPI"),
])
def test_missing_rendezvous_variables_are_named(monkeypatch, env, message):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if mpi4py were not installed
    with pytest.raises(ConfigError, match=message):
        discover(env)


def test_unreachable_master_is_an_error_not_a_hang(slides, tmp_path):
    env = {**ENV, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([PY, "-m", "hrvit", "train", RECIPE, *TINY, f"data.manifest={slides}",
                           f"output.dir={tmp_path / 'run'}", "parallel.timeout_s=3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not join the process group at MASTER_ADDR=127.0.0.1" in proc.stderr
    assert "parallel.timeout_s=3" in proc.stderr and "Traceback" not in proc.stderr


FAKE_SRUN = """#!/usr/bin/env bash
# test stand-in for srun: SLURM_NTASKS copies of the command, each given only SLURM_PROCID/SLURM_LOCALID
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.slow
def test_slurm_sbatch_tasks_with_only_slurm_variables_train_as_one_sp_group(slides, tmp_path):
    """launch/slurm.sbatch as Slurm runs it, with a stand-in srun that gives each task only what srun
    does (SLURM_PROCID/LOCALID/NTASKS, the node list, the job id; no RANK/WORLD_SIZE/MASTER_*): the two
    tasks train as one SP = 2 group, and `hrvit eval` of the checkpoint they wrote (one process)
    reproduces the full-resolution Dice the SP group computed."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "srun").chmod(0o755)
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
    assert json.loads((run / "eval.json").read_text())["dice_mean"] == pytest.approx(summary["dice_mean"], abs=1e-4)


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
