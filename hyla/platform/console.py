"""What rank 0 shows while training: a live progress bar on a terminal (step, loss, tokens/s,
ETA), and a plain line every trainer.log_every steps (what a log file or Ray's log
stream keeps)."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressConsole:
    def __init__(self, total_steps: int, first_step: int, enabled: bool) -> None:
        self.total, self.first, self.enabled = total_steps, first_step, enabled
        self.console = Console()
        self.progress: Progress | None = None
        self.tokens = 0.0
        self.seconds = 0.0
        self.started = time.perf_counter()

    @property
    def tokens_per_second(self) -> float:
        """Over every step of this process (resumed steps excluded)."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def __enter__(self) -> ProgressConsole:
        if self.enabled and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[summary]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task(
                "train", total=self.total, completed=self.first, summary=""
            )
            self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, step: int, metrics: dict[str, float], log: bool) -> None:
        self.tokens += metrics["tokens_per_s"] * metrics["step_time_s"]
        self.seconds += metrics["step_time_s"]
        if not self.enabled:
            return
        summary = f"loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:,.0f} tok/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, summary=summary)
        if log or "val_loss" in metrics:
            remaining = (self.total - step) * self.seconds / max(1, step - self.first)
            line = f"step {step}/{self.total}  {summary}  lr {metrics['lr']:.2e}"
            if "val_loss" in metrics:
                line += f"  val_loss {metrics['val_loss']:.4f}"
            self.console.print(f"{line}  ETA {remaining:.0f}s", highlight=False)
