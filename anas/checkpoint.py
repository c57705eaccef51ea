"""Checkpoint files that are written atomically and loaded without running pickled code.

A checkpoint contains only tensors, numbers, booleans, strings, None, `torch.dtype` / `torch.Size`
and lists, tuples and dicts of those (module and optimizer state dicts fit). Random-number
states are stored as tensors, so `torch.load(weights_only=True)` can read every field.
"""

import os
import pickle
import random
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anas.errors import ConfigError

# Exact types: subclasses such as numpy.float64 pickle through their own reducers, which
# weights-only loading refuses.
_PLAIN_TYPES = (bool, int, float, str, type(None))
_DICT_TYPES = (dict, OrderedDict)
_SEQUENCE_TYPES = (list, tuple, torch.Size)

# Errors torch.load (2.14) raises for a truncated or corrupt file. A broken zip archive raises
# RuntimeError, or OSError (EINVAL) when its central directory points past the end of the file.
# An empty or cut-off legacy pickle raises EOFError or UnpicklingError.
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` so that a reader sees either the old file or the whole new one.

    The data go to a temporary file in the same folder, are flushed and fsynced, and the file is
    renamed over `path`. Raises TypeError, before anything is written, when `state` contains a
    value that `load_checkpoint` would reject.
    """
    _check_storable(state, "state")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`, unpickling only tensors and plain data.

    Raises ConfigError naming the file when it is missing, truncated or corrupt, or contains
    objects other than tensors and plain data (which `weights_only=True` refuses to build, so
    their code never runs).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found; check the path or start without resume")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unpickling_failed(path, error) from None
    except PermissionError as error:
        raise ConfigError(f"checkpoint {path} cannot be read: {error}") from None
    except _LOAD_ERRORS as error:
        raise _corrupt(path, error) from None
    if not isinstance(state, dict):
        raise ConfigError(
            f"checkpoint {path} contains a {type(state).__name__}, expected a dict; "
            "write it with save_checkpoint"
        )
    return state


def capture_rng_state() -> dict:
    """Capture the process-wide random-number states (torch CPU, CUDA, Python, NumPy) as tensors."""
    python_version, python_state, gauss_next = random.getstate()
    numpy_kind, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": python_version,
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": numpy_kind,
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "position": int(numpy_position),
            "has_gauss": int(numpy_has_gauss),
            "gauss": float(numpy_gauss),
        },
        "cuda": [],
    }
    # Reading CUDA states initialises CUDA, so it is skipped on machines without a device.
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore the states captured by `capture_rng_state`.

    CUDA states are restored only when this process has as many CUDA devices as the capturing
    one had. Otherwise the CUDA generators keep their current state.
    """
    torch.set_rng_state(state["torch"])

    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))

    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["gauss"],
        )
    )

    cuda_states = state["cuda"]
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all(cuda_states)


def _check_storable(value: Any, where: str) -> None:
    """Raise TypeError naming the first value under `where` that weights-only loading rejects."""
    if type(value) in _PLAIN_TYPES or isinstance(value, (torch.Tensor, torch.dtype)):
        return
    if type(value) in _DICT_TYPES:
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int")
            _check_storable(item, f"{where}[{key!r}]")
        return
    if type(value) in _SEQUENCE_TYPES:
        for index, item in enumerate(value):
            _check_storable(item, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; a checkpoint contains "
        "only tensors, numbers, strings, None and lists, tuples or dicts of those"
    )


def _corrupt(path: Path, error: BaseException) -> ConfigError:
    detail = f"{type(error).__name__}: {_first_line(error)}"
    return ConfigError(
        f"checkpoint {path} is truncated or corrupt ({detail}); "
        "delete it to start from the previous checkpoint or from scratch"
    )


def _unpickling_failed(path: Path, error: pickle.UnpicklingError) -> ConfigError:
    """Turn torch's weights-only refusal into a message naming the file and the cause."""
    text = str(error)
    if "Weights only load failed" not in text:
        return _corrupt(path, error)
    # torch 2.14 puts the cause on its own line: "Trying to load unsupported GLOBAL ..." for a
    # refused class or function, "Unsupported operand N" for an opcode it does not accept.
    causes = [
        line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line
    ]
    cause = causes[0] if causes else _first_line(error)
    if "GLOBAL" in cause:
        return ConfigError(
            f"checkpoint {path} contains disallowed objects, so it was not loaded ({cause}); "
            "only tensors and plain data are accepted, so delete the file or write it again "
            "with save_checkpoint"
        )
    return ConfigError(
        f"checkpoint {path} is corrupt or contains disallowed objects, so it was not loaded "
        f"({cause}); delete it to start from the previous checkpoint or from scratch"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself; folders cannot be opened for fsync on Windows, so skip there."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
