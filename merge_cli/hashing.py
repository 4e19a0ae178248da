"""Content hashes for provenance: of tensors (tower and projector weights) and of settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
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



def key_hash(key: str) -> int:
    """Stable 64-bit hash of a sample key (blake2b, not Python's salted hash): the same on every
    rank, run and machine. The listing's duplicate check and the index's key table use it."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def key_hashes(keys: Iterable[str]) -> Any:
    """key_hash of every key, as a numpy uint64 array."""
    import numpy as np  # lazy: the CLI's import must stay light

    blake = hashlib.blake2b
    joined = b"".join(blake(k.encode("utf-8", "surrogateescape"), digest_size=8).digest() for k in keys)
    return np.frombuffer(joined, dtype="<u8").astype(np.uint64)
