"""Without the optional extras (zstd -> hdf5plugin, hf -> transformers) the tests that need them
skip with a reason; none fails. Runs those test files in a child pytest that cannot import them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_tests_needing_extras_skip_without_them():
    env = dict(os.environ, MERGE_CLI_BLOCK="hdf5plugin,transformers")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "without_extras"), *filter(None, [env.get("PYTHONPATH")])])
    files = ["test_store.py", "test_reader.py", "test_towers_hf.py", "test_grid.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k", "zstd or hdf5plugin or transformers",
         *(str(TESTS / name) for name in files)],
        capture_output=True, text=True, timeout=300, cwd=TESTS.parent, env=env,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "blocked by the test" not in report, report  # nothing imported them unguarded
    assert "needs the [zstd] extra (hdf5plugin)" in report and "needs the [hf] extra" in report, report
