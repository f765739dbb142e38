"""Run logging on rank 0: metrics.jsonl, and a rich progress bar on a terminal or plain lines in files; for
plotting, optionally RUN/metrics.csv and TensorBoard events (the `logging` config section)."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

CSV = "metrics.csv"
CSV_HEADER = ["step", "time", "name", "value"]
TENSORBOARD = "tensorboard"


def check_logging(cfg) -> None:
    """Refuse logging.tensorboard without its package before anything starts (one message, not a traceback at
    the first logged step)."""
    from hrvit.config import check_monitor_packages

    check_monitor_packages({"tensorboard": {"enabled": cfg.logging.tensorboard}}, "logging.tensorboard: true")


def scalars(row: dict) -> dict[str, float]:
    """The plottable numbers of one metrics row: train/loss, train/lr, train/samples_per_s, train/tokens_per_s,
    and every number of an evaluation as eval/<name> (per-class Dice as eval/dice_<class>)."""
    out = {f"train/{k}": row[k] for k in ("loss", "lr", "samples_per_s", "tokens_per_s") if k in row}
    for key, value in row.get("eval", {}).items():
        if isinstance(value, dict):
            out.update({f"eval/{key.removesuffix('_per_class')}_{name}": v for name, v in value.items()})
        else:
            out[f"eval/{key}"] = value
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("eval/step", "eval/cases")}


def forget_csv_after(path: Path, step: int) -> None:
    """Drop the CSV rows of steps after `step` (about to be redone by a resumed run), atomically."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if len(r) == 4 and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) != len(rows):
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        os.replace(tmp, path)


class RunLog:
    """Writes one JSON object per logged step or evaluation; shows progress the way the output can take it."""

    def __init__(self, run: Path, total: int, start: int, enabled: bool, csv_file: bool = False,
                 tensorboard: bool = False):
        self.enabled = enabled
        self.last_loss = None
        self.started = time.perf_counter()
        self.total, self.start = total, start
        self._file = self._csv = self._tb = None
        self._progress = None
        if not enabled:
            return
        run.mkdir(parents=True, exist_ok=True)
        self._file = open(run / "metrics.jsonl", "a", buffering=1)
        if csv_file:
            new = not (run / CSV).is_file()
            self._csv_file = open(run / CSV, "a", newline="", buffering=1)
            self._csv = csv.writer(self._csv_file)
            if new:
                self._csv.writerow(CSV_HEADER)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events of the steps it redoes
            self._tb = SummaryWriter(str(run / TENSORBOARD), purge_step=start + 1 if start else None)
        if sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                      TimeRemainingColumn())
            self._task = self._progress.add_task("train", total=total, completed=start, status="")
            self._progress.start()

    def info(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {**row, "time": round(time.perf_counter() - self.started, 2)}
        self._file.write(json.dumps(row) + "\n")
        for name, value in scalars(row).items() if self._csv or self._tb else ():
            if self._csv:
                self._csv.writerow([row["step"], row["time"], name, value])
            if self._tb:
                self._tb.add_scalar(name, value, row["step"])
        if "loss" in row:
            self.last_loss = row["loss"]
            status = f"loss {row['loss']:.4f}  {row['samples_per_s']:.2f} samples/s"
            if self._progress is not None:
                self._progress.update(self._task, status=status)
            else:
                print(f"step {row['step']}/{self.total}  {status}  lr {row['lr']:.2e}  {self._times(row['step'])}",
                      flush=True)
        if "eval" in row:
            ev = row["eval"]
            if "accuracy" in ev:
                auc = f"  AUC {ev['auc']}" if ev.get("auc") is not None else ""
                self.info(f"eval at step {row['step']}: accuracy {ev.get('accuracy')}  balanced accuracy "
                          f"{ev.get('balanced_accuracy')}{auc}")
            else:
                self.info(f"eval at step {row['step']}: mean Dice {ev.get('dice_mean')}  "
                          f"per class {ev.get('dice_per_class')}")

    def _times(self, step: int) -> str:
        """'elapsed H:MM:SS  ETA H:MM:SS' from this process's pace (a resumed run counts from its resume)."""
        elapsed = time.perf_counter() - self.started
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else None

        def clock(seconds):
            s = int(seconds)
            return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

        return f"elapsed {clock(elapsed)}  ETA {clock(eta) if eta is not None else '?'}"

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._csv is not None:
            self._csv_file.close()
            self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
