"""The one error type the command line turns into a one-line message and exit code 2."""


class BdvaeError(Exception):
    """A problem with the user's input, data or files, explained in one line."""
