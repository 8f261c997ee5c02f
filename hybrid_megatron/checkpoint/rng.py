"""Every rank's random-number state in a checkpoint, stored as tensors and plain values only.

Python's, numpy's, torch's (CPU and CUDA) and megatron's CUDA RNG tracker states are written with
``torch.save`` in a form ``torch.load(weights_only=True)`` reads back: no pickled numpy objects or
arbitrary classes, so loading a downloaded checkpoint's RNG file cannot run code from it.
"""

from __future__ import annotations

import random
from pathlib import Path

from data_pipeline.errors import DataError


def capture() -> dict:
    """This process's RNG states (tensors, ints, floats, strings, tuples and dicts only)."""
    import numpy as np
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, mt, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss},
        "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "tracker": dict(get_cuda_rng_tracker().get_states()),
    }
    if torch.cuda.is_available():  # training always has CUDA; the checkpoint logic is tested without it
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    import numpy as np
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save(path: Path) -> None:
    import torch

    torch.save(capture(), path)


def load(path: Path) -> dict:
    """The stored state, read with ``weights_only=True``; DataError for a file that is not such a state."""
    import pickle

    import torch

    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable RNG state (refused by torch.load(weights_only=True): {first})") from None
    if not isinstance(state, dict) or not {"python", "numpy", "torch", "tracker"} <= set(state):
        raise DataError(f"{path}: not an RNG state of this project (keys {sorted(state) if isinstance(state, dict) else type(state).__name__})")
    return state
