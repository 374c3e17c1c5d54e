"""What a run shows on, and takes from, the terminal: the progress display and SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Any


class SignalGuard:
    """Turn SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Progress:
    """A rich progress bar (loss, tokens/s, ETA) on a TTY; plain lines at evaluations otherwise."""

    def __init__(self, enabled: bool, total: int, start: int, label: str):
        from rich.console import Console

        self.enabled = enabled
        self.console = Console(stderr=True)
        self.bar = None
        self.label = label
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.bar.add_task(label, total=total, completed=start, loss="-", tps="-")
            self.bar.start()

    def step(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:,.0f}")

    def log(self, msg: str) -> None:
        if self.enabled:
            self.console.print(f"{self.label}: {msg}" if self.bar is None else msg, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
