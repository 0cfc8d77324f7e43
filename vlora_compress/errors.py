"""One exception type for every problem a user can cause.

The CLI maps it to a one-line message and exit code 2; anything else that escapes is a bug.
Messages name options by their config field in backquotes (`rank`, `calib.samples`), never by a
flag: the library does not know its CLI, and the CLI replaces each field with its flag.
"""


class VloraError(Exception):
    """Bad input or usage: a file that cannot be read, an option out of range, a corrupted plan."""


class Interrupted(VloraError):
    """Stopped by Ctrl-C with the state to resume from saved (exit code 130)."""
