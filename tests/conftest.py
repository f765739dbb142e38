import os
import pathlib
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


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


def hrvit(*args, ranks: int = 1, timeout: int = 400, check: bool = True,
          env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `hrvit` command: one process, or `ranks` processes under the deepspeed launcher; `env`
    adds to (or overrides) the test environment."""
    if ranks == 1:
        cmd = [PY, "-m", "hrvit", *map(str, args)]
    else:
        launcher = pathlib.Path(PY).parent / "deepspeed"
        port = free_port()
        cmd = [str(launcher), "--num_accelerators", str(ranks), "--master_port", str(port),
               "--module", "hrvit", *map(str, args)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        if ranks > 1:
            from hrvit.parallel.dist import release_shm_buffers

            release_shm_buffers(port)  # the run may have failed before its own clean-up
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


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
