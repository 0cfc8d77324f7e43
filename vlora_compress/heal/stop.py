"""Stopping a healing run cleanly: SIGINT and SIGTERM ask the loop to stop after the step it is in,
on every process at the same step."""

from __future__ import annotations

import time

import torch


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the step it is in, save its state and exit (a
    cluster's time limit sends SIGTERM, often twice: to every process and through torchrun); a
    second Ctrl-C stops at once (a second: torchrun passes the terminal's on at once). All processes
    stop at the same step: they agree before each."""

    def __init__(self):
        self.flag, self.first, self.previous = False, None, {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        return False

    def _handle(self, signum, frame):
        import signal

        now = time.monotonic()
        if signum == signal.SIGINT and self.first is not None and now - self.first > 2.0:
            raise KeyboardInterrupt
        self.flag, self.first = True, self.first if self.first is not None else now

    def agree(self, world: int, device: torch.device, elapsed: float) -> tuple[bool, float]:
        """(whether any process was asked to stop, the longest elapsed time of any process)."""
        if world == 1:
            return self.flag, elapsed
        import torch.distributed as dist

        t = torch.tensor([float(self.flag), elapsed], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0]), float(t[1])
