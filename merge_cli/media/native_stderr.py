"""Native decoder noise kept off the terminal: FFmpeg and decord write to fd 2 directly.

decord's bundled FFmpeg logs through FFmpeg's default callback (`[mov,mp4,... @ 0x...] moov atom
not found`) and decord itself through dmlc's C++ logger (`[12:00:00] .../video_reader.cc:83:
ERROR opening ...`): both write to file descriptor 2, past Python's `sys.stderr`, so they land in
the middle of a progress bar and after a `--json` run's output. What they say is already in the
error record (the exception carries it), so `captured` points fd 2 at a private file around the
decoder calls, drops the lines that are decoder log lines, and writes anything else back (in the
main process, another thread may print while a video decodes: its lines are kept, in order).

PyAV routes FFmpeg's log through its own callback, which ignores everything by default
(`av.logging`); its lines would be captured here too if a build printed them.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

NOISE = re.compile(
    rb"^(?:\[[^\]\n]* @ 0x[0-9a-fA-F]+\] "  # FFmpeg's default log callback: [context @ 0xADDRESS] ...
    rb"|\[\d\d:\d\d:\d\d\] \S+\.(?:cc|cpp|h):\d+: "  # dmlc's C++ logger (decord): [hh:mm:ss] file.cc:N: ...
    rb"|\s*Last message repeated \d+ times"  # FFmpeg's repeat counter
    rb"|Stack trace returned \d+ entries|\[bt\] \(\d+\) )"  # dmlc's stack trace after a failed check
)

_capture: tuple[int, BinaryIO] | None = None
"""This process's capture file (a DataLoader worker forked from a process that had one opens its own)."""


def _capture_file() -> BinaryIO:
    global _capture
    if _capture is None or _capture[0] != os.getpid():
        import atexit

        if _capture is not None:  # inherited over fork: close this process's copy (the parent keeps its own)
            _capture[1].close()

        _capture = (os.getpid(), tempfile.TemporaryFile(prefix="merge-cli-stderr-"))
        atexit.register(_capture[1].close)
    return _capture[1]


@contextmanager
def captured() -> Iterator[None]:
    """Run native decoder calls with their log lines dropped; everything else reaches stderr."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (a closed or replaced stderr)
        yield
        return
    capture = _capture_file()
    try:
        os.dup2(capture.fileno(), 2)
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        written = capture.read()
        capture.seek(0)
        capture.truncate()
        kept = b"".join(line for line in written.splitlines(keepends=True) if not NOISE.match(line))
        while kept:
            kept = kept[os.write(2, kept) :]


_decord_quiet = False


def quiet_decord() -> None:
    """Turn decord's bundled FFmpeg logging off, once per process: fewer lines to capture (decord's
    own C++ lines still need `captured`)."""
    global _decord_quiet
    if not _decord_quiet:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        _decord_quiet = True
