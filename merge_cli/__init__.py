"""merge-cli: pre-extract vision-tower features with a 2x2 spatial token merger into HDF5.

The public API is imported lazily so that `merge-cli --help` never pays for torch or h5py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "SpatialMergeProjector",
    "__version__",
    "load_projector",
    "merge_windows",
    "open_features",
    "FeatureDataset",
]

_LAZY = {
    "SpatialMergeProjector": "merge_cli.models.merger",
    "load_projector": "merge_cli.models.merger",
    "merge_windows": "merge_cli.models.merger",
    "open_features": "merge_cli.output.reader",
    "FeatureDataset": "merge_cli.output.reader",
}

if TYPE_CHECKING:  # pragma: no cover
    from merge_cli.models.merger import (
        SpatialMergeProjector,
        load_projector,
        merge_windows,
    )
    from merge_cli.output.reader import FeatureDataset, open_features


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'merge_cli' has no attribute {name!r}")
