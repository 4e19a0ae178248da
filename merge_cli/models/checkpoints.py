"""Reading tensors from checkpoint files without ever executing a pickle.

`.safetensors` files are read with safetensors; `.bin` / `.pt` / `.pth` files with
`torch.load(..., weights_only=True)`, which refuses any pickle that would construct arbitrary
objects. A folder is read as all of its `*.safetensors` files (or, failing those, `*.bin` files).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from merge_cli.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

KeyFilter = Callable[[str], bool]


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files a checkpoint path stands for, in a stable order."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint is neither a file nor a folder: {path}")
    safetensors_files = sorted(path.glob("*.safetensors"))
    if safetensors_files:
        return safetensors_files
    pickle_files = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickle_files:
        return pickle_files
    raise CheckpointError(f"no *.safetensors or *.bin weight files in {path}")


def stored_values(path: Path | str) -> int:
    """How many values a checkpoint's weight files hold, without reading any tensor: exact for
    .safetensors (the shapes in each header), a ceiling for pickles (two per byte of the file: no
    stored dtype packs more)."""
    total = 0
    for file in checkpoint_files(Path(path)):
        if file.suffix in SAFETENSORS_SUFFIXES:
            total += _safetensors_values(file)
        else:
            total += 2 * file.stat().st_size
    return total


def _safetensors_values(file: Path) -> int:
    import math

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {file}: not a readable .safetensors file ({_first_line(error)})") from error


def read_tensors(path: Path | str, keep: KeyFilter | None = None) -> dict[str, torch.Tensor]:
    """All tensors (or those whose name passes `keep`) from a checkpoint file or folder, on CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(Path(path)):
        part = _read_file(file, keep)
        clash = tensors.keys() & part.keys()
        if clash:
            raise CheckpointError(f"tensor {sorted(clash)[0]!r} appears in more than one file of {path}")
        tensors.update(part)
    return tensors


def _read_file(file: Path, keep: KeyFilter | None) -> dict[str, torch.Tensor]:
    if file.suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(file, keep)
    if file.suffix in PICKLE_SUFFIXES:
        return _read_pickle(file, keep)
    raise CheckpointError(
        f"unsupported checkpoint file {file.name}: expected .safetensors, .bin, .pt or .pth"
    )


def _read_safetensors(file: Path, keep: KeyFilter | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            # Only the wanted tensors are read: a full LLM checkpoint may hold many GB.
            return {name: handle.get_tensor(name) for name in handle.keys() if keep is None or keep(name)}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {file}: not a readable .safetensors file ({_first_line(error)})") from error


# What torch.save writes first: a zip archive (the default since torch 1.6), or a pickle of
# protocol 2 or later (the legacy format). Anything else is not a checkpoint, whatever its name.
_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


def _read_pickle(file: Path, keep: KeyFilter | None) -> dict[str, torch.Tensor]:
    import pickle

    try:
        with open(file, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise CheckpointError(f"cannot read {file}: {error.strerror or error}") from error
    if not magic.startswith(_TORCH_SAVE_MAGIC):
        raise CheckpointError(f"cannot read {file}: {_NOT_A_CHECKPOINT}")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {file}: it is not a plain tensor checkpoint and merge-cli never "
            f"executes pickled code (weights_only=True said: {_first_line(error)})"
        ) from error
    except OSError as error:
        raise CheckpointError(f"cannot read {file}: {error.strerror or error}") from error
    except Exception as error:  # not a checkpoint at all: text or random bytes fail in any way (KeyError: 101)
        raise CheckpointError(
            f"cannot read {file}: {_NOT_A_CHECKPOINT}; torch.load said {type(error).__name__}: {_first_line(error)}"
        ) from error
    state = _unwrap_state_dict(loaded, file)
    return {name: value for name, value in state.items() if keep is None or keep(name)}


_NOT_A_CHECKPOINT = "not a PyTorch checkpoint (expected a state dict saved with torch.save, or a .safetensors file)"


def _first_line(error: BaseException, limit: int = 200) -> str:
    from merge_cli.records import printable

    text = str(error).strip()
    return printable(text.splitlines()[0], limit) if text else type(error).__name__


def _unwrap_state_dict(loaded: object, file: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, or one nested under a usual key such as `state_dict`."""
    if isinstance(loaded, dict):
        for wrapper in ("state_dict", "model", "module"):
            inner = loaded.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
                loaded = inner
                break
        tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{file} holds no tensors by name (expected a state dict)")
