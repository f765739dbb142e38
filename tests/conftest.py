import inspect
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


PROCESS_CALLS = ("hrvit(", "run(", "_start(", "probe(", "profile(", "spawn(")


def pytest_collection_modifyitems(items):
    """Mark `slow` every test that starts processes (it calls one of PROCESS_CALLS or uses the `trained` run), so
    `-m "not slow"` is the fast subset: everything that runs in the test process itself. Under pytest-xdist
    (launch/test.sh runs two workers, `--dist loadgroup`) the tests of the `trained` run share one worker, so it
    is trained once."""
    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function else ""
        uses_trained = "trained" in getattr(item, "fixturenames", ())
        if uses_trained or any(call in source for call in PROCESS_CALLS):
            item.add_marker(pytest.mark.slow)
        if uses_trained:
            item.add_marker(pytest.mark.xdist_group("trained"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Tests run from the repository root, as the README's commands do."""
    monkeypatch.chdir(REPO)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
               "CROSS_SIZE")


def run(cmd: list, ranks: int = 1, timeout: int = 400, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` as one process, or as `ranks` processes started the way the deepspeed launcher starts them (its
    environment variables: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT), without the
    launcher's own ~6 s start-up; the tests of the launcher itself (preemption, a lost rank, launch) use the real
    one. Output is every rank's, rank 0 first; the status is the first failing rank's. When a rank fails, the others
    get 15 s to fail too, then are killed, as the launcher does. A run that succeeds must have removed DeepSpeed's
/dev/shm buffers itself. `env` adds to (or overrides) the test environment."""
    cmd = [str(c) for c in cmd]
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env = {**base, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if ranks == 1:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        proc = _run_ranks(cmd, ranks, timeout, env, free_port())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} on {ranks} rank(s) exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def _run_ranks(cmd: list[str], ranks: int, timeout: int, env: dict, port: int) -> subprocess.CompletedProcess:
    from hrvit.parallel.dist import release_shm_buffers

    outs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(ranks)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True, env={
        **env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_SIZE": str(ranks),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CROSS_RANK": "0", "CROSS_SIZE": "1"})
        for r, (out, err) in enumerate(outs)]
    deadline, failed_at, timed_out = time.time() + timeout, None, False
    try:
        while any(p.poll() is None for p in procs):
            now = time.time()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            timed_out = now > deadline
            if timed_out or (failed_at is not None and now > failed_at + 15):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        leaked = list(pathlib.Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        release_shm_buffers(port)
    code = 124 if timed_out else next((p.returncode for p in procs if p.returncode != 0), 0)
    text = [[f.seek(0) or f.read() for f in pair] for pair in outs]
    for pair in outs:
        for f in pair:
            f.close()
    if timed_out:
        text[0][1] += f"\n[tests: killed after the {timeout} s timeout]"
    elif code == 0 and leaked:
        code, text[0][1] = 1, text[0][1] + f"\n[tests: the run left {len(leaked)} DeepSpeed buffer(s) in /dev/shm]"
    return subprocess.CompletedProcess(cmd, code, "".join(t[0] for t in text), "".join(t[1] for t in text))


def hrvit(*args, ranks: int = 1, timeout: int = 400, check: bool = True,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `hrvit` command on `ranks` processes (see `run`)."""
    return run([PY, "-m", "hrvit", *args], ranks=ranks, timeout=timeout, check=check, env=env)


@pytest.fixture(scope="session")
def slides(tmp_path_factory):
    """Six small synthetic slides (real pyramidal TIFFs) and their manifest."""
    from hrvit.data.synthetic import make_slides

    return make_slides(tmp_path_factory.mktemp("slides"), n=6, size=192, seed=3, tile=64)


@pytest.fixture(scope="session")
def volumes(tmp_path_factory):
    """Four small synthetic BraTS-layout volumes."""
    from hrvit.data.synthetic import make_volumes

    return make_volumes(tmp_path_factory.mktemp("volumes"), n=4, shape=(24, 24, 24), seed=5)


TINY = ["parallel.sp_size=1", "model.embed_dim=32", "model.depth=4", "model.num_heads=2",
        "model.decoder_channels=[16,16,16]", "data.window=64", "patching.mode=uniform", "patching.patch_size=8",
        "train.micro_batch=2", "train.warmup_steps=2", "train.log_every=1", "eval.batch=16"]
"""Overrides that make any recipe small enough for a test on two cores. They pin uniform patching,
which the window-based tests assume; adaptive tests override patching.mode and data.window."""


RECIPE = "launch/recipes/quickstart.yaml"


@pytest.fixture(scope="session")
def trained(slides, tmp_path_factory):
    """A 2-rank ZeRO-2 run of 16 steps with checkpoints at steps 8 and 16: training, evaluation and prediction
    tests read it, and the preemption test compares its resumed run with it."""
    run = tmp_path_factory.mktemp("runs") / "zero2"
    hrvit("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", *TRAINED, ranks=2)
    return run


TRAINED = ["train.steps=16", "train.ckpt_every=8", "train.lr=3e-3", "data.class_names=[background,tumour,gland]"]
