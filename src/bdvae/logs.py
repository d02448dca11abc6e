"""The `bdvae` logger: what the library says as it works (the source it fetched data from, each
epoch's losses, a fit begun) goes through it, and whoever calls the library decides what is shown.

The command line shows it on stdout, a line per message; a Python caller sees nothing unless it
asks, e.g. `logging.basicConfig(level=logging.INFO)` or a handler on `logging.getLogger("bdvae")`.
Progress bars are tqdm's, which a notebook shows as widgets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

LOGGER = logging.getLogger("bdvae")
LOGGER.addHandler(logging.NullHandler())  # a library's logger: no "no handler" warning, nothing shown


def info(message: str) -> None:
    """Say `message` through the bdvae logger, at INFO."""
    LOGGER.info(message)


class _Lines(logging.StreamHandler):
    """Each message as one line, written in one call: processes that share a terminal or pipe
    (compare --jobs, torchrun) then never interleave within a line."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter("%(message)s"))


def show(stream: TextIO) -> Callable[[], None]:
    """Show the logger's INFO messages on `stream`, as the command line does; returns what puts
    the logger back as it was."""
    handler, level, propagate = _Lines(stream), LOGGER.level, LOGGER.propagate
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # a root handler the caller set up would show every line twice

    def undo() -> None:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
        LOGGER.propagate = propagate

    return undo


@contextmanager
def showing(stream: TextIO) -> Iterator[None]:
    """`show` inside the block only: one process may run several commands, as the tests do."""
    undo = show(stream)
    try:
        yield
    finally:
        undo()


def shown() -> bool:
    """Whether the messages are shown somewhere (`showing`): a spawned worker of compare --jobs
    shows its own lines exactly when its parent shows them."""
    return any(isinstance(h, _Lines) for h in LOGGER.handlers)
