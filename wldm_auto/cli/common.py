"""What every entry point shares: logging set-up and turning expected errors into one line."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

from wldm_auto.paths import PathNotSetError

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    """Console logging at INFO (DEBUG with ``verbose``)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def attach_log_file(logs: Path, prefix: str) -> logging.FileHandler:
    """Also log (DEBUG and up) to ``logs/<prefix>_<time>.log`` (folder created); returns the handler."""
    path = logs / f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def add_log_file(folder: Path, prefix: str) -> Path:
    """Also log (DEBUG and up) to ``folder/logs/<prefix>_<time>.log``; returns its path."""
    return Path(attach_log_file(folder / "logs", prefix).baseFilename)


def run_cli(action: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run ``action``; expected errors become one ``error: ...`` line on stderr and exit 1."""
    try:
        return action()
    except (ValueError, PathNotSetError, OSError) as exc:
        # ImageReadError, PlanError and DatasetInvalidError are ValueErrors; FileExistsError is an OSError
        print(f"error: {exc}", file=sys.stderr)
        log_to_files(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        log_to_files(f"error: {interrupted}")
        return 130


def log_to_files(message: str) -> None:
    """``message`` at ERROR into the run's log files only (the console has it already): a log file that a run
    opened says why the run ended."""
    record = logging.LogRecord("wldm_auto", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
