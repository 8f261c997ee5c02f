"""torch_dist's ``.metadata`` read without running code from it.

``torch.distributed.checkpoint`` stores a checkpoint's index as a plain pickle, which executes whatever a
crafted file asks for. Every ``.metadata`` this project reads goes through :func:`read_metadata` first: an
unpickler that resolves only the classes torch's checkpoint metadata is made of (an allow-list) and
refuses anything else with a one-line ``DataError``. A file that passes holds nothing but those classes, so
the later loads by torch or megatron of the same bytes build the same harmless objects. Garbage or a
truncated file is a ``DataError`` too, never a traceback.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from data_pipeline.errors import DataError

METADATA = ".metadata"

# classes defined in these modules (dataclasses and enums of the index and of the save plan megatron keeps)
_CHECKPOINT_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


def _torch_dtype_names() -> set[str]:
    import torch

    return {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; classes of the checkpoint metadata module and torch dtypes."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self._source = source
        self._dtypes = _torch_dtype_names()

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and name in self._dtypes):
            return super().find_class(module, name)
        if module in _CHECKPOINT_MODULES and not name.startswith("_") or (module, name) == (
                "torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"):
            found = super().find_class(module, name)
            # only classes defined there: not a function, nor a module or callable it merely imported
            if isinstance(found, type) and found.__module__ == module:
                return found
        raise DataError(f"{self._source}: refuses to load {module}.{name} (not a class torch's checkpoint "
                        "metadata is made of): the file is corrupt or crafted")

    def persistent_load(self, pid):
        raise DataError(f"{self._source}: unexpected persistent reference in checkpoint metadata")


def read_metadata(step_dir: str | Path):
    """The ``torch.distributed.checkpoint.metadata.Metadata`` of a step dir, read with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(step_dir) / METADATA
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        meta = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001  (any unpickling failure of bad bytes is one line)
        raise DataError(f"{path}: not a readable torch_dist metadata file ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, Metadata):
        raise DataError(f"{path}: holds a {type(meta).__name__}, not torch_dist checkpoint metadata")
    return meta


def filesystem_reader(step_dir: str | Path):
    """torch's ``FileSystemReader`` whose metadata comes from :func:`read_metadata` (read once, checked)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    checked = read_metadata(step_dir)

    class _CheckedReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # what torch's own does after its plain pickle.load
            if getattr(checked, "storage_meta", None) is None:
                checked.storage_meta = StorageMeta()
            checked.storage_meta.load_id = self.load_id
            return checked

    return _CheckedReader(str(step_dir))
