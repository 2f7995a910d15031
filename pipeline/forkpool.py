"""Fork worker pools for pack: cheap to start, and the parent owns interrupt handling.

Forked workers start in milliseconds and inherit the parent's modules and arrays
(read-only data needs no pickling). Workers die quietly on SIGTERM and ignore
Ctrl-C; the parent turns both into an exception and cleans up (see pipeline/interrupts.py).
"""
from __future__ import annotations

import multiprocessing as mp
import signal
from contextlib import contextmanager


def _worker_init() -> None:
    # Forked with SIGTERM/SIGINT blocked (see start_pool) and with the parent's handler.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def start_pool(workers: int):
    """A fork pool started with interrupts held back: a signal landing mid-fork would run
    the parent's handler in a half-made child, or be dropped inside an at-fork hook."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return mp.get_context("fork").Pool(workers, initializer=_worker_init)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a pending signal is delivered here


@contextmanager
def ordered_map(fn, tasks: list, workers: int):
    """Yield an iterator of fn(task) in task order: in-process for workers <= 1, else a fork pool
    (terminated on exit, also when the caller stops early or raises)."""
    if workers <= 1 or len(tasks) <= 1:
        yield map(fn, tasks)
        return
    pool = start_pool(min(workers, len(tasks)))
    try:
        yield pool.imap(fn, tasks)
    finally:
        pool.terminate()
        pool.join()
