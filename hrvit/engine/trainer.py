"""The training run, top to bottom: check inputs, build, train, evaluate, summarise.

Everything random is seeded from the config: data windows by (seed, sample index), and the
torch generator (dropout, drop-path) by (seed, step, data-parallel rank) at every step. That is
why a run resumed from a checkpoint continues exactly like the uninterrupted run without saving
any generator state, and why the ranks of a sequence-parallel group, which share a data-parallel
rank, see the same samples and make the same random draws.

Under sequence parallelism (parallel.sp_size > 1) each rank of a group keeps a slice of every
sample's tokens (hrvit/parallel/shard.py); attention spans the group (hrvit/parallel/attention.py);
the loss is computed from sums added over the group, so it is the loss of the whole sequence.

Long runs (docs/cluster.md, "Running for days"): checkpoints are atomic (hrvit/engine/checkpoint.py);
SIGTERM/SIGUSR1 make every rank finish its step, checkpoint and raise Preempted; SIGUSR2
checkpoints and goes on; a step whose loss is not finite on any rank is skipped on all of them. The
ranks agree on all three through one small all-reduce per step. Everything segmentation-specific
lives in the task objects (hrvit/engine/segment.py, hrvit/engine/classify.py); the set-up and the
loss of one micro-batch are hrvit/engine/session.py's, shared with tools/profile.py and tools/memory_sp.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from hrvit.config import REPO_ROOT, Config, to_yaml, zero_stage
from hrvit.data.windows import StepSampler, TrainWindows
from hrvit.engine import checkpoint
from hrvit.engine.log import CSV, TENSORBOARD, RunLog, check_logging, forget_csv_after
from hrvit.engine.session import Session, on_rank0_then_share, parameter_count, precision, start
from hrvit.errors import PREEMPTED_EXIT, ConfigError, DataError, HrvitError
from hrvit.parallel import comm
from hrvit.parallel.dist import is_main
from hrvit.patching import collate

CHECKPOINTS = "checkpoints"
SKIPPED = "skipped_samples.jsonl"


class Preempted(Exception):
    """Raised on every rank once the checkpoint after SIGTERM/SIGUSR1 is complete; `hrvit train` then exits
    with cli.PREEMPTED_EXIT so a job script can requeue."""


FAILED = "FAILED"
"""Marks a run folder whose run failed before its first checkpoint: nothing to resume, so a new run may reuse it."""
RUN_FILES = ("metrics.jsonl", CSV, "environment.json", "config.yaml", "deepspeed.json", SKIPPED, FAILED)


def prepare_run_dir(cfg: Config) -> Path:
    """Refuse to mix two runs in one folder; a resume continues the run that is there; a run that failed before
    its first checkpoint (FAILED) is replaced."""
    run = check_run_dir(cfg)
    if (run / FAILED).is_file() and latest_checkpoint(run) is None:
        comm.barrier()  # every rank has seen the marker before rank 0 removes it
        if is_main():
            for name in RUN_FILES:
                (run / name).unlink(missing_ok=True)
            shutil.rmtree(run / TENSORBOARD, ignore_errors=True)
        return run
    return run


def check_run_dir(cfg: Config) -> Path:
    """ConfigError when output.dir holds another run and no resume was asked for: checked before the data
    checks, which can take minutes on a gigapixel slide."""
    run = Path(cfg.output.dir)
    failed = (run / FAILED).is_file() and latest_checkpoint(run) is None
    if not failed and (run / "metrics.jsonl").exists() and cfg.train.resume is None:
        raise ConfigError(f"output.dir: {run} already holds a run; set train.resume=auto to continue it "
                          "or choose another output.dir")
    return run


@contextlib.contextmanager
def failed_unless_resumable(run: Path, main: bool):
    """A run that fails before any checkpoint is complete leaves FAILED (with its error) in its folder, so the
    folder is not mistaken for a run to resume, and the next run into it replaces it."""
    try:
        yield
    except Preempted:
        raise
    except BaseException as err:
        if main and latest_checkpoint(run) is None:
            (run / FAILED).write_text(f"{type(err).__name__}: {str(err).strip()[:2000]}\n")
        raise


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    return checkpoint.find_latest(run / CHECKPOINTS)


def resume_checkpoint(cfg: Config, run: Path) -> Path | None:
    """The checkpoint train.resume names: 'auto' -> the run's newest complete one (or none), else a
    checkpoints/ folder (its newest complete one) or one step folder."""
    if cfg.train.resume is None:
        return None
    if cfg.train.resume == "auto":
        return latest_checkpoint(run)
    path = Path(cfg.train.resume)
    found = checkpoint.find_latest(path) if (path / checkpoint.LATEST).is_file() else path
    if found is None or not found.is_dir() or not any(found.iterdir()):
        raise ConfigError(f"train.resume: {path} holds no complete checkpoint (a run's checkpoints/ folder "
                          "or one step folder in it)")
    return found


def _forget_after(path: Path, step: int) -> None:
    """Drop the JSON lines of steps after `step` (written before a crash, about to be redone) and a line cut
    short by the crash, atomically."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return line.endswith("\n") and json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def environment(world: int) -> dict:
    """What reproduces the run besides config.yaml: versions, git commit, command line, host."""
    import deepspeed
    import numpy

    from hrvit import __version__

    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"hrvit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "numpy": numpy.__version__,
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "argv": sys.argv, "host": platform.node(), "world_size": world, "torch_threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def checkpoint_meta(session: Session, model) -> dict:
    """What a checkpoint must match to be resumed: the model's shape, and the topology (ZeRO shards)."""
    cfg, ndim, channels, world, ds_config = session.cfg, session.ndim, session.channels, session.world, \
        session.ds_config
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.state_dict().items())
    m = cfg.model
    return {"model": {"preset": m.preset, "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads,
                      "decoder_channels": m.decoder_channels, "patch_size": cfg.patching.patch_size,
                      "num_classes": cfg.data.num_classes, "ndim": ndim, "channels": channels,
                      "parameter_shapes": hashlib.sha1(shapes.encode()).hexdigest()[:16]},
            "topology": {"world_size": world, "sp_size": cfg.parallel.sp_size, "zero_stage": zero_stage(ds_config)},
            "schedule": {"scheduler": ds_config.get("scheduler"),
                         "lr": ds_config.get("optimizer", {}).get("params", {}).get("lr")}}


SCHEDULE_KEYS = {"total_num_steps": "train.steps", "warmup_num_steps": "warm-up steps",
                 "cos_min_ratio": "train.min_lr_ratio"}


def _lr_at(schedule: dict, iteration: int) -> float | None:
    """The learning rate DeepSpeed's scheduler of `schedule` (as checkpoint_meta records it) gives after
    `iteration` + 1 optimizer steps, or None for a schedule it cannot rebuild."""
    from deepspeed.runtime import lr_schedules

    sched = schedule.get("scheduler") or {}
    try:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=schedule["lr"])
        made = getattr(lr_schedules, sched["type"])(opt, **sched.get("params", {}), last_batch_iteration=iteration)
        return float(made.get_lr()[0])
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def schedule_change(saved: dict | None, meta: dict, start_step: int) -> str | None:
    """One line saying what happens to the learning rate when a run resumes with another schedule (e.g. a finished
    run extended with train.steps): DeepSpeed restores only the scheduler's step count, so the new schedule takes
    over at that step, and the learning rate jumps to the new schedule's value there."""
    old, new = (saved or {}).get("schedule"), meta["schedule"]
    if old is None or old == new or not start_step:
        return None
    a, b = old.get("scheduler") or {}, new.get("scheduler") or {}
    changed = [f"{SCHEDULE_KEYS.get(k, k)} {a.get('params', {}).get(k)} -> {v}"
               for k, v in b.get("params", {}).items() if a.get("params", {}).get(k) != v]
    if old.get("lr") != new.get("lr"):
        changed.append(f"train.lr {old.get('lr')} -> {new.get('lr')}")
    if a.get("type") != b.get("type"):
        changed.append(f"scheduler {a.get('type')} -> {b.get('type')}")
    before, after = _lr_at(old, start_step - 1), _lr_at(new, start_step - 1)
    end = _lr_at(new, int(b.get("params", {}).get("total_num_steps", start_step)) - 1)
    jump = (f"the learning rate for step {start_step + 1} becomes {after:.3g} (the checkpoint's schedule had "
            f"{before:.3g} there), then follows the new schedule to {end:.3g}" if None not in (before, after, end)
            else "the learning rate follows the new schedule from there")
    return (f"hrvit: warning: the learning-rate schedule differs from the checkpoint's ({', '.join(changed)}); "
            f"DeepSpeed keeps only the step count ({start_step}), so {jump}")


class Signals:
    """SIGTERM/SIGUSR1/SIGINT ask for checkpoint-and-exit, SIGUSR2 for a checkpoint; the loop polls `wanted()`.

    Python runs a signal's handler only between bytecodes, so a step stuck in one long C++ call would keep the
    first signal waiting forever. A watcher thread reads the signal numbers that the interpreter's C-level
    handler writes to its wakeup socket at once: after a stop signal it gives the step and its checkpoint
    train.stop_grace_s, then (or on a second stop signal) exits with status 75, the last complete checkpoint
    intact (checkpoints are atomic)."""

    STOP, SAVE = 0, 1
    STOPPING = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, grace_s: float, run: str):
        self.flags = [0.0, 0.0]
        self.received = None
        self.grace_s, self.run, self.stops = grace_s, run, 0
        for sig in (*self.STOPPING, signal.SIGUSR2):
            signal.signal(sig, self._handle)
        self._wakeup, writer = socket.socketpair()
        writer.setblocking(False)
        self._writer = writer  # kept open for the life of the process
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="hrvit-signals", daemon=True).start()

    def _handle(self, signum, frame):
        self.flags[self.SAVE if signum == signal.SIGUSR2 else self.STOP] = 1.0
        self.received = signal.Signals(signum).name

    def _watch(self) -> None:
        while data := self._wakeup.recv(64):
            for signum in data:
                if signum not in self.STOPPING:
                    continue
                self.stops += 1
                name = signal.Signals(signum).name
                if self.stops == 1:
                    timer = threading.Timer(self.grace_s, self._leave, (
                        f"{name}: the step and its checkpoint did not end within train.stop_grace_s={self.grace_s} s",))
                    timer.daemon = True
                    timer.start()
                else:
                    self._leave(f"a second stop signal ({name})")

    def _leave(self, why: str) -> None:
        print(f"hrvit: {why}; exiting now without a new checkpoint (the last complete one is intact; resume: "
              f"hrvit train --resume {self.run})", file=sys.stderr, flush=True)
        os._exit(PREEMPTED_EXIT)

    def wanted(self, bad_step: bool) -> tuple[bool, bool, bool]:
        """(stop, save, bad) agreed by all ranks: true if any rank got the signal or saw a bad step."""
        stop, save, bad = comm.reduce_values([*self.flags, float(bad_step)], comm.MAX)
        self.flags[self.SAVE] = 0.0
        return bool(stop), bool(save), bool(bad)


def _fault_slow(done: int) -> None:
    """Test hook: HRVIT_FAULT_SLOW_STEP=N makes step N take an hour (a step that does not end)."""
    if str(done) == os.environ.get("HRVIT_FAULT_SLOW_STEP"):
        time.sleep(3600)


def _fault_nan(done: int, rank: int) -> bool:
    """Test hook: HRVIT_FAULT_NAN_STEP=N[,M...] makes rank 0's loss NaN at steps N, M, ..."""
    return rank == 0 and str(done) in os.environ.get("HRVIT_FAULT_NAN_STEP", "").split(",")


@contextlib.contextmanager
def name_lost_workers(workers: int, sampler: StepSampler, dataset: TrainWindows, batches: Batches):
    """A data-loader worker killed without a Python error (signal, out of memory) surfaces anywhere in the loop
    as RuntimeError (or a broken queue); turn it into a DataError naming the samples that were being read:
    those of the next 2 x workers micro-batches (DataLoader's prefetch)."""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as err:
        if workers == 0 or isinstance(err, RuntimeError) and "DataLoader worker" not in str(err):
            raise
        batches.close()
        fetched = batches.fetched
        ks = [k for p in range(fetched[0], fetched[0] + 2 * workers)
              if sampler.start_step + p // sampler.grad_accum < sampler.steps
              for k in sampler.indices(sampler.start_step + p // sampler.grad_accum, p % sampler.grad_accum)]
        case_of = getattr(dataset, "case_of", None)
        cases = f" (cases {', '.join(sorted({case_of(k).id for k in ks}))})" if case_of else ""
        raise DataError(f"a data-loader worker died while samples {ks}{cases} were being read "
                        f"({type(err).__name__}: {err.args[0] if err.args else ''}); run hrvit check-data, or "
                        "give the workers more memory") from None


def all_agree_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (one all-reduce): all ranks then skip, or none."""
    return comm.reduce_values([0.0 if torch.isfinite(loss.detach()).all() else 1.0], comm.MAX)[0] == 0.0


def write_run_files(session: Session, run: Path, start_step: int, bad_cases: list) -> None:
    """Rank 0 writes what reproduces the run (config, DeepSpeed JSON, environment) and the dropped cases, and
    forgets logged steps after the one resumed from; every rank then waits for it."""
    if session.rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", SKIPPED):
            _forget_after(run / name, start_step)
        forget_csv_after(run / CSV, start_step)
        (run / "config.yaml").write_text(to_yaml(session.cfg))
        (run / "deepspeed.json").write_text(json.dumps(session.ds_config, indent=2))
        (run / "environment.json").write_text(json.dumps(
            {**environment(session.world), "resumed_from_step": start_step}, indent=2))
        if bad_cases:
            with open(run / SKIPPED, "a") as f:
                f.writelines(json.dumps({"step": start_step, "case": spec.id, "path": str(spec.image[0]),
                                         "error": msg, "dropped": True}) + "\n" for spec, msg in bad_cases)
    comm.barrier()


def _quiet_worker(worker_id: int) -> None:
    """A data-loader worker keeps the training process's signal handlers (a scheduler's SIGTERM reaches it too,
    and must not kill it before the step's checkpoint) but not its wakeup socket, so Signals does not count the
    worker's copy of a signal as a second one."""
    signal.set_wakeup_fd(-1)


class Batches:
    """The loader's micro-batches in order, with the samples the dataset had to skip logged (by one rank per SP
    group: the group shares its samples) and the counts the summary reports."""

    def __init__(self, session: Session, dataset, sampler: StepSampler, run: Path):
        self.loader = iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=getattr(dataset, "collate", collate),
            num_workers=session.cfg.data.workers, persistent_workers=session.cfg.data.workers > 0,
            worker_init_fn=_quiet_worker))
        self.session, self.run, self.fetched = session, run, [0]
        self.counts = {"samples": 0, "tokens": 0, "skipped_samples": 0, "bad_steps": 0, "overflow_steps": 0}

    def close(self) -> None:
        """Stop the loader's workers now, after one died: left to the garbage collector, torch reports the dead
        worker again from the loader's __del__, as an ignored-exception traceback."""
        stop = getattr(self.loader, "_shutdown_workers", None)
        if stop is not None:
            with contextlib.suppress(RuntimeError, ConnectionError, EOFError):
                stop()

    def next(self, step: int) -> dict:
        batch = next(self.loader)
        self.fetched[0] += 1
        s, leader = self.session, self.session.sp_rank == 0
        self.counts["samples"] += len(batch["meta"]) * s.dp_size
        self.counts["tokens"] += s.task.tokens(batch) * s.dp_size
        skipped = [m for meta in batch["meta"] for m in meta.get("skipped", [])]
        if skipped and leader:
            with open(self.run / SKIPPED, "a") as f:
                f.writelines(json.dumps({"step": step + 1, "rank": s.rank, **m}) + "\n" for m in skipped)
        self.counts["skipped_samples"] += len(skipped) if leader else 0
        return batch


def train_step(session: Session, batches: Batches, step: int) -> tuple[float, bool]:
    """One optimizer step of train.grad_accum micro-batches: (mean loss, whether every loss was finite).
    A non-finite loss on any rank skips the step on every rank (with accumulation it goes through backward
    and ZeRO-1/2 drop the update themselves)."""
    t, engine = session.cfg.train, session.engine
    step_loss, finite = 0.0, True
    for micro in range(t.grad_accum):
        loss = session.loss(batches.next(step))
        if _fault_nan(step + 1, session.rank) and micro == 0:
            loss = loss * float("nan")
        if not all_agree_finite(loss):
            finite = False
            if t.grad_accum == 1:
                break  # no backward, no optimizer or scheduler step
        session.backward(loss)
        engine.step()
        step_loss += loss.item() / t.grad_accum
    if not finite and t.grad_accum > 1 and engine.was_step_applied():
        raise HrvitError(f"train: step {step + 1} had a non-finite loss and DeepSpeed applied it (with "
                         "train.grad_accum > 1 only ZeRO-1/2 in fp32/fp16 drop such steps); resume from the "
                         "last checkpoint with a lower train.lr, or check the data")
    return step_loss, finite


def train(cfg: Config) -> dict | None:
    """Run training as configured; returns the summary on rank 0. Raises Preempted after a signal."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    t = cfg.train
    signals = Signals(t.stop_grace_s, cfg.output.dir)  # before anything slow: a signal during set-up is kept
    check_logging(cfg)
    session = start(cfg)
    rank, world, task = session.rank, session.world, session.task
    # Everything that can be wrong with the inputs is found before anything is written.
    check_run_dir(cfg)
    bad_cases = [] if cfg.data.skip_bad_samples else None
    specs = session.check_data(bad_cases)
    run = prepare_run_dir(cfg)
    resume_from = resume_checkpoint(cfg, run)
    torch.manual_seed(t.seed)
    model = session.build_model()
    meta = checkpoint_meta(session, model)
    if resume_from is not None:
        universal = bool(session.ds_config.get("checkpoint", {}).get("load_universal"))
        on_rank0_then_share(lambda: checkpoint.check_compatible(resume_from, meta, universal))
    if cfg.model.init_from:
        from hrvit.models import load_timm_checkpoint
        load_timm_checkpoint(model.encoder, cfg.model.init_from)
    engine, scheduler = session.engine_for(model)
    start_step = 0
    if resume_from is not None:
        _, client = engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name)
        start_step = int(client["step"])
    params = parameter_count(model)  # the whole model's, also when ZeRO-3 has sharded it
    if start_step > t.steps:
        raise ConfigError(f"train.steps: {t.steps} is below the step of the checkpoint resumed ({start_step})")
    write_run_files(session, run, start_step, bad_cases)

    with failed_unless_resumable(run, rank == 0):
        dataset = task.make_dataset(specs)
        sampler = StepSampler(start_step=start_step, steps=t.steps, grad_accum=t.grad_accum, micro_batch=t.micro_batch,
                              dp_rank=session.dp_rank, dp_size=session.dp_size)
        batches = Batches(session, dataset, sampler, run)
        counts = batches.counts
        fp16 = precision(session.ds_config) == "fp16"
        log = RunLog(run, total=t.steps, start=start_step, enabled=rank == 0, csv_file=cfg.logging.csv,
                     tensorboard=cfg.logging.tensorboard)
        log.info(f"hrvit: {world} rank(s) = {session.dp_size} data-parallel x {session.sp_size} sequence-parallel, "
                 f"ZeRO-{zero_stage(session.ds_config)}, {precision(session.ds_config)}, {session.ndim}-D, "
                 f"{session.channels} channel(s), {params / 1e6:.2f}M parameters, "
                 f"on {session.device}, steps {start_step}->{t.steps}, run folder {run}"
                 + (f", resumed from {resume_from}" if resume_from else ""))
        if resume_from is not None:
            change = schedule_change(checkpoint.read_meta(resume_from), meta, start_step)
            if change:
                log.info(change)
        for spec, msg in bad_cases or []:
            log.info(f"hrvit: skipping case {spec.id}: {msg}")
        train_time, window_loss, bad_in_a_row = 0.0, [], 0
        with name_lost_workers(cfg.data.workers, sampler, dataset, batches):
            for step in range(start_step, t.steps):
                torch.manual_seed(hash((t.seed, step, session.dp_rank)) % 2**63)
                tick = time.perf_counter()
                done = step + 1
                _fault_slow(done)
                step_loss, finite = train_step(session, batches, step)
                # DeepSpeed skips an update whose gradients are not finite: a bad step, except in fp16, where
                # that is the loss scaler backing off (counted, not fatal)
                skipped = finite and not engine.was_step_applied()
                counts["overflow_steps"] += skipped and fp16
                stop, save, bad = signals.wanted(not finite or skipped and not fp16)
                train_time += time.perf_counter() - tick
                if bad:
                    counts["bad_steps"] += 1
                    bad_in_a_row += 1
                    log.metrics({"step": done, "skipped_step": "non-finite loss or gradients",
                                 "in_a_row": bad_in_a_row})
                    if bad_in_a_row >= t.max_bad_steps:
                        raise HrvitError(f"train: {bad_in_a_row} steps in a row (to step {done}) had a non-finite "
                                         f"loss or gradients (train.max_bad_steps={t.max_bad_steps}); lower train.lr "
                                         "or check the data, then resume from the last checkpoint")
                else:
                    bad_in_a_row = 0
                    window_loss.append(step_loss)
                if window_loss and (done % t.log_every == 0 or done == t.steps):
                    mean = comm.reduce_values([sum(window_loss) / len(window_loss)])[0] / world
                    log.metrics({"step": done, "loss": round(mean, 6), "lr": scheduler.get_last_lr()[0],
                                 "samples_per_s": round(counts["samples"] / train_time, 3),
                                 "tokens_per_s": round(counts["tokens"] / train_time, 1)})
                    window_loss = []
                log.advance(done)
                if stop or save or (t.ckpt_every and done % t.ckpt_every == 0 and done != t.steps):
                    checkpoint.save(engine, run / CHECKPOINTS, done, meta, t.keep_last)
                if stop:
                    log.info(f"hrvit: {signals.received or 'a signal on another rank'}: checkpoint at step {done} "
                             f"written; stopping (resume: hrvit train --resume {run})")
                    log.close()
                    raise Preempted(done)
                if cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
                    log.metrics({"step": done, "eval": task.evaluate(session, engine, specs, run, done)})
        checkpoint.save(engine, run / CHECKPOINTS, t.steps, meta, t.keep_last)
        log.info("hrvit: final evaluation")
        eval_started = time.time()
        result = task.evaluate(session, engine, specs, run, t.steps)
        log.metrics({"step": t.steps, "eval": result})
        return finish(session, run, log, result, counts, train_time, start_step, bad_cases,
                      params=params, eval_started=eval_started)


def finish(session: Session, run: Path, log: RunLog, result: dict, counts: dict, train_time: float,
           start_step: int, bad_cases: list | None, params: int | None = None,
           eval_started: float = 0.0) -> dict | None:
    """Write summary.json (rank 0) from the final evaluation and the run's counts; returns it on rank 0. The last
    line names the picture only if the final evaluation wrote it (not output.picture=false, no evaluated case, or a
    picture left from before)."""
    cfg = session.cfg
    skipped = comm.reduce_values([counts["skipped_samples"]])[0]
    summary = {
        **session.task.summary_fields(result),
        "steps": cfg.train.steps,
        "resumed_from_step": start_step,
        "samples_per_s": round(counts["samples"] / train_time, 3) if train_time else None,
        "tokens_per_s": round(counts["tokens"] / train_time, 1) if train_time else None,
        "train_seconds": round(train_time, 2),
        "world_size": session.world,
        "dp_size": session.dp_size,
        "sp_size": session.sp_size,
        "zero_stage": zero_stage(session.ds_config),
        "precision": precision(session.ds_config),
        "parameters": params,
        "bad_steps": counts["bad_steps"],
        "overflow_steps": counts["overflow_steps"],
        "skipped_samples": int(skipped),
        "dropped_cases": sorted(spec.id for spec, _ in bad_cases or []),
        "final_loss": log.last_loss,
    }
    log.close()
    if session.rank == 0:
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
        png = run / "prediction.png"
        written = cfg.output.picture and png.is_file() and png.stat().st_mtime >= eval_started - 1
        picture = f", picture in {png}" if written else ""
        log.info(f"hrvit: {session.task.score(summary)} over {summary['eval_cases']} held-out case(s); "
                 f"summary in {run / 'summary.json'}{picture}")
    comm.barrier()
    return summary if session.rank == 0 else None


def load_weights(run: Path, cfg: Config, ndim: int, channels: int, device=None, ckpt: str | Path | None = None,
                 what: str | None = None, fix: str = ""):
    """The model with the fp32 weights of the run's latest complete checkpoint, or of `ckpt` (checkpoint.choose),
    any ZeRO stage, no engine needed, on `device` (default: the accelerator's current device, the CPU without one).
    The checkpoint's geometry is checked against `what` (the input, `ndim`-D with `channels` channels; `fix` ends
    that message) and its files for damage before any weights are read: torch's errors name neither."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = checkpoint.choose(run / CHECKPOINTS, ckpt)
    what = what or str(run)
    checkpoint.check_geometry(ckpt, ndim, channels, what, fix)
    checkpoint.check_files(ckpt, checkpoint.INFER_WITH)
    from deepspeed.accelerator import get_accelerator

    from hrvit.engine.session import task_for

    model = task_for(cfg).build_model(ndim, channels)
    try:
        model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    except RuntimeError as err:
        if "size mismatch" not in str(err):
            raise
        # a checkpoint from before COMPLETE recorded the geometry
        raise DataError(f"{what}: the weights of {ckpt} do not fit a model for {ndim}-D images with {channels} "
                        f"channel(s) ({str(err).strip().splitlines()[-1].strip()[:200]}){fix}") from None
    return model.to(device or get_accelerator().current_device_name()).eval()
