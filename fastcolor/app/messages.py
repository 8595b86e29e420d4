"""What the application tells its user: exit statuses, :class:`CLIError`, and one-line notes and
warnings on stderr (stdout is kept for results, which may be JSON)."""
from __future__ import annotations

import sys

PROG = "fastcolor"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: stdout's reader went away (``| head``): 128 + SIGPIPE, what a shell reports for ``cat`` stopped so.
EXIT_BROKEN_PIPE = 141


class CLIError(Exception):
    """A failure to report as one line ``fastcolor: error: <message>`` with exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def one_line(text: str, limit: int = 600) -> str:
    """``text`` with its white space folded into single spaces, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def say(msg: str = "") -> None:
    """A line of the command's result on stdout."""
    print(msg, flush=True)


def note(msg: str) -> None:
    """A remark on stderr (kept out of stdout, which may be JSON), between progress bars."""
    from tqdm import tqdm

    tqdm.write(f"{PROG}: {msg}", file=sys.stderr)


def warn(msg: str) -> None:
    """``fastcolor: warning: <msg>`` on stderr, on one line."""
    note(f"warning: {one_line(msg, 2000)}")
