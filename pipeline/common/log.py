"""The one logger: ``[command HH:MM:SS] message`` on stdout, flushed per line.

Each command logs under its own name (``manifoldgd`` for distill, ``train-prior``, ``benchmark``, ...), so
a line says which command wrote it, also when it comes from a Ray worker (whose stdout Ray forwards to
the driver). Results a command exists to print (a config, a table, an error) are printed, not logged.
"""
from __future__ import annotations

import logging
import sys

FORMAT = "[%(name)s %(asctime)s] %(message)s"
DATEFMT = "%H:%M:%S"
# Ray Data reports every operator's progress at INFO; kept off the console unless asked for.
RAY_DATA_LOGGER = "ray.data"
VERBOSE = False  # set by `manifoldgd -v`


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (pytest's capture, a redirected stream)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT, DATEFMT))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ assigns it
        pass

    def emit(self, record):
        super().emit(record)
        self.flush()


def get_logger(name: str = "manifoldgd") -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        logger.addHandler(_StdoutHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def quiet_ray_data() -> None:
    """Ray Data's per-operator INFO lines only with ``manifoldgd -v``."""
    logging.getLogger(RAY_DATA_LOGGER).setLevel(logging.INFO if VERBOSE else logging.WARNING)
