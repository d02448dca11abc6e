"""The one error type the command line turns into a one-line message and exit code 2."""

import re


class BdvaeError(Exception):
    """A problem with the user's input, data or files, explained in one line. `command_line` is the
    line `bdvae` prints (`message`); str(e), what a Python caller reads, is the same unless the fix
    differs there (an argument, not a flag; a call, not a command): then it is `python`."""

    def __init__(self, message: str, python: str | None = None) -> None:
        super().__init__(message if python is None else python)
        self.command_line = message

    def __reduce__(self) -> tuple:  # both lines through a pipe (compare --jobs)
        return type(self), (self.command_line, None if str(self) == self.command_line else str(self))


def check_seed(seed: int, name: str, python: str | None = None) -> None:
    """A seed torch.Generator.manual_seed takes, an integer in [0, 2**63); else one line naming it
    (`name`, a flag, and for a Python caller `python`, the argument, where they differ)."""
    if not 0 <= seed < 2**63:
        raise BdvaeError(f"{name} must be in [0, 2**63), got {seed!r}",
                         python=None if python is None else f"{python} must be in [0, 2**63), got {seed!r}")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line
    errors; a first line that only announces what follows ("Error(s) in loading state_dict for
    VAE:") takes the first detail with it."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]



def out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (a MemoryError, torch's CPU allocator's or CUDA's
    out-of-memory error): what was asked for, where the message says; None for any other error.
    The net under the checks made before allocating, which bound a request from below."""
    text = str(e)
    if not (isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text):
        return None
    size = ""
    if asked := re.search(r"tried to allocate (\d+) bytes", text):  # torch's CPU allocator
        size = f" of {int(asked.group(1)) / 1e9:,.1f} GB"
    elif asked := re.search(r"Tried to allocate ([\d.]+ \w+)", text):  # CUDA's
        size = f" of {asked.group(1)}"
    detail = "" if size else f" ({first_line(e)[:200]})"
    return f"out of memory: an allocation{size} failed{detail}; ask for less (a smaller batch, model or count)"
