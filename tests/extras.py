"""Markers for tests that need an optional extra: they skip, with the reason, when it is missing."""

from __future__ import annotations

import pytest


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


needs_hdf5plugin = pytest.mark.skipif(not _importable("hdf5plugin"), reason="needs the [zstd] extra (hdf5plugin)")
needs_transformers = pytest.mark.skipif(not _importable("transformers"), reason="needs the [hf] extra (transformers)")
