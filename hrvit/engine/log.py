"""Run logging on rank 0: metrics.jsonl, and a rich progress bar on a terminal or plain lines in files."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLog:
    """Writes one JSON object per logged step or evaluation; shows progress the way the output can take it."""

    def __init__(self, run: Path, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.last_loss = None
        self.started = time.perf_counter()
        self._file = None
        self._progress = None
        if not enabled:
            return
        run.mkdir(parents=True, exist_ok=True)
        self._file = open(run / "metrics.jsonl", "a", buffering=1)
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn())
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
        if "loss" in row:
            self.last_loss = row["loss"]
            status = f"loss {row['loss']:.4f}  {row['samples_per_s']:.2f} samples/s"
            if self._progress is not None:
                self._progress.update(self._task, status=status)
            else:
                print(f"step {row['step']}  {status}  lr {row['lr']:.2e}", flush=True)
        if "eval" in row:
            ev = row["eval"]
            if "accuracy" in ev:
                auc = f"  AUC {ev['auc']}" if ev.get("auc") is not None else ""
                self.info(f"eval at step {row['step']}: accuracy {ev.get('accuracy')}  balanced accuracy "
                          f"{ev.get('balanced_accuracy')}{auc}")
            else:
                self.info(f"eval at step {row['step']}: mean Dice {ev.get('dice_mean')}  "
                          f"per class {ev.get('dice_per_class')}")

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._file is not None:
            self._file.close()
