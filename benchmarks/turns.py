"""Loaders timed in turns (A B A B ...) with their background work paused between turns.

Turns make a ratio robust to a noisy machine: whatever slows it slows every loader alike. But two
loader kinds keep working when nobody reads from them: the stream loader's prefetch thread decodes the
next batches, and the DataLoader's worker processes run the tasks already handed to them. In turns with
other loaders they would take CPU from the loader being timed and start their own turn with batches
made in someone else's time (on 2 cores, a resident loader timed in turns with a live DataLoader read
5x slower than alone). So between its turns:

* a stream loader's epoch is closed (its prefetch thread stops after the batch in progress, which is
  joined before the next turn starts); its next turn starts a new epoch;
* a DataLoader's worker processes are stopped (SIGSTOP) and continued (SIGCONT) when its turn comes:
  the tasks in flight are finished in its own turns;
* anything else (resident: no background work) carries on where it was.
"""
from __future__ import annotations

import os
import signal


class Turn:
    """One loader's batches, epoch after epoch, read in turns (`next`), paused between them (`pause`)."""

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self.batches = None
        self.stopped: list[int] = []

    def next(self):
        if self.stopped:
            self._signal(signal.SIGCONT)
        while True:
            if self.batches is None:
                self.loader.set_epoch(self.epoch)
                self.epoch += 1
                self.batches = iter(self.loader)
            try:
                return next(self.batches)
            except StopIteration:
                self.batches = None

    def worker_pids(self) -> list[int]:
        """The DataLoader's worker processes (torch keeps them on its persistent iterator), if any."""
        inner = getattr(getattr(self.loader, "loader", None), "_iterator", None)
        return [w.pid for w in getattr(inner, "_workers", []) if w.pid and w.is_alive()]

    def pause(self) -> None:
        if getattr(self.loader, "prefetcher", None) is not None and self.batches is not None:
            self.batches.close()  # the generator's finally stops and joins the prefetch thread
            self.batches = None
        pids = self.worker_pids()
        if pids:
            self.stopped = pids
            self._signal(signal.SIGSTOP)

    def _signal(self, sig) -> None:
        for pid in self.stopped:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGCONT:
            self.stopped = []

    def close(self) -> None:
        """Continue stopped workers (a stopped worker would hang the DataLoader's shutdown), end the epoch."""
        if self.stopped:
            self._signal(signal.SIGCONT)
        if self.batches is not None and hasattr(self.batches, "close"):
            self.batches.close()
        self.batches = None
        self.loader.close()
