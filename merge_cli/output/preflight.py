"""Is the output location usable? Checked before any model or media work, so that a typo in
`--out` costs a second, not a decoded dataset and two tracebacks.

Checks, in order: `out` is not a folder; its nearest existing ancestor is a folder we can create
files in (missing folders below it are created later, as `mkdir -p` would); `feats.h5.d`, where
the shards go, is a folder if it exists; and the disk has some free space. Disk-full and
permission errors in the middle of a run are the writer's business, not this check's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from merge_cli.errors import UsageError
from merge_cli.output.format import shard_dir

MIN_FREE_BYTES = 64 * 2**20
"""Refuse to start with less free space than this beside the output (a few shards' metadata)."""


def check_output_location(out: Path | str, min_free_bytes: int = MIN_FREE_BYTES, *, try_writing: bool = True) -> None:
    """Raise UsageError (one line, naming the path and the fix) when `out` cannot be written.
    Without `try_writing` (--dry-run, which touches nothing) writability is asked of os.access,
    which a read-only mount can fool for root."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name inside it, e.g. {out / 'feats.h5'}")
    folder = _nearest_existing(out.parent)
    if not folder.is_dir():
        raise UsageError(f"--out {out}: {folder} is a file, not a folder")
    shards = shard_dir(out)
    if shards.exists() and not shards.is_dir():
        raise UsageError(
            f"--out {out}: {shards} exists and is not a folder (merge-cli keeps the shards there); "
            "move it away or choose another --out"
        )
    if try_writing:
        _check_writable(shards if shards.is_dir() else folder, out)
    elif not os.access(shards if shards.is_dir() else folder, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create files in {shards if shards.is_dir() else folder}")
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise UsageError(
            f"--out {out}: only {free / 1e6:,.1f} MB free in {folder} (at least {min_free_bytes / 1e6:,.0f} MB needed)"
        )


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (a file counts: it blocks creating folders)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(folder: Path, out: Path) -> None:
    """Create and delete a file in `folder`: the only test that root, ACLs and read-only mounts
    all answer truthfully (os.access says yes to root on a read-only filesystem)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".merge-cli-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"--out {out}: cannot create files in {folder} ({reason})") from error
