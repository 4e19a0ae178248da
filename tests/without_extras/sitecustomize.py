"""Loaded only by test_optional_extras.py (PYTHONPATH): makes the packages named in
MERGE_CLI_BLOCK fail to import, as on a machine without that extra installed."""

import os
import sys

_BLOCKED = set(filter(None, os.environ.get("MERGE_CLI_BLOCK", "").split(",")))


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
