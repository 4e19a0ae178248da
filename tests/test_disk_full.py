"""A full disk, a file-size limit or a read-only folder: one line, exit 1, every committed shard
kept, no temporary left, and the next run resumes to exactly what a clean run writes.

The small disk is a tmpfs mounted for the test (needs root and mount rights); without one, the
file-size limit (RLIMIT_FSIZE: the write fails with EFBIG, merge-cli ignores SIGXFSZ) stands in.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from media_factory import make_image

from merge_cli.output.format import list_shards
from merge_cli.output.reader import open_features

pytestmark = pytest.mark.slow

EXTRACT = [sys.executable, "-m", "merge_cli", "extract", "--device", "cpu", "--dtype", "fp32", "--workers", "0",
           "--random-projector", "--llm-dim", "4096", "--unit-size", "2", "--json"]
"""4096-wide fp32 tokens: 4 MB per 448x448 image, so a few images fill a small disk."""
FILE_LIMIT = 12 * 10**6
"""Below the big image's shard (about 21 MB), above a unit of two small ones (about 8 MB)."""


def _mount_tmpfs(folder: Path, size_mb: int, *options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    option = ",".join([f"size={size_mb}m", *options])
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", option, "tmpfs", str(folder)],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@contextmanager
def small_disk(folder: Path, size_mb: int, *options: str):
    """A tmpfs of `size_mb` at `folder` (yields True), or nothing mounted (yields False)."""
    mounted = _mount_tmpfs(folder, size_mb, *options)
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, resource.RLIM_INFINITY))


def _can_limit_file_size() -> bool:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return hard == resource.RLIM_INFINITY or hard >= FILE_LIMIT


def _run(command: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **options)


def _rows(out: Path) -> dict[str, bytes]:
    with open_features(out, verify=True) as feats:
        return {key: feats.read_rows(feats.index(key)).tobytes() for key in feats.keys()}


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "media"
    for i in range(24):
        make_image(root / f"{i:02d}.png", 448, 448)
    make_image(root / "zz-big.png", 1344, 1344)  # resized to about 1000x1000: a 21 MB shard alone
    return root


def test_a_full_disk_mid_run_loses_nothing_and_the_rerun_resumes(corpus, tmp_path):
    clean = tmp_path / "clean" / "feats.h5"
    done = _run([*EXTRACT, "--input", str(corpus), "--out", str(clean)])
    assert done.returncode == 0, done.stderr
    disk = tmp_path / "disk"
    with small_disk(disk, 84) as mounted:
        if mounted:  # 84 MB, 70 of them free: past the start check, then full well before the end
            (disk / "filler").write_bytes(os.urandom(14 * 2**20))
            limit = {}
            expected = "No space left on device"
        elif _can_limit_file_size():
            limit = {"preexec_fn": _limit_file_size}
            expected = "File too large"
        else:
            pytest.skip("neither a tmpfs mount nor a file-size limit is available here")
        out = disk / "feats.h5"
        failed = _run([*EXTRACT, "--input", str(corpus), "--out", str(out)], **limit)
        assert failed.returncode == 1, failed.stderr
        assert "Traceback" not in failed.stderr and failed.stdout.strip().startswith("{")
        error = json.loads(failed.stdout)["error"]
        assert error.startswith("cannot write ") and expected in error and "run the same command again" in error
        assert not list(out.parent.rglob("*.tmp")), "the failed temporary was not dropped"
        kept = list_shards(out)
        assert kept, "no shard was committed before the disk filled: the test proves nothing"
        for shard in kept:  # every committed shard is whole and verifies
            with open_features(shard, verify=True) as feats:
                assert len(feats) and all(s.tokens.shape[0] == 1 for s in feats)
        if mounted:
            (disk / "filler").unlink()
            subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True, timeout=30)
        resumed = _run([*EXTRACT, "--input", str(corpus), "--out", str(out)])
        assert resumed.returncode == 0, resumed.stderr
        summary = json.loads(resumed.stdout)
        assert summary["skipped"] >= 2 * len(kept) - 2 and summary["written"] + summary["skipped"] == 25
        assert _rows(out) == _rows(clean)


def test_index_on_a_full_disk_keeps_the_previous_index(tmp_path):
    media = tmp_path / "media"
    for i in range(6):
        make_image(media / f"{i}.png", 56 * (1 + i % 3), 84)
    built = tmp_path / "built" / "feats.h5"
    done = _run([sys.executable, "-m", "merge_cli", "extract", "--input", str(media), "--out", str(built),
                 "--device", "cpu", "--workers", "0", "--json"])
    assert done.returncode == 0, done.stderr
    disk = tmp_path / "disk"
    with small_disk(disk, 2) as mounted:
        if mounted:  # the output on a disk with 4 KB left
            subprocess.run(["cp", "-r", str(built), f"{built}.d", str(disk)], check=True, timeout=60)
            stat = os.statvfs(disk)
            (disk / "filler").write_bytes(b"\1" * max(0, stat.f_bavail * stat.f_frsize - 4096))
            out, limit = disk / "feats.h5", {}
        elif _can_limit_file_size():  # files may not grow past 4 KB
            out = built
            limit = {"preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))}
        else:
            pytest.skip("neither a tmpfs mount nor a file-size limit is available here")
        before = hashlib.sha256(out.read_bytes()).hexdigest()
        rebuilt = _run([sys.executable, "-m", "merge_cli", "index", str(out)], **limit)
        assert rebuilt.returncode == 1, (rebuilt.returncode, rebuilt.stderr)  # not a crash (-11, 139)
        assert "Traceback" not in rebuilt.stderr and len(rebuilt.stderr.strip().splitlines()) == 1
        assert rebuilt.stderr.startswith("merge-cli: error: cannot write ")
        assert hashlib.sha256(out.read_bytes()).hexdigest() == before
        assert not list(out.parent.glob("*.tmp"))
        assert len(_rows(out)) == 6


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path):
    media = tmp_path / "media"
    make_image(media / "a.png", 56, 56)
    disk = tmp_path / "ro"
    with small_disk(disk, 1, "ro") as mounted:
        if not mounted:
            pytest.skip("cannot mount a read-only tmpfs here (the unprivileged case is in test_cli_edges)")
        done = _run([sys.executable, "-m", "merge_cli", "extract", "--input", str(media), "--out",
                     str(disk / "feats.h5"), "--tower", "/nonexistent-tower-folder"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot create files in" in done.stderr and "Read-only file system" in done.stderr
