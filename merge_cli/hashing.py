"""Content hashes for provenance: of tensors (tower and projector weights) and of settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def hash_json(value: Any, length: int = 16) -> str:
    """Stable short hash of a JSON-able value (keys sorted, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def hash_state_dict(state: Mapping[str, Any], length: int = 16) -> str:
    """Hash of names, dtypes, shapes and raw bytes of every tensor, independent of file format."""
    import torch  # lazy: settings hashes must not pull torch in

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]

