"""Checkpoints that are either complete or ignored, and resume that refuses what cannot fit.

Layout of `RUN/checkpoints/`:

    step0000100/            one complete checkpoint (DeepSpeed's files + COMPLETE)
    step0000100/COMPLETE    JSON written last: step, model fingerprint, topology, every file's size
    .tmp-step0000200/       a save in progress (or killed): never loaded, removed by the next save
    latest                  the tag of the newest complete checkpoint, replaced atomically

Every rank writes its DeepSpeed files into the temporary folder; after a barrier rank 0 writes
COMPLETE, renames the folder to its tag, points `latest` at it (write-then-`os.replace`, atomic on
POSIX file systems) and deletes all but the newest `keep_last`. A process killed at any moment
therefore leaves `latest` on a complete checkpoint.

A complete checkpoint can still be damaged later (a full disk during a copy, a cut transfer): before
anything loads one, check_files() compares the files with the sizes COMPLETE recorded and opens each
torch file's zip directory (milliseconds, whatever the checkpoint's size), and names the damaged file
together with the previous complete checkpoint and how to use it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import torch.distributed as dist
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO as UC_INFO
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY as UC_VERSION
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_VALUE as UC_VERSION_VALUE

from hrvit.errors import ConfigError, DataError
from hrvit.parallel import comm

COMPLETE = "COMPLETE"
LATEST = "latest"
TMP = ".tmp-"
UNIVERSAL_HINT = (
    "to resume on a different topology, convert it to a DeepSpeed universal checkpoint: "
    "python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt} --output_folder {ckpt}_universal, "
    "then resume from it with train.resume={ckpt}_universal and "
    "'deepspeed.overrides={{checkpoint: {{load_universal: true}}}}'")
RESUME_WITH = "resume from it with train.resume={ckpt}"
INFER_WITH = "use it with --checkpoint {ckpt}"


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
        files = {str(p.relative_to(folder / tmp_tag)): p.stat().st_size
                 for p in sorted((folder / tmp_tag).rglob("*")) if p.is_file()}
        (folder / tmp_tag / COMPLETE).write_text(json.dumps({"step": step, **meta, "files": files}, indent=2))
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
    """DataError if a file of `ckpt` is damaged (check_files); ConfigError if `ckpt` was written for another
    model, or for another topology (unless it is loaded as a universal checkpoint); `meta` describes this run
    the way save() recorded it."""
    check_files(ckpt, RESUME_WITH)
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


def _damage(path: Path, size: int | None) -> str | None:
    """What is wrong with one file of a checkpoint (None: nothing found). A torch file is a zip archive whose
    directory sits at its end, so a cut file has none; the small records (the pickle, not the tensor data) are
    CRC-checked too. Reads the zip directory and a few KiB, not the tensors."""
    if not path.is_file():
        return "is missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"has {actual} bytes but had {size} when it was saved (truncated or overwritten)"
    if path.suffix != ".pt":
        return None
    with open(path, "rb") as f:
        if f.read(1) == b"\x80":
            return None  # torch's legacy (pre-1.6, pickle) format: no directory to check
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > actual:
                    return f"is cut short: record {info.filename} ends past the end of the file"
                if "/data/" not in info.filename and info.file_size < 1 << 24:
                    z.read(info)  # checks the record's CRC-32
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"is not a readable torch file ({err}; truncated or overwritten)"
    return None


def damaged_file(ckpt: Path) -> tuple[Path, str] | None:
    """The first damaged file of `ckpt` and what is wrong with it, or None: every file COMPLETE lists has its
    recorded size, and every torch file opens (see _damage)."""
    sizes = (read_meta(ckpt) or {}).get("files", {})
    names = sorted(set(sizes) | {p.name for p in ckpt.glob("*.pt")})
    for name in names:
        why = _damage(ckpt / name, sizes.get(name))
        if why:
            return ckpt / name, why
    return None


def previous_complete(ckpt: Path) -> Path | None:
    """The newest complete, undamaged checkpoint next to `ckpt` from an earlier step."""
    step = (read_meta(ckpt) or {}).get("step")
    for tag in reversed(complete_tags(ckpt.parent)):
        other = ckpt.parent / tag
        if other != ckpt and (step is None or read_meta(other)["step"] < step) and damaged_file(other) is None:
            return other
    return None


def check_files(ckpt: Path, use_with: str) -> None:
    """DataError naming the damaged file of `ckpt`, offering the previous complete checkpoint (`use_with` says
    how to choose it: RESUME_WITH or INFER_WITH). Before loading: torch's own error names no file."""
    bad = damaged_file(ckpt)
    if bad is None:
        return
    path, why = bad
    prev = previous_complete(ckpt)
    offer = (f"the previous complete checkpoint is {prev}: {use_with.format(ckpt=prev)}" if prev else
             f"{ckpt.parent} holds no earlier complete checkpoint: restore {path.name} from a copy or train again")
    raise DataError(f"{path} {why}, so checkpoint {ckpt} cannot be loaded; {offer}")


def choose(folder: Path, spec: str | Path | None) -> Path:
    """The checkpoint `hrvit eval/predict --checkpoint` names: a tag in the run's `folder` (step0000008), a step
    folder, or a checkpoints/ folder (its newest complete one); None: the newest complete one in `folder`."""
    if spec is None:
        found = find_latest(folder)
        if found is None:
            raise ConfigError(f"{folder.parent}: no complete checkpoint found in {folder}")
        return found
    for path in (Path(spec), folder / str(spec)):
        if (path / LATEST).is_file() and find_latest(path) is not None:
            return find_latest(path)
        if path.is_dir() and ((path / COMPLETE).is_file() or any(path.glob("*.pt"))):
            return path
    raise ConfigError(f"--checkpoint: {spec} is neither a checkpoint folder nor a checkpoint of {folder} "
                      f"(complete ones: {', '.join(complete_tags(folder)) or 'none'})")


def check_geometry(ckpt: Path, ndim: int, channels: int, what: str, fix: str = "") -> None:
    """DataError if the model saved in `ckpt` takes other images than `what` (`ndim`-D, `channels` channels),
    from COMPLETE, before any weights are read; a checkpoint without it is checked when its weights load."""
    saved = (read_meta(ckpt) or {}).get("model", {})
    if "ndim" not in saved or (saved["ndim"], saved["channels"]) == (ndim, channels):
        return
    n, c = saved["ndim"], saved["channels"]
    needs = f"{c} NIfTI file(s) per volume, one per channel" if n == 3 else f"slides or pictures with {c} channel(s)"
    raise DataError(f"{what}: {ndim}-D image with {channels} channel(s), but the model of {ckpt} takes "
                    f"{n}-D images with {c} channel(s) ({needs}){fix}")
