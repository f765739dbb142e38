"""Checkpoints that are either complete or ignored, and resume that refuses what cannot fit.

Layout of `RUN/checkpoints/`:

    step0000100/            one complete checkpoint (DeepSpeed's files + COMPLETE)
    step0000100/COMPLETE    JSON written last: step, model fingerprint, topology
    .tmp-step0000200/       a save in progress (or killed): never loaded, removed by the next save
    latest                  the tag of the newest complete checkpoint, replaced atomically

Every rank writes its DeepSpeed files into the temporary folder; after a barrier rank 0 writes
COMPLETE, renames the folder to its tag, points `latest` at it (write-then-`os.replace`, atomic on
POSIX file systems) and deletes all but the newest `keep_last`. A process killed at any moment
therefore leaves `latest` on a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO as UC_INFO
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY as UC_VERSION
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_VALUE as UC_VERSION_VALUE

from hrvit.errors import ConfigError
from hrvit.parallel import comm

COMPLETE = "COMPLETE"
LATEST = "latest"
TMP = ".tmp-"
UNIVERSAL_HINT = (
    "to resume on a different topology, convert it to a DeepSpeed universal checkpoint: "
    "python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt} --output_folder {ckpt}_universal, "
    "then resume from it with train.resume={ckpt}_universal and "
    "'deepspeed.overrides={{checkpoint: {{load_universal: true}}}}'")


def tag_of(step: int) -> str:
    return f"step{step:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP}{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, folder: Path, step: int, meta: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the complete checkpoint's folder."""
    tag = tag_of(step)
    tmp_tag = f"{TMP}{tag}"
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder / tmp_tag, ignore_errors=True)  # left by a killed save
    comm.barrier()
    # the universal-checkpoint mark lets ds_to_universal convert it for another topology
    client = {"step": step, UC_INFO: {UC_VERSION: UC_VERSION_VALUE}}
    engine.save_checkpoint(str(folder), tag=tmp_tag, client_state=client, save_latest=False)
    _fault_hang(step)
    comm.barrier()  # every rank's files are on disk
    final = folder / tag
    if dist.get_rank() == 0:
        (folder / tmp_tag / COMPLETE).write_text(json.dumps({"step": step, **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)  # a stale one from before a resume to an earlier step
        os.replace(folder / tmp_tag, final)
        _write_atomic(folder / LATEST, tag)
        for old in complete_tags(folder)[:-keep_last] if keep_last else []:
            shutil.rmtree(folder / old, ignore_errors=True)
    comm.barrier()
    return final


def _fault_hang(step: int) -> None:
    """Test hook: HRVIT_FAULT_SAVE_HANG=N stops the step-N save after DeepSpeed wrote its files and
    before it is marked complete, so a test can kill the process mid-save."""
    if os.environ.get("HRVIT_FAULT_SAVE_HANG") == str(step):
        print(f"hrvit: fault injection: hanging inside the step-{step} save", flush=True)
        time.sleep(3600)


def complete_tags(folder: Path) -> list[str]:
    """Tags of the complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    tags = [p.name for p in folder.iterdir() if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(tags, key=lambda t: json.loads((folder / t / COMPLETE).read_text())["step"])


def find_latest(folder: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None.
    A folder written by an older hrvit (no COMPLETE marks) is trusted as DeepSpeed's `latest` says."""
    latest = folder / LATEST
    if latest.is_file():
        named = folder / latest.read_text().strip()
        if (named / COMPLETE).is_file():
            return named
    tags = complete_tags(folder)
    if tags:
        return folder / tags[-1]
    if latest.is_file() and (folder / latest.read_text().strip()).is_dir():
        return folder / latest.read_text().strip()
    return None


def read_meta(ckpt: Path) -> dict | None:
    mark = ckpt / COMPLETE
    return json.loads(mark.read_text()) if mark.is_file() else None


def check_compatible(ckpt: Path, meta: dict, universal: bool) -> None:
    """ConfigError if `ckpt` was written for another model, or for another topology (unless it is loaded
    as a universal checkpoint); `meta` describes this run the way save() recorded it."""
    saved = read_meta(ckpt)
    if saved is None:
        return
    model = {k: (saved["model"].get(k), v) for k, v in meta["model"].items() if saved["model"].get(k) != v}
    if model:
        diff = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in sorted(model.items()))
        raise ConfigError(f"train.resume: {ckpt} was written for a different model ({diff}); "
                          "resume with the run's own config.yaml or start a new output.dir")
    topo = {k: (saved["topology"].get(k), v) for k, v in meta["topology"].items() if saved["topology"].get(k) != v}
    if topo and not universal:
        diff = ", ".join(f"{k}: checkpoint {a}, now {b}" for k, (a, b) in sorted(topo.items()))
        raise ConfigError(f"train.resume: {ckpt} was written on another topology ({diff}); "
                          + UNIVERSAL_HINT.format(ckpt=ckpt))
