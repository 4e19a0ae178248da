"""The project's own exceptions. The CLI turns each into one red line and an exit code."""

from __future__ import annotations


class MergeCliError(Exception):
    """Base class: a problem the user can act on, reported without a traceback."""

    exit_code = 1


class UsageError(MergeCliError, ValueError):
    """Unusable input given on the command line or to an API (a bad size, option or path)."""

    exit_code = 2


class GridError(MergeCliError, ValueError):
    """A size or token count that cannot form a valid merge grid."""

    exit_code = 2


class CheckpointError(MergeCliError):
    """A tower or projector checkpoint that is missing, incomplete or does not match its config."""


class FormatError(MergeCliError):
    """A file that is not a merge-cli output, is damaged, or was written with other settings."""

    exit_code = 2


class OutputBusyError(MergeCliError):
    """Another process is writing the same output (it holds the output's lock)."""


class OutputWriteError(MergeCliError):
    """Writing the output failed (disk full, a file too large, an I/O or permission error);
    complete shards are kept and a rerun resumes."""


class ConfigMismatchError(MergeCliError):
    """Resuming into an output written with settings that change the numbers."""


class MediaError(MergeCliError):
    """One input could not be decoded or resized; becomes an error record, never stops a run.

    `stage` says where it failed (open, decode, resize, ...); the exception type name in the
    record is the *cause*, e.g. UnidentifiedImageError, not MediaError.
    """

    def __init__(self, stage: str, message: str, error_type: str | None = None):
        super().__init__(message)
        self.stage = stage
        self.error_type = error_type or type(self).__name__


def error_text(error: BaseException) -> str:
    """A library exception's own words, without what the record or message around it already says.

    PyAV's errors read `[Errno 1094995529] Invalid data found when processing input: 'x.mp4'`:
    the errno is FFmpeg's internal code (meaningless to a user) and the file is the sample the
    record is about, so only the `strerror` part is kept (likewise for OSError). Other exceptions
    keep their text.
    """
    strerror = getattr(error, "strerror", None)  # OSError, and PyAV's FFmpegError (a ValueError)
    if isinstance(strerror, str) and strerror:
        return strerror
    return str(error) or type(error).__name__
