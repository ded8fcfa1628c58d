"""Worker processes for per-case work (fingerprint, preprocessing).

Workers are spawned (ITK/elastix are not fork-safe) and
- die with their parent: ``prctl(PR_SET_PDEATHSIG)`` on Linux, plus a watchdog
  thread that exits once the parent is gone (a ``kill -9`` of the parent never
  leaves them running);
- ignore Ctrl-C: the parent decides, cancels what has not started and
  terminates what runs (results are written atomically, so nothing half-done
  counts as finished);
- send their log records to the parent, whose handlers (console, log file)
  write them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import logging.handlers
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from types import TracebackType
from typing import Any, Callable, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

PR_SET_PDEATHSIG = 1
WATCHDOG_SECONDS = 0.5
TERMINATE_WAIT_SECONDS = 5.0
POLL_SECONDS = 0.25  # longest untimed wait of the main thread for results (see WorkerPool.imap_unordered)


def _die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` exits."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog below still works
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _init_worker(parent_pid: int, log_queue: Any, level: int) -> None:
    """Worker initializer: die with the parent, leave Ctrl-C to it, log through it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(log_queue))
    root.setLevel(level)


def _forward_logs(log_queue: Any, stop: threading.Event) -> None:
    """Parent side: hand worker log records to the parent's loggers until ``stop`` and the queue is empty."""
    while True:
        try:
            record = log_queue.get(timeout=0.1)
        except queue_module.Empty:
            if stop.is_set():
                return
            continue
        except (EOFError, OSError, ValueError):
            return
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


class WorkerPool:
    """A spawn-based process pool whose workers die with the parent and log through it.

    Use as a context manager. Leaving the block with an exception (Ctrl-C
    included) cancels what has not started and terminates running workers.
    """

    def __init__(self, num_processes: int):
        self.num_processes = int(num_processes)
        self._context = multiprocessing.get_context("spawn")
        self._queue = self._context.Queue()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=_forward_logs, args=(self._queue, self._stop),
                                          name="worker-logs", daemon=True)
        self._executor = ProcessPoolExecutor(
            self.num_processes, mp_context=self._context, initializer=_init_worker,
            initargs=(os.getpid(), self._queue, logging.getLogger().getEffectiveLevel()))

    def __enter__(self) -> "WorkerPool":
        self._listener.start()
        return self

    def imap_unordered(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """Results of ``fn`` over ``items`` as they complete.

        The main thread never blocks longer than :data:`POLL_SECONDS`: a Ctrl-C that the kernel hands
        to one of the pool's helper threads only sets Python's flag, and a main thread asleep in an
        untimed wait would not raise KeyboardInterrupt until a case finished (minutes)."""
        pending = {self._executor.submit(fn, item) for item in items}
        while pending:
            done, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """Results of ``fn`` over ``items`` in order (waiting in short slices, as :meth:`imap_unordered`)."""
        futures = [self._executor.submit(fn, item) for item in items]
        for future in futures:
            while True:
                try:
                    result = future.result(timeout=POLL_SECONDS)
                except FuturesTimeout:
                    if future.done():  # the task itself raised a TimeoutError
                        raise
                    continue
                yield result
                break

    def terminate(self) -> None:
        """Cancel queued work and stop running workers now."""
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(TERMINATE_WAIT_SECONDS)
            if process.is_alive():
                process.kill()
                process.join(1.0)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self._executor.shutdown(wait=True)
            else:
                self.terminate()
        finally:
            self._stop.set()
            self._listener.join(2.0)
            if exc_type is None:
                self._queue.close()
            else:  # a killed worker may have left a partial record: never wait on the queue
                self._queue.cancel_join_thread()
