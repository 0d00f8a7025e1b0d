"""Standard output that a reader closing the pipe does not break.

`python -m mpicorr info RUN | head -3` or `analysis/firing.py RUN | head -1`: once `head` has its lines, the next
write fails with BrokenPipeError, which ended the command (the scripts' figures unwritten, an internal-error
line from mpicorr). With protect_stdout(), what the reader no longer wants goes to /dev/null and the command
finishes its work and its exit status as if it had been read.
"""

from __future__ import annotations

import os
import sys


class PipeSafe:
    """A text stream that, once writing to it fails with BrokenPipeError, sends its file descriptor to
    /dev/null and goes on."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())  # what is still buffered, and all later output, goes there
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def protect_stdout() -> None:
    """Make sys.stdout a PipeSafe one (once; a stream without a file descriptor is left alone)."""
    if isinstance(sys.stdout, PipeSafe):
        return
    try:
        sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO (tests, benchmarks capturing the output)
        return
    sys.stdout = PipeSafe(sys.stdout)
